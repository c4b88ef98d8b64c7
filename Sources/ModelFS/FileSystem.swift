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
    /// Reads of committed versions and writes the daemon served (FUSE READs that missed the
    /// page cache and did not pass through, WRITEs): a flat copy's build yields while they come
    /// fast (`FlatBuildPace`).
    let servedRequests = Atomic<UInt64>(0)
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
    struct Handle { var ino: InodeNumber; var writable: Bool; var direct = false }
    struct Tables {
        var live: [InodeNumber: Live] = [:]
        var handles: [UInt64: Handle] = [:]
        var nextHandle: UInt64 = 1
        /// Opens under way (between `open`'s first metadata read and its handle): an unlink
        /// meanwhile must not delete the inode under them.
        var opening: [InodeNumber: Int] = [:]
        /// Files whose writer lock the RELEASE of their last writing handle is giving back.
        var releasingLocks: Set<InodeNumber> = []
    }
    /// Bumped by every change that can leave blocks unreferenced (`contentChanges`).
    let changes = Atomic<UInt64>(0)
    /// When the namespace last changed, here or (a cluster node's watch) on another node:
    /// background scans of the manifests yield while that is within `FileSystem.scanQuiet`.
    let namespaceActivity = RecentActivity(quiet: FileSystem.scanQuiet)
    private let tables = Mutex(Tables())
    /// `withTables` in the lock order: debug builds check that nothing ranked is taken
    /// inside (the table is innermost).
    @inline(__always) func withTables<R>(_ body: (inout sending Tables) throws -> sending R) rethrows -> sending R {
        LockOrder.taking(.tables)
        defer { LockOrder.released(.tables) }
        return try tables.withLock { try body(&$0) }
    }
    /// Signalled when a writer lock has been given back (`releasingLocks` shrank).
    let lockReleased = NSCondition()
    /// Serialises commits and GC's view of sessions with metadata.
    let commitLock = RankedLock(.commit)
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

    func live(_ ino: InodeNumber, _ body: (Live) -> Void) {
        withTables { t in
            let l = t.live[ino] ?? { let n = Live(); t.live[ino] = n; return n }()
            body(l)
        }
    }

    /// Counts a kernel reference for a reply that returns an entry.
    func remembered(_ attrs: InodeAttributes, parent: InodeNumber? = nil) -> InodeAttributes {
        live(attrs.ino) { l in
            l.lookups += 1
            if let parent { l.parent = parent }
        }
        return attrs
    }

    public func forget(_ ino: InodeNumber, count: UInt64) {
        let drop = withTables { t -> Bool in
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
        withTables { t in t.live[ino].map { $0.lookups > 0 || $0.opens > 0 } ?? false }
    }

    func deleteIfUnlinked(_ ino: InodeNumber) {
        guard !isReferenced(ino), let a = try? meta.getattr(ino), a.nlink == 0 else { return }
        changed()
        do { try meta.deleteInode(ino) } catch { Log.warning("could not delete unlinked \(ino): \(error)") }
    }

    private func linkRemoved(_ r: RemovedLink?) {
        guard let r, r.nlink == 0, !r.deleted else { return }
        deleteIfUnlinked(r.ino)
    }

    func handle(_ fh: FileHandleID) throws -> Handle {
        guard let h = withTables({ $0.handles[fh.rawValue] }) else { throw FSError.badHandle() }
        return h
    }

    func session(of ino: InodeNumber) -> WriteSession? {
        withTables { $0.live[ino]?.session }
    }

    /// Deletes the files a removed cluster node left open after their last name was gone (its
    /// orphans: it would have deleted them at its next start, which will not come). Returns how many.
    public func deleteOrphans(of node: String) throws -> Int {
        let orphans = try meta.orphans(of: node)
        for ino in orphans { try meta.deleteInode(ino) }
        if !orphans.isEmpty { changed() }
        return orphans.count
    }

    // MARK: attributes

    public func lookup(parent: InodeNumber, name: String) throws -> InodeAttributes {
        remembered(try withLiveSize(meta.lookup(parent: parent, name: name)), parent: parent)
    }

    public func getattr(_ ino: InodeNumber) throws -> InodeAttributes {
        try withLiveSize(meta.getattr(ino))
    }

    /// A file open for writing has a size the metadata does not know yet.
    func withLiveSize(_ a: InodeAttributes) -> InodeAttributes {
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
                // truncate(2) on a path with no open writer here: an open for writing, the
                // truncate and a close, so a cluster node takes the file's writer lock (EBUSY
                // while another node writes it) and its commit is fenced like any writer's.
                let opened = try open(ino, flags: OpenFlags(O_WRONLY))
                var failed: (any Error)?
                if let s = session(of: ino) {
                    s.lock.lock()
                    do { try s.truncate(to: newSize) } catch { failed = error }
                    s.lock.unlock()
                }
                do { try release(opened.handle) } catch { failed = failed ?? error }
                if let failed { throw failed }
            }
        }
        var rest = changes
        rest.size = nil
        // One metadata transaction for a chmod, chown or utimes (it reads the inode itself).
        let attrs = rest != AttributeChanges() || changes.size != nil ? try meta.setattr(ino, rest, now: .now()) : try meta.getattr(ino)
        if changes.mode != nil {
            let setID = FileSystem.writeClearsSetID(attrs.mode)
            withTables { $0.live[ino]?.setID = setID }
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

    func newInode(_ kind: FileKind, mode: UInt32, parent: InodeNumber, context: RequestContext, target: String? = nil) throws -> NewInode {
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
        withTables { t in (t.live[ino]?.opens ?? 0) > 0 || t.opening[ino] != nil }
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
