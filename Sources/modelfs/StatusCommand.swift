import ArgumentParser
import CModelFSSys
import Foundation
import ModelFSNode
import ModelFSCore
import ModelFSPeer
import ModelFSWire

struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Show every modelfs mount on this machine, or what is safe where under one path.",
        discussion: """
            Without PATH: every mount (files, bytes, dedup, blocks, data-dir usage; on a cluster node also \
            nodes, pending and under-replicated bytes, the healer and the scrubber).
            With PATH (a file or directory inside a mount): that mount, then every file at or below PATH \
            by state — replicated, pending (with the age of the oldest unreplicated write), under-replicated, \
            unreadable. --json prints the documented schema (docs/STATUS.md).
            """)

    @Argument(help: "A mountpoint, or a file or directory inside a mount (default: all mounts).")
    var path: String?

    @Flag(help: "Print JSON instead of tables.")
    var json = false

    @Flag(help: "Print again every --interval seconds until interrupted.")
    var watch = false

    @Option(help: "Seconds between prints with --watch.")
    var interval: Double = 2

    func run() throws {
        if watch && interval <= 0 { throw fail("--interval must be positive") }
        while true {
            if watch && !json && isatty(1) == 1 { print("\u{1B}[H\u{1B}[2J", terminator: "") }
            try once()
            guard watch else { return }
            modelfs_flush_stdout()
            usleep(useconds_t(interval * 1e6))
        }
    }

    func once() throws {
        var records = Registry.all()
        // With PATH: its mount only, and the "INO PARENT PATH" words of its request.
        var target: String?
        if let path {
            let (record, words) = try controlTarget(path)
            records = [record]
            target = words
        }
        var statuses: [MountStatus] = []
        for r in records {
            do {
                let data = try ControlServer.request(r.socket, "status")
                if let e = try? JSONDecoder().decode([String: String].self, from: data), let m = e["error"] {
                    throw fail("the daemon of \(r.mountpoint) (pid \(r.pid)) cannot say its status: \(m)")
                }
                statuses.append(try JSONDecoder().decode(MountStatus.self, from: data))
            } catch let e as ExitCode {
                throw e
            } catch {
                // Listing every mount: one that is going away (unmounting as we ask) is noted
                // and skipped, not a failure of the others.
                if path == nil && (kill(r.pid, 0) != 0 || !Registry.all().contains { $0.socket == r.socket }) {
                    FileHandle.standardError.write(Data("modelfs: \(r.mountpoint) is going away (pid \(r.pid) gone); skipped\n".utf8))
                    continue
                }
                throw fail("the daemon of \(r.mountpoint) (pid \(r.pid)) did not answer: \(error)")
            }
        }
        var report: PathReport?
        if let target, let r = records.first {
            let data = try ControlServer.request(r.socket, "files " + target)
            if let e = try? JSONDecoder().decode([String: String].self, from: data), let m = e["error"] { throw fail(m) }
            report = try JSONDecoder().decode(PathReport.self, from: data)
        }
        if json {
            if let report {
                struct PathStatus: Encodable { var mount: MountStatus; var path: PathReport }
                try printJSON(PathStatus(mount: statuses[0], path: report), compact: watch)
            } else {
                try printJSON(statuses, compact: watch)
            }
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
            for t in s.tiers ?? [] {
                print("  tier \(t.name)".padding(toLength: 18, withPad: " ", startingAt: 0)
                      + "\(humanBytes(t.bytes)) in \(t.blocks) blocks, \(humanBytes(t.free)) free (\(t.root))")
            }
            if let p = s.passthrough {
                print("  passthrough     " + (p.on ? "on, \(p.opens) opens passed through" : "off: \(p.off ?? "unknown")"))
                if p.on || p.flat.copies > 0 {
                    print("  flat copies     \(p.flat.copies), \(humanBytes(p.flat.bytes)) of \(humanBytes(p.flatBudget)), \(p.flat.hits) hits, \(p.flat.misses) misses")
                }
            }
            if let e = s.metadataError { print("  metadata        unreachable, counts as last read: \(e)") }
            if let c = s.cluster { printCluster(c) }
        }
        if let report { printReport(report) }
    }

    func printReport(_ r: PathReport) {
        print("\(r.path): \(r.files) files, \(humanBytes(r.bytes))")
        let rows: [(String, PathReport.Bucket, String)] = [
            ("replicated", r.replicated, ""),
            ("pending", r.pending, r.pending.files > 0 ? String(format: " (oldest unreplicated write %.0f s ago)", r.oldestPendingSeconds) : ""),
            ("under-replicated", r.underReplicated, ""),
            ("unreadable", r.unreadable, r.unreadable.files > 0 ? " (no live node holds some of their blocks)" : ""),
        ]
        for (name, b, note) in rows {
            print("  " + name.padding(toLength: 18, withPad: " ", startingAt: 0) + "\(b.files) files, \(humanBytes(b.bytes))" + note)
        }
        if !r.unansweredNodes.isEmpty { print("  not answering: \(r.unansweredNodes.joined(separator: ", "))") }
        let notable = r.list.filter { $0.state != "replicated" }
        for f in notable.prefix(20) {
            print("    \(f.state.padding(toLength: 17, withPad: " ", startingAt: 0)) \(f.replicas)/\(f.wanted) copies  \(f.path)")
        }
        if notable.count > 20 { print("    … \(notable.count - 20) more (--json lists every file)") }
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
            ("read cache", cacheLine(c)),
            ("fan-out", fanoutLine(c.fanout)),
            ("healer", healLine(c.heal)),
            ("scrubber", scrubLine(c.scrub)),
            ("healing yields", yieldLine(c.healYield)),
            ("peer traffic", c.peerTraffic ?? "?"),
            ("etcd traffic", c.etcdTraffic ?? "?"),
        ]
        for (k, v) in rows { print("  " + k.padding(toLength: 16, withPad: " ", startingAt: 0) + v) }
        for f in (c.fanout?.files ?? []).suffix(5) {
            let name = FileVersion(text: f.file).map { "inode \($0.ino.rawValue) version \($0.version)" } ?? f.file
            print("    \(name): \(f.loaders) other loaders; \(humanBytes(f.fromHolders)) from holders, \(humanBytes(f.fromLoaders)) from loaders, "
                  + "\(humanBytes(f.servedToLoaders)) passed on, \(f.fallbacks) fallbacks, \(f.rejected) corrupt copies rejected"
                  + (f.format.map { "; \($0): \(humanBytes(f.prefetched)) prefetched, \(f.prefetchHits) hits, \(f.prefetchMisses) misses" } ?? ""))
        }
        if let e = c.membershipError { print("  etcd            \(e)") }
        print("  nodes:")
        printNodes(c.nodes)
    }

    func cacheLine(_ c: ClusterStatus) -> String {
        let s = c.cacheStats
        let hits = s.cacheHits + s.localHits, total = hits + s.peerFetches
        let ratio = total == 0 ? "" : String(format: ", hit ratio %.2f", Double(hits) / Double(total))
        return "\(humanBytes(c.cacheBytes)) of \(humanBytes(c.cacheBudget)), \(s.peerFetches) blocks fetched from peers\(ratio)"
    }

    func fanoutLine(_ f: FanoutStatus?) -> String {
        guard let f else { return "unknown (an older daemon)" }
        guard f.minSize > 0 else { return "off (--fanout-min-size 0)" }
        let t = f.totals
        return "files of \(humanBytes(f.minSize)) and more are loaded with the other nodes loading them: "
            + "\(humanBytes(t.fromHolders)) from holders, \(humanBytes(t.fromLoaders)) from other loaders, "
            + "\(humanBytes(t.servedToLoaders)) passed on to them, \(t.fallbacks) fallbacks to the holders, \(t.rejected) corrupt copies rejected"
    }

    func healLine(_ h: HealStatus?) -> String {
        guard let h, h.passes > 0 else { return "no pass yet" }
        var out = "\(h.files) files, \(h.blocks) blocks: \(humanBytes(h.underReplicatedBytes)) short of copies, "
            + "\(humanBytes(h.unreadableBytes)) unreadable; \(humanBytes(h.copiedBytes)) copied"
        if h.copyRate > 0 { out += String(format: " (%.0f MB/s)", h.copyRate / 1e6) }
        if h.rateCap > 0 { out += String(format: ", capped at %.0f MB/s", Double(h.rateCap) / 1e6) }
        out += String(format: "; last pass %.0f s ago on %@", Date().timeIntervalSince1970 - h.lastPassAt, h.healer)
        if !h.waitingFor.isEmpty { out += "; waiting --dead-after for \(h.waitingFor.joined(separator: ","))" }
        for (n, left) in h.draining.sorted(by: { $0.key < $1.key }) { out += "; draining \(n): \(left) blocks left" }
        if let e = h.lastError { out += " (\(e))" }
        return out
    }

    func yieldLine(_ y: ForegroundYield.Status?) -> String {
        guard let y else { return "unknown (an older daemon)" }
        guard y.busyRate > 0 else { return "never (--heal-rate-busy 0)" }
        return String(format: "to %.0f MB/s while this node serves readers or writers (%@); ", Double(y.busyRate) / 1e6, y.busy ? "busy now" : "idle now")
            + String(format: "%llu healing copies held back, %.1f s in all", y.heldCopies, y.yieldedSeconds)
    }

    func scrubLine(_ s: ScrubStatus?) -> String {
        guard let s, s.rate > 0 else { return "off" }
        return "\(s.passes) passes, \(humanBytes(s.scrubbedBytes)) re-hashed" + String(format: " (pass %.0f%%)", s.progress * 100)
            + ", \(s.corruptFound) corrupt found, \(s.repaired) repaired" + (s.unrepairable > 0 ? ", \(s.unrepairable) unrepairable" : "")
    }
}

/// The nodes table (`status`, `node list`).
func printNodes(_ nodes: [ClusterStatus.Node]) {
    let head = ["ID", "STATE", "ADDRESS", "USED", "CAPACITY", "BLOCKS", "IN/OUT MB/s", "LABELS"]
    print("    " + head.map { $0.padding(toLength: 14, withPad: " ", startingAt: 0) }.joined())
    for n in nodes {
        let state = !n.up ? "DOWN" : n.draining ? "draining" : "up"
        let cells = [n.id + (n.isThisNode ? "*" : ""), state, n.address, humanBytes(n.usedBytes), humanBytes(n.capacityBytes), "\(n.blocks)",
                     String(format: "%.1f/%.1f", n.inRate / 1e6, n.outRate / 1e6),
                     n.labels.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",")]
        print("    " + cells.map { $0.padding(toLength: max(14, $0.count + 1), withPad: " ", startingAt: 0) }.joined())
    }
}
