import Foundation
import ModelFSCore
import ModelFSStore
import NIOCore
import NIOHTTP1
import Synchronization

/// The peer protocol (DESIGN.md §5), served by every node:
///
///   GET  /v1/blocks/ID[?relay=INO.VERSION&via=N1,N2...]
///                               the block's bytes (from its replicas or its read cache; not
///                               re-hashed: the asker verifies), 404 if this node has no copy;
///                               with relay (fan-out: the asker and this node load that file
///                               version), a block this node has in neither store is taken from
///                               its memory or got for the asker (from its parent in the block's
///                               tree, never a node of via, or from the holders); 503 if it
///                               cannot get it now
///   HEAD /v1/blocks/ID          200 or 404
///   PUT  /v1/blocks/ID[?durable=1][&heal=1|urgent][&chain=N1,N2...]
///                               stores a block: hashed first, 422 if the bytes are not ID's;
///                               with durable=1 it is fsynced before the answer; heal marks a
///                               healing copy: held back while this node serves the foreground
///                               (1), or not, for a block down to its last live copy (urgent);
///                               chain: PUT it to node N1 too (a live node of this cluster, by
///                               id) with the rest of the chain, while storing it here (a hop
///                               costs its transfer, not the transfer then the store), and
///                               answer once both are done:
///                               the body lists the chain's nodes that stored it (chain
///                               replication: the writer's link carries each byte once)
///   DELETE /v1/blocks/ID        drops this node's replica (healing moves it off a draining node
///                               only once enough other copies are confirmed)
///   POST /v1/has                body: N 32-byte ids; answer: N bytes, 1 where the node has it
///   POST /v1/copy               body: CopyOrder (JSON): send these blocks from this node to those
///                               nodes, then sync each of them; answer: CopyResult (JSON). The
///                               healer has each block's holder push it, so every byte crosses
///                               the network once and is hashed once, by its receiver
///   POST /v1/sync               body: N ids; makes those blocks durable (fdatasync of the packs
///                               holding them): healing sends its copies without ?durable=1,
///                               then syncs each receiving node once per batch
///   POST /v1/verify             body: N ids; each replica is re-read and hashed, a corrupt one
///                               replaced from a good copy; answer: N bytes, 0 no replica here,
///                               1 good, 2 was corrupt and is repaired, 3 corrupt, no good copy
///   GET  /v1/writing/INO        `open`, `closing` or `no`: whether this node has inode INO
///                               (decimal) open for writing, and if so whether the FLUSH of its
///                               last handle came (its write lock is about to be given back)
///   GET  /v1/status             the node's status (JSON)
///   GET  /metrics               Prometheus text
///
/// Every request must carry `Authorization: Bearer SECRET` (the cluster secret): otherwise 401
/// and nothing else. The metrics token (`--metrics-token-file`), when set, reads GET /metrics
/// and GET /v1/status and nothing more (403): a scraper can never delete a replica. Ids are exactly 64 lowercase hex digits (no path is ever built from them);
/// a body is at most one maximum-size block.
/// What the peer routes ask of the rest of the node, given when the service is made (the node
/// makes its service last, once every part these reach exists). A missing one answers as a
/// node without that part: a copy order or a `writing` query gets 503, a chain stops here, a
/// verify finds no repair.
public struct PeerActions: Sendable {
    /// Replaces a corrupt replica from a good copy elsewhere (the scrubber's repair).
    public var repair: (@Sendable (BlockID) -> Bool)?
    /// Carries out a copy order (Healer.perform).
    public var copy: (@Sendable (CopyOrder) -> CopyResult)?
    /// Forwards a stored block down a chain (PUT ...&chain=): returns the ids of the chain's
    /// nodes that stored it (PeerClient.forward over the live members).
    public var forward: (@Sendable (OutgoingBlock, [String], Bool) -> [String])?
    /// Whether the filesystem writes an inode, and whether it is closing it (FileSystem.writing).
    public var writing: (@Sendable (InodeNumber) -> (open: Bool, closing: Bool))?
    /// A fan-out request for a block this node has in neither store (`GET ...?relay=FILE&via=`):
    /// the block, verified, if this node loads that file version (it has the block in memory, or
    /// gets it for the asking loader, never through a node of `via`); nil if it does not load
    /// it (404); an error if it cannot get the block now (503).
    public var relay: (@Sendable (BlockID, FileVersion, [String]) throws -> BlockBuffer?)?

