import AsyncHTTPClient
import Foundation
import ModelFSCore
import NIOCore
import NIOHTTP1
import Synchronization

/// A change seen by a watch.
public struct EtcdEvent: Sendable {
    public var isDelete: Bool
    public var kv: EtcdKV
    /// The key's value before this change (absent for a new key, or once compacted away).
    public var prev: EtcdKV? = nil
}

/// Watches every key under a prefix through the gateway's streaming `/v3/watch` (one JSON
/// object per line), resuming after the last revision seen when the stream breaks (an etcd
/// member restarted, say). Events are handed to `handler` in order, on one serial queue, each
/// with the key's previous value (`prev_kv`: what a replaced manifest referenced).
public final class EtcdWatcher: @unchecked Sendable {
    let client: EtcdClient
    let prefix: Data
    let handler: @Sendable ([EtcdEvent]) -> Void
    let queue = DispatchQueue(label: "modelfs.etcd-watch")
    private struct State {
        var next: Int64 = 0
        var task: HTTPClient.Task<Void>?
        var stopped = false
        var endpoint = 0
    }
    private let state = Mutex(State())

    public init(client: EtcdClient, prefix: Data, handler: @escaping @Sendable ([EtcdEvent]) -> Void) {
        self.client = client
        self.prefix = prefix
        self.handler = handler
    }

    /// Starts watching changes made after `revision`.
    public func start(after revision: Int64) {
        state.withLock { $0.next = revision + 1 }
        connect()
    }

    public func stop() {
        let task = state.withLock { s -> HTTPClient.Task<Void>? in s.stopped = true; return s.task }
        task?.cancel()
    }

    struct CreateRequest: Encodable {
        struct Body: Encodable { var key: String; var range_end: String; var start_revision: Int64; var prev_kv = true }
        var create_request: Body
    }
    struct WireEvent: Decodable { var type: String?; var kv: EtcdClient.WireKV?; var prev_kv: EtcdClient.WireKV? }
    struct WireResult: Decodable {
        var header: EtcdClient.WireHeader?; var events: [WireEvent]?; var compact_revision: String?; var canceled: Bool?
    }
    struct WireMessage: Decodable { var result: WireResult? }

    private func connect() {
        let (next, index, stopped) = state.withLock { ($0.next, $0.endpoint, $0.stopped) }
        if stopped { return }
        let endpoint = client.endpoints[index % client.endpoints.count]
        let body = CreateRequest(create_request: .init(key: prefix.base64EncodedString(),
                                                       range_end: EtcdClient.prefixEnd(prefix).base64EncodedString(),
                                                       start_revision: next))
        do {
            var request = try HTTPClient.Request(url: endpoint + "/v3/watch", method: .POST, body: .data(try JSONEncoder().encode(body)))
            request.headers.add(name: "Content-Type", value: "application/json")
            try client.authorize(&request.headers)
            let delegate = LineDelegate { [weak self] line in self?.received(line) }
            let task = client.http.execute(request: request, delegate: delegate)
            state.withLock { $0.task = task }
            task.futureResult.whenComplete { [weak self] _ in self?.reconnect() }
        } catch {
            reconnect()
        }
    }

    /// The stream ended: try the next endpoint after a pause.
    private func reconnect() {
        let stopped = state.withLock { s -> Bool in s.endpoint += 1; return s.stopped }
        if stopped { return }
        queue.asyncAfter(deadline: .now() + 0.5) { [weak self] in self?.connect() }
    }

    private func received(_ line: Data) {
        guard let m = try? JSONDecoder().decode(WireMessage.self, from: line), let r = m.result else { return }
        if let c = r.compact_revision.flatMap(Int64.init), c > 0 {
            // Changes up to `c` are gone: resume from there (the kernel's short timeouts cover the gap).
            Log.warning("etcd watch fell behind compaction (revision \(c)); resuming from there")
            state.withLock { $0.next = c }
            return
        }
        guard let events = r.events, !events.isEmpty else { return }
        let decoded = events.compactMap { e in
            e.kv.map { EtcdEvent(isDelete: e.type == "DELETE", kv: EtcdClient.decode($0), prev: e.prev_kv.map(EtcdClient.decode)) }
        }
        if let last = decoded.map(\.kv.modRevision).max() { state.withLock { $0.next = max($0.next, last + 1) } }
        queue.async { [handler] in handler(decoded) }
    }
}

/// Collects a streamed body and hands it over line by line.
final class LineDelegate: HTTPClientResponseDelegate, @unchecked Sendable {
    typealias Response = Void
    private var pending = Data()
    let onLine: (Data) -> Void
    init(onLine: @escaping (Data) -> Void) { self.onLine = onLine }

    func didReceiveBodyPart(task: HTTPClient.Task<Void>, _ buffer: ByteBuffer) -> EventLoopFuture<Void> {
        pending.append(contentsOf: buffer.readableBytesView)
        while let i = pending.firstIndex(of: UInt8(ascii: "\n")) {
            onLine(pending[pending.startIndex..<i])
            pending.removeSubrange(pending.startIndex...i)
        }
        return task.eventLoop.makeSucceededVoidFuture()
    }

    func didFinishRequest(task: HTTPClient.Task<Void>) throws {
        if !pending.isEmpty { onLine(pending) }
    }
}
