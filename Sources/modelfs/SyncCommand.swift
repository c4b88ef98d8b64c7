import ArgumentParser
import CModelFSSys
import Foundation
import ModelFS
import ModelFSCore
import ModelFSPeer
import ModelFSWire

/// The mount that holds `path`: the registered mountpoint that is its longest prefix.
func mountRecord(containing path: String) throws -> MountRecord {
    let p = canonicalPath(path)
    let found = Registry.all().filter { p == $0.mountpoint || p.hasPrefix($0.mountpoint + "/") }
        .max { $0.mountpoint.count < $1.mountpoint.count }
    guard let found else { throw fail("\(p) is not inside a modelfs mount (see `modelfs status`)") }
    return found
}

struct SyncCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sync",
        abstract: "Wait until everything under PATH has all its replicas (its directory policy's R copies).",
        discussion: "Exits 0 when every file under PATH is fully replicated, 1 if --timeout passes first.")

    @Argument(help: "A file or directory inside a modelfs cluster mount.")
    var path: String

    @Option(help: "Give up after this many seconds.")
    var timeout: Double = 3600

    @Flag(help: "Print the outcome as JSON (no progress): {\"path\", \"replicated\", \"pendingFiles\", \"pendingBytes\", \"error\"}.")
    var json = false

    struct Outcome: Encodable {
        var path: String
        var replicated: Bool
        var pendingFiles: Int
        var pendingBytes: UInt64
        var error: String?
    }

    func run() throws {
        let record = try mountRecord(containing: path)
        let p = canonicalPath(path)
        // Which inodes: every regular file under PATH (all pending work for the mountpoint).
        var inodes: [UInt64]? = nil
        if p != record.mountpoint {
            var st = stat()
            guard stat(p, &st) == 0 else { throw fail("\(p): \(String(cString: strerror(errno)))") }
            var list: [UInt64] = []
            if st.st_mode & S_IFMT == S_IFDIR {
                for s in try TreeCopy.walk(p) where s.st.st_mode & S_IFMT == S_IFREG { list.append(UInt64(s.st.st_ino)) }
            } else {
                list.append(UInt64(st.st_ino))
            }
            inodes = list
            if list.isEmpty {
                if json { try printJSON(Outcome(path: p, replicated: true, pendingFiles: 0, pendingBytes: 0)) } else { print("modelfs: nothing to sync under \(p)") }
                return
            }
        }
        let line = "sync \(timeout)" + (inodes.map { " " + $0.map(String.init).joined(separator: ",") } ?? "")
        let tty = isatty(1) == 1 && !json
        var done: Bool?
        var errorText: String?
        var total: UInt64 = 0
        var lastStatus: ReplicationStatus?
        try ControlServer.stream(record.socket, line) { data in
            if let d = try? JSONDecoder().decode([String: Bool].self, from: data), let v = d["done"] { done = v; return }
            if let e = try? JSONDecoder().decode([String: String].self, from: data), let m = e["error"] { errorText = m; return }
            guard let st = try? JSONDecoder().decode(ReplicationStatus.self, from: data) else { return }
            lastStatus = st
            if json { return }
            total = max(total, st.pendingBytes)
            let text = "\(st.pendingFiles) files, \(humanBytes(st.pendingBytes)) pending" + (st.lastError.map { " (\($0))" } ?? "")
            if tty {
                let frac = total == 0 ? 1 : 1 - Double(st.pendingBytes) / Double(total)
                let bar = String(repeating: "#", count: Int(frac * 30)) + String(repeating: ".", count: 30 - Int(frac * 30))
                print("\r[\(bar)] \(text)\u{1B}[K", terminator: "")
                modelfs_flush_stdout()
            } else {
                print(text)
            }
        }
        if tty { print("") }
        if json {
            let replicated = done == true && errorText == nil
            try printJSON(Outcome(path: p, replicated: replicated, pendingFiles: replicated ? 0 : lastStatus?.pendingFiles ?? 0,
                                  pendingBytes: replicated ? 0 : lastStatus?.pendingBytes ?? 0,
                                  error: errorText ?? (done == nil ? "the daemon stopped answering" : done == false ? "timed out after \(Int(timeout)) s" : nil)))
            if !replicated { throw ExitCode(1) }
            return
        }
        if let errorText { throw fail(errorText) }
        guard let done else { throw fail("the daemon of \(record.mountpoint) stopped answering") }
        if !done { throw fail("not fully replicated after \(Int(timeout)) s; `modelfs status` shows what is pending and why") }
        print("modelfs: everything under \(p) has all its replicas")
    }
}

