import Foundation

/// The filesystem's answers in POSIX terms: an errno for the kernel, a message for people, and
/// the error that caused it. The namespace's contract (`MetadataEngine`, `FileSystem`) is POSIX,
/// so its answers — no such file, exists, not empty — are these. Failures below it have their
/// layer's own type (`StoreError`, `MetaError`, `EtcdError`, `PeerError`); ModelFSFUSE's
/// `Errno.answer` maps every one of them to an errno, in one table.
public struct FSError: Error, CustomStringConvertible, Sendable {
    public var errno: Int32
    public var message: String
    /// The failure behind this one (a layer's own error), kept as an error.
    public var cause: (any Error)?

    public init(_ errno: Int32, _ message: String, cause: (any Error)? = nil) {
        self.errno = errno
        self.message = message
        self.cause = cause
    }

    public var description: String {
        var s = "\(message) (errno \(errno))"
        if let cause { s += ": \(cause)" }
        return s
    }

    public static func noEntry(_ what: String = "no such file or directory") -> FSError { FSError(ENOENT, what) }
    public static func exists(_ what: String = "file exists") -> FSError { FSError(EEXIST, what) }
    public static func notDirectory(_ what: String = "not a directory") -> FSError { FSError(ENOTDIR, what) }
    public static func isDirectory(_ what: String = "is a directory") -> FSError { FSError(EISDIR, what) }
    public static func notEmpty(_ what: String = "directory not empty") -> FSError { FSError(ENOTEMPTY, what) }
    public static func invalid(_ what: String) -> FSError { FSError(EINVAL, what) }
    public static func io(_ what: String, cause: (any Error)? = nil) -> FSError { FSError(EIO, what, cause: cause) }
    public static func noData(_ what: String = "no such attribute") -> FSError { FSError(ENODATA, what) }
    public static func noSpace(_ what: String = "no space left on device") -> FSError { FSError(ENOSPC, what) }
    public static func badHandle(_ what: String = "bad file handle") -> FSError { FSError(EBADF, what) }
}

/// A lower layer's failure: what went wrong, as that layer's `Kind` (the caller acts on it, never
/// on the message), a message for people, and the error behind it. `StoreError`, `MetaError` and
/// `ReplicationError` are this with their layer's kinds.
public struct LayerError<Kind: Sendable & Equatable>: Error, CustomStringConvertible {
    public var kind: Kind
    public var message: String
    public var cause: (any Error)?

    public init(_ kind: Kind, _ message: String, cause: (any Error)? = nil) {
        self.kind = kind
        self.message = message
        self.cause = cause
    }

    public var description: String {
        var s = message
        if let cause { s += ": \(cause)" }
        return s
    }
}

/// Wraps a failed syscall's errno into an `FSError` that names the operation and the path.
public func posixError(_ op: String, _ path: String, errno e: Int32 = errno) -> FSError {
    FSError(e, "\(op) \(path): \(String(cString: strerror(e)))")
}
