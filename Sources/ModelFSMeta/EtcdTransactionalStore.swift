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
///   i/INO          inode record (JSON: "k" kind 1 file, 2 directory, 3 symlink, 4 FIFO, 5 socket,
///                  6 character device, 7 block device; "r" a device's number, absent for
///                  other kinds; "o" names the node that wrote it)
///   m/INO          manifest bytes (large manifests are blocks; this holds their reference)
///   e/PARENT/NAME  directory entry "INO,KIND[:SUB],ORIGIN"; the readdir cookie is its create
///                  revision × 256 + SUB, SUB numbering the entries one transaction adds (0 for the
///                  first, and omitted): several entries of one txn share a create revision
///   x/INO/NAME     xattr value
///   n/next_ino     the next unreserved inode number: nodes reserve 1024 at a time
///   t/CLIENT/SLOT  commit markers (one per concurrent writer of a client)
///   w/INO          the node writing the file, under that node's lease (one writer node at a time);
///                  its create revision fences the writer's commits (`CommitFence`)
///   o/INO          an inode whose last link went while it was open: the client (node) that
///                  deletes it once closed, or at its next start (`orphans`: no scan of i/)
///   n/stats/CLIENT the counters (files, directories, symlinks, bytes) of the changes CLIENT
///                  made, as JSON; n/stats/_base those of a namespace made before counters were
///                  kept (one scan, once). statfs and status sum n/stats/: no scan of i/
///   nodes/ID       live nodes, under their leases (ModelFSPeer.Membership)
/// NAME in e/ and x/ is the name's `RawName` string in UTF-8: the kernel's bytes when they are
/// valid UTF-8, each other byte (and each character of U+10FF00…U+10FFFF) as U+10FF00 + byte.
/// Values are raw bytes; etcd limits a request to 1.5 MiB, which bounds a manifest
/// kept in etcd (455 chunks inline, far below) and an xattr value (64 KiB, the kernel's limit).
public final class EtcdTransactionalStore: TransactionalStore, @unchecked Sendable {
    public let client: EtcdClient
    let prefix: Data
    /// Every key this store reads or writes (`EtcdKeys`).
    public let keys: EtcdKeys
    let clientID: String
    private let inodeRange = Mutex<(next: UInt64, end: UInt64)>((0, 0))
    private let slots = Mutex<(free: [Int], count: Int)>(([], 0))
    static let inodeBatch: UInt64 = 1024
    static let maxAttempts = 100
    /// Changes to the counters committed here and not yet added to `n/stats/CLIENT`.
    private let unflushed = Mutex(StatsDelta())
    private let flusher = DispatchQueue(label: "modelfs.etcd.stats")
    private var flushTimer: (any DispatchSourceTimer)?
    /// Every client's counters key as last read, and when: statfs reads them at most once per
    /// `countersMaxAge` (a workload that calls statfs per file made one etcd range per call).
    /// This client's own entry is kept current by its flushes.
    private let countersSeen = Mutex<(at: ContinuousClock.Instant?, sums: [Data: StatsDelta])>((nil, [:]))
    /// How old the other clients' counters in statfs may be (tests set zero).
    public var countersMaxAge: Duration = .seconds(1)

    /// `name` selects the cluster's key prefix (`/modelfs/NAME/`), so one etcd can hold several.
    public init(endpoints: [String], name: String, clientID: String = UUID().uuidString, security: EtcdSecurity = .none) throws {
        client = try EtcdClient(endpoints: endpoints, security: security)
        keys = EtcdKeys(cluster: name)
        prefix = keys.root
        self.clientID = clientID
        do {
            _ = try client.range(keys.nextInode)
            try seedCounters()
        } catch {
            client.shutdown()
            throw MetaError(.unavailable, "cannot reach etcd at \(endpoints.joined(separator: ",")): \(error); \(EtcdClient.hint(for: error, security))")
        }
        let t = DispatchSource.makeTimerSource(queue: flusher)
        t.schedule(deadline: .now() + 1, repeating: 1)
        t.setEventHandler { [weak self] in self?.flushCounters() }
        t.resume()
        flushTimer = t
    }

