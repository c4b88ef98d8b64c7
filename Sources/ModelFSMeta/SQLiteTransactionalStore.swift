import Foundation
import GRDB
import ModelFSCore

/// The embedded engine (`sqlite:PATH`): one SQLite database in WAL mode through GRDB.
///
/// Durability: transactions commit with `synchronous=NORMAL` (in WAL mode a commit then survives
/// a crash of the process, not of the machine) and `sync()` — called by fsync and fsyncdir —
/// commits once with `synchronous=FULL`, which fsyncs the WAL and so every commit before it.
/// That is DESIGN.md §3: close() does not fsync, fsync() does.
///
/// One connection (a GRDB `DatabaseQueue`) in exclusive locking mode: the daemon's lock on the
/// data dir already makes it the database's only user, and exclusive mode lets SQLite skip the
/// file locks and the shared-memory WAL index it would otherwise take on every transaction
/// (measured: 36 `fcntl` calls per small file created and fsynced). Reads and writes are
/// serialised on that connection; each takes tens of microseconds.
///
/// Schema (all keys):
///   inodes(ino PK, kind, mode, uid, gid, nlink, size, atime, mtime, ctime [ns], version, parent, target, manifest,
///          rdev [a device node's number], flags [InodeAttributes.flags]; both added by ALTER TABLE to a database made before)
///   dentries(cookie PK, parent, name, ino, kind; UNIQUE(parent, name))
///   xattrs(ino, name, value; PK(ino, name))
///   settings(key PK, value)  — "next_inode" (every number below it may be in use), "sync_counter"
///
/// The cookie is the rowid: the largest so far plus one. Without AUTOINCREMENT a cookie can come
/// back only as the largest after that entry is removed, and an entry made during a readdir may
/// be returned or not (POSIX), so a reader never sees a name twice or misses one that stayed;
/// AUTOINCREMENT cost a write of its `sqlite_sequence` page on every create. Databases made
/// before keep AUTOINCREMENT and work the same.
public final class SQLiteTransactionalStore: TransactionalStore, @unchecked Sendable {
    let pool: DatabaseQueue

    public init(path: String) throws {
        var config = Configuration()
        config.busyMode = .timeout(10)
        config.prepareDatabase { db in
            // Exclusive before the first WAL access: no shared-memory index is ever created.
            try db.execute(sql: "PRAGMA locking_mode = EXCLUSIVE")
            try db.execute(sql: "PRAGMA journal_mode = WAL")
            try db.execute(sql: "PRAGMA synchronous = NORMAL")
        }
        do {
            pool = try DatabaseQueue(path: path, configuration: config)
        } catch {
            throw MetaError(.database, "cannot open metadata database \(path)", cause: error)
        }
        try pool.write { db in
            try db.execute(sql: """
                CREATE TABLE IF NOT EXISTS inodes(
                  ino INTEGER PRIMARY KEY, kind INTEGER NOT NULL, mode INTEGER NOT NULL,
                  uid INTEGER NOT NULL, gid INTEGER NOT NULL, nlink INTEGER NOT NULL, size INTEGER NOT NULL,
                  atime INTEGER NOT NULL, mtime INTEGER NOT NULL, ctime INTEGER NOT NULL,
                  version INTEGER NOT NULL, parent INTEGER, target TEXT, manifest BLOB);
                CREATE INDEX IF NOT EXISTS inodes_orphans ON inodes(nlink) WHERE nlink = 0;
                CREATE TABLE IF NOT EXISTS dentries(
                  cookie INTEGER PRIMARY KEY, parent INTEGER NOT NULL, name TEXT NOT NULL,
                  ino INTEGER NOT NULL, kind INTEGER NOT NULL, UNIQUE(parent, name));
                CREATE TABLE IF NOT EXISTS xattrs(
                  ino INTEGER NOT NULL, name TEXT NOT NULL, value BLOB NOT NULL, PRIMARY KEY(ino, name)) WITHOUT ROWID;
                CREATE TABLE IF NOT EXISTS settings(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
                INSERT OR IGNORE INTO settings(key, value) VALUES ('next_inode', 2), ('sync_counter', 0);
                """)
            // Device numbers came with special files: a database made before gets the column.
            if try !Row.fetchAll(db, sql: "PRAGMA table_info(inodes)").contains(where: { ($0["name"] as String?) == "rdev" }) {
                try db.execute(sql: "ALTER TABLE inodes ADD COLUMN rdev INTEGER NOT NULL DEFAULT 0")
            }
            // Inode flags came with snapshots.
            if try !Row.fetchAll(db, sql: "PRAGMA table_info(inodes)").contains(where: { ($0["name"] as String?) == "flags" }) {
                try db.execute(sql: "ALTER TABLE inodes ADD COLUMN flags INTEGER NOT NULL DEFAULT 0")
            }
        }
    }

