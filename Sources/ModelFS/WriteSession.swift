import Foundation
import ModelFSCore
import ModelFSMeta
import ModelFSStore
import Synchronization

/// The content of a file while it is open for writing on this node (DESIGN.md §3).
///
/// The content is seen in layers, newest on top:
/// 1. `overlay`: bytes written out of order (seek back to patch a header, HDF5 in-place
///    updates), kept in an anonymous staging file at their file offsets, with their ranges.
/// 2. the stream: writes arriving in order at the end of the chunked content are chunked, hashed
///    and stored as they arrive (`base` grows, `writer` holds the unfinished chunk). Writes that
///    arrive slightly ahead (the kernel's writeback can reorder requests) wait in `reorder` for
///    the gap to fill, so they stream too.
/// 3. `base`: the chunks of the committed version (and of streamed data), cut off at
///    `baseLimit` by a truncate; beyond the chunks the file reads as zeros.
///
/// `commit` keeps every base chunk that nothing touched, re-chunks only the dirty regions, and
/// installs the new manifest in one metadata transaction. A crash before that leaves the previous
/// version untouched: a reader sees the old version or the new one, never a mix.
///
/// Invariants: reorder entries never overlap each other and are newer than overlay bytes at the
/// same offsets; overlay bytes are newer than stream/base bytes at the same offsets.
final class WriteSession: @unchecked Sendable {
    let ino: InodeNumber
    private let store: any BlockStore
    private let reader: BlockReader
    private let parameters: ChunkerParameters
    private let stagingDir: String
    let lock = RankedLock(.session)

    private(set) var base: ChunkList
    private var baseLimit: UInt64 = .max
    private var writer: ChunkWriter
    private var streaming = true
    private var overlay = ByteRangeSet()
    private var overlayFD: Int32 = -1
    private var reorder: [UInt64: ReorderedWrite] = [:]
    private var reorderBytes = 0
    private(set) var size: UInt64
    private(set) var dirty = false
    /// On a cluster node: what entitles this session to commit (its write lock's epoch and the
    /// version it last committed or started from); nil on one node.
    var fence: CommitFence?
    /// A write that failed (disk full): every later write and commit fails the same way until the
    /// file is closed, and the committed version stays as it was.
    private var failure: (any Error)?

    static let reorderWindow: UInt64 = 64 << 20
    static let reorderLimit = 32 << 20
    static let catchUpPiece = 4 << 20
    let counters: WriteCounters
    /// Reused for reading staged bytes back into the stream.
    private var catchUpBuffer: BlockBuffer?

    init(ino: InodeNumber, manifest: Manifest, size: UInt64, store: any BlockStore, reader: BlockReader,
         parameters: ChunkerParameters, stagingDir: String, counters: WriteCounters) {
        self.ino = ino
        self.counters = counters
        self.store = store
        self.reader = reader
        self.parameters = parameters
        self.stagingDir = stagingDir
        base = ChunkList(manifest)
        self.size = size
        writer = ChunkWriter(parameters: parameters)
        pipeline = ChunkPipeline(store: store)
        if base.end != size { streaming = false; baseLimit = min(base.end, size) }
    }

    deinit { if overlayFD >= 0 { close(overlayFD) } }

    /// Streamed chunks being hashed and stored in the background, not yet in `base`.
    private let pipeline: ChunkPipeline
    private var pipelinedBytes: UInt64 = 0

    private var streamPosition: UInt64 { base.end + pipelinedBytes + UInt64(writer.length) }

    /// `drainPipeline`, making a failure sticky (see `failure`).
    private func drainOrFail() throws {
        do { try drainPipeline() } catch {
            failure = WriteSession.storeFailure(error)
            throw failure!
        }
    }

    /// Throws the session's failure, taking the pipeline's as it if there is none yet.
    private func throwIfFailed() throws {
        if failure == nil, let e = pipeline.failure { failure = WriteSession.storeFailure(e) }
        if let failure { throw failure }
    }

    /// A failure that sticks to the session: the filesystem's own answers and the store's (a full
    /// disk stays ENOSPC at the edge); anything else is reported as a failed store.
    static func storeFailure(_ e: any Error) -> any Error { sticky(e) ? e : FSError.io("storing a block failed", cause: e) }
    static func sticky(_ e: any Error) -> Bool { e is FSError || e is StoreError }

