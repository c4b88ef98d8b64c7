import Foundation
import ModelFSCore

/// Where a node keeps blocks. Every block returned by `read` has been verified against its id.
public protocol BlockStore: AnyObject, Sendable {
    /// Stores a block under its id (the caller hashed it). Returns false if it was already there
    /// (identical content is stored once).
    @discardableResult
    func put(_ id: BlockID, _ bytes: UnsafeRawBufferPointer) throws -> Bool
    /// Reads and verifies a block: EIO if it is missing or its bytes do not match its name.
    func read(_ id: BlockID) throws -> BlockBuffer
    func contains(_ id: BlockID) -> Bool
    /// Makes the given blocks durable against power loss (fsync), if they are not yet.
    func sync(_ ids: [BlockID]) throws
    /// Makes everything on the store's filesystem durable at once (one syncfs).
    func syncFilesystem() throws
    /// Hints that these blocks will be read soon (the store may start reading them from disk).
    func willNeed(_ ids: [BlockID])
    func usage() -> BlockStoreUsage
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
