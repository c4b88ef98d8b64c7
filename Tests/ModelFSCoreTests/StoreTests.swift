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

    /// Tiers: blocks land on the first tier, `move` rewrites them into another (verified, the
    /// old records dropped after the new ones are synced), reads follow, a reopened store finds
    /// each block on its tier, and a block removed meanwhile is not brought back by a move.
    @Test func blocksMoveBetweenTiersAndStayThereAcrossARestart() throws {
        let fast = temporaryDirectory(), slow = temporaryDirectory()
        defer { for d in [fast, slow] { try? FileManager.default.removeItem(atPath: d) } }
        let tiers = [PackBlockStore.Tier(name: "hdd", root: slow)]
        let store = try PackBlockStore(root: fast, slower: tiers, packLimit: 1 << 20)
        let blocks = (0..<12).map { randomBytes(200_000 + $0, seed: UInt64(100 + $0)) }
        let ids = try blocks.map { try storeBlock(store, $0) }
        #expect(ids.allSatisfy { store.tier(of: $0) == 0 })
        let moved = try store.move(Array(ids[0..<8]), to: 1)
        #expect(moved.blocks == 8 && moved.bytes == blocks[0..<8].reduce(0) { $0 + UInt64($1.count) })
        #expect(ids[0..<8].allSatisfy { store.tier(of: $0) == 1 } && ids[8...].allSatisfy { store.tier(of: $0) == 0 })
        for (id, b) in zip(ids, blocks) { #expect(Array(try store.read(id).data) == b) }
        let usage = store.tierUsage()
        #expect(usage.map(\.name) == ["fast", "hdd"] && usage.map(\.blocks) == [4, 8] && store.usage().blocks == 12)
        // Moving again to where a block is already moves nothing; back up works the same way.
        #expect(try store.move(Array(ids[0..<2]), to: 1).blocks == 0)
        #expect(try store.move([ids[0]], to: 0).blocks == 1 && store.tier(of: ids[0]) == 0)
        // A block garbage-collected is skipped.
        _ = try store.remove(ids[11])
        #expect(try store.move([ids[11]], to: 1).blocks == 0 && !store.contains(ids[11]))
        // The old records' space came back: the fast tier's packs hold about four live blocks.
        #expect(store.tierUsage()[0].blocks == 4)
        let again = try PackBlockStore(root: fast, slower: tiers, packLimit: 1 << 20)
        #expect(again.usage().blocks == 11 && !again.contains(ids[11]))
        for (i, (id, b)) in zip(ids, blocks).enumerated() where i != 11 {
            #expect(again.tier(of: id) == (i == 0 || i >= 8 ? 0 : 1))
            #expect(Array(try again.read(id).data) == b)
        }
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

    @Test func thePacksDirectoryIsSyncedOncePerNewPack() throws {
        // A pack's directory entry is made durable the first time one of its blocks is synced,
        // not on every sync (that was one more flush of the disk per fsync of a small file).
        let dir = temporaryDirectory(); defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try PackBlockStore(root: dir, packLimit: 100_000)
        let a = try storeBlock(store, randomBytes(30_000, seed: 200))
        try store.sync([a])
        #expect(store.directorySyncs == 1)
        let b = try storeBlock(store, randomBytes(30_000, seed: 201))
        try store.sync([b])
        try store.sync([a, b])
        #expect(store.directorySyncs == 1)
        // Past packLimit: a new pack, whose entry needs its own directory sync.
        var more: [BlockID] = []
        for i in 0..<4 { more.append(try storeBlock(store, randomBytes(30_000, seed: UInt64(202 + i)))) }
        try store.sync(more)
        #expect(store.directorySyncs == 2)
        // After a restart every pack found counts as new once (a crash may have come before its
        // entry was synced).
        let again = try PackBlockStore(root: dir, packLimit: 100_000)
        try again.sync([a])
        try again.sync([a, b])
        #expect(again.directorySyncs == 1)
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
        let error = #expect(throws: StoreError.self) { try store.read(id) }
        #expect(error?.kind == .corrupt)
        #expect(logged.lines.contains { $0.contains(id.hex) && $0.contains("corrupt") })
        #expect(Array(try store.read(other).data) == randomBytes(5000, seed: 1), "neighbours are unaffected")
    }

    @Test func missingBlockIsEIO() throws {
        let dir = temporaryDirectory(); defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try PackBlockStore(root: dir)
        let error = #expect(throws: StoreError.self) { try store.read(BlockID.hash(Data("absent".utf8))) }
        #expect(error?.kind == .missing)
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

    /// A block in its own buffer, as the write pipeline and the peer server hand it over.
    func owned(_ store: PackBlockStore, _ bytes: [UInt8]) throws -> (BlockID, Bool) {
        let b = BlockBuffer(count: bytes.count)
        bytes.withUnsafeBytes { b.pointer.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        let id = bytes.withUnsafeBytes { BlockID.hash($0) }
        return (id, try store.put(id, owned: b, length: bytes.count))
    }

    func header(_ path: String, at offset: UInt64) -> String {
        var h = [UInt8](repeating: 0, count: 4)
        let fd = open(path, O_RDONLY); defer { close(fd) }
        _ = pread(fd, &h, 4, off_t(offset))
        return String(decoding: h, as: UTF8.self)
    }

    /// A block large enough to be read directly moves as an aligned record with its piece sums,
    /// so small reads of it on its new tier still go by pieces (before, moves wrote buffered
    /// records, read whole and hashed); a small block moves as a buffered record.
    @Test func largeBlocksKeepTheirPieceSumsWhenTheyMoveTiers() throws {
        let fast = temporaryDirectory(), slow = temporaryDirectory()
        defer { for d in [fast, slow] { try? FileManager.default.removeItem(atPath: d) } }
        let tiers = [PackBlockStore.Tier(name: "hdd", root: slow)]
        let store = try PackBlockStore(root: fast, slower: tiers)
        let big = randomBytes(300_003, seed: 90), small = randomBytes(5_000, seed: 91)
        let (b, _) = try owned(store, big)
        let s = try storeBlock(store, small)
        #expect(try store.move([b, s], to: 1).blocks == 2)
        for reopened in [store, try PackBlockStore(root: fast, slower: tiers)] {
            #expect(reopened.tier(of: b) == 1 && reopened.tier(of: s) == 1)
            let loc = try #require(reopened.location(of: b))
            #expect(loc.path.hasPrefix(slow) && loc.offset % 4096 == 0 && header(loc.path, at: loc.offset - 4096) == "MFB2")
            let r = try #require(reopened.readPieces(b, 100_000..<104_096), "a moved large block reads by pieces")
            #expect(r.buffer.count <= 2 << PieceSums.defaultShift)
            #expect(r.buffer.withUnsafeBytes { Array($0[(100_000 - r.start)..<(104_096 - r.start)]) } == Array(big[100_000..<104_096]))
            #expect(try Array(reopened.read(b).data) == big && Array(reopened.read(s).data) == small)
            #expect(reopened.verify(b) == true && reopened.readPieces(s, 0..<100) == nil)
        }
        // And back up again.
        #expect(try store.move([b], to: 0).blocks == 1 && store.readPieces(b, 0..<10) != nil)
        // A block over 8 MiB whose length is no multiple of a page (a large manifest stored as
        // a block) has no room to pad in its buffer: it moves as a buffered record.
        let huge = randomBytes((9 << 20) + 3, seed: 92)
        let h = try storeBlock(store, huge)
        #expect(try store.move([h], to: 1).blocks == 1 && store.tier(of: h) == 1)
        #expect(try Array(store.read(h).data) == huge)
    }

    @Test func largeOwnedBlocksArePageAlignedRecordsThatSurviveARestart() throws {
        let dir = temporaryDirectory(); defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try PackBlockStore(root: dir)
        let small1 = randomBytes(10_001, seed: 60), big1 = randomBytes(300_003, seed: 61)
        let small2 = randomBytes(5_000, seed: 62), big2 = randomBytes(1 << 20, seed: 63)
        let s1 = try storeBlock(store, small1)
        let (b1, created) = try owned(store, big1)
        #expect(created)
        let s2 = try storeBlock(store, small2)
        let (b2, _) = try owned(store, big2)
        #expect(try owned(store, big1).1 == false, "the same content again is a dedup hit")
        // Small blocks stay buffered "MFB1" records; large ones are "MFB2", data on a page boundary.
        for (id, magic, aligned) in [(s1, "MFB1", false), (b1, "MFB2", true), (s2, "MFB1", false), (b2, "MFB2", true)] {
            let loc = try #require(store.location(of: id))
            #expect((loc.offset % 4096 == 0) == aligned)
            #expect(header(loc.path, at: loc.offset - (aligned ? 4096 : 40)) == magic)
        }
        // A restart rebuilds the index across the holes before aligned records.
        let again = try PackBlockStore(root: dir)
        #expect(again.usage().blocks == 4)
        for (id, bytes) in [(s1, small1), (b1, big1), (s2, small2), (b2, big2)] {
            #expect(Array(try again.read(id).data) == bytes)
        }
        // Appends continue after the last record.
        let s3 = try storeBlock(again, randomBytes(777, seed: 64))
        #expect(Array(try PackBlockStore(root: dir).read(s3).data) == randomBytes(777, seed: 64))
    }

    /// Piece sums (issue #27): an aligned record's header page holds the CRC32C of each 8 KiB
    /// piece, so a small read reads and checks only the pieces it touches; after a restart the
    /// sums come from the header page.
    @Test func smallReadsOfAlignedBlocksReadOnlyTheirPieces() throws {
        let dir = temporaryDirectory(); defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try PackBlockStore(root: dir)
        let piece = 1 << PieceSums.defaultShift
        let big = randomBytes(300_003, seed: 80), small = randomBytes(5_000, seed: 81)
        let (id, _) = try owned(store, big)
        let s = try storeBlock(store, small)
        for reopened in [store, try PackBlockStore(root: dir)] {
            for range in [5_000..<9_096, 16_380..<16_390, 0..<1, 294_000..<300_003, 299_999..<300_003, 0..<300_003] {
                let r = try #require(reopened.readPieces(id, range), "\(range)")
                #expect(r.start % piece == 0 && r.start <= range.lowerBound && r.start + r.buffer.count >= range.upperBound)
                #expect(r.buffer.count <= (range.count + 2 * piece), "only the touched pieces: \(range) read \(r.buffer.count)")
                let got = r.buffer.withUnsafeBytes { Array($0[(range.lowerBound - r.start)..<(range.upperBound - r.start)]) }
                #expect(got == Array(big[range]), "\(range)")
            }
            #expect(reopened.readPieces(id, 300_000..<300_004) == nil, "past the block's end")
            #expect(reopened.readPieces(s, 0..<100) == nil, "a small buffered record has no sums: read whole")
        }
        // The sums are the CRC32C (Castagnoli) of each piece: the standard check value, and the
        // hardware path (three pieces at a time) against a plain bit-by-bit reference.
        #expect(Array("123456789".utf8).withUnsafeBytes { PieceSums.crc($0.baseAddress!, 9) } == 0xE306_9283)
        let sums = big.withUnsafeBytes { PieceSums(of: $0) }
        #expect(sums.pieceSize == piece && sums.sums.count == (big.count + piece - 1) / piece)
        #expect(sums.sums == stride(from: 0, to: big.count, by: piece).map { crc32cReference(big[$0..<min(big.count, $0 + piece)]) })
    }

    /// A piece whose bytes changed on disk is never returned (the caller reads the whole block,
    /// whose SHA-256 fails: EIO), the other pieces still are; a damaged table or a record written
    /// before sums existed (zeros after the header) is read whole.
    @Test func aCorruptPieceOrTableIsNeverBelieved() throws {
        let dir = temporaryDirectory(); defer { try? FileManager.default.removeItem(atPath: dir) }
        let logged = LogSink()
        let store = try PackBlockStore(root: dir) { logged.append($0) }
        let big = randomBytes(1 << 20, seed: 82)
        let piece = 1 << PieceSums.defaultShift
        let (id, _) = try owned(store, big)
        let loc = try #require(store.location(of: id))
        func flip(_ offset: UInt64) {
            let fd = open(loc.path, O_RDWR); defer { close(fd) }
            var b: UInt8 = 0
            pread(fd, &b, 1, off_t(offset)); b ^= 0x01; pwrite(fd, &b, 1, off_t(offset))
        }
        flip(loc.offset + UInt64(3 * piece + 77))
        let fresh = try PackBlockStore(root: dir) { logged.append($0) }
        #expect(fresh.readPieces(id, (3 * piece)..<(3 * piece + 4096)) == nil)
        #expect(logged.lines.contains { $0.contains(id.hex) && $0.contains("piece 3") })
        let other = try #require(fresh.readPieces(id, (5 * piece)..<(5 * piece + 4096)))
        #expect(other.buffer.withUnsafeBytes { Array($0[0..<4096]) } == Array(big[(5 * piece)..<(5 * piece + 4096)]))
        #expect(throws: StoreError.self) { try fresh.read(id) }
        flip(loc.offset + UInt64(3 * piece + 77))   // mended
        // A damaged table: no piece is read by it.
        flip(loc.offset - 4096 + 40 + 8 + 4 * 10)
        #expect(try PackBlockStore(root: dir).readPieces(id, 0..<4096) == nil)
        #expect(Array(try PackBlockStore(root: dir).read(id).data) == big, "the block itself is whole")
        // A record from before the sums: zeros after its 40-byte header.
        let fd = open(loc.path, O_RDWR)
        let zeros = [UInt8](repeating: 0, count: 4096 - 40)
        pwrite(fd, zeros, zeros.count, off_t(loc.offset - 4096 + 40))
        close(fd)
        let old = try PackBlockStore(root: dir)
        #expect(old.readPieces(id, 0..<4096) == nil)
        #expect(Array(try old.read(id).data) == big)
    }

    /// A whole-block read checks the piece sums instead of hashing (ten times cheaper); the
    /// scrubber's `verify` still hashes. Shown with a record whose bytes and sums were both
    /// rewritten consistently: the read believes the sums, `verify` finds the block corrupt.
    @Test func wholeReadsCheckThePieceSumsAndVerifyHashes() throws {
        let dir = temporaryDirectory(); defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try PackBlockStore(root: dir)
        var big = randomBytes(600_000, seed: 83)
        let (id, _) = try owned(store, big)
        #expect(Array(try store.read(id).data) == big && store.verify(id) == true)
        let loc = try #require(store.location(of: id))
        big[100_000] ^= 0xFF
        let fd = open(loc.path, O_RDWR); defer { close(fd) }
        var page = [UInt8](repeating: 0, count: 4096)
        #expect(pread(fd, &page, 4096, off_t(loc.offset) - 4096) == 4096)
        page.withUnsafeMutableBytes { p in big.withUnsafeBytes { PieceSums(of: $0).write(into: p.baseAddress!) } }
        #expect(pwrite(fd, page, 4096, off_t(loc.offset) - 4096) == 4096)
        var b = big[100_000]
        #expect(pwrite(fd, &b, 1, off_t(loc.offset) + 100_000) == 1)
        let again = try PackBlockStore(root: dir)
        #expect(Array(try again.read(id).data) == big, "checked by the sums, not hashed")
        #expect(again.verify(id) == false, "verify hashes: the block no longer matches its name")
    }

    @Test func aTornAlignedRecordIsCutOffAtStart() throws {
        let dir = temporaryDirectory(); defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try PackBlockStore(root: dir)
        let keep = try storeBlock(store, randomBytes(3_000, seed: 70))
        let (torn, _) = try owned(store, randomBytes(400_000, seed: 71))
        let loc = try #require(store.location(of: torn))
        truncate(loc.path, off_t(loc.offset) + 100_000)   // a crash in the middle of the direct write
        let again = try PackBlockStore(root: dir)
        #expect(again.contains(keep) && !again.contains(torn))
        #expect(Array(try again.read(keep).data) == randomBytes(3_000, seed: 70))
        let (next, _) = try owned(again, randomBytes(500_000, seed: 72))
        #expect(Array(try PackBlockStore(root: dir).read(next).data) == randomBytes(500_000, seed: 72))
    }

    @Test func deadAlignedRecordsGiveTheirPagesBackAndStayDead() throws {
        let dir = temporaryDirectory(); defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try PackBlockStore(root: dir)
        let (gone, _) = try owned(store, randomBytes(600_000, seed: 80))
        let (stays, _) = try owned(store, randomBytes(300_000, seed: 81))
        let small = try storeBlock(store, randomBytes(9_000, seed: 82))
        let future = Timestamp(totalNanoseconds: Timestamp.now().totalNanoseconds + 60_000_000_000)
        #expect(store.removeIfStale(gone, cutoff: future) == 600_000)
        let before = store.packBytes
        let freed = try store.reclaim()
        #expect(freed == (600_000 + 4095) / 4096 * 4096, "freed \(freed)")
        #expect(store.packBytes <= before - freed)
        let again = try PackBlockStore(root: dir)
        #expect(!again.contains(gone) && again.usage().blocks == 2)
        #expect(Array(try again.read(stays).data) == randomBytes(300_000, seed: 81))
        #expect(Array(try again.read(small).data) == randomBytes(9_000, seed: 82))
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

/// CRC32C (Castagnoli, reflected 0x82F63B78), bit by bit: the reference PieceSums is checked against.
func crc32cReference(_ bytes: some Sequence<UInt8>) -> UInt32 {
    var c: UInt32 = 0xFFFF_FFFF
    for b in bytes {
        c ^= UInt32(b)
        for _ in 0..<8 { c = (c >> 1) ^ (0x82F6_3B78 & (0 &- (c & 1))) }
    }
    return ~c
}
