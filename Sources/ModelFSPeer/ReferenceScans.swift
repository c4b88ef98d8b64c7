import Foundation
import Synchronization
import ModelFS
import ModelFSCore
import ModelFSMeta

/// One read of the namespace per cluster for garbage collection (issue #26). A delete or an
/// overwrite makes every node that holds the old version's blocks run a pass, and each pass must
/// learn whether some other file still references its suspects; for blocks that are garbage,
/// that is every manifest. At 1,000,000 files the holders' passes read the whole namespace at
/// once (R of them per delete), and close() on every node waited behind them on etcd (p99
/// 1.4 s against 81 ms). Now one node scans for all of them:
///
/// - The scanner is the node holding `g/scanner` under its lease (if it dies, another takes the
///   key once the lease lapses, and answers the asks still standing).
/// - A pass that wants an answer writes its candidates to `g/ask/NODE` (under its own lease, so a
///   node that dies leaves no ask behind) and waits for `g/answer/NODE` with the same sequence.
/// - The scanner looks for asks when the namespace watch shows one (`observe`), and every `poll`
///   seconds (one keys-only range) in case the watch missed it; it waits `gather` seconds for
///   the asks of the other holders of the same blocks (they hear of the delete from the same
///   watch, so their passes come within a second or so of each other), reads them all,
///   pages through the manifests once for the union of their candidates (at `scanRate`
///   manifests a second, pausing 3× each page's read time, stopping once all are found), and
///   puts each asker's answer (its candidates that a manifest references) under the asker's
///   lease. Asks that come during a scan are answered by the next, which waits as long as the
///   last one took (reading the namespace takes at most half the scanner's time).
///
/// Why it is as safe as a node's own scan: the asker takes its open sessions' blocks and its
/// candidates before it writes the ask, the scanner reads the ask before it reads any manifest
/// page, and etcd's reads are linearizable, so every page is read after the pass began, which is
/// all the collector's argument needs (GarbageCollector).
///
/// An asker scans for itself when there is no scanner (no `g/scanner` key for `orphaned`
/// seconds), when it has more candidates than `limit`, when it lost its lease meanwhile, or
/// when no answer came in `patience` seconds (a scan of 10^6 manifests, paced, takes minutes).
public final class ReferenceScans: ReferenceScanner, @unchecked Sendable {
    let etcd: EtcdClient
    let keys: EtcdKeys
    let membership: Membership
    let fs: FileSystem
    let scanRate: UInt64
    public let limit: Int
    /// How often the scanner looks for asks, and an asker for its answer, when the watch does not
    /// tell them sooner.
    let poll: Double
    /// Seconds with no scanner after which an asker reads the manifests itself.
    let orphaned: Double
    /// Seconds the scanner waits after a new ask for the others that come with it.
    let gather: Double
    /// Seconds an asker waits for its answer at most.
    let patience: Double
    private let loop = BackgroundLoop("modelfs-gc-scans")
    /// Signalled when the watch shows an answer to this node.
    private let answerCame = DispatchSemaphore(value: 0)

    /// What this node did as the scanner (status).
    public struct Status: Sendable, Codable, Equatable {
        /// This node holds `g/scanner`.
        public var scanner = false
        public var scans = 0
        public var manifestsRead: UInt64 = 0
        public var asksAnswered = 0
        public var lastScanSeconds = 0.0
        /// Seconds its scans waited for writers, over all scans (`FileSystem.scanReferences`;
        /// absent from an older node's status).
        public var yieldedSeconds: Double?
        /// Asks this node made, and those it answered itself after all (no scanner, too many
        /// candidates, its lease lost).
        public var asked = 0
        public var scannedHere = 0
        public var lastError: String?
        public init() {}
    }
    private struct State {
        var status = Status()
        /// Ask keys answered, by the revision they were written at.
        var answered: [Data: Int64] = [:]
        var spacedUntil = Date.distantPast
    }
    private let state = Mutex(State())

    public init(etcd: EtcdClient, keys: EtcdKeys, membership: Membership, fs: FileSystem, scanRate: UInt64,
                limit: Int = 20_000, poll: Double = 5, orphaned: Double = 30, gather: Double = 3,
                patience: Double = 3600) {
        self.etcd = etcd
        self.keys = keys
        self.membership = membership
        self.fs = fs
        self.scanRate = scanRate
        self.limit = limit
        self.poll = poll
        self.orphaned = orphaned
        self.gather = gather
        self.patience = patience
    }

