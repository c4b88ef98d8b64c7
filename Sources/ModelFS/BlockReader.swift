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
    /// One prefetch at a time: it only needs to stay a block ahead of a sequential reader (the
    /// kernel's readahead already sends several requests in parallel), and a concurrent queue
    /// would start a thread and a block buffer per request.
    private let prefetchQueue = DispatchQueue(label: "modelfs.prefetch", qos: .utility)

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

    public func block(_ id: BlockID) throws -> BlockBuffer {
        if let b = cache.get(id) { return b }
        let (loading, mine) = inflight.withLock { m -> (Loading, Bool) in
            if let l = m[id] { return (l, false) }
            let l = Loading(); m[id] = l; return (l, true)
        }
        guard mine else { return try loading.wait() }
        let result = Result { try store.read(id) }
        if case .success(let b) = result { cache.insert(id, b) }
        inflight.withLock { _ = $0.removeValue(forKey: id) }
        loading.finish(result)
        return try result.get()
    }

    /// Starts loading a block the reader will probably want next.
    public func prefetch(_ id: BlockID) {
        if cache.get(id) != nil { return }
        prefetchQueue.async { [self] in _ = try? block(id) }
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
    func index(of offset: UInt64) -> Int {
        var lo = 0, hi = chunks.count - 1
        while lo < hi {
            let mid = (lo + hi + 1) / 2
            if offsets[mid] <= offset { lo = mid } else { hi = mid - 1 }
        }
        return lo
    }

    /// Copies bytes [range) (within 0..<end) into `dst`, block by block.
    func read(_ range: Range<UInt64>, into dst: UnsafeMutableRawPointer, reader: BlockReader) throws {
        guard !range.isEmpty else { return }
        var i = index(of: range.lowerBound)
        var pos = range.lowerBound
        while pos < range.upperBound {
            let c = chunks[i]
            let start = offsets[i]
            let block = try reader.block(c.id)
            guard block.count == Int(c.length) else { throw FSError.io("block \(c.id) has \(block.count) bytes, manifest says \(c.length)") }
            let from = Int(pos - start)
            let n = Int(min(range.upperBound, offsets[i + 1]) - pos)
            block.withUnsafeBytes { src in
                (dst + Int(pos - range.lowerBound)).copyMemory(from: src.baseAddress! + from, byteCount: n)
            }
            pos += UInt64(n)
            // A read that reaches into the second half of a block will want the next one soon.
            if i + 1 < chunks.count && from + n > Int(c.length) / 2 { reader.prefetch(chunks[i + 1].id) }
            i += 1
        }
    }
}