    /// Moves every chunk the pipeline finished into `base` (waiting for the rest): needed before
    /// `base` is read or cut.
    private func drainPipeline() throws {
        guard pipelinedBytes > 0 else { return }
        for chunk in try pipeline.drain() {
            base.append(chunk)
            pipelinedBytes -= UInt64(chunk.length)
        }
    }

    /// The block IDs the session currently references (for garbage collection): its base and
    /// the streamed chunks the pipeline stored but nobody drained yet. (Missing the latter, a GC
    /// pass during a write longer than a second collected its early chunks: found by the cluster
    /// benchmark, whose 2 GiB writes outlasted the 60 s GC period.)
    var referencedBlocks: [BlockID] { base.chunks.map(\.id) + pipeline.storedIDs }

    // MARK: writes

    /// Takes `bytes` at `offset`. `acknowledge`, if given, is called once the bytes can no longer
    /// be refused; for the next bytes of the stream that is before they are chunked (see below).
    /// Callers hold the session's lock, so whatever the acknowledgement lets in waits for this.
    func write(at offset: UInt64, _ bytes: UnsafeRawBufferPointer, acknowledge: (() -> Void)? = nil) throws {
        try throwIfFailed()
        guard !bytes.isEmpty else { acknowledge?(); return }
        let end = offset + UInt64(bytes.count)
        var acknowledged = false
        do {
            if streaming && offset == streamPosition {
                if reorderOverlaps(offset..<end) { try spillReorder() }
                // In order: from here on nothing refuses these bytes (a failure of the store or
                // of the catch-up below is kept and reported by the next write, fsync and
                // close(), as the pipeline's own failures are). Answered now, the writer and the
                // kernel prepare the next request while these bytes are chunked. The session is
                // marked dirty first, so that close() commits, and so reports such a failure.
                if let acknowledge { size = max(size, end); dirty = true; acknowledge(); acknowledged = true }
                try stream(bytes)
                overlay.remove(offset..<end)
                try catchUp()
            } else if streaming && offset > streamPosition && offset - streamPosition <= WriteSession.reorderWindow
                        && reorderBytes + bytes.count <= WriteSession.reorderLimit && !reorderOverlaps(offset..<end) {
                reorder[offset] = ReorderedWrite(bytes)
                reorderBytes += bytes.count
            } else {
                try spillReorder()
                try writeOverlay(at: offset, bytes)
            }
        } catch where WriteSession.sticky(error) {
            failure = error
            throw error
        } catch {
            if acknowledged { failure = WriteSession.storeFailure(error) }
            throw error
        }
        size = max(size, end)
        dirty = true
        if !acknowledged { acknowledge?() }
    }

    /// After the stream advanced: continue it with bytes that arrived ahead of it — from the
    /// reorder buffer, or from the staging file when they had to be staged (a write far ahead,
    /// or more than the reorder buffer holds). The stream never stalls behind data that already
    /// arrived, so a sequential writer keeps streaming however the kernel orders its requests.
    private func catchUp() throws {
        while true {
            let at = streamPosition
            if let next = reorder.removeValue(forKey: at) {
                reorderBytes -= next.count
                try next.withUnsafeBytes { try stream($0) }
                overlay.remove(at..<at + UInt64(next.count))
                continue
            }
            guard let staged = overlay.range(containing: at) else { return }
            // Stop at the next reorder entry: it is newer than the staged bytes it overlaps.
            let nextReorder = reorder.keys.filter { $0 > at }.min() ?? .max
            let end = min(staged.upperBound, nextReorder, at + UInt64(WriteSession.catchUpPiece))
            let n = Int(end - at)
            let buffer = catchUpBuffer ?? BlockBuffer(count: WriteSession.catchUpPiece)
            catchUpBuffer = buffer
            try withExtendedLifetime(buffer) {
                try readOverlay(at..<end, into: buffer.pointer)
                try stream(UnsafeRawBufferPointer(start: buffer.pointer, count: n))
            }
            overlay.remove(at..<end)
            counters.add(absorbed: end - at)
        }
    }

