import Foundation
import ModelFSTestSupport
import Synchronization
import Testing
@testable import ModelFS
@testable import ModelFSCore
@testable import ModelFSStore
@testable import ModelFSMeta

@Suite struct WritePathTests {
    @Test func sequentialWriteIsChunkedAsItArrivesAndWrittenOnce() throws {
        let t = try TestFS(chunker: .standard); defer { t.remove() }
        let (ino, fh) = try t.create("seq.bin")
        let data = randomBytes(24 << 20, seed: 1)
        var off = 0
        while off < data.count {
            let n = min(1 << 20, data.count - off)
            try t.write(fh, at: UInt64(off), Array(data[off..<off + n]))
            off += n
        }
        // Before close, everything but the unfinished chunk is already in the store.
        #expect(t.store.usage().bytesWritten >= UInt64(data.count) - (4 << 20))
        try t.close(fh)
        #expect(try t.contents(ino) == data)
        let amplification = Double(t.store.usage().bytesWritten) / Double(data.count)
        #expect(amplification <= 1.1, "write amplification \(amplification)")
    }

    @Test func reorderedWritesStillStream() throws {
        let t = try TestFS(chunker: .standard); defer { t.remove() }
        let (ino, fh) = try t.create("reordered.bin")
        let data = randomBytes(16 << 20, seed: 2)
        // The kernel's writeback may deliver 1 MiB requests slightly out of order.
        var order = Array(0..<16)
        for i in stride(from: 0, to: 16, by: 4) { order.swapAt(i, i + 2); order.swapAt(i + 1, i + 3) }
        for i in order { try t.write(fh, at: UInt64(i << 20), Array(data[(i << 20)..<((i + 1) << 20)])) }
        try t.close(fh)
        #expect(try t.contents(ino) == data)
        #expect(Double(t.store.usage().bytesWritten) / Double(data.count) <= 1.1)
    }

    @Test func aWriteFarAheadIsStagedAndTheStreamCatchesUp() throws {
        let t = try TestFS(chunker: .standard); defer { t.remove() }
        let (ino, fh) = try t.create("far.bin")
        let data = randomBytes(160 << 20, seed: 12)
        // The kernel's writeback can send a range long before the ones in front of it:
        // 100 MiB ahead is past the reorder window, so it is staged.
        let far = 100 << 20
        try t.write(fh, at: UInt64(far), Array(data[far..<far + (1 << 20)]))
        for i in stride(from: 0, to: data.count, by: 1 << 20) where i != far {
            try t.write(fh, at: UInt64(i), Array(data[i..<i + (1 << 20)]))
        }
        try t.close(fh)
        #expect(try t.contents(ino) == data)
        let w = t.fs.writeCounters.snapshot
        #expect(w.staged == 1 << 20 && w.absorbed == 1 << 20, "\(w)")
        let amplification = Double(t.store.usage().bytesWritten) / Double(data.count)
        #expect(amplification <= 1.05, "write amplification \(amplification)")
    }

    @Test func patchingAHeaderRechunksOnlyNearby() throws {
        let t = try TestFS(chunker: .standard); defer { t.remove() }
        let (ino, fh) = try t.create("npz.bin")
        var data = randomBytes(32 << 20, seed: 3)
        try t.write(fh, at: 0, data)
        // np.savez-style: seek back and rewrite a header.
        let header = [UInt8](repeating: 7, count: 64)
        try t.write(fh, at: 100, header)
        data.replaceSubrange(100..<164, with: header)
        #expect(try t.read(fh, at: 90, count: 100) == Array(data[90..<190]))
        try t.close(fh)
        #expect(try t.contents(ino) == data)
        let amplification = Double(t.store.usage().bytesWritten) / Double(data.count)
        #expect(amplification <= 1.15, "write amplification \(amplification)")
    }

    @Test func inPlaceUpdateOfACommittedFileKeepsUntouchedBlocks() throws {
        let t = try TestFS(chunker: .standard); defer { t.remove() }
        let (ino, fh) = try t.create("h5.bin")
        var data = randomBytes(20 << 20, seed: 4)
        try t.write(fh, at: 0, data)
        try t.close(fh)
        let before = t.store.usage().bytesWritten
        let o = try t.fs.open(ino, flags: OpenFlags(O_RDWR))
        let patch = randomBytes(4096, seed: 5)
        try t.write(o.handle, at: 10 << 20, patch)
        data.replaceSubrange((10 << 20)..<((10 << 20) + 4096), with: patch)
        try t.close(o.handle)
        #expect(try t.contents(ino) == data)
        #expect(t.store.usage().bytesWritten - before <= 8 << 20, "an in-place update rewrote \(t.store.usage().bytesWritten - before) bytes")
    }

    @Test func truncateShrinkGrowAndTrunc() throws {
        let t = try TestFS(); defer { t.remove() }
        let (ino, fh) = try t.create("t.bin")
        let data = randomBytes(200_000, seed: 6)
        try t.write(fh, at: 0, data)
        _ = try t.fs.setattr(ino, AttributeChanges(size: 50_000), handle: fh, context: .root)
        _ = try t.fs.setattr(ino, AttributeChanges(size: 120_000), handle: fh, context: .root)
        var expected = Array(data[0..<50_000]) + [UInt8](repeating: 0, count: 70_000)
        #expect(try t.read(fh, at: 0, count: 200_000) == expected)
        try t.write(fh, at: 60_000, [1, 2, 3])
        expected.replaceSubrange(60_000..<60_003, with: [1, 2, 3])
        try t.close(fh)
        #expect(try t.contents(ino) == expected)
        #expect(try t.fs.getattr(ino).size == 120_000)
        // truncate(2) with no open handle commits at once
        _ = try t.fs.setattr(ino, AttributeChanges(size: 10), handle: nil, context: .root)
        #expect(try t.contents(ino) == Array(expected[0..<10]))
        // O_TRUNC
        let o = try t.fs.open(ino, flags: OpenFlags(O_RDWR | O_TRUNC))
        try t.write(o.handle, at: 0, [9, 9])
        try t.close(o.handle)
        #expect(try t.contents(ino) == [9, 9])
    }

