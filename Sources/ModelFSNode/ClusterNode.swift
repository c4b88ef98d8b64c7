import Foundation
import ModelFS
import ModelFSCore
import ModelFSMeta
import ModelFSPeer
import ModelFSWire
import ModelFSStore
import Synchronization

/// What `modelfs status` shows of the cluster, from one node.
public struct ClusterStatus: Codable, Sendable {
    public struct Node: Codable, Sendable {
        public var id: String
        public var address: String
        public var up: Bool
        public var labels: [String: String]
        public var usedBytes: UInt64
        public var blocks: UInt64
        public var capacityBytes: UInt64
        public var isThisNode: Bool
        public var draining: Bool
        /// Peer traffic in and out, bytes per second (as the node last published it).
        public var inRate: Double
        public var outRate: Double

        public init(id: String, address: String, up: Bool, labels: [String: String], usedBytes: UInt64, blocks: UInt64,
             capacityBytes: UInt64, isThisNode: Bool, draining: Bool, inRate: Double, outRate: Double) {
            self.id = id; self.address = address; self.up = up; self.labels = labels; self.usedBytes = usedBytes
            self.blocks = blocks; self.capacityBytes = capacityBytes; self.isThisNode = isThisNode
            self.draining = draining; self.inRate = inRate; self.outRate = outRate
        }

        /// Fields added later default when absent, so this CLI reads an older daemon's status.
        public init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            id = try c.decode(String.self, forKey: .id)
            address = try c.decode(String.self, forKey: .address)
            up = try c.decode(Bool.self, forKey: .up)
            labels = try c.decode([String: String].self, forKey: .labels)
            usedBytes = try c.decode(UInt64.self, forKey: .usedBytes)
            blocks = try c.decode(UInt64.self, forKey: .blocks)
            capacityBytes = try c.decode(UInt64.self, forKey: .capacityBytes)
            isThisNode = try c.decode(Bool.self, forKey: .isThisNode)
            draining = try c.decodeIfPresent(Bool.self, forKey: .draining) ?? false
            inRate = try c.decodeIfPresent(Double.self, forKey: .inRate) ?? 0
            outRate = try c.decodeIfPresent(Double.self, forKey: .outRate) ?? 0
        }
    }
    public var nodeID: String
    public var address: String
    public var nodes: [Node]
    public var replication: ReplicationStatus
    public var cacheBytes: UInt64
    public var cacheBudget: UInt64
    public var cacheStats: ClusterBlockStore.Stats
    /// The last failure talking to etcd about membership, if it has not recovered.
    public var membershipError: String?
    /// The cluster's healer: what its last pass found and what it copied.
    public var heal: HealStatus?
    /// This node's scrubber (absent from an older daemon).
    public var scrub: ScrubStatus?
    /// How this node's healing copies yield to its foreground (absent from an older daemon).
    public var healYield: ForegroundYield.Status?
    /// How peer traffic and etcd traffic are protected: "unencrypted" or "TLS" (absent from an
    /// older daemon).
    public var peerTraffic: String?
    public var etcdTraffic: String?
    /// Large files loaded with the other nodes loading them at once (absent from an older daemon).
    public var fanout: FanoutStatus?
    /// Superseded versions this node's readers hold now (garbage collection leaves their blocks
    /// on every node), and holds placed since start (absent from an older daemon).
    public var readerHolds: Int?
    public var readerHoldsPlaced: UInt64?
    /// The cluster's one scan of the manifests for garbage collection: whether this node is the
    /// scanner, what it read and answered, and what this node asked (absent from an older daemon).
    public var gcScans: ReferenceScans.Status?
}

public struct FanoutStatus: Codable, Sendable {
    /// Files at least this large are shared.
    public var minSize: UInt64
    public var totals: Fanout.Totals
    /// Files being loaded now and the last ones finished.
    public var files: [Fanout.FileStats]
}

