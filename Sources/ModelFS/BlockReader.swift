import Foundation
import ModelFSCore
import ModelFSStore
import Synchronization

/// Gets verified blocks for readers: from the in-memory cache, else from the store (which
/// verifies), loading each block once even when several kernel requests want it at the same time,
/// and prefetching the next block of a sequential read in the background.
public final class BlockReader: @unchecked Sendable {
    let store: any BlockStore
    public let cache: BlockCache
    private let inflight = Mutex([BlockID: Loading]())
    /// Prefetches (read + verify into the cache) run on a concurrent queue but at most
    /// `prefetchSlots` at a time; a prefetch that finds no free slot is dropped, so a fast
    /// reader never queues up threads and buffers.
    private let prefetchQueue = DispatchQueue(label: "modelfs.prefetch", qos: .utility, attributes: .concurrent)
    private let prefetchSlots = DispatchSemaphore(value: 2)

    final class Loading: @unchecked Sendable {
        let condition = NSCondition()
        var result: Result<BlockBuffer, any Error>?
        func wait() throws -> BlockBuffer {
            condition.lock(); defer { condition.unlock() }
            while result == nil { condition.wait() }
            return try result!.get()
        }
        func finish(_ r: Result<BlockBuffer, any Error>) {
            condition.lock(); result = r; condition.broadcast(); condition.unlock()
        }
    }

    public init(store: any BlockStore, cache: BlockCache) {
        self.store = store
        self.cache = cache
    }

    /// Small reads answered from the pieces they touch (`piece`): how many, and the bytes read
    /// for them from disk.
    public struct PieceStats: Sendable, Codable, Equatable {
        public var reads: UInt64 = 0
        public var bytes: UInt64 = 0
        public init() {}
    }
    private let pieces = Mutex(PieceState())
    private struct PieceState {
        var stats = PieceStats()
        /// Where the last piece read of a block ended: a read that starts there is sequential,
        /// and gets the whole block (cached) instead. Bounded: forgotten all at once when full.
        var ends: [BlockID: Int] = [:]
    }
    public var pieceStats: PieceStats { pieces.withLock { $0.stats } }

    /// A read this small, of a block at least `pieceReadRatio` times larger, goes by pieces.
    static let pieceReadMaximum = 128 << 10
    static let pieceReadRatio = 4

    /// Bytes `range` of block `id` (of `length` bytes) as a slice read and checked piece by piece
    /// (PieceSums), when that is the cheaper way: a small read of a block that is neither in
    /// memory nor being loaded, that does not follow this block's last piece read, of a block the
    /// store holds with piece sums. Nil: read the whole block (`block`).
    func piece(_ id: BlockID, _ range: Range<Int>, length: Int) -> ReadSlice? {
        guard range.count <= Self.pieceReadMaximum, length >= range.count * Self.pieceReadRatio,
              !cache.contains(id), inflight.withLock({ $0[id] == nil }),
              pieces.withLock({ $0.ends[id] != range.lowerBound }),
              let r = store.readPieces(id, range) else { return nil }
        pieces.withLock { p in
            p.stats.reads += 1
            p.stats.bytes += UInt64(r.buffer.count)
            if p.ends.count >= 4096 { p.ends.removeAll(keepingCapacity: true) }
            p.ends[id] = range.upperBound
        }
        return ReadSlice(buffer: r.buffer, offset: range.lowerBound - r.start, count: range.count)
    }

    /// `file`: the version being read, if any (the store may share its loading with other nodes).
    public func block(_ id: BlockID, for file: FileVersion? = nil) throws -> BlockBuffer {
        if let b = cache.get(id) { return b }
        let (loading, mine) = inflight.withLock { m -> (Loading, Bool) in
            if let l = m[id] { return (l, false) }
            let l = Loading(); m[id] = l; return (l, true)
        }
        guard mine else { return try loading.wait() }
        let result = Result { try store.read(id, for: file) }
        if case .success(let b) = result { cache.insert(id, b) }
        inflight.withLock { _ = $0.removeValue(forKey: id) }
        loading.finish(result)
        return try result.get()
    }

    /// A sequential reader will want these blocks next, in this order: the store is told to start
    /// reading them from disk (or fetching them, for a store that reaches peers), and the first
    /// ones on this machine's disk are read and verified in the background. A block the store
    /// fetches ahead itself is left to it: one prefetcher per block (a second one here only waited
    /// on the first's fetch, a thread per block of a cold remote read).
    public func readahead(_ ids: some Sequence<BlockID>, for file: FileVersion? = nil) {
        let missing = cache.missing(ids)
        guard !missing.isEmpty else { return }
        store.willNeed(missing, for: file)
        let fetchesAhead = store.fetchesAhead
        for id in missing.prefix(2) where !fetchesAhead || store.contains(id) {
            guard prefetchSlots.wait(timeout: .now()) == .success else { return }
            prefetchQueue.async { [self] in
                defer { prefetchSlots.signal() }
                _ = try? block(id, for: file)
            }
        }
    }
}

