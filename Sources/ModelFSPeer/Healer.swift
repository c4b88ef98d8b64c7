import Foundation
import ModelFS
import ModelFSCore
import ModelFSMeta
import ModelFSStore
import Synchronization

/// What the cluster's healer last found and did (`modelfs status`, kept in etcd at
/// `/modelfs/NAME/n/heal` so every node shows it).
public struct HealStatus: Codable, Sendable, Equatable {
    /// The node running the passes.
    public var healer = ""
    public var passes = 0
    /// End of the last complete pass (Unix seconds) and how long it took.
    public var lastPassAt: Double = 0
    public var lastPassSeconds: Double = 0
    public var running = false
    public var files = 0
    public var blocks = 0
    public var bytes: UInt64 = 0
    /// Blocks (and their bytes) with fewer than their policy's R copies on live, undrained nodes.
    public var underReplicatedBlocks = 0
    public var underReplicatedBytes: UInt64 = 0
    /// Blocks that no live node holds: unreadable until a node that has them comes back.
    public var unreadableBlocks = 0
    public var unreadableBytes: UInt64 = 0
    /// Copies made since this healer started, and the rate of the last pass that made some.
    public var copiedBlocks: UInt64 = 0
    public var copiedBytes: UInt64 = 0
    public var copyRate: Double = 0
    /// Copies dropped (from draining nodes, or surplus) once enough others were confirmed.
    public var removedCopies: UInt64 = 0
    /// Copies the last pass made to rebalance toward under-filled nodes.
    public var rebalanceCopies = 0
    /// Draining node → referenced blocks it still holds.
    public var draining: [String: Int] = [:]
    /// Down nodes within --dead-after: repairs wait for them to come back or be declared dead.
    public var waitingFor: [String] = []
    public var lastError: String?
}

/// Brings every block back to R verified copies (DESIGN.md §5) after a node dies, and moves
/// copies off draining nodes. One node at a time runs it: the one that holds the etcd key
/// `/modelfs/NAME/n/healer` under its lease (if it dies, another takes over).
///
/// A pass: walk the namespace (every committed file, its blocks, the policy of its directory),
/// ask every live node which of the blocks it holds (batched `has`), then for each block short
/// of R copies on live undrained nodes copy it, fewest copies first, from a holder to the next
/// nodes in its placement order; and for each block held by a draining node that already has R
/// copies elsewhere, drop the draining node's copy. Copies are checked by `has` before anything
/// is dropped, so a block never has fewer copies than before. Files changed within
/// `settle` seconds are left to their writer's own replication.
public final class Healer: @unchecked Sendable {
    let fs: FileSystem
    let replicator: Replicator
    let membership: Membership
    let client: PeerClient
    let local: PackBlockStore
    let etcd: EtcdClient
    let leaderKey: Data
    let statusKey: Data
    let interval: Double
    let deadAfter: Double
    let width: Int
    /// Bytes rebalancing copies per pass at most.
    static let moveBudget: UInt64 = 1 << 30
    private let state = Mutex(HealStatus())
    private let stopped = Mutex(false)
    private let wake = DispatchSemaphore(value: 0)
    private let done = DispatchSemaphore(value: 0)
    private var started = false

    public init(fs: FileSystem, replicator: Replicator, membership: Membership, client: PeerClient, local: PackBlockStore,
                etcd: EtcdClient, cluster: String, interval: Double, deadAfter: Double, width: Int = 8) {
        self.fs = fs
        self.replicator = replicator
        self.membership = membership
        self.client = client
        self.local = local
        self.etcd = etcd
        leaderKey = Data("/modelfs/\(cluster)/n/healer".utf8)
        statusKey = Data("/modelfs/\(cluster)/n/heal".utf8)
        self.interval = interval
        self.deadAfter = deadAfter
        self.width = width
    }

    /// This node's own view (meaningful on the healer).
    public var localStatus: HealStatus { state.withLock { $0 } }

    /// The cluster's: the healer's last published status.
    public func clusterStatus() -> HealStatus? {
        guard let v = try? etcd.range(statusKey).kvs.first?.value else { return nil }
        return try? JSONDecoder().decode(HealStatus.self, from: v)
    }

    public func start() {
        started = true
        let t = Thread { [weak self] in self?.run() }
        t.name = "modelfs-healer"
        t.start()
    }

    public func stop() {
        stopped.withLock { $0 = true }
        wake.signal()
        if started { _ = done.wait(timeout: .now() + 15) }
    }

    /// Starts a pass now (if this node is the healer).
    public func poke() { wake.signal() }

