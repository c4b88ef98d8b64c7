import Foundation
import Testing
@testable import ModelFSCore
@testable import ModelFSStore

func temporaryDirectory(_ prefix: String = "modelfs-test") -> String {
    let path = NSTemporaryDirectory() + "\(prefix)-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
    try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}

@Suite struct DiskBlockStoreTests {
    @Test func putReadAndDedup() throws {
        let dir = temporaryDirectory(); defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try DiskBlockStore(root: dir)
        let bytes = randomBytes(300_000, seed: 9)
        let id = bytes.withUnsafeBytes { BlockID.hash($0) }
        #expect(try bytes.withUnsafeBytes { try store.put(id, $0) })
        #expect(try !bytes.withUnsafeBytes { try store.put(id, $0) }, "second put of the same content is a dedup hit")
        let back = try store.read(id)
        #expect(Array(back.bytes) == bytes)
        #expect(store.usage().blocks == 1 && store.usage().bytes == 300_000 && store.usage().dedupHits == 1)
        // A reopened store counts what is on disk.
        #expect(try DiskBlockStore(root: dir).usage().blocks == 1)
    }

    @Test func corruptBlockIsEIONeverWrongBytes() throws {
        let dir = temporaryDirectory(); defer { try? FileManager.default.removeItem(atPath: dir) }
        let logged = LogSink()
        let store = try DiskBlockStore(root: dir) { logged.append($0) }
        let bytes = randomBytes(4096, seed: 10)
        let id = bytes.withUnsafeBytes { BlockID.hash($0) }
        try bytes.withUnsafeBytes { _ = try store.put(id, $0) }
        // Flip one bit in the file on disk.
        let path = store.path(of: id)
        var onDisk = [UInt8](FileManager.default.contents(atPath: path)!)
        onDisk[1234] ^= 0x10
        try Data(onDisk).write(to: URL(fileURLWithPath: path))
        let error = #expect(throws: FSError.self) { try store.read(id) }
        #expect(error?.errno == EIO)
        #expect(logged.lines.contains { $0.contains(id.hex) && $0.contains("corrupt") })
    }

    @Test func missingBlockIsEIO() throws {
        let dir = temporaryDirectory(); defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try DiskBlockStore(root: dir)
        let error = #expect(throws: FSError.self) { try store.read(BlockID.hash(Data("absent".utf8))) }
        #expect(error?.errno == EIO)
    }

    @Test func staleRemovalSparesFreshBlocks() throws {
        let dir = temporaryDirectory(); defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try DiskBlockStore(root: dir)
        let bytes = randomBytes(1000, seed: 11)
        let id = bytes.withUnsafeBytes { BlockID.hash($0) }
        try bytes.withUnsafeBytes { _ = try store.put(id, $0) }
        let past = Timestamp(totalNanoseconds: Timestamp.now().totalNanoseconds - 60_000_000_000)
        #expect(store.removeIfStale(id, cutoff: past) == 0, "a block written after the cutoff stays")
        let future = Timestamp(totalNanoseconds: Timestamp.now().totalNanoseconds + 60_000_000_000)
        #expect(store.removeIfStale(id, cutoff: future) == 1000)
        #expect(!store.contains(id) && store.usage().blocks == 0)
    }

    @Test func strayTemporaryFilesAreRemovedAtStart() throws {
        let dir = temporaryDirectory(); defer { try? FileManager.default.removeItem(atPath: dir) }
        _ = try DiskBlockStore(root: dir)
        FileManager.default.createFile(atPath: dir + "/tmp/leftover", contents: Data("x".utf8))
        _ = try DiskBlockStore(root: dir)
        #expect(!FileManager.default.fileExists(atPath: dir + "/tmp/leftover"))
    }
}

final class LogSink: @unchecked Sendable {
    private let lock = NSLock()
    private var _lines: [String] = []
    func append(_ s: String) { lock.lock(); _lines.append(s); lock.unlock() }
    var lines: [String] { lock.lock(); defer { lock.unlock() }; return _lines }
}
