import Foundation
import ModelFSCore
import ModelFSMeta
import Synchronization

/// This node's entry in the cluster and its view of the others (DESIGN.md §2, §5).
///
/// The node registers `/modelfs/NAME/nodes/ID` under an etcd lease of `ttl` seconds and renews
/// it every ttl/3: a node that dies stops renewing and etcd deletes its entry when the lease
/// expires. The list of live nodes is re-read every `refresh` seconds (and on demand), which is
/// what placement and the read path use.
public final class Membership: @unchecked Sendable {
    public let client: EtcdClient
    let prefix: Data
    let ttl: Int
    let refresh: Double
    private struct State {
        var me: NodeInfo
        var lease: Int64 = 0
        var nodes: [NodeInfo] = []
        /// Every node seen since start, live or not (the last entry each published).
        var known: [String: NodeInfo] = [:]
        var lastError: String?
    }
    private let state: Mutex<State>
    private let stopSignal = DispatchSemaphore(value: 0)
    private let stopped = Mutex(false)
    private var thread: Thread?
    /// Fills in the node's usage before each renewal.
    public var usage: (@Sendable () -> (used: UInt64, blocks: UInt64, capacity: UInt64))?

    public init(client: EtcdClient, cluster: String, me: NodeInfo, ttl: Int = 10, refresh: Double = 1) {
        self.client = client
        prefix = Data("/modelfs/\(cluster)/nodes/".utf8)
        self.ttl = ttl
        self.refresh = refresh
        state = Mutex(State(me: me))
    }

    public var me: NodeInfo { state.withLock { $0.me } }
    public var nodes: [NodeInfo] { state.withLock { $0.nodes } }
    /// Live nodes other than this one.
    public var peers: [NodeInfo] { state.withLock { s in s.nodes.filter { $0.id != s.me.id } } }
    public var lastError: String? { state.withLock { $0.lastError } }
    /// The lease this node's registration lives under (0 before start).
    public var lease: Int64 { state.withLock { $0.lease } }

    /// Registers this node and starts renewing; returns once the node list has been read.
    public func start() throws {
        try register()
        try reload()
        let t = Thread { [weak self] in self?.run() }
        t.name = "modelfs-membership"
        thread = t
        t.start()
    }

    /// Registers under a new lease.
    private func register() throws {
        let lease = try client.grantLease(ttl: ttl)
        try register(reusing: lease)
        state.withLock { $0.lease = lease }
    }

    /// Re-reads the live nodes from etcd.
    public func reload() throws {
        let r = try client.rangeAll(prefix: prefix)
        let nodes = r.kvs.compactMap { try? JSONDecoder().decode(NodeInfo.self, from: $0.value) }.sorted { $0.id < $1.id }
        state.withLock { s in
            s.nodes = nodes
            for n in nodes { s.known[n.id] = n }
        }
    }

    /// Nodes seen since start that are not live now (lease expired: dead, or only slow to renew).
    public var lost: [NodeInfo] {
        state.withLock { s in
            let live = Set(s.nodes.map(\.id))
            return s.known.values.filter { !live.contains($0.id) && $0.id != s.me.id }.sorted { $0.id < $1.id }
        }
    }

    private func run() {
        var sinceRenew = 0.0
        while !stopped.withLock({ $0 }) {
            if stopSignal.wait(timeout: .now() + refresh) == .success { break }
            sinceRenew += refresh
            do {
                if sinceRenew >= Double(ttl) / 3 {
                    sinceRenew = 0
                    let lease = state.withLock { $0.lease }
                    if try client.keepAlive(lease: lease) <= 0 {
                        Log.warning("this node's etcd lease expired; registering again")
                        try register()
                    } else if usage != nil {
                        try register(reusing: lease)
                    }
                }
                try reload()
                state.withLock { $0.lastError = nil }
            } catch {
                state.withLock { $0.lastError = "\(error)" }
            }
        }
    }

    /// Updates this node's entry (its usage) under the lease it holds.
    private func register(reusing lease: Int64) throws {
        var me = state.withLock { $0.me }
        if let u = usage?() { me.usedBytes = u.used; me.blocks = u.blocks; me.capacityBytes = u.capacity }
        try client.put(prefix + Data(me.id.utf8), try JSONEncoder().encode(me), lease: lease)
        state.withLock { $0.me = me }
    }

    /// Stops renewing and leaves the cluster at once (revokes the lease).
    public func stop() {
        let was = stopped.withLock { s -> Bool in defer { s = true }; return s }
        if was { return }
        stopSignal.signal()
        let lease = state.withLock { $0.lease }
        if lease != 0 { try? client.revokeLease(lease) }
    }
}