    private func run() {
        defer { done.signal() }
        while !stopped.withLock({ $0 }) {
            if isLeader() {
                do { try pass() } catch {
                    state.withLock { $0.lastError = "\(error)"; $0.running = false }
                    publish()
                }
            }
            if wake.wait(timeout: .now() + interval) == .success, stopped.withLock({ $0 }) { break }
        }
    }

    /// Takes or keeps the healer key (under this node's lease).
    func isLeader() -> Bool {
        let me = Data(membership.me.id.utf8)
        let lease = membership.lease
        guard lease != 0 else { return false }
        guard let r = try? etcd.txn(compare: [.absent(leaderKey)], success: [.put(leaderKey, me, lease: lease)],
                                    failure: [.get(leaderKey)], idempotent: true) else { return false }
        return r.succeeded || r.ranges.first?.first?.value == me
    }

    /// What a block needs: the most copies any file that references it asks for.
    public struct Want: Sendable {
        public var copies: Int
        public var length: UInt32
        public var spread: String?
        /// False while a file that references it was changed within `deadAfter` (its writer
        /// is still replicating it).
        public var settled: Bool
        public init(copies: Int, length: UInt32, spread: String?, settled: Bool) {
            self.copies = copies; self.length = length; self.spread = spread; self.settled = settled
        }
    }

    /// One pass over the whole namespace.
    public func pass() throws {
        let began = Date()
        state.withLock { $0.running = true; $0.healer = membership.me.id }
        var want: [BlockID: Want] = [:]
        var files = 0
        let now = Timestamp.now().totalNanoseconds
        try fs.walkFiles(from: .root) { f in
            files += 1
            let p = replicator.policy(for: f.parent)
            let settled = Double(now - f.mtime.totalNanoseconds) / 1e9 >= deadAfter
            for c in f.blocks {
                var w = want[c.id] ?? Want(copies: 0, length: c.length, spread: p.spread, settled: true)
                w.copies = max(w.copies, p.replicas)
                w.settled = w.settled && settled
                want[c.id] = w
            }
        }
        let down = membership.down
        let waiting = down.filter { $0.seconds < deadAfter }.map(\.node.id)
        let plan = try repair(want, act: waiting.isEmpty)
        let elapsed = Date().timeIntervalSince(began)
        state.withLock { s in
            s.running = false
            s.passes += 1
            s.lastPassAt = Date().timeIntervalSince1970
            s.lastPassSeconds = elapsed
            s.files = files
            s.blocks = want.count
            s.bytes = want.values.reduce(0) { $0 + UInt64($1.length) }
            s.underReplicatedBlocks = plan.short
            s.underReplicatedBytes = plan.shortBytes
            s.unreadableBlocks = plan.unreadable
            s.unreadableBytes = plan.unreadableBytes
            s.draining = plan.draining
            s.rebalanceCopies = plan.moves
            s.waitingFor = waiting
            if plan.copiedBytes > 0 { s.copyRate = Double(plan.copiedBytes) / max(plan.copySeconds, 0.001) }
            s.lastError = plan.errors.first
        }
        publish()
    }

    public struct Plan: Sendable {
        public var short = 0, shortBytes: UInt64 = 0, unreadable = 0, unreadableBytes: UInt64 = 0
        public var draining: [String: Int] = [:]
        public var copiedBytes: UInt64 = 0, copySeconds = 0.0
        /// Copies made toward an under-filled node (rebalancing).
        public var moves = 0
        public var errors: [String] = []
    }

