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
/// of a file still holds the lock for a moment. Its flush marks the value "closing" first (the
/// id, a NUL, `closing`: a NUL cannot be in an id given on a command line), and a node that
/// finds the lock so marked waits up to `closingWait` for it to go before answering EBUSY:
/// after close() returns on A, an open for writing on B succeeds (close-to-open). A node that
/// finds it held plainly answers EBUSY at once.
public final class EtcdWriterLock: WriterLock, @unchecked Sendable {
    let client: EtcdClient
    let prefix: Data
    let membership: Membership
    let closingWait: Duration

    public init(client: EtcdClient, cluster: String, membership: Membership, closingWait: Duration = .seconds(3)) {
        self.client = client
        prefix = Data("/modelfs/\(cluster)/w/".utf8)
        self.membership = membership
        self.closingWait = closingWait
    }

    func key(_ ino: InodeNumber) -> Data { prefix + Data(EtcdTransactionalStore.hex(ino).utf8) }
    var held: Data { Data(membership.me.id.utf8) }
    static func closing(_ held: Data) -> Data { held + Data("\u{0}closing".utf8) }

    public func acquire(_ ino: InodeNumber) throws {
        let me = held, k = key(ino)
        let clock = ContinuousClock()
        let deadline = clock.now + closingWait
        var pauseMicros: UInt32 = 5_000
        do {
            while true {
                let r = try client.txn(compare: [.absent(k)], success: [.put(k, me, lease: membership.lease)], failure: [.get(k)],
                                       idempotent: true)   // sent twice, the second finds our own value
                if r.succeeded { return }
                let holder = r.ranges.first?.first?.value ?? Data()
                if holder == me { return }
                if holder == Self.closing(me) {
                    // This node closed its last handle and opens the file again before RELEASE came.
                    let back = try client.txn(compare: [.value(k, equals: holder)], success: [.put(k, me, lease: membership.lease)],
                                              idempotent: true)
                    if back.succeeded { return }
                    continue
                }
                let name = holder.split(separator: 0, maxSplits: 1).first.map { String(decoding: $0, as: UTF8.self) } ?? "?"
                guard holder.contains(0), clock.now < deadline else {
                    throw FSError(EBUSY, "inode \(ino) is open for writing on node \(name); close it there first")
                }
                usleep(pauseMicros)   // polls etcd: RELEASE usually follows within milliseconds
                pauseMicros = min(pauseMicros * 2, 100_000)
            }
        } catch let e as EtcdError {
            throw FSError.io("cannot take the write lease of inode \(ino): \(e)")
        }
    }

    public func closing(_ ino: InodeNumber) {
        let k = key(ino)
        _ = try? client.txn(compare: [.value(k, equals: held)], success: [.put(k, Self.closing(held), lease: membership.lease)],
                            idempotent: true)
    }

    public func release(_ ino: InodeNumber) {
        let k = key(ino), me = held
        guard let r = try? client.txn(compare: [.value(k, equals: me)], success: [.delete(k)], failure: [.get(k)], idempotent: true),
              !r.succeeded, r.ranges.first?.first?.value == Self.closing(me) else { return }
        _ = try? client.txn(compare: [.value(k, equals: Self.closing(me))], success: [.delete(k)], idempotent: true)
    }
}
