import Foundation
import ModelFSTestSupport
import NIOHTTP1
import Synchronization
import Testing
@testable import ModelFSCore
@testable import ModelFSPeer
@testable import ModelFSWire
@testable import ModelFSStore

/// The peer protocol under seeded garbage: requests made from valid ones by mutation (bytes
/// flipped, inserted, cut; lengths that lie; headers repeated; paths of every shape), sent to a
/// real peer server on loopback. Nothing may crash it, hang it, or grow its memory without bound,
/// and it must still answer a valid request afterwards. A failure names its seed; MODELFS_FUZZ_SEED
/// and MODELFS_FUZZ_CASES replay or lengthen a run.
@Suite struct PeerFuzzTests {
    static let secret = "fuzz-secret"

    static let corpus: [String] = [
        "GET /v1/status HTTP/1.1\r\nAuthorization: Bearer fuzz-secret\r\n\r\n",
        "GET /metrics HTTP/1.1\r\nAuthorization: Bearer fuzz-secret\r\n\r\n",
        "GET /v1/blocks/\(String(repeating: "ab", count: 32)) HTTP/1.1\r\nAuthorization: Bearer fuzz-secret\r\n\r\n",
        "HEAD /v1/blocks/\(String(repeating: "0f", count: 32)) HTTP/1.1\r\nAuthorization: Bearer fuzz-secret\r\n\r\n",
        "PUT /v1/blocks/\(String(repeating: "cd", count: 32))?durable=1 HTTP/1.1\r\nAuthorization: Bearer fuzz-secret\r\nContent-Length: 16\r\n\r\n0123456789abcdef",
        "POST /v1/has HTTP/1.1\r\nAuthorization: Bearer fuzz-secret\r\nContent-Length: 32\r\n\r\n" + String(repeating: "x", count: 32),
        "POST /v1/verify HTTP/1.1\r\nAuthorization: Bearer fuzz-secret\r\nContent-Length: 64\r\n\r\n" + String(repeating: "y", count: 64),
        "POST /v1/copy HTTP/1.1\r\nAuthorization: Bearer fuzz-secret\r\nContent-Length: 17\r\n\r\n{\"blocks\":[1,2]}\n",
        "DELETE /v1/blocks/\(String(repeating: "ee", count: 32)) HTTP/1.1\r\nAuthorization: Bearer fuzz-secret\r\n\r\n",
        "GET /v1/writing/123 HTTP/1.1\r\nAuthorization: Bearer fuzz-secret\r\nConnection: close\r\n\r\n",
        "POST /v1/sync HTTP/1.1\r\nAuthorization: Bearer fuzz-secret\r\nExpect: 100-continue\r\nContent-Length: 32\r\n\r\n" + String(repeating: "z", count: 32),
    ]

    static let tokens: [String] = [
        "\r\n", "\r\n\r\n", ":", " ", "\0", "%00", "../", "?", "&", "=", "Content-Length: 99999999999\r\n",
        "Content-Length: -1\r\n", "Content-Length: 5\r\nContent-Length: 6\r\n", "Transfer-Encoding: chunked\r\n",
        "Expect: 100-continue\r\n", "Connection: keep-alive\r\n", "HTTP/1.0", "HTTP/2", String(repeating: "A", count: 20_000),
        "\u{FF}\u{FE}", "/v1/blocks/", "Authorization: Bearer wrong\r\n",
    ]

    /// One mutated request.
    static func mutate(_ g: inout SplitMix) -> [UInt8] {
        var b = Array(corpus[Int(g.next() % UInt64(corpus.count))].utf8)
        for _ in 0..<(1 + Int(g.next() % 4)) {
            let at = b.isEmpty ? 0 : Int(g.next() % UInt64(b.count))
            switch g.next() % 6 {
            case 0: if !b.isEmpty { b[at] ^= UInt8(truncatingIfNeeded: g.next() | 1) }
            case 1: b.insert(contentsOf: Array(tokens[Int(g.next() % UInt64(tokens.count))].utf8), at: at)
            case 2: b = Array(b.prefix(at))
            case 3: b.insert(contentsOf: randomBytes(Int(g.next() % 64), seed: g.next()), at: at)
            case 4: if at < b.count { b.removeSubrange(at..<min(b.count, at + Int(g.next() % 32))) }
            default: b += b.prefix(Int(g.next() % UInt64(b.count + 1)))  // a pipelined repeat
            }
        }
        return b
    }

