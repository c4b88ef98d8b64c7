import AsyncHTTPClient
import Foundation
import ModelFSCore
import ModelFSStore
import NIOCore
import NIOHTTP1

/// Talks to other nodes' peer servers (AsyncHTTPClient, kept-alive connections). Calls are
/// synchronous: they come from FUSE worker threads and replication threads, never from an event
/// loop. Every block received is verified against its id before anyone sees it.
public final class PeerClient: Sendable {
    let http: HTTPClient
    let authorization: String
    let timeout: TimeAmount

    public init(secret: String, timeout: TimeAmount = .seconds(30)) {
        var config = HTTPClient.Configuration()
        config.connectionPool = .init(idleTimeout: .seconds(60), concurrentHTTP1ConnectionsPerHostSoftLimit: 16)
        config.timeout = .init(connect: .seconds(2))
        http = HTTPClient(eventLoopGroupProvider: .singleton, configuration: config)
        authorization = "Bearer \(secret)"
        self.timeout = timeout
    }

    public func shutdown() { try? http.syncShutdown() }

    /// AsyncHTTPClient insists on an explicit shutdown; a second one is a no-op.
    deinit { try? http.syncShutdown() }

    func send(_ node: NodeInfo, _ method: HTTPMethod, _ path: String, body: ByteBuffer? = nil) throws -> HTTPClient.Response {
        var request: HTTPClient.Request
        do {
            request = try HTTPClient.Request(url: "http://\(node.address)\(path)", method: method, body: body.map { .byteBuffer($0) })
        } catch {
            throw FSError.io("peer \(node.id) has an unusable address \(node.address)")
        }
        request.headers.add(name: "Authorization", value: authorization)
        do {
            return try http.execute(request: request, deadline: .now() + timeout).wait()
        } catch {
            throw FSError.io("peer \(node.id) at \(node.address) unreachable: \(error)")
        }
    }

    private func failure(_ node: NodeInfo, _ what: String, _ r: HTTPClient.Response) -> FSError {
        let text = r.body.map { String(buffer: $0) }?.trimmingCharacters(in: .whitespacesAndNewlines) ?? ""
        if r.status == .unauthorized {
            return FSError(EACCES, "peer \(node.id) at \(node.address) refused the cluster secret; use the same --secret-file on every node")
        }
        if r.status == .insufficientStorage { return FSError.noSpace("peer \(node.id): \(text)") }
        return FSError.io("\(what) on peer \(node.id) failed: \(r.status.code) \(text)")
    }

    /// The block from `node`, verified; nil if the node has no (good) copy.
    public func get(_ id: BlockID, from node: NodeInfo) throws -> BlockBuffer? {
        let r = try send(node, .GET, "/v1/blocks/\(id.hex)")
        if r.status == .notFound { return nil }
        guard r.status == .ok, let body = r.body else { throw failure(node, "GET \(id.hex)", r) }
        let buffer = BlockBuffer(count: body.readableBytes)
        body.withUnsafeReadableBytes { buffer.pointer.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        guard buffer.withUnsafeBytes({ BlockID.hash($0) }) == id else {
            Log.warning("peer \(node.id) sent bytes that do not match block \(id.hex); ignoring that copy")
            return nil
        }
        return buffer
    }

    /// Stores the block on `node`; with `durable`, the node fsyncs it before answering.
    public func put(_ id: BlockID, _ bytes: UnsafeRawBufferPointer, to node: NodeInfo, durable: Bool) throws {
        let r = try send(node, .PUT, "/v1/blocks/\(id.hex)\(durable ? "?durable=1" : "")", body: ByteBuffer(bytes: bytes))
        guard r.status == .ok || r.status == .created else { throw failure(node, "PUT \(id.hex)", r) }
    }

    /// Which of `ids` the node holds as replicas.
    public func has(_ ids: [BlockID], at node: NodeInfo) throws -> [Bool] {
        var body = ByteBuffer()
        body.reserveCapacity(ids.count * 32)
        for id in ids { body.writeBytes(id.bytes) }
        let r = try send(node, .POST, "/v1/has", body: body)
        guard r.status == .ok, let out = r.body, out.readableBytes == ids.count else { throw failure(node, "has", r) }
        return out.readableBytesView.map { $0 == 1 }
    }

    /// The node's status document.
    public func status(of node: NodeInfo) throws -> Data {
        let r = try send(node, .GET, "/v1/status")
        guard r.status == .ok, let body = r.body else { throw failure(node, "status", r) }
        return Data(body.readableBytesView)
    }
}