/// The parts a cluster node adds to a mount (DESIGN.md §5): its peer server, its membership,
/// the block store that reaches peers, and the replicator.
public final class ClusterNode: @unchecked Sendable {
    public let id: String
    public let server: PeerServer
    /// The peer routes, made once the filesystem exists (`attach`): they answer for it.
    public private(set) var service: PeerService?
    public let metricsToken: String?
    /// This node's read cache (the peer routes serve from it too).
    public let cache: PackBlockStore
    public let membership: Membership
    public let client: PeerClient
    public let blocks: ClusterBlockStore
    public let replicator: Replicator
    public let local: PackBlockStore
    public let writerLock: EtcdWriterLock
    public let namespace: EtcdTransactionalStore?
    public let scrubber: Scrubber
    public let etcd: EtcdClient
    public let clusterName: String
    /// Mutual TLS with the other nodes, when configured.
    public let tls: PeerTLS?
    public let settings: ClusterSettings
    public let metrics: PeerMetrics
    public let yield: ForegroundYield
    /// Shares the loading of large files among the nodes loading them at once.
    public let fanout: Fanout
    /// Readers' holds on superseded versions (made once the filesystem exists, `attach`).
    public private(set) var holds: VersionHolds!
    /// The manifests read once for every node's garbage collection (made in `attach`).
    public private(set) var scans: ReferenceScans!
    /// Made once the filesystem exists (`attach`).
    public private(set) var healer: Healer?
    private var watcher: EtcdWatcher?
    /// Every node seen since start: those no longer live are shown as down.
    private let seen = Mutex<[String: NodeInfo]>([:])

    public init(id: String, settings: ClusterSettings, meta: String, engine: any MetadataEngine, local: PackBlockStore, dataDir: String,
                metricsToken: String? = nil) throws {
        self.id = id
        self.local = local
        let (endpoints, name) = try MetadataURL.parseEtcd(meta)
        let etcd = try EtcdClient(endpoints: endpoints, security: settings.etcdSecurity)
        self.etcd = etcd
        clusterName = name
        self.settings = settings
        // Checked before anything is written: a wrong address claims nothing.
        guard let listen = parseHostPort(settings.listen) else { throw FSError.invalid("--listen \(settings.listen): expected HOST:PORT") }
        try ClusterNode.claim(dataDir: dataDir, cluster: name, client: etcd)
        let cache = try PackBlockStore(root: dataDir + "/cache") { Log.error($0) }
        let metrics = PeerMetrics()
        self.metrics = metrics
        let tls = try settings.tls.map { try PeerTLS(ca: $0.ca, cert: $0.cert, key: $0.key, cluster: name) }
        self.tls = tls
        client = PeerClient(secret: settings.secret, tls: tls)
        let yield = ForegroundYield(busyRate: settings.healRateBusy)
        self.yield = yield
        self.metricsToken = metricsToken
        self.cache = cache
        // Bound now (the port is advertised), served from `start`.
        do {
            server = try PeerServer(host: listen.host, port: listen.port, maxBody: PeerService.maxBody, tls: tls)
        } catch {
            throw FSError(EADDRINUSE, "cannot listen on \(settings.listen) for peers: \(error); choose another --listen")
        }
        let advertise = settings.advertise ?? "\(listen.host):\(server.port)"
        let capacity: UInt64 = {
            var vfs = statvfs()
            return statvfs(dataDir, &vfs) == 0 ? UInt64(vfs.f_blocks) * UInt64(vfs.f_frsize) : 0
        }()
        let usage: Membership.Usage = {
            let u = local.usage()
            let traffic = metrics.traffic
            return (u.bytes, u.blocks, capacity, traffic.bytesIn, traffic.bytesOut)
        }
        membership = Membership(client: etcd, cluster: name,
                                me: NodeInfo(id: id, address: advertise, labels: settings.labels),
                                ttl: settings.leaseTtl, usage: usage)
        writerLock = EtcdWriterLock(client: etcd, cluster: name, membership: membership, peers: client)
        namespace = (engine as? KVMetadataEngine<EtcdTransactionalStore>)?.store
        let scrubber = Scrubber(local: local, membership: membership, client: client, rate: settings.scrubRate,
                                every: settings.scrubEvery)
        self.scrubber = scrubber
        let fanout = Fanout(etcd: etcd, cluster: name, membership: membership, minSize: settings.fanoutMinSize)
        self.fanout = fanout
        blocks = ClusterBlockStore(local: local, cache: cache, cacheBudget: settings.cacheSize,
                                   membership: membership, client: client, yield: yield, fanout: fanout,
                                   formatPrefetch: settings.formatPrefetch,
                                   onCorrupt: { id in scrubber.repairSoon(id) })
        replicator = try Replicator(dataDir: dataDir, local: local, membership: membership, client: client, meta: engine,
                                    defaultPolicy: settings.policy, timeout: settings.ackTimeout,
                                    stagingLimit: settings.stagingSize, chain: settings.chain)
        metrics.setGauges { [weak self] in
            guard let self else { return [] }
            let r = replicator.status()
            let c = blocks.stats
            let sc = scrubber.status
            let h = healer?.localStatus
            let y = yield.status
            let f = fanout.status.totals
            return [("modelfs_fanout_from_holders_bytes_total", Double(f.fromHolders)),
                    ("modelfs_fanout_from_loaders_bytes_total", Double(f.fromLoaders)),
                    ("modelfs_fanout_served_to_loaders_bytes_total", Double(f.servedToLoaders)),
                    ("modelfs_fanout_fallbacks_total", Double(f.fallbacks)),
                    ("modelfs_peer_rejected_copies_total", Double(c.rejectedCopies)),("modelfs_pending_replication_bytes", Double(r.pendingBytes)),
                    ("modelfs_oldest_pending_write_seconds", r.oldestPendingSeconds),
                    ("modelfs_scrub_progress", sc.progress),
                    ("modelfs_scrubbed_bytes_total", Double(sc.scrubbedBytes)),
                    ("modelfs_scrub_corrupt_found_total", Double(sc.corruptFound)),
                    ("modelfs_scrub_repaired_total", Double(sc.repaired)),
                    ("modelfs_heal_under_replicated_bytes", Double(h?.underReplicatedBytes ?? 0)),
                    ("modelfs_heal_unreadable_bytes", Double(h?.unreadableBytes ?? 0)),
                    ("modelfs_heal_copied_bytes_total", Double(h?.copiedBytes ?? 0)),
                    ("modelfs_heal_yielded_seconds_total", y.yieldedSeconds),
                    ("modelfs_heal_sent_bytes_total", Double(y.sentBytes)),
                    ("modelfs_heal_received_bytes_total", Double(y.receivedBytes)),
                    ("modelfs_under_replicated_bytes", Double(r.underReplicatedBytes)),
                    ("modelfs_replication_queue_jobs", Double(r.pendingJobs)),
                    ("modelfs_replicated_bytes_total", Double(r.replicatedBytes)),
                    ("modelfs_cache_bytes", Double(blocks.cache.usage().bytes)),
                    ("modelfs_cache_hits_total", Double(c.cacheHits + c.localHits)),
                    ("modelfs_cache_misses_total", Double(c.peerFetches + c.failedFetches)),
                    ("modelfs_live_nodes", Double(membership.nodes.count))]
        }
    }

