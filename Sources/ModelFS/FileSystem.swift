import Foundation
import ModelFSCore
import ModelFSMeta
import ModelFSStore
import Synchronization

/// Who is asking: the caller's credentials as the kernel reports them.
public struct RequestContext: Sendable {
    public var uid: UInt32
    public var gid: UInt32
    public var pid: Int32
    public init(uid: UInt32, gid: UInt32, pid: Int32) { self.uid = uid; self.gid = gid; self.pid = pid }
    public static let root = RequestContext(uid: 0, gid: 0, pid: 0)
}

public struct OpenFlags: Sendable {
    public var raw: Int32
    public init(_ raw: Int32) { self.raw = raw }
    public var accessMode: Int32 { raw & O_ACCMODE }
    public var writable: Bool { accessMode == O_WRONLY || accessMode == O_RDWR }
    public var truncate: Bool { raw & O_TRUNC != 0 }
    public var exclusive: Bool { raw & O_EXCL != 0 }
}

public struct FileHandleID: Hashable, Sendable {
    public let rawValue: UInt64
    public init(_ raw: UInt64) { rawValue = raw }
}

public struct FileSystemOptions: Sendable {
    public var chunker: ChunkerParameters = .standard
    /// Verified blocks kept in memory for readers.
    public var blockCacheBytes = 64 << 20
    /// Where out-of-order writes are staged (anonymous files).
    public var stagingDir: String
    /// The metadata database lives on the block store's filesystem, so one `syncfs` makes both
    /// durable: fsync then costs one journal commit instead of one per file plus one for the WAL.
    public var metadataOnStoreFilesystem = false
    /// Write-only opens bypass the kernel's page cache (FUSE `direct_io` for that handle; the
    /// adapter sets it from `Opened.direct`). Off with the kernel's writeback cache, whose pages
    /// such writes would skip. See `open`.
    public var directWrites = false
    public init(stagingDir: String) { self.stagingDir = stagingDir }
}

public struct StatFS: Sendable {
    public var blockSize: UInt64
    public var blocks: UInt64
    public var blocksFree: UInt64
    public var blocksAvailable: UInt64
    public var files: UInt64
    public var filesFree: UInt64
    public var nameMax: UInt64
}

/// The filesystem itself, without a kernel: every FUSE operation is a method here, called by the
/// thin adapter in ModelFSFUSE and by the tests directly. Methods are thread-safe; blocking I/O
/// happens on the caller's thread (libfuse's worker threads).
///
/// Lifetimes: the kernel holds "lookups" on inodes (every reply that returns an entry adds one,
/// `forget` drops them) and opens handles. An inode whose last link is removed is deleted from
/// metadata once no lookup and no handle refers to it (or at the next start, if we crash first).
public final class FileSystem: @unchecked Sendable {
    public let meta: any MetadataEngine
    public let store: any BlockStore
    public let reader: BlockReader
    public let writeCounters = WriteCounters()
    let options: FileSystemOptions

    /// Per-inode state while the kernel knows the inode or a handle is open.
    final class Live {
        var lookups: UInt64 = 0
        var opens = 0
        var session: WriteSession?
        var view: ReadView?
        /// The content version the kernel's page cache holds (keep_cache when unchanged).
        var kernelCachedVersion: UInt64?
        /// The mode has set-id bits that a write by an unprivileged caller clears (known from
        /// the last open or chmod): the kernel leaves that to us for direct writes.
        var setID = false
        /// A directory the inode was last reached through (its replication policy's origin).
        var parent: InodeNumber?
        /// The FLUSH of the last open handle came: its RELEASE, and the writer lock's, follows.
        var lastFlushed = false
    }
    private struct Handle { var ino: InodeNumber; var writable: Bool; var direct = false }
    private struct Tables {
        var live: [InodeNumber: Live] = [:]
        var handles: [UInt64: Handle] = [:]
        var nextHandle: UInt64 = 1
        /// Opens under way (between `open`'s first metadata read and its handle): an unlink
        /// meanwhile must not delete the inode under them.
        var opening: [InodeNumber: Int] = [:]
        /// Files whose writer lock the RELEASE of their last writing handle is giving back.
        var releasingLocks: Set<InodeNumber> = []
    }
    private let tables = Mutex(Tables())
    /// Signalled when a writer lock has been given back (`releasingLocks` shrank).
    private let lockReleased = NSCondition()
    /// Serialises commits and GC's view of sessions with metadata.
    let commitLock = NSLock()
    /// Replication of each committed version (a cluster node); nil on a single node.
    public let replication: (any ReplicationHook)?
    /// Keeps other nodes from writing a file this node writes (a cluster node).
    public let writerLock: (any WriterLock)?

    /// Flat copies of versions read here, for FUSE passthrough (nil: none are made).
    public let flatCopies: FlatCopies?
    /// What this filesystem tells the parts beside it (garbage hints, read views).
    public let events: FileSystemEvents

