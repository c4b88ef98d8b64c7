import Foundation
import ModelFSCore
import ModelFSStore
import CModelFSSys

/// Turns a stream of bytes into chunks: the chunker finds content-defined boundaries in the bytes
/// as they arrive and each byte is copied once, into its chunk's buffer. Each finished chunk's
/// buffer is handed to a sink (which hashes and stores it, now or on another thread) and a fresh
/// buffer continues. Nothing is re-read later (DESIGN.md §3).
struct ChunkWriter {
    /// Receives a finished chunk: its buffer (now the sink's) and its length.
    typealias Sink = (BlockBuffer, Int) throws -> Void

    private var chunker: Chunker
    private var buffer: BlockBuffer
    private let maxSize: Int
    /// Bytes in `buffer` (the unfinished chunk).
    private(set) var length = 0
    /// Whether the stream is a zip archive, from its first bytes (nil until they come): only
    /// then are its bytes searched for entry headers (`ZipCuts`), so other files pay nothing.
    private var zip: Bool?
    /// Bytes appended since the stream began, and where in it the next zip header may start
    /// (after the data of the last entry found, whose size its header gave): the bytes before
    /// are not searched.
    private var position: UInt64 = 0
    private var nextHeader: UInt64 = 0

    init(parameters: ChunkerParameters) {
        chunker = Chunker(parameters)
        maxSize = parameters.maxSize
        buffer = BlockBuffer(count: parameters.maxSize)
    }

    /// Copies pending bytes [from, from+count) of the unfinished chunk.
    func copyPending(from: Int, count: Int, to dst: UnsafeMutableRawPointer) {
        buffer.withUnsafeBytes { dst.copyMemory(from: $0.baseAddress! + from, byteCount: count) }
    }

    /// Scans the incoming bytes where they are and copies each into the chunk buffer once, up to
    /// a boundary at a time: the bytes after a boundary go straight into the next chunk's buffer
    /// (copying all of a write first and moving what followed a boundary afterwards copied half
    /// of the bytes twice).
    ///
    /// Zip entries (torch.save, .npz, .keras) are also cut at their own edges: before a stored
    /// entry's local header and where its data starts (`ZipCuts`), so the header is a small
    /// chunk of its own and the data is chunked the same whatever the header says. A torch
    /// checkpoint names every entry after the file (`step3/data/17`): cut by content alone, each
    /// step's new names changed the ~1 MiB chunk around every header, and a step stored 3× the
    /// bytes of the tensors that changed (docs/PERFORMANCE.md). A stream is taken for a zip
    /// archive when its first bytes are a local header's signature (torch.save, .npz, .keras).
    mutating func append(_ bytes: UnsafeRawBufferPointer, sink: Sink) throws {
        if zip == nil { zip = ZipCuts.isSignature(bytes) }
        var consumed = 0
        var cuts: [Int] = []
        if zip == true && nextHeader < position + UInt64(bytes.count) {
            let from = Int(nextHeader > position ? nextHeader - position : 0)
            let found = ZipCuts.offsets(in: bytes, from: from)
            cuts = found.cuts
            if let next = found.next { nextHeader = position + UInt64(next) }
        }
        position += UInt64(bytes.count)
        for (target, forced) in cuts.map({ ($0, true) }) + [(bytes.count, false)] {
            while consumed < target {
                // The chunker cuts at maxSize, so it never takes more than the buffer has room for.
                let end = min(target, consumed + (maxSize - length))
                let window = UnsafeRawBufferPointer(rebasing: bytes[consumed..<end])
                let (n, boundary) = chunker.consume(window)
                (buffer.pointer + length).copyMemory(from: window.baseAddress!, byteCount: n)
                length += n
                consumed += n
                if boundary { try cut(sink: sink) }
            }
            if forced && length > 0 { try cut(sink: sink) }
        }
    }

    /// Emits whatever is pending as a last (short) chunk.
    mutating func finish(sink: Sink) throws {
        if length > 0 { try cut(sink: sink) }
        chunker.reset()
    }

    /// Drops pending bytes (the file was truncated below them).
    mutating func discard() {
        length = 0
        zip = nil
        position = 0
        nextHeader = 0
        chunker.reset()
    }

    private mutating func cut(sink: Sink) throws {
        let full = buffer
        let count = length
        buffer = BlockBuffer(count: maxSize)
        length = 0
        chunker.reset()
        try sink(full, count)
    }

    /// Hashes and stores one chunk.
    static func store(_ buffer: BlockBuffer, _ length: Int, in store: any BlockStore) throws -> ChunkRef {
        try buffer.withUnsafeBytes { all in
            let bytes = UnsafeRawBufferPointer(rebasing: all[0..<length])
            let id = BlockID.hash(bytes)
            try store.put(id, bytes)
            return ChunkRef(id: id, length: UInt32(length))
        }
    }
}

/// Where a write's bytes hold a zip archive's stored entry (local file header signature
/// `PK\u{03}\u{04}`, compression method 0): the offset of the header and the offset where its
/// data starts (0…count, ascending), for every header whose fixed part lies in the bytes (the
/// data start only when it does too). A header split between two writes is not seen: its chunk
/// is cut by content alone, which costs dedup, never bytes. A false match in other data is only
/// an extra cut.
enum ZipCuts {
    static let headerSize = 30

    /// Whether `bytes` begin with a local file header's signature.
    static func isSignature(_ bytes: UnsafeRawBufferPointer) -> Bool {
        bytes.count >= 4 && memcmp(bytes.baseAddress!, signature, 4) == 0
    }

    static func offsets(in bytes: UnsafeRawBufferPointer) -> [Int] { offsets(in: bytes, from: 0).cuts }

    /// The cuts from `from` on, and where the next header may start (relative to `bytes`, past
    /// the last entry found whose size its header gives), if an entry was found.
    static func offsets(in bytes: UnsafeRawBufferPointer, from: Int) -> (cuts: [Int], next: Int?) {
        guard from >= 0, bytes.count - from >= headerSize, let base = bytes.baseAddress else { return ([], nil) }
        var out: [Int] = []
        var next: Int?
        var at = from
        while at + headerSize <= bytes.count,
              let hit = memmem(base + at, bytes.count - at, ZipCuts.signature, 4) {
            let p = base.distance(to: UnsafeRawPointer(hit))
            at = p + 1
            guard p + headerSize <= bytes.count else { break }
            func u16(_ o: Int) -> Int { Int(bytes[p + o]) | Int(bytes[p + o + 1]) << 8 }
            guard u16(8) == 0 else { continue }   // compressed: its bytes change with everything
            if out.last != p { out.append(p) }
            let dataStart = p + headerSize + u16(26) + u16(28)
            // The entry's size, when the header has it (not in a data descriptor after the data,
            // flag bit 3, nor in a zip64 field): the next header comes after that many bytes.
            let size = u16(18) | u16(20) << 16
            let known = u16(6) & 0x08 == 0 && size != 0xFFFF_FFFF
            if known { next = dataStart + size }
            guard dataStart <= bytes.count else { break }
            out.append(dataStart)
            if known {
                if dataStart + size >= bytes.count { break }
                at = dataStart + size
            } else {
                at = dataStart
            }
        }
        return (out, next)
    }

    nonisolated(unsafe) static let signature: UnsafeRawPointer = {
        let p = UnsafeMutableRawPointer.allocate(byteCount: 4, alignment: 1)
        p.copyMemory(from: [UInt8]([0x50, 0x4B, 0x03, 0x04]), byteCount: 4)
        return UnsafeRawPointer(p)
    }()
}
