import Foundation
import ModelFS
import ModelFSCore
import ModelFSMeta

/// One writer node per file (DESIGN.md §3), through etcd: `/modelfs/NAME/w/INO` holds the id of
/// the node writing the file, under that node's lease, so a node that dies gives its files up
/// when its lease expires. Taking it is one txn (create if absent); giving it back deletes it
/// only if this node still holds it.
public final class EtcdWriterLock: WriterLock, @unchecked Sendable {
    let client: EtcdClient
    let prefix: Data
    let membership: Membership

    public init(client: EtcdClient, cluster: String, membership: Membership) {
        self.client = client
        prefix = Data("/modelfs/\(cluster)/w/".utf8)
        self.membership = membership
    }

    func key(_ ino: InodeNumber) -> Data { prefix + Data(EtcdTransactionalStore.hex(ino).utf8) }

    public func acquire(_ ino: InodeNumber) throws {
        let me = Data(membership.me.id.utf8)
        let k = key(ino)
        do {
            let r = try client.txn(compare: [.absent(k)], success: [.put(k, me, lease: membership.lease)], failure: [.get(k)],
                                   idempotent: true)   // sent twice, the second finds our own value
            if r.succeeded { return }
            let holder = r.ranges.first?.first?.value ?? Data()
            if holder == me { return }
            throw FSError(EBUSY, "inode \(ino) is open for writing on node \(String(decoding: holder, as: UTF8.self)); close it there first")
        } catch let e as EtcdError {
            throw FSError.io("cannot take the write lease of inode \(ino): \(e)")
        }
    }

    public func release(_ ino: InodeNumber) {
        let k = key(ino)
        _ = try? client.txn(compare: [.value(k, equals: Data(membership.me.id.utf8))], success: [.delete(k)], idempotent: true)
    }
}
