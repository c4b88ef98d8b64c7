import Foundation
import ModelFSNode
import ModelFS
import ModelFSCore
import ModelFSPeer
import ModelFSWire
import ModelFSStore

/// `modelfs status PATH`: every file at or below PATH by replication state. The schema is
/// documented in docs/STATUS.md.
struct PathReport: Codable {
    struct Bucket: Codable { var files = 0; var bytes: UInt64 = 0 }
    struct File: Codable {
        var path: String
        var ino: UInt64
        var size: UInt64
        var version: UInt64
        /// Copies of its least-copied block on live nodes, and the policy's R.
        var replicas: Int
        var wanted: Int
        /// Bytes of its blocks with fewer than `wanted` copies.
        var shortBytes: UInt64
        /// "replicated", "pending", "under-replicated" or "unreadable".
        var state: String
        /// Pending: seconds since the oldest write not yet replicated.
        var pendingSeconds: Double?
    }
    var path: String
    var files = 0
    var bytes: UInt64 = 0
    var replicated = Bucket()
    var pending = Bucket()
    var underReplicated = Bucket()
    var unreadable = Bucket()
    /// What a crash of the writing nodes now would lose: the age of the oldest pending write.
    var oldestPendingSeconds: Double = 0
    /// Live nodes that did not answer (their copies are not counted).
    var unansweredNodes: [String] = []
    var list: [File] = []
}

/// Where a request points: an inode, the directory it was reached through, the path shown.
struct Target {
    var ino: InodeNumber
    var parent: InodeNumber?
    var path: String
    /// "files|warm|verify INO PARENT PATH" (PATH last: it may hold spaces).
    init(_ words: [Substring]) throws {
        guard words.count >= 4, let i = UInt64(words[1]), let p = UInt64(words[2]) else {
            throw FSError.invalid("malformed request: expected \(words.first ?? "") INO PARENT PATH")
        }
        ino = InodeNumber(i)
        parent = p == 0 ? nil : InodeNumber(p)
        path = words[3...].joined(separator: " ")
    }
}

enum Operate {
    static func pathReport(fs: FileSystem, node: ClusterNode?, _ t: Target) throws -> PathReport {
        var files: [FileBlocks] = []
        try fs.walkFiles(from: t.ino, parent: t.parent) { files.append($0) }
        return pathReport(fs: fs, node: node, t, files)
    }

    /// The report on `files`, found by a walk from `t`.
    static func pathReport(fs: FileSystem, node: ClusterNode?, _ t: Target, _ files: [FileBlocks]) -> PathReport {
        var report = PathReport(path: t.path)
        var holders: [BlockID: Int] = [:]
        var pending: [UInt64: Double] = [:]
        let ids = Array(Set(files.flatMap { $0.blocks.map(\.id) }))
        if let node {
            let census = node.replicator.census(ids)
            holders = census.holders.mapValues(\.count)
            report.unansweredNodes = census.failed
            pending = node.replicator.status().pendingInodes ?? [:]
            // The other nodes' pending jobs: what they wrote and have not replicated yet.
            for peer in node.membership.peers {
                guard let data = try? node.client.status(of: peer),
                      let s = try? JSONDecoder().decode(ClusterStatus.self, from: data) else { continue }
                for (ino, age) in s.replication.pendingInodes ?? [:] { pending[ino] = max(pending[ino] ?? 0, age) }
            }
        } else {
            for id in ids where fs.store.contains(id) { holders[id] = 1 }
        }
        for f in files {
            let wanted = node?.replicator.policy(for: f.parent).replicas ?? 1
            let least = f.blocks.map { holders[$0.id] ?? 0 }.min() ?? wanted
            let short = f.blocks.filter { holders[$0.id] ?? 0 < wanted }.reduce(UInt64(0)) { $0 + UInt64($1.length) }
            var file = PathReport.File(path: f.path.isEmpty ? t.path : t.path + "/" + f.path, ino: f.ino.rawValue, size: f.size,
                                       version: f.version, replicas: least, wanted: wanted, shortBytes: short, state: "replicated")
            if least == 0 {
                file.state = "unreadable"
                report.unreadable.files += 1; report.unreadable.bytes += f.size
            } else if least >= wanted {
                report.replicated.files += 1; report.replicated.bytes += f.size
            } else if let age = pending[f.ino.rawValue] {
                file.state = "pending"
                file.pendingSeconds = age
                report.pending.files += 1; report.pending.bytes += f.size
                report.oldestPendingSeconds = max(report.oldestPendingSeconds, age)
            } else {
                file.state = "under-replicated"
                report.underReplicated.files += 1; report.underReplicated.bytes += f.size
            }
            report.files += 1
            report.bytes += f.size
            report.list.append(file)
        }
        report.list.sort { $0.path < $1.path }
        return report
    }

