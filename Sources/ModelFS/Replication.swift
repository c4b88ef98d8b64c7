import Foundation
import ModelFSCore
import ModelFSStore

/// What a cluster node adds to a commit (DESIGN.md §3). A single node has none.
public protocol ReplicationHook: AnyObject, Sendable {
    /// Called under the commit lock once the new version's blocks are in the local store and
    /// before its metadata commit: journals a replication job on disk, so a crash from here on
    /// cannot lose the obligation to replicate. `parent` is a directory the file was reached
    /// through (for its policy), if known.
    func journal(ino: InodeNumber, parent: InodeNumber?, blocks: [BlockID], bytes: UInt64) throws -> ReplicationTicket
    /// close(): returns once the policy's `ack` copies of every block are durable.
    func awaitAck(_ ticket: ReplicationTicket) throws
    /// fsync(): returns once every block is on `replicas` nodes and fsynced there; EIO on timeout
    /// (the job stays queued).
    func awaitReplicas(ino: InodeNumber, parent: InodeNumber?, blocks: [BlockID]) throws
    /// The store a write session of `ino` puts its blocks through: the cluster starts copying
    /// each new block to its other holders as soon as it is stored (eager replication), so at
    /// close() little is left to send.
    func sessionStore(_ store: any BlockStore, ino: InodeNumber, parent: InodeNumber?) -> any BlockStore
    /// Copies of a file's blocks on the live nodes, against the policy that applies under
    /// `parent` (the `user.modelfs.*` xattrs).
    func fileState(blocks: [ChunkRef], parent: InodeNumber?) -> FileReplicaState
}

/// A replication hook's failures (the filesystem reports them from close() and fsync()).
public typealias ReplicationError = LayerError<ReplicationFailure>

public enum ReplicationFailure: Sendable, Equatable {
    /// The policy's copies were not durable within the timeout (the job stays queued).
    case notDurable
    /// The replication journal could not be opened or written.
    case journal
}

public struct ReplicationTicket: Sendable {
    public var job: Int64
    public var ino: InodeNumber
    public var blocks: [BlockID]
    public var ack: Int
    public init(job: Int64, ino: InodeNumber, blocks: [BlockID], ack: Int) {
        self.job = job; self.ino = ino; self.blocks = blocks; self.ack = ack
    }
}

/// One node at a time may have a file open for writing (DESIGN.md §3): a second node gets EBUSY.
public protocol WriterLock: AnyObject, Sendable {
    /// Takes the file for this node (again, if it already holds it); EBUSY if another node has
    /// it. Returns the lock's epoch (the revision at which this node took it), which fences the
    /// session's commits (`CommitFence`).
    func acquire(_ ino: InodeNumber) throws -> Int64
    /// Gives it back (the node's last handle of a file it wrote closed).
    func release(_ ino: InodeNumber)
}
