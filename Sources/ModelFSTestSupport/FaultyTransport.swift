import Foundation
import Synchronization

/// A TCP proxy on loopback that breaks the link on purpose, between a real client and a real
/// server (a peer's or etcd's): the code under test talks to `address` as it would to the
/// server. Faults apply to connections and requests from the moment they are set.
public final class FaultyTransport: Sendable {
    public enum Fault: Sendable, Equatable {
        /// Bytes pass both ways untouched.
        case none
        /// New connections are closed at once (a node that is down).
        case refuse
        /// New connections are accepted and nothing is forwarded (a node that hangs).
        case stall
        /// Each connection's answers are cut after this many bytes (a link that drops).
        case cutAnswers(after: Int)
        /// One byte of each connection's answers, at this offset, is flipped (a corrupting link).
        case corruptAnswers(at: Int)
        /// The next request whose bytes contain `marker` gets "503 Service Unavailable" and the
        /// connection closes; with `forward` the request reaches the server first (it is applied,
        /// its answer is lost: "maybe committed"). Once; then `none`.
        case unavailable(marker: String, forward: Bool)
    }

    public let port: Int
    public var address: String { "127.0.0.1:\(port)" }
    private let target: (host: String, port: Int)
    private let listener: Int32
    private let state = Mutex<(fault: Fault, connections: Set<Int32>, stopped: Bool)>((.none, [], false))
    /// Connections accepted, and requests answered with the fake 503.
    public let accepted = Atomic<Int>(0)
    public let faked = Atomic<Int>(0)

    public init(to targetPort: Int, host: String = "127.0.0.1") throws {
        target = (host, targetPort)
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw TestSupportError("socket: \(String(cString: strerror(errno)))") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var addr = Self.loopback(port: 0)
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
        guard bound == 0, listen(fd, 64) == 0 else {
            close(fd)
            throw TestSupportError("cannot listen on loopback: \(String(cString: strerror(errno)))")
        }
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        port = Int(UInt16(bigEndian: addr.sin_port))
        listener = fd
        Thread { [self] in acceptLoop() }.start()
    }

    public var fault: Fault {
        get { state.withLock { $0.fault } }
        set { state.withLock { $0.fault = newValue } }
    }

    /// Closes the listener and every connection.
    public func stop() {
        let open = state.withLock { s -> Set<Int32> in s.stopped = true; return s.connections }
        shutdown(listener, Int32(SHUT_RDWR))
        close(listener)
        for fd in open { shutdown(fd, Int32(SHUT_RDWR)) }
    }

    private static func loopback(port: Int, host: String = "127.0.0.1") -> sockaddr_in {
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_addr.s_addr = inet_addr(host)
        a.sin_port = UInt16(port).bigEndian
        return a
    }

    private func acceptLoop() {
        while true {
            let client = accept(listener, nil, nil)
            if client < 0 {
                if errno == EINTR { continue }
                return
            }
            accepted.add(1, ordering: .relaxed)
            let (fault, stopped) = state.withLock { ($0.fault, $0.stopped) }
            if stopped || fault == .refuse { close(client); continue }
            if fault == .stall { track(client); continue }   // held open, never read
            let upstream = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var addr = Self.loopback(port: target.port, host: target.host)
            let ok = withUnsafeMutablePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(upstream, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            guard ok == 0 else { close(upstream); close(client); continue }
            track(client); track(upstream)
            let link = Link(client: client, upstream: upstream)
            Thread { [self] in requests(link) }.start()
            Thread { [self] in answers(link) }.start()
        }
    }

    private func track(_ fd: Int32) { state.withLock { _ = $0.connections.insert(fd) } }

    /// One proxied connection's shared state.
    private final class Link: Sendable {
        let client: Int32, upstream: Int32
        /// The answer under way is to be dropped (the client gets the fake 503 instead).
        let swallow = Atomic<Bool>(false)
        let closed = Atomic<Int>(0)
        init(client: Int32, upstream: Int32) { self.client = client; self.upstream = upstream }
    }

    /// The fake answer: etcd's own words for a request whose outcome it does not know.
    private static let unavailable: [UInt8] = {
        let body = #"{"error":"etcdserver: request timed out","code":14,"message":"etcdserver: request timed out"}"#
        return Array("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n\(body)".utf8)
    }()

    private func finish(_ link: Link) {
        shutdown(link.client, Int32(SHUT_RDWR))
        shutdown(link.upstream, Int32(SHUT_RDWR))
        // The second pump to end closes both.
        if link.closed.add(1, ordering: .relaxed).newValue == 2 {
            state.withLock { _ = $0.connections.remove(link.client); _ = $0.connections.remove(link.upstream) }
            close(link.client); close(link.upstream)
        }
    }

    private func requests(_ link: Link) {
        defer { finish(link) }
        var buf = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            let n = read(link.client, &buf, buf.count)
            if n <= 0 { return }
            var chunk = Array(buf[0..<n])
            let take = state.withLock { s -> Bool? in
                guard case .unavailable(let marker, let forward) = s.fault,
                      String(decoding: chunk, as: UTF8.self).contains(marker) else { return nil }
                s.fault = .none
                return forward
            }
            if let forward = take {
                faked.add(1, ordering: .relaxed)
                if forward {
                    link.swallow.store(true, ordering: .relaxed)
                    guard writeAll(link.upstream, &chunk) else { return }
                    // Wait for the server's answer to start (it applied the request), then drop it.
                    var pfd = pollfd(fd: link.upstream, events: Int16(POLLIN), revents: 0)
                    _ = poll(&pfd, 1, 5000)
                }
                var answer = Self.unavailable
                _ = writeAll(link.client, &answer)
                return
            }
            guard writeAll(link.upstream, &chunk) else { return }
        }
    }

    private func answers(_ link: Link) {
        defer { finish(link) }
        var buf = [UInt8](repeating: 0, count: 64 << 10)
        var sent = 0
        while true {
            if link.swallow.load(ordering: .relaxed) { return }
            let n = read(link.upstream, &buf, buf.count)
            if n <= 0 || link.swallow.load(ordering: .relaxed) { return }
            var chunk = Array(buf[0..<n])
            switch fault {
            case .cutAnswers(let after):
                if sent + chunk.count > after {
                    chunk = Array(chunk.prefix(max(0, after - sent)))
                    _ = writeAll(link.client, &chunk)
                    return
                }
            case .corruptAnswers(let at):
                if at >= sent && at < sent + chunk.count { chunk[at - sent] ^= 0x01 }
            default: break
            }
            sent += chunk.count
            guard writeAll(link.client, &chunk) else { return }
        }
    }

    private func writeAll(_ fd: Int32, _ bytes: inout [UInt8]) -> Bool {
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return false }
            done += n
        }
        return true
    }
}
