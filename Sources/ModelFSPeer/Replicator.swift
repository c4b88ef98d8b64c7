import Foundation
import GRDB
import ModelFS
import ModelFSCore
import ModelFSWire
import ModelFSMeta
import ModelFSStore
import Synchronization

/// Replication state a node reports (`modelfs status`).
public struct ReplicationStatus: Codable, Sendable, Equatable {
    public var pendingJobs = 0
    public var pendingFiles = 0
    /// Bytes of file versions whose blocks are not yet confirmed on `replicas` nodes.
    public var pendingBytes: UInt64 = 0
    /// Age of the oldest unreplicated write: what losing this node now would lose.
    public var oldestPendingSeconds: Double = 0
    /// Bytes of pending versions that a pass has already found short of copies (a node down,
    /// fewer live nodes than `replicas`).
    public var underReplicatedBytes: UInt64 = 0
    public var replicatedBytes: UInt64 = 0
    public var lastError: String?
    public var defaultPolicy: ReplicationPolicy
    /// Files with a pending job: inode → seconds since its oldest pending write (at most
    /// 10,000; absent from an older daemon's status).
    public var pendingInodes: [UInt64: Double]?
}

/// Write-back replication (DESIGN.md §3, §5). Each committed version becomes a job journaled in
/// `DATA/replication.db` (SQLite, WAL: it survives a crash of the process) before its metadata
/// commit; a background thread brings each job's blocks to `replicas` copies on the nodes that
/// placement names and deletes the job. close() and fsync() push the copies their policy needs
/// themselves, in parallel, and return when they are there.
public final class Replicator: ReplicationHook, @unchecked Sendable {
    /// The jobs on disk.
    let onDisk: ReplicationJournal
    let local: PackBlockStore
    let membership: Membership
    let client: PeerClient
    let meta: any MetadataEngine
    public let defaultPolicy: ReplicationPolicy
    /// How long close() and fsync() wait for their copies before failing with EIO.
    let timeout: Double
    let width: Int
    /// Unreplicated bytes beyond which close() waits (backpressure, DESIGN.md §3).
    let stagingLimit: UInt64
    /// Copies of a block go as a chain (`PeerClient.putChained`) rather than one PUT per target.
    let chain: Bool

    typealias Job = ReplicationJournal.Job
    struct State {
        var jobs: [Int64: Job] = [:]
        var replicatedBytes: UInt64 = 0
        var lastError: String?
        var policies: [InodeNumber: (ReplicationPolicy?, Date)] = [:]
        /// The policy that applies below a directory (its own or inherited), and when it was found.
        var resolved: [InodeNumber: (ReplicationPolicy, Date)] = [:]
        var pendingBytes: UInt64 { jobs.values.reduce(0) { $0 + $1.bytes } }
    }
    let state = Mutex(State())
    let changed = NSCondition()
    let loop = BackgroundLoop("modelfs-replicator")
    /// Blocks being copied eagerly (id → pushes under way), and the work queue.
    let eagerState = Mutex<(inflight: [BlockID: Int], queued: Int)>(([:], 0))
    /// The threads that send eager copies: `width` for writers that wait for their copies
    /// (K > 1), `writeBackWidth` for write-back ones (K = 1).
    let eagerWorkers: Workers
    let writeBackWorkers = Workers("modelfs-writeback", count: Replicator.writeBackWidth)
    let heldBytes = Mutex(0)

    public init(dataDir: String, local: PackBlockStore, membership: Membership, client: PeerClient,
                meta: any MetadataEngine, defaultPolicy: ReplicationPolicy, timeout: Double = 60, width: Int = 8,
                stagingLimit: UInt64 = 16 << 30, chain: Bool = true) throws {
        self.chain = chain
        onDisk = try ReplicationJournal(path: dataDir + "/replication.db")
        self.local = local
        self.membership = membership
        self.client = client
        self.meta = meta
        self.defaultPolicy = defaultPolicy
        self.timeout = timeout
        self.width = width
        self.stagingLimit = stagingLimit
        eagerWorkers = Workers("modelfs-eager", count: width)
        // Jobs a previous run left: they resume.
        var jobs: [Int64: Job] = [:]
        for job in try onDisk.jobs(defaultPolicy: defaultPolicy) { jobs[job.id] = job }
        if !jobs.isEmpty { Log.info("resuming \(jobs.count) replication jobs left by the previous run") }
        state.withLock { $0.jobs = jobs }
    }

    /// Starts the job loop: a round every half second while jobs wait, every 2 s when none
    /// does or the last round failed (a retry after a pause, not a tight loop); `poke` wakes it.
    public func start() {
        loop.start(after: 0.5) { [weak self] in self?.round() ?? 0 }
    }

    /// Stops the background thread (waits for the pass under way); jobs stay in the journal.
    public func stop() {
        loop.stop()
        eagerWorkers.stop()
        writeBackWorkers.stop()
    }

