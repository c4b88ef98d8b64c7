import Foundation
import Logging
import Synchronization

/// The daemon's log: one line per event, `TIME LEVEL MESSAGE`, through swift-log (so a library
/// that logs through swift-log lands in the same file), with a level (`--log-level`) and, when
/// stderr is a regular file (the daemon's DATA/modelfs.log), size-bounded rotation
/// (`--log-max-size`, `--log-keep`: modelfs.log.1 … .N, the oldest dropped). In the foreground
/// (systemd, a terminal) stderr is left alone: journald bounds its own storage.
public enum Log {
    public typealias Level = Logger.Level

    /// The swift-log logger every modelfs line goes through.
    public static let logger: Logger = {
        LoggingSystem.bootstrap { _ in LineLogHandler() }
        return Logger(label: "modelfs")
    }()

    public static func debug(_ message: @autoclosure () -> String) { log(.debug, message) }
    public static func info(_ message: @autoclosure () -> String) { log(.info, message) }
    public static func warning(_ message: @autoclosure () -> String) { log(.warning, message) }
    public static func error(_ message: @autoclosure () -> String) { log(.error, message) }

    /// Logs `message` at most once per `interval` seconds for `key`: a peer or etcd that fails
    /// every request gives one line a minute, with the count of the lines it stood for.
    /// Returns whether it wrote the line.
    @discardableResult
    public static func every(_ key: String, _ interval: Double = 60, _ level: Level = .warning,
                             _ message: @autoclosure () -> String) -> Bool {
        guard enabled(level) else { return false }
        let now = monotonicSeconds()
        let suppressed: Int? = throttle.withLock { t in
            if var e = t[key], now - e.last < interval { e.suppressed += 1; t[key] = e; return nil }
            let n = t[key]?.suppressed ?? 0
            if t.count > 4096 { t.removeAll() }
            t[key] = (now, 0)
            return n
        }
        guard let suppressed else { return false }
        let more = suppressed > 0 ? " (and \(suppressed) more like this in the last \(Int(interval)) s)" : ""
        log(level, { message() + more })
        return true
    }

    /// Sets the level and the rotation. `maxBytes` 0 never rotates.
    public static func configure(level: Level, maxBytes: UInt64 = 64 << 20, keep: Int = 3) {
        config.withLock { $0 = Config(maxBytes: maxBytes, keep: max(1, keep)) }
        threshold.store(level.severity, ordering: .relaxed)
        LineLogHandler.sink.withLock { $0.path = nil; $0.checked = false }
    }

    /// The level names `--log-level` takes.
    public static func level(named name: String) -> Level? {
        switch name.lowercased() {
        case "debug": .debug
        case "info": .info
        case "warning", "warn": .warning
        case "error": .error
        default: nil
        }
    }

    struct Config { var maxBytes: UInt64 = 64 << 20; var keep = 3 }
    static let config = Mutex(Config())
    /// The least severe level logged, read without a lock on every call (debug lines sit on hot paths).
    static let threshold = Atomic<Int>(Level.info.severity)

    /// True when a line at `level` would be written.
    public static func enabled(_ level: Level) -> Bool { level.severity >= threshold.load(ordering: .relaxed) }
    private static let throttle = Mutex([String: (last: Double, suppressed: Int)]())

    private static func log(_ level: Level, _ message: () -> String) {
        guard enabled(level) else { return }
        logger.log(level: level, "\(message())")
    }

    static func monotonicSeconds() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}

/// Writes swift-log records as `TIME LEVEL MESSAGE` lines on fd 2, one write(2) each (so lines
/// from threads never interleave), and rotates the file behind fd 2 when it grows past the limit.
struct LineLogHandler: LogHandler {
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level {
        get { Logger.Level.allCases.first { $0.severity == Log.threshold.load(ordering: .relaxed) } ?? .info }
        set { Log.threshold.store(newValue.severity, ordering: .relaxed) }
    }
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    /// The file behind fd 2 (found once: /proc/self/fd/2 when it is a regular file) and its size.
    struct Sink { var checked = false; var path: String?; var size: UInt64 = 0 }
    static let sink = Mutex(Sink())

    func log(event: LogEvent) { write(event.level, event.message) }

    func write(_ level: Logger.Level, _ message: Logger.Message) {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var tm = tm()
        var t = ts.tv_sec
        gmtime_r(&t, &tm)
        let stamp = String(format: "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ",
                           tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                           Int(ts.tv_nsec / 1_000_000))
        let name = level == .debug ? "debug" : level == .info || level == .notice ? "info" : level == .warning ? "warning" : "error"
        let line = stamp + " " + name + " " + message.description + "\n"
        let (maxBytes, keep) = Log.config.withLock { ($0.maxBytes, $0.keep) }
        Self.sink.withLock { s in
            if !s.checked {
                s.checked = true
                var st = stat()
                if fstat(2, &st) == 0 && st.st_mode & S_IFMT == S_IFREG,
                   let p = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/2"), p.hasPrefix("/") {
                    s.path = p
                    s.size = UInt64(st.st_size)
                }
            }
            let n = line.utf8.count
            line.withCString { p in _ = Glibc.write(2, p, n) }
            guard let path = s.path, maxBytes > 0 else { return }
            s.size += UInt64(n)
            if s.size >= maxBytes { s.size = Self.rotate(path, keep: keep) }
        }
    }

    /// modelfs.log → modelfs.log.1 → … → .keep (the oldest dropped), and a new file on fds 1
    /// and 2. Returns the new file's size (0, or what it had if it could not be renamed).
    static func rotate(_ path: String, keep: Int) -> UInt64 {
        unlink(path + ".\(keep)")
        for i in stride(from: keep - 1, through: 1, by: -1) { rename(path + ".\(i)", path + ".\(i + 1)") }
        guard rename(path, path + ".1") == 0 else { return 0 }
        let fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        guard fd >= 0 else { return 0 }
        dup2(fd, 2)
        dup2(fd, 1)
        close(fd)
        return 0
    }
}

extension Logger.Level {
    /// Its rank: trace 0 … critical 6.
    var severity: Int {
        switch self {
        case .trace: 0
        case .debug: 1
        case .info: 2
        case .notice: 3
        case .warning: 4
        case .error: 5
        case .critical: 6
        }
    }
}

