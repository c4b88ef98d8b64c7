import Foundation
import ModelFSCore
import ModelFSMeta
import ModelFSWire
import Synchronization

/// Peer-to-peer fan-out: the nodes loading the same large file version at the same time share
/// the work, so that each block leaves its holders about once however many nodes load it.
///
/// A node that fetches a block of a file version of at least `minSize` bytes from peers joins
/// that version's loaders: `f/INO.VERSION/ID` in etcd, under the node's membership lease (a node
/// that dies leaves the set with its lease). It reads the set once when it joins and follows it
/// through the namespace watch. Each block of the file is passed down a tree of the loaders:
/// they are ranked in the block's rendezvous order (`Placement.order`, the same on every node),
/// the first fetches the block from its holders, and the loader ranked p asks the one ranked
/// (p-1)/`degree` (`GET ...?relay=FILE&via=CHAIN`), which answers from memory or its read
/// cache, or first gets the block the same way. The trees differ block by block, so every
/// loader pulls the file once and sends about as much, the holders send it once in all, and a
/// block reaches N loaders in log_degree(N) hops (one loader serving the N-1 others would take
/// N-1 block times per block: a reader's window of 8 blocks would then get 8/(N-1) of its
/// link). A request carries the chain it came through and is never passed to a node on it, and
/// a relay waits a bounded time for a fetch already under way, so differing views of the set
/// (a loader joining) cannot deadlock. A loader that fails, times out or answers 404 is skipped
/// and the holders serve. Every block is verified on arrival as always (a corrupt copy from a
/// loader is counted and fetched from the holders).
///
/// A node stays in a version's set until it has not read from it for `linger` seconds.
public final class Fanout: @unchecked Sendable {
    let etcd: EtcdClient
    let keys: EtcdKeys
    let membership: Membership
    /// Files smaller than this are loaded from the holders alone (a few blocks gain nothing).
    public let minSize: UInt64
    let linger: Double
    private let loop = BackgroundLoop("modelfs-fanout")

    /// What one file version's loading brought, as `modelfs status` shows it.
    public struct FileStats: Codable, Sendable, Equatable {
        public var file: String
        /// Other nodes loading it now, as this node sees them.
        public var loaders: Int = 0
        /// Bytes fetched from the blocks' holders (and any peer that had them cached).
        public var fromHolders: UInt64 = 0
        /// Bytes fetched from other loaders (relayed).
        public var fromLoaders: UInt64 = 0
        /// Bytes this node relayed to other loaders of it.
        public var servedToLoaders: UInt64 = 0
        /// Blocks asked of a loader that did not give them (gone, slow, 404, corrupt): taken
        /// from the holders instead.
        public var fallbacks: UInt64 = 0
        /// Copies from peers that did not hash to their id (rejected, fetched elsewhere).
        public var rejected: UInt64 = 0
        /// The format recognised for prefetch (`safetensors`), if any.
        public var format: String?
        /// Bytes the format-aware prefetch fetched ahead of the loader.
        public var prefetched: UInt64 = 0
        /// Blocks the loader found in the cache, brought there by the prefetch.
        public var prefetchHits: UInt64 = 0
        /// Blocks of a prefetched file the loader had to fetch itself (the prefetch was behind,
        /// or guessed wrong).
        public var prefetchMisses: UInt64 = 0
    }

    /// Every file's figures added up, since start.
    public struct Totals: Codable, Sendable, Equatable {
        public var fromHolders: UInt64 = 0
        public var fromLoaders: UInt64 = 0
        public var servedToLoaders: UInt64 = 0
        public var fallbacks: UInt64 = 0
        public var rejected: UInt64 = 0
        public var prefetched: UInt64 = 0
        public var prefetchHits: UInt64 = 0
        public var prefetchMisses: UInt64 = 0
    }

    private final class Entry {
        /// Other loaders, by node id.
        var loaders: Set<String> = []
        /// Loaders that answered a relay with 404 (they stopped loading it): not asked again
        /// unless they join again.
        var refused: Set<String> = []
        var joined = false
        /// Whether this node tried to join (an entry made for prefetch figures has not).
        var tried = false
        /// Set while joining: readers wait for it until `joinWaitEnds` (a second after the
        /// join began; an etcd slow to answer must not hold every block up) so the first blocks
        /// are shared too.
        var joining: DispatchGroup?
        var joinWaitEnds = DispatchTime.now()
        var lastUse = Date()
        var stats: FileStats
        init(_ file: FileVersion) { stats = FileStats(file: file.text) }
    }
    private struct State {
        var files: [FileVersion: Entry] = [:]
        var totals = Totals()
        /// Recently finished files' figures, newest last (status shows them a while).
        var finished: [FileStats] = []
        var stopped = false

