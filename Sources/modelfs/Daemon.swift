import CModelFSSys
import Foundation
import ModelFS
import ModelFSBuildInfo
import ModelFSCore
import ModelFSFUSE
import ModelFSMeta
import ModelFSNode
import ModelFSPeer
import ModelFSWire
import ModelFSStore
import Synchronization

/// One mounted filesystem's process: holds the data dir, serves FUSE until unmounted (through
/// the parts `Node` composes), announces itself in the registry and answers on its control socket.
struct Daemon {
    let mountpoint: String
    let settings: NodeSettings
    let fuseOptions: [String]
    let readyFD: Int32?
    /// Where /metrics is served besides a cluster node's peer port (--metrics-listen).
    let metricsListen: String?

    var dataDir: String { settings.dataDir }
    var meta: String { settings.meta }

    func run() throws {
        // Blocks are 0.25–4 MiB buffers allocated and freed by many threads. glibc would keep
        // freed ones in per-thread arenas (and raise its mmap threshold until they stay on the
        // heap), so RSS grows to several times the cache budget. Serve large buffers with mmap,
        // returned to the system on free, and cap the arenas.
        _ = modelfs_mallopt(modelfs_m_mmap_threshold(), 128 << 10)
        _ = modelfs_mallopt(modelfs_m_arena_max(), 4)
        // Every pack holds two descriptors (buffered and O_DIRECT): a 1 TB store is 8,000 of
        // them. Take the hard limit on open files, not the soft one (often 1,024).
        var files = rlimit()
        if getrlimit(Int32(RLIMIT_NOFILE.rawValue), &files) == 0 && files.rlim_cur < files.rlim_max {
            files.rlim_cur = files.rlim_max
            _ = setrlimit(Int32(RLIMIT_NOFILE.rawValue), &files)
        }
        // One daemon per data dir: a second one would corrupt the first one's view.
        let lockPath = dataDir + "/.lock"
        let lockFD = open(lockPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard lockFD >= 0 else { throw posixError("open", lockPath) }
        guard flock(lockFD, LOCK_EX | LOCK_NB) == 0 else {
            let owner = (try? String(contentsOfFile: dataDir + "/modelfs.pid", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "?"
            throw FSError(EBUSY, "data dir \(dataDir) is in use by another modelfs daemon (pid \(owner)); unmount it first or choose another --data")
        }
        try "\(getpid())\n".write(toFile: dataDir + "/modelfs.pid", atomically: true, encoding: .utf8)

        let node = try Node(settings)
        let (fs, store, gc, tiering, flat, server, cluster) = (node.fs, node.store, node.gc, node.tiering, node.flat, node.server, node.cluster)
        let passthrough = settings.passthrough

        var options = ["fsname=modelfs", "subtype=modelfs", "default_permissions"]
        // Other users may use a root-mounted filesystem; the kernel enforces permissions.
        if getuid() == 0 { options.append("allow_other") }
        options += fuseOptions

        let record = MountRecord(mountpoint: mountpoint, dataDir: dataDir, meta: meta, pid: getpid(),
                                 socket: Registry.socketPath(mountpoint))
        let control = ControlServer(path: record.socket, status: { [dataDir, meta, mountpoint] in
            var s = try Daemon.status(fs: fs, store: store, mountpoint: mountpoint, dataDir: dataDir, meta: meta)
            s.cluster = cluster?.status()
            s.gc = gc.stats
            if let tiering {
                s.tiers = store.tierUsage()
                s.tiering = tiering.stats
            }
            let p = server.passthroughStatus
            var why: String?
            if case .off(let w) = passthrough { why = w } else if !p.offered { why = "the kernel does not offer it (Linux 6.9+ built with FUSE passthrough)" } else { why = p.off }
            s.passthrough = PassthroughStatus(on: p.on, offered: p.offered, off: p.on ? nil : why, opens: p.opens, daemonReads: p.daemonReads,
                                              flat: flat?.stats ?? FlatCopies.Stats(), flatBudget: flat?.budget ?? 0)
            return s
        }, sync: cluster.map { n -> SyncHandler in
            { @Sendable inodes, timeout, progress in
                n.replicator.waitUntilReplicated(inodes: inodes, timeout: timeout, progress: progress)
            }
        }, handlers: Operate.handlers(fs: fs, node: cluster) { [server] parent, name in
            server.invalidateEntry(parent: parent.rawValue, name: name)
            server.invalidateInode(parent.rawValue, pages: false)
        }.merging(["gc": { words, send in
            let r = try gc.collectNow(noGrace: words.dropFirst().first == "no-grace")
            send(["blocks": r.blocks, "bytes": r.bytes])
        }, "tier": { _, send in
            guard let tiering else { throw FSError.invalid("this mount has one tier (no --tier)") }
            send(try tiering.passNow())
        }], uniquingKeysWith: { a, _ in a }))
        // /metrics: the FUSE operations and this mount's gauges, after a cluster node's own.
        let mountMetrics: @Sendable () -> String = { [dataDir] in
            OpMetrics.render() + Daemon.gauges(fs: fs, store: store, flat: flat, server: server, dataDir: dataDir)
                + EtcdClient.metricsText()
        }
        cluster?.metrics.setExtra(mountMetrics)
        let metricsServer = try metricsListen.map { address in
            try MetricsRoutes.serve(address: address, token: settings.metricsToken) { [cluster] in cluster.map { $0.metrics.render() } ?? mountMetrics() }
        }
        try node.start()
        if let c = settings.cluster, let tls = cluster?.tls {
            Log.info("peer traffic: mutual TLS (cluster \(tls.cluster), this node CN=\(tls.node), certificate valid \(Int(tls.expiresIn / 86400)) more days)")
            if !c.etcdEncrypted {
                Log.warning("etcd traffic is unencrypted (no --etcd-ca): the namespace crosses the network in the clear")
            }
        } else if let c = settings.cluster {
            Log.warning("peer traffic is unencrypted: block bodies and the cluster secret cross the network in the clear; run the nodes on a trusted network")
            if !c.etcdEncrypted {
                Log.warning("etcd traffic is unencrypted (no --etcd-ca): the namespace crosses the network in the clear")
            }
        }
        let readyFD = self.readyFD
        let mp = mountpoint
        Log.info("mounting \(mountpoint) (modelfs \(BuildInfo.description), data \(dataDir), meta \(meta), options \(options.joined(separator: ",")))")
        try server.run(mountpoint: mountpoint, options: options) {
            do {
                try FileManager.default.createDirectory(atPath: Registry.directory, withIntermediateDirectories: true)
                try control.start()
                try Registry.save(record)
            } catch { Log.error("cannot announce the mount: \(error)") }
            node.mounted()
            Log.info("mounted \(mp)")
            if let tiering {
                Log.info("tiers: " + store.tiers.map { "\($0.name) \($0.root)" }.joined(separator: ", ")
                         + "; blocks of files unwritten for \(Int(tiering.age)) s move to \(store.tiers.last!.name)")
            }
            if let flat {
                // The mount answered, so the kernel's INIT (and whether it agreed) is behind us.
                let p = server.passthroughStatus
                Log.info(p.on ? "passthrough on: read-only opens pass through to flat copies under \(flat.directory) (budget \(humanBytes(flat.budget)))"
                              : "passthrough off: the kernel does not offer it (Linux 6.9+ built with FUSE passthrough); reads go through the page cache")
            }
            SystemdNotify.send("READY=1\nMAINPID=\(getpid())\nSTATUS=mounted \(mp)")
            if let fd = readyFD {
                _ = "ok \(getpid())\n".withCString { write(fd, $0, strlen($0)) }
                close(fd)
            } else {
                let line = "modelfs: mounted \(mp) (pid \(getpid())); unmount with: modelfs umount \(mp)\n"
                _ = line.withCString { write(1, $0, strlen($0)) }
            }
        }
        SystemdNotify.send("STOPPING=1\nSTATUS=unmounted \(mountpoint); finishing")
        metricsServer?.shutdown()
        node.stop()
        Registry.remove(mountpoint)
        unlink(dataDir + "/modelfs.pid")
        Log.info("unmounted \(mountpoint)")
    }

    /// The counts last read: what status shows while the metadata engine cannot answer (a cluster
    /// node cut off from etcd still says what it holds and what it has not replicated).
    private static let lastStats = Mutex(MetadataStats())

    static func status(fs: FileSystem, store: PackBlockStore, mountpoint: String, dataDir: String, meta: String) throws -> MountStatus {
        var metadataError: String?
        let m: MetadataStats
        do {
            m = try fs.meta.stats()
            lastStats.withLock { $0 = m }
        } catch {
            m = lastStats.withLock { $0 }
            metadataError = "\(error)"
        }
        let u = store.usage()
        let cache = fs.reader.cache.statistics
        let w = fs.writeCounters.snapshot
        return MountStatus(
            mountpoint: mountpoint, dataDir: dataDir, meta: meta, pid: getpid(),
            files: m.files, directories: m.directories, symlinks: m.symlinks,
            logicalBytes: m.logicalBytes, storedBytes: u.bytes, blocks: u.blocks,
            dedupRatio: u.bytes == 0 ? 1 : Double(m.logicalBytes) / Double(u.bytes),
            dataDirBytes: directoryBytes(dataDir),
            openHandles: fs.openHandleCount,
            cacheBytes: cache.bytes, cacheHits: cache.hits, cacheMisses: cache.misses,
            blockBytesWritten: u.bytesWritten,
            streamedBytes: w.streamed, stagedBytes: w.staged, stagedAbsorbedBytes: w.absorbed,
            clonedBytes: w.cloned, pieceReads: fs.reader.pieceStats, metadataError: metadataError)
    }

    /// The mount's gauges in the Prometheus text format (a cluster node adds its own).
    static func gauges(fs: FileSystem, store: PackBlockStore, flat: FlatCopies?, server: FuseServer, dataDir: String) -> String {
        let u = store.usage()
        let cache = fs.reader.cache.statistics
        let w = fs.writeCounters.snapshot
        let p = server.passthroughStatus
        let f = flat?.stats ?? FlatCopies.Stats()
        let pieces = fs.reader.pieceStats
        let rows: [(String, String, UInt64)] = [
            ("modelfs_stored_bytes", "gauge", u.bytes), ("modelfs_blocks", "gauge", u.blocks),
            ("modelfs_block_bytes_written_total", "counter", u.bytesWritten),
            ("modelfs_open_handles", "gauge", UInt64(fs.openHandleCount)),
            ("modelfs_memory_cache_bytes", "gauge", UInt64(cache.bytes)), ("modelfs_memory_cache_hits_total", "counter", UInt64(cache.hits)),
            ("modelfs_memory_cache_misses_total", "counter", UInt64(cache.misses)),
            ("modelfs_streamed_bytes_total", "counter", w.streamed), ("modelfs_staged_bytes_total", "counter", w.staged),
            ("modelfs_cloned_bytes_total", "counter", w.cloned),
            ("modelfs_piece_reads_total", "counter", pieces.reads), ("modelfs_piece_read_bytes_total", "counter", pieces.bytes),
            ("modelfs_passthrough_opens_total", "counter", p.opens), ("modelfs_daemon_reads_total", "counter", p.daemonReads),
            ("modelfs_flat_copy_bytes", "gauge", UInt64(f.bytes)), ("modelfs_flat_copies", "gauge", UInt64(f.copies)),
            ("modelfs_flat_copy_hits_total", "counter", UInt64(f.hits)), ("modelfs_flat_copy_misses_total", "counter", UInt64(f.misses)),
            ("modelfs_flat_copies_built_total", "counter", UInt64(f.built)), ("modelfs_flat_copies_evicted_total", "counter", UInt64(f.evicted)),
        ]
        return rows.map { "# TYPE \($0.0) \($0.1)\n\($0.0) \($0.2)\n" }.joined()
    }

    /// Disk usage of a directory tree (allocated blocks, like du).
    static func directoryBytes(_ path: String) -> UInt64 {
        guard let e = FileManager.default.enumerator(atPath: path) else { return 0 }
        var total: UInt64 = 0
        while let rel = e.nextObject() as? String {
            var st = stat()
            if lstat(path + "/" + rel, &st) == 0 { total += UInt64(st.st_blocks) * 512 }
        }
        return total
    }
}
