import CModelFSTLS
import Foundation
import Glibc
import ModelFSCore
import ModelFSStore
import NIOCore
import NIOHTTP1
import Synchronization

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
    /// The SHA-256 of `block`, computed piece by piece as it arrived.
    public var digest: BlockID?
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
    /// Or: a block's bytes in memory (block GETs read from the pack with O_DIRECT).
    public var block: BlockBuffer?
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
    public var bodyBytes: Int { file?.count ?? block?.count ?? body?.readableBytes ?? 0 }
    public init(_ status: HTTPResponseStatus, block: BlockBuffer) {
        self.init(status)
        self.block = block
    }
    public static func text(_ status: HTTPResponseStatus, _ s: String) -> PeerResponse {
        PeerResponse(status, body: ByteBuffer(string: s + "\n"), contentType: "text/plain; charset=utf-8")
    }
}

/// The routes behind the server. `handle` may block (disk I/O, requests to other nodes): it runs
/// on the connection's own thread.
public protocol PeerRoutes: Sendable {
    func handle(_ request: PeerRequest) -> PeerResponse
}

/// The node's HTTP/1.1 peer server (DESIGN.md §5) on plain blocking sockets, one thread per
/// connection: the clients keep their connections alive (BlockTransfer holds at most 16 idle ones
/// per peer), so a thread serves request after request. A block PUT's body is received by `recv`
/// straight into block memory and hashed piece by piece as it arrives, while it is still in the
/// CPU's cache; a GET's block is read with O_DIRECT into block memory and sent from there by the
/// same thread (sendfile(2) from the pack for a record that cannot be read directly). Through
/// SwiftNIO each PUT body arrived as ByteBuffers on the one event loop thread, was copied into
/// block memory there and hashed whole afterwards on a pool thread.
///
/// Limits: a request head ≤ 16 KiB (431 beyond), a body ≤ `maxBody` (413, the connection then
/// closes), a Content-Length on every body (411 for chunked ones), at most `threads` block bodies
/// being received or handled at once (the memory they take is bounded), at most
/// `maxConnections` connections (beyond, a new connection is answered 503 with `Retry-After: 1`
/// and closed: a clear "come back" rather than a hang or a reset; clients wait that long and try
/// again or another holder, and keep at most `BlockTransfer.maxPerPeer` connections to one
/// server, so 256 readers of one host are served), and a connection that sends nothing for
/// `idleSeconds` is closed.
public final class PeerServer: Sendable {
    /// The port bound (useful when asked for port 0).
    public let port: Int
    let listener: Int32
    let maxBody: Int
    let bodySlots: DispatchSemaphore
    /// Open connections, and since when (uptime seconds) each one waiting for its next request
    /// with nothing received has waited: those are the ones closed to make room at the cap.
    private let connections = Mutex<(open: Set<Int32>, idle: [Int32: Double], closing: Bool)>(([], [:], false))
    private let running = DispatchGroup()
    let maxConnections: Int
    /// Connections refused with 503 because `maxConnections` were open.
    public var refused: Int { refusedCount.withLock { $0 } }
    private let refusedCount = Mutex(0)
    /// Idle kept-alive connections closed to make room for a new one at the cap.
    public var evicted: Int { evictedCount.withLock { $0 } }
    private let evictedCount = Mutex(0)
    static let maxHead = 16 << 10
    static let idleSeconds = 120
    /// PUT bodies above this go to block memory (`PeerRequest.block`).
    static let blockBodyMin = 64 << 10

    /// Mutual TLS on every connection, when set.
    let tls: PeerTLS?

    /// Binds host:port and serves `routes` at once.
    public convenience init(host: String, port: Int, routes: any PeerRoutes, maxBody: Int, threads: Int = 8, maxConnections: Int = 1024,
                            tls: PeerTLS? = nil) throws {
        try self.init(host: host, port: port, maxBody: maxBody, threads: threads, maxConnections: maxConnections, tls: tls)
        serve(routes)
    }

