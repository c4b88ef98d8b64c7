import AsyncHTTPClient
import Foundation
import ModelFSTestSupport
import NIOCore
import NIOHTTP1
import Synchronization
import Testing
@testable import ModelFS
@testable import ModelFSCore
@testable import ModelFSMeta
@testable import ModelFSPeer
@testable import ModelFSWire
@testable import ModelFSStore

func blockOf(_ n: Int, seed: UInt64) -> (BlockID, [UInt8]) {
    let bytes = randomBytes(n, seed: seed)
    return (bytes.withUnsafeBytes { BlockID.hash($0) }, bytes)
}

func scratch(_ name: String) throws -> String {
    let dir = NSTemporaryDirectory() + "modelfs-peer-\(name)-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return dir
}

/// A node without FUSE: its stores, its peer server on a loopback port, its membership in the
/// shared test etcd, its replicator.
final class TestNode: @unchecked Sendable {
    let dir: String
    let local: PackBlockStore
    let cache: PackBlockStore
    let server: PeerServer
    let membership: Membership
    let client: PeerClient
    let store: ClusterBlockStore
    let meta: any MetadataEngine
    let metrics: PeerMetrics
    var replicator: Replicator?

    init(id: String, cluster: String, secret: String = "s3cret", cacheBudget: UInt64 = 64 << 20,
         policy: ReplicationPolicy = ReplicationPolicy(replicas: 3, ack: 1), labels: [String: String] = [:]) throws {
        dir = try scratch(id)
        local = try PackBlockStore(root: dir + "/blocks")
        cache = try PackBlockStore(root: dir + "/cache")
        let etcd = try EtcdTestCluster.shared.get()
        let metrics = PeerMetrics()
        self.metrics = metrics
        server = try PeerServer(host: "127.0.0.1", port: 0, maxBody: PeerService.maxBody)
        membership = Membership(client: try EtcdClient(endpoints: etcd.endpoints), cluster: cluster,
                                me: NodeInfo(id: id, address: "127.0.0.1:\(server.port)", labels: labels), ttl: 5, refresh: 0.2)
        client = PeerClient(secret: secret, timeout: .seconds(5))
        // As ClusterNode wires it: a chained PUT goes on to the next live node.
        let actions = PeerActions(forward: { [client, membership] block, chain, durable in
            client.forward(block, chain: chain, live: membership.nodes, durable: durable)
        })
        server.serve(PeerService(secret: secret, local: local, cache: cache, metrics: metrics, actions: actions, status: { Data("{}".utf8) }))
        try membership.start()
        store = ClusterBlockStore(local: local, cache: cache, cacheBudget: cacheBudget, membership: membership, client: client)
        meta = try MetadataURL.open(etcd.metaURL(cluster), rootUID: 0, rootGID: 0)
        replicator = try Replicator(dataDir: dir, local: local, membership: membership, client: client, meta: meta,
                                    defaultPolicy: policy, timeout: 10)
    }

    func stop() {
        replicator?.stop()
        membership.stop()
        server.shutdown()
        client.shutdown()
        try? FileManager.default.removeItem(atPath: dir)
    }
}

func waitForNodes(_ nodes: [TestNode], count: Int) -> Bool {
    waitUntil(timeout: 10) {
        nodes.allSatisfy { n in (try? n.membership.reload()) != nil && n.membership.nodes.count == count }
    }
}

@Suite struct PlacementTests {
    let nodes = (0..<5).map { NodeInfo(id: "node-\($0)", address: "127.0.0.1:\(7000 + $0)", labels: ["zone": "z\($0 % 3)"]) }

    @Test func targetsAreDistinctDeterministicAndWriterFirst() {
        for seed in 0..<200 as Range<UInt64> {
            let (id, _) = blockOf(64, seed: seed)
            let t = Placement.targets(id, nodes: nodes, replicas: 3, writer: "node-4")
            #expect(t.count == 3 && Set(t.map(\.id)).count == 3 && t[0].id == "node-4")
            #expect(t == Placement.targets(id, nodes: nodes.reversed(), replicas: 3, writer: "node-4"))
        }
    }

    @Test func spreadPrefersDistinctLabelValues() {
        for seed in 0..<200 as Range<UInt64> {
            let (id, _) = blockOf(64, seed: seed)
            let t = Placement.targets(id, nodes: nodes, replicas: 3, writer: "node-0", spreadLabel: "zone")
            #expect(Set(t.compactMap { $0.labels["zone"] }).count == 3)
        }
    }

