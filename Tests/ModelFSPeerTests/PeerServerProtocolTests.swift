import Foundation
import Synchronization
import Testing
@testable import ModelFSCore
@testable import ModelFSPeer
@testable import ModelFSWire
@testable import ModelFSStore

/// The peer server's HTTP/1.1 handling, spoken to over raw loopback sockets: what a client
/// library would never send (pipelined requests, a chunked body, a huge head, a cut body).
@Suite struct PeerServerProtocolTests {
    let auth = "Authorization: Bearer s3cret\r\n"

    func withServer(_ body: (PeerServer, PackBlockStore) throws -> Void) throws {
        let dir = try scratch("protocol")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let local = try PackBlockStore(root: dir)
        let server = try PeerServer(host: "127.0.0.1", port: 0,
                                    routes: PeerService(secret: "s3cret", local: local, cache: nil, metrics: PeerMetrics(),
                                                        status: { Data(#"{"ok":true}"#.utf8) }),
                                    maxBody: PeerService.maxBody)
        defer { server.shutdown() }
        try body(server, local)
    }

    func connect(_ port: Int) throws -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = UInt16(port).bigEndian
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let ok = withUnsafePointer(to: &addr) { a in
            a.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
        }
        guard ok else { close(fd); throw FSError.io("cannot connect to the test server") }
        var tv = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        return fd
    }

    func sendAll(_ fd: Int32, _ bytes: [UInt8]) {
        _ = bytes.withUnsafeBytes { SocketIO.sendAll(fd, $0) }
    }

    /// Everything the server sends until it closes the connection (or 10 s pass).
    func readToEnd(_ fd: Int32) -> [UInt8] {
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = recv(fd, &chunk, chunk.count, 0)
            guard n > 0 else { return out }
            out += chunk[0..<n]
        }
    }

    /// Sends `bytes` on a new connection, ends the sending side, and returns all of the answer.
    func exchange(_ port: Int, _ bytes: [UInt8]) throws -> String {
        let fd = try connect(port)
        defer { close(fd) }
        sendAll(fd, bytes)
        shutdown(fd, Int32(SHUT_WR))
        return String(decoding: readToEnd(fd), as: UTF8.self)
    }

    /// The status codes of the responses in `text`, in order.
    func statuses(_ text: String) -> [Int] {
        text.components(separatedBy: "HTTP/1.1 ").dropFirst().compactMap { Int($0.prefix(3)) }
    }

    @Test func pipelinedRequestsAreAnsweredInOrderOnOneConnection() throws { try withServer { server, local in
        let (id, bytes) = blockOf(300_000, seed: 41)
        var wire = Array("GET /v1/status HTTP/1.1\r\n\(auth)\r\n".utf8)
        wire += Array("PUT /v1/blocks/\(id.hex) HTTP/1.1\r\n\(auth)Content-Length: \(bytes.count)\r\n\r\n".utf8) + bytes
        wire += Array("HEAD /v1/blocks/\(id.hex) HTTP/1.1\r\n\(auth)\r\n".utf8)
        wire += Array("GET /v1/blocks/\(id.hex) HTTP/1.1\r\n\(auth)Connection: close\r\n\r\n".utf8)
        // Anything after a request that asked to close is not read.
        wire += Array("GET /v1/status HTTP/1.1\r\n\(auth)\r\n".utf8)
        let fd = try connect(server.port)
        defer { close(fd) }
        sendAll(fd, wire)
        let answer = readToEnd(fd)
        let text = String(decoding: answer, as: UTF8.self)
        #expect(statuses(text) == [200, 201, 200, 200])
        #expect(text.contains(#"{"ok":true}"#))
        #expect(local.contains(id))
        // The GET's body is the block, byte for byte, at the end of the stream.
        #expect(Array(answer.suffix(bytes.count)) == bytes)
        #expect(text.contains("Connection: close"))
    }}

    @Test func aBlockBodyIsHashedAsItArrivesAndABadOneIsRejected() throws { try withServer { server, local in
        let (id, bytes) = blockOf(200_000, seed: 42)
        var bad = bytes
        bad[150_000] ^= 0x80
        // Sent in small pieces, so that the body arrives over many receives.
        let fd = try connect(server.port)
        defer { close(fd) }
        sendAll(fd, Array("PUT /v1/blocks/\(id.hex) HTTP/1.1\r\n\(auth)Content-Length: \(bad.count)\r\n\r\n".utf8))
        for at in stride(from: 0, to: bad.count, by: 7_000) { sendAll(fd, Array(bad[at..<min(bad.count, at + 7_000)])) }
        sendAll(fd, Array("PUT /v1/blocks/\(id.hex) HTTP/1.1\r\n\(auth)Content-Length: \(bytes.count)\r\nConnection: close\r\n\r\n".utf8) + bytes)
        let text = String(decoding: readToEnd(fd), as: UTF8.self)
        #expect(statuses(text) == [422, 201])
        #expect(try local.read(id).withUnsafeBytes { Array($0) } == bytes)
    }}

    @Test func requestsItCannotServeGetAClearAnswerAndTheConnectionCloses() throws { try withServer { server, local in
        #expect(statuses(try exchange(server.port, Array("BREW /coffee HTCPCP/1.0\r\n\r\n".utf8))) == [400])
        #expect(statuses(try exchange(server.port, Array("GET /v1/status HTTP/1.1\r\nno colon here\r\n\r\n".utf8))) == [400])
        let chunked = try exchange(server.port, Array("POST /v1/has HTTP/1.1\r\n\(auth)Transfer-Encoding: chunked\r\n\r\n20\r\n".utf8))
        #expect(statuses(chunked) == [411])
        #expect(chunked.contains("Content-Length"))
        let huge = try exchange(server.port, Array("GET /v1/status HTTP/1.1\r\nX-Pad: \(String(repeating: "a", count: 20_000))\r\n\r\n".utf8))
        #expect(statuses(huge) == [431])
        // Two different lengths: which one is the body is ambiguous.
        #expect(statuses(try exchange(server.port, Array("POST /v1/has HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".utf8))) == [400])
        // The server keeps serving after all of these.
        #expect(statuses(try exchange(server.port, Array("GET /v1/status HTTP/1.1\r\n\(auth)Connection: close\r\n\r\n".utf8))) == [200])
    }}

    @Test func aBodyCutShortStoresNothing() throws { try withServer { server, local in
        let (id, bytes) = blockOf(500_000, seed: 43)
        let answer = try exchange(server.port, Array("PUT /v1/blocks/\(id.hex) HTTP/1.1\r\n\(auth)Content-Length: \(bytes.count)\r\n\r\n".utf8) + bytes[0..<300_000])
        #expect(answer.isEmpty)
        #expect(!local.contains(id))
    }}

    @Test func expectContinueIsHonoured() throws { try withServer { server, local in
        let (id, bytes) = blockOf(100_000, seed: 44)
        let fd = try connect(server.port)
        defer { close(fd) }
        sendAll(fd, Array("PUT /v1/blocks/\(id.hex) HTTP/1.1\r\n\(auth)Content-Length: \(bytes.count)\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n".utf8))
        // The interim answer comes before any of the body is sent.
        var first = [UInt8](repeating: 0, count: 25)
        #expect(recv(fd, &first, first.count, Int32(MSG_WAITALL)) == 25)
        #expect(String(decoding: first, as: UTF8.self) == "HTTP/1.1 100 Continue\r\n\r\n")
        sendAll(fd, bytes)
        #expect(statuses(String(decoding: readToEnd(fd), as: UTF8.self)) == [201])
        #expect(local.contains(id))
    }}

    @Test func shutdownEndsIdleConnections() throws {
        let dir = try scratch("protocol-shutdown")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let server = try PeerServer(host: "127.0.0.1", port: 0,
                                    routes: PeerService(secret: "s3cret", local: try PackBlockStore(root: dir), cache: nil,
                                                        metrics: PeerMetrics(), status: { Data("{}".utf8) }),
                                    maxBody: PeerService.maxBody)
        let idle = try (0..<3).map { _ in try connect(server.port) }
        defer { for fd in idle { close(fd) } }
        // One request answered on each, so each has its own serving thread, now waiting.
        for fd in idle {
            sendAll(fd, Array("GET /v1/status HTTP/1.1\r\n\(auth)\r\n".utf8))
            var b = [UInt8](repeating: 0, count: 4096)
            #expect(recv(fd, &b, b.count, 0) > 0)
        }
        let start = Date()
        server.shutdown()
        #expect(Date().timeIntervalSince(start) < 5)
        for fd in idle { #expect(readToEnd(fd).isEmpty) }
        // The port no longer accepts.
        #expect(throws: (any Error).self) { _ = try connect(server.port) }
    }
}
