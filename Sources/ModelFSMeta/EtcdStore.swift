import Foundation
import ModelFSCore
import Synchronization

/// The cluster engine (`etcd://h1:2379,h2:2379,h3:2379[/NAME]`): the namespace in etcd, so every
/// node sees one tree (DESIGN.md §2). No consensus of our own: each metadata transaction is one
/// etcd transaction.
///
/// Transactions are optimistic (the software-transactional-memory pattern of etcd's own
/// `concurrency.STM`): the body reads at one snapshot revision and buffers its writes; commit is
/// one etcd txn whose compares check that every key read still has the mod revision it was read
/// at (0 for a key that was absent) and that no key appeared in a range that was listed. On a
/// conflict the body runs again on fresh data. A commit whose outcome is unknown (leader lost
/// mid-request) is settled by reading back a marker key the txn wrote: nothing is applied twice.
///
/// Keys, under `/modelfs/NAME/` (inode numbers as 16 hex digits):
///   i/INO          inode record (JSON; "o" names the node that wrote it)
///   m/INO          manifest bytes (large manifests are blocks; this holds their reference)
///   e/PARENT/NAME  directory entry "INO,KIND,ORIGIN"; its create revision is the readdir cookie
///   x/INO/NAME     xattr value
///   n/next_ino     the next unreserved inode number: nodes reserve 1024 at a time
///   t/CLIENT/SLOT  commit markers (one per concurrent writer of a client)
///   w/INO          the node writing the file, under that node's lease (one writer node at a time)
///   nodes/ID       live nodes, under their leases (ModelFSPeer.Membership)
/// Values and names are raw bytes; etcd limits a request to 1.5 MiB, which bounds a manifest
/// kept in etcd (455 chunks inline, far below) and an xattr value (64 KiB, the kernel's limit).
public final class EtcdTransactionalStore: TransactionalStore, @unchecked Sendable {
    public let client: EtcdClient
    let prefix: Data
    let clientID: String
    private let inodeRange = Mutex<(next: UInt64, end: UInt64)>((0, 0))
    private let slots = Mutex<(free: [Int], count: Int)>(([], 0))
    static let inodeBatch: UInt64 = 1024
    static let maxAttempts = 100

    /// `name` selects the cluster's key prefix (`/modelfs/NAME/`), so one etcd can hold several.
    public init(endpoints: [String], name: String, clientID: String = UUID().uuidString) throws {
        client = EtcdClient(endpoints: endpoints)
        prefix = Data("/modelfs/\(name)/".utf8)
        self.clientID = clientID
        do {
            _ = try client.range(key("n/next_ino"))
        } catch {
            client.shutdown()
            throw FSError.io("cannot reach etcd at \(endpoints.joined(separator: ",")): \(error); start the etcd cluster or fix --meta")
        }
    }

    deinit { client.shutdown() }

    func key(_ s: String) -> Data { prefix + Data(s.utf8) }
    public static func hex(_ ino: InodeNumber) -> String {
        let s = String(ino.rawValue, radix: 16)
        return String(repeating: "0", count: 16 - s.count) + s
    }

    public func read<T>(_ body: (any MetadataTransaction) throws -> T) throws -> T {
        for _ in 0..<Self.maxAttempts {
            let tx = EtcdTransaction(store: self, writable: false)
            do { return try body(tx) } catch EtcdError.compacted { continue } catch let e as EtcdError { throw Self.fsError(e) }
        }
        throw FSError.io("metadata (etcd): no consistent snapshot after \(Self.maxAttempts) attempts; retry")
    }

    public func write<T>(_ body: (any MetadataTransaction) throws -> T) throws -> T {
        for attempt in 0..<Self.maxAttempts {
            let tx = EtcdTransaction(store: self, writable: true)
            let result: T
            do { result = try body(tx) } catch EtcdError.compacted { continue } catch let e as EtcdError { throw Self.fsError(e) }
            if tx.writes.isEmpty { return result }

            let slot = takeSlot()
            defer { releaseSlot(slot) }
            let markerKey = key("t/\(clientID)/\(slot)")
            let marker = Data(UUID().uuidString.utf8)
            var ops: [EtcdOp] = tx.writes.map { k, v in v.map { .put(k, $0) } ?? .delete(k) }
            ops.append(.put(markerKey, marker))
            do {
                if try client.txn(compare: tx.compares(), success: ops).succeeded { return result }
            } catch EtcdError.ambiguous(let why) {
                Log.warning("metadata commit outcome unknown (\(why)); reading back its marker")
                do {
                    let r = try client.range(markerKey)
                    if r.kvs.first?.value == marker { return result }
                } catch {
                    throw FSError.io("metadata (etcd): commit outcome unknown and etcd unreachable: \(error); check the etcd cluster")
                }
            } catch let e as EtcdError {
                throw Self.fsError(e)
            }
            // Lost a race with another writer: back off a little (randomised) and run again.
            usleep(UInt32.random(in: 0...UInt32(min(200 << min(attempt, 8), 50_000))))
        }
        throw FSError.io("metadata (etcd): transaction kept conflicting after \(Self.maxAttempts) attempts; retry")
    }