    /// Binds host:port (so the port is known, and connections wait in the backlog) without
    /// serving yet: a node is composed around its port (it advertises it), and its routes need
    /// parts made after that (`serve`).
    public init(host: String, port: Int, maxBody: Int, threads: Int = 8, maxConnections: Int = 1024, tls: PeerTLS? = nil) throws {
        _ = BlockTransfer.ignoreSIGPIPE
        self.tls = tls
        self.maxConnections = maxConnections
        self.maxBody = maxBody
        bodySlots = DispatchSemaphore(value: threads)
        (listener, self.port) = try Self.listen(host: host, port: port)
    }

    private let serving = Mutex(false)

    /// Starts accepting connections and answering them with `routes` (once; later calls do nothing).
    public func serve(_ routes: any PeerRoutes) {
        guard serving.withLock({ s in defer { s = true }; return !s }) else { return }
        running.enter()
        Thread { [self] in
            acceptLoop(routes)
            running.leave()
        }.start()
    }

    /// A listening socket on host:port, and the port it got.
    static func listen(host: String, port: Int) throws -> (Int32, Int) {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV
        var list: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host.isEmpty ? nil : host, String(port), &hints, &list)
        guard rc == 0, let first = list else {
            throw FSError.invalid("cannot listen on \(host):\(port): \(String(cString: gai_strerror(rc)))")
        }
        defer { freeaddrinfo(list) }
        let fd = socket(first.pointee.ai_family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw FSError.io("cannot open a socket: \(String(cString: strerror(errno)))") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        guard bind(fd, first.pointee.ai_addr, first.pointee.ai_addrlen) == 0, Glibc.listen(fd, 256) == 0 else {
            let e = errno
            close(fd)
            throw FSError(e, String(cString: strerror(e)))
        }
        var addr = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let bound = withUnsafeMutablePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        } == 0 ? withUnsafeBytes(of: addr) { raw -> Int in
            // sin_port and sin6_port sit at the same offset, in network order.
            Int(UInt16(bigEndian: raw.load(fromByteOffset: 2, as: UInt16.self)))
        } : port
        return (fd, bound)
    }

    public func shutdown() {
        let first = connections.withLock { c -> Bool in
            guard !c.closing else { return false }
            c.closing = true
            // Wakes every connection's thread out of recv/send (it closes its own descriptor).
            for fd in c.open { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }
            return true
        }
        guard first else { return }
        _ = Glibc.shutdown(listener, Int32(SHUT_RDWR))   // wakes accept
        // Routes still running (a copy order, a sync) get a while to finish.
        _ = running.wait(timeout: .now() + 10)
        close(listener)
    }

    static func uptime() -> Double {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return Double(t.tv_sec) + Double(t.tv_nsec) / 1e9
    }

    private func acceptLoop(_ routes: any PeerRoutes) {
        while true {
            let fd = accept(listener, nil, nil)
            if fd >= 0 { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
            if fd < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                if connections.withLock({ $0.closing }) { return }
                // Out of descriptors or memory: the backlog waits a moment.
                Log.error("peer server: accept failed: \(String(cString: strerror(errno)))")
                usleep(50_000)
                continue
            }
            let admitted = connections.withLock { c -> Bool in
                guard !c.closing else { return false }
                if c.open.count >= maxConnections {
                    // At the cap: a kept-alive connection idle the longest makes room (its client
                    // opens a new one when it next needs it); with none idle, 503.
                    guard let (oldest, _) = c.idle.min(by: { $0.value < $1.value }) else { return false }
                    c.idle[oldest] = nil
                    _ = Glibc.shutdown(oldest, Int32(SHUT_RDWR))   // under the lock: the fd is still that connection
                    evictedCount.withLock { $0 += 1 }
                }
                c.open.insert(fd)
                return true
            }
            guard admitted else {
                refusedCount.withLock { $0 += 1 }
                let busy = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 0\r\n"
                    + "Retry-After: 1\r\nConnection: close\r\n\r\n"
                // Answered and closed after the client's request is drained (off this thread: the
                // accept loop must not wait; with TLS, the handshake comes first), so the answer
                // is not overtaken by a reset.
                DispatchQueue.global().async { [tls] in
                    if let tls {
                        var tv = timeval(tv_sec: 5, tv_usec: 0)
                        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
                        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
                        guard (try? tls.secure(fd, server: true)) != nil else { SocketIO.close(fd); return }
                    }
                    _ = Self.send(fd, Array(busy.utf8))
                    Self.lingeringClose(fd)
                    SocketIO.close(fd)
                }
                continue
            }
            running.enter()
            Thread { [self] in
                serve(fd, routes)
                Self.lingeringClose(fd)
                connections.withLock { c in
                    c.open.remove(fd)
                    c.idle[fd] = nil
                    SocketIO.close(fd)
                }
                running.leave()
            }.start()
        }
    }

    /// Serves requests on one connection until it closes, fails, idles out or asks to close.
    private func serve(_ fd: Int32, _ routes: any PeerRoutes) {
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        var tv = timeval(tv_sec: Self.idleSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        BlockTransfer.detectSilentPeer(fd)   // a client cut off mid-answer frees its thread within seconds
        if let tls {
            do {
                try tls.secure(fd, server: true)
            } catch {
                Log.every("peer tls refused \(error)", 60, .warning, "peer server: refused a connection from \(Self.peerAddress(fd)): \(error)")
                return
            }
        }
        // Bytes received and not yet used: a head, the start of a body, a pipelined request.
        var buf = [UInt8](repeating: 0, count: Self.maxHead)
        var have = 0
        // Idle (evictable at the cap) only between requests of a kept-alive connection: a new
        // one waiting for its first request is about to send it, and closing it then would fail
        // a client that has no earlier answer to show it was alive.
        var served = false
        while true {
            var end = BlockTransfer.headEnd(buf, from: 0, to: have)
            while end == nil {
                guard have < buf.count else {
                    _ = Self.respond(fd, .text(.init(statusCode: 431), "request head over \(Self.maxHead) bytes"), head: false, keepAlive: false)
                    return
                }
                let idle = have == 0 && served
                if idle { connections.withLock { $0.idle[fd] = Self.uptime() } }
                let n = buf.withUnsafeMutableBytes { SocketIO.receive(fd, $0.baseAddress! + have, $0.count - have) }
                if idle { connections.withLock { _ = $0.idle.removeValue(forKey: fd) } }
                guard n > 0 else { return }   // closed, idle too long, or reset: nothing to answer
                let from = max(0, have - 3)
                have += n
                end = BlockTransfer.headEnd(buf, from: from, to: have)
            }
            let headEnd = end!
            guard let h = Self.parseRequestHead(buf[0..<headEnd]) else {
                _ = Self.respond(fd, .text(.badRequest, "malformed HTTP request"), head: false, keepAlive: false)
                return
            }
            if h.chunked {
                _ = Self.respond(fd, .text(.lengthRequired, "send the body with a Content-Length"), head: false, keepAlive: false)
                return
            }
            let length = h.length
            let leading = min(have - headEnd, length)
            if length > maxBody {
                // Read and dropped (a client that is still sending would otherwise see a reset, not
                // the answer), up to 64 MiB; then the connection closes.
                if length <= 64 << 20 {
                    if h.expectContinue { _ = Self.send(fd, Array("HTTP/1.1 100 Continue\r\n\r\n".utf8)) }
                    _ = discard(fd, length - leading)
                }
                _ = Self.respond(fd, .text(.payloadTooLarge, "request body over \(maxBody) bytes"), head: false, keepAlive: false)
                return
            }
            if h.expectContinue && leading < length { _ = Self.send(fd, Array("HTTP/1.1 100 Continue\r\n\r\n".utf8)) }
            var request = PeerRequest(method: HTTPMethod(rawValue: h.method), uri: h.uri, headers: h.headers)
            let slot = request.method == .PUT && length > Self.blockBodyMin
            if slot {
                bodySlots.wait()
                let block = BlockBuffer(count: length)
                var hasher = BlockID.Hasher()
                buf.withUnsafeBytes { b in
                    let lead = UnsafeRawBufferPointer(rebasing: b[headEnd..<(headEnd + leading)])
                    if leading > 0 { block.pointer.copyMemory(from: lead.baseAddress!, byteCount: leading) }
                    hasher.update(lead)
                }
                guard receive(fd, into: block.pointer, from: leading, count: length, hashing: &hasher) else {
                    bodySlots.signal()
                    return
                }
                request.block = block
                request.digest = hasher.finalize()
            } else if length > 0 {
                var body = ByteBuffer()
                body.reserveCapacity(length)
                body.writeBytes(buf[headEnd..<(headEnd + leading)])
                // The rest straight into the buffer's own memory.
                while body.readableBytes < length {
                    let want = length - body.readableBytes
                    var n = 0
                    body.writeWithUnsafeMutableBytes(minimumWritableBytes: want) { p in
                        n = SocketIO.receive(fd, p.baseAddress!, want, flags: Int32(MSG_WAITALL))
                        return max(n, 0)
                    }
                    guard n > 0 else { return }
                }
                request.body = body
            }
            // What came after this request's body stays for the next one.
            let used = headEnd + leading
            if used < have { buf.withUnsafeMutableBytes { b in b.baseAddress!.copyMemory(from: b.baseAddress! + used, byteCount: have - used) } }
            have -= used
            let response = routes.handle(request)
            if slot { bodySlots.signal() }
            guard Self.respond(fd, response, head: request.method == .HEAD, keepAlive: h.keepAlive), h.keepAlive else { return }
            served = true
        }
    }

    /// "host:port" of the other end of a connection, for the log.
    static func peerAddress(_ fd: Int32) -> String {
        var addr = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let ok = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &len) } } == 0
        guard ok else { return "?" }
        var host = [CChar](repeating: 0, count: Int(NI_MAXHOST)), port = [CChar](repeating: 0, count: Int(NI_MAXSERV))
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                getnameinfo($0, len, &host, socklen_t(host.count), &port, socklen_t(port.count), NI_NUMERICHOST | NI_NUMERICSERV)
            }
        }
        return rc == 0 ? "\(cText(host)):\(cText(port))" : "?"
    }

    /// Before the descriptor is closed: the sending side is shut and whatever the client still
    /// sends is read and dropped for up to a second (1 MiB at most). Closing a socket with unread
    /// bytes resets the connection, and the reset can overtake the error answer just sent.
    static func lingeringClose(_ fd: Int32) {
        _ = Glibc.shutdown(fd, Int32(SHUT_WR))
        var tv = timeval(tv_sec: 1, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var sink = [UInt8](repeating: 0, count: 64 << 10)
        for _ in 0..<16 {
            guard sink.withUnsafeMutableBytes({ SocketIO.receive(fd, $0.baseAddress!, $0.count) }) > 0 else { return }
        }
    }

    /// Receives bytes [from, count) of a body into `p`, hashing each piece as it lands.
    private func receive(_ fd: Int32, into p: UnsafeMutableRawPointer, from: Int, count: Int, hashing hasher: inout BlockID.Hasher) -> Bool {
        var filled = from
        while filled < count {
            // A whole piece per call: fewer wake-ups than taking each segment as it lands.
            let n = SocketIO.receive(fd, p + filled, min(BlockTransfer.piece, count - filled), flags: Int32(MSG_WAITALL))
            guard n > 0 else { return false }
            hasher.update(UnsafeRawBufferPointer(start: p + filled, count: n))
            filled += n
        }
        return true
    }

    private func discard(_ fd: Int32, _ count: Int) -> Bool {
        var rest = count
        var sink = [UInt8](repeating: 0, count: 64 << 10)
        while rest > 0 {
            let n = sink.withUnsafeMutableBytes { SocketIO.receive(fd, $0.baseAddress!, min($0.count, rest)) }
            guard n > 0 else { return false }
            rest -= n
        }
        return true
    }

    static func head(_ status: HTTPResponseStatus, contentType: String, length: Int, keepAlive: Bool) -> [UInt8] {
        Array(("HTTP/1.1 \(status.code) \(status.reasonPhrase)\r\nContent-Type: \(contentType)\r\n"
               + "Content-Length: \(length)\r\n" + (keepAlive ? "" : "Connection: close\r\n") + "\r\n").utf8)
    }

    /// Sends the response (a HEAD's without its body); a file body's descriptor is closed here.
    /// False when the connection failed.
    static func respond(_ fd: Int32, _ r: PeerResponse, head isHead: Bool, keepAlive: Bool) -> Bool {
        var bytes = head(r.status, contentType: r.contentType, length: r.contentLength ?? r.bodyBytes, keepAlive: keepAlive)
        if let f = r.file {
            defer { close(f.fd) }
            guard send(fd, bytes) else { return false }
            return isHead || SocketIO.sendFile(fd, f.fd, f.offset, f.count) == 0
        }
        if let b = r.block {
            guard send(fd, bytes) else { return false }
            return isHead || b.withUnsafeBytes { SocketIO.sendAll(fd, $0) == 0 }
        }
        if let b = r.body, !isHead, b.readableBytes > 0 {
            // A small body goes out with its head in one segment.
            if b.readableBytes <= 64 << 10 {
                bytes += b.readableBytesView
                return send(fd, bytes)
            }
            guard send(fd, bytes) else { return false }
            return b.withUnsafeReadableBytes { SocketIO.sendAll(fd, $0) == 0 }
        }
        return send(fd, bytes)
    }

    static func send(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        bytes.withUnsafeBytes { SocketIO.sendAll(fd, $0) == 0 }
    }

    struct RequestHead {
        var method: String
        var uri: String
        var headers = HTTPHeaders()
        var length = 0
        var chunked = false
        var keepAlive: Bool
        var expectContinue = false
    }

    /// RFC 9110's tchar: the bytes of a header field name.
    static func isTokenByte(_ b: UInt8) -> Bool {
        (0x30...0x39).contains(b) || (0x41...0x5A).contains(b) || (0x61...0x7A).contains(b) || "!#$%&'*+-.^_`|~".utf8.contains(b)
    }

    /// The request line and headers (HTTP/1.0 or 1.1), or nil if malformed.
    static func parseRequestHead(_ bytes: ArraySlice<UInt8>) -> RequestHead? {
        let lines = String(decoding: bytes, as: UTF8.self).split(separator: "\r\n", omittingEmptySubsequences: true)
        guard let first = lines.first else { return nil }
        let parts = first.split(separator: " ", omittingEmptySubsequences: true)
        guard parts.count == 3, parts[2] == "HTTP/1.1" || parts[2] == "HTTP/1.0", parts[1].hasPrefix("/"),
              parts[0].allSatisfy({ $0.isUppercase || $0 == "-" }) else { return nil }
        var h = RequestHead(method: String(parts[0]), uri: String(parts[1]), keepAlive: parts[2] == "HTTP/1.1")
        var length: Int?
        for line in lines.dropFirst() {
            guard let colon = line.firstIndex(of: ":"), colon != line.startIndex else { return nil }
            let name = String(line[..<colon])
            // A field name is an HTTP token (RFC 9110 tchar): anything else is a bad request, and
            // must never reach HTTPHeaders, which traps on a name that is not ASCII (found by
            // PeerFuzzTests: one such header from anyone who could connect stopped the node).
            guard name.utf8.allSatisfy(Self.isTokenByte) else { return nil }
            let value = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
            h.headers.add(name: name, value: value)
            switch name.lowercased() {
            case "content-length":
                guard let n = Int(value), n >= 0, length == nil || length == n else { return nil }
                length = n
            case "transfer-encoding":
                if value.lowercased() != "identity" { h.chunked = true }
            case "connection":
                let v = value.lowercased()
                if v.contains("close") { h.keepAlive = false } else if v.contains("keep-alive") { h.keepAlive = true }
            case "expect":
                h.expectContinue = value.lowercased() == "100-continue"
            default:
                break
            }
        }
        h.length = length ?? 0
        return h
    }
}

