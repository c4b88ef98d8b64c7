import Foundation
import ModelFS
import ModelFSCore
import ModelFSMeta
import ModelFSNode
import ModelFSTestSupport
import Testing

/// The composition of a mount (`Node`), without the kernel: the parts are made from settings,
/// wired at construction, and work together — the filesystem over the store and the engine,
/// garbage collection hearing of what the filesystem frees, and two cluster nodes over a real
/// etcd, one reading what the other wrote.
@Suite(.serialized) struct NodeTests {
    static func scratch(_ tag: String) throws -> String {
        let dir = NSTemporaryDirectory() + "modelfs-node-\(tag)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    static func write(_ fs: FileSystem, _ name: String, _ bytes: [UInt8]) throws -> InodeNumber {
        let (a, o) = try fs.create(parent: .root, name: name, mode: 0o644, flags: OpenFlags(O_WRONLY | O_CREAT), context: .root)
        _ = try bytes.withUnsafeBytes { try fs.write(o.handle, at: 0, $0) }
        try fs.flush(o.handle)
        try fs.release(o.handle)
        return a.ino
    }

    static func read(_ fs: FileSystem, _ name: String) throws -> [UInt8] {
        let a = try fs.lookup(parent: .root, name: name)
        let o = try fs.open(a.ino, flags: OpenFlags(O_RDONLY))
        defer { try? fs.release(o.handle) }
        var buf = [UInt8](repeating: 0, count: Int(a.size))
        let n = try buf.withUnsafeMutableBytes { try fs.read(o.handle, at: 0, count: Int(a.size), into: $0.baseAddress!) }
        return Array(buf[0..<n])
    }