    /// etcd commits are durable once acknowledged: a quorum has fsynced them.
    public func sync() throws {}

    static func fsError(_ e: EtcdError) -> FSError {
        if case .rejected(_, let message) = e, message.contains("space exceeded") {
            return FSError.noSpace("metadata (etcd): storage quota exceeded; compact and defragment etcd or raise --quota-backend-bytes")
        }
        return FSError.io("metadata (etcd): \(e)")
    }

    /// Inode numbers come from a range this client reserved with one etcd txn, 1024 at a time:
    /// creates on different nodes never contend on a counter. Numbers of a txn that fails are
    /// simply never used.
    func allocateInode() throws -> InodeNumber {
        try inodeRange.withLock { range in
            if range.next < range.end {
                defer { range.next += 1 }
                return InodeNumber(range.next)
            }
            let counter = key("n/next_ino")
            for _ in 0..<Self.maxAttempts {
                let r = try client.range(counter)
                let current = r.kvs.first.flatMap { UInt64(String(decoding: $0.value, as: UTF8.self)) } ?? 2
                let next = current + Self.inodeBatch
                let t = try client.txn(compare: [.modRevision(counter, "EQUAL", r.kvs.first?.modRevision ?? 0)],
                                       success: [.put(counter, Data(String(next).utf8))],
                                       idempotent: true)   // applied twice: the retry reserves another range
                if t.succeeded {
                    range = (current + 1, next)
                    return InodeNumber(current)
                }
            }
            throw FSError.io("metadata (etcd): could not reserve inode numbers; retry")
        }
    }

    private func takeSlot() -> Int {
        slots.withLock { s in
            if let slot = s.free.popLast() { return slot }
            s.count += 1
            return s.count - 1
        }
    }

    private func releaseSlot(_ slot: Int) { slots.withLock { $0.free.append(slot) } }

    /// Removes this client's commit markers (at unmount).
    public func close() {
        try? client.delete(key("t/\(clientID)/"), rangeEnd: EtcdClient.prefixEnd(key("t/\(clientID)/")))
    }
}

/// Inode records as stored in etcd: short keys, readable with `etcdctl get`.
struct EtcdInode: Codable {
    var k: UInt8; var m: UInt32; var u: UInt32; var g: UInt32; var n: UInt32; var s: UInt64
    var a: Int64; var mt: Int64; var c: Int64; var v: UInt64; var p: UInt64?; var t: String?
    /// The client (node) that wrote this record: watchers skip their own changes.
    var o: String?

    init(_ r: InodeRecord, origin: String? = nil) {
        let x = r.attrs
        k = x.kind.rawValue; m = x.mode; u = x.uid; g = x.gid; n = x.nlink; s = x.size
        a = x.atime.totalNanoseconds; mt = x.mtime.totalNanoseconds; c = x.ctime.totalNanoseconds; v = x.version
        p = r.parent?.rawValue; t = r.target; o = origin
    }

    func record(_ ino: InodeNumber) -> InodeRecord {
        InodeRecord(attrs: InodeAttributes(ino: ino, kind: FileKind(rawValue: k) ?? .regular, mode: m, uid: u, gid: g, nlink: n,
                                           size: s, atime: Timestamp(totalNanoseconds: a), mtime: Timestamp(totalNanoseconds: mt),
                                           ctime: Timestamp(totalNanoseconds: c), version: v),
                    parent: p.map(InodeNumber.init), target: t)
    }
}

/// One optimistic transaction: reads at one revision, buffered writes, compares built from what
/// was read. Used by one thread.
final class EtcdTransaction: MetadataTransaction {
    let store: EtcdTransactionalStore
    let writable: Bool
    /// The snapshot: the revision of the first read; later reads ask for exactly it.
    var revision: Int64?
    /// Keys read → the mod revision seen (0: absent).
    var seen: [Data: Int64] = [:]
    /// Ranges listed, `[start, end)`.
    var listed: [(Data, Data)] = []
    /// Buffered writes: a value, or nil for a delete.
    var writes: [Data: Data?] = [:]

    init(store: EtcdTransactionalStore, writable: Bool) { self.store = store; self.writable = writable }

    var client: EtcdClient { store.client }

    func compares() -> [EtcdCompare] {
        var c = seen.map { EtcdCompare.modRevision($0.key, "EQUAL", $0.value) }
        if let rev = revision {
            c += listed.map { EtcdCompare.modRevision($0.0, rangeEnd: $0.1, "LESS", rev + 1) }
        }
        return c
    }