    /// A cluster node passes its replicator and writer lock; a single node neither.
    public init(meta: any MetadataEngine, store: any BlockStore, options: FileSystemOptions,
                flatCopies: FlatCopies? = nil, replication: (any ReplicationHook)? = nil, writerLock: (any WriterLock)? = nil,
                events: FileSystemEvents = FileSystemEvents()) throws {
        self.events = events
        self.replication = replication
        self.writerLock = writerLock
        self.meta = meta
        self.store = store
        self.options = options
        self.flatCopies = flatCopies
        reader = BlockReader(store: store, cache: BlockCache(budget: options.blockCacheBytes))
        // Inodes unlinked while open when we last stopped: nobody can reach them any more.
        for ino in try meta.orphans() { try meta.deleteInode(ino) }
    }

    // MARK: bookkeeping

    private func live(_ ino: InodeNumber, _ body: (Live) -> Void) {
        tables.withLock { t in
            let l = t.live[ino] ?? { let n = Live(); t.live[ino] = n; return n }()
            body(l)
        }
    }

    /// Counts a kernel reference for a reply that returns an entry.
    private func remembered(_ attrs: InodeAttributes, parent: InodeNumber? = nil) -> InodeAttributes {
        live(attrs.ino) { l in
            l.lookups += 1
            if let parent { l.parent = parent }
        }
        return attrs
    }

    public func forget(_ ino: InodeNumber, count: UInt64) {
        let drop = tables.withLock { t -> Bool in
            guard let l = t.live[ino] else { return false }
            // The kernel forgets no more than it was given: more means a reply that gave an entry
            // without counting its lookup (a trap in debug builds; clamped in release).
            assert(count <= l.lookups, "FORGET of \(count) lookups of \(ino), which has \(l.lookups)")
            l.lookups -= min(l.lookups, count)
            if l.lookups == 0 && l.opens == 0 { t.live[ino] = nil; return true }
            return false
        }
        if drop { deleteIfUnlinked(ino) }
    }

    private func isReferenced(_ ino: InodeNumber) -> Bool {
        tables.withLock { t in t.live[ino].map { $0.lookups > 0 || $0.opens > 0 } ?? false }
    }

    private func deleteIfUnlinked(_ ino: InodeNumber) {
        guard !isReferenced(ino), let a = try? meta.getattr(ino), a.nlink == 0 else { return }
        changed()
        do { try meta.deleteInode(ino) } catch { Log.warning("could not delete unlinked \(ino): \(error)") }
    }

    private func linkRemoved(_ r: RemovedLink?) {
        guard let r, r.nlink == 0, !r.deleted else { return }
        deleteIfUnlinked(r.ino)
    }

    private func handle(_ fh: FileHandleID) throws -> Handle {
        guard let h = tables.withLock({ $0.handles[fh.rawValue] }) else { throw FSError.badHandle() }
        return h
    }

    private func session(of ino: InodeNumber) -> WriteSession? {
        tables.withLock { $0.live[ino]?.session }
    }

    // MARK: attributes

    public func lookup(parent: InodeNumber, name: String) throws -> InodeAttributes {
        remembered(try withLiveSize(meta.lookup(parent: parent, name: name)), parent: parent)
    }

    public func getattr(_ ino: InodeNumber) throws -> InodeAttributes {
        try withLiveSize(meta.getattr(ino))
    }

    /// A file open for writing has a size the metadata does not know yet.
    private func withLiveSize(_ a: InodeAttributes) -> InodeAttributes {
        guard a.kind == .regular, let s = session(of: a.ino) else { return a }
        var out = a
        s.lock.lock(); out.size = s.size; s.lock.unlock()
        return out
    }

    /// The largest file: 4 TiB. A manifest lists every chunk (a hole too), so a size of 2^62
    /// (stress-ng's fsize) would need 2^40 entries; beyond this, EFBIG, as for an rlimit.
    public static let maxFileSize: UInt64 = 1 << 42

    static func checkSize(_ end: UInt64) throws {
        guard end <= maxFileSize else { throw FSError(EFBIG, "files are limited to \(maxFileSize >> 40) TiB") }
    }

    public func setattr(_ ino: InodeNumber, _ changes: AttributeChanges, handle fh: FileHandleID?, context: RequestContext) throws -> InodeAttributes {
        // Times are kept as 64-bit nanoseconds since 1970: years 1678 to 2262.
        for t in [changes.atime, changes.mtime].compactMap({ $0 }) where !t.representable {
            throw FSError(EOVERFLOW, "times before 1678 or after 2262 cannot be stored")
        }
        if let newSize = changes.size {
            let attrs = try meta.getattr(ino)
            try FileSystem.checkSize(newSize)
            if attrs.immutable { throw FSError(EPERM, "\(ino) is immutable: part of a snapshot") }
            guard attrs.kind == .regular else { throw attrs.kind == .directory ? FSError.isDirectory() : FSError.invalid("cannot truncate a symlink") }
            if let s = session(of: ino) {
                s.lock.lock(); defer { s.lock.unlock() }
                try s.truncate(to: newSize)
            } else {
                // truncate(2) on a path with no open writer: a short session committed at once.
                let s = try makeSession(ino, epoch: nil)
                s.lock.lock(); defer { s.lock.unlock() }
                try s.truncate(to: newSize)
                try commit(s)
            }
        }
        var rest = changes
        rest.size = nil
        // One metadata transaction for a chmod, chown or utimes (it reads the inode itself).
        let attrs = rest != AttributeChanges() || changes.size != nil ? try meta.setattr(ino, rest, now: .now()) : try meta.getattr(ino)
        if changes.mode != nil {
            let setID = FileSystem.writeClearsSetID(attrs.mode)
            tables.withLock { $0.live[ino]?.setID = setID }
        }
        return withLiveSize(attrs)
    }

