import Foundation
import ModelFSNode
import ModelFS
import ModelFSCore
import ModelFSPeer
import ModelFSWire
import ModelFSStore

/// What `modelfs status` shows for one mount (single node). `--json` prints this structure.
struct MountStatus: Codable {
    var mountpoint: String
    var dataDir: String
    var meta: String
    var pid: Int32
    var files: UInt64
    var directories: UInt64
    var symlinks: UInt64
    var logicalBytes: UInt64
    var storedBytes: UInt64
    var blocks: UInt64
    /// logicalBytes / storedBytes (1 when nothing is stored).
    var dedupRatio: Double
    /// Bytes the data directory takes on disk (blocks, metadata, logs).
    var dataDirBytes: UInt64
    var openHandles: Int
    var cacheBytes: Int
    var cacheHits: UInt64
    var cacheMisses: UInt64
    /// Bytes written to the block store since the daemon started (write amplification).
    var blockBytesWritten: UInt64
    /// Written bytes that streamed straight into blocks / were staged out of order / staged
    /// bytes later streamed, since the daemon started.
    var streamedBytes: UInt64
    var stagedBytes: UInt64
    var stagedAbsorbedBytes: UInt64
    /// Bytes copy_file_range copied by sharing blocks (absent from an older daemon).
    var clonedBytes: UInt64?
    /// Small reads answered from the 8 KiB pieces they touch, each checked by its CRC32C,
    /// instead of the whole block (absent from an older daemon).
    var pieceReads: BlockReader.PieceStats?
    /// A cluster node's view: nodes, replication, cache (absent on a single node).
    var cluster: ClusterStatus?
    /// Why the file counts could not be read now (etcd unreachable): they are the last ones read.
    var metadataError: String?
    /// This node's garbage collection: passes, manifests read, blocks removed (absent from an
    /// older daemon).
    var gc: GarbageCollector.Stats?
    /// Reads through FUSE passthrough: on, or why not (absent from an older daemon).
    var passthrough: PassthroughStatus?
    /// Storage tiers, fastest first (absent with one): blocks, bytes and free space on each.
    var tiers: [PackBlockStore.TierUsage]?
    var tiering: Tiering.Stats?
}

struct PassthroughStatus: Codable, Sendable {
    /// The kernel agreed at INIT: read-only opens may pass through to flat copies.
    var on: Bool
    /// The kernel offered passthrough (6.9 and later, built with it).
    var offered: Bool
    /// Why it is off (nil when on).
    var off: String?
    /// Read-only opens that passed through since the mount.
    var opens: UInt64
    /// READ requests the daemon answered since the mount (passthrough reads are not among them).
    var daemonReads: UInt64
    /// The flat copies (bytes, count, hits, misses, built, evicted, failed) and their budget.
    var flat: FlatCopies.Stats
    var flatBudget: UInt64
}

/// Waits until the given inodes (all, if nil) are replicated, reporting progress; false on timeout.
typealias SyncHandler = @Sendable (Set<InodeNumber>?, Double, (ReplicationStatus) -> Void) -> Bool

/// Answers one request: its words (the first is the command), and a way to send a JSON line.
typealias ControlHandler = @Sendable ([Substring], (any Encodable) -> Void) throws -> Void

/// A Unix socket the daemon answers on, one request line per connection:
///   "status"                  → one JSON line (MountStatus)
///   "sync TIMEOUT [INO,...]"  → JSON progress lines (ReplicationStatus) at least once a second,
///                               then {"done":true|false}; without inodes, everything pending
///   other commands            → the handler registered for the first word (`handlers`): JSON
///                               lines; a failure is one {"error": "..."} line
final class ControlServer: @unchecked Sendable {
    let path: String
    let status: @Sendable () throws -> MountStatus
    let sync: SyncHandler?
    let handlers: [String: ControlHandler]
    private var fd: Int32 = -1

    init(path: String, status: @escaping @Sendable () throws -> MountStatus, sync: SyncHandler? = nil,
         handlers: [String: ControlHandler] = [:]) {
        self.path = path
        self.status = status
        self.sync = sync
        self.handlers = handlers
    }