    /// `count` cluster nodes over the shared test etcd, each with its own data dir (`dirs`),
    /// started and mounted; `configure` sets each one's settings further.
    static func cluster(_ count: Int, tag: String, policy: ReplicationPolicy, nodes: inout [Node], dirs: inout [String],
                        configure: (inout ClusterSettings) -> Void = { _ in }) throws {
        let etcd = try EtcdTestCluster.shared.get()
        let name = "\(tag)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        for i in 0..<count {
            let dir = try scratch("\(tag)\(i)")
            dirs.append(dir)
            var c = ClusterSettings(secret: "node-tests-secret", listen: "127.0.0.1:0")
            c.nodeID = "\(tag)\(i)"
            c.policy = policy
            c.cacheSize = 64 << 20
            c.scrubRate = 0
            c.ackTimeout = 20
            configure(&c)
            let node = try Node(NodeSettings(dataDir: dir, meta: etcd.metaURL(name), cluster: c))
            try node.start()
            node.mounted()
            nodes.append(node)
        }
        let made = nodes
        let joined = waitUntil(timeout: 20) { made.allSatisfy { $0.cluster!.membership.nodes.count == count } }
        #expect(joined, "every node sees the \(count) nodes")
    }

    @Test func aSingleNodeIsComposedAndCollectsWhatItFrees() throws {
        let dir = try Self.scratch("one")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let node = try Node(NodeSettings(dataDir: dir, meta: "sqlite:\(dir)/meta.db"))
        #expect(node.cluster == nil && node.flat == nil && node.tiering == nil)
        let data = randomBytes(3 << 20, seed: 7)
        _ = try Self.write(node.fs, "ckpt.bin", data)
        #expect(try Self.read(node.fs, "ckpt.bin") == data)
        #expect(node.store.usage().bytes >= UInt64(data.count))
        try node.fs.unlink(parent: .root, name: "ckpt.bin")
        // The collector the node made sweeps this node's store: nothing of the file is left.
        let freed = try node.gc.collectNow(noGrace: true)
        #expect(freed.bytes >= UInt64(data.count))
        #expect(node.store.usage().bytes == 0)
        node.stop()
    }

    /// The CLI's size flags show the settings' defaults through `sizeText`: it must read back.
    @Test func sizesReadBackAsTheyAreWritten() {
        for n: UInt64 in [0, 1, 4096, 1000, 16 << 20, 100 << 20, 8 << 30, 16 << 30, 3 << 40, (1 << 20) + 1] {
            #expect(parseSize(sizeText(n)) == n, "\(n) -> \(sizeText(n))")
        }
        #expect(sizeText(8 << 30) == "8G" && sizeText(100 << 20) == "100M" && sizeText(0) == "0")
    }

    @Test func aDataDirOfAClusterIsRefusedAlone() throws {
        let dir = try Self.scratch("claimed")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try "c1 1234\n".write(toFile: dir + "/cluster", atomically: true, encoding: .utf8)
        #expect {
            _ = try Node(NodeSettings(dataDir: dir, meta: "sqlite:\(dir)/meta.db"))
        } throws: { error in
            "\(error)".contains("belongs to cluster \"c1 1234\"")
        }
    }

    @Test func twoClusterNodesReadEachOthersFiles() throws {
        var nodes: [Node] = []
        var dirs: [String] = []
        defer {
            for n in nodes { n.stop() }
            for d in dirs { try? FileManager.default.removeItem(atPath: d) }
        }
        // Both copies before close() returns: the reader's node holds one.
        try Self.cluster(2, tag: "n", policy: ReplicationPolicy(replicas: 2, ack: 2), nodes: &nodes, dirs: &dirs)
        let data = randomBytes(5 << 20, seed: 11)
        let ino = try Self.write(nodes[0].fs, "model.safetensors", data)
        #expect(try Self.read(nodes[1].fs, "model.safetensors") == data)
        // Every block of the file is on both nodes (K = 2 copies when close() returned).
        var ids: [BlockID] = []
        try nodes[1].fs.walkFiles(from: ino) { f in ids += f.blocks.map(\.id) }
        let holders = nodes[1].cluster!.replicator.census(ids).holders
        #expect(!ids.isEmpty && ids.allSatisfy { Set(holders[$0] ?? []) == ["n0", "n1"] })
        // The status the control socket serves is composed from the same parts.
        let status = nodes[0].cluster!.status()
        #expect(status.nodes.map(\.id).sorted() == ["n0", "n1"])
    }

    /// A delete on a cluster: every node holding the deleted file's blocks runs a collection
    /// pass, and one node (the scanner) reads the manifests for all of them. The blocks only the
    /// deleted file had go from every node; those another file shares stay, and it reads back.
    @Test func oneScanOfTheManifestsServesEveryNodesCollection() throws {
        var nodes: [Node] = []
        var dirs: [String] = []
        defer {
            for n in nodes { n.stop() }
            for d in dirs { try? FileManager.default.removeItem(atPath: d) }
        }
        // Every node holds every block; a replaced version is decided a second after.
        try Self.cluster(3, tag: "g", policy: ReplicationPolicy(replicas: 3, ack: 3), nodes: &nodes, dirs: &dirs) { $0.gcSupersededDelay = 1 }
        // keep.bin is the first 3 MiB of drop.bin: they share the chunks before its last one.
        let shared = randomBytes(3 << 20, seed: 21)
        let keep = try Self.write(nodes[0].fs, "keep.bin", shared)
        let drop = try Self.write(nodes[1].fs, "drop.bin", shared + randomBytes(3 << 20, seed: 22))
        func blocks(_ ino: InodeNumber) throws -> Set<BlockID> {
            var out = Set<BlockID>()
            try nodes[2].fs.walkFiles(from: ino) { f in out.formUnion(f.blocks.map(\.id)) }
            return out
        }
        let kept = try blocks(keep), dropped = try blocks(drop).subtracting(kept)
        let sharedBlocks = try blocks(drop).intersection(kept)
        #expect(!dropped.isEmpty && !sharedBlocks.isEmpty, "the files share blocks")
        #expect(nodes.allSatisfy { n in (kept.union(dropped)).allSatisfy(n.store.contains) })
        // Each node's first pass (a full one, read here) is over before the delete.
        #expect(waitUntil(timeout: 30) { nodes.allSatisfy { $0.gc.stats.passes >= 1 && !$0.gc.stats.running } })
        let readBefore = nodes.map { $0.gc.stats.manifestsRead }
        // An ask of the wrong shape (another version, a bad write) is passed over, not answered.
        let keys = EtcdKeys(cluster: nodes[0].cluster!.clusterName), etcd = nodes[0].cluster!.membership.client
        try etcd.put(keys.gcAsk("bogus"), Data([1, 2, 3]))
        defer { try? etcd.delete(keys.gcAsk("bogus")) }

        try nodes[2].fs.unlink(parent: .root, name: "drop.bin")
        #expect(waitUntil(timeout: 60) { nodes.allSatisfy { n in !dropped.contains(where: n.store.contains) } },
                "every node removes the blocks only drop.bin had")
        #expect(nodes.allSatisfy { n in kept.allSatisfy(n.store.contains) })
        #expect(try Self.read(nodes[1].fs, "keep.bin") == shared)
        // One scanner, which read the manifests for the three passes; the nodes read none.
        let scans = nodes.map { $0.cluster!.scans.status }
        #expect(scans.filter(\.scanner).count == 1)
        let answered = scans.reduce(0) { $0 + $1.asksAnswered }, scanned = scans.reduce(0) { $0 + $1.scans }
        #expect(answered >= 3)
        #expect(scanned < answered, "asks that come together share a scan (\(scanned) scans for \(answered) asks)")
        #expect(nodes.allSatisfy { $0.gc.stats.scannedElsewhere >= 1 })
        #expect(nodes.map { $0.gc.stats.manifestsRead } == readBefore, "no node read manifests for its own pass")
        #expect(scans.allSatisfy { $0.scannedHere == 0 })
        #expect(try etcd.range(keys.gcAnswer("bogus")).kvs.isEmpty)
    }
}