    /// The bits of `mode` a write by a caller without CAP_FSETID clears: setuid, and setgid on a
    /// group-executable file (as the kernel does for writes through its page cache).
    static func setIDClearedByWrite(_ mode: UInt32) -> UInt32 {
        mode & (UInt32(S_ISUID) | (mode & UInt32(S_IXGRP) != 0 ? UInt32(S_ISGID) : 0))
    }

    static func writeClearsSetID(_ mode: UInt32) -> Bool { setIDClearedByWrite(mode) != 0 }

    // MARK: namespace

    private func newInode(_ kind: FileKind, mode: UInt32, parent: InodeNumber, context: RequestContext, target: String? = nil) throws -> NewInode {
        var gid = context.gid
        var mode = mode & 0o7777
        let p = try meta.getattr(parent)
        if p.mode & 0o2000 != 0 {
            // setgid directory: new entries take its group, new directories its setgid bit.
            gid = p.gid
            if kind == .directory { mode |= 0o2000 }
        }
        return NewInode(kind: kind, mode: mode, uid: context.uid, gid: gid, now: .now(), target: target)
    }

    public func mkdir(parent: InodeNumber, name: String, mode: UInt32, context: RequestContext) throws -> InodeAttributes {
        remembered(try meta.create(parent: parent, name: name, newInode(.directory, mode: mode, parent: parent, context: context)))
    }

    /// A regular file (no type bits, or S_IFREG), a FIFO, a socket, or a character or block
    /// device (`rdev` its number). The kernel checks CAP_MKNOD for devices before asking, and
    /// handles opening every special file itself: here they are inodes like any other.
    public func mknod(parent: InodeNumber, name: String, mode: UInt32, rdev: UInt32 = 0, context: RequestContext) throws -> InodeAttributes {
        let kind = mode & 0o170000 == 0 ? FileKind.regular : FileKind(modeBits: mode)
        guard let kind, kind == .regular || kind.isSpecial else {
            throw FSError.invalid("mknod makes regular files, FIFOs, sockets and device nodes (mode \(String(mode, radix: 8)))")
        }
        var new = try newInode(kind, mode: mode, parent: parent, context: context)
        new.rdev = rdev
        return remembered(try meta.create(parent: parent, name: name, new), parent: parent)
    }

    public func symlink(parent: InodeNumber, name: String, target: String, context: RequestContext) throws -> InodeAttributes {
        remembered(try meta.create(parent: parent, name: name, newInode(.symlink, mode: 0o777, parent: parent, context: context, target: target)))
    }

    public func readlink(_ ino: InodeNumber) throws -> String { try meta.readlink(ino) }

    public func link(_ ino: InodeNumber, parent: InodeNumber, name: String) throws -> InodeAttributes {
        remembered(try withLiveSize(meta.link(ino, parent: parent, name: name, now: .now())), parent: parent)
    }

    /// A file whose last link goes while nothing has it open is deleted by the unlink itself (one
    /// metadata write); one still open lives on, unlinked, until its last release and forget.
    public func unlink(parent: InodeNumber, name: String) throws {
        defer { changed() }
        linkRemoved(try meta.unlink(parent: parent, name: name, now: .now(), isOpen: isOpen))
    }

    /// Whether a handle of `ino` is open or being opened (asked inside unlink's transaction).
    private func isOpen(_ ino: InodeNumber) -> Bool {
        tables.withLock { t in (t.live[ino]?.opens ?? 0) > 0 || t.opening[ino] != nil }
    }

    public func rmdir(parent: InodeNumber, name: String) throws {
        linkRemoved(try meta.rmdir(parent: parent, name: name, now: .now()))
    }

    public func rename(parent: InodeNumber, name: String, newParent: InodeNumber, newName: String, flags: RenameFlags) throws {
        defer { changed() }
        linkRemoved(try meta.rename(parent: parent, name: name, newParent: newParent, newName: newName, flags: flags,
                                    now: .now(), isOpen: isOpen))
    }

    /// Directory entries after `cookie`, starting with "." (cookie 1) and ".." (cookie 2);
    /// the cookies of real entries are the engine's plus 2.
    public func readdir(_ dir: InodeNumber, after cookie: UInt64, limit: Int) throws -> [DirectoryEntry] {
        var out = try dots(dir, after: cookie)
        let rest = try meta.readdir(dir, after: cookie > 2 ? cookie - 2 : 0, limit: max(0, limit - out.count))
        out += rest.map { var e = $0; e.cookie += 2; return e }
        return out
    }

    /// `readdir` with the attributes of every entry but "." and ".." (nil: removed meanwhile),
    /// read in batches. The kernel takes a lookup reference on each entry it is given: the
    /// caller reports those with `tookLookup`.
    public func readdirPlus(_ dir: InodeNumber, after cookie: UInt64, limit: Int) throws -> [(DirectoryEntry, InodeAttributes?)] {
        var out: [(DirectoryEntry, InodeAttributes?)] = try dots(dir, after: cookie).map { ($0, nil) }
        let rest = try meta.readdirPlus(dir, after: cookie > 2 ? cookie - 2 : 0, limit: max(0, limit - out.count))
        out += rest.map { e, a in
            var e = e
            e.cookie += 2
            return (e, a.map(withLiveSize))
        }
        return out
    }

