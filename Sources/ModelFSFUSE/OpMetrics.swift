import CModelFSPassthrough
import Foundation
import ModelFSCore

/// The FUSE operations as the kernel sends them, timed from request to reply, and the errnos
/// answered, by the /dev/fuse hooks of CModelFSPassthrough (lock-free counters): rendered in the
/// Prometheus text format for `/metrics`.
public enum OpMetrics {
    /// include/uapi/linux/fuse.h's opcodes.
    static let names: [Int: String] = [
        1: "lookup", 2: "forget", 3: "getattr", 4: "setattr", 5: "readlink", 6: "symlink", 8: "mknod", 9: "mkdir",
        10: "unlink", 11: "rmdir", 12: "rename", 13: "link", 14: "open", 15: "read", 16: "write", 17: "statfs",
        18: "release", 20: "fsync", 21: "setxattr", 22: "getxattr", 23: "listxattr", 24: "removexattr", 25: "flush",
        26: "init", 27: "opendir", 28: "readdir", 29: "releasedir", 30: "fsyncdir", 31: "getlk", 32: "setlk",
        33: "setlkw", 34: "access", 35: "create", 36: "interrupt", 37: "bmap", 38: "destroy", 39: "ioctl", 40: "poll",
        41: "notify_reply", 42: "batch_forget", 43: "fallocate", 44: "readdirplus", 45: "rename2", 46: "lseek",
        47: "copy_file_range", 48: "setupmapping", 49: "removemapping", 50: "syncfs", 51: "tmpfile", 52: "statx",
    ]

    static let errnoNames: [Int32: String] = [
        EPERM: "EPERM", ENOENT: "ENOENT", EINTR: "EINTR", EIO: "EIO", EBADF: "EBADF", EAGAIN: "EAGAIN",
        ENOMEM: "ENOMEM", EACCES: "EACCES", EBUSY: "EBUSY", EEXIST: "EEXIST", EXDEV: "EXDEV", ENOTDIR: "ENOTDIR",
        EISDIR: "EISDIR", EINVAL: "EINVAL", EMFILE: "EMFILE", ETXTBSY: "ETXTBSY", EFBIG: "EFBIG", ENOSPC: "ENOSPC",
        EROFS: "EROFS", EMLINK: "EMLINK", ERANGE: "ERANGE", ENAMETOOLONG: "ENAMETOOLONG", ENOSYS: "ENOSYS",
        ENOTEMPTY: "ENOTEMPTY", ELOOP: "ELOOP", ENODATA: "ENODATA", EOPNOTSUPP: "EOPNOTSUPP", ETIMEDOUT: "ETIMEDOUT",
        ECONNREFUSED: "ECONNREFUSED", ESTALE: "ESTALE", EDQUOT: "EDQUOT", ENOTCONN: "ENOTCONN", EOVERFLOW: "EOVERFLOW",
    ]

    public struct Snapshot {
        /// Per operation: requests answered and their total seconds.
        public var ops: [String: (count: UInt64, seconds: Double)] = [:]
        /// Per errno name: error answers.
        public var errors: [String: UInt64] = [:]
        var buckets: [String: [UInt64]] = [:]
    }

    public static func snapshot() -> Snapshot {
        let width = Int(MODELFS_OP_BUCKETS) + 1
        var counts = [UInt64](repeating: 0, count: Int(MODELFS_OPS) * width)
        var nanos = [UInt64](repeating: 0, count: Int(MODELFS_OPS))
        var errnos = [UInt64](repeating: 0, count: Int(MODELFS_ERRNOS))
        modelfs_ops_snapshot(&counts, &nanos, &errnos)
        var s = Snapshot()
        for op in 0..<Int(MODELFS_OPS) {
            let row = Array(counts[op * width..<(op + 1) * width])
            let n = row.reduce(0, +)
            guard n > 0 else { continue }
            let name = names[op] ?? "op\(op)"
            s.ops[name] = (n, Double(nanos[op]) / 1e9)
            s.buckets[name] = row
        }
        for (e, n) in errnos.enumerated() where n > 0 {
            s.errors[errnoNames[Int32(e)] ?? "errno\(e)"] = n
        }
        return s
    }

    public static func render() -> String {
        let s = snapshot()
        let bounds = (0..<Int(MODELFS_OP_BUCKETS)).map { Double(modelfs_ops_bucket_ns(Int32($0))) / 1e9 }
        var out = "# HELP modelfs_fuse_op_seconds FUSE requests from the kernel, request to reply.\n# TYPE modelfs_fuse_op_seconds histogram\n"
        for (op, row) in s.buckets.sorted(by: { $0.key < $1.key }) {
            out += Histogram(bounds: bounds, counts: row, sum: s.ops[op]!.seconds).render("modelfs_fuse_op_seconds", labels: "op=\"\(op)\"")
        }
        out += "# HELP modelfs_fuse_errors_total FUSE replies with an error, by errno.\n# TYPE modelfs_fuse_errors_total counter\n"
        for (e, n) in s.errors.sorted(by: { $0.key < $1.key }) { out += "modelfs_fuse_errors_total{errno=\"\(e)\"} \(n)\n" }
        return out
    }
}