    @Test func writeBeyondEndLeavesAHoleOfZeros() throws {
        let t = try TestFS(); defer { t.remove() }
        let (ino, fh) = try t.create("hole.bin")
        try t.write(fh, at: 100 << 20, [1])
        try t.close(fh)
        let attrs = try t.fs.getattr(ino)
        #expect(attrs.size == (100 << 20) + 1)
        let o = try t.fs.open(ino, flags: OpenFlags(O_RDONLY))
        #expect(try t.read(o.handle, at: 50 << 20, count: 4) == [0, 0, 0, 0])
        #expect(try t.read(o.handle, at: 100 << 20, count: 10) == [1])
        try t.fs.release(o.handle)
        // The zeros are stored once: a 100 MiB hole costs a few blocks.
        #expect(t.store.usage().bytes < 1 << 20)
    }

    @Test func identicalContentIsStoredOnce() throws {
        let t = try TestFS(chunker: .standard); defer { t.remove() }
        let data = randomBytes(8 << 20, seed: 7)
        for name in ["a", "b", "c"] {
            let (_, fh) = try t.create(name)
            try t.write(fh, at: 0, data)
            try t.close(fh)
        }
        #expect(t.store.usage().bytes < UInt64(data.count) + (1 << 20))
        #expect(try t.fs.meta.stats().logicalBytes == 3 * UInt64(data.count))
    }

    @Test func largeManifestsLiveInBlocks() throws {
        let t = try TestFS(chunker: ChunkerParameters(minSize: 512, averageSize: 1024, maxSize: 4096)); defer { t.remove() }
        let (ino, fh) = try t.create("many-chunks.bin")
        let data = randomBytes(2 << 20, seed: 8)
        try t.write(fh, at: 0, data)
        try t.close(fh)
        guard case .block = try t.fs.meta.manifest(of: ino) else {
            Issue.record("a manifest of ~2000 chunks should be stored as a block"); return
        }
        #expect(try t.contents(ino) == data)
        #expect(try t.fs.referencedBlocks().count > 1000)
    }

    @Test func uncommittedWritesAreInvisibleToANewVersionUntilClose() throws {
        let t = try TestFS(meta: "sqlite"); defer { t.remove() }
        let (ino, fh) = try t.create("v.bin")
        try t.write(fh, at: 0, [1, 2, 3])
        try t.close(fh)
        let o = try t.fs.open(ino, flags: OpenFlags(O_RDWR | O_TRUNC))
        try t.write(o.handle, at: 0, [4, 5, 6, 7])
        // Metadata still holds version 1 until the flush.
        #expect(try t.fs.meta.getattr(ino).size == 3)
        try t.close(o.handle)
        #expect(try t.fs.meta.getattr(ino).size == 4 && t.fs.meta.getattr(ino).version == 2)
    }

    @Test func corruptBlockGivesEIONotWrongBytes() throws {
        let t = try TestFS(chunker: .standard); defer { t.remove() }
        let (ino, fh) = try t.create("c.bin")
        try t.write(fh, at: 0, randomBytes(3 << 20, seed: 9))
        try t.close(fh)
        guard case .inline(let m) = try t.fs.meta.manifest(of: ino), let first = m.chunks.first else { Issue.record("no chunks"); return }
        try flipByte(t.store, first.id, at: 10)
        let o = try t.fs.open(ino, flags: OpenFlags(O_RDONLY))
        defer { try? t.fs.release(o.handle) }
        let e = #expect(throws: StoreError.self) { _ = try t.read(o.handle, at: 0, count: 4096) }
        #expect(e?.kind == .corrupt)
    }

    @Test func anUnlinkedFileStaysReadableWhileOpenAndGoesAtItsLastRelease() throws {
        let t = try TestFS(chunker: .standard); defer { t.remove() }
        let data = randomBytes(3 << 20, seed: 12)
        let (ino, w) = try t.create("open.bin")
        try t.write(w, at: 0, data)
        try t.close(w)
        let r = try t.fs.open(ino, flags: OpenFlags(O_RDONLY))
        try t.fs.unlink(parent: .root, name: "open.bin")
        // Open: the inode stays (unlinked) and its bytes stay readable.
        #expect(try t.fs.meta.getattr(ino).nlink == 0)
        #expect(try t.read(r.handle, at: 0, count: data.count) == data)
        try t.fs.release(r.handle)
        t.fs.forget(ino, count: 1)
        #expect(throws: FSError.self) { try t.fs.meta.getattr(ino) }
    }

