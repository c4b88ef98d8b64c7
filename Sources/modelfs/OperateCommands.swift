import ArgumentParser
import CModelFSSys
import Foundation
import ModelFSNode
import ModelFSPeer
import ModelFSWire

/// A path inside a mount as the daemon's requests name it: "INO PARENT PATH".
func controlTarget(_ path: String) throws -> (record: MountRecord, words: String) {
    let record = try mountRecord(containing: path)
    let p = canonicalPath(path)
    var st = stat()
    guard stat(p, &st) == 0 else { throw fail("\(p): \(String(cString: strerror(errno)))") }
    var parent: UInt64 = 0
    var pst = stat()
    if st.st_mode & S_IFMT != S_IFDIR, stat((p as NSString).deletingLastPathComponent, &pst) == 0 { parent = UInt64(pst.st_ino) }
    return (record, "\(st.st_ino) \(parent) \(p)")
}

/// Sends a request and hands each JSON reply line to `onLine`; an {"error"} line fails.
func controlStream(_ record: MountRecord, _ line: String, _ onLine: (Data) throws -> Void) throws {
    var failure: String?
    var answered = false
    try ControlServer.stream(record.socket, line) { data in
        answered = true
        if let e = try? JSONDecoder().decode([String: String].self, from: data), let m = e["error"] { failure = m; return }
        do { try onLine(data) } catch { failure = "\(error)" }
    }
    if let failure { throw fail(failure) }
    if !answered { throw fail("the daemon of \(record.mountpoint) did not answer (is it an older version? remount it)") }
}

/// A progress bar on a terminal, plain lines otherwise.
func showProgress(_ done: Int, _ total: Int, _ text: String) {
    if isatty(1) == 1 {
        let frac = total == 0 ? 1 : Double(done) / Double(total)
        let n = Int(frac * 30)
        print("\r[" + String(repeating: "#", count: n) + String(repeating: ".", count: 30 - n) + "] \(text)\u{1B}[K", terminator: "")
        modelfs_flush_stdout()
        if done == total { print("") }
    } else {
        print(text)
    }
}

struct WarmCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "warm",
        abstract: "Prefetch every block under PATH into this node's read cache, from several peers in parallel.",
        discussion: "Exits 0 when every block is local or cached, 1 if some could not be fetched. The cache budget (--cache-size) still applies.")

    @Argument(help: "A file or directory inside a modelfs cluster mount.") var path: String
    @Flag(help: "Print the outcome as JSON (no progress).") var json = false

    func run() throws {
        let (record, words) = try controlTarget(path)
        var last: Operate.WarmProgress?
        try controlStream(record, "warm " + words) { data in
            let p = try JSONDecoder().decode(Operate.WarmProgress.self, from: data)
            last = p
            if !json { showProgress(p.done, p.total, "\(p.done)/\(p.total) blocks fetched" + (p.failed > 0 ? ", \(p.failed) failed" : "")) }
        }
        guard let last else { throw fail("no progress from the daemon") }
        if json {
            try printJSON(last)
            if last.failed > 0 { throw ExitCode(1) }
            return
        }
        if last.failed > 0 { throw fail("\(last.failed) blocks could not be fetched from any live node; `modelfs status \(canonicalPath(path))` shows which files") }
        print("modelfs: every block under \(canonicalPath(path)) is on this node (\(last.total) fetched)")
    }
}

struct VerifyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Re-hash every replica of every block under PATH on its node, repair corrupt ones and missing copies.",
        discussion: "Exits 0 when every block under PATH has its policy's copies and all are good; 1 otherwise, with what is wrong.")

    @Argument(help: "A file or directory inside a modelfs mount.") var path: String
    @Flag(help: "Print the report as JSON.") var json = false

    func run() throws {
        let (record, words) = try controlTarget(path)
        var report: Operate.VerifyReport?
        if !json { print("modelfs: verifying every replica under \(canonicalPath(path))…") }
        try controlStream(record, "verify " + words) { data in
            if let p = try? JSONDecoder().decode(Operate.VerifyProgress.self, from: data) {
                if !json { showProgress(p.checked, max(p.total, 1), "\(p.checked)/\(p.total) replicas checked") }
                return
            }
            report = try JSONDecoder().decode(Operate.VerifyReport.self, from: data)
        }
        if !json && isatty(1) == 1 { print("") }
        guard let r = report else { throw fail("no report from the daemon") }
        if json {
            try printJSON(r)
        } else {
            print("\(r.files) files, \(r.blocks) blocks; \(r.replicasChecked) replicas re-hashed: \(r.good) good, \(r.repaired) repaired, "
                  + "\(r.corruptUnrepaired) corrupt with no good copy; \(r.copiesMade) missing copies made")
            if r.underReplicatedBlocks > 0 { print("\(r.underReplicatedBlocks) blocks still short of copies (too few live nodes?)") }
            if r.unreadableBlocks > 0 { print("\(r.unreadableBlocks) blocks have no good copy on any live node") }
            if !r.unansweredNodes.isEmpty { print("nodes not answering: \(r.unansweredNodes.joined(separator: ", "))") }
        }
        if !r.ok { throw ExitCode(1) }
    }
}