    private func reorderOverlaps(_ r: Range<UInt64>) -> Bool {
        reorder.contains { $0.key < r.upperBound && $0.key + UInt64($0.value.count) > r.lowerBound }
    }

    private func stream(_ bytes: UnsafeRawBufferPointer) throws {
        counters.add(streamed: UInt64(bytes.count))
        try writer.append(bytes) { buffer, length in
            pipelinedBytes += UInt64(length)
            pipeline.submit(buffer, length)
        }
    }

    private func spillReorder() throws {
        guard !reorder.isEmpty else { return }
        for (offset, bytes) in reorder.sorted(by: { $0.key < $1.key }) {
            try bytes.withUnsafeBytes { try writeOverlay(at: offset, $0) }
        }
        reorder.removeAll()
        reorderBytes = 0
    }

    private func openOverlay() throws -> Int32 {
        if overlayFD >= 0 { return overlayFD }
        // An anonymous file: unlinked at once, so a crash leaves nothing behind.
        let path = "\(stagingDir)/\(ino.rawValue).\(UInt64.random(in: 0...UInt64.max))"
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw posixError("create staging file", path) }
        unlink(path)
        overlayFD = fd
        return fd
    }

    private func writeOverlay(at offset: UInt64, _ bytes: UnsafeRawBufferPointer) throws {
        let fd = try openOverlay()
        var done = 0
        while done < bytes.count {
            let r = pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done))
            if r < 0 {
                if errno == EINTR { continue }
                throw errno == ENOSPC ? FSError.noSpace("staging: disk full") : posixError("write staging file", "for \(ino)")
            }
            done += r
        }
        overlay.insert(offset..<offset + UInt64(bytes.count))
        counters.add(staged: UInt64(bytes.count))
    }

    /// Appends `chunks` (stored blocks of another version) to the stream without their bytes
    /// passing through, when the stream stands exactly at `offset` with no unfinished chunk
    /// (copy_file_range sharing blocks). Returns the bytes added, or nil (nothing done) when
    /// the session is not in that state.
    func share(_ chunks: ArraySlice<ChunkRef>, at offset: UInt64) throws -> UInt64? {
        try throwIfFailed()
        guard streaming, !chunks.isEmpty, reorder.isEmpty, writer.length == 0, offset == streamPosition else { return nil }
        try drainOrFail()
        let bytes = chunks.reduce(UInt64(0)) { $0 + UInt64($1.length) }
        for c in chunks { base.append(c) }
        // Staged bytes at these offsets are older than the copy.
        overlay.remove(offset..<offset + bytes)
        size = max(size, offset + bytes)
        dirty = true
        try catchUp()
        return bytes
    }

    func truncate(to newSize: UInt64) throws {
        if let failure { throw failure }
        try drainOrFail()
        try spillReorder()
        dirty = true
        if newSize == 0 {
            // O_TRUNC: start over, streaming from offset 0.
            base = ChunkList()
            baseLimit = .max
            writer.discard()
            overlay = ByteRangeSet()
            if overlayFD >= 0 { _ = ftruncate(overlayFD, 0) }
            streaming = true
            size = 0
            return
        }
        if newSize < streamPosition {
            // The stream ends here: finish its chunk; the truncated part is cut off by baseLimit.
            do { try finishStream() } catch where WriteSession.sticky(error) { failure = error; throw error }
            baseLimit = min(baseLimit, newSize)
            streaming = false
        }
        overlay.clip(to: newSize)
        size = newSize
    }

    /// Cuts the unfinished chunk and waits until every streamed chunk is in `base`.
    private func finishStream() throws {
        try writer.finish { buffer, length in
            pipelinedBytes += UInt64(length)
            pipeline.putNow(buffer, length)
        }
        try drainPipeline()
    }

    // MARK: reads

    /// Copies the current content of [offset, offset+count) (clipped to the size) into `dst`.
    func read(at offset: UInt64, count: Int, into dst: UnsafeMutableRawPointer) throws -> Int {
        if let failure { throw failure }
        guard offset < size else { return 0 }
        let end = min(size, offset + UInt64(count))
        try spillReorder()
        try drainOrFail()
        try content(offset..<end, into: dst)
        return Int(end - offset)
    }

    /// The bytes of the content layers for `range` (within the size).
    private func content(_ range: Range<UInt64>, into dst: UnsafeMutableRawPointer) throws {
        for piece in overlay.pieces(of: range) {
            let out = dst + Int(piece.range.lowerBound - range.lowerBound)
            if piece.covered {
                try readOverlay(piece.range, into: out)
            } else {
                try baseContent(piece.range, into: out)
            }
        }
    }

    private func readOverlay(_ r: Range<UInt64>, into dst: UnsafeMutableRawPointer) throws {
        var done = 0
        let n = Int(r.upperBound - r.lowerBound)
        while done < n {
            let got = pread(overlayFD, dst + done, n - done, off_t(r.lowerBound) + off_t(done))
            if got < 0 { if errno == EINTR { continue }; throw posixError("read staging file", "for \(ino)") }
            if got == 0 { memset(dst + done, 0, n - done); break }
            done += got
        }
    }

    /// Base chunks below `baseLimit`, then the unfinished chunk, then zeros.
    private func baseContent(_ r: Range<UInt64>, into dst: UnsafeMutableRawPointer) throws {
        var pos = r.lowerBound
        let limit = min(baseLimit, base.end)
        if pos < limit {
            let e = min(r.upperBound, limit)
            try base.read(pos..<e, into: dst, reader: reader)
            pos = e
        }
        let tailEnd = streaming ? streamPosition : base.end
        if pos < r.upperBound && pos >= base.end && pos < tailEnd {
            let e = min(r.upperBound, tailEnd)
            writer.copyPending(from: Int(pos - base.end), count: Int(e - pos), to: dst + Int(pos - r.lowerBound))
            pos = e
        }
        if pos < r.upperBound { memset(dst + Int(pos - r.lowerBound), 0, Int(r.upperBound - pos)) }
    }

    // MARK: commit

    /// Builds the new version's manifest: untouched chunks are kept, dirty regions re-chunked.
    /// The caller installs it in metadata, then calls `committed(_:)`.
    func prepareCommit() throws -> Manifest {
        if let failure { throw failure }
        do {
            try spillReorder()
            try finishStream()
            let clean = min(baseLimit, base.end, size)
            var out = ChunkList()
            var dirtyStart: UInt64?
            for (i, c) in base.chunks.enumerated() {
                let a = base.offsets[i], b = base.offsets[i + 1]
                if a >= size { break }
                if b <= clean && !overlay.intersects(a..<b) {
                    if let s = dirtyStart { try rechunk(s..<a, into: &out); dirtyStart = nil }
                    out.append(c)
                } else if dirtyStart == nil {
                    dirtyStart = a
                }
            }
            let regionStart = dirtyStart ?? out.end
            if regionStart < size {
                // Beyond the last byte written (base chunks, staged bytes) the file is a hole:
                // its zero chunks are named without reading or hashing anything, so extending
                // a file by ftruncate or fallocate costs nothing per byte.
                // Holes between written pieces (a pwrite far beyond the end) likewise, when they
                // are large enough to matter.
                var data = overlay
                let limit = min(baseLimit, base.end, size)
                if regionStart < limit { data.insert(regionStart..<limit) }
                let holeMin = 2 * UInt64(ChunkerParameters.largestChunk)
                var segment = regionStart   // start of the data not yet chunked
                var pos = regionStart       // end of the data seen so far
                for r in data.ranges where r.upperBound > regionStart && r.lowerBound < size {
                    let lo = max(r.lowerBound, regionStart)
                    if lo > pos && lo - pos >= holeMin {
                        if segment < pos { try rechunk(segment..<pos, into: &out) }
                        try appendZeros(lo - pos, into: &out)
                        segment = lo
                    }
                    pos = max(pos, min(r.upperBound, size))
                }
                if size - pos >= holeMin {
                    if segment < pos { try rechunk(segment..<pos, into: &out) }
                    try appendZeros(size - pos, into: &out)
                } else if segment < size {
                    try rechunk(segment..<size, into: &out)
                }
            }
            return out.manifest
        } catch where WriteSession.sticky(error) {
            failure = error
            throw error
        }
    }

    /// `count` zero bytes as maximum-size zero chunks (and one shorter at the end).
    private func appendZeros(_ count: UInt64, into out: inout ChunkList) throws {
        var left = count
        let full = UInt64(min(parameters.maxSize, ChunkerParameters.largestChunk))
        while left > 0 {
            let n = Int(min(left, full))
            out.append(ChunkRef(id: try ZeroBlocks.store(n, in: store), length: UInt32(n)))
            left -= UInt64(n)
        }
    }

    private func rechunk(_ region: Range<UInt64>, into out: inout ChunkList) throws {
        var w = ChunkWriter(parameters: parameters)
        let window = 1 << 20
        let scratch = BlockBuffer(count: window)
        var pos = region.lowerBound
        try withExtendedLifetime(scratch) {
            while pos < region.upperBound {
                let n = Int(min(UInt64(window), region.upperBound - pos))
                try content(pos..<pos + UInt64(n), into: scratch.pointer)
                try w.append(UnsafeRawBufferPointer(start: scratch.pointer, count: n)) { buffer, length in
                    out.append(try ChunkWriter.store(buffer, length, in: store))
                }
                pos += UInt64(n)
            }
        }
        try w.finish { buffer, length in
            out.append(try ChunkWriter.store(buffer, length, in: store))
        }
    }

    /// The new manifest is installed: it becomes the base, and streaming can resume at its end.
    func committed(_ manifest: Manifest) {
        base = ChunkList(manifest)
        baseLimit = .max
        writer.discard()
        overlay = ByteRangeSet()
        if overlayFD >= 0 { _ = ftruncate(overlayFD, 0) }
        streaming = true
        dirty = false
    }
}