    /// The kernel now holds a lookup reference to an inode readdirplus gave it (forgotten later
    /// like one from `lookup`).
    public func tookLookup(_ attrs: InodeAttributes, parent: InodeNumber) {
        _ = remembered(attrs, parent: parent)
    }

    private func dots(_ dir: InodeNumber, after cookie: UInt64) throws -> [DirectoryEntry] {
        var out: [DirectoryEntry] = []
        if cookie < 1 { out.append(DirectoryEntry(name: ".", ino: dir, kind: .directory, cookie: 1)) }
        if cookie < 2 { out.append(DirectoryEntry(name: "..", ino: try meta.parent(of: dir), kind: .directory, cookie: 2)) }
        return out
    }

    // MARK: open files

    private func loadManifest(_ ino: InodeNumber) throws -> Manifest {
        switch try meta.manifest(of: ino) {
        case .inline(let m): return m
        case .block(let id, _):
            let b = try reader.block(id)
            return try Manifest(decoding: b.data)
        }
    }

    /// A write session of `ino`; `epoch`: the write lock this node took for it (cluster nodes).
    private func makeSession(_ ino: InodeNumber, epoch: Int64?) throws -> WriteSession {
        let a = try meta.getattr(ino)
        let sessionStore = replication?.sessionStore(store, ino: ino, parent: parentHint(ino)) ?? store
        let s = WriteSession(ino: ino, manifest: try loadManifest(ino), size: a.size, store: sessionStore, reader: reader,
                             parameters: options.chunker, stagingDir: options.stagingDir, counters: writeCounters)
        s.fence = epoch.map { CommitFence(epoch: $0, baseVersion: a.version) }
        return s
    }

    public struct Opened: Sendable {
        public var handle: FileHandleID
        /// The kernel may keep the pages it cached: the content did not change since.
        public var keepCache: Bool
        /// Another node may have committed a version since the kernel cached this inode's
        /// attributes (its size): the adapter invalidates them before replying, so the reader
        /// sees the new version whole (close-to-open across nodes).
        public var staleAttributes = false
        /// The kernel sends this handle's writes straight through, without its page cache
        /// (FUSE `direct_io`): a write-only open, which nothing can map or read through.
        public var direct = false
    }

    public func open(_ ino: InodeNumber, flags: OpenFlags) throws -> Opened {
        tables.withLock { $0.opening[ino, default: 0] += 1 }
        defer {
            tables.withLock { t in
                if let n = t.opening[ino], n > 1 { t.opening[ino] = n - 1 } else { t.opening[ino] = nil }
            }
        }
        let attrs = try meta.getattr(ino)
        guard attrs.kind == .regular else {
            switch attrs.kind {
            case .directory: throw FSError.isDirectory()
            case .symlink: throw FSError(ELOOP, "is a symlink")
            // The kernel opens special files itself; a request that reaches here is a bug.
            default: throw FSError(ENXIO, "\(attrs.ino) is a special file: the kernel opens it, not modelfs")
            }
        }
        // A snapshot's file is refused for writing at open (as ext4 refuses a `chattr +i` one),
        // not at the first flush, when the writer's bytes would have been taken.
        if attrs.immutable && (flags.writable || flags.truncate) {
            throw FSError(EPERM, "\(attrs.ino) is immutable: part of a snapshot")
        }
        // Write-only opens write past the kernel's page cache: torch.save, safetensors, np.save
        // and Java's FileOutputStream all open so, and nothing can mmap or read a write-only
        // descriptor. Through the page cache, the writer itself filled a fresh page per 4 KiB
        // before each request reached us (on these VMs, first touches of memory are slow):
        // measured, 2 GiB in 1 MiB writes 6.5-9.2 s -> 1.9-2.3 s, torch.save of 1 GiB 1.68 ->
        // 1.41 s (medians of 4, interleaved). Pages stay coherent: the kernel drops the cached
        // pages of the range a direct write covers (Linux 6.6 and later), so readers through
        // the page cache (read(), mmap) see the new bytes.
        let direct = options.directWrites && flags.accessMode == O_WRONLY
        // Prepare the session or view outside the table lock (loading a manifest is I/O), install
        // it under the lock. The kernel sends RELEASE asynchronously, so the last handle may close
        // (dropping the session) between the two steps: then prepare again.
        while true {
            let (hasSession, hasView) = tables.withLock { t in
                (t.live[ino]?.session != nil, t.live[ino]?.view?.version == attrs.version)
            }
            var epoch: Int64?
            if flags.writable && !hasSession, let writerLock {
                awaitLockRelease(ino)
                epoch = try writerLock.acquire(ino)
            }
            let fresh = flags.writable && !hasSession ? try makeSession(ino, epoch: epoch) : nil
            let view = !flags.writable && !hasSession && !hasView
                ? ReadView(manifest: try loadManifest(ino), ino: ino, size: attrs.size, version: attrs.version, keyed: flatCopies != nil) : nil
            let installed: (UInt64, Bool, WriteSession?)? = tables.withLock { t in
                let l = t.live[ino] ?? { let n = Live(); t.live[ino] = n; return n }()
                if flags.writable && l.session == nil && fresh == nil { return nil }
                if !flags.writable && l.session == nil && l.view?.version != attrs.version && view == nil { return nil }
                l.opens += 1
                l.lastFlushed = false
                l.setID = FileSystem.writeClearsSetID(attrs.mode)
                if flags.writable && l.session == nil { l.session = fresh }
                if let view, l.view?.version != attrs.version {
                    l.view = view
                    if store.prefetches { startPrefetch(view, parent: l.parent) }
                }
                let keep = l.kernelCachedVersion == attrs.version
                l.kernelCachedVersion = attrs.version
                let fh = t.nextHandle
                t.nextHandle += 1
                t.handles[fh] = Handle(ino: ino, writable: flags.writable, direct: direct)
                return (fh, keep, l.session)
            }
            guard let (fh, keep, s) = installed else { continue }
            if view != nil { events.readViewInstalled(ino, version: attrs.version) }
            if flags.truncate && flags.writable, let s {
                s.lock.lock(); defer { s.lock.unlock() }
                try s.truncate(to: 0)
            }
            return Opened(handle: FileHandleID(fh), keepCache: keep && !flags.truncate,
                          staleAttributes: replication != nil && !keep, direct: direct)
        }
    }

