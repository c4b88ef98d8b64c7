import Foundation
import Glibc
import ModelFSCore
import ModelFSStore
import Synchronization

/// Block GETs and PUTs over plain blocking sockets, kept alive per peer: the requests that move
/// block bytes (remote reads, eager and write-back copies, healing pushes). A GET's body is
/// received by `recv` straight into block memory and hashed piece by piece on the thread that
/// wants the block; a PUT's body is sent from the block's memory (`send`) or its pack
/// (`sendfile`) by the thread that copies it. Through AsyncHTTPClient each GET body arrived as
/// 64 KiB ByteBuffers on an event loop thread, was copied once more into block memory and hashed
/// there (per GiB read on a node, 0.14 s of user copies and about 0.4 s of event-loop work
/// beside the kernel's receive copy and SHA-256), and each PUT from memory was first copied into
/// a fresh ByteBuffer, whose every page faulted and was cleared.
///
/// HTTP/1.1 as the peer server speaks it: every response has a Content-Length.
final class BlockTransfer: Sendable {
    /// What a request sends after its head.
    enum Body {
        case none
        case memory(UnsafeRawBufferPointer)
        /// `count` bytes of `fd` from `offset`, by sendfile.
        case file(fd: Int32, offset: Int, count: Int)

        var count: Int {
            switch self {
            case .none: 0
            case .memory(let b): b.count
            case .file(_, _, let n): n
            }
        }
    }

    struct Response {
        var status: Int
        /// A 503's `Retry-After`, in seconds.
        var retryAfter: Double? = nil
        /// The whole body when the status is 200 and it fitted `limit`.
        var buffer: BlockBuffer?
        var digest: BlockID?
        /// The start of any other answer's body, for the error message.
        var text: String
    }

    /// The request failed in transport (connect, send, receive, a malformed or cut answer).
    struct TransportError: Error, CustomStringConvertible {
        var description: String
        /// The peer reset the connection.
        var reset = false
    }

    let authorization: String
    let timeout: Double
    let connectTimeout: Double
    /// Idle connections per address, each with when it became idle (seconds of uptime).
    private let idle = Mutex<(byAddress: [String: [(fd: Int32, since: Double)]], swept: Double)>(([:], 0))
    static let maxIdlePerPeer = 16
    /// A connection idle longer than this is closed (a peer that moved to another address, or
    /// left, is not held on to).
    let maxIdleSeconds: Double
    /// A received piece is hashed while it is still in the CPU's cache.
    static let piece = 256 << 10

    /// Mutual TLS on every connection, when set (PeerTLS).
    let tls: PeerTLS?

    init(authorization: String, timeout: Double, connectTimeout: Double = 2, maxIdleSeconds: Double = 60, tls: PeerTLS? = nil) {
        _ = Self.ignoreSIGPIPE
        self.tls = tls
        self.authorization = authorization
        self.timeout = timeout
        self.connectTimeout = connectTimeout
        self.maxIdleSeconds = maxIdleSeconds
    }

    static func now() -> Double { Double(DispatchTime.now().uptimeNanoseconds) / 1e9 }

    deinit { shutdown() }

    /// sendfile(2) has no MSG_NOSIGNAL: a peer that closed its end is an EPIPE, not a signal
    /// that ends the process (libfuse ignores SIGPIPE too, once mounted).
    static let ignoreSIGPIPE: Void = { signal(SIGPIPE, SIG_IGN); return () }()

    func shutdown() {
        let fds = idle.withLock { i -> [Int32] in let all = i.byAddress.values.flatMap { $0.map(\.fd) }; i.byAddress = [:]; return all }
        for fd in fds { SocketIO.close(fd) }
    }

    /// GET `path` from `address` ("host:port"): a 200's body up to `limit` bytes arrives in block
    /// memory with its digest.
    func get(_ path: String, from address: String, limit: Int) throws -> Response {
        try exchange("GET", path, address, .none, blockLimit: limit)
    }

