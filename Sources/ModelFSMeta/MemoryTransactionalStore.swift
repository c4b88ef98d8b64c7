import Foundation
import ModelFSCore
import Synchronization

/// The in-memory engine's state (`memory:`): for tests and benchmarks. A write transaction logs
/// the previous value of everything it changes and puts it back if the body throws.
public final class MemoryTransactionalStore: TransactionalStore, @unchecked Sendable {
    struct State {
        var inodes: [InodeNumber: InodeRecord] = [:]
        var manifests: [InodeNumber: Data] = [:]
        var entries: [InodeNumber: [String: (entry: EntryRecord, cookie: UInt64)]] = [:]
        var xattrs: [InodeNumber: [String: Data]] = [:]
        var nextInode: UInt64 = 2
        var nextCookie: UInt64 = 1
    }

    private let state = Mutex(State())

    public init() {}

    public func read<T>(_ body: (any MetadataTransaction) throws -> T) throws -> T {
        try LockOrder.holding(.metadata) {
            try state.withLock { s in
                let tx = MemoryTransaction(state: s)
                return try body(tx)
            }
        }
    }

    public func write<T>(_ body: (any MetadataTransaction) throws -> T) throws -> T {
        try LockOrder.holding(.metadata) {
            try state.withLock { s in
                let tx = MemoryTransaction(state: s)
                let result = try body(tx)   // on throw, `s` is left untouched: tx worked on a copy
                s = tx.state
                return result
            }
        }
    }

    public func sync() throws {}
}

/// Works on a copy of the state (Swift collections copy on write, so only what changes is copied).
final class MemoryTransaction: MetadataTransaction {
    var state: MemoryTransactionalStore.State
    init(state: MemoryTransactionalStore.State) { self.state = state }

    func inode(_ ino: InodeNumber) throws -> InodeRecord? { state.inodes[ino] }
    func putInode(_ record: InodeRecord) throws { state.inodes[record.attrs.ino] = record }
    func deleteInode(_ ino: InodeNumber) throws {
        state.inodes[ino] = nil; state.manifests[ino] = nil; state.entries[ino] = nil
    }
    func allocateInode() throws -> InodeNumber {
        defer { state.nextInode += 1 }
        return InodeNumber(state.nextInode)
    }
    func manifest(_ ino: InodeNumber) throws -> Data? { state.manifests[ino] }
    func putManifest(_ ino: InodeNumber, _ data: Data) throws { state.manifests[ino] = data }

    func entry(_ parent: InodeNumber, _ name: String) throws -> EntryRecord? { state.entries[parent]?[name]?.entry }
    func addEntry(_ parent: InodeNumber, _ name: String, _ entry: EntryRecord) throws {
        state.entries[parent, default: [:]][name] = (entry, state.nextCookie)
        state.nextCookie += 1
    }
    func removeEntry(_ parent: InodeNumber, _ name: String) throws { state.entries[parent]?[name] = nil }
    func hasEntries(_ dir: InodeNumber) throws -> Bool { !(state.entries[dir]?.isEmpty ?? true) }
    func entries(_ dir: InodeNumber, after cookie: UInt64, limit: Int) throws -> [DirectoryEntry] {
        let all = (state.entries[dir] ?? [:]).filter { $0.value.cookie > cookie }
            .map { DirectoryEntry(name: $0.key, ino: $0.value.entry.ino, kind: $0.value.entry.kind, cookie: $0.value.cookie) }
            .sorted { $0.cookie < $1.cookie }
        return Array(all.prefix(limit))
    }

    func xattr(_ ino: InodeNumber, _ name: String) throws -> Data? { state.xattrs[ino]?[name] }
    func putXattr(_ ino: InodeNumber, _ name: String, _ value: Data) throws { state.xattrs[ino, default: [:]][name] = value }
    func removeXattr(_ ino: InodeNumber, _ name: String) throws { state.xattrs[ino]?[name] = nil }
    func xattrNames(_ ino: InodeNumber) throws -> [String] { (state.xattrs[ino] ?? [:]).keys.sorted() }
    func removeAllXattrs(_ ino: InodeNumber) throws { state.xattrs[ino] = nil }
    func xattrBytes(_ ino: InodeNumber) throws -> Int { (state.xattrs[ino] ?? [:]).reduce(0) { $0 + $1.key.utf8.count + $1.value.count } }

    func orphans() throws -> [InodeNumber] { state.inodes.values.filter { $0.attrs.nlink == 0 }.map(\.attrs.ino).sorted() }
    func orphans(of client: String) throws -> [InodeNumber] { [] }
    func manifests(after: InodeNumber, limit: Int) throws -> [(InodeNumber, Data)] {
        Array(state.manifests.filter { $0.key.rawValue > after.rawValue }.sorted { $0.key.rawValue < $1.key.rawValue }.prefix(limit))
            .map { ($0.key, $0.value) }
    }
    func stats() throws -> MetadataStats {
        var s = MetadataStats()
        for r in state.inodes.values where r.attrs.nlink > 0 {
            s.count(r.attrs.kind, size: r.attrs.size)
        }
        return s
    }
}