    private func options() -> EtcdClient.RangeOptions {
        var o = EtcdClient.RangeOptions()
        o.revision = revision
        return o
    }

    private func note(_ r: EtcdClient.RangeResult) {
        if revision == nil { revision = r.revision }
    }

    func get(_ key: Data) throws -> Data? {
        if let w = writes[key] { return w }
        let r = try client.range(key, options())
        note(r)
        if writable, seen[key] == nil { seen[key] = r.kvs.first?.modRevision ?? 0 }
        return r.kvs.first?.value
    }

    /// Lists `[prefix, end)` at the snapshot (without this transaction's buffered writes).
    func list(_ prefix: Data, _ o: EtcdClient.RangeOptions) throws -> [EtcdKV] {
        var o = o
        o.revision = revision
        let end = EtcdClient.prefixEnd(prefix)
        let r = try client.range(prefix, rangeEnd: end, o)
        note(r)
        if writable { listed.append((prefix, end)) }
        return r.kvs
    }

    func put(_ key: Data, _ value: Data) { writes[key] = .some(value) }
    func delete(_ key: Data) { writes[key] = .some(nil) }

    private func inodeKey(_ ino: InodeNumber) -> Data { store.key("i/\(EtcdTransactionalStore.hex(ino))") }
    private func manifestKey(_ ino: InodeNumber) -> Data { store.key("m/\(EtcdTransactionalStore.hex(ino))") }
    private func entryPrefix(_ dir: InodeNumber) -> Data { store.key("e/\(EtcdTransactionalStore.hex(dir))/") }
    private func xattrPrefix(_ ino: InodeNumber) -> Data { store.key("x/\(EtcdTransactionalStore.hex(ino))/") }

    static func decodeInode(_ data: Data, _ ino: InodeNumber) throws -> InodeRecord {
        do { return try JSONDecoder().decode(EtcdInode.self, from: data).record(ino) } catch {
            throw FSError.io("metadata (etcd): inode \(ino) record is unreadable", cause: error)
        }
    }

    func inode(_ ino: InodeNumber) throws -> InodeRecord? {
        try get(inodeKey(ino)).map { try Self.decodeInode($0, ino) }
    }

    func putInode(_ record: InodeRecord) throws {
        put(inodeKey(record.attrs.ino), try JSONEncoder().encode(EtcdInode(record, origin: store.clientID)))
    }

    func deleteInode(_ ino: InodeNumber) throws {
        delete(inodeKey(ino))
        delete(manifestKey(ino))
    }

    func allocateInode() throws -> InodeNumber { try store.allocateInode() }

    func manifest(_ ino: InodeNumber) throws -> Data? { try get(manifestKey(ino)) }
    func putManifest(_ ino: InodeNumber, _ data: Data) throws { put(manifestKey(ino), data) }

    /// "INO,KIND,ORIGIN" (the origin: the client that wrote it, for watchers).
    static func decodeEntry(_ data: Data) -> EntryRecord? {
        let parts = String(decoding: data, as: UTF8.self).split(separator: ",", maxSplits: 2)
        guard parts.count >= 2, let ino = UInt64(parts[0]), let k = UInt8(parts[1]), let kind = FileKind(rawValue: k) else { return nil }
        return EntryRecord(ino: InodeNumber(ino), kind: kind)
    }

    func entry(_ parent: InodeNumber, _ name: String) throws -> EntryRecord? {
        try get(entryPrefix(parent) + Data(name.utf8)).flatMap(Self.decodeEntry)
    }

    /// The entry's cookie is the create revision etcd gives its key: greater than any before.
    func addEntry(_ parent: InodeNumber, _ name: String, _ e: EntryRecord) throws {
        put(entryPrefix(parent) + Data(name.utf8), Data("\(e.ino.rawValue),\(e.kind.rawValue),\(store.clientID)".utf8))
    }

    func removeEntry(_ parent: InodeNumber, _ name: String) throws { delete(entryPrefix(parent) + Data(name.utf8)) }

    func hasEntries(_ dir: InodeNumber) throws -> Bool {
        let prefix = entryPrefix(dir)
        var deleted = 0
        for (k, v) in writes where k.starts(with: prefix) {
            if v != nil { return true }
            deleted += 1
        }
        var o = EtcdClient.RangeOptions()
        o.keysOnly = true
        o.limit = Int64(deleted + 1)
        return try list(prefix, o).contains { writes[$0.key] == nil }
    }