    // MARK: Policy

    /// The policy of the nearest directory at or above `dir` that has one, else the default.
    /// Looked up at commit and by the healer for every file it walks: the answer is cached 2 s
    /// per directory (a change reaches commits within that), so the walk asks etcd about each
    /// directory, not each file (it asked for every level above every file: 50 files a second).
    public func policy(for dir: InodeNumber?) -> ReplicationPolicy {
        guard let start = dir else { return defaultPolicy }
        if let (p, at) = state.withLock({ $0.resolved[start] }), Date().timeIntervalSince(at) < 2 { return p }
        var d = start
        var found = defaultPolicy
        for _ in 0..<64 {
            if let p = policySet(on: d) { found = p; break }
            if d == .root { break }
            guard let parent = try? meta.parent(of: d) else { break }
            d = parent
        }
        state.withLock { s in
            if s.resolved.count > 100_000 { s.resolved = [:] }
            s.resolved[start] = (found, Date())
        }
        return found
    }

    private func policySet(on dir: InodeNumber) -> ReplicationPolicy? {
        if let (p, at) = state.withLock({ $0.policies[dir] }), Date().timeIntervalSince(at) < 2 { return p }
        let p = (try? meta.getxattr(dir, name: ReplicationPolicy.xattr)).flatMap {
            try? ReplicationPolicy(parsing: String(decoding: $0, as: UTF8.self))
        }
        state.withLock { s in
            if s.policies.count > 100_000 { s.policies = [:] }
            s.policies[dir] = (p, Date())
        }
        return p
    }

    // MARK: ReplicationHook

    public func journal(ino: InodeNumber, parent: InodeNumber?, blocks: [BlockID], bytes: UInt64) throws -> ReplicationTicket {
        let policy = policy(for: parent)
        let created = Date()
        let id = try onDisk.add(ino: ino, created: created, policy: policy, bytes: bytes, blocks: blocks)
        state.withLock { $0.jobs[id] = Job(id: id, ino: ino, created: created, policy: policy, bytes: bytes, blocks: blocks) }
        loop.poke()
        return ReplicationTicket(job: id, ino: ino, blocks: blocks, ack: policy.ack)
    }

    public func awaitAck(_ ticket: ReplicationTicket) throws {
        throttle()
        guard ticket.ack > 1 else { return }
        let policy = state.withLock { $0.jobs[ticket.job]?.policy }
        guard let policy else { return }   // already fully replicated
        try push(ticket.blocks, copies: ticket.ack, policy: policy, durable: false, what: "close")
    }

    public func awaitReplicas(ino: InodeNumber, parent: InodeNumber?, blocks: [BlockID]) throws {
        let policy = policy(for: parent)
        guard policy.replicas > 1 else { return }
        try push(blocks, copies: policy.replicas, policy: policy, durable: true, what: "fsync")
    }

    /// Backpressure: while more than `stagingLimit` bytes wait for replication, close() waits
    /// for the background to catch up (writers are slowed, never failed).
    func throttle() {
        var warned = false
        while !loop.isStopped {
            let pending = state.withLock { $0.pendingBytes }
            if pending <= stagingLimit { return }
            if !warned {
                Log.warning("\(pending) unreplicated bytes exceed the staging limit \(stagingLimit): slowing writers")
                warned = true
            }
            changed.lock()
            _ = changed.wait(until: Date().addingTimeInterval(0.5))
            changed.unlock()
        }
    }

    /// Pushes until every block has `copies` copies (this node's included), retrying until the
    /// timeout; then EIO.
    func push(_ blocks: [BlockID], copies: Int, policy: ReplicationPolicy, durable: Bool, what: String) throws {
        let deadline = Date().addingTimeInterval(timeout)
        waitForEager(blocks, until: deadline)
        while true {
            let shortfall = ensure(blocks, copies: copies, policy: policy, durable: durable)
            if shortfall == nil { return }
            if Date() >= deadline || loop.isStopped {
                throw ReplicationError(.notDurable, "\(what): \(copies) durable copies not reached within \(Int(timeout)) s: \(shortfall!); the replication job stays queued")
            }
            usleep(200_000)
            try? membership.reload()
        }
    }

