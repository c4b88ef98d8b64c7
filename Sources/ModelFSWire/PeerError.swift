import Foundation

/// A request to a peer that failed: the peer could not be reached (or is in its back-off after a
/// failure), or it answered with a refusal. The transport's own error (`BlockTransfer`'s, TLS's,
/// AsyncHTTPClient's) is the cause. The cluster's logic above the wire wraps these in the error
/// of the interface it implements (`StoreError` for a block store, `ReplicationError` for
/// replication), so they never reach the filesystem bare.
public struct PeerError: Error, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        /// Connect, send or receive failed, the answer was cut or malformed, or the peer is
        /// skipped for a while after such a failure.
        case unreachable
        /// The peer refused the cluster secret (401).
        case unauthorized
        /// The peer has no room for the block (507).
        case full
        /// The peer answered another failure (its HTTP status) or an answer this client cannot read.
        case refused(Int)
    }
    public var kind: Kind
    /// The peer's id.
    public var node: String
    public var message: String
    public var cause: (any Error)?

    public init(_ kind: Kind, node: String, _ message: String, cause: (any Error)? = nil) {
        self.kind = kind
        self.node = node
        self.message = message
        self.cause = cause
    }

    public var description: String { message }
}
