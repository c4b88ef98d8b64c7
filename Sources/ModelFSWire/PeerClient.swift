import AsyncHTTPClient
import Foundation
import ModelFSCore
import ModelFSStore
import NIOCore
import NIOHTTP1
import Synchronization

/// Talks to other nodes' peer servers over kept-alive connections: block GETs and PUTs on plain
/// sockets (`BlockTransfer`), the other requests through AsyncHTTPClient. Calls are synchronous:
/// they come from FUSE worker threads and replication threads, never from an event loop. Every
/// block received is verified against its id before anyone sees it.
public final class PeerClient: Sendable {
    let http: HTTPClient
    let authorization: String
    let timeout: TimeAmount
    /// Block GETs and PUTs, on plain sockets (see BlockTransfer).
    let transfer: BlockTransfer

    /// "https" with peer TLS, else "http".
    let scheme: String

    public init(secret: String, timeout: TimeAmount = .seconds(30), tls: PeerTLS? = nil) {
        var config = HTTPClient.Configuration()
        config.connectionPool = .init(idleTimeout: .seconds(60), concurrentHTTP1ConnectionsPerHostSoftLimit: 16)
        config.timeout = .init(connect: .seconds(2))
        if let tls { config.tlsConfiguration = tls.clientConfiguration }
        scheme = tls == nil ? "http" : "https"
        http = HTTPClient(eventLoopGroupProvider: .singleton, configuration: config)
        authorization = "Bearer \(secret)"
        self.timeout = timeout
        transfer = BlockTransfer(authorization: authorization, timeout: Double(timeout.nanoseconds) / 1e9, tls: tls)
    }

    public func shutdown() {
        try? http.syncShutdown()
        transfer.shutdown()
    }

    /// AsyncHTTPClient insists on an explicit shutdown; a second one is a no-op.
    deinit { try? http.syncShutdown() }

    /// A request to `node` carrying the cluster secret.
    func request(_ node: NodeInfo, _ method: HTTPMethod, _ path: String, body: ByteBuffer? = nil) throws -> HTTPClient.Request {
        var request: HTTPClient.Request
        do {
            request = try HTTPClient.Request(url: "\(scheme)://\(node.address)\(path)", method: method, body: body.map { .byteBuffer($0) })
        } catch {
            throw PeerError(.unreachable, node: node.id, "peer \(node.id) has an unusable address \(node.address)", cause: error)
        }
        request.headers.add(name: "Authorization", value: authorization)
        return request
    }

    /// Peers whose last request failed in transport, and until when they are not tried again.
    private let unreachable = Mutex<[String: (until: Date, reason: String)]>([:])
    /// How long a peer that could not be reached is skipped: a node that just died costs one
    /// connect timeout, not one per block, on every path (reads, replication, healing), until
    /// its lease expires and it leaves the live list.
    static let backoff = 3.0

    /// Waits for a request's answer; a transport failure names the peer and marks it
    /// unreachable for `backoff` seconds (requests to it fail at once meanwhile).
    func answer<T: Sendable>(_ node: NodeInfo, _ task: () -> EventLoopFuture<T>) throws -> T {
        try reach(node) { try task().wait() }
    }

    /// Whether requests to this node fail at once now (its last one failed in transport within
    /// `backoff` seconds).
    public func backedOff(_ id: String) -> Bool {
        unreachable.withLock { $0[id].map { $0.until > Date() } ?? false }
    }

    /// `evenIfBackedOff`: try a peer in its backoff window too (the last resort of a read whose
    /// every holder failed lately: right after a cut link heals, every peer is still backed off).
    /// A server at its connection cap answers 503 with `Retry-After`: the request waits that long
    /// (at most 2 s, with jitter so a crowd does not come back at once) and is sent again, up to
    /// `busyAttempts` times; then the 503 is the answer (the caller tries another holder).
    static let busyAttempts = 8
    func busyRetried(_ exchange: () throws -> BlockTransfer.Response) throws -> BlockTransfer.Response {
        var r = try exchange()
        for _ in 1..<Self.busyAttempts where r.status == 503 {
            guard let wait = r.retryAfter else { break }   // a 503 that does not say "come back" is an answer
            Thread.sleep(forTimeInterval: min(wait, 2) * Double.random(in: 0.5...1.5))
            r = try exchange()
        }
        return r
    }

    func reach<T>(_ node: NodeInfo, evenIfBackedOff: Bool = false, _ exchange: () throws -> T) throws -> T {
        if !evenIfBackedOff, let u = unreachable.withLock({ $0[node.id] }), u.until > Date() {
            throw PeerError(.unreachable, node: node.id, "peer \(node.id) at \(node.address) unreachable (\(u.reason)); not retried for \(Int(Self.backoff)) s")
        }
        do {
            let r = try exchange()
            unreachable.withLock { _ = $0.removeValue(forKey: node.id) }
            return r
        } catch {
            unreachable.withLock { $0[node.id] = (Date().addingTimeInterval(Self.backoff), "\(error)") }
            throw PeerError(.unreachable, node: node.id, "peer \(node.id) at \(node.address) unreachable: \(error)", cause: error)
        }
    }

