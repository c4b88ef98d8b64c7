import Foundation
import ModelFSCore
import ModelFSMeta
import ModelFSStore
import Synchronization

// Opening files and reading them: sessions and read views, prefetch by format, flat copies
// for passthrough, reads by offset.

extension FileSystem {
    func loadManifest(_ ino: InodeNumber) throws -> Manifest {
        switch try meta.manifest(of: ino) {
        case .inline(let m): return m
        case .block(let id, _):
            let b = try reader.block(id)
            return try Manifest(decoding: b.data)
        }
    }

    /// A write session of `ino`; `epoch`: the write lock this node took for it (cluster nodes).
    func makeSession(_ ino: InodeNumber, epoch: Int64?) throws -> WriteSession {
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
        withTables { $0.opening[ino, default: 0] += 1 }
        defer {
            withTables { t in
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
            let (hasSession, hasView) = withTables { t in
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
            let installed: (UInt64, Bool, WriteSession?)? = withTables { t in
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
        let (s, v) = withTables { t in (t.live[h.ino]?.session, t.live[h.ino]?.view) }
        if let s {
            let buffer = BlockBuffer(count: count)
            s.lock.lock(); defer { s.lock.unlock() }
            let n = try s.read(at: offset, count: count, into: buffer.pointer)
            return n > 0 ? [ReadSlice(buffer: buffer, offset: 0, count: n)] : []
        }
        guard let v else { throw FSError.badHandle() }
        servedRequests.add(1, ordering: .relaxed)
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
    func bytes(of view: ReadView) -> (Range<UInt64>) throws -> [UInt8] {
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
    func files(in dir: InodeNumber, matching siblings: [FormatPrefetch.Sibling]) throws -> [InodeNumber] {
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
        let view = withTables { t -> ReadView? in
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
        guard let path = flatCopies.take(key, size: view.size, check: check, build: { [weak self, weak flatCopies] fd in
            var pace = FlatBuildPace()
            var looked = DispatchTime.now().uptimeNanoseconds
            try view.write(to: fd, reader: reader, stop: {
                guard let self, let flatCopies, !flatCopies.closing else { return "the filesystem is being unmounted" }
                pace.yield(reads: { self.servedRequests.load(ordering: .relaxed) }, stop: { flatCopies.closing })
                if flatCopies.closing { return "the filesystem is being unmounted" }
                // Once a second: a version deleted or replaced meanwhile has no next open to serve.
                let now = DispatchTime.now().uptimeNanoseconds
                if now - looked > 1_000_000_000 {
                    looked = now
                    guard let a = try? self.meta.getattr(view.file.ino), a.nlink > 0, a.version == view.version else {
                        return "the file was deleted or changed"
                    }
                }
                return nil
            })
        }) else { return nil }
        return (key, path)
    }

    public func read(_ fh: FileHandleID, at offset: UInt64, count: Int, into dst: UnsafeMutableRawPointer) throws -> Int {
        try readSlices(fh, at: offset, count: count).copy(to: dst)
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
    /// `stop` is asked before each step: a reason to give up (the copy is then not made), or nil.
    func write(to fd: Int32, reader: BlockReader, stop: () -> String? = { nil }) throws {
        let step = 4 << 20
        var offset: UInt64 = 0
        // The next step's blocks are read and verified, four at a time, while this step is
        // written: hashing is half of a build's CPU and the copy into the page cache the other
        // half, and the two ran one after the other on one thread (docs/PERFORMANCE.md).
        let file = file
        func load(_ from: UInt64) -> DispatchSemaphore? {
            let stored = min(size, from + UInt64(step), chunks.end)
            guard from < stored else { return nil }
            let ids = chunks.chunks[chunks.index(of: from)...chunks.index(of: stored - 1)].map(\.id)
            let done = DispatchSemaphore(value: 0)
            Thread { parallelFor(ids.count, width: 4) { i in _ = try? reader.block(ids[i], for: file) }; done.signal() }.start()
            return done
        }
        var ahead = load(0)
        defer { ahead?.wait() }
        while offset < size {
            if let why = stop() { throw FSError.io("stopped: \(why)") }
            ahead?.wait()
            ahead = load(offset + UInt64(step))
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

/// A flat copy's build yields to the readers and writers the daemon serves. The build reads and
/// checks every block of the file again and writes the copy, on the CPUs and the disk they use:
/// beside a cold 4 KiB random reader it took two thirds of its reads (8,168 reads/s alone,
/// 2,815 with a build beside it), and a build let run after the reads made a 512 MiB np.save
/// beside it take 2.4 s instead of 0.6. Before each 4 MiB step the build looks at the rate of
/// READs and WRITEs the daemon served over the last `window` or more; while it is above `busy`
/// per second the build waits, and goes on once they slow down (an open that only peeks at a
/// file is not a reader to wait for).
struct FlatBuildPace {
    static let window: UInt64 = 50_000_000    // ns
    static let busy: Double = 200             // reads/s
    /// When the current window began, and the read total then (nil before the first look).
    private var since = DispatchTime.now().uptimeNanoseconds
    private var count: UInt64?

    /// Returns at once unless the last window's reads came faster than `busy`; then waits a
    /// window at a time until they slow down or `stop` says so.
    mutating func yield(reads: () -> UInt64, stop: () -> Bool) {
        while !stop() {
            let now = DispatchTime.now().uptimeNanoseconds, n = reads()
            guard let start = count else { count = n; since = now; return }
            if now - since < Self.window { return }
            let rate = Double(n &- start) / (Double(now - since) / 1e9)
            count = n; since = now
            if rate <= Self.busy { return }
            usleep(UInt32(Self.window / 1000))
        }
    }
}
