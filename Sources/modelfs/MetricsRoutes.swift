import Foundation
import ModelFSNode
import ModelFSCore
import ModelFSPeer
import ModelFSWire
import NIOCore
import NIOHTTP1

/// `--metrics-listen HOST:PORT`: Prometheus `/metrics` for any mount, a single node too, served
/// by a PeerServer (the same HTTP/1.1 server as the peer port, with its limits) whose only route
/// is GET /metrics. With `--metrics-token-file` a request must carry `Authorization: Bearer
/// TOKEN` (required off loopback).
struct MetricsRoutes: PeerRoutes {
    let token: [UInt8]?
    let render: @Sendable () -> String

    static func serve(address: String, token: String?, render: @escaping @Sendable () -> String) throws -> PeerServer {
        guard let (host, port) = parseHostPort(address) else { throw FSError.invalid("--metrics-listen \(address): expected HOST:PORT") }
        do {
            return try PeerServer(host: host, port: port, routes: MetricsRoutes(token: token.map { Array($0.utf8) }, render: render),
                                  maxBody: 0, threads: 1, maxConnections: 16)
        } catch {
            throw FSError.io("--metrics-listen \(address): cannot listen there: \(error)")
        }
    }

    func handle(_ r: PeerRequest) -> PeerResponse {
        guard r.method == .GET else { return .text(.methodNotAllowed, "only GET /metrics") }
        guard r.path == "/metrics" else { return .text(.notFound, "only /metrics") }
        if let token {
            guard let auth = r.headers.first(name: "authorization"), auth.hasPrefix("Bearer "),
                  PeerService.same(Array(auth.utf8.dropFirst(7)), token) else {
                return .text(.unauthorized, "missing or wrong metrics token")
            }
        }
        return PeerResponse(.ok, body: ByteBuffer(string: render()), contentType: "text/plain; version=0.0.4")
    }
}