    /// POST `body` to `path` at `address`; a 200's body up to `limit` bytes arrives whole in
    /// `buffer` (a short binary answer, such as `has`'s one byte per id).
    func post(_ path: String, to address: String, _ body: Body, limit: Int) throws -> Response {
        try exchange("POST", path, address, body, blockLimit: limit)
    }

    /// PUT `body` to `path` at `address`; the answer's text is kept (no block is received).
    func put(_ path: String, to address: String, _ body: Body) throws -> Response {
        try exchange("PUT", path, address, body, blockLimit: nil)
    }

    /// A kept-alive connection the peer closed meanwhile fails before any answer arrives: the
    /// request is sent again once on a new connection (a GET or a `has` changes nothing; a PUT
    /// stores a block under its own hash, so storing it twice is storing it once).
    private func exchange(_ method: String, _ path: String, _ address: String, _ body: Body, blockLimit: Int?) throws -> Response {
        acquireSlot(address)
        defer { releaseSlot(address) }
        if let fd = take(address) {
            do { return try exchange(fd, method, path, address, body, blockLimit) } catch is Stale {
                // The peer closed it: it restarted or timed us out, and the others it closed too.
                let rest = idle.withLock { i in i.byAddress.removeValue(forKey: address) ?? [] }
                for c in rest { SocketIO.close(c.fd) }
            }
        }
        do {
            return try exchange(try connect(address), method, path, address, body, blockLimit)
        } catch is Stale {
            throw TransportError(description: "connection to \(address) closed before it answered")
        }
    }

    /// The connection ended before the first byte of the answer.
    private struct Stale: Error {}

    /// Exchanges under way with one peer at most: a node's readers, readahead, replication and
    /// healing together keep at most this many connections to a server, so a server's connection
    /// cap (1,024) serves 64 such nodes at full tilt and many more that read less at once (a
    /// 256-reader load is served; past the cap the server answers 503 and the request waits).
    static let maxPerPeer = 16
    private let slots = PeerSlots(limit: BlockTransfer.maxPerPeer)
    private func acquireSlot(_ address: String) { slots.acquire(address) }
    private func releaseSlot(_ address: String) { slots.release(address) }

    /// Sends the request on `fd` and reads the answer; `fd` goes back to the pool or is closed.
    private func exchange(_ fd: Int32, _ method: String, _ path: String, _ address: String, _ body: Body,
                          _ blockLimit: Int?) throws -> Response {
        var keep = false
        defer { if keep { release(fd, address) } else { SocketIO.close(fd) } }
        let length = method == "GET" ? "" : "Content-Length: \(body.count)\r\n"
        let request = Array("\(method) \(path) HTTP/1.1\r\nHost: \(address)\r\nAuthorization: \(authorization)\r\n\(length)\r\n".utf8)
        try request.withUnsafeBytes { try sendAll(fd, $0, address) }
        switch body {
        case .none: break
        case .memory(let bytes): try sendAll(fd, bytes, address)
        case .file(let file, let offset, let count): try sendFile(fd, file, offset, count, address)
        }
        // The head, and whatever of the body came with it.
        var head = [UInt8](repeating: 0, count: 8192)
        var have = 0
        var end: Int?
        while end == nil {
            guard have < head.count else { throw TransportError(description: "\(address) sent a response head over 8 KiB") }
            let n: Int
            do {
                n = try head.withUnsafeMutableBytes { try receive(fd, $0.baseAddress! + have, $0.count - have, address: address) }
            } catch let e as TransportError where e.reset && have == 0 {
                throw Stale()
            }
            if n == 0 {
                if have == 0 { throw Stale() }
                throw TransportError(description: "\(address) closed the connection inside a response head")
            }
            let from = max(0, have - 3)
            have += n
            end = Self.headEnd(head, from: from, to: have)
        }
        let headEnd = end!
        guard let parsed = Self.parseHead(head[0..<headEnd]) else {
            throw TransportError(description: "\(address) sent a malformed HTTP response")
        }
        let extra = have - headEnd
        var response = Response(status: parsed.status, retryAfter: parsed.retryAfter, buffer: nil, digest: nil, text: "")
        if parsed.status == 200, let limit = blockLimit, parsed.length <= limit {
            let buffer = BlockBuffer(count: parsed.length)
            guard extra <= parsed.length else { throw TransportError(description: "\(address) sent more than its Content-Length") }
            var hasher = BlockID.Hasher()
            head.withUnsafeBytes { h in
                let leading = UnsafeRawBufferPointer(rebasing: h[headEnd..<have])
                if extra > 0 { buffer.pointer.copyMemory(from: leading.baseAddress!, byteCount: extra) }
                hasher.update(leading)
            }
            var filled = extra
            while filled < parsed.length {
                let want = min(Self.piece, parsed.length - filled)
                let n = try receive(fd, buffer.pointer + filled, want, address: address)
                guard n > 0 else { throw TransportError(description: "\(address) closed the connection inside a block") }
                hasher.update(UnsafeRawBufferPointer(start: buffer.pointer + filled, count: n))
                filled += n
            }
            response.buffer = buffer
            response.digest = hasher.finalize()
        } else {
            // An error's text (or a 200 too large to take): kept up to 1 KiB; a long body is not
            // drained, the connection is closed instead.
            guard parsed.length <= 64 << 10 else { return response }
            var body = Array(head[headEnd..<have])
            while body.count < parsed.length {
                var chunk = [UInt8](repeating: 0, count: parsed.length - body.count)
                let n = try chunk.withUnsafeMutableBytes { try receive(fd, $0.baseAddress!, $0.count, address: address) }
                guard n > 0 else { throw TransportError(description: "\(address) closed the connection inside a response") }
                body += chunk[0..<n]
            }
            response.text = String(decoding: body.prefix(1024), as: UTF8.self)
        }
        keep = parsed.keepAlive && extra <= parsed.length
        return response
    }