    public func start() { loop.start { [weak self] in self?.round() ?? 1 } }
    public func stop() { loop.stop() }
    public var status: Status { state.withLock { $0.status } }

    /// A change the namespace watch saw outside the namespace: an ask wakes the scanner, an
    /// answer to this node its waiting pass.
    public func observe(_ event: EtcdEvent) {
        guard !event.isDelete else { return }
        if event.kv.key.starts(with: keys.gcAsks) { loop.poke() }
        if event.kv.key == keys.gcAnswer(membership.me.id) { answerCame.signal() }
    }

    // MARK: Asking

    /// An ask's value: sequence (8 bytes LE), the asker's lease (8 bytes LE), then the candidates'
    /// 32-byte ids. An answer's: the sequence, then the referenced ids.
    static func encode(sequence: UInt64, lease: Int64?, ids: some Collection<BlockID>) -> Data {
        var out = Data(capacity: 16 + ids.count * 32)
        withUnsafeBytes(of: sequence.littleEndian) { out.append(contentsOf: $0) }
        if let lease { withUnsafeBytes(of: lease.littleEndian) { out.append(contentsOf: $0) } }
        for id in ids { out.append(contentsOf: id.bytes) }
        return out
    }

    static func decode(_ data: Data, withLease: Bool) -> (sequence: UInt64, lease: Int64, ids: [BlockID])? {
        let head = withLease ? 16 : 8
        guard data.count >= head, (data.count - head) % 32 == 0 else { return nil }
        let bytes = [UInt8](data)
        func word(_ at: Int) -> UInt64 { (0..<8).reduce(UInt64(0)) { $0 | UInt64(bytes[at + $1]) << (8 * UInt64($1)) } }
        var ids: [BlockID] = []
        ids.reserveCapacity((bytes.count - head) / 32)
        var at = head
        while at < bytes.count {
            guard let id = BlockID(bytes: bytes[at..<(at + 32)]) else { return nil }
            ids.append(id)
            at += 32
        }
        return (word(0), withLease ? Int64(bitPattern: word(8)) : 0, ids)
    }

    public func referenced(_ candidates: Set<BlockID>, stop: @escaping @Sendable () -> Bool) throws -> Set<BlockID>? {
        guard candidates.count <= limit else { return nil }
        let me = membership.me.id
        let askKey = keys.gcAsk(me), answerKey = keys.gcAnswer(me)
        let sequence = UInt64(Date().timeIntervalSince1970 * 1e9)
        var lease = membership.lease
        guard lease != 0 else { return nil }
        state.withLock { $0.status.asked += 1 }
        try etcd.put(askKey, Self.encode(sequence: sequence, lease: lease, ids: candidates), lease: lease)
        defer { _ = try? etcd.txn(compare: [], success: [.delete(askKey), .delete(answerKey)]) }
        loop.poke()   // this node may be the scanner
        let began = Date()
        var scannerSeen = began
        var checked = Date.distantPast
        var looked = Date.distantPast
        while true {
            // Short waits, so a stop is seen at once; etcd asked when the watch shows an answer,
            // or every `poll` seconds.
            let shown = answerCame.wait(timeout: .now() + 0.25) == .success
            if stop() { throw FSError.io("garbage collection is stopping") }
            guard shown || Date().timeIntervalSince(looked) >= poll else { continue }
            looked = Date()
            if let kv = try etcd.range(answerKey).kvs.first, let a = Self.decode(kv.value, withLease: false), a.sequence == sequence {
                return Set(a.ids)
            }
            // The ask went with a lease that lapsed: ask again under the new one.
            let now = membership.lease
            if now != lease {
                guard now != 0 else { return scanHere() }
                lease = now
                try etcd.put(askKey, Self.encode(sequence: sequence, lease: lease, ids: candidates), lease: lease)
            }
            if Date().timeIntervalSince(began) >= patience { return scanHere() }
            if Date().timeIntervalSince(checked) >= 5 {
                checked = Date()
                if try etcd.range(keys.gcScanner).kvs.isEmpty {
                    if Date().timeIntervalSince(scannerSeen) >= orphaned { return scanHere() }
                } else {
                    scannerSeen = Date()
                }
            }
        }
    }