    func entries(_ dir: InodeNumber, after cookie: UInt64, limit: Int) throws -> [DirectoryEntry] {
        let prefix = entryPrefix(dir)
        var o = EtcdClient.RangeOptions()
        o.limit = Int64(limit)
        o.minCreateRevision = Int64(cookie) + 1
        o.sortByCreateRevision = true
        return try list(prefix, o).compactMap { kv in
            guard let e = Self.decodeEntry(kv.value) else { return nil }
            return DirectoryEntry(name: String(decoding: kv.key.dropFirst(prefix.count), as: UTF8.self), ino: e.ino,
                                  kind: e.kind, cookie: UInt64(kv.createRevision))
        }
    }

    func xattr(_ ino: InodeNumber, _ name: String) throws -> Data? { try get(xattrPrefix(ino) + Data(name.utf8)) }
    func putXattr(_ ino: InodeNumber, _ name: String, _ value: Data) throws { put(xattrPrefix(ino) + Data(name.utf8), value) }
    func removeXattr(_ ino: InodeNumber, _ name: String) throws { delete(xattrPrefix(ino) + Data(name.utf8)) }

    func xattrNames(_ ino: InodeNumber) throws -> [String] {
        let prefix = xattrPrefix(ino)
        var o = EtcdClient.RangeOptions()
        o.keysOnly = true
        var names = Set(try list(prefix, o).map(\.key))
        for (k, v) in writes where k.starts(with: prefix) {
            if v == nil { names.remove(k) } else { names.insert(k) }
        }
        return names.map { String(decoding: $0.dropFirst(prefix.count), as: UTF8.self) }.sorted()
    }

    func removeAllXattrs(_ ino: InodeNumber) throws {
        for name in try xattrNames(ino) { try removeXattr(ino, name) }
    }

    /// Every inode record at one revision (orphans, stats): a full scan, run at mount and by
    /// `status`, not on any file operation.
    private func allInodes() throws -> [InodeRecord] {
        let prefix = store.key("i/")
        let r = try client.rangeAll(prefix: prefix, revision: revision)
        note(r)
        return try r.kvs.map { kv in
            let hex = String(decoding: kv.key.dropFirst(prefix.count), as: UTF8.self)
            return try Self.decodeInode(kv.value, InodeNumber(UInt64(hex, radix: 16) ?? 0))
        }
    }

    func orphans() throws -> [InodeNumber] {
        try allInodes().filter { $0.attrs.nlink == 0 }.map(\.attrs.ino).sorted()
    }

    func allManifests() throws -> [Data] {
        let r = try client.rangeAll(prefix: store.key("m/"), revision: revision)
        note(r)
        return r.kvs.map(\.value)
    }

    func stats() throws -> MetadataStats {
        var s = MetadataStats()
        for r in try allInodes() where r.attrs.nlink > 0 {
            switch r.attrs.kind {
            case .regular: s.files += 1; s.logicalBytes += r.attrs.size
            case .directory: s.directories += 1
            case .symlink: s.symlinks += 1
            }
        }
        return s
    }
}

/// What a watcher on the namespace needs to know of a change (`ClusterWatch`).
public enum NamespaceChange: Sendable {
    /// An inode's record changed (content version `version`) or was deleted (nil), by `origin`.
    case inode(InodeNumber, version: UInt64?, origin: String?)
    /// A directory entry appeared, changed or went away.
    case entry(parent: InodeNumber, name: String, origin: String?)
}

extension EtcdTransactionalStore {
    /// The namespace's key prefix, for watching.
    public var namespacePrefix: Data { prefix }

    /// Decodes a watch event under `namespacePrefix` (nil for keys that are not the namespace).
    public func change(_ e: EtcdEvent) -> NamespaceChange? {
        guard e.kv.key.starts(with: prefix) else { return nil }
        let rest = e.kv.key.dropFirst(prefix.count)
        guard rest.count > 2 else { return nil }
        let kind = rest.prefix(2)
        let body = rest.dropFirst(2)
        if kind == Data("i/".utf8) {
            guard let ino = UInt64(String(decoding: body, as: UTF8.self), radix: 16) else { return nil }
            if e.isDelete { return .inode(InodeNumber(ino), version: nil, origin: nil) }
            let r = try? JSONDecoder().decode(EtcdInode.self, from: e.kv.value)
            return .inode(InodeNumber(ino), version: r?.v, origin: r?.o)
        }
        if kind == Data("e/".utf8), body.count > 17 {
            guard let parent = UInt64(String(decoding: body.prefix(16), as: UTF8.self), radix: 16) else { return nil }
            let name = String(decoding: body.dropFirst(17), as: UTF8.self)
            let origin = e.isDelete ? nil : String(decoding: e.kv.value, as: UTF8.self).split(separator: ",", maxSplits: 2).dropFirst(2).first.map(String.init)
            return .entry(parent: InodeNumber(parent), name: name, origin: origin)
        }
        return nil
    }
}
