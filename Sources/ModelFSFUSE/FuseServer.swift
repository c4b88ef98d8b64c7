import CFuse3
import CModelFSPassthrough
import Foundation
import ModelFS
import ModelFSCore
import ModelFSMeta
import Synchronization

/// The thin adapter between libfuse's low-level API and `FileSystem`: each callback decodes its
/// arguments, calls the filesystem, and turns the result into a reply or an errno (Errno.swift).
/// The server object travels as libfuse's userdata, never as a global.
public final class FuseServer: @unchecked Sendable {
    public let fs: FileSystem
    let dataDir: String
    /// How long the kernel may cache names and attributes. One node is the only writer of its
    /// namespace, so a long timeout is safe and makes warm `stat` free.
    let entryTimeout: Double
    let attrTimeout: Double
    /// How long the kernel may remember that a name does not exist (0: it asks every time). On
    /// one node every create goes through this kernel, which turns its negative entry into the
    /// new file, so the answer stays true; a name asked for again (a framework probing for
    /// optional files) is answered without a request. A name never asked for still costs a
    /// LOOKUP before its CREATE.
    let negativeTimeout: Double
    /// The kernel's writeback cache (`-o writeback_cache`, single node only; off by default, see
    /// MountOptions for the measurements). A cluster node runs without it: with it, the kernel
    /// trusts its own idea of a file's size over ours for as long as it caches the inode, so a
    /// new version committed by another node could be read cut to the old size.
    let writebackCache: Bool
    /// Every readdir a readdirplus (a cluster node: a lookup costs etcd round trips), rather
    /// than the kernel's heuristic.
    let alwaysReaddirPlus: Bool
    private var session: OpaquePointer?
    /// READ requests the daemon answered (reads that passed through never come here).
    let readRequests = Atomic<UInt64>(0)
    private let passthrough = Mutex<PassthroughOpens?>(nil)

    public init(fs: FileSystem, dataDir: String, entryTimeout: Double = 60, attrTimeout: Double = 60,
                negativeTimeout: Double = 0, writebackCache: Bool = false, alwaysReaddirPlus: Bool = false) {
        self.fs = fs
        self.dataDir = dataDir
        self.entryTimeout = entryTimeout
        self.attrTimeout = attrTimeout
        self.negativeTimeout = negativeTimeout
        self.writebackCache = writebackCache
        self.alwaysReaddirPlus = alwaysReaddirPlus
    }

    /// Mounts and serves until unmounted or signalled. `ready` runs once the mount answers.
    public func run(mountpoint: String, options: [String], threads: UInt32 = 16, ready: @escaping @Sendable () -> Void) throws {
        var ops = FuseServer.operations()
        let argv: [String] = ["modelfs", "-o", options.joined(separator: ",")]
        var cargs = argv.map { strdup($0) }
        defer { cargs.forEach { free($0) } }
        var args = modelfs_args_init(Int32(cargs.count), &cargs)
        let me = Unmanaged.passRetained(self)
        defer { me.release() }
        guard let se = fuse_session_new(&args, &ops, MemoryLayout<fuse_lowlevel_ops>.size, me.toOpaque()) else {
            throw FSError.invalid("libfuse refused the mount options: \(options.joined(separator: ","))")
        }
        session = se
        defer { fuse_session_destroy(se) }
        guard fuse_set_signal_handlers(se) == 0 else { throw FSError.io("cannot install signal handlers") }
        defer { fuse_remove_signal_handlers(se) }
        guard fuse_session_mount(se, mountpoint) == 0 else {
            throw FSError.io("cannot mount \(mountpoint) (see the libfuse message above)")
        }
        defer { fuse_session_unmount(se) }
        // Our read and writev for /dev/fuse (CModelFSPassthrough) time every operation and count
        // every errno (opMetrics), on every mount. With flat copies and without the writeback
        // cache (which the kernel does not combine with passthrough) they also agree to
        // passthrough in the INIT reply and put backing ids in OPEN replies.
        var io = fuse_custom_io(writev: modelfs_pt_writev, read: modelfs_pt_read, splice_receive: nil, splice_send: nil)
        let passthroughWanted = !writebackCache && fs.flatCopies != nil
        modelfs_pt_enable(passthroughWanted ? 1 : 0)
        let fd = fuse_session_fd(se)
        if fuse_session_custom_io(se, &io, fd) == 0 {
            if passthroughWanted, let flat = fs.flatCopies {
                passthrough.withLock { $0 = PassthroughOpens(sessionFD: fd, flat: flat) }
            }
        } else {
            modelfs_pt_enable(0)
            Log.warning("libfuse did not take the /dev/fuse hooks: no passthrough, no operation metrics")
        }
        // Wait for the mount to answer on another thread (this one is about to serve it).
        Thread.detachNewThread { [mountpoint] in
            var st = Glibc.stat()
            if stat(mountpoint, &st) == 0 {
                FuseServer.raiseReadahead(device: st.st_dev)
            }
            ready()
        }
        let rc = modelfs_session_loop_mt(se, threads)
        fs.commitAll()
        if rc != 0 { Log.warning("FUSE loop ended with \(rc)") }
    }

