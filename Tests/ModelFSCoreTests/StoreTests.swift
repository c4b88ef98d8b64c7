import Foundation
import Testing
import ModelFSTestSupport
@testable import ModelFSCore
@testable import ModelFSStore

func temporaryDirectory(_ prefix: String = "modelfs-test") -> String {
    let path = NSTemporaryDirectory() + "\(prefix)-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
    try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}

func storeBlock(_ store: PackBlockStore, _ bytes: [UInt8]) throws -> BlockID {
    let id = bytes.withUnsafeBytes { BlockID.hash($0) }
    try bytes.withUnsafeBytes { _ = try store.put(id, $0) }
    return id
}

@Suite struct PackBlockStoreTests {
    @Test func putReadDedupAndReopen() throws {
        let dir = temporaryDirectory(); defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try PackBlockStore(root: dir)
        let bytes = randomBytes(300_000, seed: 9)
        let id = bytes.withUnsafeBytes { BlockID.hash($0) }
        #expect(try bytes.withUnsafeBytes { try store.put(id, $0) })
        #expect(try !bytes.withUnsafeBytes { try store.put(id, $0) }, "second put of the same content is a dedup hit")
        #expect(Array(try store.read(id).data) == bytes)
        #expect(store.usage().blocks == 1 && store.usage().bytes == 300_000 && store.usage().dedupHits == 1)
        // A reopened store rebuilds its index from the packs.
        let again = try PackBlockStore(root: dir)
        #expect(again.usage().blocks == 1)
        #expect(Array(try again.read(id).data) == bytes)
    }

