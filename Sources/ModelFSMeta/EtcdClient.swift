import AsyncHTTPClient
import Foundation
import ModelFSCore
import NIOCore
import NIOHTTP1
import NIOSSL
import Synchronization

/// How a node talks to etcd beyond plain HTTP: TLS (the members' CA, and a client certificate
/// when etcd asks for one: `--client-cert-auth`) and etcd's own users (`etcdctl auth enable`).
public struct EtcdSecurity: Sendable, Equatable {
    /// PEM file of the CA that signed the members' certificates: with it, https.
    public var caFile: String?
    /// PEM files of this node's client certificate and key.
    public var certFile: String?
    public var keyFile: String?
    /// An etcd user and its password (read from a file by the caller).
    public var user: String?
    public var password: String?

    public init(caFile: String? = nil, certFile: String? = nil, keyFile: String? = nil, user: String? = nil, password: String? = nil) {
        self.caFile = caFile; self.certFile = certFile; self.keyFile = keyFile; self.user = user; self.password = password
    }

    public static let none = EtcdSecurity()
    var tls: Bool { caFile != nil || certFile != nil }

    /// The TLS configuration of the HTTP client.
    func tlsConfiguration() throws -> TLSConfiguration {
        var c = TLSConfiguration.makeClientConfiguration()
        if let caFile { c.trustRoots = .file(caFile) }
        if let certFile, let keyFile {
            do {
                c.certificateChain = try NIOSSLCertificate.fromPEMFile(certFile).map { .certificate($0) }
                c.privateKey = .privateKey(try NIOSSLPrivateKey(file: keyFile, format: .pem))
            } catch {
                throw FSError.invalid("cannot load the etcd client certificate \(certFile) or key \(keyFile): \(error)")
            }
        }
        return c
    }
}

/// A key-value pair as etcd returns it.
public struct EtcdKV: Sendable, Equatable {
    public var key: Data
    public var value: Data
    public var createRevision: Int64
    public var modRevision: Int64
    public var lease: Int64
}

public enum EtcdError: Error, CustomStringConvertible, Sendable {
    /// No endpoint answered: the request was not applied.
    case unreachable(String)
    /// The request may or may not have been applied (a write interrupted by leader loss, say):
    /// the caller must re-read before retrying.
    case ambiguous(String)
    /// The snapshot revision a transaction reads at has been compacted away: restart it.
    case compacted
    /// etcd refused the request (bad request, too many operations, quota exceeded...).
    case rejected(code: Int, message: String)

    public var description: String {
        switch self {
        case .unreachable(let s): return "etcd unreachable: \(s)"
        case .ambiguous(let s): return "etcd request outcome unknown: \(s)"
        case .compacted: return "etcd revision compacted"
        case .rejected(let code, let message): return "etcd refused the request (code \(code)): \(message)"
        }
    }
}

/// A compare of a transaction (etcd's `Compare`), on one key or a range `[key, rangeEnd)`.
public struct EtcdCompare: Encodable, Sendable {
    var key: String
    var range_end: String?
    var target: String
    var result: String
    var mod_revision: Int64?
    var version: Int64?
    var value: String?

    /// The key's (every key in the range's) mod revision `result` `revision`.
    public static func modRevision(_ key: Data, rangeEnd: Data? = nil, _ result: String, _ revision: Int64) -> EtcdCompare {
        EtcdCompare(key: key.base64EncodedString(), range_end: rangeEnd?.base64EncodedString(), target: "MOD",
                    result: result, mod_revision: revision)
    }
    /// The key does not exist (its version is 0).
    public static func absent(_ key: Data) -> EtcdCompare {
        EtcdCompare(key: key.base64EncodedString(), target: "VERSION", result: "EQUAL", version: 0)
    }
    public static func value(_ key: Data, equals value: Data) -> EtcdCompare {
        EtcdCompare(key: key.base64EncodedString(), target: "VALUE", result: "EQUAL", value: value.base64EncodedString())
    }
}