    /// A data dir belongs to one cluster: its blocks and replication journal mean nothing to
    /// another. The cluster's id (made once, in etcd) is written to DATA/cluster on first join;
    /// a data dir of another cluster, or of a single-node filesystem, is refused.
    public static func claim(dataDir: String, cluster: String, client: EtcdClient) throws {
        let key = EtcdKeys(cluster: cluster).clusterID
        let fresh = Data(UUID().uuidString.lowercased().utf8)
        let id: String
        do {
            let r = try client.txn(compare: [.absent(key)], success: [.put(key, fresh)], failure: [.get(key)], idempotent: true)
            id = r.succeeded ? String(decoding: fresh, as: UTF8.self)
                : String(decoding: r.ranges.first?.first?.value ?? Data(), as: UTF8.self)
        } catch {
            throw FSError.io("cannot reach etcd at \(client.endpoints.joined(separator: ",")): \(error); start the etcd cluster or fix --meta")
        }
        let mine = "\(cluster) \(id)"
        let path = dataDir + "/cluster"
        if let recorded = try? String(contentsOfFile: path, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines) {
            guard recorded == mine else {
                throw FSError.invalid("data dir \(dataDir) belongs to cluster \"\(recorded)\", not \"\(mine)\"; mount it with that cluster's --meta or choose another --data")
            }
            return
        }
        if FileManager.default.fileExists(atPath: dataDir + "/meta.db") {
            throw FSError.invalid("data dir \(dataDir) holds a single-node filesystem (meta.db); choose another --data for a cluster node")
        }
        try (mine + "\n").write(toFile: path, atomically: true, encoding: .utf8)
    }