    public func create(parent: InodeNumber, name: String, mode: UInt32, flags: OpenFlags, context: RequestContext) throws -> (InodeAttributes, Opened) {
        let attrs: InodeAttributes
        do {
            attrs = try meta.create(parent: parent, name: name, newInode(.regular, mode: mode, parent: parent, context: context))
        } catch let e as FSError where e.errno == EEXIST && !flags.exclusive {
            let existing = try meta.lookup(parent: parent, name: name)
            live(existing.ino) { $0.parent = parent }
            let opened = try open(existing.ino, flags: flags)
            return (remembered(withLiveSize(try meta.getattr(existing.ino)), parent: parent), opened)
        }
        // The parent first: the write session open() makes takes its directory's policy
        // (eager replication of a file created under `replicas=1` must not copy it).
        live(attrs.ino) { $0.parent = parent }
        let opened = try open(attrs.ino, flags: OpenFlags(flags.raw & ~O_TRUNC))
        return (remembered(attrs, parent: parent), opened)
    }

    /// The bytes at [offset, offset+count) (fewer at the end of the file), as slices of verified
    /// blocks for a committed version, or one copied buffer for a file open for writing.
    public func readSlices(_ fh: FileHandleID, at offset: UInt64, count: Int) throws -> [ReadSlice] {
        let h = try handle(fh)
        let (s, v) = tables.withLock { t in (t.live[h.ino]?.session, t.live[h.ino]?.view) }
        if let s {
            let buffer = BlockBuffer(count: count)
            s.lock.lock(); defer { s.lock.unlock() }
            let n = try s.read(at: offset, count: count, into: buffer.pointer)
            return n > 0 ? [ReadSlice(buffer: buffer, offset: 0, count: n)] : []
        }
        guard let v else { throw FSError.badHandle() }
        return try v.slices(at: offset, count: count, reader: reader)
    }

    /// Format-aware prefetch of a version just opened for reading (FormatPrefetch): its first
    /// bytes are read (the loader reads them first anyway) and, for a format recognised, the
    /// store is told which chunks the loader will read, in its order: this file's, or the files
    /// of its directory it names (`parent`: where the kernel looked it up), each by its own
    /// plan or whole, within the store's prefetch budget. In the background: the open does not
    /// wait.
    private func startPrefetch(_ view: ReadView, parent: InodeNumber?) {
        guard view.size >= 8 else { return }
        DispatchQueue.global(qos: .utility).async { [self] in
            guard let plan = FormatPrefetch.plan(size: view.size, read: bytes(of: view)) else { return }
            var budget = store.prefetchBudget
            switch plan {
            case .ranges(let format, let ranges):
                prefetch(view, ranges: ranges, format: format, budget: &budget)
            case .siblings(let format, let siblings):
                guard let parent else { return }
                for ino in (try? files(in: parent, matching: siblings)) ?? [] where budget > 0 {
                    guard let a = try? meta.getattr(ino), a.kind == .regular, let manifest = try? loadManifest(ino) else { continue }
                    let shard = ReadView(manifest: manifest, ino: ino, size: a.size, version: a.version)
                    // A shard in a format of its own (safetensors) is taken in its loader's order.
                    if let (f, ranges) = loaderRanges(shard) {
                        prefetch(shard, ranges: ranges, format: "\(format) > \(f)", budget: &budget)
                    } else {
                        prefetch(shard, ranges: [0..<shard.size], format: format, budget: &budget)
                    }
                }
            }
        }
    }