    public init(repair: (@Sendable (BlockID) -> Bool)? = nil, copy: (@Sendable (CopyOrder) -> CopyResult)? = nil,
                forward: (@Sendable (OutgoingBlock, [String], Bool) -> [String])? = nil,
                writing: (@Sendable (InodeNumber) -> (open: Bool, closing: Bool))? = nil,
                relay: (@Sendable (BlockID, FileVersion, [String]) throws -> BlockBuffer?)? = nil) {
        self.repair = repair; self.copy = copy; self.forward = forward; self.writing = writing; self.relay = relay
    }
}

public final class PeerService: PeerRoutes, Sendable {
    let secret: [UInt8]
    let readToken: [UInt8]?
    let local: PackBlockStore
    let cache: PackBlockStore?
    public let metrics: PeerMetrics
    let status: @Sendable () -> Data
    /// Notes the blocks served to other nodes' readers and writers as foreground work, and holds
    /// healing copies back meanwhile.
    let yield: ForegroundYield?
    /// What the routes ask of the rest of the node.
    let actions: PeerActions
    public static let maxBody = (4 << 20) + (64 << 10)

    public init(secret: String, local: PackBlockStore, cache: PackBlockStore?, metrics: PeerMetrics,
                yield: ForegroundYield? = nil, readToken: String? = nil, actions: PeerActions = PeerActions(),
                status: @escaping @Sendable () -> Data) {
        self.actions = actions
        self.secret = Array(secret.utf8)
        self.readToken = readToken.map { Array($0.utf8) }
        self.yield = yield
        self.local = local
        self.cache = cache
        self.metrics = metrics
        self.status = status
    }

    enum Access { case none, read, all }

    /// What the request's bearer may do: everything with the cluster secret, read metrics and
    /// status with the metrics token.
    func access(_ headers: HTTPHeaders) -> Access {
        guard let value = headers.first(name: "authorization"), value.hasPrefix("Bearer ") else { return .none }
        let given = Array(value.utf8.dropFirst(7))
        if Self.same(given, secret) { return .all }
        if let readToken, Self.same(given, readToken) { return .read }
        return .none
    }

    /// Compares in time independent of where the first difference is (also the metrics token's check).
    public static func same(_ given: [UInt8], _ expected: [UInt8]) -> Bool {
        var diff = UInt8(given.count == expected.count ? 0 : 1)
        for i in 0..<expected.count { diff |= expected[i] ^ (i < given.count ? given[i] : 0) }
        return diff == 0
    }

    public func handle(_ r: PeerRequest) -> PeerResponse {
        let start = DispatchTime.now().uptimeNanoseconds
        let (route, response) = route(r)
        metrics.request(route: route, status: Int(response.status.code), bytesIn: r.bodyBytes,
                        bytesOut: r.method == .HEAD ? 0 : response.bodyBytes,
                        seconds: Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9)
        return response
    }