    /// Rendezvous hashing: adding a sixth node moves only the blocks it wins (about 1/6).
    @Test func addingANodeMovesAboutItsShare() {
        let more = nodes + [NodeInfo(id: "node-5", address: "x:1")]
        var moved = 0
        let n = 3000
        for seed in 0..<UInt64(n) {
            let (id, _) = blockOf(32, seed: seed)
            let before = Placement.order(id, nodes)[0].id
            let after = Placement.order(id, more)[0].id
            if before != after { moved += 1; #expect(after == "node-5") }
        }
        #expect(moved > n / 6 / 2 && moved < n / 6 * 2, "moved \(moved) of \(n)")
    }
}

@Suite struct FanoutTreeTests {
    /// Every block's tree reaches all N loaders from one root in log_4(N) hops, no loader has
    /// more than 4 children in a tree, every node agrees on the trees whatever order it lists
    /// the loaders in, and over many blocks each loader relays about one copy per block.
    @Test func treesAreShallowNarrowAgreedAndFair() {
        let n = 100
        let loaders = (0..<n).map { NodeInfo(id: "loader-\($0)", address: "10.0.0.\($0):7420") }
        var sent = [String: Int]()
        let blocks = 400
        for seed in 0..<UInt64(blocks) {
            let (id, _) = blockOf(32, seed: seed)
            let ranked = Placement.order(id, loaders)
            var children = [Int: Int]()
            for p in 0..<n {
                guard let up = Fanout.parentRank(p) else { #expect(p == 0); continue }
                #expect(up < p)
                children[up, default: 0] += 1
                sent[ranked[up].id, default: 0] += 1
                var hops = 1, at = up
                while let next = Fanout.parentRank(at) { hops += 1; at = next }
                #expect(hops <= 4, "rank \(p) is \(hops) hops from the root")
            }
            #expect(children.values.max()! <= Fanout.degree)
            // Every node finds the same parent, whatever order it lists the loaders in.
            for p in [1, n / 2, n - 1] {
                #expect(Fanout.parent(id, of: ranked[p].id, among: loaders.reversed())?.id == ranked[Fanout.parentRank(p)!].id)
            }
            #expect(Fanout.parent(id, of: ranked[0].id, among: loaders) == nil)
        }
        // Each block crosses n-1 links among the loaders; a fair share is (n-1)/n per loader.
        let most = sent.values.max()!, mean = Double(blocks * (n - 1)) / Double(n)
        #expect(Double(most) < mean * 2, "one loader relayed \(most) copies; the mean is \(mean)")
    }
}

@Suite struct ProgressRelayTests {
    /// Worker threads post; only the waiting thread sends, never faster than the interval, and the
    /// last value posted is always the last one sent.
    @Test func theWaitingThreadSendsTheNewestValueAndAlwaysTheLast() {
        let relay = ProgressRelay<Int>()
        let count = 20_000
        DispatchQueue.global().async {
            let n = Shared(0)
            parallelFor(count, width: 4) { _ in n.withLock { $0 += 1; relay.post($0) } }
            relay.finish()
        }
        let caller = Thread.current
        var sent: [(Int, Date)] = []
        relay.relay(every: 0.05) { value in
            #expect(Thread.current == caller)
            sent.append((value, Date()))
        }
        #expect(sent.last?.0 == count)
        #expect(sent.count < count)
        #expect(sent.map(\.0) == sent.map(\.0).sorted())
        for (a, b) in zip(sent, sent.dropFirst().dropLast()) { #expect(b.1.timeIntervalSince(a.1) >= 0.049) }
    }

    @Test func nothingPostedSendsNothing() {
        let relay = ProgressRelay<Int>()
        relay.finish()
        var sent = 0
        relay.relay { _ in sent += 1 }
        #expect(sent == 0)
    }
}

@Suite struct PeerServerTests {
    func serve(_ secret: String = "s3cret") throws -> (PeerServer, PackBlockStore, PeerMetrics, String) {
        let dir = try scratch("server")
        let local = try PackBlockStore(root: dir)
        let metrics = PeerMetrics()
        let server = try PeerServer(host: "127.0.0.1", port: 0,
                                    routes: PeerService(secret: secret, local: local, cache: nil, metrics: metrics,
                                                        status: { Data(#"{"ok":true}"#.utf8) }),
                                    maxBody: PeerService.maxBody)
        return (server, local, metrics, dir)
    }

    func raw(_ port: Int, _ method: HTTPMethod, _ path: String, auth: String?, body: [UInt8]? = nil) throws -> (Int, [UInt8]) {
        let http = HTTPClient(eventLoopGroupProvider: .singleton)
        defer { try? http.syncShutdown() }
        var req = try HTTPClient.Request(url: "http://127.0.0.1:\(port)\(path)", method: method,
                                         body: body.map { .bytes($0) })
        if let auth { req.headers.add(name: "Authorization", value: auth) }
        let r = try http.execute(request: req).wait()
        return (Int(r.status.code), r.body.map { Array($0.readableBytesView) } ?? [])
    }

    /// A server (its store `local`, its metrics, `node` naming it), a client with the secret, and
    /// a second store (`source`) whose blocks the client pushes.
    func connected(_ body: (_ local: PackBlockStore, _ metrics: PeerMetrics, _ node: NodeInfo, _ client: PeerClient,
                            _ source: PackBlockStore) throws -> Void) throws {
        let (server, local, metrics, dir) = try serve()
        defer { server.shutdown(); try? FileManager.default.removeItem(atPath: dir) }
        let client = PeerClient(secret: "s3cret")
        defer { client.shutdown() }
        let sourceDir = try scratch("source")
        defer { try? FileManager.default.removeItem(atPath: sourceDir) }
        try body(local, metrics, NodeInfo(id: "n", address: "127.0.0.1:\(server.port)"), client, PackBlockStore(root: sourceDir))
    }

    /// More readers than the server takes connections: at its cap it closes the connection idle
    /// the longest, or with none idle answers 503 with Retry-After (the reader waits and comes
    /// back); every read is served, none fails, none hangs.
    @Test func readersBeyondTheConnectionCapAreServedAfterA503() throws {
        let dir = try scratch("busy")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let local = try PackBlockStore(root: dir)
        let server = try PeerServer(host: "127.0.0.1", port: 0,
                                    routes: PeerService(secret: "s3cret", local: local, cache: nil, metrics: PeerMetrics(),
                                                        status: { Data("{}".utf8) }),
                                    maxBody: PeerService.maxBody, maxConnections: 8)
        defer { server.shutdown() }
        let (id, bytes) = blockOf(256 << 10, seed: 77)
        try bytes.withUnsafeBytes { _ = try local.put(id, $0) }
        let node = NodeInfo(id: "busy", address: "127.0.0.1:\(server.port)")
        // 48 readers, each a node of its own (its own connections), each reading 4 times.
        let readers = (0..<48).map { _ in PeerClient(secret: "s3cret", timeout: .seconds(10)) }
        defer { readers.forEach { $0.shutdown() } }
        let served = Mutex(0), failed = Mutex<[String]>([])
        DispatchQueue.concurrentPerform(iterations: readers.count) { i in
            for _ in 0..<4 {
                do {
                    let b = try readers[i].get(id, from: node)
                    if b?.count == bytes.count { served.withLock { $0 += 1 } } else { failed.withLock { $0.append("reader \(i): no block") } }
                } catch {
                    failed.withLock { $0.append("reader \(i): \(error)") }
                }
            }
        }
        #expect(failed.withLock { $0 } == [])
        #expect(served.withLock { $0 } == 48 * 4)
        #expect(server.refused + server.evicted > 0, "48 readers never found the server at its cap of 8")
    }

    @Test func blocksRoundTripVerified() throws { try connected { local, metrics, node, client, source in
        let (id, bytes) = blockOf(3 << 20, seed: 1)
        #expect(try client.get(id, from: node) == nil)
        #expect(try client.has([id], at: node) == [false])
        _ = try bytes.withUnsafeBytes { try source.put(id, $0) }
        try client.put(id, from: source, to: node, durable: true)
        #expect(local.contains(id))
        #expect(try client.has([id, blockOf(10, seed: 2).0], at: node) == [true, false])
        let got = try #require(try client.get(id, from: node))
        #expect(got.withUnsafeBytes { Array($0) } == bytes)
        #expect(metrics.render().contains(#"modelfs_peer_requests_total{route="put",status="201"} 1"#))
    } }

    @Test func aBlockIsPushedStraightFromItsPackAndServedFromOne() throws { try connected { local, _, node, client, source in
        // Several blocks in one pack, so each push sends its own range of the file.
        let blocks = (0..<5).map { blockOf(1 << 20 + $0 * 4097, seed: UInt64(40 + $0)) }
        for (id, bytes) in blocks { _ = try bytes.withUnsafeBytes { try source.put(id, $0) } }
        for (i, (id, bytes)) in blocks.enumerated() {
            #expect(try client.put(id, from: source, to: node, durable: i == 0) == bytes.count)
            #expect(local.contains(id))
            let got = try #require(try client.get(id, from: node))
            #expect(got.withUnsafeBytes { Array($0) } == bytes)
        }
        #expect(try client.put(blockOf(10, seed: 3).0, from: source, to: node, durable: false) == nil)
        // A pack whose bytes changed under the block (bit rot): the receiver refuses the push.
        let (id, bytes) = blockOf(70_000, seed: 50)
        _ = try bytes.withUnsafeBytes { try source.put(id, $0) }
        let (fd, offset, _) = try #require(source.fileRangeForPeer(id))
        var flipped = bytes[100] ^ 0xff
        #expect(pwrite(fd, &flipped, 1, off_t(offset + 100)) == 1)
        close(fd)
        #expect(throws: (any Error).self) { try client.put(id, from: source, to: node, durable: false) }
        #expect(!local.contains(id))
    } }

    @Test func aBlockHeldInMemoryIsPushedFromItsBytes() throws { try connected { local, _, node, client, _ in
        // Eager copies of blocks just written go from the write pipeline's buffer (their pack
        // record was written with O_DIRECT: sending it from the file would read it from disk).
        let (id, bytes) = blockOf((1 << 20) + 12_345, seed: 60)
        try bytes.withUnsafeBytes { try client.put(id, $0, to: node, durable: false) }
        let got = try #require(try client.get(id, from: node))
        #expect(got.withUnsafeBytes { Array($0) } == bytes)
        // Bytes that are not the block's: refused, nothing stored.
        let (other, _) = blockOf(5000, seed: 61)
        #expect(throws: (any Error).self) { try bytes.withUnsafeBytes { try client.put(other, $0, to: node, durable: false) } }
        #expect(!local.contains(other))
    } }

    @Test func aPushToAPeerThatStopsReadingFailsAndClosesItsDescriptor() throws {
        // A listener that never accepts or reads: the kernel completes the connection, the
        // push's sendfile fills the socket buffers, and the send times out mid-body.
        let (listener, port) = try loopbackListener(backlog: 4)
        defer { close(listener) }
        let node = NodeInfo(id: "mute", address: "127.0.0.1:\(port)")
        let sourceDir = try scratch("mute-source")
        defer { try? FileManager.default.removeItem(atPath: sourceDir) }
        let source = try PackBlockStore(root: sourceDir)
        let (id, bytes) = blockOf(48 << 20, seed: 60)  // far more than loopback socket buffers hold
        _ = try bytes.withUnsafeBytes { try source.put(id, $0) }
        // Descriptors of this test's packs, other than the store's own: the push's duplicate.
        func duplicates() -> Int {
            let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
            return fds.filter { ((try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\($0)")) ?? "").hasPrefix(sourceDir) }.count
        }
        let held = duplicates()
        let client = PeerClient(secret: "s3cret", timeout: .milliseconds(700))
        defer { client.shutdown() }
        #expect(throws: (any Error).self) { try client.put(id, from: source, to: node, durable: false) }
        // Closed once the push has failed, not leaked.
        #expect(waitUntil(timeout: 5) { duplicates() == held })
    }

    /// A link that breaks between a real client and a real peer server: a corrupting link's
    /// block is rejected (never returned), a cut one and a down node are clear transport errors
    /// naming the peer, a hanging node times out; a clean link serves the block.
    @Test func faultsOnTheLinkNeverYieldWrongBytes() throws {
        let (server, local, _, dir) = try serve()
        defer { server.shutdown(); try? FileManager.default.removeItem(atPath: dir) }
        let (id, bytes) = blockOf(300_000, seed: 81)
        try bytes.withUnsafeBytes { _ = try local.put(id, $0) }
        let proxy = try FaultyTransport(to: server.port)
        defer { proxy.stop() }
        let node = NodeInfo(id: "faulty", address: proxy.address)
        func client() -> PeerClient { PeerClient(secret: "s3cret", timeout: .milliseconds(1500)) }
        proxy.fault = .corruptAnswers(at: 150_000)
        do {
            let c = client(); defer { c.shutdown() }
            guard case .corrupt = try c.fetch(id, from: node) else { Issue.record("a corrupted block was not rejected"); return }
        }
        proxy.fault = .cutAnswers(after: 1000)
        do {
            let c = client(); defer { c.shutdown() }
            let e = #expect(throws: PeerError.self) { _ = try c.get(id, from: node) }
            #expect(e?.kind == .unreachable && e?.node == "faulty")
        }
        proxy.fault = .refuse
        do {
            let c = client(); defer { c.shutdown() }
            let e = #expect(throws: PeerError.self) { _ = try c.get(id, from: node) }
            #expect(e?.kind == .unreachable)
            // Backed off: the next request fails at once, without a connection.
            let tried = proxy.accepted.load(ordering: .relaxed)
            #expect(throws: PeerError.self) { _ = try c.get(id, from: node) }
            #expect(proxy.accepted.load(ordering: .relaxed) == tried)
        }
        proxy.fault = .stall
        do {
            let c = client(); defer { c.shutdown() }
            let e = #expect(throws: PeerError.self) { _ = try c.get(id, from: node) }
            #expect(e?.kind == .unreachable)
        }
        proxy.fault = .none
        do {
            let c = client(); defer { c.shutdown() }
            let b = try #require(try c.get(id, from: node))
            #expect(Array(b.data) == bytes)
        }
    }

    @Test func withoutTheSecretNothingIsServed() throws {
        let (server, local, _, dir) = try serve()
        defer { server.shutdown(); try? FileManager.default.removeItem(atPath: dir) }
        let (id, bytes) = blockOf(1000, seed: 3)
        try bytes.withUnsafeBytes { _ = try local.put(id, $0) }
        for auth in [nil, "Bearer wrong", "Bearer s3cre", "Bearer s3crett", "Basic s3cret"] as [String?] {
            for (method, path) in [(HTTPMethod.GET, "/v1/blocks/\(id.hex)"), (.GET, "/metrics"), (.GET, "/v1/status"), (.POST, "/v1/has")] {
                let (status, body) = try raw(server.port, method, path, auth: auth)
                #expect(status == 401, "\(method) \(path) with \(auth ?? "no secret")")
                #expect(!body.starts(with: bytes.prefix(16)))
            }
        }
        let (id2, bytes2) = blockOf(1000, seed: 4)
        #expect(try raw(server.port, .PUT, "/v1/blocks/\(id2.hex)", auth: "Bearer nope", body: bytes2).0 == 401)
        #expect(!local.contains(id2))
        let client = PeerClient(secret: "wrong")
        defer { client.shutdown() }
        let e = #expect(throws: PeerError.self) { _ = try client.get(id, from: NodeInfo(id: "n", address: "127.0.0.1:\(server.port)")) }
        #expect(e?.kind == .unauthorized && e?.node == "n")
        #expect(e?.message.contains("refused the cluster secret") == true)
    }

    @Test func tamperedAndMalformedRequestsAreRejected() throws {
        let (server, local, metrics, dir) = try serve()
        defer { server.shutdown(); try? FileManager.default.removeItem(atPath: dir) }
        let auth = "Bearer s3cret"
        var (id, bytes) = blockOf(100_000, seed: 5)
        bytes[500] ^= 0x01
        #expect(try raw(server.port, .PUT, "/v1/blocks/\(id.hex)", auth: auth, body: bytes).0 == 422)
        #expect(!local.contains(id))
        #expect(metrics.render().contains("modelfs_peer_rejected_blocks_total 1"))
        for bad in ["../../etc/passwd", String(repeating: "A", count: 64), String(repeating: "0", count: 63), id.hex + "0"] {
            #expect(try raw(server.port, .GET, "/v1/blocks/\(bad)", auth: auth).0 == 400, "\(bad)")
        }
        id = blockOf(10, seed: 6).0
        #expect(try raw(server.port, .PUT, "/v1/blocks/\(id.hex)", auth: auth, body: [UInt8](repeating: 1, count: PeerService.maxBody + 1)).0 == 413)
        #expect(try raw(server.port, .POST, "/v1/has", auth: auth, body: [1, 2, 3]).0 == 400)
        #expect(try raw(server.port, .PATCH, "/v1/blocks/\(id.hex)", auth: auth).0 == 405)
        // DELETE drops a replica (healing, draining): 404 when there is none.
        #expect(try raw(server.port, .DELETE, "/v1/blocks/\(id.hex)", auth: auth).0 == 404)
        let (held, heldBytes) = blockOf(20, seed: 7)
        try heldBytes.withUnsafeBytes { _ = try local.put(held, $0) }
        #expect(try raw(server.port, .DELETE, "/v1/blocks/\(held.hex)", auth: auth).0 == 200)
        #expect(!local.contains(held))
        #expect(try raw(server.port, .DELETE, "/v1/blocks/\(held.hex)", auth: nil).0 == 401)
        // The batch routes refuse bodies that are not whole ids, and copy orders that are not JSON.
        for route in ["verify", "sync"] {
            #expect(try raw(server.port, .POST, "/v1/\(route)", auth: auth, body: [1, 2, 3]).0 == 400, "\(route)")
        }
        #expect(try raw(server.port, .POST, "/v1/copy", auth: auth, body: Array("not json".utf8)).0 == 400)
    }

    /// A node that finds a file's write lock held asks its holder whether it is closing it.
    @Test func writingSaysWhetherTheNodeWritesOrClosesAnInode() throws {
        let dir = try scratch("writing")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let local = try PackBlockStore(root: dir)
        let client = PeerClient(secret: "s3cret")
        defer { client.shutdown() }
        // A service without the filesystem's answer: 503.
        let bare = try PeerServer(host: "127.0.0.1", port: 0, routes: PeerService(secret: "s3cret", local: local, cache: nil, metrics: PeerMetrics(),
                                                                               status: { Data("{}".utf8) }), maxBody: PeerService.maxBody)
        let refused = #expect(throws: PeerError.self) { _ = try client.writing(InodeNumber(7), at: NodeInfo(id: "bare", address: "127.0.0.1:\(bare.port)")) }
        #expect(refused?.kind == .refused(503))
        bare.shutdown()
        let service = PeerService(secret: "s3cret", local: local, cache: nil, metrics: PeerMetrics(),
                                  actions: PeerActions(writing: { ino in (ino.rawValue >= 7, ino.rawValue == 8) }), status: { Data("{}".utf8) })
        let server = try PeerServer(host: "127.0.0.1", port: 0, routes: service, maxBody: PeerService.maxBody)
        defer { server.shutdown() }
        let node = NodeInfo(id: "holder", address: "127.0.0.1:\(server.port)")
        #expect(try client.writing(InodeNumber(6), at: node) == (false, false))
        #expect(try client.writing(InodeNumber(7), at: node) == (true, false))
        #expect(try client.writing(InodeNumber(8), at: node) == (true, true))
        for bad in ["", "-1", "12a", "99999999999999999999999", "7/8"] {
            #expect(try raw(server.port, .GET, "/v1/writing/\(bad)", auth: "Bearer s3cret").0 == 400, "\(bad)")
        }
        #expect(try raw(server.port, .GET, "/v1/writing/7", auth: nil).0 == 401)
    }
}

@Suite(.serialized) struct ClusterStoreTests {
    /// Readahead asked again and again, with no reader taking what it fetched, stops at
    /// `handoffBlocks` fetched and untaken: beyond that it let the oldest go, and one whose cache
    /// write had been dropped crossed the network again when its reader came.
    @Test func readaheadStopsAtTheBlocksKeptForReaders() throws {
        let cluster = "ahead-\(UInt64.random(in: 0...UInt64.max))"
        let a = try TestNode(id: "a", cluster: cluster)
        let b = try TestNode(id: "b", cluster: cluster)
        defer { a.stop(); b.stop() }
        #expect(waitForNodes([a, b], count: 2))
        let blocks = (0..<40).map { blockOf(256 << 10, seed: 700 + UInt64($0)) }
        for (id, bytes) in blocks { try bytes.withUnsafeBytes { _ = try a.store.put(id, $0) } }
        let ids = blocks.map(\.0)
        var last: UInt64 = .max
        #expect(waitUntil(timeout: 20) {
            b.store.willNeed(ids)
            let now = b.store.stats.peerFetches
            defer { last = now }
            return now == last && b.store.prefetchesUnderWay == 0
        })
        #expect(b.store.stats.peerFetches <= UInt64(ClusterBlockStore.handoffBlocks))
        for (id, bytes) in blocks { #expect(try b.store.read(id).withUnsafeBytes { Array($0) } == bytes) }
        #expect(b.store.stats.peerFetches == 40)
    }

    @Test func readsFetchFromPeersAndTheCacheKeepsItsBudget() throws {
        let cluster = "cache-\(UInt64.random(in: 0...UInt64.max))"
        let a = try TestNode(id: "a", cluster: cluster)
        let b = try TestNode(id: "b", cluster: cluster, cacheBudget: 8 << 20)
        defer { a.stop(); b.stop() }
        #expect(waitForNodes([a, b], count: 2))
        // 24 MiB on A only: three times B's cache budget.
        let blocks = (0..<24).map { blockOf(1 << 20, seed: 100 + UInt64($0)) }
        for (id, bytes) in blocks { try bytes.withUnsafeBytes { _ = try a.store.put(id, $0) } }
        for (id, bytes) in blocks {
            let got = try b.store.read(id)
            #expect(got.withUnsafeBytes { Array($0) } == bytes)
            #expect(b.cache.usage().bytes <= 8 << 20)
        }
        #expect(b.store.stats.peerFetches == 24)
        // The last block fetched is read again at once, while its cache write may still be
        // queued: from this node either way, not from the peer.
        let hits = b.store.stats.cacheHits
        #expect(try b.store.read(blocks[23].0).withUnsafeBytes { Array($0) } == blocks[23].1)
        #expect(b.store.stats.peerFetches == 24 && b.store.stats.cacheHits == hits + 1)
        #expect(b.store.contains(blocks[23].0))
        #expect(!b.local.contains(blocks[0].0))   // fetched blocks are cache, not replicas
        // A block nobody has: a clear error.
        let e = #expect(throws: StoreError.self) { _ = try b.store.read(blockOf(10, seed: 999).0) }
        #expect(e?.kind == .missing)
        #expect(e?.message.contains("no live node holds a good copy") == true)
    }

    /// A "peer" that answers every request with 200 and junk: its blocks fail verification and
    /// the reader goes on to a node with a good copy; nobody ever sees the junk.
    @Test func aPeerThatAnswersGarbageIsSkipped() throws {
        struct Junk: PeerRoutes {
            func handle(_ r: PeerRequest) -> PeerResponse { PeerResponse(.ok, body: ByteBuffer(bytes: randomBytes(5000, seed: 9))) }
        }
        let cluster = "junk-\(UInt64.random(in: 0...UInt64.max))"
        let a = try TestNode(id: "a", cluster: cluster)
        let b = try TestNode(id: "b", cluster: cluster)
        let junk = try PeerServer(host: "127.0.0.1", port: 0, routes: Junk(), maxBody: 1 << 20)
        let etcd = try EtcdTestCluster.shared.get()
        let jm = Membership(client: try EtcdClient(endpoints: etcd.endpoints), cluster: cluster,
                            me: NodeInfo(id: "junk", address: "127.0.0.1:\(junk.port)"), ttl: 5, refresh: 0.2)
        try jm.start()
        defer { jm.stop(); junk.shutdown(); a.stop(); b.stop() }
        #expect(waitForNodes([a, b], count: 3))
        let blocks = (0..<16).map { blockOf(100_000, seed: 500 + UInt64($0)) }
        for (id, bytes) in blocks { try bytes.withUnsafeBytes { _ = try a.local.put(id, $0) } }
        // Rendezvous order puts the junk node first for about a third of these blocks.
        #expect(blocks.contains { Placement.order($0.0, b.membership.peers)[0].id == "junk" })
        for (id, bytes) in blocks {
            #expect(try b.store.read(id).withUnsafeBytes { Array($0) } == bytes)
        }
        // Replicating to it fails cleanly (its answers are not a has-list), and says so.
        let short = a.replicator!.ensure(blocks.map(\.0), copies: 3, policy: ReplicationPolicy(replicas: 3, ack: 1), durable: false)
        #expect(short != nil)
    }

    @Test func replicationReachesEveryNodeAndResumesAfterRestart() throws {
        let cluster = "repl-\(UInt64.random(in: 0...UInt64.max))"
        let a = try TestNode(id: "a", cluster: cluster)
        let b = try TestNode(id: "b", cluster: cluster)
        var c: TestNode? = try TestNode(id: "c", cluster: cluster)
        defer { a.stop(); b.stop(); c?.stop() }
        #expect(waitForNodes([a, b, c!], count: 3))
        let blocks = (0..<6).map { blockOf(300_000, seed: 200 + UInt64($0)) }
        for (id, bytes) in blocks { try bytes.withUnsafeBytes { _ = try a.local.put(id, $0) } }
        let ids = blocks.map(\.0)
        // Synchronous: ack = 3 pushes to both others before returning.
        try a.replicator!.push(ids, copies: 3, policy: ReplicationPolicy(replicas: 3, ack: 3), durable: true, what: "test")
        #expect(ids.allSatisfy { b.local.contains($0) && c!.local.contains($0) })

        // A job journaled while C is down stays pending, survives a restart of A's replicator,
        // and completes once C is back.
        c!.stop()
        c = nil
        #expect(waitForNodes([a, b], count: 2))
        let more = (0..<4).map { blockOf(200_000, seed: 300 + UInt64($0)) }
        for (id, bytes) in more { try bytes.withUnsafeBytes { _ = try a.local.put(id, $0) } }
        a.replicator!.stop()
        a.replicator = try Replicator(dataDir: a.dir, local: a.local, membership: a.membership, client: a.client, meta: a.meta,
                                      defaultPolicy: ReplicationPolicy(replicas: 3, ack: 1), timeout: 10)
        _ = try a.replicator!.journal(ino: InodeNumber(77), parent: nil, blocks: more.map(\.0), bytes: 800_000)
        a.replicator!.stop()
        a.replicator = try Replicator(dataDir: a.dir, local: a.local, membership: a.membership, client: a.client, meta: a.meta,
                                      defaultPolicy: ReplicationPolicy(replicas: 3, ack: 1), timeout: 10)
        #expect(a.replicator!.status().pendingJobs == 1)
        a.replicator!.start()
        // Two live nodes for three replicas: it stays pending and shows as under-replicated.
        #expect(waitUntil(timeout: 10) { a.replicator!.status().underReplicatedBytes == 800_000 })
        c = try TestNode(id: "c", cluster: cluster)
        #expect(waitForNodes([a, b, c!], count: 3))
        #expect(a.replicator!.waitUntilReplicated(inodes: [InodeNumber(77)], timeout: 20) { _ in })
        #expect(more.allSatisfy { b.local.contains($0.0) && c!.local.contains($0.0) })
        #expect(a.replicator!.status().pendingJobs == 0)
    }

    /// Chain replication: one PUT to the first node, which stores the block and sends it on to
    /// the next; the answer names every node that stored it. A chain broken by a node that is not
    /// live stops there, and the answer says so.
    @Test func aChainedPutStoresOnEveryNodeOfTheChain() throws {
        let cluster = "chain-\(UInt64.random(in: 0...UInt64.max))"
        let a = try TestNode(id: "a", cluster: cluster), b = try TestNode(id: "b", cluster: cluster), c = try TestNode(id: "c", cluster: cluster)
        defer { a.stop(); b.stop(); c.stop() }
        #expect(waitForNodes([a, b, c], count: 3))
        let node = { (n: TestNode) in n.membership.me }
        let (id, bytes) = blockOf(1 << 20, seed: 900)
        try bytes.withUnsafeBytes { _ = try a.local.put(id, $0) }
        let stored = try a.client.putChained(OutgoingBlock(id, from: a.local), to: [node(b), node(c)], durable: true)
        #expect(stored == ["b", "c"])
        #expect(b.local.contains(id) && c.local.contains(id))
        #expect(try c.local.read(id).withUnsafeBytes { Array($0) } == bytes)

        let (id2, bytes2) = blockOf(300_000, seed: 901)
        try bytes2.withUnsafeBytes { _ = try a.local.put(id2, $0) }
        let ghost = NodeInfo(id: "ghost", address: "127.0.0.1:1")
        #expect(try a.client.putChained(OutgoingBlock(id2, from: a.local), to: [node(b), ghost, node(c)], durable: false) == ["b"])
        #expect(b.local.contains(id2) && !c.local.contains(id2))
    }

    @Test func policiesParseAndRefuseNonsense() throws {
        #expect(try ReplicationPolicy(parsing: "replicas=3,ack=2,spread=zone") == ReplicationPolicy(replicas: 3, ack: 2, spread: "zone"))
        #expect(try ReplicationPolicy(parsing: "ack=1, replicas=2") == ReplicationPolicy(replicas: 2, ack: 1))
        for bad in ["replicas=2,ack=3", "replicas=0,ack=0", "replicas=3", "copies=3,ack=1", "replicas=x,ack=1"] {
            #expect(throws: FSError.self, "\(bad)") { _ = try ReplicationPolicy(parsing: bad) }
        }
    }
}

@Suite struct HealStatusRecordTests {
    @Test func aRecordFromAnOlderNodeStillDecodes() throws {
        var s = HealStatus()
        s.healer = "node-2"; s.passes = 7; s.copiedBytes = 123_456; s.rateCap = 50_000_000
        s.draining = ["node-3": 12]; s.lastError = "peer node-4 unreachable"
        let full = try JSONEncoder().encode(s)
        #expect(try JSONDecoder().decode(HealStatus.self, from: full) == s)
        // The same record as a node without --heal-rate wrote it: no rateCap key, plus a key
        // this version does not know.
        var dict = try #require(try JSONSerialization.jsonObject(with: full) as? [String: Any])
        dict["rateCap"] = nil
        dict["someFutureField"] = 1
        let old = try JSONDecoder().decode(HealStatus.self, from: JSONSerialization.data(withJSONObject: dict))
        var expected = s
        expected.rateCap = 0
        #expect(old == expected)
        #expect(try JSONDecoder().decode(HealStatus.self, from: Data("{}".utf8)) == HealStatus())
        // A field of the wrong type is still an error, not a silent default.
        #expect(throws: (any Error).self) { try JSONDecoder().decode(HealStatus.self, from: Data(#"{"passes":"many"}"#.utf8)) }
    }
}

@Suite struct HealScheduleTests {
    /// With the cluster unchanged: a pass that copied is checked an interval later; one that
    /// only failed is retried after an interval doubled per failure in a row, at most 10
    /// minutes (a lasting error once cost a 50,000-file cluster a walk every 5 s); a clean one
    /// waits for `fullEvery`.
    @Test func errorsBackOffProgressIsCheckedCleanWaits() {
        let t0 = Date(timeIntervalSince1970: 1_000_000)
        func next(_ leftWork: Bool, _ failures: Int, fullEvery: Double = 3600) -> Double {
            let last = Healer.LastPass(situation: nil, leftWork: leftWork, failures: failures, at: t0)
            return Healer.nextPass(after: last, interval: 5, fullEvery: fullEvery).timeIntervalSince(t0)
        }
        #expect(next(true, 0) == 5)
        #expect(next(true, 4) == 5, "a pass that made progress is checked at once, errors or not")
        #expect((1...5).map { next(false, $0) } == [5, 10, 20, 40, 80])
        #expect(next(false, 12) == 600)
        #expect(next(false, 10_000) == 600)
        #expect(next(false, 12, fullEvery: 60) == 60, "never later than the periodic pass")
        #expect(next(false, 0) == 3600)
        #expect(Healer.why(.init(situation: nil, leftWork: false, failures: 3, at: t0)) == "retrying after 3 failed passes")
    }
}

/// A listening TCP socket on 127.0.0.1 at a port the kernel picks: its descriptor and port.
func loopbackListener(backlog: Int32) throws -> (Int32, UInt16) {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw FSError.io("cannot make a socket") }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    let ok = withUnsafeMutablePointer(to: &addr) { a in
        a.withMemoryRebound(to: sockaddr.self, capacity: 1) { p in
            bind(fd, p, len) == 0 && listen(fd, backlog) == 0 && getsockname(fd, p, &len) == 0
        }
    }
    guard ok else { close(fd); throw FSError.io("cannot listen on loopback") }
    return (fd, UInt16(bigEndian: addr.sin_port))
}

/// A loopback "peer" on one thread that answers the requests it reads, in order, with `answers`
/// (raw bytes, each in one send), closing the connection after an answer marked so, and leaving
/// requests beyond them unanswered: what the peer server would never do, to see the block
/// fetcher cope. One connection at a time.
final class ScriptedPeer: @unchecked Sendable {
    let listener: Int32
    let port: UInt16
    private let answers: Mutex<[(bytes: [UInt8], close: Bool)]>
    let accepted = Mutex(0)
    /// The request bodies received, in order.
    let bodies = Mutex<[[UInt8]]>([])
    private let done = DispatchSemaphore(value: 0)

    init(_ answers: [(bytes: [UInt8], close: Bool)]) throws {
        self.answers = Mutex(answers)
        (listener, port) = try loopbackListener(backlog: 8)
        Thread.detachNewThread { [self] in
            defer { done.signal() }
            while true {
                let fd = accept(listener, nil, nil)
                guard fd >= 0 else { return }
                accepted.withLock { $0 += 1 }
                serve(fd)
            }
        }
    }

    private func serve(_ fd: Int32) {
        defer { close(fd) }
        var request: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = recv(fd, &chunk, chunk.count, 0)
            guard n > 0 else { return }
            request += chunk[0..<n]
            guard let end = BlockTransfer.headEnd(request, from: 0, to: request.count) else { continue }
            // A body (a PUT's): read all of it, keep it.
            let head = String(decoding: request[0..<end], as: UTF8.self).lowercased()
            let length = head.split(separator: "\r\n").first { $0.hasPrefix("content-length:") }
                .flatMap { Int($0.dropFirst("content-length:".count).trimmingCharacters(in: .whitespaces)) } ?? 0
            var body = Array(request[end...])
            while body.count < length {
                let m = recv(fd, &chunk, min(chunk.count, length - body.count), 0)
                guard m > 0 else { return }
                body += chunk[0..<m]
            }
            if length > 0 { bodies.withLock { $0.append(body) } }
            request = []
            // Out of answers: hold the connection, unanswered, until the client closes it.
            guard let next = answers.withLock({ $0.isEmpty ? nil : $0.removeFirst() }) else { continue }
            _ = next.bytes.withUnsafeBytes { send(fd, $0.baseAddress!, $0.count, Int32(MSG_NOSIGNAL)) }
            if next.close { return }
        }
    }

    var node: NodeInfo { NodeInfo(id: "scripted", address: "127.0.0.1:\(port)") }

    func stop() {
        shutdown(listener, Int32(SHUT_RDWR))
        close(listener)
        done.wait()
    }

    static func ok(_ body: [UInt8]) -> [UInt8] { Array("HTTP/1.1 200 OK\r\nContent-Length: \(body.count)\r\n\r\n".utf8) + body }
}

@Suite struct BlockTransferTests {
    @Test func aKeptAliveConnectionThePeerClosedIsReplacedAndTheBlockStillComes() throws {
        let (id, bytes) = blockOf(300_000, seed: 70)
        // The first answer says keep-alive (HTTP/1.1, no Connection: close) and the peer then
        // closes anyway, as a restarted or idle-closing server does; head and body come in one
        // send, so the first bytes of the body arrive with the head.
        let peer = try ScriptedPeer([(ScriptedPeer.ok(bytes), true), (ScriptedPeer.ok(bytes), false)])
        defer { peer.stop() }
        let client = PeerClient(secret: "s3cret", timeout: .seconds(5))
        defer { client.shutdown() }
        for _ in 0..<2 {
            let got = try #require(try client.get(id, from: peer.node))
            #expect(got.withUnsafeBytes { Array($0) } == bytes)
        }
        #expect(peer.accepted.withLock { $0 } == 2)
    }

    @Test func aPutOnAConnectionThePeerClosedIsSentAgainWholeOnANewOne() throws {
        let (id, bytes) = blockOf(200_000, seed: 76)
        let created = Array("HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n".utf8)
        let peer = try ScriptedPeer([(created, true), (created, false)])
        defer { peer.stop() }
        let client = PeerClient(secret: "s3cret", timeout: .seconds(5))
        defer { client.shutdown() }
        let dir = try scratch("put-source")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let source = try PackBlockStore(root: dir)
        _ = try bytes.withUnsafeBytes { try source.put(id, $0) }
        try bytes.withUnsafeBytes { try client.put(id, $0, to: peer.node, durable: false) }   // from memory
        #expect(try client.put(id, from: source, to: peer.node, durable: true) == bytes.count)   // by sendfile, retried
        #expect(peer.accepted.withLock { $0 } == 2)
        #expect(peer.bodies.withLock { $0 } == [bytes, bytes])
    }

    @Test func aConnectionIdleLongerThanTheLimitIsClosedNotReused() throws {
        let (id, bytes) = blockOf(70_000, seed: 77)
        let peer = try ScriptedPeer(Array(repeating: (ScriptedPeer.ok(bytes), false), count: 3))
        defer { peer.stop() }
        let transfer = BlockTransfer(authorization: "Bearer s3cret", timeout: 5, maxIdleSeconds: 0.3)
        defer { transfer.shutdown() }
        let path = "/v1/blocks/\(id.hex)"
        #expect(try transfer.get(path, from: "127.0.0.1:\(peer.port)", limit: 1 << 20).digest == id)
        #expect(try transfer.get(path, from: "127.0.0.1:\(peer.port)", limit: 1 << 20).digest == id)
        #expect(peer.accepted.withLock { $0 } == 1)   // within the limit: the same connection
        // The idle limit is the thing under test: time has to pass.
        Thread.sleep(forTimeInterval: 0.5)
        #expect(try transfer.get(path, from: "127.0.0.1:\(peer.port)", limit: 1 << 20).digest == id)
        #expect(peer.accepted.withLock { $0 } == 2)
    }

    @Test func aConnectionIsReusedWhileThePeerKeepsIt() throws {
        let (id, bytes) = blockOf(70_000, seed: 71)
        let peer = try ScriptedPeer(Array(repeating: (ScriptedPeer.ok(bytes), false), count: 3))
        defer { peer.stop() }
        let client = PeerClient(secret: "s3cret", timeout: .seconds(5))
        defer { client.shutdown() }
        for _ in 0..<3 { #expect(try client.get(id, from: peer.node) != nil) }
        #expect(peer.accepted.withLock { $0 } == 1)
    }

    @Test func bytesThatAreNotTheBlockAreNeverReturned() throws {
        let (id, bytes) = blockOf(100_000, seed: 72)
        var wrong = bytes
        wrong[99_999] ^= 1
        let peer = try ScriptedPeer([(ScriptedPeer.ok(wrong), false)])
        defer { peer.stop() }
        let client = PeerClient(secret: "s3cret", timeout: .seconds(5))
        defer { client.shutdown() }
        #expect(try client.get(id, from: peer.node) == nil)
    }

    @Test func malformedOrCutAnswersFailAsTransportErrorsNamingThePeer() throws {
        let (id, _) = blockOf(1000, seed: 73)
        let answers: [(String, [UInt8])] = [
            ("junk", Array("hello there\r\n\r\n".utf8)),
            ("no length", Array("HTTP/1.1 200 OK\r\nContent-Type: x\r\n\r\nabc".utf8)),
            ("chunked", Array("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".utf8)),
            ("cut body", Array("HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nabc".utf8)),
            ("cut head", Array("HTTP/1.1 200 OK\r\nContent-Len".utf8)),
            ("huge head", Array("HTTP/1.1 200 OK\r\nX: \(String(repeating: "a", count: 9000))\r\n\r\n".utf8)),
        ]
        for (what, answer) in answers {
            let peer = try ScriptedPeer([(answer, true)])
            defer { peer.stop() }
            let client = PeerClient(secret: "s3cret", timeout: .seconds(5))
            defer { client.shutdown() }
            let e = #expect(throws: PeerError.self, "\(what)") { _ = try client.get(id, from: peer.node) }
            #expect(e?.kind == .unreachable, "\(what)")
            #expect(e?.message.contains("peer scripted at 127.0.0.1:\(peer.port) unreachable") == true, "\(what): \(e?.message ?? "")")
        }
    }

    @Test func aPeerThatSendsNothingTimesOut() throws {
        let (id, _) = blockOf(1000, seed: 74)
        let peer = try ScriptedPeer([])   // reads the request, never answers, holds the connection
        let client = PeerClient(secret: "s3cret", timeout: .milliseconds(300))
        defer { client.shutdown() }
        let e = #expect(throws: PeerError.self) { _ = try client.get(id, from: peer.node) }
        #expect(e?.kind == .unreachable)
        #expect(e?.message.contains("sent nothing for") == true, "\(e?.message ?? "")")
        peer.stop()
    }

    @Test func aBigErrorBodyOrABodyOverTheLimitClosesTheConnection() throws {
        let (id, _) = blockOf(1000, seed: 75)
        let big = [UInt8](repeating: 65, count: 100_000)
        let peer = try ScriptedPeer([
            (Array("HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\n\r\noops!".utf8), false),
            (Array("HTTP/1.1 503 Service Unavailable\r\nContent-Length: \(big.count)\r\n\r\n".utf8) + big, false),
            (Array("HTTP/1.1 200 OK\r\nContent-Length: \(PeerLimits.maxBlock + 1)\r\n\r\n".utf8), false),
        ])
        defer { peer.stop() }
        let client = PeerClient(secret: "s3cret", timeout: .seconds(5))
        defer { client.shutdown() }
        let e1 = #expect(throws: PeerError.self) { _ = try client.get(id, from: peer.node) }
        #expect(e1?.kind == .refused(500))
        #expect(e1?.message.contains("500 oops!") == true, "\(e1?.message ?? "")")
        #expect(throws: PeerError.self) { _ = try client.get(id, from: peer.node) }   // same connection
        #expect(throws: PeerError.self) { _ = try client.get(id, from: peer.node) }   // a new one
        #expect(peer.accepted.withLock { $0 } == 2)
    }

    @Test func headsAndAddressesAreParsed() {
        #expect(BlockTransfer.parseHead(ArraySlice("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n".utf8)).map { [$0.status, $0.length, $0.keepAlive ? 1 : 0] } == [200, 12, 1])
        #expect(BlockTransfer.parseHead(ArraySlice("HTTP/1.1 404 Not Found\r\ncontent-length:0\r\nConnection: close\r\n\r\n".utf8)).map { [$0.status, $0.length, $0.keepAlive ? 1 : 0] } == [404, 0, 0])
        #expect(BlockTransfer.parseHead(ArraySlice("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n".utf8)).map { [$0.status, $0.length, $0.keepAlive ? 1 : 0] } == [200, 1, 0])
        #expect(BlockTransfer.parseHead(ArraySlice("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n".utf8)) == nil)
        #expect(BlockTransfer.parseHead(ArraySlice("HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nRetry-After: 1\r\n\r\n".utf8))?.retryAfter == 1)
        #expect(BlockTransfer.parseHead(ArraySlice("HTTP/1.1 2000 OK\r\nContent-Length: 1\r\n\r\n".utf8)) == nil)
        #expect(BlockTransfer.split("127.0.0.1:7000")! == ("127.0.0.1", "7000"))
        #expect(BlockTransfer.split("[::1]:7000")! == ("::1", "7000"))
        #expect(BlockTransfer.split("node-b.example:80")! == ("node-b.example", "80"))
        for bad in ["127.0.0.1", ":80", "host:", "host:8x", "[::1]", "[::1]:"] { #expect(BlockTransfer.split(bad) == nil, "\(bad)") }
    }
}

@Suite struct WriterLockTests {
    /// A RELEASE while etcd cannot be reached leaves the lock in etcd: it is deleted once etcd is
    /// back (otherwise it would stay until this node's lease ends, and other nodes would get
    /// EBUSY for a file nobody writes); and a lock this node takes again meanwhile is never
    /// deleted by that retry.
    @Test func aReleaseThatFailsIsRetriedButNeverDropsALockTakenAgain() throws {
        let etcd = try EtcdTestCluster(members: 1)
        defer { etcd.stop() }
        let client = try EtcdClient(endpoints: etcd.endpoints, timeout: .seconds(2))
        let cluster = "wlock-\(UInt64.random(in: 0...UInt64.max))"
        let membership = Membership(client: client, cluster: cluster, me: NodeInfo(id: "holder", address: "127.0.0.1:1"), ttl: 60, refresh: 0.2)
        try membership.start()
        let peers = PeerClient(secret: "s3cret", timeout: .seconds(2))
        defer { membership.stop(); peers.shutdown(); client.shutdown() }
        let lock = EtcdWriterLock(client: client, cluster: cluster, membership: membership, peers: peers, retryPause: .milliseconds(50))
        func holder(_ ino: UInt64) throws -> String? {
            try client.range(lock.key(InodeNumber(ino))).kvs.first.map { String(decoding: $0.value, as: UTF8.self) }
        }
        func etcdOutage(_ during: () -> Void) throws {
            etcd.kill(0)
            during()
            try etcd.start(0)
            #expect(waitUntil(timeout: 20) { (try? client.range(Data("/".utf8))) != nil })
        }

        // Released while etcd is down: still held, retried, gone once etcd answers again.
        _ = try lock.acquire(InodeNumber(7))
        #expect(try holder(7) == "holder")
        try etcdOutage {
            lock.release(InodeNumber(7))
            #expect(lock.unreleasedCount == 1)
        }
        #expect(waitUntil(timeout: 20) { lock.unreleasedCount == 0 })
        #expect(try holder(7) == nil)

        // Released while etcd is down, then taken again by this node: the retry leaves it be.
        _ = try lock.acquire(InodeNumber(8))
        try etcdOutage { lock.release(InodeNumber(8)) }
        _ = try lock.acquire(InodeNumber(8))
        #expect(lock.unreleasedCount == 0)
        lock.release(InodeNumber(9))   // a lock never taken: a delete that finds nothing, at once
        #expect(lock.unreleasedCount == 0)
        #expect(try holder(8) == "holder")
        lock.release(InodeNumber(8))
        #expect(try holder(8) == nil)
    }
}

/// The healing planner's rebalancing, run to a standstill on a model cluster (every planned copy
/// made, every planned drop done, the nodes' usage recounted between passes).
@Suite struct RebalanceTests {
    struct Model {
        var nodes: [NodeInfo]
        var holders: [BlockID: [String]] = [:]
        var want: [BlockID: Healer.Want] = [:]

        mutating func recount() {
            var used: [String: UInt64] = [:]
            for (id, h) in holders { for n in h { used[n, default: 0] += UInt64(want[id]!.length) } }
            for i in nodes.indices { nodes[i].usedBytes = used[nodes[i].id, default: 0] }
        }

        /// Passes until one moves nothing; returns the copies made.
        mutating func settle(budget: UInt64 = 64 << 20) -> Int {
            var copied = 0
            for _ in 0..<200 {
                recount()
                let (_, copies, drops) = Healer.plan(want: want, holders: holders, live: nodes, draining: [],
                                                     everyNodeAnswered: true, moveBudget: budget)
                if copies.isEmpty && drops.isEmpty { return copied }
                for c in copies { holders[c.id, default: []] += c.to.map(\.id) }
                for (id, n) in drops { holders[id]?.removeAll { $0 == n.id } }
                copied += copies.count
            }
            Issue.record("rebalancing did not come to a standstill in 200 passes")
            return copied
        }

        func share(_ node: String) -> Double {
            let total = nodes.reduce(UInt64(0)) { $0 + $1.usedBytes }
            return Double(nodes.first { $0.id == node }!.usedBytes) / Double(total)
        }
    }

    /// `writer` writes every block; with `everyNodeWrites`, each block's writer is one of the
    /// nodes in turn (every node trains: each keeps a copy of what it writes).
    static func cluster(_ n: Int, blocks: Int, writer: String? = nil, everyNodeWrites: Bool = false) -> Model {
        var m = Model(nodes: (0..<n).map { NodeInfo(id: "n\($0)", address: "x:\($0)") })
        for seed in 0..<UInt64(blocks) {
            let (id, _) = blockOf(16, seed: seed)
            m.want[id] = Healer.Want(copies: 3, length: 1 << 20, spread: nil, settled: true)
            let w = everyNodeWrites ? "n\(seed % UInt64(n))" : writer
            m.holders[id] = Placement.targets(id, nodes: m.nodes, replicas: 3, writer: w).map(\.id)
        }
        return m
    }

    /// Every node writes (and keeps a copy of what it writes, so a block's copies are not where
    /// its placement alone would put them): a node that joins still fills to about its share.
    @Test func aJoiningNodeFillsAmongWriters() {
        var m = Self.cluster(8, blocks: 6000, everyNodeWrites: true)
        m.nodes.append(NodeInfo(id: "new", address: "x:99"))
        _ = m.settle()
        m.recount()
        let share = m.share("new")
        #expect(share > 0.85 / 9 && share < 1.1 / 9, "the new node holds \(share), fair is \(1.0 / 9)")
        #expect(m.holders.values.allSatisfy { $0.count == 3 })
    }

    /// A node joins a placed cluster of 8: it fills to about its fair share (1/9), and the
    /// copies made are about that share, not more (rendezvous moves only what the node wins).
    @Test func aJoiningNodeFillsToItsShare() {
        var m = Self.cluster(8, blocks: 6000)
        m.nodes.append(NodeInfo(id: "new", address: "x:99"))
        let copied = m.settle()
        m.recount()
        let share = m.share("new")
        #expect(share > 0.85 / 9 && share < 1.1 / 9, "the new node holds \(share), fair is \(1.0 / 9)")
        #expect(Double(copied) < 1.15 * Double(m.nodes.last!.usedBytes >> 20), "copied \(copied) blocks")
        #expect(m.holders.values.allSatisfy { $0.count == 3 })
    }

    /// One trainer writes everything (it keeps a copy of every block): its node holds far more
    /// than the mean, the others are level, and nothing needs to move.
    @Test func oneWriterClusterStaysPut() {
        var m = Self.cluster(8, blocks: 3000, writer: "n0")
        let copied = m.settle()
        #expect(copied < 3000 / 20, "a one-writer cluster moved \(copied) of 3000 blocks")
        #expect(m.holders.values.allSatisfy { $0.count == 3 })
    }
}

/// The asks and answers garbage collection's scanner reads from etcd: what is encoded decodes to
/// the same, and a value of the wrong shape is refused, not misread.
@Suite struct ReferenceScanWireTests {
    @Test func asksAndAnswersRoundTripAndBadValuesAreRefused() {
        let ids = (0..<5).map { BlockID.hash(Data("block \($0)".utf8)) }
        let ask = ReferenceScans.encode(sequence: 77, lease: 123_456_789, ids: ids)
        let a = ReferenceScans.decode(ask, withLease: true)
        #expect(a?.sequence == 77 && a?.lease == 123_456_789 && a?.ids == ids)
        let answer = ReferenceScans.decode(ReferenceScans.encode(sequence: 78, lease: nil, ids: ids.prefix(2)), withLease: false)
        #expect(answer?.sequence == 78 && answer?.ids == Array(ids.prefix(2)))
        #expect(ReferenceScans.decode(ReferenceScans.encode(sequence: 1, lease: nil, ids: []), withLease: false)?.ids == [])
        #expect(ReferenceScans.decode(ask.dropLast(), withLease: true) == nil)
        #expect(ReferenceScans.decode(Data([1, 2, 3]), withLease: false) == nil)
    }
}