/// An operation of a transaction.
public enum EtcdOp: Sendable {
    case put(Data, Data, lease: Int64? = nil)
    case delete(Data, rangeEnd: Data? = nil)
    case get(Data, rangeEnd: Data? = nil)
}

/// A client for etcd's v3 JSON gateway (`/v3/kv/...`, `/v3/lease/...`), over AsyncHTTPClient.
///
/// Facts this client is written around (measured on etcd 3.4): keys and values are base64;
/// 64-bit integers come back as strings; zero values are omitted (a failed txn has no
/// `succeeded`, a PUT event no `type`); a txn touches a key at most once and holds at most 128
/// compares and 128 operations; on leader loss a write hangs ~7 s then fails with 503 and may
/// or may not have been applied.
///
/// Calls are synchronous: they are made from FUSE worker threads and background threads, never
/// from an event loop. The client keeps to the endpoint that last answered and moves on to the
/// next when one is unreachable.
public final class EtcdClient: Sendable {
    public let endpoints: [String]
    let http: HTTPClient
    private let preferred = Mutex(0)
    let timeout: TimeAmount
    let security: EtcdSecurity
    /// The etcd auth token (with a user): fetched on first use, fetched again when etcd says it
    /// is no longer valid (simple tokens expire after --auth-token-ttl of disuse).
    private let token = Mutex<String?>(nil)

    /// `endpoints` are `host:port` or `http(s)://host:port`; with TLS in `security` they are https.
    public init(endpoints: [String], security: EtcdSecurity = .none, timeout: TimeAmount = .seconds(20)) throws {
        let scheme = security.tls ? "https://" : "http://"
        self.endpoints = endpoints.map { $0.hasPrefix("http://") || $0.hasPrefix("https://") ? $0 : scheme + $0 }
        var config = HTTPClient.Configuration()
        config.connectionPool = .init(idleTimeout: .seconds(60), concurrentHTTP1ConnectionsPerHostSoftLimit: 32)
        config.timeout = .init(connect: .seconds(2))
        // HTTP/1.1 over TLS too (without this, ALPN picks HTTP/2 with a TLS etcd): one code path
        // for every etcd, the one every test runs. AsyncHTTPClient 1.37's HTTP/2 request handler
        // crashed the daemon (a nil unwrap in HTTP2ClientRequestHandler.run, on a stream closed
        // while a request body was being written) in a CI run of test_etcd_security.
        config.httpVersion = .http1Only
        if security.tls { config.tlsConfiguration = try security.tlsConfiguration() }
        http = HTTPClient(eventLoopGroupProvider: .singleton, configuration: config)
        self.timeout = timeout
        self.security = security
    }

    /// Adds the auth token to a request (when etcd has users), fetching it first if needed.
    func authorize(_ headers: inout HTTPHeaders) throws {
        guard let user = security.user else { return }
        let current = token.withLock { $0 }
        if let current { headers.replaceOrAdd(name: "Authorization", value: current); return }
        struct Req: Encodable { var name: String; var password: String }
        struct Resp: Decodable { var token: String? }
        let r: Resp = try call("/v3/auth/authenticate", Req(name: user, password: security.password ?? ""), idempotent: true, authenticated: false)
        guard let t = r.token, !t.isEmpty else {
            throw EtcdError.rejected(code: 16, message: "etcd gave user \(user) no token (is auth enabled?)")
        }
        token.withLock { $0 = t }
        headers.replaceOrAdd(name: "Authorization", value: t)
    }

    public func shutdown() {
        try? http.syncShutdown()
    }

    /// AsyncHTTPClient insists on an explicit shutdown; a second one is a no-op.
    deinit { try? http.syncShutdown() }

    // MARK: Wire types (JSON as the gateway speaks it)