    func route(_ r: PeerRequest) -> (String, PeerResponse) {
        switch access(r.headers) {
        case .none: return ("unauthorized", .text(.unauthorized, "missing or wrong cluster secret"))
        case .read:
            guard r.method == .GET, r.path == "/metrics" || r.path == "/v1/status" else {
                return ("forbidden", .text(.forbidden, "the metrics token reads GET /metrics and /v1/status only"))
            }
        case .all: break
        }
        if r.path.hasPrefix("/v1/blocks/") {
            let hex = r.path.dropFirst("/v1/blocks/".count)
            guard hex.count == 64, hex.utf8.allSatisfy({ (48...57).contains($0) || (97...102).contains($0) }),
                  let id = BlockID(hex: hex) else {
                return ("block", .text(.badRequest, "a block id is 64 lowercase hex digits"))
            }
            switch r.method {
            case .GET:
                guard let text = r.query["relay"] else { return ("get", get(id)) }
                guard let file = FileVersion(text: text) else { return ("get", .text(.badRequest, "relay names a file version as INO.VERSION (16 hex digits, a dot, decimal digits)")) }
                let via = (r.query["via"] ?? "").split(separator: ",").map(String.init)
                return ("get", get(id, relay: (file, via)))
            case .HEAD: return ("head", head(id))
            case .PUT: return ("put", put(id, r))
            case .DELETE: return ("delete", delete(id))
            default: return ("block", .text(.methodNotAllowed, "use GET, HEAD, PUT or DELETE"))
            }
        }
        if r.method == .GET, r.path.hasPrefix("/v1/writing/") {
            let digits = r.path.dropFirst("/v1/writing/".count)
            guard (1...20).contains(digits.count), digits.utf8.allSatisfy({ (48...57).contains($0) }), let n = UInt64(digits) else {
                return ("writing", .text(.badRequest, "an inode number is decimal digits"))
            }
            guard let query = actions.writing else { return ("writing", .text(.serviceUnavailable, "this node is not mounted yet")) }
            let w = query(InodeNumber(n))
            return ("writing", .text(.ok, w.closing ? "closing" : w.open ? "open" : "no"))
        }
        switch (r.method, r.path) {
        case (.POST, "/v1/has"): return ("has", has(r.body))
        case (.POST, "/v1/verify"): return ("verify", verify(r.body))
        case (.POST, "/v1/copy"):
            guard let order = try? JSONDecoder().decode(CopyOrder.self, from: Data(r.body.readableBytesView)) else {
                return ("copy", .text(.badRequest, "the body must be a JSON copy order"))
            }
            guard let perform = actions.copy else { return ("copy", .text(.serviceUnavailable, "this node does not copy yet")) }
            let result = perform(order)
            return ("copy", PeerResponse(.ok, body: ByteBuffer(bytes: (try? JSONEncoder().encode(result)) ?? Data()),
                                         contentType: "application/json"))
        case (.POST, "/v1/sync"):
            guard let ids = Self.ids(r.body) else { return ("sync", .text(.badRequest, "the body must be 32-byte block ids")) }
            do { try local.sync(ids); return ("sync", PeerResponse(.ok)) } catch {
                return ("sync", .text(.internalServerError, "cannot sync the block store: \(error)"))
            }
        case (.GET, "/v1/status"): return ("status", PeerResponse(.ok, body: ByteBuffer(bytes: status()), contentType: "application/json"))
        case (.GET, "/metrics"):
            return ("metrics", PeerResponse(.ok, body: ByteBuffer(string: metrics.render()), contentType: "text/plain; version=0.0.4"))
        default: return ("other", .text(.notFound, "no such route: \(r.method) \(r.path)"))
        }
    }

    func store(holding id: BlockID) -> PackBlockStore? {
        if local.contains(id) { return local }
        if let cache, cache.contains(id) { return cache }
        return nil
    }

    /// `relay`: a loader of that file version asks (fan-out): a block in neither store may still
    /// be had from `actions.relay`.
    func get(_ id: BlockID, relay: (file: FileVersion, via: [String])? = nil) -> PeerResponse {
        // Not re-hashed here: the asking node verifies every block it receives and skips a bad
        // copy (PeerClient.get). Read directly into memory where the record allows, else sent
        // straight from the pack file.
        guard let s = store(holding: id) else {
            if let relay, let fetch = actions.relay {
                do {
                    if let b = try fetch(id, relay.file, relay.via) {
                        yield?.noteForeground()
                        metrics.count("modelfs_peer_served_relayed_bytes_total", UInt64(b.count))
                        return PeerResponse(.ok, block: b)
                    }
                } catch {
                    return .text(.serviceUnavailable, "cannot relay \(id.hex) now: \(error)")
                }
            }
            return .text(.notFound, "no copy of \(id.hex) here")
        }
        yield?.noteForeground()   // another node's reader
        let response: PeerResponse
        if let b = s.readDirectForPeer(id) {
            response = PeerResponse(.ok, block: b)
        } else if let (fd, offset, length) = s.fileRangeForPeer(id) {
            response = PeerResponse(.ok, file: PeerFileBody(fd: fd, offset: offset, count: length))
        } else {
            return .text(.notFound, "no copy of \(id.hex) here")
        }
        // What left this node from its replicas and what from its read cache: a fan-out serves
        // each block from its holders about once, then from the loaders' caches.
        metrics.count(s === local ? "modelfs_peer_served_replica_bytes_total" : "modelfs_peer_served_cache_bytes_total",
                      UInt64(response.bodyBytes))
        return response
    }

