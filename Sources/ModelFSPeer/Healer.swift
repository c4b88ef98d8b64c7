import Foundation
import ModelFS
import ModelFSCore
import ModelFSWire
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
    /// Blocks (and their bytes) with fewer than their policy's R copies on live, undrained nodes
    /// (blocks of files written within --dead-after are left to their writer and not counted).
    public var underReplicatedBlocks = 0
    public var underReplicatedBytes: UInt64 = 0
    /// Blocks that no live node holds: unreadable until a node that has them comes back.
    public var unreadableBlocks = 0
    public var unreadableBytes: UInt64 = 0
    /// Copies made since this healer started, and the rate of the last pass that made some.
    public var copiedBlocks: UInt64 = 0
    public var copiedBytes: UInt64 = 0
    public var copyRate: Double = 0
    /// The healer's --heal-rate: bytes per second of copies at most (0: no cap).
    public var rateCap: UInt64 = 0
    /// Copies dropped (from draining nodes, or surplus) once enough others were confirmed.
    public var removedCopies: UInt64 = 0
    /// Copies the last pass made to rebalance toward under-filled nodes.
    public var rebalanceCopies = 0
    /// Draining node → referenced blocks it still holds.
    public var draining: [String: Int] = [:]
    /// Down nodes within --dead-after: repairs wait for them to come back or be declared dead.
    public var waitingFor: [String] = []
    public var lastError: String?
    /// Why the last pass ran ("the cluster changed", "periodic", …).
    public var lastReason: String?
    /// When (seconds since 1970) the healer passes again if the cluster does not change.
    public var nextPassAt: Double = 0

    public init() {}

    /// Every field may be missing: the record in etcd may come from a node running an older
    /// version (one without `rateCap`, say), and such a record must still show in `status`
    /// (the synthesized decoder refused it whole, and status showed no healer at all).
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        func v<T: Decodable>(_ key: CodingKeys, _ fallback: T) throws -> T { try c.decodeIfPresent(T.self, forKey: key) ?? fallback }
        healer = try v(.healer, "")
        passes = try v(.passes, 0)
        lastPassAt = try v(.lastPassAt, 0)
        lastPassSeconds = try v(.lastPassSeconds, 0)
        running = try v(.running, false)
        files = try v(.files, 0)
        blocks = try v(.blocks, 0)
        bytes = try v(.bytes, 0)
        underReplicatedBlocks = try v(.underReplicatedBlocks, 0)
        underReplicatedBytes = try v(.underReplicatedBytes, 0)
        unreadableBlocks = try v(.unreadableBlocks, 0)
        unreadableBytes = try v(.unreadableBytes, 0)
        copiedBlocks = try v(.copiedBlocks, 0)
        copiedBytes = try v(.copiedBytes, 0)
        copyRate = try v(.copyRate, 0)
        rateCap = try v(.rateCap, 0)
        removedCopies = try v(.removedCopies, 0)
        rebalanceCopies = try v(.rebalanceCopies, 0)
        draining = try v(.draining, [:])
        waitingFor = try v(.waitingFor, [])
        lastError = try c.decodeIfPresent(String.self, forKey: .lastError)
        lastReason = try c.decodeIfPresent(String.self, forKey: .lastReason)
        nextPassAt = try v(.nextPassAt, 0)
    }
}