    /// Inode rows by number, as committed: only touched on the connection's queue.
    private let rows = InodeRows()

    public func read<T>(_ body: (any MetadataTransaction) throws -> T) throws -> T {
        try LockOrder.holding(.metadata) {
            // One serial connection: no writer can interleave, so a read needs no transaction (and
            // GRDB's read() would add two query_only pragmas around it).
            try mapErrors { try pool.inDatabase { db in try body(SQLiteTransaction(db: db, rows: rows, written: nil)) } }
        }
    }

    public func write<T>(_ body: (any MetadataTransaction) throws -> T) throws -> T {
        try LockOrder.holding(.metadata) {
            try mapErrors {
                try pool.writeWithoutTransaction { db in
                    let written = InodeRows.Written()
                    // BEGIN and COMMIT as cached statements: GRDB's inTransaction prepares and
                    // finalizes both on every transaction (a few percent of the daemon's CPU in a
                    // small-file loop).
                    try db.cachedStatement(sql: "BEGIN").execute()
                    let result: T
                    do {
                        result = try body(SQLiteTransaction(db: db, rows: rows, written: written))
                        try db.cachedStatement(sql: "COMMIT").execute()
                    } catch {
                        if db.isInsideTransaction { try? db.execute(sql: "ROLLBACK") }
                        throw error
                    }
                    // Committed: the rows this transaction wrote are the current ones (a rollback
                    // leaves the cache as it was).
                    rows.apply(written)
                    return result
                }
            }
        }
    }

    public func sync() throws {
        try mapErrors {
            try pool.writeWithoutTransaction { db in
                try db.execute(sql: "PRAGMA synchronous = FULL")
                defer { try? db.execute(sql: "PRAGMA synchronous = NORMAL") }
                try db.execute(sql: "UPDATE settings SET value = value + 1 WHERE key = 'sync_counter'")
            }
        }
    }

    /// SQLite's own errors become the engine's: a full disk, or a failure of the database.
    private func mapErrors<T>(_ body: () throws -> T) throws -> T {
        do { return try body() } catch let e as FSError { throw e } catch let e as DatabaseError {
            if e.resultCode == .SQLITE_FULL { throw MetaError(.full, "metadata database: disk full", cause: e) }
            throw MetaError(.database, "metadata database error", cause: e)
        }
    }
}

/// The inode rows last read or committed, so that getattr and the checks every write makes
/// (the parent is a directory, the file exists) skip their SELECT: with GRDB's row decoding that
/// was a tenth of the daemon's CPU in a create+write+close loop. Correct because the daemon is
/// the database's only user (exclusive locking mode) and every change to a row goes through
/// `putInode`/`deleteInode`; a write transaction keeps its changes aside (`Written`) until it
/// has committed. Bounded: emptied when it reaches `limit` rows.
final class InodeRows: @unchecked Sendable {
    static let limit = 32_768
    private var rows: [InodeNumber: InodeRecord] = [:]
    /// The next inode number to give out, once read from the settings table.
    var nextInode: Int64?
    /// The committed `next_inode` bound: numbers from it on were never given out.
    var storedInodeBound: Int64 = 0
    static let reservation: Int64 = 1024
    /// The namespace's counters (statfs, status): counted by one scan the first time they are
    /// asked for, then kept by every committed transaction's changes, so statfs is not a scan of
    /// the inodes table (it was: 1.1 ms a call at a few thousand inodes, and stress-ng's dentry
    /// stressor calls it for every file it makes). Nil until then: no change is counted.
    var counted: StatsDelta?