    deinit { flushTimer?.cancel(); client.shutdown() }

    public static func hex(_ ino: InodeNumber) -> String { EtcdKeys.hex(ino) }

    public func read<T>(_ body: (any MetadataTransaction) throws -> T) throws -> T {
        try LockOrder.holding(.metadata) {
            for _ in 0..<Self.maxAttempts {
                let tx = EtcdTransaction(store: self, writable: false)
                do { return try body(tx) } catch EtcdError.compacted { continue } catch let e as EtcdError { throw Self.metaError(e) }
            }
            throw MetaError(.conflict, "metadata (etcd): no consistent snapshot after \(Self.maxAttempts) attempts; retry")
        }
    }

    public func write<T>(_ body: (any MetadataTransaction) throws -> T) throws -> T {
        try LockOrder.holding(.metadata) {
            for attempt in 0..<Self.maxAttempts {
                let tx = EtcdTransaction(store: self, writable: true)
                let result: T
                do { result = try body(tx) } catch EtcdError.compacted { continue } catch let e as EtcdError { throw Self.metaError(e) }
                if tx.writes.isEmpty && tx.deletedPrefixes.isEmpty { return result }

                let slot = takeSlot()
                defer { releaseSlot(slot) }
                let markerKey = keys.marker(of: clientID, slot: slot)
                let marker = Data(UUID().uuidString.utf8)
                var ops: [EtcdOp] = tx.writes.map { k, v in v.map { .put(k, $0) } ?? .delete(k) }
                ops += tx.deletedPrefixes.map { .delete($0, rangeEnd: EtcdClient.prefixEnd($0)) }
                ops.append(.put(markerKey, marker))
                do {
                    if try client.txn(compare: tx.compares(), success: ops).succeeded {
                        count(tx)
                        return result
                    }
                } catch EtcdError.ambiguous(let why) {
                    Log.every("etcd commit outcome unknown", 60, .warning, "metadata commit outcome unknown (\(why)); reading back its marker")
                    do {
                        let r = try client.range(markerKey)
                        if r.kvs.first?.value == marker {
                            count(tx)
                            return result
                        }
                    } catch {
                        throw MetaError(.unavailable, "metadata (etcd): commit outcome unknown and etcd unreachable: \(error); check the etcd cluster", cause: error)
                    }
                } catch let e as EtcdError {
                    throw Self.metaError(e)
                }
                // Lost a race with another writer: back off a little (randomised) and run again.
                usleep(UInt32.random(in: 0...UInt32(min(200 << min(attempt, 8), 50_000))))
            }
            throw MetaError(.conflict, "metadata (etcd): transaction kept conflicting after \(Self.maxAttempts) attempts; retry")
        }
    }

    /// etcd commits are durable once acknowledged: a quorum has fsynced them.
    public func sync() throws {}

