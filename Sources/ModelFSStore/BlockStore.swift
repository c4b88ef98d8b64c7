import Foundation
import ModelFSCore

/// Where a node keeps blocks. Every block returned by `read` has been verified against its id.
public protocol BlockStore: AnyObject, Sendable {
    /// Stores a block under its id (the caller hashed it). Returns false if it was already there
    /// (identical content is stored once).
    @discardableResult
    func put(_ id: BlockID, _ bytes: UnsafeRawBufferPointer) throws -> Bool
    /// The same, for a block whose buffer the caller hands over: its first `length` bytes are
    /// the block, and the store may overwrite the buffer's bytes after them (up to its capacity),
    /// e.g. to pad a direct write. A store can then write from the buffer itself.
    @discardableResult
    func put(_ id: BlockID, owned buffer: BlockBuffer, length: Int) throws -> Bool
    /// Reads and verifies a block: EIO if it is missing or its bytes do not match its name.
    func read(_ id: BlockID) throws -> BlockBuffer
    /// The same, for a reader of `file`: a cluster node's store uses it to share the loading
    /// of one file among the nodes reading it (fan-out). Other stores ignore it.
    func read(_ id: BlockID, for file: FileVersion?) throws -> BlockBuffer
    func contains(_ id: BlockID) -> Bool
    /// Bytes `range` of block `id`, reading and checking only the pieces they touch (PieceSums),
    /// if this store holds it on its disk with piece sums; nil to read the whole block instead.
    func readPieces(_ id: BlockID, _ range: Range<Int>) -> PieceRead?
    /// Makes the given blocks durable against power loss (fsync), if they are not yet.
    func sync(_ ids: [BlockID]) throws
    /// Makes everything on the store's filesystem durable at once (one syncfs).
    func syncFilesystem() throws
    /// Hints that these blocks will be read soon (the store may start reading them from disk).
    func willNeed(_ ids: [BlockID])
    /// The same, for a reader of `file` (see `read(_:for:)`).
    func willNeed(_ ids: [BlockID], for file: FileVersion?)
    /// Blocks a sequential reader of `file` should ask for ahead of the one it reads (8; more
    /// where each block takes several hops to arrive, as in a fan-out tree).
    func readaheadBlocks(for file: FileVersion?) -> Int
    /// Whether `willNeed` itself fetches the blocks this machine does not hold, verified, into
    /// memory for the reader (a store that reaches peers): the reader's own prefetch then reads
    /// ahead only the blocks on this machine's disk, so one prefetcher serves each block.
    var fetchesAhead: Bool { get }
    /// Whether `prefetch` does anything (a store whose blocks are all on this machine gains
    /// nothing from it, and a file's format is then not looked at).
    var prefetches: Bool { get }
    /// A loader of `file` will read these chunks, in this order (format-aware prefetch): the
    /// store may fetch them ahead of it, within its budget.
    func prefetch(_ chunks: [ChunkRef], for file: FileVersion, format: String)
    /// Bytes one open's prefetch may ask for in all (its files together).
    var prefetchBudget: UInt64 { get }
    func usage() -> BlockStoreUsage
}

extension BlockStore {
    public func read(_ id: BlockID, for file: FileVersion?) throws -> BlockBuffer { try read(id) }
    public func willNeed(_ ids: [BlockID], for file: FileVersion?) { willNeed(ids) }
    public func readaheadBlocks(for file: FileVersion?) -> Int { 8 }
    public var prefetches: Bool { false }
    public var fetchesAhead: Bool { false }
    public func prefetch(_ chunks: [ChunkRef], for file: FileVersion, format: String) {}
    public var prefetchBudget: UInt64 { 0 }
    public func readPieces(_ id: BlockID, _ range: Range<Int>) -> PieceRead? { nil }
    @discardableResult
    public func put(_ id: BlockID, owned buffer: BlockBuffer, length: Int) throws -> Bool {
        try buffer.withUnsafeBytes { try put(id, UnsafeRawBufferPointer(rebasing: $0[0..<length])) }
    }
}

/// A store that changes what `put` does and hands everything else to `inner`: a write session's
/// view that notices new blocks (EagerStore), a test's store that fills up. Only the reads, syncs
/// and usage are forwarded here; each such store says what its puts do.
public protocol ForwardingBlockStore: BlockStore {
    var inner: any BlockStore { get }
}

extension ForwardingBlockStore {
    public func read(_ id: BlockID) throws -> BlockBuffer { try inner.read(id) }
    public func contains(_ id: BlockID) -> Bool { inner.contains(id) }
    public func readPieces(_ id: BlockID, _ range: Range<Int>) -> PieceRead? { inner.readPieces(id, range) }
    public func sync(_ ids: [BlockID]) throws { try inner.sync(ids) }
    public func syncFilesystem() throws { try inner.syncFilesystem() }
    public func willNeed(_ ids: [BlockID]) { inner.willNeed(ids) }
    public func usage() -> BlockStoreUsage { inner.usage() }
}

public struct BlockStoreUsage: Sendable, Equatable, Codable {
    public var blocks: UInt64 = 0
    public var bytes: UInt64 = 0
    /// Bytes written to disk by `put` since start (for write amplification).
    public var bytesWritten: UInt64 = 0
    /// Blocks `put` found already stored.
    public var dedupHits: UInt64 = 0
    public init() {}
}
