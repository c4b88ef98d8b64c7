import Foundation
import ModelFSStore
import NIOCore
import NIOHTTP1
import NIOPosix

/// A request as the peer routes see it: the whole body (bounded) already read.
public struct PeerRequest: Sendable {
    public var method: HTTPMethod
    public var path: String
    public var query: [String: String]
    public var headers: HTTPHeaders
    public var body: ByteBuffer
    /// A large PUT body (a block) arrives here instead of `body`: in pooled block memory, which
    /// is already mapped, where a fresh megabyte ByteBuffer cost a page fault and a page clear
    /// per 4 KiB (a fifth of a receiving node's CPU while it took replicas).
    public var block: BlockBuffer?
    /// Bytes of body the request carried.
    public var bodyBytes: Int { block?.count ?? body.readableBytes }
    public init(method: HTTPMethod, uri: String, headers: HTTPHeaders = HTTPHeaders(), body: ByteBuffer = ByteBuffer()) {
        self.method = method
        let parts = uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
        path = String(parts.first ?? "")
        var q: [String: String] = [:]
        if parts.count > 1 {
            for pair in parts[1].split(separator: "&") {
                let kv = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
                q[String(kv[0])] = kv.count > 1 ? String(kv[1]) : ""
            }
        }
        query = q
        self.headers = headers
        self.body = body
    }
}

/// A response body sent from a file with sendfile(2): `count` bytes of `fd` from `offset`. The
/// response owns the descriptor; the server closes it once the bytes are sent (or not).
public struct PeerFileBody: Sendable {
    public let fd: CInt
    public let offset: Int
    public let count: Int
    public init(fd: CInt, offset: Int, count: Int) { self.fd = fd; self.offset = offset; self.count = count }
}

public struct PeerResponse: Sendable {
    public var status: HTTPResponseStatus
    public var body: ByteBuffer?
    /// Instead of `body`: bytes sent straight from a file (block GETs, from the pack).
    public var file: PeerFileBody?
    public var contentType: String
    /// For HEAD: the length the GET would have.
    public var contentLength: Int?
    public init(_ status: HTTPResponseStatus, body: ByteBuffer? = nil, contentType: String = "application/octet-stream",
                contentLength: Int? = nil) {
        self.status = status; self.body = body; self.contentType = contentType; self.contentLength = contentLength
    }
    public init(_ status: HTTPResponseStatus, file: PeerFileBody) {
        self.init(status)
        self.file = file
    }
    /// Bytes of body this response carries.
    public var bodyBytes: Int { file?.count ?? body?.readableBytes ?? 0 }
    public static func text(_ status: HTTPResponseStatus, _ s: String) -> PeerResponse {
        PeerResponse(status, body: ByteBuffer(string: s + "\n"), contentType: "text/plain; charset=utf-8")
    }
}

/// The routes behind the server. `handle` may block (disk I/O): it runs on the server's thread
/// pool, never on an event loop.
public protocol PeerRoutes: Sendable {
    func handle(_ request: PeerRequest) -> PeerResponse
}

/// The node's HTTP/1.1 peer server on SwiftNIO (DESIGN.md §5): one event loop thread accepts
/// and parses; request bodies are collected up to `maxBody` (413 beyond, the connection then
/// closes) and handed with the request to a pool of threads that run the routes.
public final class PeerServer: Sendable {
    let group: MultiThreadedEventLoopGroup
    let pool: NIOThreadPool
    let channel: any Channel
    /// The port bound (useful when asked for port 0).
    public let port: Int

    public init(host: String, port: Int, routes: any PeerRoutes, maxBody: Int, threads: Int = 8) throws {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        pool = NIOThreadPool(numberOfThreads: threads)
        pool.start()
        let pool = self.pool
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                do {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(PeerHTTPHandler(routes: routes, pool: pool, maxBody: maxBody))
                    return channel.eventLoop.makeSucceededVoidFuture()
                } catch {
                    return channel.eventLoop.makeFailedFuture(error)
                }
            }
        do {
            channel = try bootstrap.bind(host: host, port: port).wait()
        } catch {
            try? group.syncShutdownGracefully()
            try? pool.syncShutdownGracefully()
            throw error
        }
        self.port = channel.localAddress?.port ?? port
    }

    public func shutdown() {
        try? channel.close().wait()
        try? group.syncShutdownGracefully()
        try? pool.syncShutdownGracefully()
    }
}