    static func metaError(_ e: EtcdError) -> MetaError {
        if case .rejected(_, let message) = e, message.contains("space exceeded") {
            return MetaError(.full, "metadata (etcd): storage quota exceeded; compact and defragment etcd or raise --quota-backend-bytes", cause: e)
        }
        return MetaError(.unavailable, "metadata (etcd)", cause: e)
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
            let counter = keys.nextInode
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
            throw MetaError(.conflict, "metadata (etcd): could not reserve inode numbers; retry")
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

    /// Removes this client's commit markers and adds its last counted changes (at unmount).
    public func close() {
        flushTimer?.cancel()
        flusher.sync { flushCounters() }
        try? client.delete(keys.markers(of: clientID), rangeEnd: EtcdClient.prefixEnd(keys.markers(of: clientID)))
    }

    // MARK: Counters (statfs and status without a scan)

    /// What a committed transaction changed in the counters: the inode records it wrote or
    /// deleted, each against the record it read (a record it did not read is a new inode).
    private func count(_ tx: EtcdTransaction) {
        let prefix = keys.inodes
        var d = StatsDelta()
        for (k, v) in tx.writes where k.starts(with: prefix) {
            let ino = InodeNumber(UInt64(String(decoding: k.dropFirst(prefix.count), as: UTF8.self), radix: 16) ?? 0)
            let before = (tx.readValues[k] ?? nil).flatMap { try? EtcdTransaction.decodeInode($0, ino) }
            let after = v.flatMap { try? EtcdTransaction.decodeInode($0, ino) }
            d.add(before, -1)
            d.add(after, 1)
        }
        if !d.isZero { unflushed.withLock { $0 += d } }
    }

    var statsKey: Data { keys.stats(of: clientID) }

    /// Adds the unflushed changes to this client's counters key (only this client writes it).
    func flushCounters() {
        let d = unflushed.withLock { u -> StatsDelta in defer { u = StatsDelta() }; return u }
        guard !d.isZero else { return }
        do {
            let r = try client.range(statsKey)
            let old = r.kvs.first
            var total = old.flatMap { try? JSONDecoder().decode(StatsDelta.self, from: $0.value) } ?? StatsDelta()
            total += d
            let value = try JSONEncoder().encode(total)
            do {
                if try client.txn(compare: [.modRevision(statsKey, "EQUAL", old?.modRevision ?? 0)], success: [.put(statsKey, value)]).succeeded {
                    countersSeen.withLock { $0.sums[statsKey] = total }
                    return
                }
            } catch EtcdError.ambiguous {
                // Only this client writes the key: a new mod revision means the put landed.
                if let now = try? client.range(statsKey), (now.kvs.first?.modRevision ?? 0) != (old?.modRevision ?? 0) {
                    countersSeen.withLock { $0.sums[statsKey] = total }
                    return
                }
            }
            unflushed.withLock { $0 += d }
        } catch {
            unflushed.withLock { $0 += d }   // etcd unreachable: next time
        }
    }

    /// The namespace's counters: every client's key (read at most once per `countersMaxAge`)
    /// plus what this one has not flushed yet.
    func countedStats() throws -> MetadataStats {
        let now = ContinuousClock.now
        var sums = countersSeen.withLock { c -> [Data: StatsDelta]? in
            guard let at = c.at, now - at < countersMaxAge else { return nil }
            return c.sums
        }
        if sums == nil {
            var read: [Data: StatsDelta] = [:]
            for kv in try client.rangeAll(prefix: keys.stats).kvs {
                if let d = try? JSONDecoder().decode(StatsDelta.self, from: kv.value) { read[kv.key] = d }
            }
            countersSeen.withLock { $0 = (now, read) }
            sums = read
        }
        // A flush under way may briefly have its changes in neither (taken from `unflushed`, not
        // yet in the sums), and a read racing a flush may keep this client's older sum until
        // the next read: statfs is a little behind for at most countersMaxAge, never wrong after.
        var total = unflushed.withLock { $0 }
        for d in sums!.values { total += d }
        return total.stats
    }

    /// A namespace made before counters were kept has none: its inodes are counted once, by the
    /// first client that starts (`n/stats/_base`, created only if no counters key exists yet).
    /// A new namespace has nothing to count.
    private func seedCounters() throws {
        let prefix = keys.stats
        var o = EtcdClient.RangeOptions()
        o.limit = 1
        o.keysOnly = true
        guard try client.range(prefix, rangeEnd: EtcdClient.prefixEnd(prefix), o).kvs.isEmpty else { return }
        var base = StatsDelta()
        let inodes = keys.inodes
        let r = try client.rangeAll(prefix: inodes)
        for kv in r.kvs {
            let ino = InodeNumber(UInt64(String(decoding: kv.key.dropFirst(inodes.count), as: UTF8.self), radix: 16) ?? 0)
            base.add(try? EtcdTransaction.decodeInode(kv.value, ino), 1)
        }
        let baseKey = keys.statsBase
        _ = try client.txn(compare: [.modRevision(prefix, rangeEnd: EtcdClient.prefixEnd(prefix), "LESS", r.revision + 1)],
                           success: [.put(baseKey, try JSONEncoder().encode(base))], idempotent: true)
        if !r.kvs.isEmpty { Log.info("metadata (etcd): counted \(r.kvs.count) inodes once, for statfs and status") }
    }
}

/// Inode records as stored in etcd: short keys, readable with `etcdctl get`.
struct EtcdInode: Codable {
    var k: UInt8; var m: UInt32; var u: UInt32; var g: UInt32; var n: UInt32; var s: UInt64
    var a: Int64; var mt: Int64; var c: Int64; var v: UInt64; var p: UInt64?; var t: String?
    /// A device node's number (absent for every other kind).
    var r: UInt32?
    /// Inode flags (`InodeAttributes.flags`), absent when 0.
    var f: UInt32?
    /// The client (node) that wrote this record: watchers skip their own changes.
    var o: String?

