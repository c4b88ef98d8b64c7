import Foundation
import ModelFSTestSupport
import Synchronization
import Testing
@testable import ModelFS
@testable import ModelFSCore

@Suite struct FlatCopiesTests {
    let dir = NSTemporaryDirectory() + "flat-\(UUID().uuidString)"

    /// A build that writes `size` bytes of `byte`.
    func filler(_ byte: UInt8, _ size: Int) -> @Sendable (Int32) throws -> Void {
        { fd in
            let bytes = [UInt8](repeating: byte, count: size)
            guard bytes.withUnsafeBytes({ write(fd, $0.baseAddress, size) }) == size else { throw FSError.io("write") }
        }
    }

    /// Takes `key` until its copy is in place (the first take asks for it).
    func made(_ flat: FlatCopies, _ key: String, _ byte: UInt8, size: Int) -> String? {
        var path: String?
        _ = waitUntil(timeout: 10) {
            path = flat.take(key, size: UInt64(size), build: filler(byte, size))
            return path != nil
        }
        return path
    }

    @Test func copiesAreBuiltOnceEvictedLeastRecentlyUsedAndNeverWhilePinned() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let flat = try FlatCopies(directory: dir, budget: 10_000, minimumSize: 100)
        #expect(flat.take("a", size: 4000, build: filler(1, 4000)) == nil)   // a miss asks for it
        let a = try #require(made(flat, "a", 1, size: 4000))
        #expect(FileManager.default.contents(atPath: a) == Data(repeating: 1, count: 4000))
        #expect(flat.stats.built == 1 && flat.stats.bytes == 4000)
        // "a" is pinned twice now (two hits); "b" fits beside it, "c" needs room: "b" goes, not "a".
        let b = try #require(made(flat, "b", 2, size: 4000))
        flat.unpin("b")
        _ = try #require(made(flat, "c", 3, size: 4000))
        #expect(FileManager.default.fileExists(atPath: a))
        #expect(!FileManager.default.fileExists(atPath: b))
        #expect(flat.stats.evicted == 1 && flat.stats.bytes <= 10_000)
        // Unpinned, "a" is the least recently used: the next copy evicts it.
        for _ in 0..<flat.stats.hits { flat.unpin("a"); flat.unpin("c") }
        _ = try #require(made(flat, "d", 4, size: 4000))
        #expect(!FileManager.default.fileExists(atPath: a))
        // Too large (over half the budget) or too small: never copied.
        #expect(flat.take("big", size: 6000, build: filler(5, 6000)) == nil)
        #expect(flat.take("tiny", size: 10, build: filler(6, 10)) == nil)
        #expect(!waitUntil(timeout: 0.3) { FileManager.default.fileExists(atPath: flat.path("big")) || FileManager.default.fileExists(atPath: flat.path("tiny")) })
    }

    /// A failed build leaves nothing; a half-built `.tmp-` file never survives a start; copies
    /// survive a clean end (`close`: synced, marked) and are dropped after an unclean one (their
    /// pages, written without a sync, may never have reached the disk).
    @Test func aFailedBuildLeavesNothingAndCopiesOutliveOnlyACleanEnd() throws {
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var flat = try FlatCopies(directory: dir, budget: 1 << 20, minimumSize: 1)
        #expect(flat.take("k", size: 100, build: { fd in _ = write(fd, "part", 4); throw FSError.io("a corrupt block") }) == nil)
        #expect(waitUntil(timeout: 10) { flat.stats.failed == 1 })
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir).isEmpty)
        FileManager.default.createFile(atPath: dir + "/.tmp-x", contents: Data("half".utf8))
        _ = try #require(made(flat, "kept", 7, size: 100))
        flat.close()
        #expect(flat.take("late", size: 100, build: filler(8, 100)) == nil)
        #expect(!waitUntil(timeout: 0.3) { FileManager.default.fileExists(atPath: flat.path("late")) }, "no copy is made after close")
        flat = try FlatCopies(directory: dir, budget: 1 << 20, minimumSize: 1)
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir) == ["kept"], "the marker goes at start, .tmp- files too")
        #expect(flat.stats.copies == 1 && flat.stats.bytes == 100)
        #expect(flat.take("kept", size: 100, build: filler(0, 100)) == flat.path("kept"))
        // No close this time (a crash): the next start drops the copy.
        flat = try FlatCopies(directory: dir, budget: 1 << 20, minimumSize: 1)
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir).isEmpty)
        #expect(flat.stats.copies == 0)
    }

    /// A build waits while the daemon serves reads fast (a reader it would slow down), goes on
    /// once they stop, does not wait for an occasional read, and stops waiting when told to stop.
    @Test func aBuildYieldsToReadsTheDaemonServes() {
        final class Reads: Sendable { let count = Atomic<UInt64>(0); let done = Atomic<Bool>(false) }
        let r = Reads()
        let reader = Thread {
            for _ in 0..<1_500 { r.count.add(1, ordering: .relaxed); usleep(200) }   // thousands of reads/s
            r.done.store(true, ordering: .sequentiallyConsistent)
        }
        var pace = FlatBuildPace()
        pace.yield(reads: { r.count.load(ordering: .relaxed) }, stop: { false })   // the first look
        reader.start()
        usleep(60_000)
        pace.yield(reads: { r.count.load(ordering: .relaxed) }, stop: { false })
        let readerDone = r.done.load(ordering: .sequentiallyConsistent)
        #expect(readerDone, "the build went on while the reader read")
        // An occasional read (a poll) is not a reader to wait for.
        var quiet = FlatBuildPace(), n: UInt64 = 0
        quiet.yield(reads: { n }, stop: { false })
        for _ in 0..<3 {
            usleep(60_000)
            n += 1
            quiet.yield(reads: { n }, stop: { false })
        }
        // A stop ends the wait at once, however busy the reads.
        var stopped = FlatBuildPace(), m: UInt64 = 0
        stopped.yield(reads: { m }, stop: { false })
        usleep(60_000)
        m += 1_000_000
        stopped.yield(reads: { m }, stop: { true })
    }

    @Test func theKeyNamesTheContent() {
        let x = BlockID.hash(Data("x".utf8)), y = BlockID.hash(Data("y".utf8))
        let m1 = Manifest(chunks: [ChunkRef(id: x, length: 1), ChunkRef(id: y, length: 1)])
        let m2 = Manifest(chunks: [ChunkRef(id: y, length: 1), ChunkRef(id: x, length: 1)])
        #expect(FlatCopies.key(m1, size: 2) == FlatCopies.key(Manifest(chunks: m1.chunks), size: 2))
        #expect(FlatCopies.key(m1, size: 2) != FlatCopies.key(m2, size: 2))
        #expect(FlatCopies.key(m1, size: 2) != FlatCopies.key(m1, size: 3))
    }
}
