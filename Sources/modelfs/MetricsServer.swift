import Foundation
import ModelFSCore

/// `--metrics-listen HOST:PORT`: Prometheus `/metrics` for any mount, a single node too. One
/// thread answers one short request at a time (a scraper's GET); with `--metrics-token-file` a
/// request must carry `Authorization: Bearer TOKEN` (required off loopback). It serves nothing
/// but the metrics.
final class MetricsServer: @unchecked Sendable {
    let listenFD: Int32
    let token: [UInt8]?
    let render: @Sendable () -> String

    init(address: String, token: String?, render: @escaping @Sendable () -> String) throws {
        guard let (host, port) = parseHostPort(address) else { throw FSError.invalid("--metrics-listen \(address): expected HOST:PORT") }
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw FSError.io("cannot make a socket: \(String(cString: strerror(errno)))") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        guard inet_pton(AF_INET, host, &addr.sin_addr) == 1 else {
            close(fd)
            throw FSError.invalid("--metrics-listen \(address): the host must be an IPv4 address")
        }
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0, listen(fd, 16) == 0 else {
            let e = String(cString: strerror(errno))
            close(fd)
            throw FSError.io("--metrics-listen \(address): cannot listen there: \(e)")
        }
        listenFD = fd
        self.token = token.map { Array($0.utf8) }
        self.render = render
    }

    func start() {
        Thread.detachNewThread { [self] in
            while true {
                let c = accept(listenFD, nil, nil)
                if c < 0 {
                    if errno == EINTR || errno == ECONNABORTED { continue }
                    return  // closed by stop()
                }
                serve(c)
                close(c)
            }
        }
    }

    func stop() { shutdown(listenFD, Int32(SHUT_RDWR)); close(listenFD) }

    private func serve(_ c: Int32) {
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var request = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 4096)
        while request.count < 16 << 10 {
            let n = read(c, &buf, buf.count)
            if n <= 0 { return }
            request += buf[0..<n]
            if String(decoding: request, as: UTF8.self).contains("\r\n\r\n") { break }
        }
        let text = String(decoding: request, as: UTF8.self)
        let lines = text.components(separatedBy: "\r\n")
        let words = lines.first?.split(separator: " ") ?? []
        guard words.count >= 2, words[0] == "GET" else { return reply(c, 405, "only GET /metrics\n") }
        let path = words[1].split(separator: "?").first.map(String.init) ?? ""
        guard path == "/metrics" else { return reply(c, 404, "only /metrics\n") }
        if let token {
            let auth = lines.first { $0.lowercased().hasPrefix("authorization:") }
                .map { $0.dropFirst("authorization:".count).trimmingCharacters(in: .whitespaces) } ?? ""
            guard auth.hasPrefix("Bearer "), sameBytes(Array(auth.utf8.dropFirst(7)), token) else {
                return reply(c, 401, "missing or wrong metrics token\n")
            }
        }
        reply(c, 200, render(), type: "text/plain; version=0.0.4")
    }

    private func reply(_ c: Int32, _ status: Int, _ body: String, type: String = "text/plain") {
        let reason = [200: "OK", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed"][status] ?? ""
        let bytes = Array(body.utf8)
        let head = "HTTP/1.1 \(status) \(reason)\r\nContent-Type: \(type)\r\nContent-Length: \(bytes.count)\r\nConnection: close\r\n\r\n"
        for part in [Array(head.utf8), bytes] {
            var off = 0
            while off < part.count {
                let n = part[off...].withUnsafeBytes { send(c, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                if n <= 0 { return }
                off += n
            }
        }
    }
}

/// Compares in time independent of where the first difference is.
func sameBytes(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    var diff = UInt8(a.count == b.count ? 0 : 1)
    for i in 0..<b.count { diff |= b[i] ^ (i < a.count ? a[i] : 0) }
    return diff == 0
}