    /// A walked file's blocks in the order its loader reads them (`modelfs warm`), with the
    /// format that says so; file order and nil for a format not recognised (FormatPrefetch;
    /// reads the file's first bytes, and its header, for files of `minRanged` or more).
    public func loaderOrder(_ f: FileBlocks) -> (format: String?, blocks: [ChunkRef]) {
        let view = ReadView(manifest: Manifest(chunks: f.blocks), ino: f.ino, size: f.size, version: f.version)
        guard let (format, ranges) = loaderRanges(view) else { return (nil, f.blocks) }
        let order = FormatPrefetch.chunkOrder(ranges, offsets: view.chunks.offsets)
        let taken = Set(order)
        return (format, order.map { f.blocks[$0] } + f.blocks.indices.filter { !taken.contains($0) }.map { f.blocks[$0] })
    }

    /// The ranges a loader of the version reads, in its order, for a file in a format read by
    /// ranges (safetensors, `minRanged` or more); nil otherwise. Reads its first bytes when large
    /// enough.
    private func loaderRanges(_ view: ReadView) -> (format: String, ranges: [Range<UInt64>])? {
        guard view.size >= FormatPrefetch.minRanged,
              case .ranges(let format, let ranges)? = FormatPrefetch.plan(size: view.size, read: bytes(of: view)) else { return nil }
        return (format, ranges)
    }

    private func prefetch(_ view: ReadView, ranges: [Range<UInt64>], format: String, budget: inout UInt64) {
        var chunks: [ChunkRef] = []
        for i in FormatPrefetch.chunkOrder(ranges, offsets: view.chunks.offsets) {
            let c = view.chunks.chunks[i]
            guard UInt64(c.length) <= budget else { break }
            budget -= UInt64(c.length)
            chunks.append(c)
        }
        store.prefetch(chunks, for: view.file, format: format)
    }

    /// Reads a range of a version's bytes (for FormatPrefetch).
    private func bytes(of view: ReadView) -> (Range<UInt64>) throws -> [UInt8] {
        let reader = self.reader
        return { r in
            let slices = try view.slices(at: r.lowerBound, count: Int(r.count), reader: reader)
            var out = [UInt8](repeating: 0, count: slices.reduce(0) { $0 + $1.count })
            out.withUnsafeMutableBytes { _ = slices.copy(to: $0.baseAddress!) }
            return out
        }
    }

    /// The regular files of `dir` that the siblings name, in their order (each pattern's
    /// matches in name order), each once.
    private func files(in dir: InodeNumber, matching siblings: [FormatPrefetch.Sibling]) throws -> [InodeNumber] {
        var entries: [DirectoryEntry] = []
        var cookie: UInt64 = 0
        while entries.count < 100_000 {
            let page = try meta.readdir(dir, after: cookie, limit: 1024)
            guard let last = page.last else { break }
            entries += page.filter { $0.kind == .regular }
            cookie = last.cookie
        }
        entries.sort { $0.name < $1.name }
        var seen = Set<InodeNumber>(), out: [InodeNumber] = []
        for s in siblings {
            for e in entries where s.matches(e.name) && seen.insert(e.ino).inserted { out.append(e.ino) }
        }
        return out
    }

    /// The flat copy of the version a read-only handle reads, pinned (`flatCopies.unpin(key)`
    /// when done with it), if one is in place; else nil, and one is built in the background.
    /// nil too for a handle that reads through a write session (this node is writing the file).
    public func flatCopy(for fh: FileHandleID) -> (key: String, path: String)? {
        guard let flatCopies else { return nil }
        let view = tables.withLock { t -> ReadView? in
            guard let h = t.handles[fh.rawValue], !h.writable, let l = t.live[h.ino], l.session == nil else { return nil }
            return l.view
        }
        guard let view, let key = view.flatKey else { return nil }
        let reader = self.reader, store = self.store
        // Only from blocks this node has (its store, a cluster node's read cache): on a cluster
        // node the first reader of a remote file is fetching them meanwhile, and a build that
        // fetched too would take the file from the peers a second time. A later open asks
        // again, once they are here.
        let check: @Sendable () throws -> Void = {
            if let missing = view.chunks.chunks.first(where: { !store.contains($0.id) }) {
                throw FlatCopies.NotHere(block: missing.id)
            }
        }
        guard let path = flatCopies.take(key, size: view.size, check: check, build: { [weak flatCopies] fd in
            try view.write(to: fd, reader: reader, stop: { flatCopies?.closing ?? true })
        }) else { return nil }
        return (key, path)
    }