    @Test func garbageCollectionFreesOverwrittenAndDeletedContent() throws {
        let t = try TestFS(chunker: .standard); defer { t.remove() }
        let gc = GarbageCollector(fs: t.fs, store: t.store)
        let keep = randomBytes(4 << 20, seed: 10)
        let (keepIno, k) = try t.create("keep")
        try t.write(k, at: 0, keep)
        try t.close(k)
        let (dropIno, d) = try t.create("drop")
        try t.write(d, at: 0, randomBytes(6 << 20, seed: 11))
        try t.close(d)
        try t.fs.unlink(parent: .root, name: "drop")
        // Nothing had it open: the unlink deleted the inode (its content with it).
        #expect(throws: FSError.self) { try t.fs.meta.getattr(dropIno) }
        t.fs.forget(dropIno, count: 1)
        // A pass with a cutoff in the past removes nothing: every block is newer.
        #expect(try gc.collect(cutoff: Timestamp(seconds: 1, nanoseconds: 0)).blocks == 0)
        let packsBefore = t.store.packBytes
        let removed = try gc.collect(cutoff: Timestamp(totalNanoseconds: Timestamp.now().totalNanoseconds + 1_000_000_000))
        #expect(removed.bytes >= 6 << 20)
        #expect(try t.contents(keepIno) == keep)
        #expect(t.store.usage().bytes < 5 << 20)
        // The space comes back on disk: the dead pack was compacted away.
        #expect(t.store.packBytes < packsBefore - (5 << 20), "pack bytes \(packsBefore) → \(t.store.packBytes)")
    }
}

/// Garbage collection during a long sequential write: the chunks streamed so far are only in the
/// session's pipeline (not yet drained into its base) and must be kept.
@Suite struct GarbageCollectionDuringWrites {
    @Test func streamedChunksSurviveAPassMidWrite() throws {
        let t = try TestFS(chunker: .standard); defer { t.remove() }
        let gc = GarbageCollector(fs: t.fs, store: t.store)
        let data = randomBytes(24 << 20, seed: 21)
        let (ino, fh) = try t.create("long-write.bin")
        try t.write(fh, at: 0, Array(data[0..<(16 << 20)]))
        // A pass with no grace at all, while the file is open: every block stored before it
        // is older than its cutoff, and only the session's references keep them. (A cutoff in
        // the future would also collect a chunk the pipeline stores between the mark and the
        // sweep, which no real pass can: its cutoff is in the past.)
        let removed = try gc.collect(cutoff: Timestamp.now())
        #expect(removed.blocks == 0, "collected \(removed.blocks) blocks of a file being written")
        try t.write(fh, at: 16 << 20, Array(data[(16 << 20)...]))
        try t.close(fh)
        #expect(try t.contents(ino) == data)
    }

    /// A pass pages through the manifests without the commit lock: close() of other files goes
    /// on while it reads (paced at 1,000 manifests a second here, so a pass over 2,500 files
    /// takes two seconds). Before, the pass held the commit lock for the whole read and every
    /// close() waited for it.
    @Test func closeDoesNotWaitForAPassReadingManifests() throws {
        let t = try TestFS(); defer { t.remove() }
        // (The pass yields to these closes a page at a time: 0.2 s at most, to keep it short.)
        let gc = GarbageCollector(fs: t.fs, store: t.store, scanRate: 1000, scanYield: 0.2)
        let d = try t.fs.mkdir(parent: .root, name: "many", mode: 0o755, context: .root).ino
        for i in 0..<2500 {
            let (_, fh) = try t.create("f\(i)", in: d)
            try t.write(fh, at: 0, randomBytes(64, seed: UInt64(i)))
            try t.close(fh)
        }
        let (gone, g) = try t.create("garbage")
        try t.write(g, at: 0, randomBytes(100_000, seed: 99))
        try t.close(g)
        try t.fs.unlink(parent: .root, name: "garbage")
        t.fs.forget(gone, count: 1)
        let running = Mutex(true)
        let removed = Mutex<UInt64>(0)
        let pass = Thread {
            let r = try? gc.collect(cutoff: Timestamp(totalNanoseconds: Timestamp.now().totalNanoseconds + 1_000_000_000))
            removed.withLock { $0 = r?.blocks ?? 0 }
            running.withLock { $0 = false }
        }
        pass.start()
        var closes = 0, slowest = 0.0
        while running.withLock({ $0 }) {
            let began = Date()
            let (_, fh) = try t.create("during-\(closes)")
            try t.write(fh, at: 0, randomBytes(4096, seed: UInt64(10_000 + closes)))
            try t.close(fh)
            slowest = max(slowest, Date().timeIntervalSince(began))
            closes += 1
        }
        #expect(closes >= 10, "only \(closes) files closed during a two-second pass")
        #expect(slowest < 1.0, "a close() waited \(slowest) s for the pass")
        #expect(gc.stats.lastManifestsRead >= 2500)
        #expect(removed.withLock { $0 } > 0)
        #expect(try t.contents(try t.fs.lookup(parent: d, name: "f7").ino) == randomBytes(64, seed: 7))
    }

    /// A pass runs only when content changed since the last one (or its full interval passed),
    /// and one with no candidate block (every block recent) reads no manifest at all.
    @Test func passesRunOnlyAfterChanges() throws {
        let t = try TestFS(); defer { t.remove() }
        let gc = GarbageCollector(fs: t.fs, store: t.store, grace: 3600)
        #expect(gc.due())   // never ran
        let (_, fh) = try t.create("a")
        try t.write(fh, at: 0, randomBytes(50_000, seed: 1))
        try t.close(fh)
        try gc.collect()
        #expect(gc.stats.lastManifestsRead == 0, "every block is within the grace: nothing to look up")
        #expect(!gc.due())
        let (_, fh2) = try t.create("b")
        #expect(!gc.due())   // an empty new file: nothing replaced
        try t.write(fh2, at: 0, [1, 2, 3])
        try t.close(fh2)
        #expect(gc.due())   // a commit
        try gc.collect()
        #expect(!gc.due())
        gc.suspect(.inline(Manifest()))
        #expect(gc.due())   // another node's
        try gc.collect()
        try t.fs.unlink(parent: .root, name: "a")
        #expect(gc.due())   // a link removed

        // A change the pass after it could not cover (its blocks were within the grace) brings
        // one more pass once the grace has gone by, and then none.
        let short = GarbageCollector(fs: t.fs, store: t.store, grace: 3)
        try short.collect()
        #expect(!short.due())
        #expect(waitUntil(timeout: 10) { short.due() })
        try short.collect()
        #expect(!short.due())
    }