    /// A peer that closed or reset the connection before it read the request: `Stale`.
    private func sendAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, _ address: String) throws {
        let e = SocketIO.sendAll(fd, bytes)
        if e != 0 { throw sendFailure(e, address) }
    }

    private func sendFile(_ fd: Int32, _ file: Int32, _ offset: Int, _ count: Int, _ address: String) throws {
        let e = SocketIO.sendFile(fd, file, offset, count)
        if e == EIO { throw TransportError(description: "the file to send to \(address) ended early") }
        if e != 0 { throw sendFailure(e, address) }
    }

    private func sendFailure(_ e: Int32, _ address: String) -> any Error {
        // Reset or closed, or timed out while idle (keepalive): a kept-alive connection that died.
        if e == EPIPE || e == ECONNRESET || e == ETIMEDOUT { return Stale() }
        if e == EAGAIN || e == EWOULDBLOCK { return TransportError(description: "\(address) took nothing for \(timeout) s") }
        return TransportError(description: "cannot send to \(address): \(String(cString: strerror(e)))")
    }

    private func receive(_ fd: Int32, _ p: UnsafeMutableRawPointer, _ count: Int, address: String) throws -> Int {
        let n = SocketIO.receive(fd, p, count)
        if n >= 0 { return n }
        if errno == EAGAIN || errno == EWOULDBLOCK {
            throw TransportError(description: "\(address) sent nothing for \(timeout) s")
        }
        if errno == ECONNRESET { throw TransportError(description: "connection to \(address) reset", reset: true) }
        throw TransportError(description: "cannot receive from \(address): \(String(cString: strerror(errno)))")
    }

    /// The connection to `address` idle the shortest time, unless it has been idle longer than
    /// `maxIdleSeconds` (those are closed) or died while idle: an error pending (keepalive or the
    /// user timeout gave up on a cut peer), or the peer closed it or sent something unasked. All
    /// the idle connections to a peer found dead so are closed (a cut link killed them all).
    private func take(_ address: String) -> Int32? {
        let now = Self.now()
        while true {
            let (fd, expired) = idle.withLock { i -> (Int32?, [Int32]) in
                guard let list = i.byAddress[address] else { return (nil, []) }
                var (live, expired) = expire(list, now: now)
                let fd = live.popLast()?.fd
                i.byAddress[address] = live.isEmpty ? nil : live
                return (fd, expired)
            }
            for c in expired { SocketIO.close(c) }
            guard let fd else { return nil }
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            if poll(&p, 1, 0) == 0 { return fd }
            SocketIO.close(fd)
            if p.revents & Int16(POLLERR) != 0 {
                let rest = idle.withLock { i in i.byAddress.removeValue(forKey: address) ?? [] }
                for c in rest { SocketIO.close(c.fd) }
            }
        }
    }

    /// The connections of `list` still within `maxIdleSeconds`, and the descriptors of the others.
    private func expire(_ list: [(fd: Int32, since: Double)], now: Double) -> ([(fd: Int32, since: Double)], [Int32]) {
        (list.filter { now - $0.since <= maxIdleSeconds }, list.filter { now - $0.since > maxIdleSeconds }.map(\.fd))
    }

    private func release(_ fd: Int32, _ address: String) {
        let now = Self.now()
        let (kept, expired) = idle.withLock { i -> (Bool, [Int32]) in
            // Every so often, connections idle too long to any address are closed.
            var expired: [Int32] = []
            if now - i.swept > maxIdleSeconds {
                i.swept = now
                for (a, list) in i.byAddress {
                    let (live, gone) = expire(list, now: now)
                    expired += gone
                    i.byAddress[a] = live.isEmpty ? nil : live
                }
            }
            guard i.byAddress[address, default: []].count < Self.maxIdlePerPeer else { return (false, expired) }
            i.byAddress[address, default: []].append((fd, now))
            return (true, expired)
        }
        for c in expired { SocketIO.close(c) }
        if !kept { SocketIO.close(fd) }
    }

    /// The offset just past "\r\n\r\n" if it ends in [from, to).
    static func headEnd(_ b: [UInt8], from: Int, to: Int) -> Int? {
        var i = from
        while i + 3 < to {
            if b[i] == 13 && b[i + 1] == 10 && b[i + 2] == 13 && b[i + 3] == 10 { return i + 4 }
            i += 1
        }
        return nil
    }

    /// Status, Content-Length (required) and whether the connection stays open.
    static func parseHead(_ bytes: ArraySlice<UInt8>) -> (status: Int, length: Int, keepAlive: Bool, retryAfter: Double?)? {
        let lines = String(decoding: bytes, as: UTF8.self).split(separator: "\r\n", omittingEmptySubsequences: true)
        guard let first = lines.first else { return nil }
        let parts = first.split(separator: " ", maxSplits: 2)
        guard parts.count >= 2, parts[0].hasPrefix("HTTP/1."), let status = Int(parts[1]), (100...599).contains(status) else { return nil }
        var length: Int?
        var retryAfter: Double?
        var keepAlive = parts[0] == "HTTP/1.1"
        for line in lines.dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { return nil }
            let name = line[..<colon].lowercased()
            let value = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
            switch name {
            case "content-length":
                guard let n = Int(value), n >= 0 else { return nil }
                length = n
            case "connection":
                let v = value.lowercased()
                if v == "close" { keepAlive = false } else if v == "keep-alive" { keepAlive = true }
            case "transfer-encoding":
                return nil   // the peer server always sends a Content-Length
            case "retry-after":
                retryAfter = Double(value)
            default:
                break
            }
        }
        guard let length else { return nil }
        return (status, length, keepAlive, retryAfter)
    }

    /// A connected TCP socket to "host:port", within `connectTimeout`.
    private func connect(_ address: String) throws -> Int32 {
        guard let (host, port) = Self.split(address) else {
            throw TransportError(description: "unusable peer address \(address) (want host:port)")
        }
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, port, &hints, &list)
        guard rc == 0, let first = list else {
            throw TransportError(description: "cannot resolve \(host): \(String(cString: gai_strerror(rc)))")
        }
        defer { freeaddrinfo(list) }
        var failure = "no address"
        var ai: UnsafeMutablePointer<addrinfo>? = first
        while let a = ai {
            ai = a.pointee.ai_next
            let fd = socket(a.pointee.ai_family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
            guard fd >= 0 else { failure = String(cString: strerror(errno)); continue }
            if Glibc.connect(fd, a.pointee.ai_addr, a.pointee.ai_addrlen) != 0 && errno != EINPROGRESS {
                failure = String(cString: strerror(errno)); SocketIO.close(fd); continue
            }
            var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
            let ready = poll(&p, 1, Int32(connectTimeout * 1000))
            var err: Int32 = 0
            var len = socklen_t(MemoryLayout<Int32>.size)
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len)
            guard ready == 1, err == 0 else {
                failure = ready == 0 ? "no answer within \(connectTimeout) s" : String(cString: strerror(err != 0 ? err : errno))
                SocketIO.close(fd); continue
            }
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
            var one: Int32 = 1
            setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            var tv = timeval(tv_sec: Int(timeout), tv_usec: Int((timeout - timeout.rounded(.down)) * 1e6))
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            Self.detectSilentPeer(fd)
            if let tls {
                do {
                    try tls.secure(fd, server: false)
                } catch {
                    SocketIO.close(fd)
                    Log.every("peer tls to \(address)", 60, .warning, "cannot reach peer \(address) over TLS: \(error)")
                    throw TransportError(description: "TLS with \(address): \(error)")
                }
            }
            return fd
        }
        throw TransportError(description: "cannot connect to \(address): \(failure)")
    }

    /// A peer that goes silent (a cut link, a partition: packets dropped, no reset) fails the
    /// connection within seconds instead of the 30 s receive timeout: bytes sent and not
    /// acknowledged for 5 s abort it (`TCP_USER_TIMEOUT`; a live peer's kernel acknowledges at
    /// once, however busy the process is), and a connection waiting for an answer is probed after
    /// 2 s of silence, every second (keepalive). Measured in the lab: a read on a node cut off
    /// from one holder waited 30 s on a kept-alive connection to it before this.
    static func detectSilentPeer(_ fd: Int32) {
        var on: Int32 = 1, idle: Int32 = 2, interval: Int32 = 1, count: Int32 = 3, userTimeout: UInt32 = 5000
        let size = socklen_t(MemoryLayout<Int32>.size)
        setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, size)
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_KEEPIDLE, &idle, size)
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_KEEPINTVL, &interval, size)
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_KEEPCNT, &count, size)
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_USER_TIMEOUT, &userTimeout, socklen_t(MemoryLayout<UInt32>.size))
    }

    /// "host:port" or "[v6]:port".
    static func split(_ address: String) -> (String, String)? {
        if address.hasPrefix("["), let close = address.firstIndex(of: "]") {
            let host = String(address[address.index(after: address.startIndex)..<close])
            let rest = address[address.index(after: close)...]
            guard rest.hasPrefix(":"), rest.count > 1 else { return nil }
            return (host, String(rest.dropFirst()))
        }
        guard let colon = address.lastIndex(of: ":"), colon != address.startIndex else { return nil }
        let port = address[address.index(after: colon)...]
        guard !port.isEmpty, port.allSatisfy(\.isNumber) else { return nil }
        return (String(address[..<colon]), String(port))
    }
}

/// At most `limit` holders per key at once; the others wait (`BlockTransfer.maxPerPeer`).
final class PeerSlots: @unchecked Sendable {
    let limit: Int
    private let condition = NSCondition()
    private var held: [String: Int] = [:]   // guarded by `condition`
    init(limit: Int) { self.limit = limit }

    func acquire(_ key: String) {
        condition.lock()
        while held[key, default: 0] >= limit { condition.wait() }
        held[key, default: 0] += 1
        condition.unlock()
    }

    func release(_ key: String) {
        condition.lock()
        held[key, default: 0] -= 1
        if held[key] == 0 { held[key] = nil }
        condition.broadcast()
        condition.unlock()
    }
}
