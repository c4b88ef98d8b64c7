import Foundation
import ModelFS
import ModelFSCore
import ModelFSFUSE
import ModelFSMeta
import ModelFSPeer
import ModelFSStore

/// One mount's parts, composed (the daemon's process work — the data dir's lock, the registry,
/// the control socket, signals — stays in the CLI): the block store, the metadata engine, a
/// cluster node's peer parts, the flat copies, the filesystem, garbage collection, tiering and
/// the FUSE server. Everything is given at construction, in dependency order; `start`,
/// `mounted` and `stop` run the loops.
public final class Node: Sendable {
    public let settings: NodeSettings
    public let store: PackBlockStore
    public let engine: any MetadataEngine
    /// A cluster node's peer server, membership, replicator, healer… (nil alone).
    public let cluster: ClusterNode?
    public let flat: FlatCopies?
    public let fs: FileSystem
    public let gc: GarbageCollector
    public let tiering: Tiering?
    public let server: FuseServer

    public init(_ settings: NodeSettings) throws {
        self.settings = settings
        let dataDir = settings.dataDir, meta = settings.meta
        let staging = dataDir + "/staging"
        if mkdir(staging, 0o700) != 0 && errno != EEXIST { throw posixError("mkdir", staging) }
        let store = try PackBlockStore(root: dataDir, slower: settings.tiers) { Log.error($0) }
        self.store = store
        if let c = settings.cluster {
            let id = try c.nodeID ?? Node.nodeID(dataDir)
            engine = try MetadataURL.open(meta, rootUID: getuid(), rootGID: getgid(), clientID: id, etcd: c.etcdSecurity)
            cluster = try ClusterNode(id: id, settings: c, meta: meta, engine: engine, local: store, dataDir: dataDir,
                                      metricsToken: settings.metricsToken)
        } else {
            if let recorded = try? String(contentsOfFile: dataDir + "/cluster", encoding: .utf8) {
                throw FSError.invalid("data dir \(dataDir) belongs to cluster \"\(recorded.trimmingCharacters(in: .whitespacesAndNewlines))\"; mount it with --meta etcd://... or choose another --data")
            }
            engine = try MetadataURL.open(meta, rootUID: getuid(), rootGID: getgid())
            cluster = nil
        }
        var fsOptions = FileSystemOptions(stagingDir: staging)
        // Write-only opens bypass the page cache, unless the writeback cache holds the writes.
        fsOptions.directWrites = !settings.writebackCache
        if meta.hasPrefix("sqlite:") {
            var st = stat()
            let dbDir = (String(meta.dropFirst("sqlite:".count)) as NSString).deletingLastPathComponent
            fsOptions.metadataOnStoreFilesystem = stat(dbDir, &st) == 0 && UInt64(st.st_dev) == store.device
        }
        switch settings.passthrough {
        case .on: flat = try FlatCopies(directory: dataDir + "/flat", budget: settings.flatBudget)
        case .off(let why): flat = nil; Log.info("passthrough off: \(why)")
        }
        let events = FileSystemEvents()
        fs = try FileSystem(meta: engine, store: cluster?.blocks ?? store, options: fsOptions, flatCopies: flat,
                            replication: cluster?.replicator, writerLock: cluster?.writerLock, events: events)
        cluster?.attach(fs)
        // A cluster node's blocks are referenced by other nodes' commits too: they are kept
        // --gc-delay seconds (GarbageCollector.grace), and its read cache is swept as well.
        if let cluster, let c = settings.cluster {
            gc = GarbageCollector(fs: fs, store: store, others: [cluster.blocks.cache],
                                  interval: min(60, max(1, c.gcDelay / 2)), grace: c.gcDelay,
                                  scanRate: c.gcScanRate, fullEvery: max(3600, c.gcDelay), changeFeed: true,
                                  supersededDelay: min(c.gcSupersededDelay, c.gcDelay),
                                  held: { [holds = cluster.holds] in try holds.heldInodes() }, scanner: cluster.scans)
        } else {
            gc = GarbageCollector(fs: fs, store: store, grace: 1)
        }
        // On a cluster, other nodes change the namespace: short kernel timeouts (the watch
        // invalidates sooner), and no cached "no such name" (a name another node creates must
        // show at once). Alone, nobody else does: long ones make warm stat free.
        let timeout = cluster == nil ? 60.0 : 1.0
        server = FuseServer(fs: fs, dataDir: dataDir, entryTimeout: timeout, attrTimeout: timeout,
                            negativeTimeout: cluster == nil ? timeout : 0, writebackCache: settings.writebackCache,
                            alwaysReaddirPlus: cluster != nil)
        // Tiers: blocks move between them by rule and age (Tiering), a pass every tenth of the age
        // (between 1 s and 10 min).
        let age = settings.tierAge
        tiering = settings.tiers.isEmpty ? nil : Tiering(fs: fs, store: store, age: age, interval: min(600, max(1, age / 10)))
    }

    /// Before the mount: a cluster node serves its peers, joins, and watches the namespace
    /// (other nodes' changes invalidate the kernel's caches; replaced versions reach the
    /// collector and the readers' holds).
    public func start() throws {
        guard let cluster else { return }
        try cluster.start()
        let (me, fs, server, gc, holds) = (cluster.id, fs, server, gc, cluster.holds)
        try cluster.watchNamespace { change in
            fs.noteNamespaceChange()
            switch change {
            case .inode(let ino, let version, let origin):
                holds?.changed(ino, version: version)
                guard origin != me else { return }
                let (known, pages) = fs.remoteChange(ino, version: version)
                if known { server.invalidateInode(ino.rawValue, pages: pages) }
            case .entry(let parent, let name, let origin):
                guard origin != me else { return }
                server.invalidateEntry(parent: parent.rawValue, name: name)
            case .manifest(let ino, let replaced):
                if let replaced { gc.suspect(replaced, ino: ino) }
            }
        }
    }

    /// Once the mount answers: the collector and tiering begin their passes.
    public func mounted() {
        gc.start()
        tiering?.start()
    }

    /// After the unmount: the loops stop, the flat copies are closed clean, the metadata synced.
    public func stop() {
        tiering?.stop()
        gc.stop(idle: cluster == nil)
        cluster?.stop()
        flat?.close()
        try? engine.sync()
    }

    /// This node's id: made once, kept in DATA/node-id.
    public static func nodeID(_ dataDir: String) throws -> String {
        let path = dataDir + "/node-id"
        if let id = try? String(contentsOfFile: path, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines), !id.isEmpty {
            return id
        }
        var host = [CChar](repeating: 0, count: 256)
        gethostname(&host, host.count)
        let name = String(decoding: host.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let id = "\(name)-\(UUID().uuidString.prefix(8).lowercased())"
        try (id + "\n").write(toFile: path, atomically: true, encoding: .utf8)
        return id
    }
}