    struct WarmProgress: Codable { var done: Int; var total: Int; var failed: Int }


    static func warm(fs: FileSystem, node: ClusterNode?, _ t: Target, send: (any Encodable) -> Void) throws {
        guard let node else { throw FSError.invalid("this mount is a single node: every block is already local") }
        var ids: [(id: BlockID, file: FileVersion?)] = []
        try fs.walkFiles(from: t.ino, parent: t.parent) { f in
            let file = FileVersion(ino: f.ino, version: f.version, size: f.size)
            // In the order a loader reads the file (a safetensors file's tensors by name), so a
            // loader that starts while warm runs finds what it wants first.
            let (format, blocks) = fs.loaderOrder(f)
            if let format { node.fanout.note(file, .planned(format: format)) }
            ids += blocks.map { ($0.id, file) }
        }
        // Progress comes from the fetching threads; this thread sends it, at most twice a second.
        let relay = ProgressRelay<WarmProgress>()
        DispatchQueue.global().async { [ids] in
            node.blocks.warm(ids) { done, total, failed in relay.post(WarmProgress(done: done, total: total, failed: failed)) }
            relay.finish()
        }
        relay.relay { send($0) }
    }

    struct VerifyReport: Codable {
        var files = 0
        var blocks = 0
        /// Replicas re-read and hashed on their nodes, and what that found.
        var replicasChecked = 0
        var good = 0
        var repaired = 0
        var corruptUnrepaired = 0
        /// Copies made to bring blocks back to their policy's R.
        var copiesMade = 0
        /// After repair: blocks still short of R copies, and blocks no live node holds.
        var underReplicatedBlocks = 0
        var unreadableBlocks = 0
        var unansweredNodes: [String] = []
        var ok = false
    }

    struct VerifyProgress: Codable { var checked: Int; var total: Int }

    /// Sends progress lines (`VerifyProgress`: replica checks done of the whole) while it works,
    /// then returns the report.
    static func verify(fs: FileSystem, node: ClusterNode?, _ t: Target, progress: (VerifyProgress) -> Void = { _ in }) throws -> VerifyReport {
        var want: [BlockID: Healer.Want] = [:]
        var r = VerifyReport()
        try fs.walkFiles(from: t.ino, parent: t.parent) { f in
            r.files += 1
            let p = node?.replicator.policy(for: f.parent) ?? ReplicationPolicy(replicas: 1, ack: 1)
            for c in f.blocks {
                var w = want[c.id] ?? Healer.Want(copies: 0, length: c.length, spread: p.spread, settled: true)
                w.copies = max(w.copies, p.replicas)
                want[c.id] = w
            }
        }
        let ids = Array(want.keys)
        r.blocks = ids.count
        func tally(_ code: UInt8) {
            switch code {
            case 1: r.replicasChecked += 1; r.good += 1
            case 2: r.replicasChecked += 1; r.repaired += 1
            case 3: r.replicasChecked += 1; r.corruptUnrepaired += 1
            default: break
            }
        }
        guard let node else {
            for id in ids {
                guard let store = fs.store as? PackBlockStore, let v = store.verify(id) else { r.unreadableBlocks += 1; continue }
                tally(v ? 1 : 3)
                if !v { r.unreadableBlocks += 1 }
            }
            r.ok = r.corruptUnrepaired == 0 && r.unreadableBlocks == 0
            return r
        }
        // Every replica, on its own node: this one directly, the others through /v1/verify.
        let total = ids.count * (1 + node.membership.peers.count)
        var asked = 0
        for (i, id) in ids.enumerated() {
            if i % 256 == 0 { progress(VerifyProgress(checked: i, total: total)) }
            switch node.local.verify(id) {
            case nil: break
            case true?: tally(1)
            case false?: tally(node.scrubber.repair(id) ? 2 : 3)
            }
        }
        for peer in node.membership.peers {
            var codes: [UInt8] = []
            asked += 1
            do {
                for start in stride(from: 0, to: ids.count, by: 1024) {
                    progress(VerifyProgress(checked: ids.count * asked + start, total: total))
                    codes += try node.client.verify(Array(ids[start..<min(ids.count, start + 1024)]), at: peer)
                }
            } catch {
                r.unansweredNodes.append(peer.id)
                continue
            }
            codes.forEach(tally)
        }
        // Then the copies: every block back to its R (the healer's repair, for these blocks only).
        if let healer = node.healer {
            let before = healer.localStatus.copiedBlocks
            let plan = try healer.repair(want, act: true)
            r.copiesMade = Int(healer.localStatus.copiedBlocks - before)
            if r.copiesMade > 0 || plan.short > 0 {
                let after = try healer.repair(want, act: false)
                r.underReplicatedBlocks = after.short
                r.unreadableBlocks = after.unreadable
            } else {
                r.unreadableBlocks = plan.unreadable
            }
        }
        r.ok = r.corruptUnrepaired == 0 && r.underReplicatedBlocks == 0 && r.unreadableBlocks == 0 && r.unansweredNodes.isEmpty
        return r
    }

