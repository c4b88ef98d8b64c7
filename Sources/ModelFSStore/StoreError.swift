import Foundation
import ModelFSCore

/// A block store's failures (`PackBlockStore`, and stores that reach peers).
public typealias StoreError = LayerError<StoreFailure>

public enum StoreFailure: Sendable, Equatable {
    /// The block is not in this store, or on no reachable node (a store that reaches peers).
    case missing
    /// The block's bytes do not hash to its id.
    case corrupt
    /// The store's disk (or a tier) is full, or the store keeps its reserve for metadata.
    case full
    /// A system call on the store's files failed with this errno.
    case system(Int32)
    /// The store's own files disagree (a pack found in two tiers).
    case inconsistent
}

extension LayerError where Kind == StoreFailure {
    /// A failed system call on the store's files, naming the call and the path.
    public static func system(_ op: String, _ path: String, errno e: Int32 = errno) -> StoreError {
        StoreError(e == ENOSPC ? .full : .system(e), "\(op) \(path): \(String(cString: strerror(e)))")
    }
}
