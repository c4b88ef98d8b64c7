import Foundation

/// One chunk of a file version: a block and its length.
public struct ChunkRef: Hashable, Sendable {
    public var id: BlockID
    public var length: UInt32
    public init(id: BlockID, length: UInt32) { self.id = id; self.length = length }
}

/// A file version: the ordered list of its chunks (DESIGN.md §1). The logical size of the file
/// may exceed the sum of chunk lengths only if the tail is a hole (reads as zeros); modelfs
/// always stores holes as zero chunks, so in practice `byteCount == size`.
public struct Manifest: Hashable, Sendable {
    public var chunks: [ChunkRef]

    public init(chunks: [ChunkRef] = []) { self.chunks = chunks }

    public var byteCount: UInt64 { chunks.reduce(0) { $0 + UInt64($1.length) } }

    /// Start offset of every chunk, plus the end offset as a last element.
    public func offsets() -> [UInt64] {
        var out = [UInt64](); out.reserveCapacity(chunks.count + 1)
        var o: UInt64 = 0
        for c in chunks { out.append(o); o += UInt64(c.length) }
        out.append(o)
        return out
    }

    // Encoding: "MFM1", count (UInt32 LE), then per chunk 32 id bytes + UInt32 LE length.
    static let magic: [UInt8] = Array("MFM1".utf8)

    public func encoded() -> Data {
        var d = Data(capacity: 8 + chunks.count * 36)
        d.append(contentsOf: Manifest.magic)
        withUnsafeBytes(of: UInt32(chunks.count).littleEndian) { d.append(contentsOf: $0) }
        for c in chunks {
            d.append(contentsOf: c.id.bytes)
            withUnsafeBytes(of: c.length.littleEndian) { d.append(contentsOf: $0) }
        }
        return d
    }

    public init(decoding data: Data) throws {
        let bytes = [UInt8](data)
        guard bytes.count >= 8, Array(bytes[0..<4]) == Manifest.magic else {
            throw FSError.io("malformed manifest: bad header")
        }
        let count = Int(UInt32(bytes[4]) | UInt32(bytes[5]) << 8 | UInt32(bytes[6]) << 16 | UInt32(bytes[7]) << 24)
        guard bytes.count == 8 + count * 36 else { throw FSError.io("malformed manifest: length \(bytes.count) for \(count) chunks") }
        var chunks = [ChunkRef](); chunks.reserveCapacity(count)
        var p = 8
        for _ in 0..<count {
            guard let id = BlockID(bytes: bytes[p..<p + 32]) else { throw FSError.io("malformed manifest") }
            p += 32
            let len = UInt32(bytes[p]) | UInt32(bytes[p + 1]) << 8 | UInt32(bytes[p + 2]) << 16 | UInt32(bytes[p + 3]) << 24
            p += 4
            chunks.append(ChunkRef(id: id, length: len))
        }
        self.chunks = chunks
    }
}

/// How a file's manifest is stored in metadata: inline when small, otherwise as a block of its
/// own so the metadata engine holds only a small record per file (DESIGN.md §1).
public enum ManifestRef: Hashable, Sendable {
    case inline(Manifest)
    case block(BlockID, chunkCount: UInt32)

    /// Manifests with more chunks than this are stored as blocks (36 bytes a chunk: 16 KiB).
    public static let inlineLimit = 455

    public static let empty = ManifestRef.inline(Manifest())

    // Encoding in metadata: tag byte 0 + manifest encoding, or tag 1 + 32 id bytes + count.
    public func encoded() -> Data {
        switch self {
        case .inline(let m):
            var d = Data([0]); d.append(m.encoded()); return d
        case .block(let id, let count):
            var d = Data([1]); d.append(contentsOf: id.bytes)
            withUnsafeBytes(of: count.littleEndian) { d.append(contentsOf: $0) }
            return d
        }
    }

    public init(decoding data: Data) throws {
        guard let tag = data.first else { self = .empty; return }
        let rest = data.dropFirst()
        switch tag {
        case 0: self = .inline(try Manifest(decoding: Data(rest)))
        case 1:
            let b = [UInt8](rest)
            guard b.count == 36, let id = BlockID(bytes: b[0..<32]) else { throw FSError.io("malformed manifest reference") }
            let count = UInt32(b[32]) | UInt32(b[33]) << 8 | UInt32(b[34]) << 16 | UInt32(b[35]) << 24
            self = .block(id, chunkCount: count)
        default: throw FSError.io("malformed manifest reference tag \(tag)")
        }
    }
}