/// Blocking socket I/O shared by the peer server and BlockTransfer. The sends return 0, or the
/// errno that stopped them (0 from sendfile's file ending early is reported as EIO).
enum SocketIO {
    /// The TLS sessions of connections, by descriptor (PeerTLS.secure); looked up only once a
    /// PeerTLS exists.
    static let sessions = Mutex<[Int32: UInt]>([:])   // the session pointers' bit patterns
    static let tlsOn = Atomic<Bool>(false)

    static func session(_ fd: Int32) -> UnsafeMutableRawPointer? {
        guard tlsOn.load(ordering: .acquiring) else { return nil }
        return sessions.withLock { $0[fd] }.flatMap { UnsafeMutableRawPointer(bitPattern: $0) }
    }

    /// Closes a connection, and frees its TLS session first.
    static func close(_ fd: Int32) {
        if tlsOn.load(ordering: .acquiring), let s = sessions.withLock({ $0.removeValue(forKey: fd) }) {
            modelfs_tls_free(UnsafeMutableRawPointer(bitPattern: s))
        }
        _ = Glibc.close(fd)
    }

    /// recv(2), retried when a signal interrupts it: the bytes received, 0 at the end of the
    /// stream, -1 with errno set. Through the connection's TLS session if it has one
    /// (MSG_WAITALL: until `count` or the end).
    static func receive(_ fd: Int32, _ p: UnsafeMutableRawPointer, _ count: Int, flags: Int32 = 0) -> Int {
        if let s = session(fd) {
            var got = 0
            repeat {
                let n = modelfs_tls_read(s, p + got, count - got)
                if n < 0 && errno == EINTR { continue }
                if n < 0 { return got > 0 ? got : -1 }
                if n == 0 { return got }
                got += n
            } while flags & Int32(MSG_WAITALL) != 0 && got < count
            return got
        }
        while true {
            let n = recv(fd, p, count, flags)
            if n >= 0 || errno != EINTR { return n }
        }
    }