struct PolicyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "policy",
        abstract: "Show or set a directory's replication policy or storage tier rule (inherited by everything below it).",
        subcommands: [Get.self, Set.self, TierRule.self])

    struct TierRule: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "tier",
            abstract: "Set (or show) a directory's storage tier rule: fast, slow or auto (mounts with --tier).",
            discussion: "fast keeps its files' blocks on the data dir's disk; slow moves them to the slowest --tier at the next pass; auto (the default) moves them once a file has not been written for --tier-age. Stored as the xattr user.modelfs.tier.")
        @Argument(help: "A directory inside a modelfs mount.") var path: String
        @Argument(help: "fast, slow or auto; none to show the rule that applies.") var rule: String?

        func run() throws {
            let record = try mountRecord(containing: path)
            let p = canonicalPath(path)
            var st = stat()
            guard stat(p, &st) == 0 else { throw fail("\(p): \(String(cString: strerror(errno)))") }
            guard st.st_mode & S_IFMT == S_IFDIR else { throw fail("\(p) is not a directory: tier rules are set on directories") }
            guard let rule else {
                if let (v, dir) = inheritedXattr(Tiering.xattr, from: p, mountpoint: record.mountpoint, { Tiering.Rule(rawValue: $0) }) {
                    print("\(v.rawValue)  (from \(dir))")
                } else {
                    print("auto  (the default)")
                }
                return
            }
            guard Tiering.Rule(rawValue: rule) != nil else { throw fail("tier rule \(rule): use fast, slow or auto") }
            let r = rule.withCString { setxattr(p, Tiering.xattr, $0, strlen($0), 0) }
            if r != 0 { throw fail("cannot set the tier rule on \(p): \(String(cString: strerror(errno)))") }
            print("modelfs: \(p) and everything below it: tier \(rule)")
        }
    }

    struct Get: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "The policy that applies to PATH, and where it comes from.")
        @Argument(help: "A file or directory inside a modelfs mount.") var path: String
        @Flag(help: "Print JSON.") var json = false

        func run() throws {
            let record = try mountRecord(containing: path)
            var dir = canonicalPath(path)
            var st = stat()
            if stat(dir, &st) == 0, st.st_mode & S_IFMT != S_IFDIR { dir = (dir as NSString).deletingLastPathComponent }
            var found = inheritedXattr(ReplicationPolicy.xattr, from: dir, mountpoint: record.mountpoint) { try? ReplicationPolicy(parsing: $0) }
            if found == nil {
                let data = try ControlServer.request(record.socket, "status")
                let s = try JSONDecoder().decode(MountStatus.self, from: data)
                guard let c = s.cluster else { throw fail("\(record.mountpoint) is a single node: blocks have one copy") }
                found = (c.replication.defaultPolicy, "the mount's default (--replicas/--ack)")
            }
            let (p, origin) = found!
            if json {
                struct Shown: Encodable { var replicas: Int; var ack: Int; var spread: String?; var from: String }
                try printJSON(Shown(replicas: p.replicas, ack: p.ack, spread: p.spread, from: origin), compact: true)
            } else {
                print("\(p.description.replacingOccurrences(of: ",", with: " "))  (from \(origin))")
            }
        }
    }

    struct Set: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Set a directory's policy: R copies, K durable before close() returns.")
        @Argument(help: "A directory inside a modelfs mount.") var path: String
        @Option(help: "Copies of every block.") var replicas: Int
        @Option(help: "Copies durable before close() returns (1: write-back, = replicas: synchronous).") var ack: Int = 1
        @Option(help: "Spread copies over the values of this node label.") var spread: String?

        func run() throws {
            _ = try mountRecord(containing: path)
            let p = canonicalPath(path)
            let policy = ReplicationPolicy(replicas: replicas, ack: ack, spread: spread)
            do { _ = try ReplicationPolicy(parsing: policy.description) } catch let e as FSError { throw fail(e.message) }
            let value = policy.description
            let r = value.withCString { setxattr(p, ReplicationPolicy.xattr, $0, strlen($0), 0) }
            if r != 0 {
                let e = errno
                if e == EINVAL { throw fail("\(p) is not a directory: policies are set on directories") }
                throw fail("cannot set the policy on \(p): \(String(cString: strerror(e)))")
            }
            print("modelfs: \(p) and everything below it: \(value.replacingOccurrences(of: ",", with: " "))")
        }
    }
}

/// A setting kept in an xattr and inherited (a replication policy, a tier rule): the value of
/// the nearest directory at or above `dir`, up to the mountpoint, that has one `parse` takes,
/// and that directory.
func inheritedXattr<T>(_ name: String, from dir: String, mountpoint: String, _ parse: (String) -> T?) -> (T, String)? {
    var dir = dir
    while true {
        var buf = [UInt8](repeating: 0, count: 256)
        let n = getxattr(dir, name, &buf, buf.count)
        if n > 0, let v = parse(String(decoding: buf[0..<n], as: UTF8.self)) { return (v, dir) }
        if dir == mountpoint || dir == "/" { return nil }
        dir = (dir as NSString).deletingLastPathComponent
    }
}
