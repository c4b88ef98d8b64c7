import Foundation
import ModelFS
import ModelFSCore
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
public final class EtcdWriterLock: WriterLock, @unchecked Sendable {
    let client: EtcdClient
    let prefix: Data
    let membership: Membership
    let peers: PeerClient
    let closingWait: Duration

    public init(client: EtcdClient, cluster: String, membership: Membership, peers: PeerClient, closingWait: Duration = .seconds(3)) {
        self.client = client
        prefix = Data("/modelfs/\(cluster)/w/".utf8)
        self.membership = membership
        self.peers = peers
        self.closingWait = closingWait
    }

    func key(_ ino: InodeNumber) -> Data { prefix + Data(EtcdTransactionalStore.hex(ino).utf8) }

    public func acquire(_ ino: InodeNumber) throws {
        let me = Data(membership.me.id.utf8), k = key(ino)
        let clock = ContinuousClock()
        var deadline: ContinuousClock.Instant?   // set once the holder said it lets the file go
        var pauseMicros: UInt32 = 2_000
        do {
            while true {
                let r = try client.txn(compare: [.absent(k)], success: [.put(k, me, lease: membership.lease)], failure: [.get(k)],
                                       idempotent: true)   // sent twice, the second finds our own value
                if r.succeeded { return }
                let holder = r.ranges.first?.first?.value ?? Data()
                if holder == me { return }
                let name = String(decoding: holder, as: UTF8.self)
                if deadline == nil, holderLetsGo(name, ino) { deadline = clock.now + closingWait }
                guard let deadline, clock.now < deadline else {
                    throw FSError(EBUSY, "inode \(ino) is open for writing on node \(name); close it there first")
                }
                usleep(pauseMicros)   // RELEASE usually follows the close within milliseconds
                pauseMicros = min(pauseMicros * 2, 100_000)
            }
        } catch let e as EtcdError {
            throw FSError.io("cannot take the write lease of inode \(ino): \(e)")
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
        let k = key(ino)
        _ = try? client.txn(compare: [.value(k, equals: Data(membership.me.id.utf8))], success: [.delete(k)], idempotent: true)
    }
}
