import Foundation
import ModelFSCore
import ModelFSWire
import ModelFSStore
import Synchronization

/// The block store a cluster node's filesystem reads and writes through (DESIGN.md §4):
/// this node's replicas (`local`, where its own writes and the copies peers push to it land),
/// then its read-through cache (`cache`, blocks fetched from peers, bounded by `cacheBudget`,
/// least recently used first out), then the peers — in placement order, then any live node.
/// Every block from a peer is verified before it is cached or returned.
///
/// Readahead (`willNeed`) fetches the following blocks in the background, up to `parallel` at a
/// time; as consecutive blocks are placed on different nodes, a sequential read pulls from
/// several peers at once.
public final class ClusterBlockStore: BlockStore, @unchecked Sendable {
    public let local: PackBlockStore
    public let cache: PackBlockStore
    public let cacheBudget: UInt64
    let membership: Membership
    let client: PeerClient
    let parallel: Int

    public struct Stats: Sendable, Codable, Equatable {
        public var localHits: UInt64 = 0
        public var cacheHits: UInt64 = 0
        public var peerFetches: UInt64 = 0
        public var peerBytes: UInt64 = 0
        public var failedFetches: UInt64 = 0
        public var evictedBytes: UInt64 = 0
        /// Fetched blocks not kept in the cache, its writer being `cacheWriteLimit` behind (the
        /// disk slower than the network): a later read fetches them again and may keep them.
        public var cacheWritesDropped: UInt64 = 0
        /// Copies from peers whose bytes did not hash to their id: rejected, fetched elsewhere.
        public var rejectedCopies: UInt64 = 0