    @Test func theHeadParserTakesAnyBytes() {
        let seed = UInt64(ProcessInfo.processInfo.environment["MODELFS_FUZZ_SEED"] ?? "") ?? 0x5EED_0001
        var g = SplitMix(seed: seed)
        var parsed = 0
        for _ in 0..<20_000 {
            let b = Self.mutate(&g)
            if let h = PeerServer.parseRequestHead(b[...]) {
                parsed += 1
                #expect(h.length >= 0, "seed \(seed)")
                _ = PeerRequest(method: HTTPMethod(rawValue: h.method), uri: h.uri, headers: h.headers)
            }
        }
        // The mutations leave some requests valid: the parser is exercised on both sides.
        #expect(parsed > 100 && parsed < 20_000, "seed \(seed): \(parsed) parsed")
        // A peer's answers, as BlockTransfer reads them (a node is also a client of every other).
        let answers = ["HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: application/octet-stream\r\n\r\n",
                       "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n",
                       "HTTP/1.0 404 Not Found\r\nConnection: close\r\nContent-Length: 10\r\n\r\n"]
        var answered = 0
        for _ in 0..<20_000 {
            var b = Array(answers[Int(g.next() % UInt64(answers.count))].utf8)
            for _ in 0..<(1 + Int(g.next() % 3)) {
                let at = Int(g.next() % UInt64(b.count + 1))
                switch g.next() % 3 {
                case 0: if at < b.count { b[at] ^= UInt8(truncatingIfNeeded: g.next() | 1) }
                case 1: b.insert(contentsOf: Array(Self.tokens[Int(g.next() % UInt64(Self.tokens.count))].utf8), at: at)
                default: b = Array(b.prefix(at))
                }
            }
            if let h = BlockTransfer.parseHead(b[...]) {
                answered += 1
                #expect(h.length >= 0, "seed \(seed)")
            }
        }
        #expect(answered > 100, "seed \(seed): \(answered) answers parsed")
    }

    static func residentBytes() -> Int {
        guard let s = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8),
              let pages = Int(s.split(separator: " ")[1]) else { return 0 }
        return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
    }

    /// Sends `bytes` on a new connection, reads what comes back until the server closes or 2 s
    /// pass, and returns how long the server took to answer or close (nil: it neither answered
    /// nor closed in time, which only a request that promised more bytes may do).
    static func exchange(port: Int, _ bytes: [UInt8]) -> (answered: Bool, closed: Bool) {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return (false, false) }
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let ok = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard ok == 0 else { return (false, false) }
        var tv = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        _ = bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        shutdown(fd, Int32(SHUT_WR))
        var buf = [UInt8](repeating: 0, count: 65536)
        var answered = false
        while true {
            let n = recv(fd, &buf, buf.count, 0)
            if n > 0 { answered = true; continue }
            return (answered, n == 0)
        }
    }

    @Test func thePeerServerSurvivesGarbage() throws {
        let seed = UInt64(ProcessInfo.processInfo.environment["MODELFS_FUZZ_SEED"] ?? "") ?? 0x5EED_0002
        let cases = Int(ProcessInfo.processInfo.environment["MODELFS_FUZZ_CASES"] ?? "") ?? 1500
        let dir = try scratch("fuzz")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let local = try PackBlockStore(root: dir)
        let server = try PeerServer(host: "127.0.0.1", port: 0,
                                    routes: PeerService(secret: Self.secret, local: local, cache: nil, metrics: PeerMetrics(),
                                                        readToken: "fuzz-read-token", status: { Data("{}".utf8) }),
                                    maxBody: PeerService.maxBody)
        defer { server.shutdown() }
        let before = Self.residentBytes()
        var g = SplitMix(seed: seed)
        let requests = (0..<cases).map { _ in Self.mutate(&g) }
        let hung = Mutex(0)
        DispatchQueue.concurrentPerform(iterations: 8) { worker in
            for i in stride(from: worker, to: requests.count, by: 8) {
                let r = Self.exchange(port: server.port, requests[i])
                if !r.answered && !r.closed { hung.withLock { $0 += 1 } }
            }
        }
        // A request whose head promised a body it never sent waits for it (bounded by the idle
        // timeout); everything else is answered or closed at once.
        #expect(hung.withLock { $0 } < cases / 10, "seed \(seed): \(hung.withLock { $0 }) of \(cases) connections hung")
        // Still serving, and no block was stored from garbage that named a wrong digest.
        let good = Self.exchange(port: server.port, Array("GET /v1/status HTTP/1.1\r\nAuthorization: Bearer fuzz-secret\r\nConnection: close\r\n\r\n".utf8))
        #expect(good.answered, "seed \(seed): the server stopped answering")
        let grown = Self.residentBytes() - before
        #expect(grown < 512 << 20, "seed \(seed): resident memory grew by \(grown >> 20) MiB")
    }
}