    /// The control socket's handlers for the operations above and `modelfs node`.
    /// `invalidate(parent, name)` drops the kernel's cached entry (and the parent's attributes)
    /// after a snapshot is made or deleted behind its back.
    static func handlers(fs: FileSystem, node: ClusterNode?, invalidate: @escaping @Sendable (InodeNumber, String) -> Void = { _, _ in })
        -> [String: ControlHandler] {
        var h: [String: ControlHandler] = [
            "files": { words, send in send(try pathReport(fs: fs, node: node, Target(words))) },
            "ckpt": { words, send in send(try catalogue(fs: fs, node: node, Target(words))) },
            // "snapshot DSTPARENT NAMEHEX INO PARENT PATH"
            "snapshot": { words, send in
                guard words.count >= 6, let dst = UInt64(words[1]), let name = hexName(words[2]) else {
                    throw FSError.invalid("malformed request: expected snapshot DSTPARENT NAMEHEX INO PARENT PATH")
                }
                let t = try Target(Array(words[2...]))
                let started = Date()
                let out = try fs.snapshot(t.ino, into: InodeNumber(dst), name: name)
                invalidate(InodeNumber(dst), name)
                send(SnapshotReply(outcome: out, seconds: Date().timeIntervalSince(started)))
            },
            // "unsnapshot PARENT NAMEHEX"
            "unsnapshot": { words, send in
                guard words.count == 3, let parent = UInt64(words[1]), let name = hexName(words[2]) else {
                    throw FSError.invalid("malformed request: expected unsnapshot PARENT NAMEHEX")
                }
                let started = Date()
                let out = try fs.deleteSnapshot(parent: InodeNumber(parent), name: name)
                invalidate(InodeNumber(parent), name)
                send(SnapshotReply(outcome: out, seconds: Date().timeIntervalSince(started)))
            },
            "warm": { words, send in try warm(fs: fs, node: node, Target(words), send: send) },
            "verify": { words, send in
                send(try verify(fs: fs, node: node, Target(words)) { send($0) })
            },
        ]
        guard let node else { return h }
        h["drain"] = { words, send in
            guard words.count == 3, ["on", "off"].contains(words[2]) else { throw FSError.invalid("malformed request: drain ID on|off") }
            let id = String(words[1])
            guard node.membership.known.contains(where: { $0.id == id }) else {
                throw FSError.noEntry("no node \(id) in this cluster (modelfs node list shows them)")
            }
            try node.membership.setDraining(id, words[2] == "on")
            send(["ok": true])
        }
        h["remove"] = { words, send in
            guard words.count == 2 else { throw FSError.invalid("malformed request: remove ID") }
            let id = String(words[1])
            try node.membership.remove(id)
            send(["orphans": try fs.deleteOrphans(of: id)])
        }
        return h
    }
}