        public init() {}
        /// Fields added later default when absent, so a CLI reads an older daemon's status.
        public init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            localHits = try c.decode(UInt64.self, forKey: .localHits)
            cacheHits = try c.decode(UInt64.self, forKey: .cacheHits)
            peerFetches = try c.decode(UInt64.self, forKey: .peerFetches)
            peerBytes = try c.decode(UInt64.self, forKey: .peerBytes)
            failedFetches = try c.decode(UInt64.self, forKey: .failedFetches)
            evictedBytes = try c.decode(UInt64.self, forKey: .evictedBytes)
            cacheWritesDropped = try c.decodeIfPresent(UInt64.self, forKey: .cacheWritesDropped) ?? 0
            rejectedCopies = try c.decodeIfPresent(UInt64.self, forKey: .rejectedCopies) ?? 0
        }
    }
    private struct State {
        var stats = Stats()
        /// Fetches under way (readahead or a reader): a second reader waits for the first.
        var inflight: [BlockID: DispatchGroup] = [:]
        var prefetching = 0
        /// Blocks readahead fetched (verified) that no reader has taken yet: the first read gets
        /// the buffer itself instead of reading the cache copy back from disk and hashing it again.
        var fetched: [BlockID: BlockBuffer] = [:]
        var fetchedOrder: [BlockID] = []
        /// The last blocks handed to readers (which keep them in memory a while): readahead
        /// asked for just before a reader took one does not fetch it again, whether or not the
        /// cache kept it.
        var delivered: Set<BlockID> = []
        var deliveredOrder: [BlockID] = []

        mutating func take(_ id: BlockID) -> BlockBuffer? {
            guard let b = fetched.removeValue(forKey: id) else { return nil }
            deliver(id)
            return b
        }
        mutating func deliver(_ id: BlockID) {
            guard delivered.insert(id).inserted else { return }
            deliveredOrder.append(id)
            if deliveredOrder.count > ClusterBlockStore.deliveredBlocks { delivered.remove(deliveredOrder.removeFirst()) }
        }
        /// Fetched for a reader who has not taken it yet, or taken a moment ago.
        func handedOut(_ id: BlockID) -> Bool { fetched[id] != nil || delivered.contains(id) }
        /// Blocks the format-aware prefetch brought into the cache that no reader took yet, and
        /// the files it works for (their readers' fetches are its misses).
        var prefetched: [BlockID: FileVersion] = [:]
        var planned: Set<FileVersion> = []
    }
    static let deliveredBlocks = 64
    /// Readahead results kept in memory for their reader, at most.
    static let handoffBlocks = 16
    /// Fetched blocks on their way into the cache: written behind by one thread, so that a
    /// reader never waits for the disk write of a block it already has. Readers find them here
    /// meanwhile. Beyond `cacheWriteLimit` bytes queued a block is not cached (as JuiceFS drops
    /// cache writes when its queue is full): a 2-node cold read of 1 GiB, the fetching thread
    /// writing such blocks itself, 498-535 MB/s; dropping them, 793-908. `warm` writes in line.
    private let cacheWrites = Mutex((pending: [BlockID: BlockBuffer](), bytes: 0))
    private let cacheWriter = DispatchQueue(label: "modelfs.cache-writer")
    static let cacheWriteLimit = 16 << 20
    private let state = Mutex(State())
    private let prefetchQueue = DispatchQueue(label: "modelfs.prefetch", attributes: .concurrent)
    private let trimLock = NSLock()

    /// Notes this filesystem's block reads and writes as foreground work (healing yields to it).
    let yield: ForegroundYield?
    /// Shares the loading of large file versions with the other nodes loading them (nil: off).
    public let fanout: Fanout?

    public init(local: PackBlockStore, cache: PackBlockStore, cacheBudget: UInt64, membership: Membership,
                client: PeerClient, parallel: Int = 8, yield: ForegroundYield? = nil, fanout: Fanout? = nil,
                formatPrefetch: Bool = true, onCorrupt: @escaping @Sendable (BlockID) -> Void = { _ in }) {
        self.onCorrupt = onCorrupt
        prefetches = formatPrefetch
        self.fanout = fanout
        self.local = local
        self.yield = yield
        self.cache = cache
        self.cacheBudget = cacheBudget
        self.membership = membership
        self.client = client
        self.parallel = parallel
        cache.touchOnRead = true
    }

    public var stats: Stats { state.withLock { $0.stats } }
    /// Readahead fetches under way.
    var prefetchesUnderWay: Int { state.withLock { $0.prefetching } }
    /// Called when a local replica fails verification on read (the scrubber repairs it).
    let onCorrupt: @Sendable (BlockID) -> Void

    /// Fetches into the cache every block of `ids` that this node has neither as a replica nor
    /// cached, `parallel` at a time from the peers that hold them (`modelfs warm`). Calls
    /// `progress(done, total, failed)` as blocks arrive (it must be quick: it runs under a lock).
    /// Each block comes with the file version it belongs to: nodes warming the same large file
    /// at once share it (fan-out).
    public func warm(_ blocks: [(id: BlockID, file: FileVersion?)], progress: @escaping @Sendable (Int, Int, Int) -> Void) {
        var seen = Set<BlockID>()
        let missing = blocks.filter { seen.insert($0.id).inserted && !contains($0.id) }
        let done = Shared((0, 0))
        progress(0, missing.count, 0)
        parallelFor(missing.count, width: parallel) { [self] i in
            let ok = (try? fetch(missing[i].id, writeBehind: false, file: missing[i].file)) != nil
            // Reported under the count's lock, so the counts reported only grow.
            done.withLock { d in
                d.0 += 1
                if !ok { d.1 += 1 }
                progress(d.0, missing.count, d.1)
            }
        }
    }

    @discardableResult
    public func put(_ id: BlockID, _ bytes: UnsafeRawBufferPointer) throws -> Bool {
        yield?.noteForeground()
        return try local.put(id, bytes)
    }
    @discardableResult
    public func put(_ id: BlockID, owned buffer: BlockBuffer, length: Int) throws -> Bool {
        yield?.noteForeground()
        return try local.put(id, owned: buffer, length: length)
    }

    public func contains(_ id: BlockID) -> Bool { local.contains(id) || cached(id) }

    /// In the cache, or on its way there.
    private func cached(_ id: BlockID) -> Bool { cache.contains(id) || cacheWrites.withLock { $0.pending[id] != nil } }

    /// The cache's copy: still in memory while its write is queued, else read back (verified).
    private func cacheCopy(_ id: BlockID) -> BlockBuffer? {
        if let b = cacheWrites.withLock({ $0.pending[id] }) { return b }
        return cache.contains(id) ? try? cache.read(id) : nil
    }

    public func read(_ id: BlockID) throws -> BlockBuffer { try read(id, for: nil) }

    /// A small read of a block this node holds (a replica, or in its read cache) checks only the
    /// pieces it touches; a block from a peer comes whole (its SHA-256 checked), as before.
    public func readPieces(_ id: BlockID, _ range: Range<Int>) -> PieceRead? {
        if let r = local.readPieces(id, range) {
            state.withLock { $0.stats.localHits += 1 }
            return r
        }
        return cache.readPieces(id, range)
    }

    public func read(_ id: BlockID, for file: FileVersion?) throws -> BlockBuffer {
        yield?.noteForeground()
        if let b = state.withLock({ $0.take(id) }) {
            state.withLock { $0.stats.cacheHits += 1 }
            return b
        }
        if local.contains(id) {
            if let b = try? local.read(id) {
                state.withLock { $0.stats.localHits += 1 }
                return b
            }
            // A replica that fails its hash: the reader gets a good copy from a peer below, and
            // the replica is replaced in the background.
            if local.contains(id) { onCorrupt(id) }
        }
        if let b = cacheCopy(id) {
            let prefetched = state.withLock { s in
                s.stats.cacheHits += 1
                return s.prefetched.removeValue(forKey: id)
            }
            if let prefetched { fanout?.note(prefetched, .prefetchHit) }
            return b
        }
        // A reader of a file being prefetched fetches a block itself: the prefetch was behind, or
        // skipped it (one it is fetching already is a hit, late).
        if let file {
            switch state.withLock({ s in s.planned.contains(file) ? s.inflight[id] != nil : nil }) {
            case true?: fanout?.note(file, .prefetchHit)
            case false?: fanout?.note(file, .prefetchMiss)
            case nil: break
            }
        }
        return try fetch(id, file: file)
    }

    /// Format-aware prefetch: fetches the chunks a loader of `file` will read, in its order,
    /// into the cache, `parallel`/2 at a time (the loader's own reads and readahead take the
    /// rest); blocks this node has are skipped. The caller keeps to `prefetchBudget` (half the
    /// cache's budget) for one open. One file's prefetch at a time, on one queue, in the order
    /// asked.
    public let prefetches: Bool
    /// `willNeed` fetches what neither the replicas nor the cache hold (into `fetched`, verified).
    public var fetchesAhead: Bool { true }

    public var prefetchBudget: UInt64 { cacheBudget / 2 }

    public func prefetch(_ chunks: [ChunkRef], for file: FileVersion, format: String) {
        let wanted = chunks.filter { !contains($0.id) }
        fanout?.note(file, .planned(format: format))
        guard !wanted.isEmpty else { return }
        state.withLock { s in
            s.planned.insert(file)
            if s.planned.count > 64 { s.planned.remove(s.planned.first!) }
        }
        prefetchLoads.async { [self] in
            parallelFor(wanted.count, width: max(1, parallel / 2)) { [self] i in
                let c = wanted[i]
                guard !contains(c.id), (try? fetch(c.id, writeBehind: false, file: file)) != nil else { return }
                fanout?.note(file, .prefetched(Int(c.length)))
                state.withLock { s in
                    s.prefetched[c.id] = file
                    if s.prefetched.count > 100_000 { s.prefetched.removeAll() }
                }
            }
            state.withLock { _ = $0.planned.remove(file) }
        }
    }
    private let prefetchLoads = DispatchQueue(label: "modelfs.format-prefetch")

    /// A loader of `file` asks for block `id` (fan-out), which this node has in neither store,
    /// through the chain `via`: what this node holds of it in memory, or else the block got now
    /// (from this node's parent in the block's tree if that is not on the chain, else from the
    /// holders; kept in the cache for the next loader and this node's own reader). nil if this
    /// node does not load that file (any more); throws if it cannot get the block now.
    public func relay(_ id: BlockID, for asked: FileVersion, via: [String]) throws -> BlockBuffer? {
        guard let fanout, let file = fanout.loading(asked) else { return nil }
        let b = try state.withLock { $0.fetched[id] } ?? cacheWrites.withLock { $0.pending[id] } ?? fetch(id, file: file, via: via)
        fanout.note(file, .served(b.count))
        return b
    }

    /// Seconds a relay waits for a fetch of the block already under way here (a fetch that
    /// itself waits on the asker, as two loaders' differing views of the set can make, then
    /// ends in a 503 and the asker goes to the holders).
    static let relayWait = 5.0

    /// Fetches a block from the peers into the cache (or waits for a fetch already under way).
    /// `file`: the version a reader wants it for (fan-out may ask another loader of it first);
    /// `via`: the chain of loaders a relayed request came through (nil: this node's reader).
    func fetch(_ id: BlockID, handOff: Bool = false, writeBehind: Bool = true, file: FileVersion? = nil,
               via: [String]? = nil) throws -> BlockBuffer {
        let (group, mine) = state.withLock { s -> (DispatchGroup, Bool) in
            if let g = s.inflight[id] { return (g, false) }
            let g = DispatchGroup()
            g.enter()
            s.inflight[id] = g
            return (g, true)
        }
        if !mine {
            // A prefetch that finds the block already on its way has nothing to do: waiting and
            // then reading the cache copy back (and hashing it again) cost a sixth of the CPU
            // of a cold remote read.
            if handOff { throw Superseded() }
            if via != nil {
                guard group.wait(timeout: .now() + Self.relayWait) == .success else {
                    throw StoreError(.missing, "block \(id.hex) is still on its way here")
                }
            } else {
                group.wait()
            }
            if let b = leftBehind(id) { return b }
            if let b = try? local.read(id) { return b }
            return try fetch(id, writeBehind: writeBehind, file: file, via: via)   // the other fetch failed: try ourselves
        }
        defer {
            state.withLock { _ = $0.inflight.removeValue(forKey: id) }
            group.leave()
        }
        // A fetch that ended between the caller's look in the cache and this one's start has
        // left the block behind (it does so before it stops being in flight): fetching it again
        // cost a remote read about 4 % more bytes than the file held.
        if !handOff {
            if let b = leftBehind(id) {
                state.withLock { $0.stats.cacheHits += 1 }
                return b
            }
        } else if cached(id) || state.withLock({ $0.handedOut(id) }) {
            throw Superseded()
        }
        // Fan-out: this node's parent in the block's tree of loaders of this file relays it; if
        // it cannot, the holders serve as usual.
        let shared = file.flatMap { f in fanout.map { (f, $0) } }.flatMap { f, o in o.applies(to: f) ? (f, o) : nil }
        if let (f, o) = shared, let loader = o.source(id, file: f, via: via ?? []) {
            var refused = false
            do {
                switch try client.fetch(id, from: loader, relay: f, via: (via ?? []) + [membership.me.id]) {
                case .block(let b):
                    o.note(f, .fromLoader(b.count))
                    try keep(id, b, handOff: handOff, writeBehind: writeBehind)
                    return b
                case .missing: refused = true
                case .corrupt:
                    state.withLock { $0.stats.rejectedCopies += 1 }
                    o.note(f, .rejected)
                }
            } catch {}
            o.note(f, .fallback(loader: loader.id, refused: refused))
        }
        // Live peers in placement order; then nodes whose lease lapsed (a node slow to renew
        // under load still serves its blocks; a dead one just refuses the connection).
        let peers = Placement.order(id, membership.peers) + membership.lost
        var errors: [String] = []
        // Peers in their backoff window (a request to them failed lately) are skipped at first;
        // if no other node has the block, they are tried once more for real: after a cut link
        // heals, every peer is still backed off for a moment, and a read must not fail for that.
        let skipped = peers.filter { client.backedOff($0.id) }
        for (node, force) in peers.map({ ($0, false) }) + skipped.map({ ($0, true) }) {
            do {
                let b: BlockBuffer
                switch try client.fetch(id, from: node, evenIfBackedOff: force) {
                case .block(let got): b = got
                case .missing: continue
                case .corrupt:
                    state.withLock { $0.stats.rejectedCopies += 1 }
                    if let (f, o) = shared { o.note(f, .rejected) }
                    errors.append("\(node.id) sent a corrupt copy")
                    continue
                }
                if let (f, o) = shared { o.note(f, .fromHolders(b.count)) }
                try keep(id, b, handOff: handOff, writeBehind: writeBehind)
                return b
            } catch {
                errors.append("\(error)")
            }
        }
        state.withLock { $0.stats.failedFetches += 1 }
        let detail = errors.isEmpty ? "" : " (\(errors.joined(separator: "; ")))"
        Log.every("no good copy", 60, .error, "block \(id.hex) is not on this node and no live peer of \(peers.count) has a good copy\(detail)")
        throw StoreError(.missing, "block \(id.hex) is unavailable: no live node holds a good copy")
    }

    /// A block just fetched (verified): into the cache, and counted; a readahead's kept in memory
    /// for its reader.
    private func keep(_ id: BlockID, _ b: BlockBuffer, handOff: Bool, writeBehind: Bool) throws {
        if writeBehind {
            cacheLater(id, b)
        } else {
            trimCache(adding: b.count)
            try cache.put(id, owned: b, length: b.count)
            trimCache(adding: 0)   // several threads put at once
        }
        state.withLock { s in
            s.stats.peerFetches += 1
            s.stats.peerBytes += UInt64(b.count)
            // Readahead: keep it for the reader (before waiters wake, in fetch's defer).
            if handOff {
                s.fetched[id] = b
                s.fetchedOrder.append(id)
                while s.fetchedOrder.count > Self.sharedReadahead + 8 { s.fetched[s.fetchedOrder.removeFirst()] = nil }
            } else {
                s.deliver(id)
            }
        }
    }

    /// What an earlier fetch of `id` left: its bytes handed off for a reader, or the cache copy.
    private func leftBehind(_ id: BlockID) -> BlockBuffer? {
        if let b = state.withLock({ $0.take(id) }) { return b }
        return cacheCopy(id)
    }

    /// Queues a verified block for the cache writer; when the queue is full the block is not
    /// cached (the reader keeps the network's pace, not the disk's).
    private func cacheLater(_ id: BlockID, _ b: BlockBuffer) {
        let queued = cacheWrites.withLock { w -> Bool? in
            guard w.pending[id] == nil else { return nil }
            guard w.bytes + b.count <= Self.cacheWriteLimit else { return false }
            w.pending[id] = b
            w.bytes += b.count
            return true
        }
        guard let queued else { return }
        guard queued else {
            state.withLock { $0.stats.cacheWritesDropped += 1 }
            return
        }
        cacheWriter.async { [self] in
            trimCache(adding: b.count)
            do { try cache.put(id, owned: b, length: b.count) } catch {
                Log.error("cannot keep block \(id.hex) in the read cache: \(error)")
            }
            cacheWrites.withLock { w in
                w.pending[id] = nil
                w.bytes -= b.count
            }
        }
    }

    /// A prefetch of a block another fetch is already bringing in.
    struct Superseded: Error {}

    /// Makes room for `adding` more bytes within the cache's budget: when they would not fit,
    /// evicts least-recently-used blocks down to 90% of it less `adding` (replicas in `local`
    /// are never evicted), so the cache never holds more than its budget.
    func trimCache(adding: Int) {
        let fits = { self.cache.usage().bytes + UInt64(adding) <= self.cacheBudget }
        guard !fits() else { return }
        // Every put that finds the cache over budget waits its turn and checks again: with a
        // `try` here, a put landing during another thread's eviction left the cache over budget.
        trimLock.lock()
        defer { trimLock.unlock() }
        guard !fits() else { return }
        do {
            let keep = cacheBudget / 10 * 9
            let freed = try cache.evictLeastRecentlyUsed(keepingBytes: keep > UInt64(adding) ? keep - UInt64(adding) : 0)
            state.withLock { $0.stats.evictedBytes += freed }
        } catch {
            Log.error("cannot trim the block cache: \(error)")
        }
    }

    public func willNeed(_ ids: [BlockID]) { willNeed(ids, for: nil) }

    /// Readahead for a file other loaders share: each block comes down a tree of loaders, a few
    /// store-and-forward hops, each sharing its sender's link with 3 siblings, so a reader needs
    /// more blocks under way to keep its link busy. Simulated (`modelfs debug simulate-fanout`,
    /// 2 GiB, 10 Gbit/s, pessimistic sharing), the last of 100 / 1,000 loaders against one
    /// alone: 2.25x / 2.75x with 8 blocks ahead, 1.53x / 1.71x with 32, 1.37x / 1.48x with 64.
    /// Up to 72 fetched blocks wait in memory for the reader meanwhile (72 MiB at the average
    /// block, 288 MiB at the largest), only while a shared file loads.
    static let sharedReadahead = 64

    public func readaheadBlocks(for file: FileVersion?) -> Int {
        guard let file, let fanout, fanout.shared(file) else { return 8 }
        return Self.sharedReadahead
    }

    public func willNeed(_ ids: [BlockID], for file: FileVersion?) {
        let shared = file.map { fanout?.shared($0) ?? false } ?? false
        // Fetches under way and blocks waiting for their reader, at most: more for a shared file
        // (its fetches mostly wait for the hops above them).
        let (width, kept) = shared ? (Self.sharedReadahead, Self.sharedReadahead + 8) : (parallel, Self.handoffBlocks)
        local.willNeed(ids)
        for id in ids where !contains(id) {
            let start = state.withLock { s -> Bool in
                // At most `handoffBlocks` fetched and not yet taken, counting those on their way:
                // beyond that the oldest were let go, and one whose cache write had been dropped
                // too (the queue full) had to be fetched again by its reader (the likely cause of
                // a CI run's 48 MiB read through a 16 MiB cache crossing 1.1 MB more than the file).
                guard s.inflight[id] == nil, !s.handedOut(id), s.prefetching < width,
                      s.fetched.count + s.prefetching < kept else { return false }
                s.prefetching += 1
                return true
            }
            guard start else { continue }
            prefetchQueue.async { [self] in
                _ = try? fetch(id, handOff: true, file: file)
                state.withLock { $0.prefetching -= 1 }
            }
        }
    }

    public func sync(_ ids: [BlockID]) throws { try local.sync(ids.filter { local.contains($0) }) }
    public func syncFilesystem() throws { try local.syncFilesystem() }
    public func usage() -> BlockStoreUsage { local.usage() }
}
