import Foundation
import ModelFS
import ModelFSCore
import ModelFSMeta
import ModelFSStore

/// The one errno mapping at the FUSE boundary. Every layer throws its own error type; this is
/// the only place that turns them into the kernel's errno (tested row by row in ErrnoTests):
///
/// | error | errno |
/// |---|---|
/// | `FSError` (the namespace's POSIX answers, and the filesystem's own) | its `errno` |
/// | `StoreError` `.full` | ENOSPC |
/// | `StoreError` `.system(e)` | e for ENOSPC, EDQUOT, EROFS; else EIO |
/// | `StoreError` `.missing`, `.corrupt`, `.inconsistent` | EIO (never wrong bytes) |
/// | `MetaError` `.full` | ENOSPC |
/// | `MetaError` `.unavailable`, `.conflict`, `.corrupt`, `.fenced`, `.database` | EIO |
/// | `EtcdError` (any) | EIO |
/// | `ReplicationError` (copies not durable in time, journal) | EIO |
/// | anything else (a bug, or a lower layer's error that escaped its wrapper) | EIO, logged as unexpected |
public enum Errno {
    /// The errno for `error`, and whether it is an answer of ordinary use (no such file,
    /// exists…: not news, logged only at debug level).
    public static func answer(_ error: any Error) -> (errno: Int32, ordinary: Bool, expected: Bool) {
        switch error {
        case let e as FSError:
            return (e.errno, ordinary.contains(e.errno), true)
        case let e as StoreError:
            switch e.kind {
            case .full: return (ENOSPC, false, true)
            case .system(let n) where [ENOSPC, EDQUOT, EROFS].contains(n): return (n, false, true)
            case .system, .missing, .corrupt, .inconsistent: return (EIO, false, true)
            }
        case let e as MetaError:
            return (e.kind == .full ? ENOSPC : EIO, false, true)
        case is EtcdError, is ReplicationError:
            return (EIO, false, true)
        default:
            return (EIO, false, false)
        }
    }

    /// The answers of ordinary use.
    static let ordinary: Set<Int32> = [ENOENT, EEXIST, ENODATA, ENOTEMPTY, EISDIR, ENOTDIR, EINVAL, ERANGE, EPERM,
                                       EACCES, ENAMETOOLONG, EOPNOTSUPP, ELOOP]
}

/// `Errno.answer`, logged: anything but an ordinary answer is logged once a minute per operation
/// and errno, with a count of the rest (etcd or every peer unreachable fails every request);
/// ordinary answers only at `--log-level debug`.
func errnoFor(_ error: any Error, op: String) -> Int32 {
    let a = Errno.answer(error)
    if a.ordinary {
        Log.debug("\(op): \(error)")
    } else if a.expected {
        Log.every("\(op) \(a.errno)", 60, .error, "\(op): \(error)" + (error is FSError ? "" : " (errno \(a.errno))"))
    } else {
        Log.every("\(op) unexpected", 60, .error, "\(op): unexpected error \(error)")
    }
    return a.errno
}
