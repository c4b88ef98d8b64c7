import Foundation
import ModelFSCore
import ModelFSMeta
import ModelFSStore

/// What a cluster node is made of, as values: the CLI's flags (`ClusterOptions`) checked and
/// parsed, or a test's choice. Nothing here reads a file or the command line.
public struct ClusterSettings: Sendable {
    /// The peer server's address (HOST:PORT; port 0: any free port) and the one others reach it at.
    public var listen: String
    public var advertise: String?
    public var secret: String
    /// Mutual TLS with the other nodes: PEM files of this node's certificate and key, and the CA.
    public var tls: (cert: String, key: String, ca: String)?
    public var etcdSecurity: EtcdSecurity
    public var policy: ReplicationPolicy
    public var labels: [String: String]
    public var cacheSize: UInt64
    public var fanoutMinSize: UInt64
    public var formatPrefetch: Bool
    public var stagingSize: UInt64
    public var ackTimeout: Double
    /// Chained replication (the writer's link carries each byte once) rather than one PUT per target.
    public var chain: Bool
    public var nodeID: String?
    public var leaseTtl: Int
    public var deadAfter: Double
    public var healInterval: Double
    public var healFullEvery: Double
    public var healScanRate: UInt64
    public var healRate: UInt64
    public var healRateBusy: UInt64
    public var scrubRate: UInt64
    public var scrubEvery: Double
    public var gcDelay: Double
    public var gcSupersededDelay: Double
    public var gcScanRate: UInt64

    /// The defaults of `modelfs mount`'s cluster flags (`ClusterOptions` takes its defaults from
    /// here: one list), with `secret`.
    public static let defaults = ClusterSettings(secret: "")

    public init(secret: String, listen: String = "0.0.0.0:7420") {
        self.secret = secret
        self.listen = listen
        etcdSecurity = EtcdSecurity()
        policy = ReplicationPolicy(replicas: 2, ack: 1)
        labels = [:]
        cacheSize = 8 << 30
        fanoutMinSize = 16 << 20
        formatPrefetch = true
        stagingSize = 16 << 30
        ackTimeout = 60
        chain = true
        leaseTtl = 10
        deadAfter = 60
        healInterval = 30
        healFullEvery = 3600
        healScanRate = 20_000
        healRate = 0
        healRateBusy = 100 << 20
        scrubRate = 16 << 20
        scrubEvery = 86400
        gcDelay = 900
        gcSupersededDelay = 10
        gcScanRate = 10_000
    }

    /// Whether etcd is reached over TLS.
    public var etcdEncrypted: Bool { etcdSecurity.caFile != nil || etcdSecurity.certFile != nil }
}

/// What one mount is made of (`Node`): where its blocks and metadata live and how it reads.
public struct NodeSettings: Sendable {
    public enum Passthrough: Sendable { case on, off(String) }
    public var dataDir: String
    public var meta: String
    /// The kernel's writeback cache (`-o writeback_cache`; never on a cluster node).
    public var writebackCache = false
    /// Read-only opens through flat copies (FUSE passthrough), or why not.
    public var passthrough: Passthrough = .off("not asked for")
    /// The flat copies' byte budget.
    public var flatBudget: UInt64 = 10 << 30
    /// Slower tiers for blocks after the data dir, and the age at which blocks move down.
    public var tiers: [PackBlockStore.Tier] = []
    public var tierAge: Double = 86400
    /// The read-only token of /metrics and /v1/status on a cluster node's peer port.
    public var metricsToken: String?
    /// Set for a cluster node (`meta` is then an etcd URL).
    public var cluster: ClusterSettings?

    public init(dataDir: String, meta: String, cluster: ClusterSettings? = nil) {
        self.dataDir = dataDir
        self.meta = meta
        self.cluster = cluster
    }
}

public func parseHostPort(_ s: String) -> (host: String, port: Int)? {
    guard let i = s.lastIndex(of: ":"), let port = Int(s[s.index(after: i)...]), (0...65535).contains(port) else { return nil }
    let host = String(s[..<i])
    return host.isEmpty ? nil : (host, port)
}

/// Bytes as `parseSize` reads them, in the largest unit that divides them: 8 << 30 → "8G".
public func sizeText(_ n: UInt64) -> String {
    for (suffix, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] where n != 0 && n % (1 << UInt64(shift)) == 0 {
        return "\(n >> UInt64(shift))\(suffix)"
    }
    return String(n)
}

/// "512M", "8G", "1T", "4096" → bytes.
public func parseSize(_ s: String) -> UInt64? {
    let t = s.trimmingCharacters(in: .whitespaces).uppercased()
    let units: [(String, UInt64)] = [("TIB", 1 << 40), ("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10),
                                     ("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)]
    for (suffix, mult) in units where t.hasSuffix(suffix) {
        return Double(t.dropLast(suffix.count)).flatMap { $0 >= 0 ? UInt64($0 * Double(mult)) : nil }
    }
    return UInt64(t)
}

public func parseLabels(_ s: String) -> [String: String]? {
    var out: [String: String] = [:]
    for part in s.split(separator: ",") {
        let kv = part.split(separator: "=", maxSplits: 1)
        guard kv.count == 2, !kv[0].isEmpty else { return nil }
        out[String(kv[0])] = String(kv[1])
    }
    return out
}