/// A write that arrived ahead of the stream, kept in pooled block memory (a fresh array per
/// 1 MiB request cost a page fault and a page clear per 4 KiB: a third of the daemon's CPU).
struct ReorderedWrite {
    let buffer: BlockBuffer
    let count: Int

    init(_ bytes: UnsafeRawBufferPointer) {
        count = bytes.count
        buffer = BlockBuffer(count: bytes.count)
        buffer.pointer.copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
    }

    func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try buffer.withUnsafeBytes { try body(UnsafeRawBufferPointer(rebasing: $0[0..<count])) }
    }
}

/// How written bytes travelled, summed over all sessions: streamed straight into blocks, staged
/// (written out of order to the staging file), and staged bytes later absorbed by the stream.
public final class WriteCounters: @unchecked Sendable {
    /// Bytes streamed into blocks, staged out of order, staged and later streamed, and copied
    /// by copy_file_range as shared blocks (`cloned`: no byte read or written).
    public struct Values: Sendable, Codable {
        public var streamed: UInt64 = 0, staged: UInt64 = 0, absorbed: UInt64 = 0, cloned: UInt64 = 0
    }
    private let values = Mutex(Values())
    public init() {}
    func add(streamed: UInt64 = 0, staged: UInt64 = 0, absorbed: UInt64 = 0, cloned: UInt64 = 0) {
        values.withLock { $0.streamed += streamed; $0.staged += staged; $0.absorbed += absorbed; $0.cloned += cloned }
    }
    public var snapshot: Values { values.withLock { $0 } }
}

/// Blocks of zeros, by length: hashed once per process, stored (or found stored) on use. The
/// zeros are one lazily mapped allocation (calloc of the largest chunk: the kernel's zero page
/// until written, so no memory is used).
enum ZeroBlocks {
    private static let ids = Mutex<[Int: BlockID]>([:])
    nonisolated(unsafe) private static let zeros = UnsafeRawPointer(calloc(1, ChunkerParameters.largestChunk)!)

    static func store(_ length: Int, in store: any BlockStore) throws -> BlockID {
        precondition(length <= ChunkerParameters.largestChunk)
        let bytes = UnsafeRawBufferPointer(start: zeros, count: length)
        let id = ids.withLock { known in
            if let id = known[length] { return id }
            let id = BlockID.hash(bytes)
            known[length] = id
            return id
        }
        try store.put(id, bytes)   // found stored: only touched
        return id
    }
}
