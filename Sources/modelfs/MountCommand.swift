import ArgumentParser
import Foundation
import ModelFS
import ModelFSCore
import ModelFSNode
import ModelFSFUSE
import ModelFSMeta
import ModelFSStore

struct MountCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mount",
        abstract: "Mount a modelfs filesystem (daemonizes unless -f).",
        discussion: """
            Data (blocks, metadata, log) lives under --data, by default ~/.local/share/modelfs. \
            Metadata defaults to SQLite in the data dir; `--meta memory:` keeps it in memory (tests). \
            The daemon's log is DATA/modelfs.log. Unmount with `modelfs umount MOUNTPOINT`.
            """)

    @Argument(help: "An existing, empty directory to mount on.")
    var mountpoint: String

    @Option(help: "Data directory: blocks, metadata and log (default: ~/.local/share/modelfs).")
    var data: String?

    @Option(help: "A slower storage tier for blocks, CLASS:DIR (e.g. hdd:/big); repeat for more, fastest first. The data dir is the fast tier: new blocks land there while it has room (then on the next tier), and older checkpoints' blocks move down (--tier-age, `modelfs policy tier`).")
    var tier: [String] = []

    @Option(help: "With --tier: seconds after a file's last write before its blocks move to the slowest tier (directories with rule auto).")
    var tierAge: Double = 86400

    @Option(help: "Metadata engine: sqlite:PATH (default sqlite:DATA/meta.db), memory:, or etcd://HOST:PORT,...[/NAME] for a cluster node.")
    var meta: String?

    @Flag(name: .short, help: "Stay in the foreground (do not daemonize).")
    var foreground = false

    @Option(name: .short, help: "Extra FUSE mount options, comma-separated (e.g. -o ro). -o writeback_cache (one node only) turns on the kernel's writeback cache: faster for many small writes, slower for large sequential ones.")
    var o: [String] = []

    @Flag(inversion: .prefixedNo, help: "Read-only opens pass straight through to a flat copy of the file (Linux 6.9+, as root): warm reads and mmap at local-disk speed, without the daemon. On by default; off by itself with -o writeback_cache, without CAP_SYS_ADMIN or on an older kernel (status says why).")
    var passthrough: Bool?

    @Option(help: "Byte budget of the flat copies passthrough reads from (under DATA/flat), least recently used evicted (default: 10G or a tenth of the data dir's disk, the smaller).")
    var flatSize: String?

    @Option(help: "Least severe events the log keeps: debug, info, warning or error.")
    var logLevel: String = "info"

    @Option(help: "Size at which DATA/modelfs.log is moved to modelfs.log.1 and a new one begun (0: never; in the foreground the log is stderr, never rotated).")
    var logMaxSize: String = "64M"

    @Option(help: "Rotated logs kept: modelfs.log.1 ... modelfs.log.N, the oldest dropped.")
    var logKeep: Int = 3

    @Option(help: "Serve Prometheus /metrics at HOST:PORT (e.g. 127.0.0.1:9567; off by default): FUSE operation latencies and errors, cache, passthrough, replication and healing. A cluster node's peer port serves them too.")
    var metricsListen: String?

    @Option(help: "File (mode 600) holding a read-only token for /metrics: required with --metrics-listen off loopback; on a cluster node it also reads the peer port's /metrics and /v1/status, and nothing else.")
    var metricsTokenFile: String?

    @Option(help: "A YAML file of mount flags (the long names, without dashes: `replicas: 3`, `secret-file: /etc/modelfs/secret`, `options: [allow_other]`); flags on the command line override it. Check one with `modelfs config check FILE`.")
    var config: String?

    @Option(help: .hidden)
    var readyFd: Int32?

    @OptionGroup(title: "Cluster (with --meta etcd://...)")
    var cluster: ClusterOptions

    func run() throws {
        Log.configure(level: Log.level(named: logLevel) ?? .info, maxBytes: parseSize(logMaxSize) ?? 64 << 20, keep: logKeep)
        let mp = canonicalPath(mountpoint)
        let dataDir = canonicalPath(data ?? defaultDataDir())
        let metaURL = meta ?? "sqlite:\(dataDir)/meta.db"
        if let problem = preflight(mountpoint: mp, dataDir: dataDir, meta: metaURL) {
            report(problem)
            throw fail(problem)
        }
        if foreground {
            do {
                let mountOptions = MountOptions(o)
                var settings = NodeSettings(dataDir: dataDir, meta: metaURL,
                                            cluster: metaURL.hasPrefix("etcd://") ? cluster.settings : nil)
                settings.writebackCache = mountOptions.writebackCache
                settings.passthrough = passthroughChoice
                settings.flatBudget = flatBudget(dataDir)
                settings.metricsToken = metricsToken
                settings.tiers = try parsedTiers()
                settings.tierAge = tierAge
                try Daemon(mountpoint: mp, settings: settings, fuseOptions: mountOptions.fuse, readyFD: readyFd,
                           metricsListen: metricsListen).run()
            } catch {
                // Every layer's error says what failed in its message (an FSError without its errno).
                let message = (error as? FSError)?.message ?? "\(error)"
                report(message)
                throw fail(message)
            }
            return
        }
        try spawnDaemon(mountpoint: mp, dataDir: dataDir, meta: metaURL)
    }

    /// `--tier CLASS:DIR` as tiers, directories made canonical.
    func parsedTiers() throws -> [PackBlockStore.Tier] {
        try tier.map { spec in
            guard let colon = spec.firstIndex(of: ":"), colon != spec.startIndex, spec.index(after: colon) != spec.endIndex else {
                throw fail("--tier \(spec): expected CLASS:DIR (e.g. hdd:/big)")
            }
            let name = String(spec[..<colon])
            guard name.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == "_") }) else {
                throw fail("--tier \(spec): a class is letters, digits, - and _")
            }
            return PackBlockStore.Tier(name: name, root: canonicalPath(String(spec[spec.index(after: colon)...])))
        }
    }

    /// Whether to pass through, and if not why: on unless --no-passthrough or -o writeback_cache
    /// (with which the kernel turns it off).
    var passthroughChoice: NodeSettings.Passthrough {
        if passthrough == false { return .off("--no-passthrough") }
        if MountOptions(o).writebackCache { return .off("-o writeback_cache (the kernel turns passthrough off with it)") }
        return .on
    }

    /// --flat-size, or 10 GiB or a tenth of the data dir's filesystem, the smaller.
    func flatBudget(_ dataDir: String) -> UInt64 {
        if let flatSize, let n = parseSize(flatSize) { return n }
        var vfs = statvfs()
        let tenth = statvfs(dataDir, &vfs) == 0 ? UInt64(vfs.f_blocks) * UInt64(vfs.f_frsize) / 10 : UInt64.max
        return min(10 << 30, tenth)
    }

    /// The metrics token, read from its file.
    var metricsToken: String? { metricsTokenFile.flatMap(readSecret) }

    /// The metrics flags' problem, if any.
    func metricsProblem() -> String? {
        if let metricsTokenFile {
            if let why = unsafeSecretFile(metricsTokenFile, flag: "--metrics-token-file") { return why }
            guard let token = metricsToken else { return "cannot read the metrics token file \(metricsTokenFile)" }
            if token.count < 8 { return "the token in --metrics-token-file \(metricsTokenFile) is shorter than 8 characters; use a long random one" }
            if token == cluster.secret { return "--metrics-token-file holds the cluster secret: the metrics token must be another, read-only one" }
        }
        if let metricsListen {
            guard let (host, _) = parseHostPort(metricsListen), host.split(separator: ".").count == 4 else {
                return "--metrics-listen \(metricsListen): expected IPv4:PORT, e.g. 127.0.0.1:9567"
            }
            if !host.hasPrefix("127.") && metricsTokenFile == nil {
                return "--metrics-listen \(metricsListen) is reachable from other machines: give it a token with --metrics-token-file FILE (or listen on 127.0.0.1)"
            }
        }
        return nil
    }

    /// The log flags' problem, if any.
    func logProblem() -> String? {
        if Log.level(named: logLevel) == nil { return "--log-level \(logLevel): use debug, info, warning or error" }
        if parseSize(logMaxSize) == nil { return "--log-max-size \(logMaxSize): expected a size such as 64M (0: never rotate)" }
        if logKeep < 1 || logKeep > 100 { return "--log-keep \(logKeep): keep 1 to 100 rotated logs" }
        if config != nil { return "--config is read before the flags are parsed; it cannot be used here" }
        return nil
    }

    /// Tells a waiting parent (if any) that the mount failed.
    func report(_ problem: String) {
        guard let fd = readyFd else { return }
        let line = "error " + problem + "\n"
        _ = line.withCString { write(fd, $0, strlen($0)) }
    }

    func defaultDataDir() -> String {
        if let x = ProcessInfo.processInfo.environment["XDG_DATA_HOME"], !x.isEmpty { return x + "/modelfs" }
        return NSHomeDirectory() + "/.local/share/modelfs"
    }

    /// Every check that can fail before we touch anything, with the one-line message a user needs.
    func preflight(mountpoint mp: String, dataDir: String, meta: String) -> String? {
        var st = stat()
        if stat(mp, &st) != 0 {
            if errno == ENOTCONN {
                return "\(mp) is a dead FUSE mount (its daemon died); clear it with: fusermount3 -u \(mp)"
            }
            return "mountpoint \(mp) does not exist; create it with: mkdir -p \(mp)"
        }
        if st.st_mode & S_IFMT != S_IFDIR { return "mountpoint \(mp) is not a directory" }
        if let type = MountTable.fsType(at: mp) {
            return type == "fuse.modelfs"
                ? "\(mp) is already mounted by modelfs; unmount it first with: modelfs umount \(mp)"
                : "\(mp) is already mounted (\(type)); choose another mountpoint"
        }
        if getuid() != 0 && !FileManager.default.isExecutableFile(atPath: "/usr/bin/fusermount3")
            && !FileManager.default.isExecutableFile(atPath: "/bin/fusermount3") {
            return "fusermount3 is missing; install it with: sudo apt-get install fuse3"
        }
        if let problem = settingsProblems(meta: meta).first { return problem }
        if let problem = checkDataDir(dataDir) { return problem }
        if access("/dev/fuse", R_OK | W_OK) != 0 {
            return "/dev/fuse is missing or not accessible; install FUSE with: sudo apt-get install fuse3 (and load the module: modprobe fuse)"
        }
        if dataDir == mp || dataDir.hasPrefix(mp + "/") { return "the data dir \(dataDir) cannot be inside the mountpoint" }
        var seen: [String: String] = ["fast": dataDir]
        for spec in tier {
            guard let colon = spec.firstIndex(of: ":"), colon != spec.startIndex, spec.index(after: colon) != spec.endIndex else {
                return "--tier \(spec): expected CLASS:DIR (e.g. hdd:/big)"
            }
            let name = String(spec[..<colon]), dir = canonicalPath(String(spec[spec.index(after: colon)...]))
            if !name.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == "_") }) {
                return "--tier \(spec): a class is letters, digits, - and _"
            }
            if let other = seen[name] { return "--tier \(spec): class \(name) is already \(other)" }
            if seen.values.contains(where: { $0 == dir || dir.hasPrefix($0 + "/") || $0.hasPrefix(dir + "/") }) {
                return "--tier \(spec): \(dir) overlaps another tier or the data dir"
            }
            if dir == mp || dir.hasPrefix(mp + "/") { return "--tier \(spec): \(dir) cannot be inside the mountpoint" }
            var d = stat()
            if stat(dir, &d) != 0 || d.st_mode & S_IFMT != S_IFDIR { return "--tier \(spec): \(dir) is not a directory; create it (on the slower disk) first" }
            if access(dir, W_OK) != 0 { return "--tier \(spec): \(dir) is not writable" }
            seen[name] = dir
        }
        if tierAge < 0 { return "--tier-age must be 0 or more seconds" }
        return nil
    }

    /// What is wrong with the flags themselves, whatever the machine (also `modelfs config
    /// check`): each problem names its flag.
    func settingsProblems(meta: String? = nil) -> [String] {
        let meta = meta ?? self.meta ?? "sqlite:"
        var out: [String] = []
        if let p = logProblem() { out.append(p) }
        if let p = metricsProblem() { out.append(p) }
        if let flatSize, parseSize(flatSize) == nil { out.append("--flat-size \(flatSize): expected a size such as 512M or 10G") }
        if passthrough == true && MountOptions(o).writebackCache {
            out.append("--passthrough and -o writeback_cache do not go together: the kernel turns passthrough off with the writeback cache; drop one")
        }
        if meta.hasPrefix("etcd://") && MountOptions(o).writebackCache {
            out.append("-o writeback_cache is for a single node: with it the kernel keeps its own file sizes and would miss other nodes' writes; drop it")
        }
        if meta.hasPrefix("etcd://") {
            do { _ = try MetadataURL.parseEtcd(meta) } catch let e as FSError { out.append(e.message) } catch { out.append("--meta \(meta): \(error)") }
            if let problem = cluster.problem() { out.append(problem) }
        } else if !(meta == "memory:" || meta == "memory" || meta.hasPrefix("sqlite:")) {
            let scheme = meta.split(separator: ":", maxSplits: 1).first.map(String.init) ?? meta
            out.append("unknown --meta scheme \"\(scheme)\": use sqlite:PATH, etcd://HOST:PORT,... or memory:")
        }
        return out
    }

    func checkDataDir(_ dir: String) -> String? {
        do {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        } catch {
            return "data dir \(dir) cannot be created (not writable?): \((error as NSError).localizedDescription); choose another with --data"
        }
        let probe = dir + "/.write-probe.\(getpid())"
        let fd = open(probe, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        if fd < 0 {
            let e = errno
            if e == ENOSPC { return "data dir \(dir) is on a full disk; free some space or choose another with --data" }
            return "data dir \(dir) is not writable (\(String(cString: strerror(e)))); fix its permissions or choose another with --data"
        }
        close(fd)
        unlink(probe)
        var vfs = statvfs()
        if statvfs(dir, &vfs) == 0 {
            let free = UInt64(vfs.f_bavail) * UInt64(vfs.f_frsize)
            // With slower tiers a full fast tier is normal: blocks stop at the space they keep
            // free for the metadata (PackBlockStore.tierWithRoom), and the next ones go on.
            if free < (tier.isEmpty ? 16 << 20 : 1 << 20) {
                return "data dir \(dir) is on a full disk (\(humanBytes(free)) free); free some space or choose another with --data"
            }
        }
        return nil
    }

    /// Re-executes this binary in the foreground, detached in its own session (forking a process
    /// that has threads is unsafe), and waits until the mount answers or fails.
    func spawnDaemon(mountpoint mp: String, dataDir: String, meta: String) throws {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw fail("cannot create a pipe: \(String(cString: strerror(errno)))") }
        let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path
        var args = [exe, "mount", mp, "--data", dataDir, "--meta", meta, "-f", "--ready-fd", String(fds[1])]
        for opt in o { args += ["-o", opt] }
        if let passthrough { args.append(passthrough ? "--passthrough" : "--no-passthrough") }
        if let flatSize { args += ["--flat-size", flatSize] }
        args += ["--log-level", logLevel, "--log-max-size", logMaxSize, "--log-keep", String(logKeep)]
        if let metricsListen { args += ["--metrics-listen", metricsListen] }
        for t in try parsedTiers() { args += ["--tier", "\(t.name):\(t.root)"] }
        if !tier.isEmpty { args += ["--tier-age", String(tierAge)] }
        if let metricsTokenFile { args += ["--metrics-token-file", metricsTokenFile] }
        if meta.hasPrefix("etcd://") { args += cluster.arguments }
        let logPath = dataDir + "/modelfs.log"

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, logPath, O_WRONLY | O_CREAT | O_APPEND, 0o600)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        posix_spawn_file_actions_addclose(&actions, fds[0])
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        // POSIX_SPAWN_SETSID (glibc 2.26+): the daemon leads its own session, detached from the terminal.
        posix_spawnattr_setflags(&attr, Int16(0x80))

        var pid: pid_t = 0
        var cargs = args.map { strdup($0) } + [nil]
        defer { cargs.forEach { free($0) } }
        let rc = posix_spawn(&pid, exe, &actions, &attr, &cargs, environ)
        close(fds[1])
        guard rc == 0 else { close(fds[0]); throw fail("cannot start the daemon: \(String(cString: strerror(rc)))") }

        var reply = Data()
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(fds[0], &buf, buf.count)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            reply.append(contentsOf: buf[0..<n])
            if reply.contains(UInt8(ascii: "\n")) { break }
        }
        close(fds[0])
        let line = String(decoding: reply, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        if line.hasPrefix("ok") {
            print("modelfs: mounted \(mp) (pid \(pid), data \(dataDir)); unmount with: modelfs umount \(mp)")
            return
        }
        var status: Int32 = 0
        waitpid(pid, &status, WNOHANG)
        if line.hasPrefix("error ") { throw fail(String(line.dropFirst(6))) }
        throw fail("the daemon exited before mounting \(mp); see \(logPath)")
    }
}

extension FileHandle {
    static func writeStderr(_ s: String) { FileHandle.standardError.write(Data(s.utf8)) }
}