    static func sendAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Int32 {
        if let s = session(fd) {
            var sent = 0
            while sent < bytes.count {
                let n = modelfs_tls_write(s, bytes.baseAddress! + sent, bytes.count - sent)
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { return n == 0 ? EPIPE : errno }
                sent += n
            }
            return 0
        }
        var sent = 0
        while sent < bytes.count {
            let n = Glibc.send(fd, bytes.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL))
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return n == 0 ? EPIPE : errno }
            sent += n
        }
        return 0
    }

    static func sendFile(_ fd: Int32, _ file: Int32, _ offset: Int, _ count: Int) -> Int32 {
        if session(fd) != nil {
            // TLS: read and encrypt (sendfile would send the file's bytes in the clear).
            let chunk = 256 << 10
            let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: min(chunk, max(count, 1)), alignment: 4096)
            defer { buf.deallocate() }
            var done = 0
            while done < count {
                let n = pread(file, buf.baseAddress!, min(buf.count, count - done), off_t(offset + done))
                if n < 0 && errno == EINTR { continue }
                if n == 0 { return EIO }
                guard n > 0 else { return errno }
                let e = sendAll(fd, UnsafeRawBufferPointer(rebasing: buf[0..<n]))
                if e != 0 { return e }
                done += n
            }
            return 0
        }
        var at = off_t(offset)
        let end = off_t(offset + count)
        while at < end {
            let n = sendfile(fd, file, &at, Int(end - at))
            if n < 0 && errno == EINTR { continue }
            if n == 0 { return EIO }
            guard n > 0 else { return errno }
        }
        return 0
    }
}
