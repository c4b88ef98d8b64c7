import Foundation
import ModelFSCore

/// The one errno mapping at the FUSE boundary: domain errors carry their errno; anything else
/// is a bug or an unexpected failure, logged and reported as EIO.
func errnoFor(_ error: any Error, op: String) -> Int32 {
    if let e = error as? FSError {
        // The answers of ordinary use (no such file, exists, …) are not news; anything else is.
        let ordinary: Set<Int32> = [ENOENT, EEXIST, ENODATA, ENOTEMPTY, EISDIR, ENOTDIR, EINVAL, ERANGE, EPERM,
                                    EACCES, ENAMETOOLONG, EOPNOTSUPP, ELOOP]
        if !ordinary.contains(e.errno) { Log.error("\(op): \(e)") }
        return e.errno
    }
    Log.error("\(op): unexpected error \(error)")
    return EIO
}
