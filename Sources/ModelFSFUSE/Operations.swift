import CFuse3
import Foundation
import ModelFS
import ModelFSCore

// libfuse calls these from its worker threads. They are written as closures that capture
// nothing (so they convert to C function pointers) and live outside main.swift (code there is
// main-actor isolated and traps when called from another thread).

private func ino(_ i: fuse_ino_t) -> InodeNumber { InodeNumber(UInt64(i)) }
private func fh(_ fi: UnsafeMutablePointer<fuse_file_info>?) -> FileHandleID { FileHandleID(fi?.pointee.fh ?? 0) }

extension FuseServer {
    static func operations() -> fuse_lowlevel_ops {
        var ops = fuse_lowlevel_ops()

        ops.`init` = { userdata, conn in
            guard let conn else { return }
            let c = conn.pointee.capable
            var want = conn.pointee.want
            // Writeback cache, only when asked for (-o writeback_cache; never on a cluster node,
            // see FuseServer.writebackCache): writes land in the page cache and reach us later as
            // merged requests; the kernel keeps size and mtime itself while it has dirty pages.
            // Without it (the default) each write() reaches us in order, up to 1 MiB per request,
            // which is faster for large sequential checkpoint writes (MountOptions).
            let server = userdata.map { Unmanaged<FuseServer>.fromOpaque($0).takeUnretainedValue() }
            if c & UInt32(FUSE_CAP_WRITEBACK_CACHE) != 0 && server?.writebackCache == true {
                want |= UInt32(FUSE_CAP_WRITEBACK_CACHE)
                Log.info("kernel writeback cache: on")
            } else {
                want &= ~UInt32(FUSE_CAP_WRITEBACK_CACHE)
                Log.info("kernel writeback cache: off (writes reach the daemon as they are made)")
            }
            // O_TRUNC arrives with open(), so truncate-and-rewrite is one step for us.
            if c & UInt32(FUSE_CAP_ATOMIC_O_TRUNC) != 0 { want |= UInt32(FUSE_CAP_ATOMIC_O_TRUNC) }
            // Lookups and readdirs in one directory may run in parallel: the engine is thread-safe.
            if c & UInt32(FUSE_CAP_PARALLEL_DIROPS) != 0 { want |= UInt32(FUSE_CAP_PARALLEL_DIROPS) }
            // Readahead arrives as several requests at once, served in parallel by worker threads.
            if c & UInt32(FUSE_CAP_ASYNC_READ) != 0 { want |= UInt32(FUSE_CAP_ASYNC_READ) }
            // Symlink targets do not change under one name: let the kernel cache them.
            if c & UInt32(FUSE_CAP_CACHE_SYMLINKS) != 0 { want |= UInt32(FUSE_CAP_CACHE_SYMLINKS) }
            // No getlk/setlk/flock operations: the kernel keeps flock, POSIX and OFD locks itself,
            // which is exact on one node (h5py, Keras and TensorStore take them).
            want &= ~UInt32(FUSE_CAP_POSIX_LOCKS | FUSE_CAP_FLOCK_LOCKS)
            // READDIRPLUS: a directory page comes with its entries' attributes (read in batches),
            // so `ls -l` or os.scandir+stat need no lookup per name. On a cluster node, where a
            // lookup is two etcd reads, every readdir is a readdirplus; alone, the kernel's
            // heuristic (plus only when names listed get looked up) saves the attribute reads
            // of a plain `ls`.
            if c & UInt32(FUSE_CAP_READDIRPLUS) != 0 {
                want |= UInt32(FUSE_CAP_READDIRPLUS)
                if server?.alwaysReaddirPlus == true {
                    want &= ~UInt32(FUSE_CAP_READDIRPLUS_AUTO)
                } else if c & UInt32(FUSE_CAP_READDIRPLUS_AUTO) != 0 {
                    want |= UInt32(FUSE_CAP_READDIRPLUS_AUTO)
                }
            }
            conn.pointee.want = want
            // 1 MiB writes (the most the kernel sends); reads as large as readahead allows.
            conn.pointee.max_write = 1 << 20
            conn.pointee.max_readahead = 8 << 20
            // Let writeback and readahead keep many requests in flight.
            conn.pointee.max_background = 64
            conn.pointee.congestion_threshold = 48
            conn.pointee.time_gran = 1
        }

        ops.destroy = { userdata in
            guard let userdata else { return }
            Unmanaged<FuseServer>.fromOpaque(userdata).takeUnretainedValue().fs.commitAll()
        }

        ops.lookup = { req, parent, name in
            let s = FuseServer.server(req)
            s.replyEntry(req, "lookup", negative: s.negativeTimeout) { try s.fs.lookup(parent: ino(parent), name: try FuseServer.name(name)) }
        }

        ops.forget = { req, i, n in
            FuseServer.server(req).fs.forget(ino(i), count: UInt64(n))
            fuse_reply_none(req)
        }

        ops.forget_multi = { req, count, forgets in
            let s = FuseServer.server(req)
            if let forgets {
                for k in 0..<count { s.fs.forget(ino(forgets[k].ino), count: UInt64(forgets[k].nlookup)) }
            }
            fuse_reply_none(req)
        }

        ops.getattr = { req, i, _ in
            let s = FuseServer.server(req)
            s.replyAttr(req, "getattr") { try s.fs.getattr(ino(i)) }
        }

        ops.setattr = { req, i, attr, toSet, fi in
            let s = FuseServer.server(req)
            s.replyAttr(req, "setattr") {
                guard let attr else { throw FSError.invalid("no attributes") }
                let a = attr.pointee
                var ch = AttributeChanges()
                let now = Timestamp.now()
                if toSet & FUSE_SET_ATTR_MODE != 0 { ch.mode = UInt32(a.st_mode) & 0o7777 }
                if toSet & FUSE_SET_ATTR_UID != 0 { ch.uid = a.st_uid }
                if toSet & FUSE_SET_ATTR_GID != 0 { ch.gid = a.st_gid }
                if toSet & FUSE_SET_ATTR_SIZE != 0 { ch.size = UInt64(a.st_size) }
                if toSet & FUSE_SET_ATTR_ATIME_NOW != 0 { ch.atime = now } else if toSet & FUSE_SET_ATTR_ATIME != 0 {
                    ch.atime = Timestamp(seconds: Int64(a.st_atim.tv_sec), nanoseconds: Int32(a.st_atim.tv_nsec))
                }
                if toSet & FUSE_SET_ATTR_MTIME_NOW != 0 { ch.mtime = now } else if toSet & FUSE_SET_ATTR_MTIME != 0 {
                    ch.mtime = Timestamp(seconds: Int64(a.st_mtim.tv_sec), nanoseconds: Int32(a.st_mtim.tv_nsec))
                }
                return try s.fs.setattr(ino(i), ch, handle: fi.map { FileHandleID($0.pointee.fh) }, context: FuseServer.context(req))
            }
        }

        ops.readlink = { req, i in
            let s = FuseServer.server(req)
            do {
                let target = try s.fs.readlink(ino(i))
                RawName.withCString(target) { _ = fuse_reply_readlink(req, $0) }
            } catch { fuse_reply_err(req, errnoFor(error, op: "readlink")) }
        }

        ops.mknod = { req, parent, name, mode, rdev in
            let s = FuseServer.server(req)
            s.replyEntry(req, "mknod") {
                try s.fs.mknod(parent: ino(parent), name: try FuseServer.name(name), mode: UInt32(mode), rdev: UInt32(truncatingIfNeeded: rdev),
                               context: FuseServer.context(req))
            }
        }

        ops.mkdir = { req, parent, name, mode in
            let s = FuseServer.server(req)
            s.replyEntry(req, "mkdir") {
                try s.fs.mkdir(parent: ino(parent), name: try FuseServer.name(name), mode: UInt32(mode), context: FuseServer.context(req))
            }
        }

        ops.unlink = { req, parent, name in
            let s = FuseServer.server(req)
            s.replyOK(req, "unlink") { try s.fs.unlink(parent: ino(parent), name: try FuseServer.name(name)) }
        }

        ops.rmdir = { req, parent, name in
            let s = FuseServer.server(req)
            s.replyOK(req, "rmdir") { try s.fs.rmdir(parent: ino(parent), name: try FuseServer.name(name)) }
        }

        ops.symlink = { req, target, parent, name in
            let s = FuseServer.server(req)
            s.replyEntry(req, "symlink") {
                try s.fs.symlink(parent: ino(parent), name: try FuseServer.name(name), target: try FuseServer.symlinkTarget(target),
                                 context: FuseServer.context(req))
            }
        }

        ops.rename = { req, parent, name, newParent, newName, flags in
            let s = FuseServer.server(req)
            s.replyOK(req, "rename") {
                try s.fs.rename(parent: ino(parent), name: try FuseServer.name(name), newParent: ino(newParent),
                                newName: try FuseServer.name(newName), flags: RenameFlags(rawValue: UInt32(flags)))
            }
        }

        ops.link = { req, i, newParent, newName in
            let s = FuseServer.server(req)
            s.replyEntry(req, "link") { try s.fs.link(ino(i), parent: ino(newParent), name: try FuseServer.name(newName)) }
        }

        ops.open = { req, i, fi in
            let s = FuseServer.server(req)
            do {
                let opened = try s.fs.open(ino(i), flags: s.adjustedFlags(fi))
                if opened.staleAttributes { s.invalidateAttributes(i) }
                s.setOpenReply(fi, opened, ino: UInt64(i))
                fuse_reply_open(req, fi)
            } catch { fuse_reply_err(req, errnoFor(error, op: "open")) }
        }

        ops.create = { req, parent, name, mode, fi in
            let s = FuseServer.server(req)
            do {
                let (attrs, opened) = try s.fs.create(parent: ino(parent), name: try FuseServer.name(name), mode: UInt32(mode),
                                                      flags: s.adjustedFlags(fi), context: FuseServer.context(req))
                s.setOpenReply(fi, opened, ino: attrs.ino.rawValue)
                var e = s.entry(attrs)
                fuse_reply_create(req, &e, fi)
            } catch { fuse_reply_err(req, errnoFor(error, op: "create")) }
        }

        ops.read = { req, _, size, off, fi in
            let s = FuseServer.server(req)
            s.readRequests.add(1, ordering: .relaxed)
            do {
                // Reply straight from the cached blocks: one iovec per slice, no reply buffer.
                let slices = try s.fs.readSlices(fh(fi), at: UInt64(off), count: size)
                var iov = slices.map { iovec(iov_base: $0.buffer.pointer + $0.offset, iov_len: $0.count) }
                withExtendedLifetime(slices) {
                    _ = iov.isEmpty ? fuse_reply_buf(req, nil, 0) : fuse_reply_iov(req, &iov, Int32(iov.count))
                }
            } catch { fuse_reply_err(req, errnoFor(error, op: "read")) }
        }

        ops.write = { req, _, buf, size, off, fi in
            let s = FuseServer.server(req)
            // Answered as soon as the filesystem accepts the bytes: for a sequential writer that
            // is before they are chunked, so its next request is read (by another of the loop's
            // threads) while this one is still scanned. libfuse reuses `buf` only after we return.
            var replied = false
            do {
                _ = try s.fs.write(fh(fi), at: UInt64(off), UnsafeRawBufferPointer(start: buf, count: size),
                                   caller: FuseServer.context(req)) {
                    fuse_reply_write(req, size)
                    replied = true
                }
            } catch {
                // After the answer the error is the session's, reported by the next write, fsync
                // and close().
                if !replied { fuse_reply_err(req, errnoFor(error, op: "write")) }
            }
        }

        ops.flush = { req, _, fi in
            let s = FuseServer.server(req)
            s.replyOK(req, "flush") { try s.fs.flush(fh(fi)) }
        }

        ops.release = { req, _, fi in
            let s = FuseServer.server(req)
            s.passthroughOpens?.release(fh: fh(fi).rawValue)
            s.replyOK(req, "release") { try s.fs.release(fh(fi)) }
        }

        ops.fsync = { req, _, _, fi in
            let s = FuseServer.server(req)
            s.replyOK(req, "fsync") { try s.fs.fsync(fh(fi)) }
        }

        ops.copy_file_range = { req, _, offIn, fiIn, _, offOut, fiOut, length, flags in
            let s = FuseServer.server(req)
            do {
                guard flags == 0 else { throw FSError.invalid("copy_file_range: flags must be 0") }
                let n = try s.fs.copyFileRange(fh(fiIn), offsetIn: UInt64(offIn), fh(fiOut), offsetOut: UInt64(offOut),
                                               length: Int(length))
                fuse_reply_write(req, n)
            } catch { fuse_reply_err(req, errnoFor(error, op: "copy_file_range")) }
        }

        ops.fallocate = { req, _, mode, off, length, fi in
            let s = FuseServer.server(req)
            s.replyOK(req, "fallocate") {
                try s.fs.fallocate(fh(fi), mode: mode, offset: UInt64(off), length: UInt64(length),
                                   keepSizeFlag: modelfs_falloc_keep_size())
            }
        }

        ops.opendir = { req, i, fi in
            let s = FuseServer.server(req)
            do {
                let a = try s.fs.getattr(ino(i))
                guard a.kind == .directory else { throw FSError.notDirectory() }
                fi?.pointee.fh = 0
                fuse_reply_open(req, fi)
            } catch { fuse_reply_err(req, errnoFor(error, op: "opendir")) }
        }

        ops.readdir = { req, i, size, off, _ in
            let s = FuseServer.server(req)
            do {
                // Each entry needs at least 32 bytes: ask the engine for no more than fit.
                let entries = try s.fs.readdir(ino(i), after: UInt64(off), limit: max(1, size / 32))
                let buffer = UnsafeMutablePointer<CChar>.allocate(capacity: max(size, 1))
                defer { buffer.deallocate() }
                var used = 0
                for e in entries {
                    var st = Glibc.stat()
                    st.st_ino = ino_t(e.ino.rawValue)
                    st.st_mode = mode_t(e.kind.modeBits)
                    let n = RawName.withCString(e.name) { fuse_add_direntry(req, buffer + used, size - used, $0, &st, off_t(e.cookie)) }
                    if n > size - used { break }
                    used += n
                }
                fuse_reply_buf(req, buffer, used)
            } catch { fuse_reply_err(req, errnoFor(error, op: "readdir")) }
        }

        ops.readdirplus = { req, i, size, off, _ in
            let s = FuseServer.server(req)
            do {
                // An entry with attributes takes about 160 bytes: ask for no more than fit.
                let dir = ino(i)
                let entries = try s.fs.readdirPlus(dir, after: UInt64(off), limit: max(1, size / 160))
                let buffer = UnsafeMutablePointer<CChar>.allocate(capacity: max(size, 1))
                defer { buffer.deallocate() }
                var used = 0
                for (d, attrs) in entries {
                    var e = fuse_entry_param()
                    if let attrs {
                        e = s.entry(attrs)
                    } else if d.name == "." || d.name == ".." {
                        // The kernel skips these (no lookup reference taken): a name and type.
                        e.ino = fuse_ino_t(d.ino.rawValue)
                        e.attr.st_ino = ino_t(d.ino.rawValue)
                        e.attr.st_mode = mode_t(d.kind.modeBits)
                    } else {
                        continue   // removed since the page was read
                    }
                    let n = RawName.withCString(d.name) { fuse_add_direntry_plus(req, buffer + used, size - used, $0, &e, off_t(d.cookie)) }
                    if n > size - used { break }
                    used += n
                    if let attrs { s.fs.tookLookup(attrs, parent: dir) }
                }
                fuse_reply_buf(req, buffer, used)
            } catch { fuse_reply_err(req, errnoFor(error, op: "readdirplus")) }
        }

        ops.releasedir = { req, _, _ in fuse_reply_err(req, 0) }

        ops.fsyncdir = { req, _, _, _ in
            let s = FuseServer.server(req)
            s.replyOK(req, "fsyncdir") { try s.fs.fsyncdir() }
        }

        ops.statfs = { req, _ in
            let s = FuseServer.server(req)
            do {
                let st = try s.fs.statfs(dataDir: s.dataDir)
                var v = statvfs()
                v.f_bsize = UInt(st.blockSize)
                v.f_frsize = UInt(st.blockSize)
                v.f_blocks = fsblkcnt_t(st.blocks)
                v.f_bfree = fsblkcnt_t(st.blocksFree)
                v.f_bavail = fsblkcnt_t(st.blocksAvailable)
                v.f_files = fsfilcnt_t(st.files)
                v.f_ffree = fsfilcnt_t(st.filesFree)
                v.f_favail = fsfilcnt_t(st.filesFree)
                v.f_namemax = UInt(st.nameMax)
                fuse_reply_statfs(req, &v)
            } catch { fuse_reply_err(req, errnoFor(error, op: "statfs")) }
        }

        ops.setxattr = { req, i, name, value, size, flags in
            let s = FuseServer.server(req)
            s.replyOK(req, "setxattr") {
                let mode: XattrSetMode = flags & 1 != 0 ? .create : (flags & 2 != 0 ? .replace : .any)
                let data = value.map { Data(bytes: $0, count: size) } ?? Data()
                try s.fs.setxattr(ino(i), name: try FuseServer.name(name), value: data, mode: mode)
            }
        }

        ops.getxattr = { req, i, name, size in
            let s = FuseServer.server(req)
            do {
                s.replyData(req, size: size, try s.fs.getxattr(ino(i), name: try FuseServer.name(name)))
            } catch { fuse_reply_err(req, errnoFor(error, op: "getxattr")) }
        }

        ops.listxattr = { req, i, size in
            let s = FuseServer.server(req)
            do {
                var d = Data()
                for n in try s.fs.listxattr(ino(i)) { d.append(contentsOf: RawName.bytes(n)); d.append(0) }
                s.replyData(req, size: size, d)
            } catch { fuse_reply_err(req, errnoFor(error, op: "listxattr")) }
        }

        ops.removexattr = { req, i, name in
            let s = FuseServer.server(req)
            s.replyOK(req, "removexattr") { try s.fs.removexattr(ino(i), name: try FuseServer.name(name)) }
        }

        return ops
    }
}