    struct WireHeader: Decodable { var revision: String? }
    struct WireKV: Decodable {
        var key: String?; var value: String?; var create_revision: String?; var mod_revision: String?; var lease: String?
    }
    struct WireRange: Decodable { var header: WireHeader?; var kvs: [WireKV]?; var more: Bool?; var count: String? }
    struct WireResponseOp: Decodable { var response_range: WireRange? }
    struct WireTxn: Decodable { var header: WireHeader?; var succeeded: Bool?; var responses: [WireResponseOp]? }
    struct WireLease: Decodable { var ID: String?; var TTL: String?; var error: String? }
    struct WireKeepAlive: Decodable { var result: WireLease? }
    struct WireError: Decodable { var error: String?; var message: String?; var code: Int? }

    struct RangeRequest: Encodable {
        var key: String; var range_end: String?; var limit: Int64?; var revision: Int64?
        var sort_order: String?; var sort_target: String?; var keys_only: Bool?; var count_only: Bool?
        var min_create_revision: Int64?
    }
    struct PutRequest: Encodable { var key: String; var value: String; var lease: Int64? }
    struct DeleteRequest: Encodable { var key: String; var range_end: String? }
    struct RequestOp: Encodable {
        var request_range: RangeRequest?; var request_put: PutRequest?; var request_delete_range: DeleteRequest?
    }
    struct TxnRequest: Encodable { var compare: [EtcdCompare]; var success: [RequestOp]; var failure: [RequestOp] }

    static func decode(_ kv: WireKV) -> EtcdKV {
        EtcdKV(key: Data(base64Encoded: kv.key ?? "") ?? Data(), value: Data(base64Encoded: kv.value ?? "") ?? Data(),
               createRevision: Int64(kv.create_revision ?? "0") ?? 0, modRevision: Int64(kv.mod_revision ?? "0") ?? 0,
               lease: Int64(kv.lease ?? "0") ?? 0)
    }

    // MARK: Calls

    public struct RangeResult: Sendable {
        public var kvs: [EtcdKV]
        public var more: Bool
        public var count: Int64
        /// The store's revision the range was read at.
        public var revision: Int64
    }

    public struct RangeOptions: Sendable {
        public var limit: Int64? = nil
        public var revision: Int64? = nil
        public var keysOnly = false
        public var countOnly = false
        public var minCreateRevision: Int64? = nil
        public var sortByCreateRevision = false
        public init() {}
    }

    /// Reads `key`, or `[key, rangeEnd)`, linearizably (or at `options.revision`).
    public func range(_ key: Data, rangeEnd: Data? = nil, _ options: RangeOptions = RangeOptions()) throws -> RangeResult {
        let req = RangeRequest(key: key.base64EncodedString(), range_end: rangeEnd?.base64EncodedString(),
                               limit: options.limit, revision: options.revision,
                               sort_order: options.sortByCreateRevision ? "ASCEND" : nil,
                               sort_target: options.sortByCreateRevision ? "CREATE" : nil,
                               keys_only: options.keysOnly ? true : nil, count_only: options.countOnly ? true : nil,
                               min_create_revision: options.minCreateRevision)
        let r: WireRange = try call("/v3/kv/range", req, idempotent: true)
        return RangeResult(kvs: (r.kvs ?? []).map(Self.decode), more: r.more ?? false,
                           count: Int64(r.count ?? "0") ?? 0, revision: Int64(r.header?.revision ?? "0") ?? 0)
    }

    /// Every key under `prefix` at one revision, fetched in pages.
    public func rangeAll(prefix: Data, revision: Int64? = nil, keysOnly: Bool = false, page: Int64 = 1000) throws -> RangeResult {
        var out = RangeResult(kvs: [], more: false, count: 0, revision: revision ?? 0)
        var start = prefix
        let end = Self.prefixEnd(prefix)
        while true {
            var o = RangeOptions()
            o.limit = page; o.revision = out.revision == 0 ? nil : out.revision; o.keysOnly = keysOnly
            let r = try range(start, rangeEnd: end, o)
            if out.revision == 0 { out.revision = r.revision }
            out.kvs += r.kvs
            guard r.more, let last = r.kvs.last else { break }
            start = last.key + [0]
        }
        out.count = Int64(out.kvs.count)
        return out
    }

