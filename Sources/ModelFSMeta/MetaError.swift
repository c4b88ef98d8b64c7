import Foundation

/// A metadata engine's failures, apart from the namespace's POSIX answers (no such file, exists…,
/// which are `FSError`s: the engine's contract is POSIX): the engine could not do what it was
/// asked. The etcd client's own `EtcdError` is the cause where there is one.
public struct MetaError: Error, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        /// The engine cannot be reached, or a commit's outcome cannot be learnt.
        case unavailable
        /// A transaction kept conflicting with other writers, or no consistent snapshot was found.
        case conflict
        /// The engine's storage is full (SQLite's disk, etcd's quota).
        case full
        /// A stored record cannot be read, or the tree it describes is impossible (a cycle).
        case corrupt
        /// A commit refused because this node no longer holds the file's write lock.
        case fenced
        /// Any other failure of the database itself.
        case database
    }
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