    @Test func rollsOverToNewPacks() throws {
        let dir = temporaryDirectory(); defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try PackBlockStore(root: dir, packLimit: 100_000)
        var ids: [BlockID] = []
        for i in 0..<10 { ids.append(try storeBlock(store, randomBytes(30_000, seed: UInt64(100 + i)))) }
        let packs = try FileManager.default.contentsOfDirectory(atPath: dir + "/packs").filter { $0.hasSuffix(".pack") }
        #expect(packs.count >= 3)
        let again = try PackBlockStore(root: dir, packLimit: 100_000)
        for (i, id) in ids.enumerated() { #expect(Array(try again.read(id).data) == randomBytes(30_000, seed: UInt64(100 + i))) }
    }

    @Test func corruptBlockIsEIONeverWrongBytes() throws {
        let dir = temporaryDirectory(); defer { try? FileManager.default.removeItem(atPath: dir) }
        let logged = LogSink()
        let store = try PackBlockStore(root: dir) { logged.append($0) }
        let other = try storeBlock(store, randomBytes(5000, seed: 1))
        let id = try storeBlock(store, randomBytes(4096, seed: 10))
        let loc = try #require(store.location(of: id))
        let fd = open(loc.path, O_RDWR)
        var b: UInt8 = 0
        pread(fd, &b, 1, off_t(loc.offset) + 1234); b ^= 0x10; pwrite(fd, &b, 1, off_t(loc.offset) + 1234)
        close(fd)
        let error = #expect(throws: FSError.self) { try store.read(id) }
        #expect(error?.errno == EIO)
        #expect(logged.lines.contains { $0.contains(id.hex) && $0.contains("corrupt") })
        #expect(Array(try store.read(other).data) == randomBytes(5000, seed: 1), "neighbours are unaffected")
    }

    @Test func missingBlockIsEIO() throws {
        let dir = temporaryDirectory(); defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try PackBlockStore(root: dir)
        let error = #expect(throws: FSError.self) { try store.read(BlockID.hash(Data("absent".utf8))) }
        #expect(error?.errno == EIO)
    }

    @Test func tornTailIsCutOffAtStart() throws {
        let dir = temporaryDirectory(); defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try PackBlockStore(root: dir)
        let keep = try storeBlock(store, randomBytes(10_000, seed: 2))
        let torn = try storeBlock(store, randomBytes(10_000, seed: 3))
        let loc = try #require(store.location(of: torn))
        // A crash in the middle of appending the second record.
        truncate(loc.path, off_t(loc.offset) + 5000)
        let again = try PackBlockStore(root: dir)
        #expect(again.contains(keep) && !again.contains(torn))
        let size = try FileManager.default.attributesOfItem(atPath: loc.path)[.size] as? UInt64
        #expect(size == UInt64(40 + 10_000))
        // Appending continues after the last whole record.
        let next = try storeBlock(again, randomBytes(777, seed: 4))
        #expect(Array(try PackBlockStore(root: dir).read(next).data) == randomBytes(777, seed: 4))
    }

    @Test func staleRemovalSparesTouchedBlocksAndReclaimReturnsSpace() throws {
        let dir = temporaryDirectory(); defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try PackBlockStore(root: dir, packLimit: 50_000)
        let keep = try storeBlock(store, randomBytes(20_000, seed: 5))
        var dead: [BlockID] = []
        for i in 0..<6 { dead.append(try storeBlock(store, randomBytes(20_000, seed: UInt64(20 + i)))) }
        let past = Timestamp(totalNanoseconds: Timestamp.now().totalNanoseconds - 60_000_000_000)
        #expect(store.removeIfStale(dead[0], cutoff: past) == 0, "a block touched after the cutoff stays")
        let future = Timestamp(totalNanoseconds: Timestamp.now().totalNanoseconds + 60_000_000_000)
        for id in dead { #expect(store.removeIfStale(id, cutoff: future) == 20_000) }
        let before = store.packBytes
        let freed = try store.reclaim()
        #expect(freed >= 6 * 12_288 && store.packBytes < before, "freed \(freed), pack bytes \(before) → \(store.packBytes)")
        // Dead records stay dead after a restart (their headers say so), the live one is intact.
        let again = try PackBlockStore(root: dir, packLimit: 50_000)
        #expect(again.usage().blocks == 1)
        for id in dead { #expect(!again.contains(id)) }
        #expect(Array(try store.read(keep).data) == randomBytes(20_000, seed: 5))
        #expect(Array(try PackBlockStore(root: dir, packLimit: 50_000).read(keep).data) == randomBytes(20_000, seed: 5))
        for id in dead { #expect(!store.contains(id)) }
    }

    @Test func aSealedPackWithNothingLiveIsDeletedWhole() throws {
        let dir = temporaryDirectory(); defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try PackBlockStore(root: dir, packLimit: 50_000)
        // Three 20 kB records fill the first pack (it is sealed), the fourth starts the next.
        var gone: [BlockID] = []
        for i in 0..<3 { gone.append(try storeBlock(store, randomBytes(20_000, seed: UInt64(40 + i)))) }
        let keep = try storeBlock(store, randomBytes(20_000, seed: 50))
        let sealed = try #require(store.location(of: gone[0])).path
        #expect(try #require(store.location(of: keep)).path != sealed)
        var st = stat()
        #expect(stat(sealed, &st) == 0)
        let allocated = UInt64(st.st_blocks) * 512
        let future = Timestamp(totalNanoseconds: Timestamp.now().totalNanoseconds + 60_000_000_000)
        for id in gone { #expect(store.removeIfStale(id, cutoff: future) == 20_000) }
        // All of the pack's space comes back (headers and partial pages too), by deleting it.
        #expect(try store.reclaim() == allocated)
        #expect(!FileManager.default.fileExists(atPath: sealed))
        let again = try PackBlockStore(root: dir, packLimit: 50_000)
        #expect(again.usage().blocks == 1)
        #expect(Array(try again.read(keep).data) == randomBytes(20_000, seed: 50))
    }
}

final class LogSink: @unchecked Sendable {
    private let lock = NSLock()
    private var _lines: [String] = []
    func append(_ s: String) { lock.lock(); _lines.append(s); lock.unlock() }
    var lines: [String] { lock.lock(); defer { lock.unlock() }; return _lines }
}