    /// A FUSE mount gets 128 KiB of readahead where a disk gets MiBs; as root we raise it through
    /// the mount's backing-device entry so sequential reads arrive as large parallel requests.
    static func raiseReadahead(device: dev_t) {
        let path = "/sys/class/bdi/\(modelfs_major(device)):\(modelfs_minor(device))/read_ahead_kb"
        let fd = open(path, O_WRONLY)
        guard fd >= 0 else { return }
        defer { close(fd) }
        let value = "8192\n"
        _ = value.withCString { write(fd, $0, strlen($0)) }
    }

    // MARK: replies

    static func server(_ req: fuse_req_t?) -> FuseServer {
        Unmanaged<FuseServer>.fromOpaque(fuse_req_userdata(req)!).takeUnretainedValue()
    }

    static func context(_ req: fuse_req_t?) -> RequestContext {
        guard let c = fuse_req_ctx(req) else { return .root }
        return RequestContext(uid: c.pointee.uid, gid: c.pointee.gid, pid: c.pointee.pid)
    }

    /// A name the kernel sent. Longer than 255 bytes is ENAMETOOLONG for every operation
    /// (lookup, unlink, rename, link … as ext4 answers), not only for the ones that create: the
    /// kernel leaves the check to the filesystem, and a lookup would otherwise say ENOENT.
    static func name(_ p: UnsafePointer<CChar>?) throws -> String { try text(p, atMost: 255, "file name") }

    /// A symlink's target: a path, not a name — any length up to PATH_MAX − 1 (4095 bytes; its
    /// components may be longer than a name, it is not looked up when the link is made).
    static func symlinkTarget(_ p: UnsafePointer<CChar>?) throws -> String { try text(p, atMost: 4095, "symlink target") }

    /// A C string from the kernel of at most `limit` bytes (else ENAMETOOLONG): any bytes, as
    /// `RawName` maps them to a string.
    private static func text(_ p: UnsafePointer<CChar>?, atMost limit: Int, _ what: String) throws -> String {
        guard let p else { throw FSError.invalid("no \(what)") }
        let n = strnlen(p, limit + 1)
        if n > limit { throw FSError(ENAMETOOLONG, "\(what) longer than \(limit) bytes") }
        return RawName.string(UnsafeBufferPointer(start: UnsafeRawPointer(p).assumingMemoryBound(to: UInt8.self), count: n))
    }

    func statOf(_ a: InodeAttributes) -> Glibc.stat {
        var st = Glibc.stat()
        st.st_ino = ino_t(a.ino.rawValue)
        st.st_mode = mode_t(a.kind.modeBits | a.mode)
        st.st_nlink = nlink_t(a.nlink)
        st.st_uid = a.uid
        st.st_gid = a.gid
        st.st_rdev = dev_t(a.rdev)
        st.st_size = off_t(a.size)
        st.st_blocks = blkcnt_t((a.size + 511) / 512)
        // Buffered I/O libraries size their buffers by st_blksize: ask for large writes.
        st.st_blksize = 128 << 10
        st.st_atim = timespec(tv_sec: Int(a.atime.seconds), tv_nsec: Int(a.atime.nanoseconds))
        st.st_mtim = timespec(tv_sec: Int(a.mtime.seconds), tv_nsec: Int(a.mtime.nanoseconds))
        st.st_ctim = timespec(tv_sec: Int(a.ctime.seconds), tv_nsec: Int(a.ctime.nanoseconds))
        return st
    }

    func entry(_ a: InodeAttributes) -> fuse_entry_param {
        var e = fuse_entry_param()
        e.ino = fuse_ino_t(a.ino.rawValue)
        e.generation = 1
        e.attr = statOf(a)
        e.attr_timeout = attrTimeout
        e.entry_timeout = entryTimeout
        return e
    }

    /// The entry, or with `negative` > 0 "no such name" as a negative entry the kernel keeps for
    /// that long (an entry with inode number 0; lookup only).
    func replyEntry(_ req: fuse_req_t?, _ op: String, negative: Double = 0, _ body: () throws -> InodeAttributes) {
        do {
            var e = entry(try body())
            fuse_reply_entry(req, &e)
        } catch let error as FSError where error.errno == ENOENT && negative > 0 {
            var e = fuse_entry_param()
            e.ino = 0
            e.entry_timeout = negative
            fuse_reply_entry(req, &e)
        } catch { fuse_reply_err(req, errnoFor(error, op: op)) }
    }