    func send(_ node: NodeInfo, _ method: HTTPMethod, _ path: String, body: ByteBuffer? = nil) throws -> HTTPClient.Response {
        let request = try request(node, method, path, body: body)
        return try answer(node) { http.execute(request: request, deadline: .now() + timeout) }
    }

    private func failure(_ node: NodeInfo, _ what: String, _ r: HTTPClient.Response) -> PeerError {
        failure(node, what, r.status, r.body.map { String(buffer: $0) }?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "")
    }

    private func failure(_ node: NodeInfo, _ what: String, _ status: HTTPResponseStatus, _ text: String) -> PeerError {
        if status == .unauthorized {
            return PeerError(.unauthorized, node: node.id, "peer \(node.id) at \(node.address) refused the cluster secret; use the same --secret-file on every node")
        }
        if status == .insufficientStorage { return PeerError(.full, node: node.id, "peer \(node.id): \(text)") }
        return PeerError(.refused(Int(status.code)), node: node.id, "\(what) on peer \(node.id) failed: \(status.code) \(text)")
    }

    /// The block from `node`, verified; nil if the node has no (good) copy. The body is received
    /// straight into block memory and hashed as it arrives, on the calling thread.
    public func get(_ id: BlockID, from node: NodeInfo, evenIfBackedOff: Bool = false) throws -> BlockBuffer? {
        if case .block(let b) = try fetch(id, from: node, evenIfBackedOff: evenIfBackedOff) { return b }
        return nil
    }

    /// What a GET of a block brought.
    public enum Fetched: Sendable {
        case block(BlockBuffer)
        /// The node has no copy (404).
        case missing
        /// The node sent bytes that do not hash to the id: rejected, never cached or returned.
        case corrupt
    }

    /// The block from `node`, verified. `relay`: a fan-out request (`?relay=FILE&via=CHAIN`), which
    /// the node answers from what it has or gets for the loaders of that file version; `via`: the
    /// nodes the request came through, this one last (the node never passes it to one of them).
    public func fetch(_ id: BlockID, from node: NodeInfo, evenIfBackedOff: Bool = false, relay: FileVersion? = nil,
                      via: [String] = []) throws -> Fetched {
        let path = "/v1/blocks/\(id.hex)" + (relay.map { "?relay=\($0.text)&via=\(via.joined(separator: ","))" } ?? "")
        let r = try busyRetried { try reach(node, evenIfBackedOff: evenIfBackedOff) { try transfer.get(path, from: node.address, limit: PeerLimits.maxBlock) } }
        let status = HTTPResponseStatus(statusCode: r.status)
        if status == .notFound { return .missing }
        guard status == .ok, let buffer = r.buffer else { throw failure(node, "GET \(id.hex)", status, r.text) }
        guard r.digest == id else {
            Log.warning("peer \(node.id) sent bytes that do not match block \(id.hex); ignoring that copy")
            return .corrupt
        }
        return .block(buffer)
    }

    /// Stores a block this node still holds in memory on `node` (an eager copy of a block just
    /// written: its pack record was written with O_DIRECT, so sending it from the file would read
    /// it back from disk), sent from that memory; the receiver verifies it. With `durable`, the
    /// node fsyncs it before answering.
    public func put(_ id: BlockID, _ bytes: UnsafeRawBufferPointer, to node: NodeInfo, durable: Bool) throws {
        try put(id, .memory(bytes), to: node, durable: durable)
    }

    /// Stores `store`'s copy of block `id` on `node`, sent straight from the pack file with
    /// sendfile(2) (no read into this process, no hash: the receiver verifies it); with
    /// `durable`, the node fsyncs it before answering. Returns the bytes sent, nil if `store`
    /// has no copy.
    @discardableResult
    public func put(_ id: BlockID, from store: PackBlockStore, to node: NodeInfo, durable: Bool, heal: HealCopy? = nil) throws -> Int? {
        guard let (fd, offset, length) = store.fileRangeForPeer(id) else { return nil }
        defer { close(fd) }
        try put(id, .file(fd: fd, offset: offset, count: length), to: node, durable: durable, heal: heal)
        return length
    }