    /// A write transaction's changes: a row, or nil for a deleted one; the inode bound it stored;
    /// the numbers it gave out (their rows are new: no lookup of an old row to count); its
    /// changes to the counters.
    final class Written {
        var rows: [InodeNumber: InodeRecord?] = [:]
        var inodeBound: Int64?
        var fresh: Set<InodeNumber> = []
        var delta = StatsDelta()
    }

    subscript(_ ino: InodeNumber) -> InodeRecord? { rows[ino] }

    func remember(_ r: InodeRecord) {
        if rows.count >= Self.limit { rows.removeAll(keepingCapacity: true) }
        rows[r.attrs.ino] = r
    }

    func apply(_ w: Written) {
        for (ino, r) in w.rows {
            if let r { remember(r) } else { rows[ino] = nil }
        }
        if let b = w.inodeBound { storedInodeBound = max(storedInodeBound, b) }
        if counted != nil { counted! += w.delta }
    }
}

struct SQLiteTransaction: MetadataTransaction {
    let db: Database
    let rows: InodeRows
    /// Nil in a read.
    let written: InodeRows.Written?

    /// Decodes a row of `inodeColumns` by position (GRDB's lookup by name is case-insensitive
    /// string matching: measurable on the stat path).
    private func record(_ row: Row) -> InodeRecord {
        let attrs = InodeAttributes(
            ino: InodeNumber(UInt64(row[0] as Int64)), kind: FileKind(rawValue: UInt8(row[1] as Int64)) ?? .regular,
            mode: UInt32(row[2] as Int64), uid: UInt32(row[3] as Int64), gid: UInt32(row[4] as Int64),
            nlink: UInt32(row[5] as Int64), size: UInt64(row[6] as Int64),
            atime: Timestamp(totalNanoseconds: row[7]), mtime: Timestamp(totalNanoseconds: row[8]),
            ctime: Timestamp(totalNanoseconds: row[9]), version: UInt64(row[10] as Int64), rdev: UInt32(truncatingIfNeeded: row[13] as Int64),
            flags: UInt32(truncatingIfNeeded: row[14] as Int64))
        let parent: Int64? = row[11]
        return InodeRecord(attrs: attrs, parent: parent.map { InodeNumber(UInt64($0)) }, target: row[12])
    }

    private func i(_ ino: InodeNumber) -> Int64 { Int64(bitPattern: ino.rawValue) }

    func inode(_ ino: InodeNumber) throws -> InodeRecord? {
        if let w = written?.rows[ino] { return w }
        if let r = rows[ino] { return r }
        let r = try Row.fetchOne(db.cachedStatement(sql: """
            SELECT ino, kind, mode, uid, gid, nlink, size, atime, mtime, ctime, version, parent, target, rdev, flags
            FROM inodes WHERE ino = ?
            """), arguments: [i(ino)]).map(record)
        // Not written by this transaction (that would be in `written`): the committed row.
        if let r { rows.remember(r) }
        return r
    }

    /// Counts the change from the row as it stands to `new` (nil: deleted), when counters are kept.
    private func count(_ ino: InodeNumber, _ new: InodeRecord?) throws {
        guard rows.counted != nil, let w = written else { return }
        let old = w.rows[ino] == nil && w.fresh.contains(ino) ? nil : try inode(ino)
        w.delta.add(old, -1)
        w.delta.add(new, 1)
    }

