import Foundation
import Synchronization

/// Processes tests started, killed at exit if a test did not stop them (a crash, a failed
/// `#require`): nothing a test starts outlives the test run.
private let startedPIDs = Mutex<Set<pid_t>>([])
private let scratchDirs = Mutex<Set<String>>([])
private let exitHook: Void = {
    atexit {
        for pid in startedPIDs.withLock({ $0 }) { kill(pid, SIGKILL); waitpid(pid, nil, 0) }
        for dir in scratchDirs.withLock({ $0 }) { try? FileManager.default.removeItem(atPath: dir) }
    }
}()

/// Starts `executable` with `arguments`, output appended to `log`; stopped by `stopProcess`.
public func startProcess(_ executable: String, _ arguments: [String], log: String,
                         environment: [String: String]? = nil) throws -> Process {
    _ = exitHook
    guard FileManager.default.createFile(atPath: log, contents: nil) else {
        throw TestSupportError("cannot create the log file \(log)")
    }
    let out = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
    let p = Process()
    p.executableURL = URL(fileURLWithPath: executable)
    p.arguments = arguments
    p.standardOutput = out
    p.standardError = out
    if let environment { p.environment = environment }
    try p.run()
    startedPIDs.withLock { _ = $0.insert(p.processIdentifier) }
    return p
}

/// Stops a process this test run started, by its PID: `signal`, then waits for it.
public func stopProcess(_ p: Process, signal: Int32 = SIGTERM) {
    if p.isRunning { kill(p.processIdentifier, signal) }
    p.waitUntilExit()
    startedPIDs.withLock { _ = $0.remove(p.processIdentifier) }
}

/// A TCP port on 127.0.0.1 that nothing listens on now (the kernel's pick).
public func freeLoopbackPort() -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    addr.sin_port = 0
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
    _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
    return Int(UInt16(bigEndian: addr.sin_port))
}

/// Polls `condition` every 20 ms until it holds or `timeout` seconds pass.
public func waitUntil(timeout: Double, _ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
        if condition() { return true }
        usleep(20_000)
    }
    return condition()
}

/// A real etcd cluster (Debian's `etcd-server`) on loopback ports, for tests: N members with
/// pre-vote, data on /dev/shm when it exists. Members are started and stopped by PID.
public final class EtcdTestCluster: @unchecked Sendable {
    public struct Member {
        public var name: String
        public var clientPort: Int
        public var peerPort: Int
        public var process: Process?
    }

    public private(set) var members: [Member]
    public let root: String
    private let token: String

    public static let etcdBinary = ["/usr/bin/etcd", "/usr/local/bin/etcd"].first { FileManager.default.isExecutableFile(atPath: $0) }

    /// One cluster shared by every test of a test process that needs nothing special of it
    /// (tests keep apart by cluster name, i.e. key prefix).
    public static let shared: Result<EtcdTestCluster, any Error> = Result { try EtcdTestCluster(members: 3) }

