import Foundation
import ModelFSCore
import ModelFSWire
import ModelFSMeta
import Synchronization

/// This node's entry in the cluster and its view of the others (DESIGN.md §2, §5).
///
/// The node registers `/modelfs/NAME/nodes/ID` under an etcd lease of `ttl` seconds and renews
/// it every ttl/3: a node that dies stops renewing and etcd deletes its entry when the lease
/// expires. It also records itself once under `members/ID` (no lease): the cluster's roster, so
/// a node that died stays listed as down, on every node and across restarts, until an operator
/// removes it (`modelfs node remove`). `drain/ID` marks a node being drained: placement gives it
/// no new copies. The lists are re-read every `refresh` seconds (and on demand), which is what
/// placement, healing and the read path use.
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
        /// Known nodes not live now, and since when this node has seen them so.
        var downSince: [String: Date] = [:]
        var draining: Set<String> = []
        var lastError: String?
    }
    private let state: Mutex<State>
    private let loop = BackgroundLoop("modelfs-membership")
    /// Seconds since the lease was last renewed (the loop's own).
    private var sinceRenew = 0.0
    /// What the node publishes of itself with each renewal: its store's use and its traffic.
    public typealias Usage = @Sendable () -> (used: UInt64, blocks: UInt64, capacity: UInt64, bytesIn: UInt64, bytesOut: UInt64)
    let usage: Usage?
    private var lastTraffic: (at: Date, bytesIn: UInt64, bytesOut: UInt64)?

    let membersPrefix: Data
    let drainPrefix: Data
    let keys: EtcdKeys

    public init(client: EtcdClient, cluster: String, me: NodeInfo, ttl: Int = 10, refresh: Double = 1, usage: Usage? = nil) {
        self.client = client
        self.usage = usage
        keys = EtcdKeys(cluster: cluster)
        prefix = keys.nodes
        membersPrefix = keys.members
        drainPrefix = keys.drain
        self.ttl = ttl
        self.refresh = refresh
        state = Mutex(State(me: me))
    }

    public var me: NodeInfo { state.withLock { $0.me } }
    public var nodes: [NodeInfo] { state.withLock { $0.nodes } }
    /// Live nodes other than this one.
    public var peers: [NodeInfo] { state.withLock { s in s.nodes.filter { $0.id != s.me.id } } }
    /// Live nodes that take new copies: not being drained (this node always, for its own writes).
    public var placementNodes: [NodeInfo] {
        state.withLock { s in
            var out = s.nodes.filter { !s.draining.contains($0.id) || $0.id == s.me.id }
            if !out.contains(where: { $0.id == s.me.id }) { out.append(s.me) }
            return out
        }
    }
    /// Nodes being drained.
    public var draining: Set<String> { state.withLock { $0.draining } }
    /// Every node of the roster and seen since start, live or not.
    public var known: [NodeInfo] { state.withLock { s in s.known.values.sorted { $0.id < $1.id } } }
    /// Nodes known but not live, with how long this node has seen them down.
    public var down: [(node: NodeInfo, seconds: Double)] {
        state.withLock { s in
            s.downSince.compactMap { id, since in s.known[id].map { ($0, -since.timeIntervalSinceNow) } }.sorted { $0.node.id < $1.node.id }
        }
    }
    public var lastError: String? { state.withLock { $0.lastError } }
    /// The lease this node's registration lives under (0 before start).
    public var lease: Int64 { state.withLock { $0.lease } }

    /// Takes `key` for this node under its lease if no node holds it, or finds it held by this
    /// node already: one node at a time does a cluster's job (the healer, GC's scanner), and the
    /// key goes with the lease of a node that dies.
    public func holds(_ key: Data) -> Bool {
        let me = Data(self.me.id.utf8)
        let lease = self.lease
        guard lease != 0 else { return false }
        guard let r = try? client.txn(compare: [.absent(key)], success: [.put(key, me, lease: lease)],
                                      failure: [.get(key)], idempotent: true) else { return false }
        return r.succeeded || r.ranges.first?.first?.value == me
    }

    /// Registers this node and starts renewing; returns once the node list has been read.
    public func start() throws {
        try client.put(keys.member(me.id), try JSONEncoder().encode(me))
        try register()
        try reload()
        loop.start(after: refresh) { [weak self] in
            guard let self else { return 0 }
            self.round()
            return self.refresh
        }
    }

    /// Registers under a new lease.
    private func register() throws {
        let lease = try client.grantLease(ttl: ttl)
        try register(reusing: lease)
        state.withLock { $0.lease = lease }
    }

    private let registering = NSLock()

    /// The lease `lost` expired (a keep-alive found it gone, or etcd refused a put under it:
    /// "requested lease not found", when an overloaded etcd let it lapse): registers again under
    /// a new one, unless another caller did already; returns the lease to use now.
    public func renewLease(lost: Int64) throws -> Int64 {
        registering.lock(); defer { registering.unlock() }
        if lease != lost { return lease }
        Log.warning("this node's etcd lease expired; registering again")
        try register()
        return lease
    }

    /// Re-reads the live nodes from etcd.
    public func reload() throws {
        let r = try client.rangeAll(prefix: prefix)
        let nodes = r.kvs.compactMap { try? JSONDecoder().decode(NodeInfo.self, from: $0.value) }.sorted { $0.id < $1.id }
        let members = try client.rangeAll(prefix: membersPrefix).kvs.compactMap { try? JSONDecoder().decode(NodeInfo.self, from: $0.value) }
        let draining = Set(try client.rangeAll(prefix: drainPrefix, keysOnly: true).kvs.map {
            String(decoding: $0.key.dropFirst(drainPrefix.count), as: UTF8.self)
        })
        state.withLock { s in
            s.nodes = nodes
            s.draining = draining
            let roster = Set(members.map(\.id))
            // A node removed from the roster is forgotten (unless it is live again).
            for id in s.known.keys where !roster.contains(id) && !nodes.contains(where: { $0.id == id }) && id != s.me.id {
                s.known[id] = nil
            }
            for n in members where s.known[n.id] == nil { s.known[n.id] = n }
            for n in nodes { s.known[n.id] = n }
            let live = Set(nodes.map(\.id))
            for id in s.known.keys where id != s.me.id {
                if live.contains(id) { s.downSince[id] = nil } else if s.downSince[id] == nil { s.downSince[id] = Date() }
            }
            for id in s.downSince.keys where s.known[id] == nil { s.downSince[id] = nil }
        }
    }

    /// Known nodes that are not live now (lease expired: dead, or only slow to renew).
    public var lost: [NodeInfo] {
        state.withLock { s in
            let live = Set(s.nodes.map(\.id))
            return s.known.values.filter { !live.contains($0.id) && $0.id != s.me.id }.sorted { $0.id < $1.id }
        }
    }

    /// Marks a node as draining (or not): placement stops giving it copies, healing moves its
    /// copies elsewhere.
    public func setDraining(_ id: String, _ on: Bool) throws {
        if on { try client.put(keys.drain(id), Data("1".utf8)) } else { try client.delete(keys.drain(id)) }
        try reload()
    }

    /// Takes a node off the roster. Refused while it is live.
    public func remove(_ id: String) throws {
        try reload()
        if nodes.contains(where: { $0.id == id }) {
            throw FSError(EBUSY, "node \(id) is up; drain it (modelfs node drain \(id)), stop it, then remove it")
        }
        guard known.contains(where: { $0.id == id }) else { throw FSError.noEntry("no node \(id) in this cluster") }
        _ = try client.txn(compare: [], success: [.delete(keys.member(id)), .delete(keys.drain(id))])
        try reload()
    }

    /// Every `refresh` seconds: renew the lease (every third of its TTL), read the node list.
    private func round() {
        sinceRenew += refresh
        do {
            if sinceRenew >= Double(ttl) / 3 {
                sinceRenew = 0
                let lease = state.withLock { $0.lease }
                if try client.keepAlive(lease: lease) <= 0 {
                    _ = try renewLease(lost: lease)
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

    /// Updates this node's entry (its usage) under the lease it holds.
    private func register(reusing lease: Int64) throws {
        var me = state.withLock { $0.me }
        if let u = usage?() {
            me.usedBytes = u.used; me.blocks = u.blocks; me.capacityBytes = u.capacity
            let now = Date()
            if let last = lastTraffic, now.timeIntervalSince(last.at) > 0.1 {
                let dt = now.timeIntervalSince(last.at)
                me.inRate = Double(u.bytesIn &- last.bytesIn) / dt
                me.outRate = Double(u.bytesOut &- last.bytesOut) / dt
            }
            lastTraffic = (now, u.bytesIn, u.bytesOut)
        }
        try client.put(keys.node(me.id), try JSONEncoder().encode(me), lease: lease)
        state.withLock { $0.me = me }
    }

    /// Stops renewing and leaves the cluster at once (revokes the lease).
    public func stop() {
        if loop.isStopped { return }
        loop.stop(timeout: 0)   // not waiting: a round blocked on an unreachable etcd would hold the exit
        let lease = state.withLock { $0.lease }
        if lease != 0 { try? client.revokeLease(lease) }
    }
}