    func replyAttr(_ req: fuse_req_t?, _ op: String, _ body: () throws -> InodeAttributes) {
        do {
            var st = statOf(try body())
            fuse_reply_attr(req, &st, attrTimeout)
        } catch { fuse_reply_err(req, errnoFor(error, op: op)) }
    }

    func replyOK(_ req: fuse_req_t?, _ op: String, _ body: () throws -> Void) {
        do { try body(); fuse_reply_err(req, 0) } catch { fuse_reply_err(req, errnoFor(error, op: op)) }
    }

    func replyData(_ req: fuse_req_t?, size: Int, _ data: Data) {
        if size == 0 {
            fuse_reply_xattr(req, data.count)
        } else if size < data.count {
            fuse_reply_err(req, ERANGE)
        } else {
            data.withUnsafeBytes { _ = fuse_reply_buf(req, $0.baseAddress?.assumingMemoryBound(to: CChar.self), $0.count) }
        }
    }

    /// Drops the kernel's cached attributes of `ino` (not its pages: offset -1), so its size is
    /// asked again. Safe inside a request: it touches no page or inode lock.
    func invalidateAttributes(_ ino: fuse_ino_t) {
        if let session { _ = fuse_lowlevel_notify_inval_inode(session, ino, -1, 0) }
    }

    /// Drops the kernel's cached attributes of `ino`, and its pages too if `pages` (from a watch
    /// thread, never inside a request for that inode).
    public func invalidateInode(_ ino: UInt64, pages: Bool) {
        if let session { _ = fuse_lowlevel_notify_inval_inode(session, fuse_ino_t(ino), pages ? 0 : -1, 0) }
    }

    /// Drops the kernel's cached entry `name` in `parent` (from a watch thread).
    public func invalidateEntry(parent: UInt64, name: String) {
        guard let session else { return }
        _ = RawName.withCString(name) { fuse_lowlevel_notify_inval_entry(session, fuse_ino_t(parent), $0, strlen($0)) }
    }

    func setOpenReply(_ fi: UnsafeMutablePointer<fuse_file_info>?, _ o: FileSystem.Opened, ino: UInt64? = nil) {
        guard let fi else { return }
        fi.pointee.fh = o.handle.rawValue
        var direct = o.direct
        if let ino, let pt = passthroughOpens {
            let writable = (fi.pointee.flags & O_ACCMODE) != O_RDONLY
            if let id = pt.open(ino: ino, fh: o.handle.rawValue, writable: writable, direct: &direct, fs: fs) {
                // The kernel reads this handle from the flat copy (or, with direct_io, only maps
                // it): the reply carries its backing id (the writev hook puts it in), and no
                // keep_cache (with passthrough it fails the open).
                modelfs_pt_mark(o.handle.rawValue, id)
                modelfs_fi_set_keep_cache(fi, 0)
                modelfs_fi_set_direct_io(fi, direct ? 1 : 0)
                return
            }
        }
        // keep_cache: the kernel's cached pages are still this version, keep them.
        modelfs_fi_set_keep_cache(fi, o.keepCache ? 1 : 0)
        // direct_io only for write-only opens (FileSystem.open): mmap (MAP_SHARED too) needs the
        // page cache, and a write-only descriptor cannot be mapped. Also for an open that must
        // not use the page cache while the inode passes through (PassthroughOpens).
        modelfs_fi_set_direct_io(fi, direct ? 1 : 0)
    }

    /// Set once the mount runs with passthrough hooks; opens pass through once the kernel agreed.
    var passthroughOpens: PassthroughOpens? {
        guard modelfs_pt_negotiated() != 0 else { return nil }
        return passthrough.withLock { $0 }
    }

    /// Whether read-only opens may pass through (the kernel agreed at INIT), and how many did.
    public var passthroughStatus: (on: Bool, offered: Bool, off: String?, opens: UInt64, daemonReads: UInt64) {
        let pt = passthroughOpens
        let off = pt?.refused.map { "the kernel refused a backing file (\($0)); opens use the page cache" }
        return (pt != nil && off == nil, modelfs_pt_offered() != 0, off, pt?.passedThrough ?? 0, readRequests.load(ordering: .relaxed))
    }

    /// The kernel computes append offsets itself: drop O_APPEND. With the writeback cache it may
    /// also read pages of a file opened write-only: open O_WRONLY as O_RDWR then (libfuse's own
    /// examples forget this in `create`, and np.savez then fails with EBADF).
    func adjustedFlags(_ fi: UnsafeMutablePointer<fuse_file_info>?) -> OpenFlags {
        var f = fi?.pointee.flags ?? O_RDONLY
        if writebackCache && f & O_ACCMODE == O_WRONLY { f = (f & ~O_ACCMODE) | O_RDWR }
        f &= ~O_APPEND
        return OpenFlags(f)
    }
}