    public struct TxnResult: Sendable {
        public var succeeded: Bool
        public var revision: Int64
        /// Results of `.get` operations, in order.
        public var ranges: [[EtcdKV]]
    }

    /// `idempotent`: applying the txn twice is the same as once (a compare guards it, or it
    /// writes the same values again), so an interrupted attempt may simply be sent again.
    public func txn(compare: [EtcdCompare], success: [EtcdOp], failure: [EtcdOp] = [], idempotent: Bool = false) throws -> TxnResult {
        func wire(_ op: EtcdOp) -> RequestOp {
            switch op {
            case .put(let k, let v, let lease):
                return RequestOp(request_put: PutRequest(key: k.base64EncodedString(), value: v.base64EncodedString(), lease: lease))
            case .delete(let k, let end):
                return RequestOp(request_delete_range: DeleteRequest(key: k.base64EncodedString(), range_end: end?.base64EncodedString()))
            case .get(let k, let end):
                return RequestOp(request_range: RangeRequest(key: k.base64EncodedString(), range_end: end?.base64EncodedString()))
            }
        }
        let req = TxnRequest(compare: compare, success: success.map(wire), failure: failure.map(wire))
        let hasWrites = (success + failure).contains { if case .get = $0 { return false }; return true }
        let r: WireTxn = try call("/v3/kv/txn", req, idempotent: idempotent || !hasWrites)
        return TxnResult(succeeded: r.succeeded ?? false, revision: Int64(r.header?.revision ?? "0") ?? 0,
                         ranges: (r.responses ?? []).compactMap { $0.response_range.map { ($0.kvs ?? []).map(Self.decode) } })
    }

    public func put(_ key: Data, _ value: Data, lease: Int64? = nil) throws {
        _ = try txn(compare: [], success: [.put(key, value, lease: lease)], idempotent: true)
    }

    public func delete(_ key: Data, rangeEnd: Data? = nil) throws {
        _ = try txn(compare: [], success: [.delete(key, rangeEnd: rangeEnd)], idempotent: true)
    }

    /// Grants a lease of `ttl` seconds; returns its id.
    public func grantLease(ttl: Int) throws -> Int64 {
        struct Req: Encodable { var TTL: Int64 }
        let r: WireLease = try call("/v3/lease/grant", Req(TTL: Int64(ttl)), idempotent: true)   // a duplicate lease just expires
        guard let id = r.ID.flatMap(Int64.init), id != 0 else {
            throw EtcdError.rejected(code: 0, message: r.error ?? "lease grant returned no id")
        }
        return id
    }

    /// Renews a lease; returns its remaining TTL (0: the lease has expired and is gone).
    public func keepAlive(lease: Int64) throws -> Int {
        struct Req: Encodable { var ID: Int64 }
        let r: WireKeepAlive = try call("/v3/lease/keepalive", Req(ID: lease), idempotent: true)
        return Int(r.result?.TTL ?? "0") ?? 0
    }

    public func revokeLease(_ lease: Int64) throws {
        struct Req: Encodable { var ID: Int64 }
        let _: WireLease = try call("/v3/lease/revoke", Req(ID: lease), idempotent: true)
    }

    /// The end of the range of every key starting with `prefix`.
    public static func prefixEnd(_ prefix: Data) -> Data {
        var end = prefix
        while let last = end.last {
            if last < 0xFF { end[end.index(before: end.endIndex)] = last + 1; return end }
            end.removeLast()
        }
        return Data([0])   // every key
    }

    // MARK: Transport

