import Foundation
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

public struct PeerResponse: Sendable {
    public var status: HTTPResponseStatus
    public var body: ByteBuffer?
    public var contentType: String
    /// For HEAD: the length the GET would have.
    public var contentLength: Int?
    public init(_ status: HTTPResponseStatus, body: ByteBuffer? = nil, contentType: String = "application/octet-stream",
                contentLength: Int? = nil) {
        self.status = status; self.body = body; self.contentType = contentType; self.contentLength = contentLength
    }
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
    private var overflow = false

    init(routes: any PeerRoutes, pool: NIOThreadPool, maxBody: Int) {
        self.routes = routes; self.pool = pool; self.maxBody = maxBody
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h):
            head = h
            overflow = false
            body = ByteBuffer()
            if let n = h.headers.first(name: "content-length").flatMap(Int.init) {
                if n > maxBody { overflow = true } else { body.reserveCapacity(n) }
            }
        case .body(var part):
            if overflow { return }
            if body.readableBytes + part.readableBytes > maxBody { overflow = true; body = ByteBuffer(); return }
            body.writeBuffer(&part)
        case .end:
            guard let head else { return }
            self.head = nil
            if overflow {
                respond(context, head, .text(.payloadTooLarge, "request body over \(maxBody) bytes"), keepAlive: false)
                return
            }
            let request = PeerRequest(method: head.method, uri: head.uri, headers: head.headers, body: body)
            body = ByteBuffer()
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
        headers.add(name: "Content-Length", value: String(r.contentLength ?? r.body?.readableBytes ?? 0))
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: r.status, headers: headers))), promise: nil)
        if let b = r.body, head.method != .HEAD { context.write(wrapOutboundOut(.body(.byteBuffer(b))), promise: nil) }
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in
            if !keepAlive { channel.close(promise: nil) }
        }
    }
}
