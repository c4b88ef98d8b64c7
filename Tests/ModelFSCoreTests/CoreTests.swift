import Foundation
import Synchronization
import Testing
import ModelFSTestSupport
@testable import ModelFSCore

@Suite struct BlockIDTests {
    @Test func knownSHA256() {
        let id = BlockID.hash(Data("abc".utf8))
        #expect(id.hex == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    }

    @Test func hexRoundTrip() {
        let id = BlockID.hash(Data("modelfs".utf8))
        #expect(BlockID(hex: id.hex) == id)
        #expect(BlockID(hex: id.hex.uppercased()) == id)
        #expect(BlockID(bytes: id.bytes) == id)
    }

    @Test(arguments: ["", "../../etc/passwd", String(repeating: "g", count: 64), String(repeating: "a", count: 63),
                      String(repeating: "a", count: 65), String(repeating: "a", count: 62) + "/x"])
    func rejectsMalformedHex(_ s: String) {
        #expect(BlockID(hex: s) == nil)
    }
}

@Suite struct ChunkerTests {
    static let small = ChunkerParameters(minSize: 2 << 10, averageSize: 8 << 10, maxSize: 32 << 10)

    @Test func chunkSizesStayWithinBounds() {
        let data = randomBytes(4 << 20, seed: 1)
        let lengths = data.withUnsafeBytes { Chunker.split($0, parameters: Self.small) }
        #expect(lengths.reduce(0, +) == data.count)
        for l in lengths.dropLast() { #expect(l >= Self.small.minSize && l <= Self.small.maxSize) }
        let average = Double(data.count) / Double(lengths.count)
        #expect(average > 4096 && average < 16384, "average chunk \(average)")
    }

    @Test func standardParametersAverageNearOneMiB() {
        let data = randomBytes(48 << 20, seed: 2)
        let lengths = data.withUnsafeBytes { Chunker.split($0) }
        let average = Double(data.count) / Double(lengths.count)
        #expect(average > 0.5 * 1048576 && average < 2 * 1048576, "average chunk \(average)")
        for l in lengths.dropLast() { #expect(l >= 256 << 10 && l <= 4 << 20) }
    }

    @Test func streamingInPiecesCutsTheSameAsWhole() {
        let data = randomBytes(1 << 20, seed: 3)
        let whole = data.withUnsafeBytes { Chunker.split($0, parameters: Self.small) }
        var g = SplitMix(seed: 4)
        var chunker = Chunker(Self.small)
        var lengths: [Int] = []
        var pos = 0, chunkStart = 0
        data.withUnsafeBytes { buf in
            while pos < buf.count {
                let piece = min(Int(g.next() % 5000) + 1, buf.count - pos)
                var off = 0
                while off < piece {
                    let (n, boundary) = chunker.consume(UnsafeRawBufferPointer(rebasing: buf[(pos + off)..<(pos + piece)]))
                    off += n
                    if boundary { lengths.append(pos + off - chunkStart); chunkStart = pos + off }
                }
                pos += piece
            }
        }
        if chunkStart < data.count { lengths.append(data.count - chunkStart) }
        #expect(lengths == whole)
    }

    @Test func insertionOnlyDisturbsNearbyChunks() {
        let data = randomBytes(2 << 20, seed: 5)
        var shifted = randomBytes(100, seed: 6)
        shifted += data
        func ids(_ d: [UInt8]) -> Set<BlockID> {
            d.withUnsafeBytes { buf in
                var out = Set<BlockID>()
                var p = 0
                for l in Chunker.split(buf, parameters: Self.small) {
                    out.insert(BlockID.hash(UnsafeRawBufferPointer(rebasing: buf[p..<p + l]))); p += l
                }
                return out
            }
        }
        let a = ids(data), b = ids(shifted)
        let shared = Double(a.intersection(b).count) / Double(a.count)
        #expect(shared > 0.9, "only \(shared) of chunks shared after a 100-byte insertion")
    }

    /// The definition of a boundary, one byte at a time: the chunker's four-bytes-per-step scan
    /// must cut exactly here (stored blocks are named by these cuts; a different cut would stop
    /// new writes deduplicating against old ones and against other nodes).
    static func referenceSplit(_ b: [UInt8], _ p: ChunkerParameters) -> [Int] {
        let bits = p.averageSize.trailingZeroBitCount
        func mask(_ n: Int) -> UInt64 {
            var m: UInt64 = 0, placed = 0, pos = 63
            while placed < n && pos >= 0 { m |= 1 << UInt64(pos); placed += 1; pos -= 2; if pos < 0 { pos = 62 } }
            return m
        }
        let strict = mask(bits + 2), loose = mask(max(1, bits - 2))
        var out: [Int] = []
        var start = 0
        while start < b.count {
            var h: UInt64 = 0
            var i = start + p.minSize
            var end = min(b.count, start + p.maxSize)
            while i < end {
                h = (h << 1) &+ gearTable[Int(b[i])]
                i += 1
                if h & (i - start <= p.averageSize ? strict : loose) == 0 { end = i }
            }
            out.append(end - start)
            start = end
        }
        return out
    }

    @Test(arguments: [1, 2, 3] as [UInt64])
    func cutsWhereTheOneByteDefinitionCuts(seed: UInt64) {
        for p in [ChunkerParameters.standard, Self.small, ChunkerParameters(minSize: 1, averageSize: 64, maxSize: 4096)] {
            let data = randomBytes(p == .standard ? 24 << 20 : 2 << 20, seed: seed)
            let fast = data.withUnsafeBytes { Chunker.split($0, parameters: p) }
            #expect(Self.firstDifference(fast, Self.referenceSplit(data, p)) == nil, "parameters \(p)")
        }
        // Low-entropy data, where the loose mask and maxSize cuts matter.
        var g = SplitMix(seed: seed)
        let sparse = (0..<(3 << 20)).map { _ in g.next() % 61 == 0 ? UInt8(truncatingIfNeeded: g.next()) : 0 }
        let fast = sparse.withUnsafeBytes { Chunker.split($0, parameters: Self.small) }
        #expect(Self.firstDifference(fast, Self.referenceSplit(sparse, Self.small)) == nil)
    }

    /// The index of the first chunk whose length differs (or where one list ends), nil if equal.
    static func firstDifference(_ a: [Int], _ b: [Int]) -> Int? {
        if let i = (0..<min(a.count, b.count)).first(where: { a[$0] != b[$0] }) { return i }
        return a.count == b.count ? nil : min(a.count, b.count)
    }

    @Test func zerosCutAtMaxSize() {
        let zeros = [UInt8](repeating: 0, count: 100 << 10)
        let lengths = zeros.withUnsafeBytes { Chunker.split($0, parameters: Self.small) }
        #expect(lengths.reduce(0, +) == zeros.count)
        for l in lengths.dropLast() { #expect(l >= Self.small.minSize && l <= Self.small.maxSize) }
    }
}

@Suite struct ByteRangeSetTests {
    /// Random inserts and removes against a bitmap model.
    @Test(arguments: [1, 2, 3, 4, 5] as [UInt64])
    func matchesBitmapModel(seed: UInt64) {
        var g = SplitMix(seed: seed)
        var set = ByteRangeSet()
        var model = [Bool](repeating: false, count: 512)
        for _ in 0..<400 {
            let a = UInt64(g.next() % 500), len = UInt64(g.next() % 40)
            let r = a..<min(512, a + len)
            if g.next() % 3 == 0 { set.remove(r); for i in r { model[Int(i)] = false } } else {
                set.insert(r); for i in r { model[Int(i)] = true }
            }
            // Ranges are sorted, disjoint, non-touching and cover exactly the model.
            for (x, y) in zip(set.ranges, set.ranges.dropFirst()) { #expect(x.upperBound < y.lowerBound) }
            var covered = [Bool](repeating: false, count: 512)
            for r in set.ranges { for i in r { covered[Int(i)] = true } }
            #expect(covered == model)
            let q = UInt64(g.next() % 500)..<UInt64(500 + g.next() % 12)
            #expect(set.intersects(q) == q.contains { model[Int($0)] })
            var pos = q.lowerBound
            for p in set.pieces(of: q) {
                #expect(p.range.lowerBound == pos)
                for i in p.range { #expect(model[Int(i)] == p.covered) }
                pos = p.range.upperBound
            }
            #expect(pos == q.upperBound)
        }
    }
}

@Suite struct ManifestTests {
    @Test func roundTrip() throws {
        let m = Manifest(chunks: (0..<10).map { ChunkRef(id: BlockID.hash(Data([UInt8($0)])), length: UInt32($0 * 1000 + 1)) })
        #expect(try Manifest(decoding: m.encoded()) == m)
        #expect(try ManifestRef(decoding: ManifestRef.inline(m).encoded()) == .inline(m))
        let ref = ManifestRef.block(BlockID.hash(Data("x".utf8)), chunkCount: 77)
        #expect(try ManifestRef(decoding: ref.encoded()) == ref)
        #expect(m.offsets().last == m.byteCount)
    }

    @Test func malformedIsAnError() {
        #expect(throws: FSError.self) { try Manifest(decoding: Data("MFM1\u{1}\0\0\0".utf8)) }
        #expect(throws: FSError.self) { try Manifest(decoding: Data("nope".utf8)) }
        #expect(throws: FSError.self) { try ManifestRef(decoding: Data([7, 1, 2])) }
    }
}

@Suite struct WorkersTests {
    /// Every one of `n` calls waits until all `n` have started: it only finishes if all run at
    /// once (Dispatch's concurrent queue ran 4 at a time on this 2-vCPU machine).
    final class Barrier: @unchecked Sendable {
        let n: Int
        let lock = NSCondition()
        var arrived = 0
        init(_ n: Int) { self.n = n }
        func arriveAndWait(timeout: Double) -> Bool {
            lock.lock(); defer { lock.unlock() }
            arrived += 1
            lock.broadcast()
            let deadline = Date().addingTimeInterval(timeout)
            while arrived < n { if !lock.wait(until: deadline) { return false } }
            return true
        }
    }

    @Test func sixteenBlockingCallsRunAtOnce() {
        let workers = Workers("test", count: 16)
        defer { workers.stop() }
        let barrier = Barrier(16)
        let met = Mutex(0)
        let done = DispatchSemaphore(value: 0)
        for _ in 0..<16 {
            workers.async {
                if barrier.arriveAndWait(timeout: 10) { met.withLock { $0 += 1 } }
                done.signal()
            }
        }
        for _ in 0..<16 { done.wait() }
        #expect(met.withLock { $0 } == 16)
    }

    @Test func oneThreadRunsInOrderAndStopFinishesWhatWasGiven() {
        let workers = Workers("test", count: 1)
        let seen = Mutex<[Int]>([])
        let done = DispatchSemaphore(value: 0)
        for i in 0..<2000 { workers.async { seen.withLock { $0.append(i) } } }
        workers.async { done.signal() }
        workers.stop()
        #expect(done.wait(timeout: .now() + 10) == .success)
        #expect(seen.withLock { $0 } == Array(0..<2000))
        #expect(workers.queued == 0)
    }

    @Test func parallelForCallsEachIndexOnceOnWidthThreads() {
        let barrier = Barrier(12)
        let calls = Mutex<[Int]>([])
        let met = Mutex(0)
        parallelFor(12, width: 12) { i in
            if barrier.arriveAndWait(timeout: 10) { met.withLock { $0 += 1 } }
            calls.withLock { $0.append(i) }
        }
        #expect(met.withLock { $0 } == 12)
        #expect(calls.withLock { $0 }.sorted() == Array(0..<12))
        let more = Mutex<[Int]>([])
        parallelFor(1000, width: 3) { i in more.withLock { $0.append(i) } }
        #expect(more.withLock { $0 }.sorted() == Array(0..<1000))
    }
}

@Suite struct BackgroundLoopTests {
    /// Rounds follow the delay each returns; a poke ends a long sleep at once; stop waits for
    /// the round under way and no round starts after it.
    @Test func roundsSleepAsToldPokeWakesStopWaits() {
        let loop = BackgroundLoop("test-loop")
        let rounds = Mutex(0)
        let inRound = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        loop.start {
            let n = rounds.withLock { r in r += 1; return r }
            if n == 3 { inRound.signal(); release.wait() }   // the third round blocks until told
            return n == 1 ? 0 : 3600                         // the second would sleep an hour
        }
        // Round 1 returns 0: round 2 follows at once, then sleeps an hour.
        #expect(waitFor { rounds.withLock { $0 } == 2 })
        #expect(!loop.sleep(0))
        loop.poke()
        #expect(inRound.wait(timeout: .now() + 10) == .success, "the poke did not end the hour's sleep")
        let stopper = Thread { loop.stop(timeout: 10) }
        stopper.start()
        #expect(waitFor { loop.isStopped })
        release.signal()
        #expect(waitFor { rounds.withLock { $0 } == 3 })
        Thread.sleep(forTimeInterval: 0.2)   // a round after the stop would show in this time
        #expect(rounds.withLock { $0 } == 3)
        #expect(loop.sleep(3600), "a stopped loop's sleep returns at once, saying it stops")
    }

    @Test func aLoopStoppedBeforeItStartsRunsNoRound() {
        let loop = BackgroundLoop("test-loop")
        loop.stop()
        let ran = Mutex(false)
        loop.start { ran.withLock { $0 = true }; return 0 }
        Thread.sleep(forTimeInterval: 0.1)   // a round would have run by now
        #expect(!ran.withLock { $0 })
    }

    private func waitFor(_ cond: () -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline { if cond() { return true }; Thread.sleep(forTimeInterval: 0.005) }
        return false
    }
}

@Suite struct RawNameTests {
    @Test(arguments: [
        Array("model.safetensors".utf8), Array("日本語.pt".utf8), [0x63, 0x61, 0x66, 0xE9],   // "café" in Latin-1
        [0xFF, 0xFE], [0xC3], [0xE2, 0x82], [0xED, 0xA0, 0x80],   // a lone lead, a cut sequence, a UTF-8 surrogate
        [0xC0, 0xAF], [0xF4, 0x90, 0x80, 0x80],                     // overlong, beyond U+10FFFF
        Array("\u{10FF41}x".utf8), [0xF4, 0x8F, 0xBF, 0xBF],       // valid characters of the escape range
        Array(0x01...0xFF).filter { $0 != 0x2F },
    ] as [[UInt8]])
    func bytesRoundTrip(_ bytes: [UInt8]) {
        let s = RawName.string(bytes)
        #expect(RawName.bytes(s) == bytes)
        #expect(RawName.byteCount(s) == bytes.count)
        RawName.withCString(s) { p in #expect(strlen(p) == bytes.count) }
    }

    /// The mapping as first written, scalar by scalar with the standard library's validation:
    /// the fast one must give the same string for any bytes.
    static func reference(_ bytes: [UInt8]) -> String {
        if !bytes.contains(0xF4), let s = String(validating: bytes, as: UTF8.self) { return s }
        var scalars = String.UnicodeScalarView()
        var i = 0
        while i < bytes.count {
            let n = RawName.sequenceLength(bytes[i])
            if n > 1, i + n <= bytes.count, let s = String(validating: bytes[i..<(i + n)], as: UTF8.self),
               let scalar = s.unicodeScalars.first, scalar.value < 0x10FF00 {
                scalars.append(scalar)
                i += n
            } else if n == 1 {
                scalars.append(Unicode.Scalar(bytes[i]))
                i += 1
            } else {
                scalars.append(Unicode.Scalar(0x10FF00 + UInt32(bytes[i]))!)
                i += 1
            }
        }
        return String(scalars)
    }

    @Test func randomBytesMapAsTheStandardLibraryValidates() {
        var rng = SystemRandomNumberGenerator()
        // Weighted towards lead and continuation bytes, so that valid and cut sequences both occur.
        let pool: [UInt8] = Array(0x01...0xFF) + Array(0x80...0xBF) + [0xC2, 0xDF, 0xE0, 0xED, 0xEF, 0xF0, 0xF4, 0x8F, 0xBC, 0xBF]
        for _ in 0..<20_000 {
            let bytes = (0..<Int.random(in: 1...12, using: &rng)).map { _ in pool.randomElement(using: &rng)! }
            let s = RawName.string(bytes)
            #expect(s == Self.reference(bytes), "\(bytes)")
            #expect(RawName.bytes(s) == bytes)
        }
    }

    @Test func validUTF8IsTheStringItSpells() {
        #expect(RawName.string(Array("日本語.pt".utf8)) == "日本語.pt")
        #expect(RawName.string([0x63, 0x61, 0x66, 0xE9]) == "caf\u{10FFE9}")
    }

    @Test func distinctBytesAreDistinctStrings() {
        // A valid character of the escape range and the bytes it would stand for differ.
        let a = RawName.string(Array("\u{10FF41}".utf8)), b = RawName.string([0x41])
        #expect(a != b)
        #expect(RawName.string([0xE9]) != RawName.string(Array("\u{10FFE9}".utf8)))
    }
}

@Suite struct LogTests {
    @Test func aRepeatedFailureIsLoggedOncePerInterval() {
        let key = "test \(UUID())"
        #expect(Log.every(key, 3600, .error, "first"))
        for _ in 0..<100 { #expect(!Log.every(key, 3600, .error, "again")) }
        // Another key is its own.
        #expect(Log.every(key + " other", 3600, .error, "other"))
        // A short interval: the next line after it passes is written (with the count of the rest).
        let quick = "quick \(UUID())"
        #expect(Log.every(quick, 0.01, .error, "one"))
        let start = Date()
        var again = false
        while !again && Date().timeIntervalSince(start) < 5 { again = Log.every(quick, 0.01, .error, "two") }
        #expect(again)
    }

    @Test func levelsFilter() {
        #expect(Log.level(named: "DEBUG") == .debug)
        #expect(Log.level(named: "warn") == .warning)
        #expect(Log.level(named: "chatty") == nil)
        #expect(!Log.enabled(.debug))  // the default level is info
        #expect(Log.enabled(.info) && Log.enabled(.error))
        #expect(!Log.every("below \(UUID())", 60, .debug, "not written"))
    }
}

/// The lock order (`LockRank`) is checked in debug builds: an inversion traps where it happens.
@Suite struct LockOrderTests {
    @Test func theDocumentedOrderNests() {
        let session = RankedLock(.session), commit = RankedLock(.commit), append = RankedLock(.storeAppend)
        session.withLock {
            commit.withLock {
                LockOrder.holding(.metadata) {
                    append.withLock { LockOrder.holding(.tables) {} }
                }
            }
        }
        // `try` never waits: out of order is allowed, and it counts as held until unlocked.
        commit.withLock {
            #expect(session.try())
            session.unlock()
        }
        session.withLock {}
    }

    #if DEBUG
    @Test func anInversionTraps() async {
        await #expect(processExitsWith: .failure) {
            let session = RankedLock(.session), commit = RankedLock(.commit)
            commit.lock()
            session.lock()   // a session lock under the commit lock: the order says the other way
        }
    }

    @Test func aSecondLockOfTheSameRankTraps() async {
        await #expect(processExitsWith: .failure) {
            let a = RankedLock(.session), b = RankedLock(.session)
            a.lock()
            b.lock()   // two sessions at once could deadlock against two taken the other way
        }
    }
    #endif
}