    func head(_ id: BlockID) -> PeerResponse {
        local.contains(id) ? PeerResponse(.ok) : .text(.notFound, "no replica of \(id.hex) here")
    }

    func put(_ id: BlockID, _ r: PeerRequest) -> PeerResponse {
        // A block body comes hashed by the server as it arrived.
        let matches = r.block.map { b in (r.digest ?? b.withUnsafeBytes { BlockID.hash($0) }) == id }
            ?? r.body.withUnsafeReadableBytes { BlockID.hash($0) == id }
        guard matches else {
            metrics.count("modelfs_peer_rejected_blocks_total")
            return .text(.unprocessableEntity, "block rejected: its bytes do not hash to \(id.hex)")
        }
        // A healing copy waits while this node serves the foreground (unless its block is down to
        // one live copy); any other copy is a writer's: foreground work.
        switch r.query["heal"] {
        case nil: yield?.noteForeground()
        case HealCopy.urgent.rawValue?: yield?.admit(r.bodyBytes, received: true, yielding: false)
        default: yield?.admit(r.bodyBytes, received: true)
        }
        let chain = r.query["chain"]?.split(separator: ",").map(String.init) ?? []
        let durable = r.query["durable"] == "1"
        // A chained block in memory goes on to the next node while it is stored here: the
        // chain's time per hop is the transfer, not the transfer and then the store (on these
        // machines a 1 MiB direct write waited 5-20 ms for the pack's append lock and the disk).
        var onward: (done: DispatchSemaphore, stored: Shared<[String]>)?
        if !chain.isEmpty, let block = r.block, let forward = actions.forward {
            let out = OutgoingBlock(id, in: block, length: block.count, store: local)
            let o = (done: DispatchSemaphore(value: 0), stored: Shared<[String]>([]))
            Thread { o.stored.set(forward(out, chain, durable)); o.done.signal() }.start()
            onward = o
        }
        // A body received into block memory is stored from that buffer (a direct write for a
        // large block, no copy through the page cache). The write zeroes the buffer's padding
        // after the block; the forwarding thread reads the block's bytes only.
        let here = Result { () throws -> Bool in
            let created = if let block = r.block {
                try local.put(id, owned: block, length: block.count)
            } else {
                try r.body.withUnsafeReadableBytes { try local.put(id, $0) }
            }
            if durable { try local.sync([id]) }
            return created
        }
        var below: [String]?
        if let onward {
            onward.done.wait()
            below = onward.stored.get()
        }
        switch here {
        case .success(let created):
            if below == nil && !chain.isEmpty {
                // A small body: sent on from the store.
                below = actions.forward?(OutgoingBlock(id, from: local), chain, durable) ?? []
            }
            if let below { return .text(created ? .created : .ok, below.joined(separator: " ")) }
            return created ? PeerResponse(.created) : PeerResponse(.ok)
        case .failure(let e as StoreError) where e.kind == .full:
            return .text(.insufficientStorage, "no space left on this node: \(e.message)")
        case .failure(let e):
            return .text(.internalServerError, "cannot store \(id.hex): \(e)")
        }
    }

    func delete(_ id: BlockID) -> PeerResponse {
        do {
            return try local.remove(id) > 0 ? PeerResponse(.ok) : .text(.notFound, "no replica of \(id.hex) here")
        } catch {
            return .text(.internalServerError, "cannot drop \(id.hex): \(error)")
        }
    }

    /// The ids of a batch body (N × 32 bytes), or nil.
    static func ids(_ body: ByteBuffer) -> [BlockID]? {
        guard body.readableBytes % 32 == 0 else { return nil }
        return body.withUnsafeReadableBytes { raw in
            stride(from: 0, to: raw.count, by: 32).map { BlockID(bytes: UnsafeRawBufferPointer(rebasing: raw[$0..<($0 + 32)]))! }
        }
    }

