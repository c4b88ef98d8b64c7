import Foundation

// The wire's own values: what one node tells another about itself and about copies.

/// A node as the cluster knows it: registered in etcd under the node's lease (so it disappears
/// when the node dies), refreshed with its usage.
public struct NodeInfo: Codable, Sendable, Equatable, Hashable {
    public var id: String
    /// host:port of its peer server.
    public var address: String
    public var labels: [String: String]
    public var capacityBytes: UInt64
    public var usedBytes: UInt64
    public var blocks: UInt64
    /// Bytes per second its peer server received and sent, over its last renewal period.
    public var inRate: Double?
    public var outRate: Double?
    public init(id: String, address: String, labels: [String: String] = [:], capacityBytes: UInt64 = 0,
                usedBytes: UInt64 = 0, blocks: UInt64 = 0) {
        self.id = id; self.address = address; self.labels = labels
        self.capacityBytes = capacityBytes; self.usedBytes = usedBytes; self.blocks = blocks
    }
}

/// Blocks one node is to send to others (`POST /v1/copy`).
public struct CopyOrder: Codable, Sendable {
    public struct Item: Codable, Sendable {
        public var id: String
        public var to: [NodeInfo]
        /// The block is down to its last live copy: its copies do not yield to the foreground
        /// (absent from an older node's order: false).
        public var urgent: Bool? = nil
        public init(id: String, to: [NodeInfo], urgent: Bool? = nil) { self.id = id; self.to = to; self.urgent = urgent }
    }
    public var items: [Item]
    public init(items: [Item]) { self.items = items }
}

public struct CopyResult: Codable, Sendable {
    public var copies = 0
    public var bytes: UInt64 = 0
    public var errors: [String] = []
    public init() {}
}