    func putInode(_ r: InodeRecord) throws {
        let a = r.attrs
        try count(a.ino, r)
        try db.cachedStatement(sql: """
            INSERT INTO inodes(ino, kind, mode, uid, gid, nlink, size, atime, mtime, ctime, version, parent, target, rdev, flags)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT(ino) DO UPDATE SET kind=excluded.kind, mode=excluded.mode, uid=excluded.uid, gid=excluded.gid,
              nlink=excluded.nlink, size=excluded.size, atime=excluded.atime, mtime=excluded.mtime, ctime=excluded.ctime,
              version=excluded.version, parent=excluded.parent, target=excluded.target, rdev=excluded.rdev,
              flags=excluded.flags
            """).execute(arguments: [i(a.ino), Int64(a.kind.rawValue), Int64(a.mode), Int64(a.uid), Int64(a.gid),
                                     Int64(a.nlink), Int64(a.size), a.atime.totalNanoseconds, a.mtime.totalNanoseconds,
                                     a.ctime.totalNanoseconds, Int64(a.version), r.parent.map(i), r.target, Int64(a.rdev), Int64(a.flags)])
        written?.rows[a.ino] = .some(r)
    }

    func deleteInode(_ ino: InodeNumber) throws {
        try count(ino, nil)
        try db.cachedStatement(sql: "DELETE FROM inodes WHERE ino = ?").execute(arguments: [i(ino)])
        written?.rows[ino] = .some(nil)
    }

    /// The counter is read once, then kept in memory; what is stored is a bound, moved ahead
    /// `InodeRows.reservation` numbers at a time, below which every number given out lies (a
    /// restart continues from the bound, skipping what the last run had reserved but not used).
    /// Storing each allocation wrote the settings page on every create. A transaction that
    /// rolls back leaves the number it took unused (the memory counter never goes back), and
    /// the bound it stored counts only once it has committed, so no number is given twice.
    func allocateInode() throws -> InodeNumber {
        if rows.nextInode == nil {
            let stored = try Int64.fetchOne(db.cachedStatement(sql: "SELECT value FROM settings WHERE key = 'next_inode'")) ?? 2
            rows.nextInode = stored
            rows.storedInodeBound = stored
        }
        let next = rows.nextInode!
        rows.nextInode = next + 1
        written?.fresh.insert(InodeNumber(UInt64(next)))
        if next >= max(rows.storedInodeBound, written?.inodeBound ?? 0) {
            let bound = next + InodeRows.reservation
            try db.cachedStatement(sql: "UPDATE settings SET value = ? WHERE key = 'next_inode'").execute(arguments: [bound])
            written?.inodeBound = bound
        }
        return InodeNumber(UInt64(next))
    }

    func manifest(_ ino: InodeNumber) throws -> Data? {
        try Data.fetchOne(db.cachedStatement(sql: "SELECT manifest FROM inodes WHERE ino = ?"), arguments: [i(ino)])
    }

    func putManifest(_ ino: InodeNumber, _ data: Data) throws {
        try db.cachedStatement(sql: "UPDATE inodes SET manifest = ? WHERE ino = ?").execute(arguments: [data, i(ino)])
    }

    func entry(_ parent: InodeNumber, _ name: String) throws -> EntryRecord? {
        try Row.fetchOne(db.cachedStatement(sql: "SELECT ino, kind FROM dentries WHERE parent = ? AND name = ?"),
                         arguments: [i(parent), name]).map {
            EntryRecord(ino: InodeNumber(UInt64($0[0] as Int64)), kind: FileKind(rawValue: UInt8($0[1] as Int64)) ?? .regular)
        }
    }

    func addEntry(_ parent: InodeNumber, _ name: String, _ e: EntryRecord) throws {
        try db.cachedStatement(sql: "INSERT INTO dentries(parent, name, ino, kind) VALUES (?, ?, ?, ?)")
            .execute(arguments: [i(parent), name, i(e.ino), Int64(e.kind.rawValue)])
    }

    func removeEntry(_ parent: InodeNumber, _ name: String) throws {
        try db.cachedStatement(sql: "DELETE FROM dentries WHERE parent = ? AND name = ?").execute(arguments: [i(parent), name])
    }

    func hasEntries(_ dir: InodeNumber) throws -> Bool {
        try Bool.fetchOne(db.cachedStatement(sql: "SELECT EXISTS(SELECT 1 FROM dentries WHERE parent = ?)"), arguments: [i(dir)]) ?? false
    }