    /// With a change feed (a cluster node), new files make no pass; a replaced version makes
    /// one that takes only its blocks as candidates: it removes the ones no file references
    /// and stops reading manifests as soon as the others are found.
    @Test func aChangeFeedPassTakesOnlyTheReplacedVersionsBlocks() throws {
        let t = try TestFS(); defer { t.remove() }
        let gc = GarbageCollector(fs: t.fs, store: t.store, grace: 0, changeFeed: true, supersededDelay: 0)
        let d = try t.fs.mkdir(parent: .root, name: "d", mode: 0o755, context: .root).ino
        for i in 0..<2500 {
            let (_, fh) = try t.create("f\(i)", in: d)
            try t.write(fh, at: 0, randomBytes(100, seed: UInt64(i)))
            try t.close(fh)
        }
        try gc.collect()   // the first pass: every old block
        #expect(gc.stats.fullPasses == 1 && gc.stats.lastManifestsRead >= 2500)
        #expect(!gc.due())
        // More files: no version replaced, no pass.
        for i in 0..<10 {
            let (_, fh) = try t.create("g\(i)", in: d)
            try t.write(fh, at: 0, randomBytes(100, seed: UInt64(9000 + i)))
            try t.close(fh)
        }
        #expect(!gc.due())
        // An old version of f3 (a block nothing else references) and of f4 (whose block g0
        // shares, written again below) are reported replaced.
        let old3 = try t.fs.meta.manifest(of: try t.fs.lookup(parent: d, name: "f3").ino)
        let f4 = try t.fs.lookup(parent: d, name: "f4").ino
        let old4 = try t.fs.meta.manifest(of: f4)
        let (_, fh) = try t.create("copy-of-f4", in: d)
        try t.write(fh, at: 0, randomBytes(100, seed: 4))
        try t.close(fh)
        try t.fs.unlink(parent: d, name: "f3")
        try t.fs.unlink(parent: d, name: "f4")
        gc.suspect(old3)
        gc.suspect(old4)
        // Due once as long has passed as the last pass (which read manifests) took.
        #expect(waitUntil(timeout: 60) { gc.due() })
        let (blocks, _) = try gc.collect()
        #expect(blocks == 1, "only f3's block is garbage")
        #expect(gc.stats.fullPasses == 1, "a pass of suspects only")
        #expect(!t.store.contains(try t.fs.blocks(of: old3)[0]))
        #expect(t.store.contains(try t.fs.blocks(of: old4)[0]))
        #expect(!gc.due())
        // A failed write asks for a full pass.
        gc.requestSoon()
        #expect(gc.due())
    }

    /// A cluster node keeps unreferenced blocks for its long grace (copies for versions not
    /// committed yet), but a superseded version's blocks go once its short delay is over, unless
    /// a reader holds that version (or the holds cannot be read), and a block that a version
    /// still in its delay shares is kept with it.
    @Test func supersededVersionsGoPromptlyUnlessAReaderHoldsThem() throws {
        let t = try TestFS(); defer { t.remove() }
        let holds = Mutex<Set<InodeNumber>>([]), unreadable = Mutex(false)
        let gc = GarbageCollector(fs: t.fs, store: t.store, grace: 900, changeFeed: true, supersededDelay: 0.3,
                                  held: {
                                      if unreadable.withLock({ $0 }) { throw FSError.io("etcd is away") }
                                      return holds.withLock { $0 }
                                  }, settle: 0)
        func save(_ name: String, seed: UInt64) throws -> (InodeNumber, ManifestRef?) {
            let ino = (try? t.fs.lookup(parent: .root, name: name).ino)
            let old = try ino.map { try t.fs.meta.manifest(of: $0) }
            let (i, fh) = try t.create(name, flags: O_RDWR | O_TRUNC)
            try t.write(fh, at: 0, randomBytes(3000, seed: seed))
            try t.close(fh)
            return (i, old)
        }
        func blocks(_ ref: ManifestRef?) throws -> [BlockID] { try ref.map { try t.fs.blocks(of: $0) } ?? [] }
        for (name, seed) in [("a", 1), ("b", 2), ("c", 7), ("d", 7)] { _ = try save(name, seed: UInt64(seed)) }
        try gc.collect()   // the first pass, a full one: every block is within the grace
        #expect(gc.stats.removedBlocks == 0)

        // a is rewritten: its old block goes once the delay is over, long before the grace.
        let (a, oldA) = try save("a", seed: 11)
        gc.suspect(oldA!, ino: a)
        #expect(!gc.due(), "within the superseded delay")
        #expect(waitUntil(timeout: 10) { gc.due() })
        try gc.collect()
        #expect(try blocks(oldA).allSatisfy { !t.store.contains($0) })
        #expect(try t.contents(a) == randomBytes(3000, seed: 11))

        // b is rewritten while a reader holds its old version: kept, then taken once the hold goes.
        let (b, oldB) = try save("b", seed: 12)
        holds.withLock { $0 = [b] }
        gc.suspect(oldB!, ino: b)
        #expect(waitUntil(timeout: 10) { gc.due() })
        try gc.collect()
        #expect(try blocks(oldB).allSatisfy { t.store.contains($0) })
        #expect(gc.stats.heldDeferrals == 1 && gc.stats.supersededWaiting == 1)
        // ... and while the holds cannot be read, nothing superseded is taken.
        holds.withLock { $0 = [] }
        unreadable.withLock { $0 = true }
        #expect(waitUntil(timeout: 20) { gc.due() })
        try gc.collect()
        #expect(try blocks(oldB).allSatisfy { t.store.contains($0) })
        unreadable.withLock { $0 = false }
        #expect(waitUntil(timeout: 20) { gc.due() })
        try gc.collect()
        #expect(try blocks(oldB).allSatisfy { !t.store.contains($0) })
        #expect(gc.stats.supersededWaiting == 0)

        // c and d had the same bytes: c's old version is decided while d's, which shares its
        // block, is still within its delay, so the block stays until d's is decided too.
        let (c, oldC) = try save("c", seed: 13)
        gc.suspect(oldC!, ino: c)
        #expect(waitUntil(timeout: 10) { gc.due() })
        let (d, oldD) = try save("d", seed: 14)
        gc.suspect(oldD!, ino: d)
        try gc.collect()
        #expect(try blocks(oldC) == blocks(oldD))
        #expect(try blocks(oldC).allSatisfy { t.store.contains($0) })
        #expect(waitUntil(timeout: 10) { gc.due() })
        try gc.collect()
        #expect(try blocks(oldD).allSatisfy { !t.store.contains($0) })
        #expect(try t.contents(c) == randomBytes(3000, seed: 13) && t.contents(d) == randomBytes(3000, seed: 14))
    }