        mutating func entry(_ file: FileVersion) -> Entry {
            if let e = files[file] { return e }
            let e = Entry(file)
            files[file] = e
            return e
        }
    }
    private let state = Mutex(State())

    public init(etcd: EtcdClient, cluster: String, membership: Membership, minSize: UInt64, linger: Double = 30) {
        self.etcd = etcd
        keys = EtcdKeys(cluster: cluster)
        self.membership = membership
        self.minSize = minSize
        self.linger = linger
    }

    public func start() {
        loop.start(after: 5) { [weak self] in
            self?.leaveIdle()
            return 5
        }
    }

    /// Leaves every set (deletes this node's keys).
    public func stop() {
        loop.stop(timeout: 0)
        let files = state.withLock { s -> [FileVersion] in
            s.stopped = true
            let f = s.files.filter { $0.value.joined }.map(\.key)
            s.files = [:]
            return f
        }
        for f in files { try? etcd.delete(keys.loader(of: f, node: membership.me.id)) }
    }

    /// Whether blocks of `file` are fetched cooperatively at all.
    public func applies(to file: FileVersion) -> Bool { minSize > 0 && file.size >= minSize }

    /// Children per loader in a block's tree.
    public static let degree = 4
    /// Longest chain a relay request may have come through (beyond it: the holders).
    public static let maxChain = 16

    /// The loader `me` asks for block `id`, given the loaders (`me` among them): its parent in
    /// the block's tree; nil for the tree's root (it fetches from the holders).
    public static func parent(_ id: BlockID, of me: String, among loaders: [NodeInfo]) -> NodeInfo? {
        let ranked = Placement.order(id, loaders)
        guard let p = ranked.firstIndex(where: { $0.id == me }), let up = parentRank(p) else { return nil }
        return ranked[up]
    }

    /// In a block's tree (its loaders in rendezvous order), the rank of the parent of the loader
    /// ranked `rank`; nil for the root.
    public static func parentRank(_ rank: Int, degree: Int = degree) -> Int? { rank > 0 ? (rank - 1) / degree : nil }

    /// The loader to ask for block `id` of `file`, nil when this node should fetch it from the
    /// holders itself (it is the root of the block's tree, no other loader is live, its parent
    /// is on `via`, the chain this request came through, or the file is too small). Joins the
    /// file's loaders on first use.
    public func source(_ id: BlockID, file: FileVersion, via: [String] = []) -> NodeInfo? {
        guard applies(to: file) else { return nil }
        let me = membership.me.id
        let (wait, until, join) = state.withLock { s -> (DispatchGroup?, DispatchTime, Bool) in
            guard !s.stopped else { return (nil, .now(), false) }
            let e = s.entry(file)
            e.lastUse = Date()
            if e.tried { return (e.joining, e.joinWaitEnds, false) }
            e.tried = true
            let g = DispatchGroup()
            g.enter()
            e.joining = g
            e.joinWaitEnds = .now() + 1
            return (g, e.joinWaitEnds, true)
        }
        if join { DispatchQueue.global(qos: .userInitiated).async { self.join(file, me: me) } }
        // Loaders starting together find each other within the join (a put and a read): a
        // reader waits for it, briefly, rather than fetching its first blocks alone.
        if let wait, until > .now() { _ = wait.wait(timeout: until) }
        let candidates = state.withLock { s -> Set<String> in
            guard let e = s.files[file] else { return [] }
            return e.loaders.subtracting(e.refused)
        }
        guard !candidates.isEmpty, via.count < Self.maxChain else { return nil }
        let live = membership.nodes.filter { candidates.contains($0.id) && $0.id != me }
        guard let parent = Self.parent(id, of: me, among: live + [membership.me]), !via.contains(parent.id) else { return nil }
        return parent
    }

    private func join(_ file: FileVersion, me: String) {
        defer {
            let g = state.withLock { s -> DispatchGroup? in
                let g = s.files[file]?.joining
                s.files[file]?.joining = nil
                return g
            }
            g?.leave()
        }
        let lease = membership.lease
        guard lease != 0 else { return }
        do {
            try etcd.put(keys.loader(of: file, node: me), Data(), lease: lease)
            let prefix = keys.loaders(of: file)
            let found = try etcd.rangeAll(prefix: prefix, keysOnly: true).kvs.map {
                String(decoding: $0.key.dropFirst(prefix.count), as: UTF8.self)
            }
            state.withLock { s in
                guard let e = s.files[file] else { return }
                e.joined = true
                e.loaders.formUnion(found.filter { $0 != me })
            }
        } catch {
            Log.every("fanout join", 60, .warning, "cannot join the loaders of \(file) in etcd (its blocks come from their holders): \(error)")
        }
    }