/// Brings every block back to R verified copies (DESIGN.md §5) after a node dies, and moves
/// copies off draining nodes. One node at a time runs it: the one that holds the etcd key
/// `/modelfs/NAME/n/healer` under its lease (if it dies, another takes over).
///
/// A pass reads the whole namespace, so passes run only when there can be something to do
/// (DESIGN.md §5a): when the cluster's situation changed (a node joined, went down, was declared
/// dead after `--dead-after`, started or stopped draining, left the roster), when the last pass
/// copied or dropped anything or saw an error (the next one checks it), when asked (`poke`), or
/// every `fullEvery` seconds (anti-entropy: a writer's journal lost with its disk). Otherwise the
/// healer only keeps its key every `interval`: an idle cluster's etcd traffic does not grow with
/// its namespace. The walk itself reads at most `scanRate` files a second.
///
/// A pass: walk the namespace (every committed file, its blocks, the policy of its directory),
/// ask every live node which of the blocks it holds (batched `has`), then for each block short
/// of R copies on live undrained nodes copy it, fewest copies first, from a holder to the next
/// nodes in its placement order; and for each block held by a draining node that already has R
/// copies elsewhere, drop the draining node's copy. Copies are checked by `has` before anything
/// is dropped, so a block never has fewer copies than before. Files changed within
/// `settle` seconds are left to their writer's own replication.
public final class Healer: Sendable {
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
    /// Bytes per second of copies, over all holders together, at most (0: no cap).
    let rate: UInt64
    /// This node's: copies it sends wait while it serves the foreground.
    let yield: ForegroundYield?
    /// A node holding less than this share of the median node's bytes is under-filled and
    /// receives copies of the blocks whose placement names it, until it holds that share. The
    /// median, not the mean: a node that writes everything (one trainer) keeps a copy of all it
    /// writes, which lifts the mean well above what the other nodes hold (about 2/(N-1) of it
    /// each at R=3); measured against the mean they all looked under-filled (so the old rule
    /// stopped a joining node at half the mean: half its share). Against the median, the others
    /// are level, and a node that just joined fills to 0.9 of them (`modelfs debug simulate`).
    static let underFilled = 0.9
    /// Bytes rebalancing copies per pass at most.
    public static let moveBudget: UInt64 = 1 << 30
    let state = Mutex(HealStatus())
    /// Seconds after which a pass runs with nothing changed (anti-entropy).
    let fullEvery: Double
    /// Files a second the walk reads at most (0: no limit).
    let scanRate: UInt64
    /// What the cluster looked like at the last pass; whether that pass left work to check.
    private let lastPass = Mutex(LastPass())
    private let asked = Mutex(false)
    private let loop = BackgroundLoop("modelfs-healer")

    /// What the next pass depends on: the situation the last one saw, whether it made copies or
    /// drops (the next one checks them), how many passes in a row ended with errors only.
    struct LastPass {
        var situation: Situation?
        var leftWork = true
        var failures = 0
        var at = Date.distantPast
    }

    public init(fs: FileSystem, replicator: Replicator, membership: Membership, client: PeerClient, local: PackBlockStore,
                etcd: EtcdClient, cluster: String, interval: Double, deadAfter: Double, rate: UInt64 = 0, width: Int = 8,
                yield: ForegroundYield? = nil, fullEvery: Double = 3600, scanRate: UInt64 = 0) {
        self.fullEvery = fullEvery
        self.scanRate = scanRate
        self.fs = fs
        self.replicator = replicator
        self.membership = membership
        self.client = client
        self.local = local
        self.etcd = etcd
        let keys = EtcdKeys(cluster: cluster)
        leaderKey = keys.healer
        statusKey = keys.healStatus
        self.interval = interval
        self.deadAfter = deadAfter
        self.width = width
        self.rate = rate
        self.yield = yield
    }

    /// This node's own view (meaningful on the healer).
    public var localStatus: HealStatus { state.withLock { $0 } }

    /// The cluster's: the healer's last published status.
    public func clusterStatus() -> HealStatus? {
        guard let v = try? etcd.range(statusKey).kvs.first?.value else { return nil }
        return try? JSONDecoder().decode(HealStatus.self, from: v)
    }

    public func start() {
        loop.start { [weak self] in
            guard let self else { return 0 }
            self.round()
            return self.interval
        }
    }

    public func stop() { loop.stop(timeout: 15) }

    /// Starts a pass now (if this node is the healer).
    public func poke() {
        asked.withLock { $0 = true }
        loop.poke()
    }

    /// What a pass depends on besides the namespace: which nodes are live, down and waited for,
    /// dead (down past `--dead-after`), draining, on the roster.
    struct Situation: Equatable {
        var live: [String], waiting: [String], dead: [String], draining: [String], roster: [String]
    }