    /// What a cluster node's holds are made from: the version open handles read, and a call when
    /// an open makes a new view.
    @Test func readersVersionIsWhatTheirViewReads() throws {
        let t = try TestFS(); defer { t.remove() }
        let seen = Mutex<[(InodeNumber, UInt64)]>([])
        t.fs.events.onReadView { ino, v in seen.withLock { $0.append((ino, v)) } }
        let (ino, fh) = try t.create("f")
        try t.write(fh, at: 0, [1, 2, 3])
        #expect(t.fs.readerVersion(ino) == nil, "a writer reads its session, not a version")
        try t.close(fh)
        let version = try t.fs.getattr(ino).version
        let r = try t.fs.open(ino, flags: OpenFlags(O_RDONLY))
        #expect(t.fs.readerVersion(ino) == version)
        let r2 = try t.fs.open(ino, flags: OpenFlags(O_RDONLY))
        #expect(seen.withLock { $0.count == 1 && $0[0].0 == ino && $0[0].1 == version }, "one view, one call")
        try t.fs.release(r.handle)
        #expect(t.fs.readerVersion(ino) == version)
        try t.fs.release(r2.handle)
        #expect(t.fs.readerVersion(ino) == nil)
    }
}

/// The walk reads every file of a large namespace, page after page, on every engine; and a
/// directory whose entries came 40 to a transaction (`createFiles`: in etcd they share a create
/// revision) lists each exactly once, however the pages fall.
@Suite struct LargeWalkTests {
    @Test(arguments: ["memory", "etcd"]) func walkReadsEveryFileOfManyLargeDirectories(_ kind: String) throws {
        let url = kind == "etcd" ? try EtcdTestCluster.shared.get().metaURL("walk-\(UInt64.random(in: 0...UInt64.max))") : "memory:"
        let t = try TestFS(meta: url); defer { t.remove() }
        let chunk = ChunkRef(id: BlockID.hash(Data("x".utf8)), length: 1)
        let top = try t.fs.mkdir(parent: .root, name: "ns", mode: 0o755, context: .root).ino
        for d in 0..<6 {
            let dir = try t.fs.mkdir(parent: top, name: "step-\(d)", mode: 0o755, context: .root).ino
            for start in stride(from: 0, to: 1500, by: 40) {
                _ = try t.fs.meta.createFiles(parent: dir, (start..<min(start + 40, 1500)).map {
                    (name: "f\($0)", new: NewInode(kind: .regular, mode: 0o644, uid: 0, gid: 0, now: .now()), size: 1,
                     manifest: ManifestRef.inline(Manifest(chunks: [chunk])))
                })
            }
        }
        var files = 0
        try t.fs.walkFiles(from: .root) { f in
            files += 1
            #expect(f.blocks.map(\.id) == [chunk.id])
        }
        #expect(files == 6 * 1500)
        let step0 = try t.fs.lookup(parent: top, name: "step-0").ino
        var names: [String] = [], cookie: UInt64 = 0
        while true {
            let page = try t.fs.readdir(step0, after: cookie, limit: 37)
            guard let last = page.last else { break }
            names += page.map(\.name).filter { $0 != "." && $0 != ".." }
            cookie = last.cookie
        }
        #expect(names.count == 1500 && Set(names).count == 1500)
    }
}

@Suite struct ConcurrencyTests {
    /// The kernel releases handles asynchronously: opens and releases of one inode interleave.
    /// A new writable handle must always find a session (once it could be dropped under it,
    /// and its writes failed with EBADF).
    @Test func opensAndReleasesInterleave() throws {
        let t = try TestFS(); defer { t.remove() }
        let (ino, fh) = try t.create("shared.bin")
        try t.close(fh)
        let failures = LockedCounter()
        DispatchQueue.concurrentPerform(iterations: 4) { worker in
            for i in 0..<300 {
                do {
                    let o = try t.fs.open(ino, flags: OpenFlags(worker % 2 == 0 ? O_RDWR : O_RDONLY))
                    if worker % 2 == 0 { try t.write(o.handle, at: UInt64(i * 8), [UInt8](repeating: UInt8(worker), count: 8)) } else {
                        _ = try t.read(o.handle, at: 0, count: 64)
                    }
                    try t.fs.flush(o.handle)
                    try t.fs.release(o.handle)
                } catch { failures.add() }
            }
        }
        #expect(failures.value == 0)
        #expect(try t.fs.getattr(ino).size == 300 * 8)
    }
}