    func start() throws {
        unlink(path)
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw posixError("socket", path) }
        var addr = ControlServer.address(path)
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard r == 0, listen(fd, 16) == 0 else { throw posixError("bind", path) }
        chmod(path, 0o600)
        let listener = fd
        Thread.detachNewThread { [self] in
            while true {
                let c = accept(listener, nil, nil)
                if c < 0 { if errno == EINTR { continue }; return }
                Thread.detachNewThread { self.serve(c) }
            }
        }
    }

    private func serve(_ c: Int32) {
        defer { close(c) }
        var line = Data()
        var buf = [UInt8](repeating: 0, count: 65536)
        while !line.contains(UInt8(ascii: "\n")) && line.count < 64 << 20 {
            let n = read(c, &buf, buf.count)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            line.append(contentsOf: buf[0..<n])
        }
        let request = String(decoding: line, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        if request.hasPrefix("sync ") {
            serveSync(c, request)
            return
        }
        let words = request.split(separator: " ")
        if let first = words.first, let handler = handlers[String(first)] {
            let encoder = JSONEncoder()
            encoder.outputFormatting = .sortedKeys
            do {
                try handler(words) { value in
                    if var d = try? encoder.encode(value) { d.append(UInt8(ascii: "\n")); Self.sendAll(c, d) }
                }
            } catch {
                let message = (error as? FSError)?.message ?? "\(error)"
                if var d = try? encoder.encode(["error": message]) { d.append(UInt8(ascii: "\n")); Self.sendAll(c, d) }
            }
            return
        }
        var reply: Data
        switch request {
        case "status":
            do { reply = try JSONEncoder().encode(status()) } catch {
                reply = (try? JSONEncoder().encode(["error": "\(error)"])) ?? Data()
            }
        default:
            reply = Data("{\"error\":\"unknown request\"}".utf8)
        }
        Self.sendAll(c, reply)
    }

    private func serveSync(_ c: Int32, _ request: String) {
        let words = request.split(separator: " ")
        guard let sync else {
            Self.sendAll(c, Data("{\"error\":\"this mount is a single node: nothing to replicate\"}\n".utf8))
            return
        }
        let timeout = words.count > 1 ? Double(words[1]) ?? 3600 : 3600
        let inodes: Set<InodeNumber>? = words.count > 2
            ? Set(words[2].split(separator: ",").compactMap { UInt64($0) }.map(InodeNumber.init)) : nil
        var last = Date.distantPast
        let ok = sync(inodes, timeout) { st in
            guard Date().timeIntervalSince(last) >= 0.5 else { return }
            last = Date()
            if var d = try? JSONEncoder().encode(st) { d.append(UInt8(ascii: "\n")); Self.sendAll(c, d) }
        }
        Self.sendAll(c, Data("{\"done\":\(ok)}\n".utf8))
    }

    /// Writes all of `reply` (MSG_NOSIGNAL: a client that went away is no SIGPIPE).
    static func sendAll(_ c: Int32, _ reply: Data) {
        reply.withUnsafeBytes { p in
            var off = 0
            while off < p.count {
                let w = Glibc.send(c, p.baseAddress! + off, p.count - off, Int32(MSG_NOSIGNAL))
                if w <= 0 { return }
                off += w
            }
        }
    }

    static func address(_ path: String) -> sockaddr_un {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            let bytes = Array(path.utf8.prefix(raw.count - 1))
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return addr
    }

    /// Client side: connects to a daemon's socket and sends one request line; returns the socket.
    private static func send(_ path: String, _ line: String) throws -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw posixError("socket", path) }
        var addr = address(path)
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard r == 0 else { close(fd); throw posixError("connect to daemon at", path) }
        sendAll(fd, Data((line + "\n").utf8))
        return fd
    }

    /// Client side: sends a request line and reads the reply lines as they come.
    static func stream(_ path: String, _ line: String, _ onLine: (Data) -> Void) throws {
        let fd = try send(path, line)
        defer { close(fd) }
        var pending = Data()
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = read(fd, &buf, buf.count)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            pending.append(contentsOf: buf[0..<n])
            while let i = pending.firstIndex(of: UInt8(ascii: "\n")) {
                onLine(pending[pending.startIndex..<i])
                pending = Data(pending[(i + 1)...])
            }
        }
        if !pending.isEmpty { onLine(pending) }
    }

    /// Client side: asks a daemon for its status.
    static func request(_ path: String, _ line: String) throws -> Data {
        let fd = try send(path, line)
        defer { close(fd) }
        var out = Data()
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = read(fd, &buf, buf.count)
            if n <= 0 { break }
            out.append(contentsOf: buf[0..<n])
        }
        return out
    }
}
