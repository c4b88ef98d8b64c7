import Foundation
import ModelFSCore
import ModelFSStore
import Synchronization

/// Removes blocks that no file references any more (after deletes, overwrites and failed
/// writes), by mark and sweep, without reading the namespace when nothing changed and without
/// holding a lock writers need while it reads:
/// 1. note the time T (the pass's start); take the blocks open write sessions reference, under
///    the filesystem's commit lock with no session mid-commit (`FileSystem.sessionBlocks`), and
///    let the lock go;
/// 2. the candidates: this node's blocks last touched before the cutoff (T minus `grace`) that
///    no open session references;
/// 3. page through the committed manifests (`MetadataEngine.manifests(after:limit:)`, at most
///    `scanRate` manifests a second, each page its own read) striking every block they reference
///    from the candidates, and stop early once none is left;
/// 4. drop each remaining candidate still untouched since the cutoff, then give the space back
///    (PackBlockStore.reclaim).
///
/// Why a block a file references is never removed, with no snapshot of the namespace: take
/// the version V that references it at removal time. If V was committed before its manifest's
/// page was read, the page has V (a later version would have replaced V, which is still
/// current). If V was committed after, its session either was open at step 1 (its blocks then
/// were taken, and blocks it stored or found already stored later were touched after T) or
/// opened later (every block it references is new or found already stored — touched after T —
/// or a chunk of the version it started from, which was current when its page was read). A
/// block another node's commit references arrived by a PUT or was confirmed by `has`, both of
/// which touch it: the cluster's `grace` (--gc-delay) covers the time from there to that commit.
/// Step 1 holds the commit lock only while it copies the sessions' block sets; a close() during
/// a pass waits for nothing else (it used to wait for the whole manifest read).
///
/// A pass runs when blocks may have become garbage: this filesystem changed content (a commit,
/// a link removed, an inode deleted: `FileSystem.contentChanges`), a write failed
/// (`requestSoon`), or `fullEvery` seconds passed since the last pass (blocks copied here for a
/// version never committed, a writer that died mid-file). An idle cluster reads no manifests.
///
/// With a change feed (`changeFeed`, a cluster node: the etcd watch reports every manifest
/// replaced or deleted anywhere, with the version it replaced, `suspect`), a pass set off by
/// a change takes as candidates only the blocks of those replaced versions that this node holds
/// (the suspects), not every old block: adding files, however many, makes no pass, and a
/// delete makes a pass on the nodes that hold the deleted blocks, which reads manifests only
/// until every suspect is found referenced (or all of them, if some are garbage). The first
/// pass after start, a failed write's and the `fullEvery` pass take every old block, as
/// without a feed (what a crash or a lost stretch of the watch left behind).
///
/// Superseded versions go promptly, not after the cluster's grace: the blocks of a version
/// replaced or deleted `supersededDelay` seconds ago (10 s) are candidates once touched more
/// than `settle` (1 s) before the pass, as on one node, unless a reader still holds that version
/// (`held`: the inodes some node reads an old version of, `VersionHolds`), when they wait for
/// the hold to go. The long grace is not needed for them: it covers copies that a version not
/// committed yet will reference, and every copy a commit counts is counted after that commit
/// (`Replicator.ensure` asks `has`, which touches, or sends it again), so a suspect taken away
/// under a writer that reuses its content costs a copy sent again, never a count that is wrong.
/// The delay gives readers on other nodes time to place their holds: they hear of the new
/// version from the same watch. The full passes keep the grace for every other block.
///
/// On a cluster, a pass set off by the feed asks the cluster's one scanner (`scanner`,
/// `ReferenceScans`) which of its candidates a manifest references instead of reading the
/// manifests itself: a delete whose blocks three nodes hold costs one read of the namespace, not
/// three, and passes of several nodes that come together share it. The argument above holds
/// unchanged: the scanner reads every manifest page after it has read the ask, which this node
/// writes after step 1. Full passes, and asks with more candidates than the scanner takes, read
/// the manifests here.
public final class GarbageCollector: @unchecked Sendable {
    let fs: FileSystem
    let store: PackBlockStore
    let interval: Double
    private let queue = DispatchQueue(label: "modelfs.gc", qos: .utility)
    private var timer: (any DispatchSourceTimer)?
    private let pending = Mutex(false)

    /// Blocks touched within this many seconds before a pass are kept whether referenced or not.
    /// One node: 1 s (every writer is in this process, under the commit lock). A cluster node:
    /// 15 minutes, because the references to its copies are made by other nodes: a copy pushed
    /// while its file is still being written elsewhere, or confirmed by a `has` just before that
    /// node's commit, is not referenced yet (`has` touches the blocks it confirms).
    let grace: Double