    private func scanHere() -> Set<BlockID>? {
        state.withLock { $0.status.scannedHere += 1 }
        return nil
    }

    // MARK: Scanning

    /// One turn: keep (or take) the scanner key; answer the asks that came since the last scan.
    private func round() -> Double {
        guard isScanner() else { return 2 * poll }
        let spaced = state.withLock { $0.spacedUntil }.timeIntervalSinceNow
        if spaced > 0 { return min(poll, spaced) }
        do {
            let asks = try etcd.rangeAll(prefix: keys.gcAsks, keysOnly: true).kvs
            let fresh = state.withLock { s -> [EtcdKV] in
                s.answered = s.answered.filter { k, _ in asks.contains { $0.key == k } }
                return asks.filter { s.answered[$0.key] != $0.modRevision }
            }
            guard !fresh.isEmpty else { return poll }
            // Not `loop.sleep`: the asks' own pokes would end it.
            let until = Date().addingTimeInterval(gather)
            while Date() < until { if loop.isStopped { return poll }; usleep(50_000) }
            try answer()
        } catch {
            state.withLock { $0.status.lastError = "\(error)" }
            _ = Log.every("gc scans", 60, .warning, "garbage collection's scanner: \(error)")
        }
        return poll
    }

    /// Reads every ask standing now, scans once for all of them, and answers each.
    private func answer() throws {
        let kvs = try etcd.rangeAll(prefix: keys.gcAsks).kvs
        let asks = kvs.compactMap { kv -> (kv: EtcdKV, sequence: UInt64, lease: Int64, ids: [BlockID])? in
            guard let a = Self.decode(kv.value, withLease: true) else {
                Log.warning("garbage collection's scanner: the ask \(String(decoding: kv.key, as: UTF8.self)) is malformed (\(kv.value.count) bytes); not answered")
                return nil
            }
            return (kv, a.sequence, a.lease, a.ids)
        }
        guard !asks.isEmpty else {
            state.withLock { s in for kv in kvs { s.answered[kv.key] = kv.modRevision } }
            return
        }
        let wanted = asks.reduce(into: Set<BlockID>()) { $0.formUnion($1.ids) }
        let began = Date()
        let scan = try fs.scanReferences(wanted, rate: scanRate, pause: scanRate > 0 ? GarbageCollector.pauseFactor : 0,
                                         stop: { [loop] in loop.isStopped })
        var answered = 0
        for a in asks {
            let node = a.kv.key.dropFirst(keys.gcAsks.count)
            let referenced = a.ids.filter(scan.referenced.contains)
            // Under the asker's lease: an answer to a node that died goes with it. A lease gone
            // (the put fails) is an ask nobody waits for.
            if (try? etcd.put(keys.gcAnswers + node, Self.encode(sequence: a.sequence, lease: nil, ids: referenced), lease: a.lease)) != nil {
                answered += 1
            }
        }
        let seconds = Date().timeIntervalSince(began)
        state.withLock { s in
            // Malformed ones too: looked at once, not again every round.
            for kv in kvs { s.answered[kv.key] = kv.modRevision }
            s.status.scans += 1
            s.status.manifestsRead += UInt64(scan.manifests)
            s.status.asksAnswered += answered
            s.status.lastScanSeconds = seconds
            s.status.yieldedSeconds = (s.status.yieldedSeconds ?? 0) + scan.yielded
            s.status.lastError = nil
            if scan.manifests > 0 { s.spacedUntil = Date().addingTimeInterval(seconds) }
        }
        Log.info("garbage collection's scanner: \(asks.count) asks, \(wanted.count) candidates, \(scan.referenced.count) referenced, \(scan.manifests) manifests read in \(String(format: "%.2f", seconds)) s")
    }

    /// Takes or keeps the scanner key (under this node's lease).
    func isScanner() -> Bool {
        let mine = membership.holds(keys.gcScanner)
        state.withLock { $0.status.scanner = mine }
        return mine
    }
}