    /// Stores `block` on `node` (see OutgoingBlock). Returns the bytes sent, nil if the store
    /// the block was to come from has no copy (any more). A healing copy (`heal`) is marked so:
    /// the receiver holds a yielding one back while it serves readers or writers, and does not
    /// count either as foreground work (ForegroundYield).
    @discardableResult
    public func put(_ block: OutgoingBlock, to node: NodeInfo, durable: Bool, heal: HealCopy? = nil) throws -> Int? {
        guard let memory = block.memory else { return try put(block.id, from: block.store, to: node, durable: durable, heal: heal) }
        try memory.withUnsafeBytes { all in
            try put(block.id, .memory(UnsafeRawBufferPointer(rebasing: all[0..<block.length])), to: node, durable: durable, heal: heal)
        }
        return block.length
    }

    /// Returns the answer's text (a chained PUT's: the chain's nodes that stored the block).
    @discardableResult
    private func put(_ id: BlockID, _ body: BlockTransfer.Body, to node: NodeInfo, durable: Bool, heal: HealCopy? = nil,
                     chain: [String] = []) throws -> String {
        let query = [durable ? "durable=1" : nil, heal.map { "heal=\($0.rawValue)" },
                     chain.isEmpty ? nil : "chain=" + chain.joined(separator: ",")].compactMap { $0 }.joined(separator: "&")
        let path = "/v1/blocks/\(id.hex)\(query.isEmpty ? "" : "?" + query)"
        let r = try busyRetried { try reach(node) { try transfer.put(path, to: node.address, body) } }
        let status = HTTPResponseStatus(statusCode: r.status)
        guard status == .ok || status == .created else { throw failure(node, "PUT \(id.hex)", status, r.text) }
        return r.text
    }

    /// Chain replication: PUTs the block to `nodes[0]` only, which stores it and sends it on to
    /// `nodes[1]`, and so on (each hop hashes what it received before storing or forwarding). The
    /// sender's link carries the block once instead of once per copy. Returns the ids of the nodes
    /// that stored it (`nodes[0]` first); one that failed, and every node after it, is missing.
    /// The forwarding end of a chain (`PUT ...&chain=`): the chain's ids resolved among the live
    /// nodes (never an address a request names), up to the first that is not live; the ids of
    /// those that stored the block (none when the next one is not live or does not answer).
    public func forward(_ block: OutgoingBlock, chain: [String], live: [NodeInfo], durable: Bool) -> [String] {
        let next = chain.prefix { id in live.contains { $0.id == id } }.compactMap { id in live.first { $0.id == id } }
        guard !next.isEmpty else { return [] }
        return (try? putChained(block, to: next, durable: durable)) ?? []
    }

    public func putChained(_ block: OutgoingBlock, to nodes: [NodeInfo], durable: Bool) throws -> [String] {
        guard let first = nodes.first else { return [] }
        let rest = nodes.dropFirst().map(\.id)
        let text: String
        if let memory = block.memory {
            text = try memory.withUnsafeBytes { all in
                try put(block.id, .memory(UnsafeRawBufferPointer(rebasing: all[0..<block.length])), to: first, durable: durable, chain: rest)
            }
        } else {
            guard let (fd, offset, length) = block.store.fileRangeForPeer(block.id) else {
                throw StoreError(.missing, "block \(block.id.hex) is missing from this node's store")
            }
            defer { close(fd) }
            text = try put(block.id, .file(fd: fd, offset: offset, count: length), to: first, durable: durable, chain: rest)
        }
        let below = Set(text.split(whereSeparator: { $0 == " " || $0 == "\n" }).map(String.init))
        return [first.id] + rest.filter { below.contains($0) }
    }

    /// Which of `ids` the node holds as replicas.
    ///
    /// Sent on a block connection, not through AsyncHTTPClient: a close() with K > 1 asks this of
    /// its targets, and a kept-alive AsyncHTTPClient connection to a peer cut off silently waited
    /// the whole 30 s request timeout (seen in the lab: a close() that should fail after
    /// `--ack-timeout` 10 s took 41.7 s); a block connection notices a silent peer within
    /// seconds (`BlockTransfer.detectSilentPeer`).
    public func has(_ ids: [BlockID], at node: NodeInfo) throws -> [Bool] {
        if ids.isEmpty { return [] }
        var body = [UInt8]()
        body.reserveCapacity(ids.count * 32)
        for id in ids { body += id.bytes }
        let r = try busyRetried {
            try reach(node) {
                try body.withUnsafeBytes { bytes in
                    try transfer.post("/v1/has", to: node.address, .memory(bytes), limit: ids.count)
                }
            }
        }
        let status = HTTPResponseStatus(statusCode: r.status)
        guard status == .ok, let buffer = r.buffer, buffer.count == ids.count else { throw failure(node, "has", status, r.text) }
        return (0..<ids.count).map { buffer.pointer.load(fromByteOffset: $0, as: UInt8.self) == 1 }
    }

    /// Has the node re-hash its replicas of `ids` (and repair corrupt ones): per id 0 no replica,
    /// 1 good, 2 was corrupt and is repaired, 3 corrupt with no good copy to repair it from.
    public func verify(_ ids: [BlockID], at node: NodeInfo) throws -> [UInt8] { try batch("verify", ids, at: node) }