    /// Posts `body` to `path` on the preferred endpoint, moving to the next one when an endpoint
    /// cannot be reached. A request that reached a server but got no definite answer is retried
    /// elsewhere only when `idempotent`; otherwise it is reported as `.ambiguous`.
    func call<Req: Encodable, Resp: Decodable>(_ path: String, _ body: Req, idempotent: Bool, authenticated: Bool = true) throws -> Resp {
        do {
            return try send(path, body, idempotent: idempotent, authenticated: authenticated)
        } catch EtcdError.rejected(let code, let message) where authenticated && security.user != nil && Self.staleToken(code, message) {
            // The token expired or etcd restarted: log in again, once.
            token.withLock { $0 = nil }
            return try send(path, body, idempotent: idempotent, authenticated: true)
        }
    }

    /// etcd's answers to a request whose token it no longer takes.
    static func staleToken(_ code: Int, _ message: String) -> Bool {
        message.contains("invalid auth token") || message.contains("user name is empty")
    }

    private func send<Req: Encodable, Resp: Decodable>(_ path: String, _ body: Req, idempotent: Bool, authenticated: Bool) throws -> Resp {
        let start = DispatchTime.now().uptimeNanoseconds
        var outcome = "error"
        defer { EtcdMetrics.shared.record(path, outcome, seconds: Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9) }
        let json = try JSONEncoder().encode(body)
        var auth = HTTPHeaders()
        if authenticated { try authorize(&auth) }
        let first = preferred.withLock { $0 }
        var failures: [String] = []
        for attempt in 0..<endpoints.count {
            let index = (first + attempt) % endpoints.count
            let url = endpoints[index] + path
            var request: HTTPClient.Request
            do {
                request = try HTTPClient.Request(url: url, method: .POST, body: .data(json))
            } catch {
                throw EtcdError.unreachable("bad endpoint \(endpoints[index]): \(error)")
            }
            request.headers.add(name: "Content-Type", value: "application/json")
            request.headers.add(contentsOf: auth)
            let response: HTTPClient.Response
            do {
                response = try http.execute(request: request, deadline: .now() + timeout).wait()
            } catch {
                let refused = Self.neverSent(error)
                failures.append("\(endpoints[index]): \(error)")
                if refused || idempotent { continue }
                throw EtcdError.ambiguous("\(endpoints[index])\(path): \(error)")
            }
            let bytes = response.body.map { Data($0.readableBytesView) } ?? Data()
            if response.status == .ok {
                outcome = "ok"
                if index != first { preferred.withLock { $0 = index } }
                do { return try JSONDecoder().decode(Resp.self, from: bytes) } catch {
                    throw EtcdError.rejected(code: 0, message: "unreadable answer from \(url): \(String(decoding: bytes.prefix(200), as: UTF8.self))")
                }
            }
            let err = try? JSONDecoder().decode(WireError.self, from: bytes)
            let message = (err?.message ?? err?.error ?? String(decoding: bytes.prefix(200), as: UTF8.self))
                .trimmingCharacters(in: .whitespacesAndNewlines)
            // A snapshot read whose revision is gone (compacted) or not yet applied on this member.
            if message.contains("required revision has been compacted") || message.contains("future revision") {
                throw EtcdError.compacted
            }
            // 503 and gRPC "Unavailable" (14) or "DeadlineExceeded" (4): no leader or a timeout.
            let unavailable = response.status == .serviceUnavailable || err?.code == 14 || err?.code == 4
                || message.contains("leader") || message.contains("timed out")
            if unavailable {
                failures.append("\(endpoints[index]): \(message)")
                if idempotent { continue }
                throw EtcdError.ambiguous("\(endpoints[index])\(path): \(message)")
            }
            if err?.code == 16 || err?.code == 7 || response.status == .unauthorized || response.status == .forbidden {
                // Unauthenticated or permission denied: a wrong user, password, or role.
                throw EtcdError.rejected(code: err?.code ?? Int(response.status.code), message: "etcd refused access: \(message)")
            }
            throw EtcdError.rejected(code: err?.code ?? Int(response.status.code), message: message)
        }
        throw EtcdError.unreachable(failures.joined(separator: "; "))
    }