    init(_ r: InodeRecord, origin: String? = nil) {
        let x = r.attrs
        k = x.kind.rawValue; m = x.mode; u = x.uid; g = x.gid; n = x.nlink; s = x.size
        a = x.atime.totalNanoseconds; mt = x.mtime.totalNanoseconds; c = x.ctime.totalNanoseconds; v = x.version
        p = r.parent?.rawValue; t = r.target; o = origin
        self.r = x.rdev == 0 ? nil : x.rdev
        f = x.flags == 0 ? nil : x.flags
    }

    func record(_ ino: InodeNumber) -> InodeRecord {
        InodeRecord(attrs: InodeAttributes(ino: ino, kind: FileKind(rawValue: k) ?? .regular, mode: m, uid: u, gid: g, nlink: n,
                                           size: s, atime: Timestamp(totalNanoseconds: a), mtime: Timestamp(totalNanoseconds: mt),
                                           ctime: Timestamp(totalNanoseconds: c), version: v, rdev: r ?? 0, flags: f ?? 0),
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
    /// Prefixes deleted whole (one range delete each at commit: a file's xattrs, which may be
    /// thousands of keys, more than etcd's 128 operations in a transaction). Keys under them
    /// read as absent; no write under them may follow in the same transaction.
    var deletedPrefixes: [Data] = []
    /// Values read (nil: absent), for the counters (`EtcdTransactionalStore.count`).
    var readValues: [Data: Data?] = [:]
    /// Entries added so far (their SUB: see the key schema).
    var entriesAdded = 0

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
        if deletedPrefixes.contains(where: { key.starts(with: $0) }) { return nil }
        return try getKV(key)?.value
    }

    /// The key as stored at the snapshot (not this transaction's buffered writes); the commit
    /// then requires it unchanged.
    func getKV(_ key: Data) throws -> EtcdKV? {
        let r = try client.range(key, options())
        note(r)
        if writable, seen[key] == nil {
            seen[key] = r.kvs.first?.modRevision ?? 0
            readValues[key] = .some(r.kvs.first?.value)
        }
        return r.kvs.first
    }

    /// The write lock `w/INO` must be the one taken at `fence.epoch` (its create revision), or
    /// absent with the file still at the version the writer started from. The lock key is
    /// among the keys read, so a node taking it before this commit lands makes the commit
    /// conflict, run again, and be refused here.
    func checkFence(_ ino: InodeNumber, _ fence: CommitFence, version: UInt64) throws {
        let lock = try getKV(store.keys.writer(ino))
        if let lock, lock.createRevision == fence.epoch { return }
        if lock == nil && version == fence.baseVersion { return }
        let why = lock == nil
            ? "its write lock lapsed (this node was cut off from etcd longer than its lease) and the file changed since (version \(fence.baseVersion) -> \(version))"
            : "its write lock is now node \(String(decoding: lock!.value, as: UTF8.self))'s (taken at revision \(lock!.createRevision), after this node's at \(fence.epoch))"
        throw MetaError(.fenced, "fenced: the version of inode \(ino) written here is refused: \(why); the file keeps the version committed elsewhere")
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

    func put(_ key: Data, _ value: Data) {
        precondition(!deletedPrefixes.contains { key.starts(with: $0) }, "a put under a prefix deleted in the same transaction")
        writes[key] = .some(value)
    }
    func delete(_ key: Data) { writes[key] = .some(nil) }

    private func inodeKey(_ ino: InodeNumber) -> Data { store.keys.inode(ino) }
    private func manifestKey(_ ino: InodeNumber) -> Data { store.keys.manifest(ino) }
    private func orphanKey(_ ino: InodeNumber) -> Data { store.keys.orphan(ino) }
    private func entryPrefix(_ dir: InodeNumber) -> Data { store.keys.entries(of: dir) }
    private func xattrPrefix(_ ino: InodeNumber) -> Data { store.keys.xattrs(of: ino) }

    static func decodeInode(_ data: Data, _ ino: InodeNumber) throws -> InodeRecord {
        do { return try JSONDecoder().decode(EtcdInode.self, from: data).record(ino) } catch {
            throw MetaError(.corrupt, "metadata (etcd): inode \(ino) record is unreadable", cause: error)
        }
    }

    func inode(_ ino: InodeNumber) throws -> InodeRecord? {
        try get(inodeKey(ino)).map { try Self.decodeInode($0, ino) }
    }

    func putInode(_ record: InodeRecord) throws {
        let k = inodeKey(record.attrs.ino)
        let wasOrphan = (readValues[k] ?? nil).flatMap { try? Self.decodeInode($0, record.attrs.ino) }?.attrs.nlink == 0
        put(k, try JSONEncoder().encode(EtcdInode(record, origin: store.clientID)))
        // The orphan index: an inode left without links (open somewhere) until it is deleted.
        if record.attrs.nlink == 0 { put(orphanKey(record.attrs.ino), Data(store.clientID.utf8)) } else if wasOrphan { delete(orphanKey(record.attrs.ino)) }
    }

    func deleteInode(_ ino: InodeNumber) throws {
        delete(inodeKey(ino))
        delete(manifestKey(ino))
        delete(orphanKey(ino))
    }

    func allocateInode() throws -> InodeNumber { try store.allocateInode() }

    func manifest(_ ino: InodeNumber) throws -> Data? { try get(manifestKey(ino)) }
    func putManifest(_ ino: InodeNumber, _ data: Data) throws { put(manifestKey(ino), data) }

    /// "INO,KIND[:SUB],ORIGIN" (the origin: the client that wrote it, for watchers).
    static func decodeEntry(_ data: Data) -> EntryRecord? { decodeEntryAndSub(data)?.0 }

    static func decodeEntryAndSub(_ data: Data) -> (EntryRecord, UInt64)? {
        let parts = String(decoding: data, as: UTF8.self).split(separator: ",", maxSplits: 2)
        guard parts.count >= 2, let ino = UInt64(parts[0]) else { return nil }
        let kindAndSub = parts[1].split(separator: ":", maxSplits: 1)
        guard let k = UInt8(kindAndSub[0]), let kind = FileKind(rawValue: k) else { return nil }
        let sub = kindAndSub.count > 1 ? UInt64(kindAndSub[1]) ?? 0 : 0
        return (EntryRecord(ino: InodeNumber(ino), kind: kind), min(sub, 255))
    }

    func entry(_ parent: InodeNumber, _ name: String) throws -> EntryRecord? {
        try get(entryPrefix(parent) + Data(name.utf8)).flatMap(Self.decodeEntry)
    }

    /// The entry's cookie comes from the create revision etcd gives its key (greater than any
    /// before) and its number among the entries this transaction adds (a txn holds at most 128
    /// operations, so fewer than 256 entries).
    func addEntry(_ parent: InodeNumber, _ name: String, _ e: EntryRecord) throws {
        let sub = entriesAdded
        entriesAdded += 1
        let kind = sub == 0 ? "\(e.kind.rawValue)" : "\(e.kind.rawValue):\(sub)"
        put(entryPrefix(parent) + Data(name.utf8), Data("\(e.ino.rawValue),\(kind),\(store.clientID)".utf8))
    }

    func removeEntry(_ parent: InodeNumber, _ name: String) throws { delete(entryPrefix(parent) + Data(name.utf8)) }

    /// One keys-only listing of the directory instead of a read per name (the listed range is
    /// then checked at commit: no entry may appear in it meanwhile).
    func existingNames(_ dir: InodeNumber, among names: [String]) throws -> Set<String> {
        guard names.count > 4 else { return Set(try names.filter { try entry(dir, $0) != nil }) }
        let prefix = entryPrefix(dir)
        var o = EtcdClient.RangeOptions()
        o.keysOnly = true
        var present = Set(try list(prefix, o).map { String(decoding: $0.key.dropFirst(prefix.count), as: UTF8.self) })
        for (k, v) in writes where k.starts(with: prefix) {
            let name = String(decoding: k.dropFirst(prefix.count), as: UTF8.self)
            if v == nil { present.remove(name) } else { present.insert(name) }
        }
        return present.intersection(names)
    }

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

    /// From the revision of `cookie` on, 255 more than asked for (the most that one transaction
    /// can add beside an entry), so a page still holds `limit` entries after those at or before
    /// the cookie within its revision are left out.
    func entries(_ dir: InodeNumber, after cookie: UInt64, limit: Int) throws -> [DirectoryEntry] {
        let prefix = entryPrefix(dir)
        var o = EtcdClient.RangeOptions()
        o.limit = Int64(limit + 255)
        o.minCreateRevision = Int64(cookie >> 8)
        o.sortByCreateRevision = true
        let all = try list(prefix, o).compactMap { kv -> DirectoryEntry? in
            guard let (e, sub) = Self.decodeEntryAndSub(kv.value) else { return nil }
            return DirectoryEntry(name: String(decoding: kv.key.dropFirst(prefix.count), as: UTF8.self), ino: e.ino,
                                  kind: e.kind, cookie: UInt64(kv.createRevision) << 8 | sub)
        }
        return Array(all.filter { $0.cookie > cookie }.sorted { $0.cookie < $1.cookie }.prefix(limit))
    }

    func xattr(_ ino: InodeNumber, _ name: String) throws -> Data? { try get(xattrPrefix(ino) + Data(name.utf8)) }
    func putXattr(_ ino: InodeNumber, _ name: String, _ value: Data) throws { put(xattrPrefix(ino) + Data(name.utf8), value) }
    func removeXattr(_ ino: InodeNumber, _ name: String) throws { delete(xattrPrefix(ino) + Data(name.utf8)) }

    func xattrNames(_ ino: InodeNumber) throws -> [String] {
        let prefix = xattrPrefix(ino)
        var o = EtcdClient.RangeOptions()
        o.keysOnly = true
        if deletedPrefixes.contains(prefix) { return [] }
        var names = Set(try list(prefix, o).map(\.key))
        for (k, v) in writes where k.starts(with: prefix) {
            if v == nil { names.remove(k) } else { names.insert(k) }
        }
        return names.map { String(decoding: $0.dropFirst(prefix.count), as: UTF8.self) }.sorted()
    }

    func xattrBytes(_ ino: InodeNumber) throws -> Int {
        let prefix = xattrPrefix(ino)
        if deletedPrefixes.contains(prefix) { return 0 }
        var sizes: [Data: Int] = [:]
        for kv in try list(prefix, EtcdClient.RangeOptions()) { sizes[kv.key] = kv.value.count }
        for (k, v) in writes where k.starts(with: prefix) { sizes[k] = v?.count }
        return sizes.reduce(0) { $0 + $1.key.count - prefix.count + $1.value }
    }

    /// One range delete, however many xattrs the file has.
    func removeAllXattrs(_ ino: InodeNumber) throws {
        let prefix = xattrPrefix(ino)
        for k in writes.keys where k.starts(with: prefix) { writes[k] = nil }
        if !deletedPrefixes.contains(prefix) { deletedPrefixes.append(prefix) }
    }

    /// Every inode record at one revision: a full scan, for tests that check the counters.
    func allInodes() throws -> [InodeRecord] {
        let prefix = store.keys.inodes
        let r = try client.rangeAll(prefix: prefix, revision: revision)
        note(r)
        return try r.kvs.map { kv in
            let hex = String(decoding: kv.key.dropFirst(prefix.count), as: UTF8.self)
            return try Self.decodeInode(kv.value, InodeNumber(UInt64(hex, radix: 16) ?? 0))
        }
    }

    /// This client's orphans, from the orphan index (`o/`): another node's are still open there.
    func orphans() throws -> [InodeNumber] { try orphans(of: store.clientID) }

    /// The orphans `owner` left, from the orphan index (`o/INO` = the client that unlinked it).
    func orphans(of owner: String) throws -> [InodeNumber] {
        let prefix = store.keys.orphans
        let r = try client.rangeAll(prefix: prefix, revision: revision)
        note(r)
        return r.kvs.filter { $0.value == Data(owner.utf8) }
            .compactMap { UInt64(String(decoding: $0.key.dropFirst(prefix.count), as: UTF8.self), radix: 16).map(InodeNumber.init) }
            .sorted()
    }

    /// 128 inodes to an etcd txn (its most operations), in a read-only transaction at its
    /// snapshot's revision once it has one; a writable one reads key by key (each read is
    /// recorded for the commit's conflict check).
    func inodes(_ inos: [InodeNumber]) throws -> [InodeRecord?] {
        guard !writable else { return try inos.map { try inode($0) } }
        var out: [InodeRecord?] = []
        out.reserveCapacity(inos.count)
        for start in stride(from: 0, to: inos.count, by: 128) {
            let part = inos[start..<min(inos.count, start + 128)]
            let r = try client.txn(compare: [], success: part.map { EtcdOp.get(inodeKey($0)) })
            for (i, ino) in part.enumerated() {
                out.append(try r.ranges[i].first.map { try Self.decodeInode($0.value, ino) })
            }
        }
        return out
    }

    /// 64 inodes to an etcd txn (its 128 reads: each inode's record and manifest), at the
    /// latest revision: a walk, not a snapshot.
    func inodesAndManifests(_ inos: [InodeNumber]) throws -> [(InodeRecord?, Data?)] {
        var out: [(InodeRecord?, Data?)] = []
        out.reserveCapacity(inos.count)
        for start in stride(from: 0, to: inos.count, by: 64) {
            let part = inos[start..<min(inos.count, start + 64)]
            let ops = part.flatMap { [EtcdOp.get(inodeKey($0)), EtcdOp.get(manifestKey($0))] }
            let r = try client.txn(compare: [], success: ops)
            for (i, ino) in part.enumerated() {
                let rec = try r.ranges[2 * i].first.map { try Self.decodeInode($0.value, ino) }
                out.append((rec, r.ranges[2 * i + 1].first?.value))
            }
        }
        return out
    }

    func manifests(after: InodeNumber, limit: Int) throws -> [(InodeNumber, Data)] {
        let prefix = store.keys.manifests
        var o = EtcdClient.RangeOptions()
        o.limit = Int64(limit)
        o.revision = revision
        let from = after.rawValue == .max ? EtcdClient.prefixEnd(prefix) : prefix + Data(EtcdTransactionalStore.hex(InodeNumber(after.rawValue + 1)).utf8)
        let r = try client.range(from, rangeEnd: EtcdClient.prefixEnd(prefix), o)
        note(r)
        return r.kvs.compactMap { kv in
            UInt64(String(decoding: kv.key.dropFirst(prefix.count), as: UTF8.self), radix: 16).map { (InodeNumber($0), kv.value) }
        }
    }

    /// From the counters (`n/stats/`): a range of one small key per node, not a scan.
    func stats() throws -> MetadataStats { try store.countedStats() }

    /// What the counters should say, by a scan (tests).
    func scannedStats() throws -> MetadataStats {
        var s = MetadataStats()
        for r in try allInodes() where r.attrs.nlink > 0 {
            s.count(r.attrs.kind, size: r.attrs.size)
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
    /// A file's manifest was written (a new version) or deleted with its inode, by any node;
    /// `replaced` is the version it replaced or deleted (nil for a file's first): its blocks may
    /// be garbage now (`GarbageCollector.suspect`).
    case manifest(InodeNumber, replaced: ManifestRef?)
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
        if kind == Data("m/".utf8) {
            guard let ino = UInt64(String(decoding: body, as: UTF8.self), radix: 16) else { return nil }
            return .manifest(InodeNumber(ino), replaced: e.prev.flatMap { try? ManifestRef(decoding: $0.value) })
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