    func verify(_ body: ByteBuffer) -> PeerResponse {
        guard let ids = Self.ids(body) else { return .text(.badRequest, "the body must be 32-byte block ids") }
        var out = ByteBuffer()
        for id in ids {
            switch local.verify(id) {
            case nil: out.writeInteger(UInt8(0))
            case true?: out.writeInteger(UInt8(1))
            case false?:
                metrics.count("modelfs_corrupt_replicas_found_total")
                let fixed = actions.repair?(id) ?? false
                out.writeInteger(UInt8(fixed ? 2 : 3))
            }
        }
        return PeerResponse(.ok, body: out)
    }

    func has(_ body: ByteBuffer) -> PeerResponse {
        guard let ids = Self.ids(body) else { return .text(.badRequest, "the body must be 32-byte block ids") }
        var out = ByteBuffer()
        out.reserveCapacity(ids.count)
        // Touched: a replicator about to count these copies keeps them from garbage collection
        // until its node's commit references them.
        for present in local.touch(ids) { out.writeInteger(UInt8(present ? 1 : 0)) }
        return PeerResponse(.ok, body: out)
    }
}

/// Counters and a latency histogram per route, and gauges the node fills in, rendered in the
/// Prometheus text format.
public final class PeerMetrics: Sendable {
    static let buckets: [Double] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5]
    struct State {
        var requests: [String: UInt64] = [:]        // "route,status"
        var latency: [String: Histogram] = [:]
        var counters: [String: UInt64] = [:]
    }
    private let state = Mutex(State())
    /// Gauges computed when scraped: name → value.
    let gauges: Mutex<(@Sendable () -> [(String, Double)])?> = Mutex(nil)
    /// More metrics text, rendered by its owner (the FUSE operations, the mount's own gauges).
    let extra: Mutex<(@Sendable () -> String)?> = Mutex(nil)

    public func setExtra(_ f: @escaping @Sendable () -> String) { extra.withLock { $0 = f } }

    public init() {}

    public func setGauges(_ f: @escaping @Sendable () -> [(String, Double)]) { gauges.withLock { $0 = f } }

    /// Peer bytes received and sent since start.
    public var traffic: (bytesIn: UInt64, bytesOut: UInt64) {
        state.withLock { ($0.counters["modelfs_peer_bytes_in_total"] ?? 0, $0.counters["modelfs_peer_bytes_out_total"] ?? 0) }
    }

    public func count(_ name: String, _ by: UInt64 = 1) { state.withLock { $0.counters[name, default: 0] += by } }

    func request(route: String, status: Int, bytesIn: Int, bytesOut: Int, seconds: Double) {
        state.withLock { s in
            s.requests["\(route),\(status)", default: 0] += 1
            s.latency[route, default: Histogram(bounds: Self.buckets)].record(seconds)
            s.counters["modelfs_peer_bytes_in_total", default: 0] += UInt64(bytesIn)
            s.counters["modelfs_peer_bytes_out_total", default: 0] += UInt64(bytesOut)
        }
    }

    public func render() -> String {
        let s = state.withLock { $0 }
        var out = "# TYPE modelfs_peer_requests_total counter\n"
        for (k, v) in s.requests.sorted(by: { $0.key < $1.key }) {
            let p = k.split(separator: ",")
            out += "modelfs_peer_requests_total{route=\"\(p[0])\",status=\"\(p[1])\"} \(v)\n"
        }
        out += "# TYPE modelfs_peer_request_seconds histogram\n"
        for (route, h) in s.latency.sorted(by: { $0.key < $1.key }) {
            out += h.render("modelfs_peer_request_seconds", labels: "route=\"\(route)\"")
        }
        for (k, v) in s.counters.sorted(by: { $0.key < $1.key }) { out += "# TYPE \(k) counter\n\(k) \(v)\n" }
        if let g = gauges.withLock({ $0 }) {
            for (k, v) in g() { out += "# TYPE \(k) gauge\n\(k) \(v)\n" }
        }
        if let e = extra.withLock({ $0 }) { out += e() }
        return out
    }
}
