import Foundation
import ModelFSCore

/// The one errno mapping at the FUSE boundary: domain errors carry their errno; anything else
/// is a bug or an unexpected failure, logged and reported as EIO. A failure that repeats (etcd
/// or every peer unreachable fails every request) is logged once a minute per operation and
/// errno, with a count of the rest; the answers of ordinary use only at `--log-level debug`.
func errnoFor(_ error: any Error, op: String) -> Int32 {
    if let e = error as? FSError {
        // The answers of ordinary use (no such file, exists, …) are not news; anything else is.
        let ordinary: Set<Int32> = [ENOENT, EEXIST, ENODATA, ENOTEMPTY, EISDIR, ENOTDIR, EINVAL, ERANGE, EPERM,
                                    EACCES, ENAMETOOLONG, EOPNOTSUPP, ELOOP]
        if ordinary.contains(e.errno) {
            Log.debug("\(op): \(e)")
        } else {
            Log.every("\(op) \(e.errno)", 60, .error, "\(op): \(e)")
        }
        return e.errno
    }
    Log.every("\(op) unexpected", 60, .error, "\(op): unexpected error \(error)")
    return EIO
}