    func situation() -> Situation {
        let down = membership.down
        return Situation(live: membership.nodes.map(\.id).sorted(),
                         waiting: down.filter { $0.seconds < deadAfter }.map(\.node.id),
                         dead: down.filter { $0.seconds >= deadAfter }.map(\.node.id),
                         draining: membership.draining.sorted(), roster: membership.known.map(\.id))
    }

    /// Why a pass should run now, or nil: nothing changed since the last one, which was clean.
    func reasonForPass() -> String? {
        let now = Date(), current = situation()
        let wasAsked = asked.withLock { a in defer { a = false }; return a }
        return lastPass.withLock { last in
            if wasAsked { return "asked" }
            guard let seen = last.situation else { return "first pass" }
            if seen != current { return "the cluster changed" }
            return now >= Self.nextPass(after: last, interval: interval, fullEvery: fullEvery) ? Self.why(last) : nil
        }
    }

    /// When a pass runs with the situation unchanged: an interval after one that copied or
    /// dropped (to check its work); after one that only failed, an interval doubled per failure
    /// in a row, up to 10 minutes (a block no holder can send, a node that does not answer `has`:
    /// each retry walks the whole namespace, so a lasting error must not cost an idle cluster a
    /// walk every interval); otherwise `fullEvery` after the last.
    static func nextPass(after last: LastPass, interval: Double, fullEvery: Double) -> Date {
        if last.leftWork { return last.at.addingTimeInterval(interval) }
        if last.failures > 0 {
            let backoff = interval * pow(2, Double(min(last.failures - 1, 20)))
            return last.at.addingTimeInterval(min(backoff, max(interval, min(600, fullEvery))))
        }
        return last.at.addingTimeInterval(fullEvery)
    }

    static func why(_ last: LastPass) -> String {
        last.leftWork ? "checking the last pass" : last.failures > 0 ? "retrying after \(last.failures) failed passes" : "periodic"
    }

    /// One turn of the loop: keep (or take) the healer key; pass if there is a reason.
    private func round() {
        guard isLeader() else {
            lastPass.withLock { $0.situation = nil }   // should this node become the healer, it starts with a pass
            return
        }
        guard let reason = reasonForPass() else { return }
        let seen = situation()
        var leftWork = false, failed = true
        do {
            let plan = try pass(reason: reason)
            leftWork = plan.copiedBytes > 0 || plan.dropped > 0 || plan.moves > 0
            failed = !plan.errors.isEmpty
            let s = localStatus
            Log.info("healer: a pass (\(reason)) read \(s.files) files in \(String(format: "%.1f", s.lastPassSeconds)) s: \(plan.short) blocks short, \(plan.copiedBytes) bytes copied, \(plan.dropped) copies dropped\(plan.errors.first.map { "; \($0)" } ?? "")")
        } catch {
            state.withLock { $0.lastError = "\(error)"; $0.running = false }
            Log.warning("healer: a pass (\(reason)) failed: \(error)")
        }
        let next = lastPass.withLock { last -> LastPass in
            last = LastPass(situation: seen, leftWork: leftWork, failures: failed ? last.failures + 1 : 0, at: Date())
            return last
        }
        state.withLock { $0.nextPassAt = Self.nextPass(after: next, interval: interval, fullEvery: fullEvery).timeIntervalSince1970 }
        publish()
    }

    /// Takes or keeps the healer key (under this node's lease).
    func isLeader() -> Bool { membership.holds(leaderKey) }

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