final class LockedCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var n = 0
    func add() { lock.lock(); n += 1; lock.unlock() }
    var value: Int { lock.lock(); defer { lock.unlock() }; return n }
}

/// The namespace walk that healing, `status PATH` and `verify` stand on, and the state xattrs.
@Suite struct TreeAndStateTests {
    @Test func walkFindsEveryFileOnceWithItsBlocksAndParent() throws {
        let t = try TestFS(); defer { t.remove() }
        let sub = try t.fs.mkdir(parent: .root, name: "sub", mode: 0o755, context: .root).ino
        let deep = try t.fs.mkdir(parent: sub, name: "deep", mode: 0o755, context: .root).ino
        var want: [String: [UInt8]] = [:]
        for (dir, path, name, seed) in [(InodeNumber.root, "", "a", 1), (sub, "sub/", "b", 2), (deep, "sub/deep/", "c", 3)] {
            let bytes = randomBytes(100_000 + seed * 7, seed: UInt64(seed))
            let (_, fh) = try t.create(name, in: dir)
            try t.write(fh, at: 0, bytes)
            try t.close(fh)
            want[path + name] = bytes
        }
        let (ino, fh) = try t.create("empty", in: sub)
        try t.close(fh)
        _ = try t.fs.link(ino, parent: deep, name: "hardlink")
        var seen: [String: FileBlocks] = [:]
        try t.fs.walkFiles(from: .root) { seen[$0.path] = $0 }
        // The hard link is one file, found once under either of its names.
        #expect(Set(seen.keys).subtracting(["sub/empty", "sub/deep/hardlink"]) == Set(want.keys))
        #expect(seen.count == 4)
        for (path, bytes) in want {
            let f = try #require(seen[path])
            #expect(f.size == UInt64(bytes.count))
            #expect(f.blocks.reduce(0) { $0 + Int($1.length) } == bytes.count)
            for c in f.blocks { #expect(t.store.contains(c.id)) }
        }
        #expect(seen["sub/deep/c"]?.parent == deep && seen["a"]?.parent == .root)
        // From a file: just that file, with the parent given.
        var one: [FileBlocks] = []
        try t.fs.walkFiles(from: try t.fs.lookup(parent: sub, name: "b").ino, parent: sub) { one.append($0) }
        #expect(one.count == 1 && one[0].path == "" && one[0].parent == sub)
    }

    @Test func stateXattrsAreReadOnlyAndSayOneCopyOnASingleNode() throws {
        let t = try TestFS(); defer { t.remove() }
        let (ino, fh) = try t.create("f")
        try t.write(fh, at: 0, randomBytes(50_000, seed: 9))
        try t.close(fh)
        let text = { (name: String) in String(decoding: try t.fs.getxattr(ino, name: "user.modelfs." + name), as: UTF8.self) }
        #expect(try text("replicas") == "1")
        #expect(try text("pending_bytes") == "0")
        #expect(try text("policy") == "replicas=1,ack=1")
        let v1 = try #require(UInt64(try text("version")))
        let (_, fh2) = try t.create("f", flags: O_RDWR | O_TRUNC)
        try t.write(fh2, at: 0, [1, 2, 3])
        try t.close(fh2)
        #expect(try #require(UInt64(try text("version"))) > v1)
        let e = #expect(throws: FSError.self) { try t.fs.setxattr(ino, name: "user.modelfs.replicas", value: Data("5".utf8), mode: .any) }
        #expect(e?.errno == EPERM)
        #expect(try !t.fs.listxattr(ino).contains("user.modelfs.replicas"))
        // A directory has no state attributes (its policy is an ordinary one).
        #expect(throws: FSError.self) { _ = try t.fs.getxattr(.root, name: "user.modelfs.replicas") }
    }

    @Test func writeOnlyOpensAreDirectAndClearSetIDBitsForOtherUsers() throws {
        let t = try TestFS(directWrites: true); defer { t.remove() }
        let (ino, fh) = try t.create("f", flags: O_WRONLY)
        let rw = try t.fs.open(ino, flags: OpenFlags(O_RDWR))
        let ro = try t.fs.open(ino, flags: OpenFlags(O_RDONLY))
        #expect(!rw.direct && !ro.direct)
        let user = RequestContext(uid: 1000, gid: 1000, pid: 1)
        func mode() throws -> UInt32 { try t.fs.getattr(ino).mode }
        for (set, kept) in [(UInt32(0o6777), UInt32(0o0777)), (0o2767, 0o2767)] {
            _ = try t.fs.setattr(ino, AttributeChanges(mode: set), handle: nil, context: .root)
            let w = try t.fs.open(ino, flags: OpenFlags(O_WRONLY))
            #expect(w.direct)
            _ = try [UInt8](repeating: 1, count: 10).withUnsafeBytes { try t.fs.write(w.handle, at: 0, $0, caller: .root) }
            #expect(try mode() == set, "root keeps set-id bits")
            _ = try [UInt8](repeating: 2, count: 10).withUnsafeBytes { try t.fs.write(w.handle, at: 0, $0, caller: user) }
            #expect(try mode() == kept, "a write by uid 1000 with mode \(String(set, radix: 8))")
            try t.close(w.handle)
        }
        // A write through the page cache is the kernel's to police (it sends a chmod first).
        _ = try t.fs.setattr(ino, AttributeChanges(mode: 0o6777), handle: nil, context: .root)
        _ = try [UInt8](repeating: 3, count: 10).withUnsafeBytes { try t.fs.write(rw.handle, at: 0, $0, caller: user) }
        #expect(try mode() == 0o6777)
        for h in [fh, rw.handle, ro.handle] { try t.close(h) }
        let plain = try TestFS(); defer { plain.remove() }
        let (pino, _) = try plain.create("g", flags: O_WRONLY)
        #expect(try !plain.fs.open(pino, flags: OpenFlags(O_WRONLY)).direct)
    }
}

/// A store that refuses every put after the first `allowed` (a disk filling up under a writer).
/// Owned puts come here too, through BlockStore's default `put(_:owned:length:)`.
@Suite struct EarlyAcknowledgementTests {
    /// Sequential writes are answered before they are chunked and stored; a store failure after
    /// that answer must not be lost: the next writes, fsync and close() report it.
    @Test func aFailureAfterTheAnswerIsReportedByCloseAndLaterWrites() throws {
        let t = try TestFS(chunker: .standard); defer { t.remove() }
        let store = FaultyBlockStore(t.store, .init(puts: 3))
        var options = FileSystemOptions(stagingDir: t.dir + "/staging")
        options.chunker = .standard
        let fs = try FileSystem(meta: try MetadataURL.open("memory:", rootUID: 0, rootGID: 0), store: store, options: options)
        let (a, o) = try fs.create(parent: .root, name: "big.bin", mode: 0o644, flags: OpenFlags(O_RDWR | O_CREAT), context: .root)
        let data = randomBytes(32 << 20, seed: 11)
        var answered = 0, refused = 0
        for i in 0..<32 {
            var acks = 0
            do {
                _ = try data[(i << 20)..<((i + 1) << 20)].withUnsafeBytes { try fs.write(o.handle, at: UInt64(i << 20), $0) { acks += 1 } }
                #expect(acks == 1, "a write that returned was answered once")
            } catch let e as StoreError {
                #expect(e.kind == .full)
                #expect(acks <= 1)
                refused += 1
            }
            answered += acks
        }
        #expect(answered >= 3, "the writes before the disk filled were answered")
        #expect(refused > 0, "the store's failure reached a later write")
        // The failure sticks, as the store's own: ENOSPC at the FUSE edge.
        #expect(throws: StoreError.self) { try fs.fsync(o.handle) }
        #expect(throws: StoreError.self) { try fs.flush(o.handle) }
        try? fs.release(o.handle)  // may report the failure once more
        #expect(try fs.getattr(a.ino).size == 0, "nothing of the failed version was committed")
    }
}

@Suite struct FaultyStoreTests {
    /// A block that reads as missing or corrupt fails the read: the reader never gets bytes that
    /// were not verified, and the other files read on.
    @Test func unreadableBlocksFailReadsAndNothingElse() throws {
        let t = try TestFS(chunker: .standard); defer { t.remove() }
        let store = FaultyBlockStore(t.store)
        var options = FileSystemOptions(stagingDir: t.dir + "/staging")
        options.chunker = .standard
        options.blockCacheBytes = 0
        let fs = try FileSystem(meta: try MetadataURL.open("memory:", rootUID: 0, rootGID: 0), store: store, options: options)
        func make(_ name: String, seed: UInt64) throws -> (InodeNumber, [UInt8]) {
            let (a, o) = try fs.create(parent: .root, name: name, mode: 0o644, flags: OpenFlags(O_WRONLY | O_CREAT), context: .root)
            let data = randomBytes(6 << 20, seed: seed)
            _ = try data.withUnsafeBytes { try fs.write(o.handle, at: 0, $0) }
            try fs.flush(o.handle); try fs.release(o.handle)
            return (a.ino, data)
        }
        let (bad, _) = try make("bad.bin", seed: 1), (good, goodData) = try make("good.bin", seed: 2)
        var blocks: [ChunkRef] = []
        try fs.walkFiles(from: bad) { blocks = $0.blocks }
        #expect(blocks.count >= 2)
        store.change { $0.missing = [blocks[0].id]; $0.corrupt = [blocks[1].id] }
        func read(_ ino: InodeNumber, at offset: UInt64, _ count: Int) throws -> [UInt8] {
            let o = try fs.open(ino, flags: OpenFlags(O_RDONLY))
            defer { try? fs.release(o.handle) }
            var buf = [UInt8](repeating: 0, count: count)
            let n = try buf.withUnsafeMutableBytes { try fs.read(o.handle, at: offset, count: count, into: $0.baseAddress!) }
            return Array(buf[0..<n])
        }
        let missing = #expect(throws: StoreError.self) { _ = try read(bad, at: 0, 4096) }
        #expect(missing?.kind == .missing)
        let corrupt = #expect(throws: StoreError.self) { _ = try read(bad, at: UInt64(blocks[0].length), 4096) }
        #expect(corrupt?.kind == .corrupt)
        #expect(try read(good, at: 0, goodData.count) == goodData)
        #expect(store.failures.load(ordering: .relaxed) >= 2)
    }