final class PeerHTTPHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let routes: any PeerRoutes
    let pool: NIOThreadPool
    let maxBody: Int
    private var head: HTTPRequestHead?
    private var body = ByteBuffer()
    private var block: BlockBuffer?
    private var filled = 0
    private var overflow = false
    /// PUT bodies above this go to block memory (`PeerRequest.block`).
    static let blockBodyMin = 64 << 10

    init(routes: any PeerRoutes, pool: NIOThreadPool, maxBody: Int) {
        self.routes = routes; self.pool = pool; self.maxBody = maxBody
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h):
            head = h
            overflow = false
            body = ByteBuffer()
            block = nil
            filled = 0
            if let n = h.headers.first(name: "content-length").flatMap(Int.init) {
                if n > maxBody {
                    overflow = true
                } else if h.method == .PUT && n > Self.blockBodyMin {
                    block = BlockBuffer(count: n)
                } else {
                    body.reserveCapacity(n)
                }
            }
        case .body(var part):
            if overflow { return }
            if let block {
                // Content-Length promised block.count bytes; more is a malformed request.
                guard filled + part.readableBytes <= block.count else { overflow = true; self.block = nil; return }
                part.withUnsafeReadableBytes { b in
                    if let base = b.baseAddress { (block.pointer + filled).copyMemory(from: base, byteCount: b.count) }
                }
                filled += part.readableBytes
                return
            }
            if body.readableBytes + part.readableBytes > maxBody { overflow = true; body = ByteBuffer(); return }
            body.writeBuffer(&part)
        case .end:
            guard let head else { return }
            self.head = nil
            if overflow {
                respond(context, head, .text(.payloadTooLarge, "request body over \(maxBody) bytes"), keepAlive: false)
                return
            }
            var request = PeerRequest(method: head.method, uri: head.uri, headers: head.headers, body: body)
            if let block {
                guard filled == block.count else {
                    self.block = nil
                    respond(context, head, .text(.badRequest, "request body shorter than its Content-Length"), keepAlive: false)
                    return
                }
                request.block = block
            }
            body = ByteBuffer()
            block = nil
            let routes = self.routes
            let loop = context.eventLoop
            let bound = NIOLoopBound((self, context), eventLoop: loop)
            pool.runIfActive(eventLoop: loop) { routes.handle(request) }.whenComplete { result in
                let (handler, context) = bound.value
                let response = (try? result.get()) ?? .text(.serviceUnavailable, "node is shutting down")
                handler.respond(context, head, response, keepAlive: head.isKeepAlive)
            }
        }
    }

    func respond(_ context: ChannelHandlerContext, _ head: HTTPRequestHead, _ r: PeerResponse, keepAlive: Bool) {
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: r.contentType)
        headers.add(name: "Content-Length", value: String(r.contentLength ?? r.bodyBytes))
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: r.status, headers: headers))), promise: nil)
        if let f = r.file {
            // sendfile(2) from the pack: the bytes never pass through this process.
            let handle = NIOFileHandle(_deprecatedTakingOwnershipOfDescriptor: f.fd)
            if head.method == .HEAD {
                try? handle.close()
            } else {
                let region = FileRegion(fileHandle: handle, readerIndex: f.offset, endIndex: f.offset + f.count)
                context.write(wrapOutboundOut(.body(.fileRegion(region)))).whenComplete { _ in try? handle.close() }
            }
        } else if let b = r.body, head.method != .HEAD {
            context.write(wrapOutboundOut(.body(.byteBuffer(b))), promise: nil)
        }
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in
            if !keepAlive { channel.close(promise: nil) }
        }
    }
}