    /// One pass over the whole namespace (the walk paced at `scanRate` files a second).
    @discardableResult
    public func pass(reason: String = "asked") throws -> Plan {
        let began = Date()
        state.withLock { $0.running = true; $0.healer = membership.me.id; $0.lastReason = reason }
        publish()
        var want: [BlockID: Want] = [:]
        var files = 0
        let now = Timestamp.now().totalNanoseconds
        let pacer = Pacer(rate: scanRate)
        try fs.walkFiles(from: .root) { f in
            files += 1
            pacer.spent(1)
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
            // As things stand at the end of the pass: the blocks it found short are no longer
            // so once every copy it planned was made (and synced) — the next pass checks.
            s.underReplicatedBlocks = plan.copiedAll ? 0 : plan.short
            s.underReplicatedBytes = plan.copiedAll ? 0 : plan.shortBytes
            s.unreadableBlocks = plan.unreadable
            s.unreadableBytes = plan.unreadableBytes
            s.draining = plan.draining
            s.rebalanceCopies = plan.moves
            s.waitingFor = waiting
            if plan.copiedBytes > 0 { s.copyRate = Double(plan.copiedBytes) / max(plan.copySeconds, 0.001) }
            s.rateCap = rate
            s.lastError = plan.errors.first
        }
        publish()
        return plan
    }

    public struct Plan: Sendable {
        public var short = 0, shortBytes: UInt64 = 0, unreadable = 0, unreadableBytes: UInt64 = 0
        public var draining: [String: Int] = [:]
        public var copiedBytes: UInt64 = 0, copySeconds = 0.0
        /// Copies the plan asked for, and those made and synced on their targets.
        public var copiesPlanned = 0, copiesMade = 0
        /// Whether every copy the plan asked for was made: then the blocks found short are not
        /// short any more when the pass ends.
        public var copiedAll: Bool { executed && errors.isEmpty && copiesMade >= copiesPlanned }
        /// The plan was carried out (not only made: a pass waiting for a down node is not).
        public var executed = false
        /// Copies made toward an under-filled node (rebalancing).
        public var moves = 0
        /// Copies dropped (off draining nodes, or surplus).
        public var dropped = 0
        public var errors: [String] = []
    }

    /// A copy the planner asks for: block `id` (with `have` good copies now) from one of `from`
    /// to each of `to`; `urgent` when it is down to its last live copy.
    public struct Copy: Sendable {
        public var id: BlockID
        public var have: Int
        public var length: UInt32
        public var from: [NodeInfo]
        public var to: [NodeInfo]
        public var urgent: Bool
    }

    /// Finds what `want` lacks on the live nodes and, with `act`, copies and drops to fix it.
    /// Also used by `modelfs verify` for the blocks under a path.
    public func repair(_ want: [BlockID: Want], act: Bool) throws -> Plan {
        let ids = Array(want.keys)
        let (holders, failed) = replicator.census(ids)
        let draining = membership.draining
        let live = membership.nodes
        var (plan, copies, drops) = Healer.plan(want: want, holders: holders, live: live, draining: draining, everyNodeAnswered: failed.isEmpty)
        if !failed.isEmpty { plan.errors.insert("nodes \(failed.joined(separator: ",")) did not answer which blocks they hold", at: 0) }
        guard act else { return plan }
        return try execute(plan, copies: copies, drops: drops)
    }

