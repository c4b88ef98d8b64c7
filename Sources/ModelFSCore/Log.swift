import Foundation

/// One line per event on stderr (the daemon redirects stderr to DATA/modelfs.log).
public enum Log {
    public static func info(_ message: String) { write("info", message) }
    public static func warning(_ message: String) { write("warning", message) }
    public static func error(_ message: String) { write("error", message) }

    static func write(_ level: String, _ message: String) {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var tm = tm()
        var t = ts.tv_sec
        gmtime_r(&t, &tm)
        let stamp = String(format: "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ",
                           tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                           Int(ts.tv_nsec / 1_000_000))
        let line = stamp + " " + level + " " + message + "\n"
        // write(2) on fd 2: one syscall per line, so lines from threads do not interleave.
        line.withCString { p in _ = Glibc.write(2, p, strlen(p)) }
    }
}

/// This build's version (`modelfs --version`, the log's first line, `status`).
public enum ModelFSVersion {
    public static let string = "0.9.0"
}
