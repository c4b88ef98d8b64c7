import Foundation
import ModelFSTestSupport
@testable import ModelFS
@testable import ModelFSCore
@testable import ModelFSMeta
@testable import ModelFSStore

/// A filesystem core over a fresh data dir (deleted by `remove()`).
final class TestFS: @unchecked Sendable {
    let dir: String
    let store: PackBlockStore
    let fs: FileSystem
    static let smallChunks = ChunkerParameters(minSize: 2 << 10, averageSize: 8 << 10, maxSize: 32 << 10)

    init(chunker: ChunkerParameters = TestFS.smallChunks, meta: String = "memory:", dir: String? = nil,
         directWrites: Bool = false, writerLock: (any WriterLock)? = nil) throws {
        self.dir = dir ?? NSTemporaryDirectory() + "modelfs-fs-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
        try FileManager.default.createDirectory(atPath: self.dir + "/staging", withIntermediateDirectories: true)
        store = try PackBlockStore(root: self.dir)
        var options = FileSystemOptions(stagingDir: self.dir + "/staging")
        options.chunker = chunker
        options.blockCacheBytes = 8 << 20
        options.directWrites = directWrites
        let url = meta == "sqlite" ? "sqlite:\(self.dir)/meta.db" : meta
        fs = try FileSystem(meta: try MetadataURL.open(url, rootUID: 0, rootGID: 0), store: store, options: options, writerLock: writerLock)
    }

    func remove() { try? FileManager.default.removeItem(atPath: dir) }

    func create(_ name: String, in parent: InodeNumber = .root, flags: Int32 = O_RDWR) throws -> (InodeNumber, FileHandleID) {
        let (a, o) = try fs.create(parent: parent, name: name, mode: 0o644, flags: OpenFlags(flags | O_CREAT), context: .root)
        return (a.ino, o.handle)
    }

    func write(_ fh: FileHandleID, at offset: UInt64, _ bytes: [UInt8]) throws {
        _ = try bytes.withUnsafeBytes { try fs.write(fh, at: offset, $0) }
    }

    func read(_ fh: FileHandleID, at offset: UInt64, count: Int) throws -> [UInt8] {
        var buf = [UInt8](repeating: 0xEE, count: count)
        let n = try buf.withUnsafeMutableBytes { try fs.read(fh, at: offset, count: count, into: $0.baseAddress!) }
        return Array(buf[0..<n])
    }

    func close(_ fh: FileHandleID) throws {
        try fs.flush(fh)
        try fs.release(fh)
    }

    func contents(_ ino: InodeNumber) throws -> [UInt8] {
        let size = try fs.getattr(ino).size
        let o = try fs.open(ino, flags: OpenFlags(O_RDONLY))
        defer { try? fs.release(o.handle) }
        return try read(o.handle, at: 0, count: Int(size))
    }
}

/// Corrupts one byte of a stored block in place (tests of verification).
func flipByte(_ store: PackBlockStore, _ id: BlockID, at index: Int) throws {
    guard let loc = store.location(of: id) else { throw FSError.noEntry("block not stored") }
    let fd = open(loc.path, O_RDWR)
    defer { close(fd) }
    var b: UInt8 = 0
    _ = pread(fd, &b, 1, off_t(loc.offset) + off_t(index))
    b ^= 1
    _ = pwrite(fd, &b, 1, off_t(loc.offset) + off_t(index))
}