    /// Other stores swept with the same marks (a cluster node's read cache).
    let others: [PackBlockStore]

    /// Manifests read per second at most while a pass pages through them (0: no limit).
    let scanRate: UInt64
    /// Seconds a paced scan waits at most for writers between two pages (`scanReferences`).
    let scanYield: Double
    /// Seconds after which a pass runs even with no change seen.
    let fullEvery: Double
    /// Passes set off by changes take only the suspects (see the type's comment).
    let changeFeed: Bool
    /// Seconds after a version is replaced before its blocks are decided (a change feed), and
    /// the inodes whose old versions readers hold (nil: none are tracked).
    let supersededDelay: Double
    let held: (@Sendable () throws -> Set<InodeNumber>)?
    /// The cluster's scanner, asked by the passes the change feed sets off (nil: they read the
    /// manifests here).
    let scanner: (any ReferenceScanner)?
    private let stopping = Atomic<Bool>(false)
    /// A suspect touched within this many seconds before a pass waits for the next one.
    let settle: Double
    /// How soon versions that a reader holds are looked at again.
    var heldRetry: Double { max(1, supersededDelay) }
    /// A superseded version, from the change feed: its blocks are decided from `notBefore` on.
    /// `blocks` are read when it comes (`suspect`), not when it is decided: a manifest stored as
    /// a block may be gone by then from the nodes that held it (their own passes took it).
    struct Superseded {
        var id: UInt64
        var ref: ManifestRef
        var ino: InodeNumber?
        var notBefore: Date
        var blocks: [BlockID]?
    }
    /// Reads the blocks of manifests stored as blocks, as versions come (never behind a pass).
    private let expander = DispatchQueue(label: "modelfs.gc.expand", qos: .utility)
    static let page = 1000
    /// Pause after each page, in multiples of the time the page took to read (a paced pass).
    public static let pauseFactor = 3.0

    private struct Passes {
        /// `fs.contentChanges` when the last pass started (nil: no pass yet).
        var generation: UInt64?
        /// `fs.contentChanges` when a change was last noticed, and when.
        var noticed: UInt64?
        var lastChange = Date.distantPast
        var remoteChange = false
        var lastPass = Date.distantPast
        /// Changes up to here are covered: the last pass's cutoff (its start minus the grace).
        var covered = Date.distantPast
        /// Versions replaced and not taken by a pass yet (a change feed), and the blocks of
        /// earlier ones not decided yet: touched within `settle`, they wait for a later pass.
        var replaced: [Superseded] = []
        var lastSuperseded: UInt64 = 0
        var suspects: Set<BlockID> = []
        /// When waiting suspects can be decided (nil: none wait).
        var retryAt: Date?
        /// A pass over every old block is owed (a failed write, with a change feed).
        var fullOwed = false
        /// A pass set off by the feed waits until then: after a pass that read manifests, as
        /// long as that pass took (so reading the namespace takes at most half the time).
        var spacedUntil = Date.distantPast
        var stats = Stats()
    }
    private let passes = Mutex(Passes())

    /// What the passes did (status, tests).
    public struct Stats: Sendable, Codable, Equatable {
        /// A pass is under way.
        public var running = false
        public var passes = 0
        /// Manifests read, over all passes, and by the last one.
        public var manifestsRead: UInt64 = 0
        public var lastManifestsRead = 0
        public var removedBlocks: UInt64 = 0
        public var removedBytes: UInt64 = 0
        public var lastPassSeconds = 0.0
        /// Passes over every old block (the others took only suspects).
        public var fullPasses = 0
        /// Blocks waiting to be decided (a change feed).
        public var suspects = 0
        /// Superseded versions waiting for their delay or for a reader's hold to go.
        public var supersededWaiting = 0
        /// Superseded versions found held by a reader, over all passes.
        public var heldDeferrals: UInt64 = 0
        /// Passes whose manifests the cluster's scanner read for them (their `manifestsRead` is
        /// 0 here: the scanner counts them).
        public var scannedElsewhere = 0
        /// Seconds this node's own scans of the manifests waited for writers (`scanReferences`).
        public var scanYieldedSeconds = 0.0

        public init() {}