struct NodeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "node",
        abstract: "List the cluster's nodes, drain one before it leaves, remove one that is gone.",
        subcommands: [List.self, Drain.self, Remove.self])

    struct Where: ParsableArguments {
        @Option(help: "A cluster mount on this machine to ask (default: the only one).") var mount: String?
        func record() throws -> MountRecord {
            if let mount { return try mountRecord(containing: mount) }
            let all = Registry.all()
            guard all.count == 1 else {
                throw fail(all.isEmpty ? "no modelfs mount on this machine" : "several modelfs mounts here: say which with --mount")
            }
            return all[0]
        }
    }

    static func cluster(_ record: MountRecord) throws -> ClusterStatus {
        let s = try JSONDecoder().decode(MountStatus.self, from: ControlServer.request(record.socket, "status"))
        guard let c = s.cluster else { throw fail("\(record.mountpoint) is a single node, not a cluster node") }
        return c
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Every node of the cluster: up, down or draining, usage and traffic.")
        @OptionGroup var at: Where
        @Flag(help: "Print JSON.") var json = false
        func run() throws {
            let c = try NodeCommand.cluster(try at.record())
            if json {
                try printJSON(c.nodes)
            } else {
                printNodes(c.nodes)
            }
        }
    }

    struct Drain: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Move every copy off a node, never leaving a block with fewer copies, so it can leave.",
            discussion: "Waits (progress bar) until the healer has copied all its blocks elsewhere and dropped them from it; then stop the node and `modelfs node remove ID`.")
        @Argument(help: "The node's id (modelfs node list).") var id: String
        @OptionGroup var at: Where
        @Flag(help: "Stop draining: the node takes new copies again.") var cancel = false
        @Flag(help: "Return at once instead of waiting.") var noWait = false
        @Option(help: "Give up waiting after this many seconds.") var timeout: Double = 86400

        func run() throws {
            let record = try at.record()
            let began = Date().timeIntervalSince1970
            try controlStream(record, "drain \(id) \(cancel ? "off" : "on")") { _ in }
            if cancel { print("modelfs: node \(id) takes new copies again"); return }
            print("modelfs: draining \(id): no new copies go to it; its blocks are being copied elsewhere")
            if noWait { return }
            let deadline = Date().addingTimeInterval(timeout)
            var total: Int?
            while Date() < deadline {
                let c = try NodeCommand.cluster(record)
                if let h = c.heal, h.lastPassAt > began, let left = h.draining[id] {
                    total = max(total ?? 0, left)
                    showProgress(total! - left, total!, "\(left) blocks left on \(id)" + (h.lastError.map { " (\($0))" } ?? ""))
                    if left == 0 {
                        print("modelfs: \(id) holds no block the cluster needs; stop it, then `modelfs node remove \(id)`")
                        return
                    }
                }
                usleep(500_000)
            }
            throw fail("\(id) still holds blocks after \(Int(timeout)) s; `modelfs status` shows the healer's last error")
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Take a node that is down for good off the cluster's roster.")
        @Argument(help: "The node's id.") var id: String
        @OptionGroup var at: Where
        func run() throws {
            var orphans = 0
            try controlStream(try at.record(), "remove \(id)") { data in
                orphans = (try? JSONDecoder().decode([String: Int].self, from: data))?["orphans"] ?? 0
            }
            print("modelfs: node \(id) removed from the cluster"
                  + (orphans > 0 ? "; the \(orphans) deleted file(s) it still held open are gone with it" : ""))
        }
    }
}