/// `modelfs ckpt list|show|find`: the checkpoints under a path (docs/STATUS.md has the schema).
struct CatalogueReport: Codable {
    struct Checkpoint: Codable {
        var path: String
        var framework: String
        /// Its name with each number as `#`, under its directory: the run it is a step of.
        var series: String
        var step: Int?
        var files: [String]
        var bytes: UInt64
        /// What it added to the previous checkpoint of its series (all its distinct blocks for the first).
        var newBytes: UInt64
        /// The worst of its files' states ("replicated", "pending", "under-replicated", "unreadable").
        var state: String
        /// Copies of its least-copied block on live nodes, and the policy's R.
        var replicas: Int
        var wanted: Int
        /// Its newest file's mtime (seconds since the epoch) and the seconds since.
        var mtime: Double
        var ageSeconds: Double
        /// `modelfs ckpt tag`'s key=value pairs (xattrs `user.modelfs.meta.*` on `anchor`).
        var metadata: [String: String]
        /// The file or directory that holds the metadata (a TensorFlow checkpoint's `.index`).
        var anchor: String
    }
    var path: String
    var checkpoints: [Checkpoint] = []
    var unansweredNodes: [String] = []
}

extension Operate {
    static func catalogue(fs: FileSystem, node: ClusterNode?, _ t: Target) throws -> CatalogueReport {
        var files: [FileBlocks] = []
        try fs.walkFiles(from: t.ino, parent: t.parent) { files.append($0) }
        let states = pathReport(fs: fs, node: node, t, files)
        let byIno = Dictionary(states.list.map { ($0.ino, $0) }, uniquingKeysWith: { a, _ in a })
        let rootName = (t.path as NSString).lastPathComponent
        let found = Catalogue.recognise(files.map { Catalogue.File(path: $0.path, size: $0.size, mtime: $0.mtime, blocks: $0.blocks) },
                                        rootName: rootName)
        let now = Date().timeIntervalSince1970
        let rank = ["replicated": 0, "pending": 1, "under-replicated": 2, "unreadable": 3]
        var report = CatalogueReport(path: t.path, unansweredNodes: states.unansweredNodes)
        for c in found {
            let own = c.files.compactMap { byIno[files[$0].ino.rawValue] }
            let state = own.map(\.state).max { rank[$0, default: 0] < rank[$1, default: 0] } ?? "replicated"
            let mtime = Double(c.mtime.seconds) + Double(c.mtime.nanoseconds) / 1e9
            func full(_ p: String) -> String { p.isEmpty ? t.path : t.path + "/" + p }
            report.checkpoints.append(.init(
                path: full(c.path), framework: c.framework, series: full(c.series), step: c.step,
                files: c.files.map { full(files[$0].path) }, bytes: c.bytes, newBytes: c.newBytes, state: state,
                replicas: own.map(\.replicas).min() ?? 0, wanted: own.map(\.wanted).max() ?? 0,
                mtime: mtime, ageSeconds: max(0, now - mtime),
                metadata: (try? metadata(fs: fs, from: t.ino, c.anchor)) ?? [:], anchor: full(c.anchor)))
        }
        return report
    }

    /// The `user.modelfs.meta.*` xattrs of `path` below `start`, by key.
    static func metadata(fs: FileSystem, from start: InodeNumber, _ path: String) throws -> [String: String] {
        var ino = start
        for part in path.split(separator: "/") { ino = try fs.meta.lookup(parent: ino, name: String(part)).ino }
        var out: [String: String] = [:]
        for name in try fs.meta.listxattr(ino) where name.hasPrefix(Catalogue.metaPrefix) {
            out[String(name.dropFirst(Catalogue.metaPrefix.count))] = String(decoding: try fs.meta.getxattr(ino, name: name), as: UTF8.self)
        }
        return out
    }
}

struct SnapshotReply: Codable {
    var outcome: FileSystem.SnapshotOutcome
    var seconds: Double
}

/// A name sent as hex (names may hold spaces and any byte but "/" and NUL).
func hexName(_ hex: Substring) -> String? {
    guard hex.count % 2 == 0, !hex.isEmpty else { return nil }
    var bytes: [UInt8] = []
    var i = hex.startIndex
    while i < hex.endIndex {
        let j = hex.index(i, offsetBy: 2)
        guard let b = UInt8(hex[i..<j], radix: 16) else { return nil }
        bytes.append(b)
        i = j
    }
    return RawName.string(bytes)
}