/// The chunks of a file version with their offsets, for reads by offset.
struct ChunkList {
    private(set) var chunks: [ChunkRef] = []
    /// offsets[i] is where chunk i starts; the last element is the end.
    private(set) var offsets: [UInt64] = [0]

    init() {}
    init(_ manifest: Manifest) {
        chunks = manifest.chunks
        offsets = manifest.offsets()
    }

    var end: UInt64 { offsets[offsets.count - 1] }
    var manifest: Manifest { Manifest(chunks: chunks) }

    mutating func append(_ c: ChunkRef) {
        chunks.append(c)
        offsets.append(end + UInt64(c.length))
    }

    /// Index of the chunk that holds `offset` (< end).
    func index(of offset: UInt64) -> Int { Self.index(of: offset, in: offsets) }

    /// The same over chunk start offsets (the last element is the end; at least one chunk).
    static func index(of offset: UInt64, in offsets: [UInt64]) -> Int {
        var lo = 0, hi = offsets.count - 2
        while lo < hi {
            let mid = (lo + hi + 1) / 2
            if offsets[mid] <= offset { lo = mid } else { hi = mid - 1 }
        }
        return lo
    }

    /// The blocks that hold bytes [range) (within 0..<end), as slices of verified block buffers,
    /// in order. The read that crosses the middle of a block starts readahead of the following
    /// ones (once per block: a sequential reader asks for each block in several requests).
    func slices(_ range: Range<UInt64>, reader: BlockReader, file: FileVersion? = nil) throws -> [ReadSlice] {
        guard !range.isEmpty else { return [] }
        var out: [ReadSlice] = []
        var i = index(of: range.lowerBound)
        var pos = range.lowerBound
        while pos < range.upperBound {
            let c = chunks[i]
            let from = Int(pos - offsets[i])
            let n = Int(min(range.upperBound, offsets[i + 1]) - pos)
            if let slice = reader.piece(c.id, from..<(from + n), length: Int(c.length)) {
                out.append(slice)
                pos += UInt64(n)
                i += 1
                continue
            }
            let block = try reader.block(c.id, for: file)
            guard block.count == Int(c.length) else { throw FSError.io("block \(c.id) has \(block.count) bytes, manifest says \(c.length)") }
            out.append(ReadSlice(buffer: block, offset: from, count: n))
            pos += UInt64(n)
            let middle = Int(c.length) / 2
            if i + 1 < chunks.count && from <= middle && from + n > middle {
                let ahead = reader.store.readaheadBlocks(for: file)
                reader.readahead(chunks[(i + 1)..<min(chunks.count, i + 1 + ahead)].lazy.map(\.id), for: file)
            }
            i += 1
        }
        return out
    }

    /// Copies bytes [range) (within 0..<end) into `dst`.
    func read(_ range: Range<UInt64>, into dst: UnsafeMutableRawPointer, reader: BlockReader) throws {
        _ = try slices(range, reader: reader).copy(to: dst)
    }
}

extension Array where Element == ReadSlice {
    /// Copies the slices one after another into `dst`; returns the bytes copied.
    func copy(to dst: UnsafeMutableRawPointer) -> Int {
        var at = 0
        for slice in self {
            slice.copy(to: dst + at)
            at += slice.count
        }
        return at
    }
}

/// A piece of a read reply: `count` bytes of `buffer` from `offset`. Replies are sent straight
/// from cached blocks (one iovec per slice), without copying them into a reply buffer.
public struct ReadSlice: Sendable {
    public let buffer: BlockBuffer
    public let offset: Int
    public let count: Int

    func copy(to dst: UnsafeMutableRawPointer) {
        buffer.withUnsafeBytes { dst.copyMemory(from: $0.baseAddress! + offset, byteCount: count) }
    }

    /// Zeros for holes, sliced from one shared buffer.
    static let zeros: BlockBuffer = {
        let b = BlockBuffer(count: 1 << 20)
        memset(b.pointer, 0, b.count)
        return b
    }()

    static func zeroFill(_ count: Int) -> [ReadSlice] {
        stride(from: 0, to: count, by: zeros.count).map { ReadSlice(buffer: zeros, offset: 0, count: min(zeros.count, count - $0)) }
    }
}
