import Foundation
import Synchronization
import ModelFS
import ModelFSCore
import ModelFSWire
import ModelFSMeta

/// One writer node per file (DESIGN.md §3), through etcd: `/modelfs/NAME/w/INO` holds the id of
/// the node writing the file, under that node's lease, so a node that dies gives its files up
/// when its lease expires. Taking it is one txn (create if absent); giving it back deletes it
/// only if this node still holds it.
///
/// The kernel sends RELEASE after close() has returned, so a node that closed its last handle
/// of a file still holds the lock for a moment. A node that finds the lock held asks the holder
/// (`GET /v1/writing/INO`): if the holder is closing the file (the FLUSH of its last handle
/// came) or no longer writes it (its RELEASE is deleting the lock), it waits up to
/// `closingWait` for the lock to go, polling etcd; otherwise, or if the holder cannot be asked,
/// it answers EBUSY at once. So after close() returns on A, an open for writing on B succeeds
/// (close-to-open), and a close costs no etcd write beyond RELEASE's.
///
/// A RELEASE whose delete fails (etcd unreachable for a moment) is retried in the background
/// until the lock is gone or this node takes the file again: otherwise the lock would outlive
/// the close by as long as this node's lease, which is as long as the node runs, and every other
/// node's open for writing would wait `closingWait` and fail with EBUSY.
public final class EtcdWriterLock: WriterLock, @unchecked Sendable {
    let client: EtcdClient
    let keys: EtcdKeys
    let membership: Membership
    let peers: PeerClient
    let closingWait: Duration
    /// Locks released by the filesystem whose etcd delete has not succeeded yet. A retry deletes
    /// under this mutex and an acquire removes its inode under it before its txn, so a retry never
    /// deletes a lock this node has taken again.
    private let unreleased = Mutex<(inodes: Set<InodeNumber>, retrying: Bool)>(([], false))
    private let retries = DispatchQueue(label: "modelfs.writer-lock.release")
    let retryPause: Duration

    public init(client: EtcdClient, cluster: String, membership: Membership, peers: PeerClient, closingWait: Duration = .seconds(3),
                retryPause: Duration = .milliseconds(500)) {
        self.client = client
        self.retryPause = retryPause
        keys = EtcdKeys(cluster: cluster)
        self.membership = membership
        self.peers = peers
        self.closingWait = closingWait
    }

    func key(_ ino: InodeNumber) -> Data { keys.writer(ino) }

    public func acquire(_ ino: InodeNumber) throws -> Int64 {
        let me = Data(membership.me.id.utf8), k = key(ino)
        let clock = ContinuousClock()
        var deadline: ContinuousClock.Instant?   // set once the holder said it lets the file go
        var pauseMicros: UInt32 = 2_000
        unreleased.withLock { _ = $0.inodes.remove(ino) }   // a stale lock of ours is ours again
        var lease = membership.lease
        var renewals = 0
        do {
            while true {
                let r: EtcdClient.TxnResult
                do {
                    r = try client.txn(compare: [.absent(k)], success: [.put(k, me, lease: lease)], failure: [.get(k)],
                                       idempotent: true)   // sent twice, the second finds our own value
                } catch EtcdError.rejected(_, let message) where message.contains("lease not found") && renewals < 3 {
                    // The node's lease lapsed (etcd too busy to see its keep-alives in time):
                    // the lock goes under the new one.
                    renewals += 1
                    lease = try membership.renewLease(lost: lease)
                    continue
                }
                if r.succeeded { return r.revision }   // the put's revision: the lock's create revision
                let held = r.ranges.first?.first
                let holder = held?.value ?? Data()
                if holder == me, let held { return held.createRevision }
                let name = String(decoding: holder, as: UTF8.self)
                if deadline == nil, holderLetsGo(name, ino) { deadline = clock.now + closingWait }
                guard let deadline, clock.now < deadline else {
                    throw FSError(EBUSY, "inode \(ino) is open for writing on node \(name); close it there first")
                }
                usleep(pauseMicros)   // RELEASE usually follows the close within milliseconds
                pauseMicros = min(pauseMicros * 2, 100_000)
            }
        } catch let e as EtcdError {
            throw MetaError(.unavailable, "cannot take the write lease of inode \(ino)", cause: e)
        }
    }

    /// The holder is closing the file, or has closed it and is deleting the lock (its session
    /// goes before the etcd delete, so for a moment it writes nothing and still holds the lock).
    private func holderLetsGo(_ id: String, _ ino: InodeNumber) -> Bool {
        guard let node = (membership.peers + membership.lost).first(where: { $0.id == id }),
              let w = try? peers.writing(ino, at: node) else { return false }
        return w.closing || !w.open
    }

    public func release(_ ino: InodeNumber) {
        if (try? delete(ino)) != nil { return }
        let start = unreleased.withLock { u -> Bool in
            u.inodes.insert(ino)
            let idle = !u.retrying
            u.retrying = true
            return idle
        }
        if start { scheduleRetry(after: retryPause) }
    }

    /// How many released locks still wait for their etcd delete.
    public var unreleasedCount: Int { unreleased.withLock { $0.inodes.count } }

    /// Deletes this node's lock of `ino` if it still holds it; throws when etcd gives no answer.
    private func delete(_ ino: InodeNumber) throws {
        let k = key(ino)
        _ = try client.txn(compare: [.value(k, equals: Data(membership.me.id.utf8))], success: [.delete(k)], idempotent: true)
    }

    private func scheduleRetry(after pause: Duration) {
        let c = pause.components
        let seconds = Double(c.seconds) + Double(c.attoseconds) / 1e18
        retries.asyncAfter(deadline: .now() + seconds) { [weak self] in
            guard let self else { return }
            let pending = unreleased.withLock { $0.inodes }
            for ino in pending {
                unreleased.withLock { u in
                    guard u.inodes.contains(ino), (try? delete(ino)) != nil else { return }
                    u.inodes.remove(ino)
                }
            }
            let again = unreleased.withLock { u -> Bool in
                u.retrying = !u.inodes.isEmpty
                return u.retrying
            }
            if again {
                Log.warning("writer lock: \(unreleasedCount) released lock(s) not yet deleted in etcd (etcd unreachable?); retrying")
                scheduleRetry(after: min(pause * 2, .seconds(5)))
            }
        }
    }
}
