import Foundation
import ModelFSCore
import ModelFSMeta
import ModelFSStore
import Synchronization

// Writing through open handles, and what makes writes durable and visible: flush, fsync,
// commit (with replication and the writer lock's fence), release; other nodes' changes.

extension FileSystem {
    /// Writes `bytes` at `offset` through an open handle. `caller` matters for direct writes only:
    /// the kernel leaves clearing set-id bits to us there (root, taken to hold CAP_FSETID, keeps them).
    /// `acknowledge`, if given, is called once the bytes are accepted, possibly before they are
    /// chunked (WriteSession.write): a FUSE server answers the request there. After it was
    /// called a thrown error is the session's failure, reported by later writes, fsync and close.
    public func write(_ fh: FileHandleID, at offset: UInt64, _ bytes: UnsafeRawBufferPointer,
                      caller: RequestContext = .root, acknowledge: (() -> Void)? = nil) throws -> Int {
        // The kernel clears set-id bits itself before a write through its page cache, and leaves
        // it to the filesystem for a direct one (libfuse 3.14 does not pass on its flag saying
        // the writer lacks CAP_FSETID: root is taken to hold it). Looked up with the handle, in
        // one lock.
        let (found, clearSetID) = withTables { t -> (Handle?, Bool) in
            guard let h = t.handles[fh.rawValue] else { return (nil, false) }
            guard h.direct && caller.uid != 0, let l = t.live[h.ino], l.setID else { return (h, false) }
            l.setID = false
            return (h, true)
        }
        guard let h = found else { throw FSError.badHandle() }
        guard h.writable, let s = session(of: h.ino) else { throw FSError.badHandle("file is not open for writing") }
        servedRequests.add(1, ordering: .relaxed)
        try FileSystem.checkSize(offset + UInt64(bytes.count))
        if clearSetID {
            let mode = try meta.getattr(h.ino).mode
            _ = try meta.setattr(h.ino, AttributeChanges(mode: mode & ~FileSystem.setIDClearedByWrite(mode)), now: .now())
        }
        s.lock.lock(); defer { s.lock.unlock() }
        do { try s.write(at: offset, bytes, acknowledge: acknowledge) } catch { garbageHint(); throw error }
        return bytes.count
    }

    /// copy_file_range(2) between two files of the mount (or within one): the bytes of `fhIn`
    /// from `offsetIn` (up to its end) written to `fhOut` at `offsetOut`, in the daemon, in one
    /// request (without it the kernel copies through both files' page caches, a READ and a
    /// WRITE request per 128 KiB). Where the copy lands at the end of what the destination has
    /// streamed so far and starts at a chunk boundary of the source's committed version (`cp`
    /// of a whole file), whole chunks are shared, not copied: the destination's manifest names
    /// the same blocks (stored on this node), no byte is read or written. Returns the bytes
    /// copied (0 at the source's end).
    public func copyFileRange(_ fhIn: FileHandleID, offsetIn: UInt64, _ fhOut: FileHandleID, offsetOut: UInt64,
                              length: Int) throws -> Int {
        let hIn = try handle(fhIn), hOut = try handle(fhOut)
        guard hOut.writable, let s = session(of: hOut.ino) else { throw FSError.badHandle("file is not open for writing") }
        var done = 0
        let (sourceSession, view) = withTables { t in (t.live[hIn.ino]?.session, t.live[hIn.ino]?.view) }
        if sourceSession == nil, let view, hIn.ino != hOut.ino {
            let chunks = view.wholeChunks(from: offsetIn, upTo: offsetIn + UInt64(length))
            if !chunks.isEmpty, chunks.allSatisfy({ store.contains($0.id) }) {
                s.lock.lock()
                let shared: UInt64?
                do { shared = try s.share(chunks, at: offsetOut) } catch { s.lock.unlock(); throw error }
                s.lock.unlock()
                if let shared {
                    done = Int(shared)
                    writeCounters.add(cloned: shared)
                }
            }
        }
        // The rest (or all of it) as bytes, a piece at a time.
        let piece = 4 << 20
        while done < length {
            let slices = try readSlices(fhIn, at: offsetIn + UInt64(done), count: min(piece, length - done))
            if slices.isEmpty { break }
            for slice in slices {
                try slice.buffer.withUnsafeBytes { b in
                    _ = try write(fhOut, at: offsetOut + UInt64(done), UnsafeRawBufferPointer(rebasing: b[slice.offset..<slice.offset + slice.count]))
                }
                done += slice.count
            }
        }
        return done
    }

    /// FALLOC_FL_PUNCH_HOLE and FALLOC_FL_ZERO_RANGE (linux/falloc.h).
    static let punchHole: Int32 = 0x02, zeroRange: Int32 = 0x10