    /// The etcd requests of this process, for `/metrics`.
    public static func metricsText() -> String { EtcdMetrics.shared.render() }

    /// What to do about a first request that failed, for the one-line error.
    public static func hint(for error: any Error, _ security: EtcdSecurity) -> String {
        let text = "\(error)"
        if text.contains("CommonName of client") {
            return "etcd's JSON gateway refuses a client certificate with a CommonName while auth is on: give this node one whose subject has no CN (e.g. openssl req -subj /O=modelfs)"
        }
        if !security.tls && text.contains("remoteConnectionClosed") {
            return "etcd closed the connection unanswered: if it speaks TLS, give its CA with --etcd-ca (and --etcd-cert/--etcd-key if it asks for client certificates)"
        }
        if security.tls && text.contains("remoteConnectionClosed") {
            return security.certFile == nil
                ? "etcd closed the TLS connection unanswered: it asks for a client certificate, give one with --etcd-cert and --etcd-key"
                : "etcd closed the TLS connection unanswered: check --etcd-ca, --etcd-cert and --etcd-key against the members' CA"
        }
        // Without a certificate of ours, the member's alert that it wants one (TLS 1.3 sends it
        // after the handshake: over HTTP/1.1 it arrives as this alert, not as a closed connection).
        if security.tls && security.certFile == nil && (text.contains("ALERT_BAD_CERTIFICATE") || text.contains("CERTIFICATE_REQUIRED")) {
            return "etcd refused the TLS connection: it asks for a client certificate, give one with --etcd-cert and --etcd-key"
        }
        if text.contains("HTTP request to an HTTPS server") { return "etcd speaks TLS: give its CA with --etcd-ca (and --etcd-cert/--etcd-key if it asks for client certificates)" }
        if text.lowercased().contains("handshake") || text.contains("SSL") || text.contains("certificate") {
            return security.tls ? "the TLS handshake failed: check --etcd-ca, --etcd-cert and --etcd-key against the members' certificates"
                                : "etcd speaks TLS: give its CA with --etcd-ca"
        }
        if text.contains("refused access") || text.contains("authentication failed") || text.contains("user name is empty") || text.contains("permission denied") {
            return security.user == nil ? "etcd has users: give one with --etcd-user and --etcd-password-file"
                                        : "check --etcd-user, --etcd-password-file and the user's role"
        }
        return "start the etcd cluster or fix --meta"
    }

    /// Whether a transport error means the request never reached the server (safe to resend).
    static func neverSent(_ error: any Error) -> Bool {
        if let e = error as? HTTPClientError, e == .connectTimeout { return true }
        let text = String(describing: error)
        return text.contains("connectTimeout") || text.contains("Connection refused") || text.contains("connectionRefused")
            || text.contains("ECONNREFUSED")
    }
}

/// Latency of every etcd request by gateway path and outcome (ok or error), in the Prometheus
/// text format. One lock per request: a request is a network round trip.
final class EtcdMetrics: Sendable {
    static let shared = EtcdMetrics()
    static let bounds: [Double] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20]
    private let state = Mutex([String: Histogram]())

    func record(_ path: String, _ outcome: String, seconds: Double) {
        state.withLock { s in
            let key = path + "," + outcome
            s[key, default: Histogram(bounds: Self.bounds)].record(seconds)
        }
    }

    func render() -> String {
        let s = state.withLock { $0 }
        guard !s.isEmpty else { return "" }
        var out = "# HELP modelfs_etcd_request_seconds etcd requests by gateway path and outcome.\n# TYPE modelfs_etcd_request_seconds histogram\n"
        for (key, h) in s.sorted(by: { $0.key < $1.key }) {
            let p = key.split(separator: ",")
            out += h.render("modelfs_etcd_request_seconds", labels: "path=\"\(p[0])\",outcome=\"\(p[1])\"")
        }
        return out
    }
}