    /// One pass: brings each block to `copies` copies on its placement targets. Returns nil when
    /// every block has them, else what is short.
    func ensure(_ blocks: [BlockID], copies: Int, policy: ReplicationPolicy, durable: Bool) -> String? {
        let me = membership.me
        let live = membership.placementNodes
        guard live.count >= copies else {
            return "\(live.count) live nodes for \(copies) copies"
        }
        // Live nodes this one cannot reach now (a request to them failed in transport within
        // the last few seconds: a cut link, a partition between two live nodes) are passed
        // over while enough others remain: their copies go to the next nodes of each block's
        // placement order, so one unreachable peer does not hold replication (or a K > 1
        // close()) up. The healer later sees R copies, which is all it asks for.
        let reachable = live.filter { $0.id == me.id || !client.backedOff($0.id) }
        let nodes = reachable.count >= copies ? reachable : live
        // Per remote node, the blocks placement gives it.
        var wanted: [String: (NodeInfo, [BlockID])] = [:]
        for b in Set(blocks) {
            for n in Placement.targets(b, nodes: nodes, replicas: copies, writer: me.id, spreadLabel: policy.spread) where n.id != me.id {
                wanted[n.id, default: (n, [])].1.append(b)
            }
        }
        let errors = Shared<[String]>([])
        let sent = Shared<UInt64>(0)
        var work: [BlockID: [NodeInfo]] = [:]
        for (node, ids) in wanted.values {
            var missing = ids
            if !durable {
                do {
                    let has = try client.has(ids, at: node)
                    missing = zip(ids, has).filter { !$0.1 }.map(\.0)
                } catch {
                    errors.withLock { $0.append("\(error)") }
                    continue
                }
            }
            for id in missing { work[id, default: []].append(node) }
        }
        let jobs = Array(work)
        parallelFor(jobs.count, width: width) { [self] i in
            let (id, nodes) = jobs[i]
            let r = send(OutgoingBlock(id, from: local), to: nodes, durable: durable)
            sent.withLock { $0 += r.sent }
            if !r.errors.isEmpty { errors.withLock { $0 += r.errors } }
        }
        state.withLock { $0.replicatedBytes += sent.withLock { $0 } }
        let e = errors.withLock { $0 }
        return e.isEmpty ? nil : "\(e.count) copies failed (\(e.first!))"
    }

    /// Sends `block` (read once, or still in memory) to `nodes`: as a chain (the first stores it
    /// and sends it on to the next, and so on: this node's link carries it once, however many
    /// copies), or one PUT per node (`chain` false, or one node). The receivers hash it before
    /// storing. A node the chain did not reach is an error (the next pass asks `has` and sends
    /// again what is missing).
    func send(_ block: OutgoingBlock, to nodes: [NodeInfo], durable: Bool) -> (sent: UInt64, errors: [String]) {
        let id = block.id
        if chain && nodes.count > 1 {
            do {
                let stored = try client.putChained(block, to: nodes, durable: durable)
                let missed = nodes.filter { !stored.contains($0.id) }
                return (UInt64(block.length),
                        missed.map { "\($0.id): not reached by the chain from \(nodes[0].id)" })
            } catch {
                return (0, ["\(nodes[0].id) (chain head): \(error)"])
            }
        }
        var sent: UInt64 = 0
        var errors: [String] = []
        for node in nodes {
            do {
                guard let n = try client.put(block, to: node, durable: durable) else {
                    throw StoreError(.missing, "block \(id.hex) is missing from this node's store")
                }
                sent += UInt64(n)
            } catch {
                errors.append("\(node.id): \(error)")
            }
        }
        return (sent, errors)
    }

    // MARK: Census

    /// How many live nodes (this one included) hold each block as a replica, and which: one
    /// batched `has` per peer, all peers at once. A peer that does not answer counts as holding
    /// nothing; its id is in `failed`.
    public func census(_ ids: [BlockID]) -> (holders: [BlockID: [String]], failed: [String]) {
        let me = membership.me
        var holders: [BlockID: [String]] = [:]
        for id in ids where local.contains(id) { holders[id, default: []].append(me.id) }
        let peers = membership.peers
        let answers = Shared<[(String, [Bool]?)]>([])
        let list = ids
        parallelFor(peers.count, width: 8) { [client] i in
            var got: [Bool]? = []
            for start in stride(from: 0, to: list.count, by: 8192) {
                let part = Array(list[start..<min(list.count, start + 8192)])
                guard let has = try? client.has(part, at: peers[i]) else { got = nil; break }
                got! += has
            }
            answers.withLock { $0.append((peers[i].id, got)) }
        }
        var failed: [String] = []
        for (node, has) in answers.get() {
            guard let has else { failed.append(node); continue }
            for (i, present) in has.enumerated() where present { holders[list[i], default: []].append(node) }
        }
        return (holders, failed.sorted())
    }

    public func fileState(blocks: [ChunkRef], parent: InodeNumber?) -> FileReplicaState {
        let policy = policy(for: parent)
        let ids = Array(Set(blocks.map(\.id)))
        let holders = census(ids).holders
        let least = ids.map { holders[$0]?.count ?? 0 }.min() ?? policy.replicas
        var short: UInt64 = 0
        for c in blocks where holders[c.id]?.count ?? 0 < policy.replicas { short += UInt64(c.length) }
        return FileReplicaState(replicas: least, pendingBytes: short, policy: policy)
    }

}