    /// fsync reports a store whose sync fails, and the data stays readable.
    @Test func aFailedSyncIsReportedByFsync() throws {
        let t = try TestFS(chunker: .standard); defer { t.remove() }
        let store = FaultyBlockStore(t.store)
        var options = FileSystemOptions(stagingDir: t.dir + "/staging")
        options.chunker = .standard
        let fs = try FileSystem(meta: try MetadataURL.open("memory:", rootUID: 0, rootGID: 0), store: store, options: options)
        let (_, o) = try fs.create(parent: .root, name: "f", mode: 0o644, flags: OpenFlags(O_RDWR | O_CREAT), context: .root)
        let data = randomBytes(2 << 20, seed: 3)
        _ = try data.withUnsafeBytes { try fs.write(o.handle, at: 0, $0) }
        store.change { $0.failSync = true }
        let e = #expect(throws: StoreError.self) { try fs.fsync(o.handle) }
        #expect(e?.kind == .system(EIO))
        store.change { $0.failSync = false }
        try fs.fsync(o.handle)
        try fs.release(o.handle)
    }
}

@Suite struct WriterLockOrderTests {
    /// Records the writer-lock calls; `release` waits for `go` (an etcd delete under way).
    final class SlowReleaseLock: WriterLock, @unchecked Sendable {
        let events = Mutex<[String]>([])
        let go = DispatchSemaphore(value: 0)
        func acquire(_ ino: InodeNumber) throws -> Int64 { events.withLock { $0.append("acquire") }; return 1 }
        func release(_ ino: InodeNumber) {
            events.withLock { $0.append("release begins") }
            go.wait()
            events.withLock { $0.append("release ends") }
        }
    }