    /// Finds what `want` lacks on the live nodes and, with `act`, copies and drops to fix it.
    /// Also used by `modelfs verify` for the blocks under a path.
    public func repair(_ want: [BlockID: Want], act: Bool) throws -> Plan {
        var plan = Plan()
        let ids = Array(want.keys)
        let (holders, failed) = replicator.census(ids)
        if !failed.isEmpty { plan.errors.append("nodes \(failed.joined(separator: ",")) did not answer which blocks they hold") }
        let draining = membership.draining
        let live = membership.nodes
        let byID = Dictionary(live.map { ($0.id, $0) }, uniquingKeysWith: { a, _ in a })
        let targetsPool = live.filter { !draining.contains($0.id) }
        var copies: [(id: BlockID, have: Int, from: [NodeInfo], to: [NodeInfo])] = []
        var drops: [(BlockID, NodeInfo)] = []
        var moveCandidates: [(BlockID, UInt32, NodeInfo)] = []
        for (id, w) in want {
            let h = holders[id] ?? []
            let good = h.filter { !draining.contains($0) }
            for d in h where draining.contains(d) { plan.draining[d, default: 0] += 1 }
            if h.isEmpty {
                plan.unreadable += 1
                plan.unreadableBytes += UInt64(w.length)
                continue
            }
            if good.count < w.copies {
                plan.short += 1
                plan.shortBytes += UInt64(w.length)
                guard w.settled || draining.contains(where: { h.contains($0) }) else { continue }
                let to = Placement.targets(id, nodes: targetsPool, replicas: targetsPool.count, writer: nil, spreadLabel: w.spread)
                    .filter { !h.contains($0.id) }.prefix(w.copies - good.count)
                if !to.isEmpty { copies.append((id, good.count, h.compactMap { byID[$0] }, Array(to))) }
                continue
            }
            // Enough copies: only with every node's answer is anything dropped or moved.
            guard failed.isEmpty, w.settled else { continue }
            for d in h where draining.contains(d) { if let n = byID[d] { drops.append((id, n)) } }
            let top = Placement.targets(id, nodes: targetsPool, replicas: w.copies, writer: nil, spreadLabel: w.spread)
            if good.count > w.copies {
                // Surplus (a node came back after its blocks were copied elsewhere, or a move
                // below made its new copy): drop copies outside the block's placement, fullest
                // node first, down to R.
                let extra = good.filter { g in !top.contains { $0.id == g } }
                    .compactMap { byID[$0] }.sorted { $0.usedBytes > $1.usedBytes }.prefix(good.count - w.copies)
                for n in extra { drops.append((id, n)) }
            } else if let t = top.first(where: { !h.contains($0.id) }) {
                moveCandidates.append((id, w.length, t))
            }
        }
        // Rebalancing (a node joined, or is far below the others): once nothing is short,
        // blocks whose placement names an under-filled node are copied to it, a bounded amount
        // per pass; the copy outside their placement is dropped in a later pass, after `has`
        // confirmed the new one.
        if plan.short == 0, !targetsPool.isEmpty {
            let mean = Double(targetsPool.reduce(UInt64(0)) { $0 + $1.usedBytes }) / Double(targetsPool.count)
            var incoming: [String: UInt64] = [:]
            var budget = Self.moveBudget
            for (id, length, t) in moveCandidates where budget > 0 {
                let after = Double(t.usedBytes + incoming[t.id, default: 0] + UInt64(length))
                guard after < mean * 0.8 else { continue }
                incoming[t.id, default: 0] += UInt64(length)
                budget -= min(budget, UInt64(length))
                copies.append((id: id, have: Int.max, from: (holders[id] ?? []).compactMap { byID[$0] }, to: [t]))
                plan.moves += 1
            }
        }
        for d in draining where plan.draining[d] == nil && byID[d] != nil { plan.draining[d] = 0 }
        guard act else { return plan }
        // Fewest copies first: a block down to one copy is one failure away from loss.
        copies.sort { $0.have < $1.have }
        let started = Date()
        let sent = Shared<UInt64>(0)
        let errors = Shared<[String]>([])
        let list = copies
        let me = membership.me.id
        parallelFor(list.count, width: width) { [self] i in
            let c = list[i]
            guard let b = read(c.id, from: c.from) else {
                errors.withLock { $0.append("no holder of block \(c.id.hex) sent a good copy") }
                return
            }
            for node in c.to {
                do {
                    if node.id == me {
                        try b.withUnsafeBytes { _ = try local.put(c.id, $0) }
                        try local.sync([c.id])
                    } else {
                        try b.withUnsafeBytes { try client.put(c.id, $0, to: node, durable: true) }
                    }
                    sent.withLock { $0 += UInt64(b.count) }
                    state.withLock { $0.copiedBlocks += 1; $0.copiedBytes += UInt64(b.count) }
                } catch {
                    errors.withLock { $0.append("copy of \(c.id.hex) to \(node.id): \(error)") }
                }
            }
        }
        plan.copiedBytes = sent.get()
        plan.copySeconds = Date().timeIntervalSince(started)
        let drop = drops
        parallelFor(drop.count, width: width) { [self] i in
            let (id, node) = drop[i]
            do {
                if node.id == me { try local.remove(id) } else { _ = try client.delete(id, at: node) }
                state.withLock { $0.removedCopies += 1 }
            } catch {
                errors.withLock { $0.append("drop of \(id.hex) on \(node.id): \(error)") }
            }
        }
        plan.errors += errors.get()
        return plan
    }

    /// A verified copy of `id` from this node or one of `holders`.
    func read(_ id: BlockID, from holders: [NodeInfo]) -> BlockBuffer? {
        if local.contains(id), let b = try? local.read(id) { return b }
        for n in holders where n.id != membership.me.id {
            if let b = try? client.get(id, from: n) { return b }
        }
        return nil
    }

    func publish() {
        let s = state.withLock { $0 }
        if let data = try? JSONEncoder().encode(s) { try? etcd.put(statusKey, data) }
    }
}