    private func batch(_ route: String, _ ids: [BlockID], at node: NodeInfo) throws -> [UInt8] {
        var body = ByteBuffer()
        body.reserveCapacity(ids.count * 32)
        for id in ids { body.writeBytes(id.bytes) }
        let r = try send(node, .POST, "/v1/\(route)", body: body)
        guard r.status == .ok, let out = r.body, out.readableBytes == ids.count else { throw failure(node, route, r) }
        return Array(out.readableBytesView)
    }

    /// Has `node` send blocks it holds to other nodes (and sync them).
    public func copy(_ order: CopyOrder, at node: NodeInfo) throws -> CopyResult {
        let r = try send(node, .POST, "/v1/copy", body: ByteBuffer(bytes: try JSONEncoder().encode(order)))
        guard r.status == .ok, let body = r.body, let result = try? JSONDecoder().decode(CopyResult.self, from: Data(body.readableBytesView)) else {
            throw failure(node, "copy", r)
        }
        return result
    }

    /// Makes the node's copies of `ids` durable.
    public func sync(_ ids: [BlockID], at node: NodeInfo) throws {
        var body = ByteBuffer()
        for id in ids { body.writeBytes(id.bytes) }
        let r = try send(node, .POST, "/v1/sync", body: body)
        guard r.status == .ok else { throw failure(node, "sync", r) }
    }

    /// Drops the node's replica of `id`; false if it had none.
    public func delete(_ id: BlockID, at node: NodeInfo) throws -> Bool {
        let r = try send(node, .DELETE, "/v1/blocks/\(id.hex)")
        if r.status == .notFound { return false }
        guard r.status == .ok else { throw failure(node, "DELETE \(id.hex)", r) }
        return true
    }

    /// Whether `node` has `ino` open for writing, and whether it is closing it (its last
    /// handle's FLUSH came, the RELEASE not yet).
    public func writing(_ ino: InodeNumber, at node: NodeInfo) throws -> (open: Bool, closing: Bool) {
        let r = try send(node, .GET, "/v1/writing/\(ino.rawValue)")
        guard r.status == .ok, let body = r.body else { throw failure(node, "writing \(ino)", r) }
        switch String(buffer: body).trimmingCharacters(in: .whitespacesAndNewlines) {
        case "closing": return (true, true)
        case "open": return (true, false)
        case "no": return (false, false)
        case let other: throw PeerError(.refused(200), node: node.id, "peer \(node.id) answered \"\(other.prefix(40))\" to writing \(ino)")
        }
    }

    /// The node's status document.
    public func status(of node: NodeInfo) throws -> Data {
        let r = try send(node, .GET, "/v1/status")
        guard r.status == .ok, let body = r.body else { throw failure(node, "status", r) }
        return Data(body.readableBytesView)
    }
}

enum PeerLimits {
    /// The largest block (4 MiB chunks) plus room: a GET body beyond this is refused.
    static let maxBlock = (4 << 20) + (64 << 10)
}

/// A block of this node's store on its way to other nodes (write-back jobs, healing): read from
/// its pack once, with one O_DIRECT pread into pooled memory, and sent from that memory to each
/// target. Sent from the pack file (sendfile) it came off the disk into page-cache pages fresh to
/// the VM, and the first receiver's socket copy paid a first touch per 4 KiB: on a 3-node
/// loopback cluster the receiver served first spent 2.1-2.9 s more CPU than the other on the
/// blocks of a 2 GiB file left to its job, and close() -> 3 copies took 3.8-4.5 s instead of
/// 1.7-2.3 s. A record that cannot be read directly (unaligned) is sent from the file. A block
/// just written (an eager copy) is sent from the write pipeline's buffer instead.
/// A healing copy's kind, on the wire as `heal=1` or `heal=urgent`: one that yields to the
/// receiver's foreground, or one of a block down to its last live copy, which does not.
public enum HealCopy: String, Sendable {
    case yielding = "1"
    case urgent
}

public struct OutgoingBlock: Sendable {
    public let id: BlockID
    let store: PackBlockStore
    let memory: BlockBuffer?
    /// The block's bytes are memory[0..<length] (a pipeline buffer may be larger).
    public let length: Int

    public init(_ id: BlockID, from store: PackBlockStore) {
        self.id = id
        self.store = store
        memory = store.readDirectForPeer(id)
        length = memory?.count ?? 0
    }

    /// Block `id`, already in memory: `buffer[0..<length]` (`store` holds it too).
    public init(_ id: BlockID, in buffer: BlockBuffer, length: Int, store: PackBlockStore) {
        self.id = id
        self.store = store
        memory = buffer
        self.length = length
    }
}