    /// A writable open that comes while the last writing handle's RELEASE is still giving the
    /// lock back waits for it: taken in between, the lock would be found held by this node and
    /// kept, and the release would delete it under the new writer.
    @Test func aWritableOpenWaitsForTheLockReleaseUnderWay() throws {
        let lock = SlowReleaseLock()
        let t = try TestFS(writerLock: lock); defer { t.remove() }
        let (ino, fh) = try t.create("f")
        try t.write(fh, at: 0, Array("first".utf8))
        try t.fs.flush(fh)
        let released = DispatchSemaphore(value: 0), reopened = DispatchSemaphore(value: 0)
        // Threads of their own: the global queue's few workers may all be busy (the test runner).
        Thread { try? t.fs.release(fh); released.signal() }.start()
        #expect(waitUntil(timeout: 10) { lock.events.withLock { $0.last == "release begins" } })
        let second = Mutex<FileHandleID?>(nil)
        Thread {
            second.withLock { $0 = try? t.fs.open(ino, flags: OpenFlags(O_WRONLY)).handle }
            reopened.signal()
        }.start()
        // Without the wait, the second acquire came at once (well within this half second).
        #expect(reopened.wait(timeout: .now() + 0.5) == .timedOut)
        lock.go.signal()
        #expect(released.wait(timeout: .now() + 10) == .success)
        #expect(reopened.wait(timeout: .now() + 10) == .success)
        #expect(lock.events.withLock { $0 } == ["acquire", "release begins", "release ends", "acquire"])
        let h = try #require(second.withLock { $0 })
        lock.go.signal()   // the second handle's own release
        try t.close(h)
        #expect(try t.contents(ino) == Array("first".utf8))
    }
}

/// A paced scan of the manifests (garbage collection's mark phase) yields to writers: while the
/// namespace keeps changing, the next page waits, up to `yieldAtMost` after the last one; with
/// no change it does not wait, and an unpaced scan never does.
@Suite struct ScansYieldToWriters {
    @Test func aPacedScanWaitsBetweenPagesWhileTheNamespaceChanges() throws {
        let t = try TestFS(chunker: .standard); defer { t.remove() }
        for i in 0..<6 {
            let (_, fh) = try t.create("f\(i)")
            try t.write(fh, at: 0, randomBytes(4096, seed: UInt64(i)))
            try t.close(fh)
        }
        // A block nobody references: every page is read.
        let absent: Set<BlockID> = [randomBytes(64, seed: 99).withUnsafeBytes { BlockID.hash($0) }]
        // The writes just now count as writers: with them forgotten, the scan does not wait.
        t.fs.namespaceActivity.forget()
        let quiet = try t.fs.scanReferences(absent, rate: 0, pause: 0.01, page: 2, yieldAtMost: 0.2)
        #expect(quiet.manifests == 6 && quiet.referenced.isEmpty && quiet.yielded == 0)
        // A writer changing the namespace all along: each page after the first waits its
        // `yieldAtMost`, and no longer.
        let done = Atomic<Bool>(false)
        t.fs.noteNamespaceChange()   // (before the writer thread's first)
        let writer = Thread { while !done.load(ordering: .relaxed) { t.fs.noteNamespaceChange(); usleep(10_000) } }
        writer.start()
        defer { done.store(true, ordering: .relaxed) }
        let started = Date()
        let busy = try t.fs.scanReferences(absent, rate: 0, pause: 0.01, page: 2, yieldAtMost: 0.2)
        #expect(busy.manifests == 6)
        #expect(busy.yielded >= 0.5, "three pages after the first waited \(busy.yielded) s")
        #expect(Date().timeIntervalSince(started) < 3, "a wait is bounded by yieldAtMost")
        // Unpaced (tests, `collectNow`): no waiting.
        #expect(try t.fs.scanReferences(absent, rate: 0, pause: 0, page: 2, yieldAtMost: 0.2).yielded == 0)
        // And the scan is stopped while it waits.
        #expect(throws: FSError.self) { _ = try t.fs.scanReferences(absent, rate: 0, pause: 0.01, page: 2, yieldAtMost: 5, stop: { Date().timeIntervalSince(started) > 1.5 }) }
    }
}