    /// Follows loaders joining and leaving (the namespace watch's events under `f/`).
    public func observe(_ event: EtcdEvent) {
        let prefix = keys.loaders
        guard event.kv.key.starts(with: prefix) else { return }
        let rest = String(decoding: event.kv.key.dropFirst(prefix.count), as: UTF8.self)
        guard let slash = rest.firstIndex(of: "/"), let file = FileVersion(text: rest[..<slash]) else { return }
        let node = String(rest[rest.index(after: slash)...])
        let me = membership.me.id
        state.withLock { s in
            guard let e = s.files[file] else { return }
            if node == me {
                // This node's own key went (its lease was replaced): join again on next use.
                if event.isDelete { s.files[file] = nil }
                return
            }
            if event.isDelete {
                e.loaders.remove(node)
            } else {
                e.loaders.insert(node)
                e.refused.remove(node)
            }
        }
    }

    /// Whether `file` is being loaded with other loaders now (its blocks come through trees).
    public func shared(_ file: FileVersion) -> Bool {
        guard applies(to: file) else { return false }
        return state.withLock { s in s.files[file].map { !$0.loaders.subtracting($0.refused).isEmpty } ?? false }
    }

    /// The version as this node loads it now (with its size), nil if it does not (then it
    /// relays none of its blocks to other loaders).
    public func loading(_ file: FileVersion) -> FileVersion? {
        state.withLock { s in
            guard let i = s.files.index(forKey: file) else { return nil }
            s.files.values[i].lastUse = Date()
            return s.files.keys[i]
        }
    }

    public enum Outcome {
        case fromHolders(Int)
        case fromLoader(Int)
        /// A loader asked did not give the block; `refused`: it answered 404 (not loading it).
        case fallback(loader: String, refused: Bool)
        case rejected
        case served(Int)
        case planned(format: String)
        case prefetched(Int)
        case prefetchHit
        case prefetchMiss
    }

    public func note(_ file: FileVersion, _ outcome: Outcome) {
        state.withLock { s in
            guard !s.stopped else { return }
            let e: Entry? = s.entry(file)
            e?.lastUse = Date()
            switch outcome {
            case .fromHolders(let n): e?.stats.fromHolders += UInt64(n); s.totals.fromHolders += UInt64(n)
            case .fromLoader(let n): e?.stats.fromLoaders += UInt64(n); s.totals.fromLoaders += UInt64(n)
            case .fallback(let loader, let refused):
                e?.stats.fallbacks += 1; s.totals.fallbacks += 1
                if refused { e?.refused.insert(loader) }
            case .rejected: e?.stats.rejected += 1; s.totals.rejected += 1
            case .served(let n): e?.stats.servedToLoaders += UInt64(n); s.totals.servedToLoaders += UInt64(n)
            case .planned(let format): e?.stats.format = format
            case .prefetched(let n): e?.stats.prefetched += UInt64(n); s.totals.prefetched += UInt64(n)
            case .prefetchHit: e?.stats.prefetchHits += 1; s.totals.prefetchHits += 1
            case .prefetchMiss: e?.stats.prefetchMisses += 1; s.totals.prefetchMisses += 1
            }
        }
    }

    /// The files being loaded now and those finished lately (newest last), and the totals.
    public var status: (files: [FileStats], totals: Totals) {
        state.withLock { s in
            let now = s.files.values.map { e -> FileStats in
                var f = e.stats
                f.loaders = e.loaders.subtracting(e.refused).count
                return f
            }.sorted { $0.file < $1.file }
            return (s.finished + now, s.totals)
        }
    }

    /// Leaves the sets of files not read from for `linger` seconds.
    private func leaveIdle() {
        let cutoff = Date(timeIntervalSinceNow: -linger)
        let idle = state.withLock { s -> [FileVersion] in
            let idle = s.files.filter { $0.value.joining == nil && $0.value.lastUse < cutoff }
            for (file, e) in idle {
                s.files[file] = nil
                s.finished.append(e.stats)
            }
            if s.finished.count > 16 { s.finished.removeFirst(s.finished.count - 16) }
            return idle.filter { $0.value.joined }.map(\.key)
        }
        for f in idle {
            do { try etcd.delete(keys.loader(of: f, node: membership.me.id)) } catch {
                Log.warning("cannot leave the loaders of \(f) in etcd (its key goes with this node's lease): \(error)")
            }
        }
    }
}