        /// Fields added later read as zero from an older daemon's status.
        public init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            func v<T: Decodable>(_ key: CodingKeys, _ fallback: T) throws -> T { try c.decodeIfPresent(T.self, forKey: key) ?? fallback }
            running = try v(.running, false)
            passes = try v(.passes, 0)
            manifestsRead = try v(.manifestsRead, 0)
            lastManifestsRead = try v(.lastManifestsRead, 0)
            removedBlocks = try v(.removedBlocks, 0)
            removedBytes = try v(.removedBytes, 0)
            lastPassSeconds = try v(.lastPassSeconds, 0)
            fullPasses = try v(.fullPasses, 0)
            suspects = try v(.suspects, 0)
            supersededWaiting = try v(.supersededWaiting, 0)
            heldDeferrals = try v(.heldDeferrals, 0)
            scannedElsewhere = try v(.scannedElsewhere, 0)
            scanYieldedSeconds = try v(.scanYieldedSeconds, 0)
        }
    }
    public var stats: Stats {
        passes.withLock { p in
            var s = p.stats
            s.supersededWaiting = p.replaced.count
            return s
        }
    }

    /// `date` in whole nanoseconds since 1970, rounded down (a block's touch time's unit).
    private static func timestamp(_ date: Date) -> Timestamp {
        Timestamp(totalNanoseconds: Int64((date.timeIntervalSince1970 * 1e9).rounded(.down)))
    }

    public init(fs: FileSystem, store: PackBlockStore, others: [PackBlockStore] = [], interval: Double = 60, grace: Double = 1,
                scanRate: UInt64 = 0, fullEvery: Double = 3600, changeFeed: Bool = false, supersededDelay: Double = 10,
                held: (@Sendable () throws -> Set<InodeNumber>)? = nil, settle: Double = 1,
                scanner: (any ReferenceScanner)? = nil, scanYield: Double = FileSystem.scanYield) {
        self.fs = fs
        self.scanYield = scanYield
        self.store = store
        self.others = others
        self.interval = interval
        self.grace = grace
        self.scanRate = scanRate
        self.fullEvery = fullEvery
        self.changeFeed = changeFeed
        self.supersededDelay = supersededDelay
        self.held = held
        self.settle = settle
        self.scanner = scanner
    }

    /// How often the timer asks `due`: a change feed's superseded versions are due
    /// `supersededDelay` after they come, so it looks within half that (`due` reads nothing).
    var tick: Double { changeFeed ? min(interval, max(0.5, supersededDelay / 2)) : interval }

    public func start() {
        fs.events.onGarbage { [weak self] in self?.requestSoon() }
        let t = DispatchSource.makeTimerSource(queue: queue)
        t.schedule(deadline: .now() + tick, repeating: tick)
        t.setEventHandler { [weak self] in
            guard let self, self.due() else { return }
            _ = try? self.collect()
        }
        t.resume()
        timer = t
    }

    /// A version of `ino` was replaced or deleted (by any node: the change feed): the blocks it
    /// referenced may be garbage. Without a feed, any change sets off a pass over every old block.
    public func suspect(_ replaced: ManifestRef, ino: InodeNumber? = nil) {
        let now = Date()
        var known: [BlockID]?
        if case .inline = replaced { known = blocks(of: replaced) }   // no read: the chunks are in the ref
        let id = passes.withLock { p -> UInt64? in
            p.lastChange = now
            guard changeFeed else { p.remoteChange = true; return nil }
            p.lastSuperseded += 1
            p.replaced.append(Superseded(id: p.lastSuperseded, ref: replaced, ino: ino,
                                         notBefore: now.addingTimeInterval(supersededDelay), blocks: known))
            return p.lastSuperseded
        }
        if let id, known == nil {
            expander.async { [weak self] in
                guard let self else { return }
                let ids = self.blocks(of: replaced)
                self.passes.withLock { p in
                    if let i = p.replaced.firstIndex(where: { $0.id == id }) { p.replaced[i].blocks = ids }
                }
            }
        }
    }

    /// A version's blocks, its manifest's own included; only the manifest's when that cannot be
    /// read (its chunks are then left to a full pass).
    private func blocks(of ref: ManifestRef) -> [BlockID] {
        if let ids = try? fs.blocks(of: ref) { return ids }
        if case .block(let id, _) = ref { return [id] }
        return []
    }

    /// Whether a pass should run now. With a change feed: a replaced version's delay is over, or
    /// suspects the last pass left waiting can be decided, or a full pass is owed or due. Without:
    /// content changed since the last one started (most of what a change leaves behind is old,
    /// and goes at once); or a change the last pass did not cover (blocks touched within the
    /// grace before it are kept) can be covered now; or it is time for a full one.
    func due() -> Bool {
        let generation = fs.contentChanges
        let now = Date()
        return passes.withLock { p in
            if p.lastPass == .distantPast || now.timeIntervalSince(p.lastPass) >= fullEvery { return true }
            if changeFeed {
                if p.fullOwed { return true }
                if now < p.spacedUntil { return false }
                return p.replaced.contains { $0.notBefore <= now } || p.retryAt.map { now >= $0 } == true
            }
            if p.noticed != generation { p.noticed = generation; p.lastChange = now }
            if p.generation != generation || p.remoteChange { return true }
            return p.lastChange > p.covered && now.addingTimeInterval(-grace) >= p.lastChange
        }
    }

    /// Stops the timer. A pass asked for by a failed write runs now instead of 1.5 s later, so
    /// that a remount right after an ENOSPC finds the space back (its preflight refused a data
    /// dir with under 16 MiB free). With `idle` (one node, the FUSE loop ended: no write is under
    /// way, every session committed or failed) it keeps no grace period: the failed write's
    /// blocks were stored a moment ago, and no writer is left that could still reference them.
    public func stop(idle: Bool) {
        stopping.store(true, ordering: .relaxed)   // a pass waiting for the cluster's scanner gives up
        timer?.cancel(); timer = nil
        guard takePending() else { return }
        queue.sync { _ = try? collect(cutoff: idle ? .now() : nil) }
    }

    /// Runs a pass shortly (coalescing bursts of requests).
    public func requestSoon() {
        passes.withLock { $0.fullOwed = true }
        let already = pending.withLock { p in defer { p = true }; return p }
        if already { return }
        queue.asyncAfter(deadline: .now() + 1.5) { [weak self] in
            guard let self, self.takePending() else { return }   // `stop` ran it already
            _ = try? self.collect()
        }
    }

    /// One full pass now, on the collector's queue (after any pass under way): `modelfs debug gc`.
    /// `noGrace` takes blocks stored up to now as candidates (safe only with no write under way).
    public func collectNow(noGrace: Bool = false) throws -> (blocks: UInt64, bytes: UInt64) {
        passes.withLock { $0.fullOwed = true }
        return try queue.sync { try collect(cutoff: noGrace ? .now() : nil) }
    }

    /// Whether a pass was asked for and has not run; it counts as run from here on.
    private func takePending() -> Bool { pending.withLock { p in defer { p = false }; return p } }

    /// One pass; returns the blocks and bytes removed. `cutoff` (tests, and `stop` when idle)
    /// replaces "`grace` seconds before the pass started".
    @discardableResult
    public func collect(cutoff: Timestamp? = nil) throws -> (blocks: UInt64, bytes: UInt64) {
        let begun = Date()
        // What this pass covers, on the clock `due` compares with (a change noticed before the
        // pass began minus the grace is covered).
        let cutoffDate = cutoff.map { Date(timeIntervalSince1970: Double($0.totalNanoseconds) / 1e9) } ?? begun.addingTimeInterval(-grace)
        let cutoff = cutoff ?? Self.timestamp(cutoffDate)
        let started = DispatchTime.now()
        let generation = fs.contentChanges
        let (full, ready, later) = passes.withLock { p -> (Bool, [Superseded], [Superseded]) in
            if p.noticed != generation { p.noticed = generation; p.lastChange = begun }
            let full = !changeFeed || p.fullOwed || p.lastPass == .distantPast || begun.timeIntervalSince(p.lastPass) >= fullEvery
            let ready = p.replaced.filter { $0.notBefore <= begun }, later = p.replaced.filter { $0.notBefore > begun }
            defer {
                p.generation = generation; p.remoteChange = false; p.lastPass = begun; p.stats.running = true
                p.covered = max(p.covered, cutoffDate); p.fullOwed = false; p.retryAt = nil
                p.replaced = later
            }
            return (full, ready, later)
        }
        defer { passes.withLock { $0.stats.running = false } }
        // Superseded versions a reader holds wait (all of them while the holds cannot be read).
        var taken = ready, kept: [Superseded] = []
        if !ready.isEmpty, let held {
            do {
                let inodes = try held()
                kept = ready.filter { $0.ino.map(inodes.contains) == true }
                if !kept.isEmpty { taken = ready.filter { !($0.ino.map(inodes.contains) == true) } }
            } catch {
                Log.every("gc holds", 60, .warning, "garbage collection: cannot read readers' holds (superseded versions wait): \(error)")
                kept = ready
                taken = []
            }
        }
        if !kept.isEmpty {
            let retry = begun.addingTimeInterval(heldRetry)
            passes.withLock { p in
                p.replaced += kept.map { var e = $0; e.notBefore = retry; return e }
                p.stats.heldDeferrals += UInt64(kept.count)
            }
        }
        // The blocks of the replaced versions taken (a manifest stored as a block is read for its
        // chunks; one that cannot be read any more leaves them to a full pass); the blocks of
        // those still waiting are kept, whatever else referenced them.
        var suspects = passes.withLock { $0.suspects }
        for e in taken { suspects.formUnion(e.blocks ?? blocks(of: e.ref)) }
        var keep = Set<BlockID>()
        for e in kept + later { keep.formUnion(e.blocks ?? blocks(of: e.ref)) }
        // Suspects need only settle; other blocks the grace (see the type's comment).
        let settled = Self.timestamp(begun.addingTimeInterval(-settle))
        let suspectCutoff = changeFeed ? max(cutoff, settled) : cutoff
        let open = fs.sessionBlocks()
        let stores = [store] + others
        var waiting = Set<BlockID>()
        var candidates = stores.map { s in
            Set(s.listBlocks().lazy.filter { b in
                let suspect = suspects.contains(b.id)
                guard full || suspect, !open.contains(b.id), !keep.contains(b.id) else { return false }
                if b.mtime < (suspect ? suspectCutoff : cutoff) { return true }
                if suspect { waiting.insert(b.id) }   // touched within `settle`: decided later
                return false
            }.map(\.id))
        }
        passes.withLock { p in
            p.suspects = waiting
            p.stats.suspects = waiting.count
            if !waiting.isEmpty { p.retryAt = begun.addingTimeInterval((changeFeed ? settle : grace) + 1) }
            if full { p.stats.fullPasses += 1 }
        }
        let wanted = candidates.reduce(into: Set<BlockID>()) { $0.formUnion($1) }
        var read = 0, elsewhere = false, yielded = 0.0
        do {
            var referenced: Set<BlockID>?
            if !full, !wanted.isEmpty, let scanner, wanted.count <= scanner.limit {
                referenced = try scanner.referenced(wanted, stop: { [weak self] in self?.stopping.load(ordering: .relaxed) ?? true })
                elsewhere = referenced != nil
            }
            if referenced == nil {
                let scan = try fs.scanReferences(wanted, rate: scanRate, pause: scanRate > 0 ? Self.pauseFactor : 0, page: Self.page,
                                                 yieldAtMost: scanYield)
                referenced = scan.referenced
                read = scan.manifests
                yielded = scan.yielded
            }
            if let referenced { for i in candidates.indices { candidates[i].subtract(referenced) } }
        } catch {
            // Undecided: the suspects wait for the next pass (a full one is owed again).
            passes.withLock { p in
                if full { p.fullOwed = true }
                p.suspects.formUnion(suspects)
                p.retryAt = Date().addingTimeInterval(min(grace, 60))
            }
            throw error
        }
        var blocks: UInt64 = 0, bytes: UInt64 = 0
        for (s, garbage) in zip(stores, candidates) where !garbage.isEmpty {
            var removed = false
            for id in garbage {
                let freed = s.removeIfStale(id, cutoff: suspects.contains(id) ? suspectCutoff : cutoff)
                if freed > 0 { blocks += 1; bytes += freed; removed = true }
            }
            if removed { try s.reclaim() }
        }
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - started.uptimeNanoseconds) / 1e9
        passes.withLock { p in
            p.stats.passes += 1
            p.stats.manifestsRead += UInt64(read)
            p.stats.lastManifestsRead = read
            p.stats.removedBlocks += blocks
            p.stats.removedBytes += bytes
            p.stats.lastPassSeconds = seconds
            p.stats.scanYieldedSeconds += yielded
            if elsewhere { p.stats.scannedElsewhere += 1 }
            // (The scanner spaces its own scans.)
            if read > 0 { p.spacedUntil = Date().addingTimeInterval(seconds) }
        }
        if blocks > 0 {
            Log.info("garbage collection removed \(blocks) blocks (\(bytes) bytes) in \(String(format: "%.2f", seconds)) s (\(elsewhere ? "the cluster's scanner read the manifests" : "\(read) manifests read"))")
        }
        return (blocks, bytes)
    }
}

/// Answers garbage collection's question for a cluster: which of a pass's candidates a committed
/// manifest references, from one scan of the namespace that serves every node asking at the time
/// (`ReferenceScans` in ModelFSPeer).
public protocol ReferenceScanner: Sendable {
    /// Candidates an ask may carry at most; a pass with more reads the manifests itself.
    var limit: Int { get }
    /// Which of `candidates` the committed manifests reference, every manifest read after this
    /// call began; nil when no scan can answer now (the pass then reads them itself). `stop`
    /// true: it gives up by throwing.
    func referenced(_ candidates: Set<BlockID>, stop: @escaping @Sendable () -> Bool) throws -> Set<BlockID>?
}