    /// The healing planner, pure (the simulator runs it too, `modelfs debug simulate`): from
    /// what each block wants and which live nodes hold it, the copies to make (fewest copies
    /// first) and the copies to drop. Drops and rebalancing need `everyNodeAnswered`.
    public static func plan(want: [BlockID: Want], holders: [BlockID: [String]], live: [NodeInfo], draining: Set<String>,
                            everyNodeAnswered: Bool, moveBudget: UInt64 = Healer.moveBudget) -> (Plan, [Copy], [(BlockID, NodeInfo)]) {
        var plan = Plan()
        let byID = Dictionary(live.map { ($0.id, $0) }, uniquingKeysWith: { a, _ in a })
        let targetsPool = live.filter { !draining.contains($0.id) }
        var copies: [Copy] = []
        var drops: [(BlockID, NodeInfo)] = []
        var moveCandidates: [(BlockID, UInt32, [NodeInfo])] = []
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
                // A block of a file written within --dead-after is its writer's to replicate:
                // not counted short (status shows such files as pending), not copied, unless a
                // draining node holds it.
                guard w.settled || draining.contains(where: { h.contains($0) }) else { continue }
                plan.short += 1
                plan.shortBytes += UInt64(w.length)
                let to = Placement.targets(id, nodes: targetsPool, replicas: targetsPool.count, writer: nil, spreadLabel: w.spread)
                    .filter { !h.contains($0.id) }.prefix(w.copies - good.count)
                // One live copy left (a draining node's counts: it still serves): it does not
                // wait for the foreground.
                if !to.isEmpty {
                    copies.append(Copy(id: id, have: good.count, length: w.length, from: h.compactMap { byID[$0] }, to: Array(to), urgent: h.count <= 1))
                }
                continue
            }
            // Enough copies: only with every node's answer is anything dropped or moved.
            guard everyNodeAnswered, w.settled else { continue }
            for d in h where draining.contains(d) { if let n = byID[d] { drops.append((id, n)) } }
            let top = Placement.targets(id, nodes: targetsPool, replicas: w.copies, writer: nil, spreadLabel: w.spread)
            if good.count > w.copies {
                // Surplus (a node came back after its blocks were copied elsewhere, or a move
                // below made its new copy): drop copies outside the block's placement, fullest
                // node first, down to R.
                let extra = good.filter { g in !top.contains { $0.id == g } }
                    .compactMap { byID[$0] }.sorted { $0.usedBytes > $1.usedBytes }.prefix(good.count - w.copies)
                for n in extra { drops.append((id, n)) }
            } else {
                // Every node its placement names that lacks it (the writer's own copy displaces
                // one: the first may be full while a later one just joined).
                let missing = top.filter { !h.contains($0.id) }
                if !missing.isEmpty { moveCandidates.append((id, w.length, missing)) }
            }
        }
        // Rebalancing (a node joined, or is far below the others): once nothing is short,
        // blocks whose placement names an under-filled node are copied to it, a bounded amount
        // per pass; the copy outside their placement is dropped in a later pass, after `has`
        // confirmed the new one.
        if plan.short == 0, !targetsPool.isEmpty {
            let used = targetsPool.map(\.usedBytes).sorted()
            let median = Double(used[used.count / 2])
            var incoming: [String: UInt64] = [:]
            var budget = moveBudget
            for (id, length, ts) in moveCandidates where budget > 0 {
                let under = ts.first { Double($0.usedBytes + incoming[$0.id, default: 0] + UInt64(length)) < median * Self.underFilled }
                guard let t = under else { continue }
                incoming[t.id, default: 0] += UInt64(length)
                budget -= min(budget, UInt64(length))
                copies.append(Copy(id: id, have: Int.max, length: length, from: (holders[id] ?? []).compactMap { byID[$0] }, to: [t], urgent: false))
                plan.moves += 1
            }
        }
        for d in draining where plan.draining[d] == nil && byID[d] != nil { plan.draining[d] = 0 }
        // Fewest copies first: a block down to one copy is one failure away from loss.
        copies.sort { $0.have < $1.have }
        return (plan, copies, drops)
    }

    /// The holder that sends a copy: the block id picks one, each pass another (so a holder whose
    /// copy turns out bad is not asked forever).
    public static func source(of c: Copy, pass: Int) -> NodeInfo? {
        let holders = c.from.sorted { $0.id < $1.id }
        guard !holders.isEmpty else { return nil }
        return holders[Int((c.id.w0 &+ UInt64(pass)) % UInt64(holders.count))]
    }

    private let lastPublish = Mutex(Date.distantPast)

    /// Publishes the running totals at most once a second while copies are made, so `status`
    /// shows healing as it runs.
    func publishSoon() {
        let due = lastPublish.withLock { last -> Bool in
            guard Date().timeIntervalSince(last) >= 1 else { return false }
            last = Date()
            return true
        }
        if due { publish() }
    }

    func publish() {
        let s = state.withLock { $0 }
        if let data = try? JSONEncoder().encode(s) { try? etcd.put(statusKey, data) }
    }
}
