import CModelFSPassthrough
import Glibc
import ModelFS
import ModelFSCore
import Synchronization

/// Which opens pass through to a flat copy (`FlatCopies`), and the kernel's rules for them
/// (fs/fuse/iomode.c, 6.9 and later):
/// - while an inode has a passthrough open, every open of it must name the same backing file
///   (else EINVAL or EBUSY): the first registers the flat copy (`FUSE_DEV_IOC_BACKING_OPEN`),
///   the others reuse its id, the last one's release drops it. An open that must not read the
///   copy meanwhile (a writer, or a reader of a newer version) names it with `direct_io` too:
///   its reads and writes then come to the daemon, and only an mmap of it maps the copy;
/// - passthrough and page-cache opens of one inode do not mix (ETXTBSY, an EIO to the caller):
///   a read-only open passes through only while the inode has no page-cache open here.
final class PassthroughOpens: Sendable {
    private struct Inode {
        var cached = 0
        var through = 0
        var key: String?
        var backingID: Int32 = 0
        var fd: Int32 = -1
    }
    /// How a handle was opened: through the page cache, uncached, naming the backing file
    /// (reads and writes to the daemon, mmap to the copy), or reading the copy it pinned.
    private enum Mode { case cached, direct, through, pinned(String) }
    private struct State {
        var inodes: [UInt64: Inode] = [:]
        var handles: [UInt64: (ino: UInt64, mode: Mode)] = [:]
        var passedThrough: UInt64 = 0
        /// Why the kernel refused to register a backing file (no CAP_SYS_ADMIN: EPERM): no more
        /// attempts.
        var refused: String?
    }
    private let state = Mutex(State())
    let sessionFD: Int32
    let flat: FlatCopies

    init(sessionFD: Int32, flat: FlatCopies) {
        self.sessionFD = sessionFD
        self.flat = flat
    }

    var passedThrough: UInt64 { state.withLock { $0.passedThrough } }
    var refused: String? { state.withLock { $0.refused } }

    /// Decides how handle `fh` of `ino` is opened: the backing id to put in the OPEN reply
    /// (with `direct` set on return when only an mmap may use it), or nil for the page cache.
    func open(ino: UInt64, fh: UInt64, writable: Bool, direct: inout Bool, fs: FileSystem) -> Int32? {
        let copy = !writable && !direct && refused == nil ? fs.flatCopy(for: FileHandleID(fh)) : nil
        var unused = copy?.key
        defer { if let unused { flat.unpin(unused) } }
        let (id, uncached) = state.withLock { s -> (Int32?, Bool) in
            var node = s.inodes[ino] ?? Inode()
            defer { s.inodes[ino] = node }
            if node.through > 0 {
                // The inode passes through: this open must name the same backing file.
                node.through += 1
                guard let copy, copy.key == node.key else {
                    s.handles[fh] = (ino, .through)
                    return (node.backingID, true)
                }
                s.passedThrough += 1
                unused = nil
                s.handles[fh] = (ino, .pinned(copy.key))
                return (node.backingID, false)
            }
            if let copy, s.refused == nil, node.cached == 0 {
                let fd = Glibc.open(copy.path, O_RDONLY | O_CLOEXEC)
                let id = fd >= 0 ? modelfs_pt_backing_open(sessionFD, fd) : -errno
                if id > 0 {
                    node.fd = fd
                    node.backingID = id
                    node.key = copy.key
                    node.through = 1
                    s.handles[fh] = (ino, .pinned(copy.key))
                    s.passedThrough += 1
                    unused = nil
                    return (id, false)
                }
                // Refused (no CAP_SYS_ADMIN: EPERM; a stacked data dir: ELOOP): this open and
                // every later one use the page cache.
                if fd >= 0 { close(fd) }
                let why = String(cString: strerror(-id))
                Log.warning("passthrough off: the kernel did not take flat copy \(copy.key) as a backing file (\(why)); opens use the page cache")
                s.refused = why
            }
            if direct {
                s.handles[fh] = (ino, .direct)
            } else {
                node.cached += 1
                s.handles[fh] = (ino, .cached)
            }
            return (nil, false)
        }
        if uncached { direct = true }
        return id
    }

    /// The handle is released: a passthrough handle of the copy unpins it (it pinned it once,
    /// in `fs.flatCopy`); the inode's last passthrough handle also drops the backing file.
    func release(fh: UInt64) {
        let (pinned, drop) = state.withLock { s -> (String?, (Int32, Int32)?) in
            guard let (ino, mode) = s.handles.removeValue(forKey: fh), var node = s.inodes[ino] else { return (nil, nil) }
            var pinned: String?
            var drop: (Int32, Int32)?
            switch mode {
            case .cached: node.cached -= 1
            case .direct: break
            case .through, .pinned:
                if case .pinned(let key) = mode { pinned = key }
                node.through -= 1
                if node.through == 0 {
                    drop = (node.backingID, node.fd)
                    node.key = nil; node.backingID = 0; node.fd = -1
                }
            }
            s.inodes[ino] = node.cached == 0 && node.through == 0 ? nil : node
            return (pinned, drop)
        }
        if let (id, fd) = drop {
            _ = modelfs_pt_backing_close(sessionFD, id)
            close(fd)
        }
        if let pinned { flat.unpin(pinned) }
    }
}