    /// Plain fallocate grows the file (its new bytes a hole: zero chunks, nothing stored);
    /// KEEP_SIZE alone does nothing (space is taken when written); PUNCH_HOLE (with KEEP_SIZE,
    /// as Linux requires) and ZERO_RANGE make the range read as zeros: they are written as
    /// zeros, which the chunker cuts into zero chunks that deduplicate to a block each (the
    /// range costs hashing, not space). Collapse and insert range: EOPNOTSUPP.
    public func fallocate(_ fh: FileHandleID, mode: Int32, offset: UInt64, length: UInt64, keepSizeFlag: Int32) throws {
        let h = try handle(fh)
        guard h.writable, let s = session(of: h.ino) else { throw FSError.badHandle("file is not open for writing") }
        guard mode & ~(keepSizeFlag | Self.punchHole | Self.zeroRange) == 0 else {
            throw FSError(EOPNOTSUPP, "fallocate: collapse and insert range are not supported (plain, KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE are)")
        }
        let keepSize = mode & keepSizeFlag != 0
        try FileSystem.checkSize(offset + length)
        s.lock.lock(); defer { s.lock.unlock() }
        if mode & (Self.punchHole | Self.zeroRange) != 0 {
            let end = keepSize ? min(offset + length, s.size) : offset + length
            var at = offset
            while at < end {
                let n = Int(min(end - at, UInt64(FileSystem.zeros.count)))
                try FileSystem.zeros.withUnsafeBytes { try s.write(at: at, UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
                at += UInt64(n)
            }
            return
        }
        if keepSize { return }  // space is allocated when written
        if offset + length > s.size { try s.truncate(to: offset + length) }
    }

    private static let zeros = [UInt8](repeating: 0, count: 1 << 20)

    /// close(): commit the new version if the file changed (DESIGN.md §3).
    /// The flush of the last open handle is noted (`writing`): a writer on another node right
    /// after close() returns waits for the RELEASE, which the kernel sends after close() has
    /// returned, instead of failing with EBUSY.
    public func flush(_ fh: FileHandleID) throws {
        let h = try handle(fh)
        guard let s = session(of: h.ino) else { return }
        if h.writable {
            s.lock.lock()
            let ticket: ReplicationTicket?
            do { ticket = try commit(s) } catch { s.lock.unlock(); throw error }
            s.lock.unlock()
            if let ticket, let replication { try replication.awaitAck(ticket) }
        }
        withTables { t in
            if let l = t.live[h.ino], l.opens == 1 { l.lastFlushed = true }
        }
    }

    /// Whether this node writes `ino` (a session is open) and whether it is closing: the FLUSH
    /// of its last handle came and the RELEASE has not yet (the writer lock is given back then).
    /// Another node's writable open asks this (`GET /v1/writing/INO`) when it finds the lock held.
    public func writing(_ ino: InodeNumber) -> (open: Bool, closing: Bool) {
        withTables { t in
            guard let l = t.live[ino], l.session != nil else { return (false, false) }
            return (true, l.lastFlushed)
        }
    }

    /// fsync(): the file's new version is committed, then its blocks and the metadata are made
    /// durable against power loss (DESIGN.md §3).
    public func fsync(_ fh: FileHandleID) throws {
        let h = try handle(fh)
        // The file's block list is needed to sync per block or to replicate, not when one
        // syncfs covers blocks and metadata on a single node.
        let needBlocks = !options.metadataOnStoreFilesystem || replication != nil
        var blocks: [BlockID] = []
        if h.writable, let s = session(of: h.ino) {
            s.lock.lock(); defer { s.lock.unlock() }
            try commit(s)
            if needBlocks { blocks = s.referencedBlocks }   // after a commit: the committed chunks
        } else if needBlocks {
            blocks = try loadManifest(h.ino).chunks.map(\.id)
        }
        if needBlocks, case .block(let id, _) = try meta.manifest(of: h.ino) { blocks.append(id) }
        try syncDurably(blocks)
        try replication?.awaitReplicas(ino: h.ino, parent: parentHint(h.ino), blocks: blocks)
    }

    func parentHint(_ ino: InodeNumber) -> InodeNumber? { withTables { $0.live[ino]?.parent } }

    public func fsyncdir() throws { try syncDurably([]) }

    private func syncDurably(_ blocks: [BlockID]) throws {
        if options.metadataOnStoreFilesystem {
            try store.syncFilesystem()
        } else {
            try store.sync(blocks)
            try meta.sync()
        }
    }

    /// Called with the session's lock held. The commit lock is held from the first new block
    /// to the metadata transaction, so garbage collection never sees a block that is about to
    /// be referenced but is not yet (see GarbageCollector).
    @discardableResult
    func commit(_ s: WriteSession) throws -> ReplicationTicket? {
        guard s.dirty else { return nil }
        commitLock.lock(); defer { commitLock.unlock() }
        let manifest: Manifest
        do { manifest = try s.prepareCommit() } catch { garbageHint(); throw error }
        let ref: ManifestRef
        if manifest.chunks.count > ManifestRef.inlineLimit {
            let data = manifest.encoded()
            let id = BlockID.hash(data)
            try data.withUnsafeBytes { _ = try store.put(id, $0) }
            ref = .block(id, chunkCount: UInt32(manifest.chunks.count))
        } else {
            ref = .inline(manifest)
        }
        var ticket: ReplicationTicket?
        if let replication {
            var blocks = manifest.chunks.map(\.id)
            if case .block(let id, _) = ref { blocks.append(id) }
            ticket = try replication.journal(ino: s.ino, parent: parentHint(s.ino), blocks: blocks, bytes: s.size)
        }
        let attrs: InodeAttributes
        do {
            attrs = try meta.commit(s.ino, size: s.size, manifest: ref, mtime: .now(), fence: s.fence)
        } catch let e as MetaError where e.kind == .fenced {
            Log.error("\(e.message)")
            throw e
        }
        s.fence?.baseVersion = attrs.version
        changed()
        s.committed(manifest)
        withTables { t in
            // The kernel wrote these bytes itself, so its cache holds exactly this version.
            if let l = t.live[s.ino], l.kernelCachedVersion == attrs.version - 1 { l.kernelCachedVersion = attrs.version }
            t.live[s.ino]?.view = nil
        }
        return ticket
    }

    public func release(_ fh: FileHandleID) throws {
        let h = try handle(fh)
        var failed: (any Error)?
        if h.writable, let s = session(of: h.ino) {
            s.lock.lock()
            do { try commit(s) } catch { failed = error }
            s.lock.unlock()
        }
        let (drop, wasWriting) = withTables { t -> (Bool, Bool) in
            t.handles[fh.rawValue] = nil
            guard let l = t.live[h.ino] else { return (false, false) }
            l.opens -= 1
            let writing = l.opens == 0 && l.session != nil
            if writing && writerLock != nil { t.releasingLocks.insert(h.ino) }
            if l.opens == 0 { l.session = nil; l.view = nil }
            if l.opens == 0 && l.lookups == 0 { t.live[h.ino] = nil; return (true, writing) }
            return (false, writing)
        }
        if wasWriting, let writerLock {
            writerLock.release(h.ino)
            lockReleased.lock()
            withTables { _ = $0.releasingLocks.remove(h.ino) }
            lockReleased.broadcast()
            lockReleased.unlock()
        }
        if drop { deleteIfUnlinked(h.ino) }
        if let failed { throw failed }
    }

    /// Waits while the RELEASE of `ino`'s last writing handle is still giving its writer lock back.
    /// Taken in between, the lock would be found held by this node and kept, and that release
    /// would then delete it under the new writer: another node could then write the file too.
    func awaitLockRelease(_ ino: InodeNumber) {
        lockReleased.lock()
        defer { lockReleased.unlock() }
        while withTables({ $0.releasingLocks.contains(ino) }) { lockReleased.wait() }
    }

    /// A change another node made to `ino` (from the metadata watch): forgets what this node
    /// cached of it. Returns whether the kernel's pages are stale too (the content changed).
    public func remoteChange(_ ino: InodeNumber, version: UInt64?) -> (known: Bool, pagesStale: Bool) {
        withTables { t in
            guard let l = t.live[ino] else { return (false, false) }
            guard l.session == nil else { return (true, false) }   // this node is the writer
            let stale = version == nil || l.kernelCachedVersion != version
            if stale { l.kernelCachedVersion = nil }
            return (true, stale)
        }
    }

    /// The content version this node's open handles of `ino` read, when they read a committed
    /// version (a view; no write session here): what a reader holds while the file is replaced.
    public func readerVersion(_ ino: InodeNumber) -> UInt64? {
        withTables { t in
            guard let l = t.live[ino], l.opens > 0, l.session == nil else { return nil }
            return l.view?.version
        }
    }

    /// Handles still open (refuse an unmount while any are).
    public var openHandleCount: Int { withTables { $0.handles.count } }

    /// Commits every open file: the daemon is shutting down.
    public func commitAll() {
        let sessions = withTables { t in t.live.values.compactMap(\.session) }
        for s in sessions {
            s.lock.lock()
            do { try commit(s) } catch { Log.error("could not commit \(s.ino) at shutdown: \(error)") }
            s.lock.unlock()
        }
    }
}
