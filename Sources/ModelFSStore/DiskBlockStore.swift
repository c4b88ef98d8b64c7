import Foundation
import ModelFSCore
import Synchronization

/// Blocks as files: `ROOT/blocks/ab/abcdef…` (the id in hex, fanned out over 256 folders).
///
/// A block is written to `ROOT/tmp/` and renamed into place, so a block file under its name is
/// always complete; a crash leaves at most a stray temporary file, removed at the next start.
/// After `put` returns the block survives a crash of the process (it is in the kernel's page
/// cache); `sync` fsyncs blocks not yet synced, so they survive power loss too.
public final class DiskBlockStore: BlockStore, @unchecked Sendable {
    public let root: String
    let blocksDir: String
    let tmpDir: String
    private let logger: @Sendable (String) -> Void

    private struct State {
        var usage = BlockStoreUsage()
        var unsynced = Set<BlockID>()
        var tmpCounter: UInt64 = 0
    }
    private let state = Mutex(State())

    /// Opens (creating if needed) a store under `root`. Counts the blocks already there.
    public init(root: String, logger: @escaping @Sendable (String) -> Void = { _ in }) throws {
        self.root = root
        self.logger = logger
        blocksDir = root + "/blocks"
        tmpDir = root + "/tmp"
        for dir in [root, blocksDir, tmpDir] { try DiskBlockStore.makeDirectory(dir) }
        for i in 0..<256 { try DiskBlockStore.makeDirectory(blocksDir + "/" + String(format: "%02x", i)) }
        // Stray temporary files are blocks that were never renamed into place: drop them.
        if let strays = try? FileManager.default.contentsOfDirectory(atPath: tmpDir) {
            for s in strays { unlink(tmpDir + "/" + s) }
        }
        var usage = BlockStoreUsage()
        for i in 0..<256 {
            let dir = blocksDir + "/" + String(format: "%02x", i)
            guard let d = opendir(dir) else { continue }
            defer { closedir(d) }
            while let e = readdir(d) {
                let name = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.baseAddress!.assumingMemoryBound(to: CChar.self)) }
                guard name.count == 64 else { continue }
                var st = stat()
                if stat(dir + "/" + name, &st) == 0 { usage.blocks += 1; usage.bytes += UInt64(st.st_size) }
            }
        }
        state.withLock { $0.usage = usage }
    }

    static func makeDirectory(_ path: String) throws {
        if mkdir(path, 0o700) != 0 && errno != EEXIST { throw posixError("mkdir", path) }
    }

    public func path(of id: BlockID) -> String {
        let hex = id.hex
        return blocksDir + "/" + hex.prefix(2) + "/" + hex
    }

    public func contains(_ id: BlockID) -> Bool { access(path(of: id), F_OK) == 0 }

    @discardableResult
    public func put(_ id: BlockID, _ bytes: UnsafeRawBufferPointer) throws -> Bool {
        let final = path(of: id)
        // The existence check and the touch happen under the lock that garbage collection
        // deletes under: a block found here is fresh and will not be collected.
        let existed = state.withLock { s -> Bool in
            guard access(final, F_OK) == 0 else { return false }
            utimensat(AT_FDCWD, final, nil, 0)
            s.usage.dedupHits += 1
            return true
        }
        if existed { return false }
        let n = state.withLock { s -> UInt64 in s.tmpCounter += 1; return s.tmpCounter }
        let tmp = "\(tmpDir)/\(id.hex).\(getpid()).\(n)"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw posixError("create block", tmp) }
        var written = 0
        while written < bytes.count {
            let r = pwrite(fd, bytes.baseAddress! + written, bytes.count - written, off_t(written))
            if r < 0 {
                if errno == EINTR { continue }
                let e = errno
                close(fd); unlink(tmp)
                throw e == ENOSPC ? FSError.noSpace("block store \(root): disk full") : posixError("write block", tmp, errno: e)
            }
            written += r
        }
        if close(fd) != 0 {
            let e = errno; unlink(tmp)
            throw e == ENOSPC ? FSError.noSpace("block store \(root): disk full") : posixError("close block", tmp, errno: e)
        }
        if rename(tmp, final) != 0 {
            let e = errno; unlink(tmp)
            throw posixError("rename block", final, errno: e)
        }
        state.withLock { s in
            s.usage.blocks += 1
            s.usage.bytes += UInt64(bytes.count)
            s.usage.bytesWritten += UInt64(bytes.count)
            s.unsynced.insert(id)
        }
        return true
    }

    public func read(_ id: BlockID) throws -> BlockBuffer {
        let p = path(of: id)
        let fd = open(p, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            let e = errno
            logger("missing block \(id.hex) (\(p)): \(String(cString: strerror(e)))")
            throw FSError.io("block \(id.hex) is missing from \(root)")
        }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw posixError("stat block", p) }
        let buffer = BlockBuffer(count: Int(st.st_size))
        var done = 0
        while done < buffer.count {
            let r = pread(fd, buffer.pointer + done, buffer.count - done, off_t(done))
            if r < 0 { if errno == EINTR { continue }; throw posixError("read block", p) }
            if r == 0 { break }
            done += r
        }
        guard done == buffer.count, BlockID.hash(buffer.bytes) == id else {
            logger("corrupt block \(id.hex) at \(p): its content does not match its name")
            throw FSError.io("block \(id.hex) is corrupt")
        }
        return buffer
    }

    public func sync(_ ids: [BlockID]) throws {
        let pending = state.withLock { s in ids.filter { s.unsynced.contains($0) } }
        guard !pending.isEmpty else { return }
        if pending.count > 32 {
            // Many blocks: one syncfs is far cheaper than an fsync per file and per folder.
            let fd = open(blocksDir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            guard fd >= 0 else { throw posixError("open", blocksDir) }
            defer { close(fd) }
            guard syncfs(fd) == 0 else { throw posixError("syncfs", blocksDir) }
        } else {
            var dirs = Set<String>()
            for id in pending {
                let p = path(of: id)
                let fd = open(p, O_RDONLY | O_CLOEXEC)
                guard fd >= 0 else { throw posixError("open block", p) }
                defer { close(fd) }
                guard fsync(fd) == 0 else { throw posixError("fsync block", p) }
                dirs.insert(String(p.dropLast(65)))
            }
            for d in dirs {
                let fd = open(d, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
                guard fd >= 0 else { throw posixError("open", d) }
                defer { close(fd) }
                guard fsync(fd) == 0 else { throw posixError("fsync", d) }
            }
        }
        state.withLock { s in for id in pending { s.unsynced.remove(id) } }
    }

    public func remove(_ id: BlockID) throws {
        let p = path(of: id)
        var st = stat()
        guard stat(p, &st) == 0 else { return }
        guard unlink(p) == 0 else { throw posixError("remove block", p) }
        state.withLock { s in
            s.usage.blocks -= 1
            s.usage.bytes -= min(s.usage.bytes, UInt64(st.st_size))
            s.unsynced.remove(id)
        }
    }

    public func usage() -> BlockStoreUsage { state.withLock { $0.usage } }

    /// Every stored block with its modification time (the last time it was written or found
    /// already stored by a writer).
    public func listBlocks() -> [(id: BlockID, mtime: Timestamp)] {
        var out: [(BlockID, Timestamp)] = []
        for i in 0..<256 {
            let dir = blocksDir + "/" + String(format: "%02x", i)
            guard let d = opendir(dir) else { continue }
            defer { closedir(d) }
            while let e = readdir(d) {
                let name = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.baseAddress!.assumingMemoryBound(to: CChar.self)) }
                guard let id = BlockID(hex: name) else { continue }
                var st = stat()
                if stat(dir + "/" + name, &st) == 0 {
                    out.append((id, Timestamp(seconds: Int64(st.st_mtim.tv_sec), nanoseconds: Int32(st.st_mtim.tv_nsec))))
                }
            }
        }
        return out
    }

    /// Removes a block unless a writer stored or found it at or after `cutoff`. Returns the bytes freed.
    public func removeIfStale(_ id: BlockID, cutoff: Timestamp) -> UInt64 {
        let p = path(of: id)
        return state.withLock { s -> UInt64 in
            var st = stat()
            guard stat(p, &st) == 0 else { return 0 }
            let mtime = Timestamp(seconds: Int64(st.st_mtim.tv_sec), nanoseconds: Int32(st.st_mtim.tv_nsec))
            guard mtime < cutoff, unlink(p) == 0 else { return 0 }
            s.usage.blocks -= 1
            s.usage.bytes -= min(s.usage.bytes, UInt64(st.st_size))
            s.unsynced.remove(id)
            return UInt64(st.st_size)
        }
    }
}

/// syncfs(2) is declared only under _GNU_SOURCE, which Swift's Glibc module does not define;
/// the symbol itself is plain glibc, so bind it by name.
@_silgen_name("syncfs")
private func syncfs(_ fd: Int32) -> Int32
