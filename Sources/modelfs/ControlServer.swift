import Foundation
import ModelFS
import ModelFSCore

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
}

/// A Unix socket the daemon answers on: one request line ("status"), one JSON reply.
final class ControlServer: @unchecked Sendable {
    let path: String
    let status: @Sendable () throws -> MountStatus
    private var fd: Int32 = -1

    init(path: String, status: @escaping @Sendable () throws -> MountStatus) {
        self.path = path
        self.status = status
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
                serve(c)
            }
        }
    }

    private func serve(_ c: Int32) {
        defer { close(c) }
        var buf = [UInt8](repeating: 0, count: 256)
        let n = read(c, &buf, buf.count)
        guard n > 0 else { return }
        let request = String(decoding: buf[0..<n], as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        var reply: Data
        switch request {
        case "status":
            do { reply = try JSONEncoder().encode(status()) } catch {
                reply = Data("{\"error\":\"\(error)\"}".utf8)
            }
        default:
            reply = Data("{\"error\":\"unknown request\"}".utf8)
        }
        reply.withUnsafeBytes { p in
            var off = 0
            while off < p.count {
                let w = write(c, p.baseAddress! + off, p.count - off)
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

    /// Client side: asks a daemon for its status.
    static func request(_ path: String, _ line: String) throws -> Data {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw posixError("socket", path) }
        defer { close(fd) }
        var addr = address(path)
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard r == 0 else { throw posixError("connect to daemon at", path) }
        _ = (line + "\n").withCString { write(fd, $0, strlen($0)) }
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
