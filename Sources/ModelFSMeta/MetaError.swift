import Foundation
import ModelFSCore

/// A metadata engine's failures, apart from the namespace's POSIX answers (no such file, exists…,
/// which are `FSError`s: the engine's contract is POSIX): the engine could not do what it was
/// asked. The etcd client's own `EtcdError` is the cause where there is one.
public typealias MetaError = LayerError<MetaFailure>

public enum MetaFailure: Sendable, Equatable {
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
