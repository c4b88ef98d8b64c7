import ArgumentParser
import Foundation

struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Show every modelfs mount on this machine: files, bytes, dedup, blocks, data-dir usage.")

    @Argument(help: "Only this mountpoint (default: all mounts).")
    var mountpoint: String?

    @Flag(help: "Print JSON (an array of mount objects) instead of a table.")
    var json = false

    func run() throws {
        var records = Registry.all()
        if let mountpoint {
            let mp = canonicalPath(mountpoint)
            records = records.filter { $0.mountpoint == mp }
            if records.isEmpty { throw fail("\(mp) is not a modelfs mount (see `modelfs status` for all mounts)") }
        }
        var statuses: [MountStatus] = []
        for r in records {
            do {
                let data = try ControlServer.request(r.socket, "status")
                statuses.append(try JSONDecoder().decode(MountStatus.self, from: data))
            } catch {
                throw fail("the daemon of \(r.mountpoint) (pid \(r.pid)) did not answer: \(error)")
            }
        }
        if json {
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: try enc.encode(statuses), as: UTF8.self))
            return
        }
        if statuses.isEmpty { print("no modelfs mounts"); return }
        for s in statuses {
            print("\(s.mountpoint)  (pid \(s.pid), data \(s.dataDir), meta \(s.meta))")
            let rows: [(String, String)] = [
                ("files", "\(s.files) files, \(s.directories) directories, \(s.symlinks) symlinks"),
                ("logical bytes", humanBytes(s.logicalBytes)),
                ("stored bytes", humanBytes(s.storedBytes)),
                ("dedup ratio", String(format: "%.2f×", s.dedupRatio)),
                ("blocks", "\(s.blocks)"),
                ("data dir usage", humanBytes(s.dataDirBytes)),
                ("open handles", "\(s.openHandles)"),
                ("block cache", "\(humanBytes(UInt64(s.cacheBytes))), \(s.cacheHits) hits, \(s.cacheMisses) misses"),
            ]
            for (k, v) in rows { print("  " + k.padding(toLength: 16, withPad: " ", startingAt: 0) + v) }
            if let c = s.cluster { printCluster(c) }
        }
    }

    func printCluster(_ c: ClusterStatus) {
        let r = c.replication
        let age = r.pendingJobs == 0 ? "" : String(format: ", oldest unreplicated write %.0f s ago", r.oldestPendingSeconds)
        let rows: [(String, String)] = [
            ("node", "\(c.nodeID) at \(c.address)"),
            ("policy", "default \(r.defaultPolicy) (modelfs policy get PATH for a directory's own)"),
            ("pending", "\(r.pendingFiles) files, \(humanBytes(r.pendingBytes)) not yet on all replicas\(age)"),
            ("under-replicated", humanBytes(r.underReplicatedBytes) + (r.lastError.map { " (\($0))" } ?? "")),
            ("replicated", "\(humanBytes(r.replicatedBytes)) sent to peers since start"),
            ("read cache", "\(humanBytes(c.cacheBytes)) of \(humanBytes(c.cacheBudget)), \(c.cacheStats.peerFetches) blocks fetched from peers"),
        ]
        for (k, v) in rows { print("  " + k.padding(toLength: 16, withPad: " ", startingAt: 0) + v) }
        if let e = c.membershipError { print("  etcd            \(e)") }
        print("  nodes:")
        print("    " + ["ID", "STATE", "ADDRESS", "USED", "BLOCKS", "LABELS"].map { $0.padding(toLength: 14, withPad: " ", startingAt: 0) }.joined())
        for n in c.nodes {
            let cells = [n.id + (n.isThisNode ? "*" : ""), n.up ? "up" : "DOWN", n.address, humanBytes(n.usedBytes), "\(n.blocks)",
                         n.labels.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",")]
            print("    " + cells.map { $0.padding(toLength: max(14, $0.count + 1), withPad: " ", startingAt: 0) }.joined())
        }
    }
}