    /// The parts that need the filesystem: the peer routes (`GET /v1/writing` asks it) and the
    /// healer (it walks the namespace).
    public func attach(_ fs: FileSystem) {
        let (client, membership, local, scrubber, yield, id, blocks) = (client, membership, local, scrubber, yield, id, blocks)
        let actions = PeerActions(
            repair: { id in scrubber.repair(id) },
            copy: { order in Healer.perform(order, local: local, client: client, me: id, yield: yield) },
            // A chained PUT goes on to the next node of its chain, by id among the live members
            // (never to an address a request names).
            forward: { block, chain, durable in client.forward(block, chain: chain, live: membership.nodes, durable: durable) },
            writing: { ino in fs.writing(ino) },
            relay: { block, file, via in try blocks.relay(block, for: file, via: via) })
        service = PeerService(secret: settings.secret, local: local, cache: cache, metrics: metrics, yield: yield,
                              readToken: metricsToken, actions: actions,
                              status: { [weak self] in (try? JSONEncoder().encode(self?.status())) ?? Data("{}".utf8) })
        healer = Healer(fs: fs, replicator: replicator, membership: membership, client: client, local: local, etcd: etcd,
                        cluster: clusterName, interval: settings.healInterval, deadAfter: settings.deadAfter,
                        rate: settings.healRate, yield: yield, fullEvery: settings.healFullEvery,
                        scanRate: settings.healScanRate)
        let holds = VersionHolds(etcd: etcd, keys: EtcdKeys(cluster: clusterName), membership: membership,
                                 readerVersion: { [weak fs] ino in fs?.readerVersion(ino) })
        fs.events.onReadView { [weak holds] ino, version in holds?.opened(ino, version: version) }
        self.holds = holds
        scans = ReferenceScans(etcd: etcd, keys: EtcdKeys(cluster: clusterName), membership: membership, fs: fs,
                               scanRate: settings.gcScanRate)
    }

    public func start() throws {
        // Serving before joining: once the others see this node, they may send it blocks.
        if let service { server.serve(service) }
        do { try membership.start() } catch {
            throw FSError.io("cannot join the cluster through etcd: \(error); check --meta and that etcd is up")
        }
        replicator.start()
        fanout.start()
        scrubber.start()
        healer?.start()
        holds?.start()
        scans?.start()
        Log.info("node \(id) joined the cluster at \(membership.me.address) (peer port \(server.port)); \(membership.nodes.count) nodes live")
    }

    /// Watches the namespace for other nodes' changes: close-to-open across nodes is pushed by
    /// this (the kernel's caches are invalidated within milliseconds), not left to timeouts.
    public func watchNamespace(_ onChange: @escaping @Sendable (NamespaceChange) -> Void) throws {
        guard let namespace else { return }
        let start = try namespace.client.range(namespace.keys.nextInode).revision
        let (fanout, scans) = (fanout, scans)
        let w = EtcdWatcher(client: namespace.client, prefix: namespace.namespacePrefix) { events in
            for e in events {
                if let c = namespace.change(e) { onChange(c) } else { fanout.observe(e); scans?.observe(e) }
            }
        }
        w.start(after: start)
        watcher = w
    }

    public func stop() {
        watcher?.stop()
        scans?.stop()
        holds?.stop()
        healer?.stop()
        fanout.stop()
        scrubber.stop()
        replicator.stop()
        membership.stop()
        server.shutdown()
        client.shutdown()
    }

    public func status() -> ClusterStatus {
        let live = membership.nodes
        let all = seen.withLock { s -> [NodeInfo] in
            // The roster (nodes that died before this one started too), minus removed nodes.
            let known = membership.known
            s = s.filter { e in known.contains { $0.id == e.key } }
            for n in known where s[n.id] == nil { s[n.id] = n }
            for n in live { s[n.id] = n }
            return s.values.sorted { $0.id < $1.id }
        }
        let liveIDs = Set(live.map(\.id))
        let draining = membership.draining
        let nodes = all.map { n in
            ClusterStatus.Node(id: n.id, address: n.address, up: liveIDs.contains(n.id), labels: n.labels, usedBytes: n.usedBytes,
                               blocks: n.blocks, capacityBytes: n.capacityBytes, isThisNode: n.id == id,
                               draining: draining.contains(n.id), inRate: n.inRate ?? 0, outRate: n.outRate ?? 0)
        }
        return ClusterStatus(nodeID: id, address: membership.me.address, nodes: nodes, replication: replicator.status(),
                             cacheBytes: blocks.cache.usage().bytes, cacheBudget: blocks.cacheBudget, cacheStats: blocks.stats,
                             membershipError: membership.lastError, heal: healer?.clusterStatus(), scrub: scrubber.status,
                             healYield: yield.status,
                             peerTraffic: tls.map { "mutual TLS 1.3 (cluster \($0.cluster), this node's certificate CN=\($0.node), expires in \(Int($0.expiresIn / 86400)) days)" }
                                 ?? "unencrypted (HTTP and raw block streams; the cluster secret authenticates)",
                             etcdTraffic: (settings.etcdEncrypted ? "TLS" : "unencrypted")
                                 + (settings.etcdSecurity.user.map { ", etcd user \($0)" } ?? ", no etcd user"),
                             fanout: { let f = fanout.status; return FanoutStatus(minSize: fanout.minSize, totals: f.totals, files: f.files) }(),
                             readerHolds: holds?.counts.holding, readerHoldsPlaced: holds?.counts.placed, gcScans: scans?.status)
    }
}