    /// etcd members a crashed earlier test run left behind (its atexit never ran): their data
    /// dirs are named after that run's pid; kill them by PID and remove the dirs. Once per run.
    static let reaped: Void = {
        let base = FileManager.default.fileExists(atPath: "/dev/shm") ? "/dev/shm" : NSTemporaryDirectory()
        let stale = ((try? FileManager.default.contentsOfDirectory(atPath: base)) ?? []).filter { name in
            guard name.hasPrefix("modelfs-test-"), let owner = Int32(name.split(separator: "-")[2]) else { return false }
            return owner != getpid() && Glibc.kill(owner, 0) != 0
        }
        guard !stale.isEmpty else { return }
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let pid = Int32(entry),
                  let cmd = FileManager.default.contents(atPath: "/proc/\(entry)/cmdline") else { continue }
            let line = String(decoding: cmd, as: UTF8.self)
            if stale.contains(where: { line.contains("/\($0)/") }) { Glibc.kill(pid, SIGKILL) }
        }
        for name in stale { try? FileManager.default.removeItem(atPath: "\(base)/\(name)") }
    }()

    public init(members n: Int) throws {
        _ = Self.reaped
        guard Self.etcdBinary != nil else {
            throw TestSupportError("etcd is not installed: run scripts/install-cluster-deps.sh (Debian package etcd-server)")
        }
        let base = FileManager.default.fileExists(atPath: "/dev/shm") ? "/dev/shm" : NSTemporaryDirectory()
        token = "modelfs-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let root = "\(base)/\(token)"
        self.root = root
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        _ = exitHook
        scratchDirs.withLock { _ = $0.insert(root) }
        var members: [Member] = []
        for i in 0..<n { members.append(Member(name: "m\(i)", clientPort: freeLoopbackPort(), peerPort: freeLoopbackPort())) }
        self.members = members
        for i in members.indices { try start(i, state: "new") }
        guard waitUntil(timeout: 30, { self.healthy() }) else {
            stop()
            throw TestSupportError("etcd test cluster did not become healthy within 30 s; logs in \(root)")
        }
    }

    public var endpoints: [String] { members.map { "127.0.0.1:\($0.clientPort)" } }

    /// A `--meta` URL for this cluster, under key prefix `name`.
    public func metaURL(_ name: String) -> String { "etcd://\(endpoints.joined(separator: ","))/\(name)" }

    public func start(_ i: Int, state: String = "existing") throws {
        let m = members[i]
        let cluster = members.map { "\($0.name)=http://127.0.0.1:\($0.peerPort)" }.joined(separator: ",")
        let args = [
            "--name", m.name, "--data-dir", "\(root)/\(m.name)",
            "--listen-client-urls", "http://127.0.0.1:\(m.clientPort)",
            "--advertise-client-urls", "http://127.0.0.1:\(m.clientPort)",
            "--listen-peer-urls", "http://127.0.0.1:\(m.peerPort)",
            "--initial-advertise-peer-urls", "http://127.0.0.1:\(m.peerPort)",
            "--initial-cluster", cluster, "--initial-cluster-state", state, "--initial-cluster-token", token,
            "--pre-vote", "--auto-compaction-mode", "revision", "--auto-compaction-retention", "10000",
            "--quota-backend-bytes", String(2 << 30), "--enable-v2=false", "--logger", "zap",
        ]
        members[i].process = try startProcess(Self.etcdBinary!, args, log: "\(root)/\(m.name).log",
                                              environment: ["ETCD_UNSUPPORTED_ARCH": "", "PATH": "/usr/bin:/bin"])
    }

    /// Kills member `i` with SIGKILL (a crash, not a clean leave).
    public func kill(_ i: Int) {
        if let p = members[i].process { stopProcess(p, signal: SIGKILL) }
        members[i].process = nil
    }

    /// Whether every running member answers a linearizable read.
    public func healthy() -> Bool {
        members.allSatisfy { m in
            m.process == nil || Self.answers(port: m.clientPort)
        }
    }

    static func answers(port: Int) -> Bool {
        // A linearizable range needs a leader: `curl`-free check through a raw HTTP request.
        let body = #"{"key":"aGVhbHRo"}"#
        let request = "POST /v3/kv/range HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n\(body)"
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var tv = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = UInt16(port).bigEndian
        let ok = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard ok == 0 else { return false }
        _ = request.withCString { send(fd, $0, strlen($0), 0) }
        var buf = [UInt8](repeating: 0, count: 512)
        let n = recv(fd, &buf, buf.count, 0)
        return n > 0 && String(decoding: buf[0..<n], as: UTF8.self).hasPrefix("HTTP/1.1 200")
    }

    public func stop() {
        for i in members.indices {
            if let p = members[i].process { stopProcess(p) }
            members[i].process = nil
        }
        try? FileManager.default.removeItem(atPath: root)
        scratchDirs.withLock { _ = $0.remove(root) }
    }
}

public struct TestSupportError: Error, CustomStringConvertible {
    public var description: String
    public init(_ d: String) { description = d }
}