    func entries(_ dir: InodeNumber, after cookie: UInt64, limit: Int) throws -> [DirectoryEntry] {
        try Row.fetchAll(db.cachedStatement(sql: """
            SELECT cookie, name, ino, kind FROM dentries WHERE parent = ? AND cookie > ? ORDER BY cookie LIMIT ?
            """), arguments: [i(dir), Int64(cookie), limit]).map {
            DirectoryEntry(name: $0[1], ino: InodeNumber(UInt64($0[2] as Int64)),
                           kind: FileKind(rawValue: UInt8($0[3] as Int64)) ?? .regular, cookie: UInt64($0[0] as Int64))
        }
    }

    func xattr(_ ino: InodeNumber, _ name: String) throws -> Data? {
        try Data.fetchOne(db.cachedStatement(sql: "SELECT value FROM xattrs WHERE ino = ? AND name = ?"), arguments: [i(ino), name])
    }

    func putXattr(_ ino: InodeNumber, _ name: String, _ value: Data) throws {
        try db.cachedStatement(sql: "INSERT OR REPLACE INTO xattrs(ino, name, value) VALUES (?, ?, ?)")
            .execute(arguments: [i(ino), name, value])
    }

    func removeXattr(_ ino: InodeNumber, _ name: String) throws {
        try db.cachedStatement(sql: "DELETE FROM xattrs WHERE ino = ? AND name = ?").execute(arguments: [i(ino), name])
    }

    func xattrNames(_ ino: InodeNumber) throws -> [String] {
        try String.fetchAll(db.cachedStatement(sql: "SELECT name FROM xattrs WHERE ino = ? ORDER BY name"), arguments: [i(ino)])
    }

    func xattrBytes(_ ino: InodeNumber) throws -> Int {
        try Int.fetchOne(db.cachedStatement(sql: "SELECT COALESCE(SUM(length(CAST(name AS BLOB)) + length(value)), 0) FROM xattrs WHERE ino = ?"),
                         arguments: [i(ino)]) ?? 0
    }

    func removeAllXattrs(_ ino: InodeNumber) throws {
        try db.cachedStatement(sql: "DELETE FROM xattrs WHERE ino = ?").execute(arguments: [i(ino)])
    }

    func orphans() throws -> [InodeNumber] {
        try Int64.fetchAll(db, sql: "SELECT ino FROM inodes WHERE nlink = 0 ORDER BY ino").map { InodeNumber(UInt64($0)) }
    }

    func orphans(of client: String) throws -> [InodeNumber] { [] }

    func manifests(after: InodeNumber, limit: Int) throws -> [(InodeNumber, Data)] {
        try Row.fetchAll(db.cachedStatement(sql: "SELECT ino, manifest FROM inodes WHERE ino > ? AND manifest IS NOT NULL ORDER BY ino LIMIT ?"),
                         arguments: [i(after), limit])
            .map { (InodeNumber(UInt64($0[0] as Int64)), $0[1] as Data) }
    }

    func stats() throws -> MetadataStats {
        if let c = rows.counted { return c.stats }
        let s = try scannedStats()
        var c = StatsDelta()
        c.f = Int64(s.files); c.d = Int64(s.directories); c.s = Int64(s.symlinks); c.x = Int64(s.specials)
        c.b = Int64(clamping: s.logicalBytes)
        // Reads and writes share one serial connection: no transaction is between the scan and this.
        rows.counted = c
        return s
    }

    /// The counters from a scan of the inodes table (once; then `InodeRows.counted`).
    func scannedStats() throws -> MetadataStats {
        var s = MetadataStats()
        for row in try Row.fetchAll(db, sql: """
            SELECT kind, COUNT(*) AS n, COALESCE(SUM(size), 0) AS bytes FROM inodes WHERE nlink > 0 GROUP BY kind
            """) {
            let n = UInt64(row["n"] as Int64)
            switch FileKind(rawValue: UInt8(row["kind"] as Int64)) {
            case .regular?: s.files = n; s.logicalBytes = UInt64(row["bytes"] as Int64)
            case .directory?: s.directories = n
            case .symlink?: s.symlinks = n
            case .fifo?, .socket?, .charDevice?, .blockDevice?: s.specials += n
            case nil: break
            }
        }
        return s
    }
}
