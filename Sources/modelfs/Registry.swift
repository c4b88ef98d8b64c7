import Foundation
import ModelFSCore

/// Where running daemons announce themselves, so `status` and `umount` find them:
/// one JSON file and one control socket per mount, under /run/modelfs (root) or
/// $XDG_RUNTIME_DIR/modelfs (or /tmp/modelfs-UID).
struct MountRecord: Codable {
    var mountpoint: String
    var dataDir: String
    var meta: String
    var pid: Int32
    var socket: String
}

enum Registry {
    static var directory: String {
        if getuid() == 0 { return "/run/modelfs" }
        if let x = ProcessInfo.processInfo.environment["XDG_RUNTIME_DIR"], !x.isEmpty { return x + "/modelfs" }
        return "/tmp/modelfs-\(getuid())"
    }

    /// A short stable name for a mountpoint (socket paths are limited to 108 bytes).
    static func key(_ mountpoint: String) -> String {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in mountpoint.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        return String(h, radix: 16)
    }

    static func recordPath(_ mountpoint: String) -> String { directory + "/" + key(mountpoint) + ".json" }
    static func socketPath(_ mountpoint: String) -> String { directory + "/" + key(mountpoint) + ".sock" }

    static func save(_ r: MountRecord) throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let data = try JSONEncoder().encode(r)
        let tmp = recordPath(r.mountpoint) + ".tmp"
        try data.write(to: URL(fileURLWithPath: tmp))
        rename(tmp, recordPath(r.mountpoint))
    }

    static func remove(_ mountpoint: String) {
        unlink(recordPath(mountpoint))
        unlink(socketPath(mountpoint))
    }

    static func load(_ mountpoint: String) -> MountRecord? {
        guard let d = FileManager.default.contents(atPath: recordPath(mountpoint)) else { return nil }
        return try? JSONDecoder().decode(MountRecord.self, from: d)
    }

    /// Records of daemons that are still alive (stale records are removed).
    static func all() -> [MountRecord] {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: directory) else { return [] }
        var out: [MountRecord] = []
        for n in names where n.hasSuffix(".json") {
            guard let d = FileManager.default.contents(atPath: directory + "/" + n),
                  let r = try? JSONDecoder().decode(MountRecord.self, from: d) else { continue }
            if kill(r.pid, 0) == 0 || errno == EPERM { out.append(r) } else { remove(r.mountpoint) }
        }
        return out.sorted { $0.mountpoint < $1.mountpoint }
    }
}

/// Mount table queries (/proc/self/mountinfo).
enum MountTable {
    /// The filesystem type mounted exactly at `path`, if any.
    static func fsType(at path: String) -> String? {
        guard let text = readProcFile("/proc/self/mountinfo") else { return nil }
        var found: String?
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: " ")
            guard parts.count > 5, let dash = parts.firstIndex(of: "-"), dash + 1 < parts.count else { continue }
            if unescape(String(parts[4])) == path { found = String(parts[dash + 1]) }
        }
        return found
    }

    /// mountinfo escapes space, tab, newline and backslash as octal.
    static func unescape(_ s: String) -> String {
        var out = [UInt8]()
        let b = Array(s.utf8)
        var i = 0
        while i < b.count {
            if b[i] == UInt8(ascii: "\\"), i + 3 < b.count, let v = UInt8(String(decoding: b[i + 1...i + 3], as: UTF8.self), radix: 8) {
                out.append(v); i += 4
            } else { out.append(b[i]); i += 1 }
        }
        return String(decoding: out, as: UTF8.self)
    }
}

/// A /proc file read to its end. Foundation's `String(contentsOfFile:)` trusts the size stat
/// reports, 0 for these, and returned only the first 4 KiB: on a machine with more than ~40
/// mounts (any Kubernetes node; 22 lab hosts here) `modelfs umount` found no modelfs mount at
/// a mountpoint that had one.
func readProcFile(_ path: String) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var out = [UInt8]()
    var buf = [UInt8](repeating: 0, count: 64 << 10)
    while true {
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 { if errno == EINTR { continue }; return nil }
        if n == 0 { break }
        out += buf[0..<n]
    }
    return String(decoding: out, as: UTF8.self)
}