    public func read(_ fh: FileHandleID, at offset: UInt64, count: Int, into dst: UnsafeMutableRawPointer) throws -> Int {
        try readSlices(fh, at: offset, count: count).copy(to: dst)
    }

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
        let (found, clearSetID) = tables.withLock { t -> (Handle?, Bool) in
            guard let h = t.handles[fh.rawValue] else { return (nil, false) }
            guard h.direct && caller.uid != 0, let l = t.live[h.ino], l.setID else { return (h, false) }
            l.setID = false
            return (h, true)
        }
        guard let h = found else { throw FSError.badHandle() }
        guard h.writable, let s = session(of: h.ino) else { throw FSError.badHandle("file is not open for writing") }
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
        let (sourceSession, view) = tables.withLock { t in (t.live[hIn.ino]?.session, t.live[hIn.ino]?.view) }
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
        tables.withLock { t in
            if let l = t.live[h.ino], l.opens == 1 { l.lastFlushed = true }
        }
    }

    /// Whether this node writes `ino` (a session is open) and whether it is closing: the FLUSH
    /// of its last handle came and the RELEASE has not yet (the writer lock is given back then).
    /// Another node's writable open asks this (`GET /v1/writing/INO`) when it finds the lock held.
    public func writing(_ ino: InodeNumber) -> (open: Bool, closing: Bool) {
        tables.withLock { t in
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

    func parentHint(_ ino: InodeNumber) -> InodeNumber? { tables.withLock { $0.live[ino]?.parent } }

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
    private func commit(_ s: WriteSession) throws -> ReplicationTicket? {
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
        tables.withLock { t in
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
        let (drop, wasWriting) = tables.withLock { t -> (Bool, Bool) in
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
            tables.withLock { _ = $0.releasingLocks.remove(h.ino) }
            lockReleased.broadcast()
            lockReleased.unlock()
        }
        if drop { deleteIfUnlinked(h.ino) }
        if let failed { throw failed }
    }

    /// Waits while the RELEASE of `ino`'s last writing handle is still giving its writer lock back.
    /// Taken in between, the lock would be found held by this node and kept, and that release
    /// would then delete it under the new writer: another node could then write the file too.
    private func awaitLockRelease(_ ino: InodeNumber) {
        lockReleased.lock()
        defer { lockReleased.unlock() }
        while tables.withLock({ $0.releasingLocks.contains(ino) }) { lockReleased.wait() }
    }

    /// A change another node made to `ino` (from the metadata watch): forgets what this node
    /// cached of it. Returns whether the kernel's pages are stale too (the content changed).
    public func remoteChange(_ ino: InodeNumber, version: UInt64?) -> (known: Bool, pagesStale: Bool) {
        tables.withLock { t in
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
        tables.withLock { t in
            guard let l = t.live[ino], l.opens > 0, l.session == nil else { return nil }
            return l.view?.version
        }
    }

    /// Handles still open (refuse an unmount while any are).
    public var openHandleCount: Int { tables.withLock { $0.handles.count } }

    /// Commits every open file: the daemon is shutting down.
    public func commitAll() {
        let sessions = tables.withLock { t in t.live.values.compactMap(\.session) }
        for s in sessions {
            s.lock.lock()
            do { try commit(s) } catch { Log.error("could not commit \(s.ino) at shutdown: \(error)") }
            s.lock.unlock()
        }
    }

    /// The blocks every open session references, each read under its session's lock if that
    /// is free; the first session whose lock is held stops the look and is returned as `busy`.
    private func openSessionBlocks() -> (blocks: Set<BlockID>, busy: WriteSession?) {
        var out = Set<BlockID>()
        for s in tables.withLock({ t in t.live.values.compactMap(\.session) }) {
            guard s.lock.try() else { return (out, s) }
            out.formUnion(s.referencedBlocks)
            s.lock.unlock()
        }
        return (out, nil)
    }

    /// The blocks every open write session references, taken under the commit lock with no
    /// session mid-commit (see GarbageCollector for why this, then the manifests read without
    /// the lock, marks every block a file references).
    public func sessionBlocks() -> Set<BlockID> {
        commitLock.lock(); defer { commitLock.unlock() }
        // A session commits with its own lock held and then takes the commit lock, so its lock
        // is only tried here: waiting for it with the commit lock held deadlocked a flush
        // against a collection pass. A busy session is waited for with the commit lock let go,
        // and the look at the sessions starts again.
        while true {
            let (blocks, busy) = openSessionBlocks()
            guard let busy else { return blocks }
            commitLock.unlock()
            busy.lock.lock(); busy.lock.unlock()
            commitLock.lock()
        }
    }

    /// The blocks a committed version references: its chunks, and the manifest's own block when
    /// the manifest is stored as one.
    public func blocks(of ref: ManifestRef) throws -> [BlockID] {
        switch ref {
        case .inline(let m): return m.chunks.map(\.id)
        case .block(let id, _): return [id] + (try Manifest(decoding: reader.block(id).data).chunks.map(\.id))
        }
    }

    /// Every block that a file references, committed or open for writing (tests; garbage
    /// collection pages through the manifests itself).
    public func referencedBlocks() throws -> Set<BlockID> {
        var out = sessionBlocks()
        for ref in try meta.allManifests() { out.formUnion(try blocks(of: ref)) }
        return out
    }

    /// Bumped by every change that can leave blocks unreferenced: a commit (the version it
    /// replaces), a link removed (the inode may go with it), an unlinked inode deleted. Garbage
    /// collection runs a pass only after one (or after its full interval).
    public var contentChanges: UInt64 { changes.load(ordering: .relaxed) }
    private let changes = Atomic<UInt64>(0)
    func changed() { changes.add(1, ordering: .relaxed) }

    /// Blocks may have become garbage (a failed or abandoned write): the collector hears of it.
    private func garbageHint() { events.garbageMayExist() }

    // MARK: xattrs

    /// `security.*` and `system.*` attributes are not kept (no labels, capabilities or ACLs), so
    /// asking for one needs no metadata read. That matters: without the writeback cache the kernel
    /// asks for `security.capability` before every write(), and on etcd that read cost a round
    /// trip per request (128 KiB writes ran at 17 MB/s).
    static func unsupportedXattr(_ name: String) -> Bool { name.hasPrefix("security.") || name.hasPrefix("system.") }

    public func getxattr(_ ino: InodeNumber, name: String) throws -> Data {
        if FileSystem.unsupportedXattr(name) { throw FSError.noData() }
        if let v = try stateXattr(ino, name: name) { return v }
        return try meta.getxattr(ino, name: name)
    }

    public func setxattr(_ ino: InodeNumber, name: String, value: Data, mode: XattrSetMode) throws {
        if FileSystem.stateXattrs.contains(name) { throw FSError(EPERM, "\(name) is read-only: it reports the file's replication state") }
        if name == ReplicationPolicy.xattr {
            // A replication policy (modelfs policy set): directories only, and it must parse.
            guard try meta.getattr(ino).kind == .directory else {
                throw FSError.invalid("a replication policy is set on a directory, not a file")
            }
            _ = try ReplicationPolicy(parsing: String(decoding: value, as: UTF8.self))
        }
        guard !FileSystem.unsupportedXattr(name) else {
            throw FSError(EOPNOTSUPP, "security.* and system.* attributes (labels, capabilities, ACLs) are not supported")
        }
        try meta.setxattr(ino, name: name, value: value, mode: mode)
    }

    public func listxattr(_ ino: InodeNumber) throws -> [String] { try meta.listxattr(ino) }

    public func removexattr(_ ino: InodeNumber, name: String) throws {
        if FileSystem.stateXattrs.contains(name) { throw FSError(EPERM, "\(name) is read-only: it reports the file's replication state") }
        try meta.removexattr(ino, name: name)
    }

    // MARK: statfs

    public func statfs(dataDir: String) throws -> StatFS {
        var s = statvfs()
        guard statvfs(dataDir, &s) == 0 else { throw posixError("statvfs", dataDir) }
        let st = try meta.stats()
        let inodes = st.files + st.directories + st.symlinks
        return StatFS(blockSize: UInt64(s.f_frsize), blocks: UInt64(s.f_blocks), blocksFree: UInt64(s.f_bfree),
                      blocksAvailable: UInt64(s.f_bavail), files: inodes + UInt64(s.f_ffree) * 16,
                      filesFree: UInt64(s.f_ffree) * 16, nameMax: 255)
    }
}

/// A committed version as readers see it: immutable, so reads need no lock.
final class ReadView: @unchecked Sendable {
    let chunks: ChunkList
    let size: UInt64
    let version: UInt64
    /// The version as every node names it (reads pass it to the store: fan-out).
    let file: FileVersion
    /// The content name of its flat copy (`FlatCopies.key`), when flat copies are kept.
    let flatKey: String?
    init(manifest: Manifest, ino: InodeNumber, size: UInt64, version: UInt64, keyed: Bool = false) {
        chunks = ChunkList(manifest)
        self.size = size
        self.version = version
        file = FileVersion(ino: ino, version: version, size: size)
        flatKey = keyed ? FlatCopies.key(manifest, size: size) : nil
    }

    /// The chunks that lie wholly in [from, upTo) (clipped to the size), when `from` is where
    /// one starts; empty otherwise.
    func wholeChunks(from: UInt64, upTo: UInt64) -> ArraySlice<ChunkRef> {
        let end = min(upTo, size, chunks.end)
        guard from < end else { return [] }
        let first = chunks.index(of: from)
        guard chunks.offsets[first] == from else { return [] }
        var last = first
        while last < chunks.chunks.count && chunks.offsets[last + 1] <= end { last += 1 }
        return chunks.chunks[first..<last]
    }

    /// Writes the whole version to `fd` from offset 0 (a flat copy), 4 MiB at a time: one
    /// `pwritev` of the slices of each aligned 4 MiB piece. (A write per slice began at chunk
    /// boundaries, anywhere in a page: the copy's page cache then held small folios, and touching
    /// every page of an mmap of a 1 GiB copy took 0.022 s against ext4's 0.0057.)
    func write(to fd: Int32, reader: BlockReader, stop: () -> Bool = { false }) throws {
        let step = 4 << 20
        var offset: UInt64 = 0
        while offset < size {
            if stop() { throw FSError.io("stopped: the filesystem is being unmounted") }
            let slices = try slices(at: offset, count: step, reader: reader)
            let total = slices.reduce(0) { $0 + $1.count }
            guard total > 0 else { throw FSError.io("a flat copy's read at \(offset) returned nothing") }
            let e = withExtendedLifetime(slices) {
                FileIO.pwritevAll(fd, slices.map { iovec(iov_base: $0.buffer.pointer + $0.offset, iov_len: $0.count) }, at: offset)
            }
            if e != 0 { throw FSError(e, "writing a flat copy") }
            offset += UInt64(total)
        }
    }

    func slices(at offset: UInt64, count: Int, reader: BlockReader) throws -> [ReadSlice] {
        guard offset < size else { return [] }
        let end = min(size, offset + UInt64(count))
        let stored = min(end, chunks.end)
        var out = offset < stored ? try chunks.slices(offset..<stored, reader: reader, file: file) : []
        if stored < end { out += ReadSlice.zeroFill(Int(end - max(stored, offset))) }
        return out
    }
}
