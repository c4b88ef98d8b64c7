import Foundation
import GRDB
import ModelFS
import ModelFSCore

/// The replication jobs of a cluster node, on disk: `DATA/replication.db` (SQLite in WAL mode, so
/// a job survives a crash of the process). A job is written before its version's metadata commit
/// and removed once its blocks have their copies (`Replicator`).
final class ReplicationJournal: Sendable {
    struct Job: Sendable {
        var id: Int64
        var ino: InodeNumber
        var created: Date
        var policy: ReplicationPolicy
        var bytes: UInt64
        var blocks: [BlockID]
        var attempts = 0
    }
    private let db: DatabaseQueue

    init(path: String) throws {
        var config = Configuration()
        config.prepareDatabase { db in
            try db.execute(sql: "PRAGMA journal_mode = WAL")
            try db.execute(sql: "PRAGMA synchronous = NORMAL")
        }
        do {
            db = try DatabaseQueue(path: path, configuration: config)
            try db.write { db in
                try db.execute(sql: """
                    CREATE TABLE IF NOT EXISTS jobs(id INTEGER PRIMARY KEY AUTOINCREMENT, ino INTEGER NOT NULL,
                      created REAL NOT NULL, policy TEXT NOT NULL, bytes INTEGER NOT NULL, blocks BLOB NOT NULL)
                    """)
            }
        } catch {
            throw ReplicationError(.journal, "cannot open the replication journal \(path)", cause: error)
        }
    }

    /// Every job on disk (a policy that no longer parses becomes `defaultPolicy`).
    func jobs(defaultPolicy: ReplicationPolicy) throws -> [Job] {
        let rows = try db.read { db in try Row.fetchAll(db, sql: "SELECT id, ino, created, policy, bytes, blocks FROM jobs") }
        return rows.map { row in
            let data: Data = row[5]
            let blocks = stride(from: 0, to: data.count, by: 32).compactMap { BlockID(bytes: data[data.startIndex + $0..<data.startIndex + $0 + 32]) }
            let policy = (try? ReplicationPolicy(parsing: row[3])) ?? defaultPolicy
            return Job(id: row[0], ino: InodeNumber(UInt64(row[1] as Int64)), created: Date(timeIntervalSince1970: row[2]),
                       policy: policy, bytes: UInt64(row[4] as Int64), blocks: blocks)
        }
    }

    /// Writes a job; returns its id.
    func add(ino: InodeNumber, created: Date, policy: ReplicationPolicy, bytes: UInt64, blocks: [BlockID]) throws -> Int64 {
        var blob = Data(capacity: blocks.count * 32)
        for b in blocks { blob.append(contentsOf: b.bytes) }
        do {
            return try db.write { db in
                try db.execute(sql: "INSERT INTO jobs(ino, created, policy, bytes, blocks) VALUES (?, ?, ?, ?, ?)",
                               arguments: [Int64(bitPattern: ino.rawValue), created.timeIntervalSince1970, policy.description,
                                           Int64(bytes), blob])
                return db.lastInsertedRowID
            }
        } catch {
            throw ReplicationError(.journal, "cannot journal replication of inode \(ino)", cause: error)
        }
    }

    func remove(_ id: Int64) throws {
        try db.write { db in try db.execute(sql: "DELETE FROM jobs WHERE id = ?", arguments: [id]) }
    }
}
