import CModelFSSys
import Foundation
import ModelFSCore
import Synchronization

/// Blocks appended to pack files: `ROOT/packs/00000001.pack`, … (DESIGN.md §1 leaves the layout
/// open; this is the layout of restic packs and of 3FS's chunk engine).
///
/// Why packs, not a file per block: on ext4 here creating, renaming and later deleting a 1 MiB
/// file costs about as much as writing its bytes (measured: 2048 one-MiB files take 3–8 s to
/// create, one 2 GiB file 1 s). A pack is one sequential append stream, and an fsync of new
/// blocks is one fdatasync of the active pack.
///
/// Record formats, self-describing so the index can be rebuilt by scanning:
///   "MFB1": magic (4) | data length, UInt32 LE (4) | BlockID (32) | data — anywhere, buffered.
///   "MFB2": the same 40-byte header at the start of a 4 KiB page, zeros to the page's end, then
///           the data from the next page, padded to a page: written with O_DIRECT straight
///           from the block's page-aligned buffer, for blocks of at least `directMinimum`.
/// Why direct writes: the data of a file written through the mount is already in the kernel's
/// page cache once (the FUSE file's pages); copying it into the pack's page cache too cost 40 %
/// of the daemon's CPU while writing (first touches of page-cache memory are slow on these VMs:
/// 8.4–9.6 s of CPU per 4 GiB into fresh memory against 1.2–1.4 s into reused memory), and kept
/// every byte cached twice. An "MFB2" record starts at the next page boundary; the gap after an
/// "MFB1" record before it is a hole, which the scan steps over.
/// The in-memory index (BlockID → pack, offset, length) is rebuilt at start by reading the record
/// headers; a torn record at the end of the last pack (a crash mid-append) is cut off.
///
/// Appends are serialised (one writer lock): records are written whole, and a failed append
/// (disk full) truncates the pack back, so a pack is always a sequence of whole records.
/// Durability: after `put` returns, the block survives a crash of the process (page cache);
/// `sync` fdatasyncs the packs that received blocks, so they survive power loss too.
///
/// Garbage collection drops blocks from the index; `reclaim` then marks their records dead and
/// punches their data out of the pack (no copying, so space comes back even on a full disk), and
/// deletes sealed packs with nothing live. Every block carries the time it was last stored or
/// found already stored by a writer; `removeIfStale` never removes a block touched at or after
/// its cutoff.
///
/// Tiers (`tiers`, issue #31): the store may keep packs on several filesystems, fastest first
/// (`--data` the first, each `--tier CLASS:DIR` another). Blocks are appended to the first tier
/// whose filesystem has room (a full fast tier spills to the next; writers are not failed while
/// any tier has room), and `move` rewrites blocks into another tier's active pack: the new
/// records are fdatasynced before the index points at them and the old ones are dropped (so a
/// block never has fewer copies than before), and a read that raced the move and found the old
/// record punched reads the new one. Pack numbers are unique across tiers; the index is one.
public final class PackBlockStore: BlockStore, @unchecked Sendable {
    /// One filesystem of the store: `name` its media class, `root` its directory.
    public struct Tier: Sendable, Equatable, Codable {
        public var name: String
        public var root: String
        public init(name: String, root: String) { self.name = name; self.root = root }
    }

    /// What a tier holds (`modelfs status`).
    public struct TierUsage: Sendable, Codable, Equatable {
        public var name: String
        public var root: String
        public var blocks: Int
        public var bytes: UInt64
        /// Bytes free for blocks on its filesystem (what statvfs gives non-root users).
        public var free: UInt64
    }

    public let root: String
    let packsDir: String
    /// Fastest first; `tiers[0]` is `root`.
    public let tiers: [Tier]
    let tierPacksDirs: [String]
    /// A new pack is started when the active one reaches this size.
    public let packLimit: UInt64
    private let logger: @Sendable (String) -> Void

    static let headerSize = 40
    static let magic: [UInt8] = Array("MFB1".utf8)
    /// A record whose block was garbage-collected (its data pages are punched out).
    static let deadMagic: [UInt8] = Array("MFBX".utf8)
    /// Page-aligned records ("MFB2") and their dead form.
    static let alignedMagic: [UInt8] = Array("MFB2".utf8)
    static let alignedDeadMagic: [UInt8] = Array("MFX2".utf8)
    static let page = 4096
    /// Blocks this large or larger are written directly (page-aligned records); smaller ones
    /// (small files, a file's last chunk) go through the page cache, where a 4 KiB write does
    /// not wait for the disk and does not pay a page of padding.
    public static let directMinimum = 256 << 10
    static func pageUp(_ n: UInt64) -> UInt64 { (n + UInt64(page) - 1) / UInt64(page) * UInt64(page) }

    /// An open pack file. Readers keep a reference while they read, so a deleted pack's
    /// descriptor stays valid until the last of them is done.
    final class Pack: @unchecked Sendable {
        let number: UInt32
        let path: String
        /// The tier whose directory holds it.
        var tier = 0
        let fd: Int32
        var size: UInt64
        var liveBytes: UInt64 = 0
        var deadBytes: UInt64 = 0
        /// A second descriptor with O_DIRECT, for aligned records: their appends and their reads
        /// (-1: the filesystem refused it; such a pack gets buffered records only).
        let directFD: Int32
        init(number: UInt32, path: String, fd: Int32, directFD: Int32, size: UInt64) {
            self.number = number; self.path = path; self.fd = fd; self.directFD = directFD; self.size = size
        }
        deinit {
            close(fd)
            if directFD >= 0 { close(directFD) }
        }
        /// The O_DIRECT descriptor, or nil where the filesystem has none.
        var direct: Int32? { directFD >= 0 ? directFD : nil }
    }

    /// Where a block's data is. `aligned`: an "MFB2" record (header a page before the data)
    /// rather than "MFB1" (40 bytes before).
    struct Location {
        var pack: UInt32; var offset: UInt64; var length: UInt32; var touched: Timestamp; var aligned = false
        var headerOffset: UInt64 { offset - (aligned ? UInt64(PackBlockStore.page) : UInt64(PackBlockStore.headerSize)) }
    }

    private struct State {
        var index: [BlockID: Location] = [:]
        var packs: [UInt32: Pack] = [:]
        /// The pack each tier appends to.
        var actives: [UInt32] = []
        /// The largest pack number in use, on any tier.
        var lastNumber: UInt32 = 0
        var unsynced = Set<UInt32>()
        /// Packs whose directory entry may not be durable yet: created by this process, or found
        /// at start (a crash may have come before their entry was synced). `sync` fsyncs the
        /// directory only when it syncs one of these.
        var newEntries = Set<UInt32>()
        var directorySyncs = 0
        var usage = BlockStoreUsage()
        var touchOnRead = false
        /// Records dropped from the index whose space `reclaim` has not yet returned.
        var dead: [Location] = []
    }
    private let state = Mutex(State())
    /// Serialises appends to the active pack.
    private let appendLock = RankedLock(.storeAppend)

    /// Each tier's packs directory, open for `syncfs` (opening it for each fsync cost two syscalls).
    private let packsDirFDs: [Int32]

    deinit {
        alignedHeaderPage.deallocate()
        for fd in packsDirFDs { close(fd) }
    }

    /// `slower`: more tiers after `root`'s, fastest first (their directories are made if missing).
    public init(root: String, slower: [Tier] = [], packLimit: UInt64 = 256 << 20, logger: @escaping @Sendable (String) -> Void = { _ in }) throws {
        self.root = root
        self.packLimit = packLimit
        self.logger = logger
        tiers = [Tier(name: "fast", root: root)] + slower
        tierPacksDirs = tiers.map { $0.root + "/packs" }
        packsDir = tierPacksDirs[0]
        var fds: [Int32] = []
        for (t, tier) in tiers.enumerated() {
            for dir in [tier.root, tierPacksDirs[t]] {
                if mkdir(dir, 0o700) != 0 && errno != EEXIST { throw StoreError.system("mkdir", dir) }
            }
            let fd = open(tierPacksDirs[t], O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            guard fd >= 0 else { throw StoreError.system("open", tierPacksDirs[t]) }
            fds.append(fd)
        }
        packsDirFDs = fds
        var s = State()
        var lasts: [UInt32?] = []
        for t in tiers.indices {
            let dir = tierPacksDirs[t]
            let names = ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? [])
                .filter { $0.hasSuffix(".pack") }.sorted()
            var last: UInt32?
            for name in names {
                guard let n = UInt32(name.dropLast(5)) else { continue }
                if let other = s.packs[n] { throw StoreError(.inconsistent, "pack \(name) is in two tiers: \(other.path) and \(dir)") }
                let pack = try PackBlockStore.openPack(dir + "/" + name, number: n)
                pack.tier = t
                try scan(pack, isLast: name == names.last, into: &s)
                s.packs[n] = pack
                s.lastNumber = max(s.lastNumber, n)
                last = max(last ?? 0, n)
            }
            lasts.append(last)
        }
        for t in tiers.indices {
            if let n = lasts[t], s.packs[n]!.size < packLimit {
                s.actives.append(n)
            } else {
                s.lastNumber += 1
                let pack = try PackBlockStore.openPack(tierPacksDirs[t] + "/" + PackBlockStore.packName(s.lastNumber), number: s.lastNumber)
                pack.tier = t
                s.packs[s.lastNumber] = pack
                s.actives.append(s.lastNumber)
            }
        }
        s.newEntries = Set(s.packs.keys)
        state.withLock { $0 = s }
    }

    static func packName(_ n: UInt32) -> String { String(format: "%08u", n) + ".pack" }

    static func openPack(_ path: String, number: UInt32) throws -> Pack {
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw StoreError.system("open pack", path) }
        var st = stat()
        fstat(fd, &st)
        let direct = open(path, O_RDWR | modelfs_o_direct() | O_CLOEXEC)
        return Pack(number: number, path: path, fd: fd, directFD: direct, size: UInt64(st.st_size))
    }

    /// The record header at `offset`: its magic, length and id, or nil if there is none.
    private static func header(_ fd: Int32, at offset: UInt64) -> (magic: [UInt8], length: UInt32, id: BlockID)? {
        var header = [UInt8](repeating: 0, count: PackBlockStore.headerSize)
        guard pread(fd, &header, header.count, off_t(offset)) == header.count else { return nil }
        let magic = Array(header[0..<4])
        let known = [PackBlockStore.magic, PackBlockStore.deadMagic, PackBlockStore.alignedMagic, PackBlockStore.alignedDeadMagic]
        guard known.contains(magic), let id = BlockID(bytes: header[8..<40]) else { return nil }
        let length = UInt32(header[4]) | UInt32(header[5]) << 8 | UInt32(header[6]) << 16 | UInt32(header[7]) << 24
        return (magic, length, id)
    }

    /// A record header: magic (4) | data length, UInt32 LE (4) | BlockID (32).
    static func recordHeader(_ magic: [UInt8], length: Int, id: BlockID) -> [UInt8] {
        var header = magic
        withUnsafeBytes(of: UInt32(length).littleEndian) { header += $0 }
        return header + id.bytes
    }

    /// Whether bytes [from, to) of a pack read as zeros (the hole before an aligned record).
    private static func zeros(_ fd: Int32, from: UInt64, to: UInt64) -> Bool {
        var buf = [UInt8](repeating: 1, count: Int(to - from))
        return pread(fd, &buf, buf.count, off_t(from)) == buf.count && buf.allSatisfy { $0 == 0 }
    }

    /// Reads a pack's record headers into the index.
    private func scan(_ pack: Pack, isLast: Bool, into s: inout State) throws {
        var offset: UInt64 = 0
        let now = Timestamp.now()
        while offset + UInt64(PackBlockStore.headerSize) <= pack.size {
            var found = PackBlockStore.header(pack.fd, at: offset)
            if found == nil, offset % UInt64(PackBlockStore.page) != 0 {
                // An aligned record after a buffered one starts at the next page; the gap is a hole.
                let next = PackBlockStore.pageUp(offset)
                if next + UInt64(PackBlockStore.headerSize) <= pack.size, PackBlockStore.zeros(pack.fd, from: offset, to: next),
                   let h = PackBlockStore.header(pack.fd, at: next),
                   h.magic == PackBlockStore.alignedMagic || h.magic == PackBlockStore.alignedDeadMagic {
                    pack.deadBytes += next - offset
                    offset = next
                    found = h
                }
            }
            guard let (magic, length, id) = found else {
                logger("pack \(pack.path): bad record header at offset \(offset); later records of this pack are ignored")
                break
            }
            let aligned = magic == PackBlockStore.alignedMagic || magic == PackBlockStore.alignedDeadMagic
            if aligned && offset % UInt64(PackBlockStore.page) != 0 {
                logger("pack \(pack.path): aligned record at unaligned offset \(offset); later records of this pack are ignored")
                break
            }
            let dataOffset = offset + UInt64(aligned ? PackBlockStore.page : PackBlockStore.headerSize)
            let end = aligned ? dataOffset + PackBlockStore.pageUp(UInt64(length)) : dataOffset + UInt64(length)
            if end > pack.size { break }  // torn tail
            if magic == PackBlockStore.deadMagic || magic == PackBlockStore.alignedDeadMagic {
                pack.deadBytes += UInt64(length)
            } else if s.index[id] == nil {
                s.index[id] = Location(pack: pack.number, offset: dataOffset, length: length, touched: now, aligned: aligned)
                pack.liveBytes += UInt64(length)
                s.usage.blocks += 1
                s.usage.bytes += UInt64(length)
            } else {
                pack.deadBytes += UInt64(length)
            }
            offset = end
        }
        if offset < pack.size {
            if isLast {
                logger("pack \(pack.path): cutting off a torn record at offset \(offset) (a crash while appending)")
                _ = ftruncate(pack.fd, off_t(offset))
            } else {
                pack.deadBytes += pack.size - offset
            }
            pack.size = isLast ? offset : pack.size
        }
    }

    public func contains(_ id: BlockID) -> Bool { state.withLock { $0.index[id] != nil } }

    /// The length of block `id`, nil if it is not here.
    public func length(of id: BlockID) -> Int? { state.withLock { s in s.index[id].map { Int($0.length) } } }

    @discardableResult
    public func put(_ id: BlockID, _ bytes: UnsafeRawBufferPointer) throws -> Bool {
        if touchIfStored(id) { return false }
        appendLock.lock(); defer { appendLock.unlock() }
        if contains(id) { return false }  // stored by another writer meanwhile
        let tier = try tierWithRoom(for: bytes.count)
        let end = try appendLocked(id, bytes, tier: tier)
        if end >= packLimit { try rollActivePack(tier) }
        return true
    }

    /// A block found already stored: touched (under the lock GC removes under) and counted as a
    /// dedup hit. Returns whether it was there.
    private func touchIfStored(_ id: BlockID) -> Bool {
        state.withLock { s -> Bool in
            guard s.index[id] != nil else { return false }
            s.index[id]!.touched = .now()
            s.usage.dedupHits += 1
            return true
        }
    }

    /// Stores a block from its own page-aligned buffer: a block of `directMinimum` bytes or more
    /// is appended as an aligned record with one direct write (no copy into the page cache); a
    /// smaller one, or any block on a filesystem without O_DIRECT, as `put(_:_:)` does.
    @discardableResult
    public func put(_ id: BlockID, owned buffer: BlockBuffer, length: Int) throws -> Bool {
        let padded = Int(PackBlockStore.pageUp(UInt64(length)))
        if length >= PackBlockStore.directMinimum, Self.paddable(buffer, length),
           let created = try putAligned(id, buffer, length: length, padded: padded) {
            return created
        }
        return try buffer.withUnsafeBytes { try put(id, UnsafeRawBufferPointer(rebasing: $0[0..<length])) }
    }

    /// Whether `buffer` can be written directly as `length` bytes padded to a page: it starts on
    /// a page and has room for the padding (a buffer over 8 MiB is allocated to its size).
    static func paddable(_ buffer: BlockBuffer, _ length: Int) -> Bool {
        Int(pageUp(UInt64(length))) <= buffer.capacity && Int(bitPattern: buffer.pointer) % page == 0
    }

    /// The aligned append of `put(_:owned:length:)`; nil if the active pack has no direct I/O.
    private func putAligned(_ id: BlockID, _ buffer: BlockBuffer, length: Int, padded: Int) throws -> Bool? {
        if touchIfStored(id) { return false }
        // Outside the append lock: CRC32C of each piece, kept in the header page (PieceSums).
        let sums = withExtendedLifetime(buffer) { PieceSums(of: UnsafeRawBufferPointer(start: buffer.pointer, count: length)) }
        appendLock.lock(); defer { appendLock.unlock() }
        if contains(id) { return false }
        let tier = try tierWithRoom(for: padded + PackBlockStore.page)
        let pack = state.withLock { s in s.packs[s.actives[tier]]! }
        guard let direct = pack.direct else { return nil }
        let (loc, end) = try appendAligned(id, buffer, length: length, sums: sums, to: pack, direct: direct, touched: .now())
        appended(id, to: pack, at: loc, end: end)
        if end >= packLimit { try rollActivePack(tier) }
        return true
    }

    /// Writes an aligned record of `buffer` (page-aligned, room for its padding) with its piece
    /// sums at the next page of `pack` (append lock held). Returns where its data is and where
    /// the pack now ends; indexing it is the caller's.
    private func appendAligned(_ id: BlockID, _ buffer: BlockBuffer, length: Int, sums: PieceSums, to pack: Pack,
                               direct: Int32, touched: Timestamp) throws -> (Location, UInt64) {
        precondition(Self.paddable(buffer, length))
        let padded = Int(PackBlockStore.pageUp(UInt64(length)))
        // The padding after the block goes to disk: zeros, not whatever the buffer held.
        if padded > length { memset(buffer.pointer + length, 0, padded - length) }
        let offset = PackBlockStore.pageUp(pack.size)
        memset(alignedHeaderPage, 0, PackBlockStore.page)
        PackBlockStore.recordHeader(PackBlockStore.alignedMagic, length: length, id: id)
            .withUnsafeBytes { alignedHeaderPage.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        sums.write(into: alignedHeaderPage)
        do {
            try writeDirect(pack, direct, [(UnsafeRawPointer(alignedHeaderPage), PackBlockStore.page),
                                           (UnsafeRawPointer(buffer.pointer), padded)], at: offset)
        } catch {
            _ = ftruncate(pack.fd, off_t(pack.size))
            throw error
        }
        return (Location(pack: pack.number, offset: offset + UInt64(PackBlockStore.page), length: UInt32(length), touched: touched, aligned: true),
                offset + UInt64(PackBlockStore.page + padded))
    }

    /// One page for aligned records' headers, written under the append lock.
    private let alignedHeaderPage = UnsafeMutableRawPointer.allocate(byteCount: PackBlockStore.page, alignment: PackBlockStore.page)

    /// Writes page-aligned pieces one after another at `offset` with the direct descriptor.
    private func writeDirect(_ pack: Pack, _ fd: Int32, _ pieces: [(UnsafeRawPointer, Int)], at offset: UInt64) throws {
        // (A short direct write ends on a block boundary: the rest goes on from there.)
        let e = FileIO.pwritevAll(fd, pieces.map { iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.0), iov_len: $0.1) }, at: offset)
        if e != 0 {
            throw e == ENOSPC ? StoreError(.full, "block store \(root): disk full") : StoreError.system("write pack", pack.path, errno: e)
        }
    }

    /// Blocks leave some space free on the data dir's filesystem, so that the metadata database can
    /// still commit deletes and truncates when writers have filled the disk: 2% of the
    /// filesystem, between 4 and 64 MiB. The first tier (fastest first) with that much room
    /// past `count` bytes takes the block; ENOSPC when none has.
    private func tierWithRoom(for count: Int) throws -> Int {
        let fds = state.withLock { s in s.actives.map { s.packs[$0]!.fd } }
        var reserve: UInt64 = 0
        for (t, fd) in fds.enumerated() {
            var v = statvfs()
            guard fstatvfs(fd, &v) == 0 else { return t }
            reserve = Self.metadataReserve(v)
            if Self.freeBytes(v) >= UInt64(count + PackBlockStore.headerSize) + reserve { return t }
        }
        throw StoreError(.full, "block store \(root): disk full (keeping \(reserve >> 20) MiB free for metadata)"
                              + (tiers.count > 1 ? " on every tier" : ""))
    }

    /// The space blocks (and flat copies) leave free on a filesystem for the metadata: 2 % of
    /// it, between 4 and 64 MiB.
    public static func metadataReserve(_ v: statvfs) -> UInt64 {
        min(64 << 20, max(4 << 20, UInt64(v.f_blocks) * UInt64(v.f_frsize) / 50))
    }

    /// Bytes an unprivileged writer may still use on the filesystem.
    public static func freeBytes(_ v: statvfs) -> UInt64 { UInt64(v.f_bavail) * UInt64(v.f_frsize) }

    private func writeAll(_ pack: Pack, _ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
        var done = 0
        while done < bytes.count {
            let r = pwrite(pack.fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done))
            if r < 0 {
                if errno == EINTR { continue }
                let e = errno
                throw e == ENOSPC ? StoreError(.full, "block store \(root): disk full") : StoreError.system("write pack", pack.path, errno: e)
            }
            done += r
        }
    }

    /// Starts a new active pack on `tier` (called with the append lock held).
    private func rollActivePack(_ tier: Int) throws {
        let next = state.withLock { $0.lastNumber + 1 }
        let pack = try PackBlockStore.openPack(tierPacksDirs[tier] + "/" + PackBlockStore.packName(next), number: next)
        pack.tier = tier
        state.withLock { s in s.packs[next] = pack; s.lastNumber = next; s.actives[tier] = next; s.newEntries.insert(next) }
    }

    /// Reads a block and checks it: by its piece sums where its record has them (CRC32C, about
    /// ten times cheaper than the hash), else by its SHA-256; a mismatch of the sums is decided
    /// by the hash, so a block whose table alone is damaged still reads.
    public func read(_ id: BlockID) throws -> BlockBuffer { try read(id, verify: .sums) }

    /// How a read checks what it read: not at all (bytes for a peer, which hashes them), by the
    /// piece sums (SHA-256 where there are none, or they do not match), or always by SHA-256
    /// (`verify`: the scrubber and `modelfs verify` prove every replica against its name).
    enum Check { case none, sums, hash }

    /// Reads a block to hand to a peer that verifies it before storing or returning it (a push,
    /// a GET from another node): hashing it here too would cost one more SHA-256 pass per byte
    /// on the replication and remote-read paths. Never used for bytes this node returns itself.
    public func readForPeer(_ id: BlockID) throws -> BlockBuffer { try read(id, verify: .none) }

    /// A block's bytes for a peer (not hashed: the receiver verifies them), read with O_DIRECT
    /// into pooled block memory; nil when its record is not aligned, the filesystem has no
    /// O_DIRECT, or the block is not here (the caller then sends it from the file). On these VMs
    /// a block sent with sendfile(2) went from page-cache pages the disk had just filled, and
    /// the receiver's first touch of each such page cost it about as much again as the copy
    /// itself (a remote cold read of 1 GiB: the reading node's CPU 1.5 s with the pages warm,
    /// 3.0-3.3 s with them fresh); memory from the pool is already mapped, and the one extra
    /// copy (into the socket) costs the sender less than that.
    public func readDirectForPeer(_ id: BlockID) -> BlockBuffer? {
        guard let (loc, pack) = locate(id, touching: true), Self.readsDirectly(loc, pack) else { return nil }
        return try? load(id, loc, pack, verify: .none)
    }

    /// Where a block's bytes lie, for a peer server that sends them straight from the pack file
    /// (sendfile: no copy through this process, no hash; the receiver verifies): its own
    /// duplicate of the pack's descriptor, which the caller closes, the offset and the length.
    /// Nil if the block is not here.
    public func fileRangeForPeer(_ id: BlockID) -> (fd: Int32, offset: Int, length: Int)? {
        guard let (loc, pack) = locate(id, touching: true) else { return nil }
        // The reference to `pack` keeps its descriptor open until the duplicate exists.
        let fd = dup(pack.fd)
        guard fd >= 0 else { return nil }
        return (fd, Int(loc.offset), Int(loc.length))
    }

    /// A block's location and its open pack; with `touching`, a read counts as a use for the
    /// least-recently-used eviction (where the store keeps that, `touchOnRead`).
    private func locate(_ id: BlockID, touching: Bool) -> (Location, Pack)? {
        state.withLock { s in
            guard let l = s.index[id], let p = s.packs[l.pack] else { return nil }
            if touching && s.touchOnRead { s.index[id]!.touched = .now() }
            return (l, p)
        }
    }

    func read(_ id: BlockID, verify: Check, touching: Bool = true) throws -> BlockBuffer {
        guard let (loc, pack) = locate(id, touching: touching) else {
            logger("missing block \(id.hex): not in any pack under \(packsDir)")
            throw StoreError(.missing, "block \(id.hex) is missing from \(root)")
        }
        do {
            return try load(id, loc, pack, verify: verify, quiet: true)
        } catch {
            // Moved to another tier meanwhile (its old record may be punched already): read it there.
            if let (now, p) = locate(id, touching: false), now.pack != loc.pack || now.offset != loc.offset {
                return try load(id, now, p, verify: verify)
            }
            return try load(id, loc, pack, verify: verify)
        }
    }

    /// Whether the record at `loc` is read with O_DIRECT: aligned, on a filesystem that has it,
    /// and its padding fits the block's pooled buffer.
    private static func readsDirectly(_ loc: Location, _ pack: Pack) -> Bool {
        loc.aligned && pack.direct != nil && Int(pageUp(UInt64(loc.length))) <= BufferPool.sizeClass(Int(loc.length))
    }

    /// Reads the block recorded at `loc` in `pack` into a new buffer, checked as asked.
    private func load(_ id: BlockID, _ loc: Location, _ pack: Pack, verify: Check, quiet: Bool = false) throws -> BlockBuffer {
        let buffer = BlockBuffer(count: Int(loc.length))
        var done = 0
        var sums: PieceSums?
        // An aligned record is read directly into the block's buffer, padding included (no copy
        // out of the page cache, no page-cache memory to fault in); short reads end on a page.
        let padded = Int(PackBlockStore.pageUp(UInt64(loc.length)))
        if Self.readsDirectly(loc, pack), let direct = pack.direct {
            if verify == .sums {
                // The header page just before the data, in the same read: its piece sums.
                let page = UnsafeMutableRawPointer.allocate(byteCount: PackBlockStore.page, alignment: PackBlockStore.page)
                defer { page.deallocate() }
                var iov = [iovec(iov_base: page, iov_len: PackBlockStore.page), iovec(iov_base: buffer.pointer, iov_len: padded)]
                let r = iov.withUnsafeMutableBufferPointer { preadv(direct, $0.baseAddress, 2, off_t(loc.headerOffset)) }
                if r >= PackBlockStore.page + buffer.count {
                    done = buffer.count
                    sums = PieceSums.read(from: page, id: id, length: buffer.count)
                }
            }
            while done < buffer.count && done % PackBlockStore.page == 0 {
                let r = pread(direct, buffer.pointer + done, padded - done, off_t(loc.offset) + off_t(done))
                if r < 0 { if errno == EINTR { continue }; break }   // the buffered reads below try again
                if r == 0 { break }
                done += r
            }
            done = min(done, buffer.count)
        }
        while done < buffer.count {
            let r = pread(pack.fd, buffer.pointer + done, buffer.count - done, off_t(loc.offset) + off_t(done))
            if r < 0 { if errno == EINTR { continue }; throw StoreError.system("read pack", pack.path) }
            if r == 0 { break }
            done += r
        }
        let good = done == buffer.count && buffer.withUnsafeBytes { bytes in
            switch verify {
            case .none: return true
            case .sums where sums?.match(bytes) == true: return true
            case .sums, .hash: return BlockID.hash(bytes) == id
            }
        }
        guard good else {
            if quiet { throw StoreError(.corrupt, "block \(id.hex) is corrupt") }
            logger("corrupt block \(id.hex) in \(pack.path) at offset \(loc.offset): its content does not match its name")
            throw StoreError(.corrupt, "block \(id.hex) is corrupt")
        }
        return buffer
    }

    /// Bytes `range` of block `id` read with only the pieces they touch, each checked against
    /// its CRC32C (PieceSums), or nil: the block is not here, its record has no sums (an older,
    /// moved or small one) or no direct I/O, or a piece did not match its sum. The caller then
    /// reads the whole block, whose hash then decides (`read`; a corrupt block is reported).
    public func readPieces(_ id: BlockID, _ range: Range<Int>) -> PieceRead? {
        guard !range.isEmpty, let (loc, pack) = locate(id, touching: true), loc.aligned, let direct = pack.direct,
              range.upperBound <= Int(loc.length), let sums = pieceSums(id, loc, pack) else { return nil }
        let size = sums.pieceSize
        let first = range.lowerBound / size, last = (range.upperBound - 1) / size
        let start = first * size, end = min(Int(loc.length), (last + 1) * size)
        let buffer = BlockBuffer(count: end - start)
        let padded = Int(PackBlockStore.pageUp(UInt64(end - start)))
        guard padded <= buffer.capacity, FileIO.preadAll(direct, buffer.pointer, padded, at: loc.offset + UInt64(start)) >= buffer.count
        else { return nil }
        if let p = buffer.withUnsafeBytes({ sums.firstMismatch($0, from: first) }) {
            // (A block moved to another tier meanwhile has its old record punched: not news.)
            if let (now, _) = locate(id, touching: false), now.pack == loc.pack, now.offset == loc.offset {
                logger("block \(id.hex): piece \(p) in \(pack.path) does not match its CRC32C; reading the whole block")
            }
            return nil
        }
        return PieceRead(buffer: buffer, start: start)
    }

    /// The piece sums of the record at `loc`: from memory, else its header page, read through
    /// the page cache (the scan at start read that page already, so it is often still there).
    /// A record without sums is remembered too, so its page is read once.
    private func pieceSums(_ id: BlockID, _ loc: Location, _ pack: Pack) -> PieceSums? {
        if let known = pieceTables.withLock({ $0.get(id, loc) }) { return known }
        let page = UnsafeMutableRawPointer.allocate(byteCount: PackBlockStore.page, alignment: 8)
        defer { page.deallocate() }
        guard FileIO.preadAll(pack.fd, page, PackBlockStore.page, at: loc.headerOffset) == PackBlockStore.page else { return nil }
        let sums = PieceSums.read(from: page, id: id, length: Int(loc.length))
        pieceTables.withLock { $0.put(id, loc, sums) }
        return sums
    }

    /// Piece tables read from header pages, at most `capacity` (a 1 MiB block's is 512 bytes),
    /// the oldest dropped first; an entry is good only for the record it was read from (a block
    /// moved by tiering, or stored again after GC, gets its new record's).
    private struct PieceTables {
        static let capacity = 4096
        var tables: [BlockID: (pack: UInt32, offset: UInt64, sums: PieceSums?)] = [:]
        var order: [BlockID] = []
        var next = 0
        func get(_ id: BlockID, _ loc: Location) -> PieceSums?? {
            guard let e = tables[id], e.pack == loc.pack, e.offset == loc.offset else { return nil }
            return .some(e.sums)
        }
        mutating func put(_ id: BlockID, _ loc: Location, _ sums: PieceSums?) {
            if tables.updateValue((loc.pack, loc.offset, sums), forKey: id) != nil { return }
            if order.count < PieceTables.capacity { order.append(id); return }
            tables.removeValue(forKey: order[next])
            order[next] = id
            next = (next + 1) % PieceTables.capacity
        }
    }
    private let pieceTables = Mutex(PieceTables())

    public func willNeed(_ ids: [BlockID]) {
        // Aligned records are read directly: the page cache would hold them for nothing.
        let ranges = state.withLock { s in ids.compactMap { id -> (Pack, Location)? in
            guard let l = s.index[id], let p = s.packs[l.pack], !(l.aligned && p.direct != nil) else { return nil }
            return (p, l)
        } }
        for (p, l) in ranges { _ = posix_fadvise(p.fd, off_t(l.offset), off_t(l.length), POSIX_FADV_WILLNEED) }
    }

    public func sync(_ ids: [BlockID]) throws {
        let (packs, entries, dirs) = state.withLock { s -> ([Pack], Set<UInt32>, Set<Int>) in
            let wanted = Set(ids.compactMap { s.index[$0]?.pack })
            let entries = s.newEntries.intersection(wanted)
            return (s.unsynced.intersection(wanted).compactMap { s.packs[$0] }, entries, Set(entries.compactMap { s.packs[$0]?.tier }))
        }
        for p in packs {
            guard fdatasync(p.fd) == 0 else { throw StoreError.system("fdatasync", p.path) }
        }
        // A new pack's directory entry must be durable too (once: an fsync of the directory per
        // fsync of a small file was a third flush of the disk for nothing).
        for t in dirs.sorted() { try fsyncDirectory(tierPacksDirs[t]) }
        state.withLock { s in
            for p in packs { s.unsynced.remove(p.number) }
            s.newEntries.subtract(entries)
        }
    }

    public func syncFilesystem() throws {
        for (t, fd) in packsDirFDs.enumerated() where modelfs_syncfs(fd) != 0 { throw StoreError.system("syncfs", tierPacksDirs[t]) }
        state.withLock { $0.unsynced.removeAll(); $0.newEntries.removeAll() }
    }

    /// fsyncs of the packs directory by `sync` so far (tests).
    var directorySyncs: Int { state.withLock { $0.directorySyncs } }

    private func fsyncDirectory(_ path: String) throws {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw StoreError.system("open", path) }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw StoreError.system("fsync", path) }
        state.withLock { $0.directorySyncs += 1 }
    }

    /// The device the store lives on (to tell whether one syncfs also covers another file).
    public var device: UInt64 {
        var st = stat()
        return stat(packsDir, &st) == 0 ? UInt64(st.st_dev) : 0
    }

    public func usage() -> BlockStoreUsage { state.withLock { $0.usage } }

    /// Bytes the pack files take on disk (allocated blocks: punched holes do not count).
    public var packBytes: UInt64 {
        let paths = state.withLock { s in s.packs.values.map(\.path) }
        return paths.reduce(0) { total, p in
            var st = stat()
            return total + (stat(p, &st) == 0 ? UInt64(st.st_blocks) * 512 : 0)
        }
    }

    public func listBlocks() -> [(id: BlockID, mtime: Timestamp)] {
        state.withLock { s in s.index.map { ($0.key, $0.value.touched) } }
    }

    /// Marks blocks as just used (garbage collection's grace period starts again); returns which
    /// of them are here.
    public func touch(_ ids: [BlockID]) -> [Bool] {
        let now = Timestamp.now()
        return state.withLock { s in
            ids.map { id in
                guard s.index[id] != nil else { return false }
                s.index[id]!.touched = now
                return true
            }
        }
    }

    /// A cache's store: reads count as uses for `evictLeastRecentlyUsed`.
    public var touchOnRead: Bool {
        get { state.withLock { $0.touchOnRead } }
        set { state.withLock { $0.touchOnRead = newValue } }
    }

    /// Evicts least-recently-used blocks (by their last store or, with `touchOnRead`, read)
    /// until at most `budget` bytes are left, and gives their space back. Returns bytes freed.
    @discardableResult
    public func evictLeastRecentlyUsed(keepingBytes budget: UInt64) throws -> UInt64 {
        let victims = state.withLock { s -> [BlockID] in
            guard s.usage.bytes > budget else { return [] }
            var over = s.usage.bytes - budget
            var out: [BlockID] = []
            for (id, loc) in s.index.sorted(by: { $0.value.touched < $1.value.touched }) {
                if over == 0 { break }
                out.append(id)
                over -= min(over, UInt64(loc.length))
            }
            return out
        }
        var dropped: UInt64 = 0
        for id in victims { dropped += removeIfStale(id, cutoff: Self.never) }
        try reclaim()
        return dropped
    }

    /// Drops a block from the index unless a writer stored or found it at or after `cutoff`.
    /// Returns the bytes freed (given back to the disk by `reclaim`).
    public func removeIfStale(_ id: BlockID, cutoff: Timestamp) -> UInt64 {
        state.withLock { s -> UInt64 in
            guard let l = s.index[id], l.touched < cutoff else { return 0 }
            s.index[id] = nil
            if let p = s.packs[l.pack] {
                p.liveBytes -= min(p.liveBytes, UInt64(l.length))
                p.deadBytes += UInt64(l.length)
            }
            s.dead.append(l)
            s.usage.blocks -= 1
            s.usage.bytes -= min(s.usage.bytes, UInt64(l.length))
            return UInt64(l.length)
        }
    }

    /// Drops a block whatever its age (a corrupt copy, a copy moved off a draining node) and
    /// gives its space back. Returns the bytes freed.
    @discardableResult
    public func remove(_ id: BlockID) throws -> UInt64 {
        let freed = removeIfStale(id, cutoff: Self.never)
        if freed > 0 { try reclaim() }
        return freed
    }

    /// Re-reads a block and checks it against its name: true if good, false if corrupt or
    /// unreadable, nil if this store has no such block. Does not count as a use.
    public func verify(_ id: BlockID) -> Bool? {
        guard contains(id) else { return nil }
        do { _ = try read(id, verify: .hash, touching: false); return true } catch { return contains(id) ? false : nil }
    }

    /// A cutoff later than any touch.
    static let never = Timestamp(seconds: Int64.max / 2_000_000_000, nanoseconds: 0)

    /// Returns the space of dead blocks to the filesystem, without copying anything (so it works
    /// on a full disk): each dead record's header is rewritten as "MFBX" (the scan at start then
    /// skips it), the packs are fdatasynced so no crash can leave a live header over punched data,
    /// and the record's data pages are punched out (FALLOC_FL_PUNCH_HOLE). Sealed packs with no
    /// live block left are deleted whole first, with no per-record work: a deleted 1 GiB
    /// checkpoint is four unlinks, not a thousand header writes, fdatasyncs and punches competing
    /// with the writers' fsyncs. (A crash before such an unlink is durable brings back complete
    /// blocks that nothing references; the next pass collects them again.) Returns the bytes
    /// given back.
    @discardableResult
    public func reclaim() throws -> UInt64 {
        let (dead, packs, empty) = state.withLock { s -> ([Location], [UInt32: Pack], [Pack]) in
            defer { s.dead.removeAll() }
            let e = s.packs.values.filter { !s.actives.contains($0.number) && $0.liveBytes == 0 }
            for p in e { s.packs[p.number] = nil; s.unsynced.remove(p.number); s.newEntries.remove(p.number) }
            return (s.dead, s.packs, e)
        }
        var freed: UInt64 = 0
        for p in empty {
            var st = stat()
            let allocated = fstat(p.fd, &st) == 0 ? UInt64(st.st_blocks) * 512 : 0
            if unlink(p.path) == 0 {
                freed += allocated
            } else {
                logger("cannot delete pack \(p.path): \(String(cString: strerror(errno)))")
            }
        }
        var touched: [UInt32: Pack] = [:]
        for d in dead {
            guard let p = packs[d.pack] else { continue }
            let magic = d.aligned ? PackBlockStore.alignedDeadMagic : PackBlockStore.deadMagic
            try magic.withUnsafeBytes { try writeAll(p, $0, at: d.headerOffset) }
            touched[d.pack] = p
        }
        for p in touched.values where fdatasync(p.fd) != 0 { throw StoreError.system("fdatasync", p.path) }
        for d in dead {
            guard let p = packs[d.pack] else { continue }
            // Whole pages inside the data only: the neighbours' headers stay intact. (An aligned
            // record's data pages, padding included, are its own.)
            let start = PackBlockStore.pageUp(d.offset)
            let end = d.aligned ? PackBlockStore.pageUp(d.offset + UInt64(d.length))
                                : (d.offset + UInt64(d.length)) / 4096 * 4096
            if end > start && modelfs_punch_hole(p.fd, off_t(start), off_t(end - start)) == 0 {
                freed += end - start
            }
        }
        return freed
    }

    /// Appends a whole record to the active pack and indexes it (append lock held). A failed
    /// append truncates the pack back, so a pack is always a sequence of whole records.
    /// Returns the pack's new size.
    @discardableResult
    private func appendLocked(_ id: BlockID, _ bytes: UnsafeRawBufferPointer, tier: Int) throws -> UInt64 {
        let pack = state.withLock { s in s.packs[s.actives[tier]]! }
        let (loc, end) = try appendBuffered(id, bytes, to: pack, touched: .now())
        appended(id, to: pack, at: loc, end: end)
        return end
    }

    /// Writes a buffered ("MFB1") record of `bytes` at the end of `pack` (append lock held).
    /// Returns where its data is and where the pack now ends; indexing it is the caller's.
    private func appendBuffered(_ id: BlockID, _ bytes: UnsafeRawBufferPointer, to pack: Pack, touched: Timestamp) throws -> (Location, UInt64) {
        let offset = pack.size
        do {
            try PackBlockStore.recordHeader(PackBlockStore.magic, length: bytes.count, id: id)
                .withUnsafeBytes { try writeAll(pack, $0, at: offset) }
            try writeAll(pack, bytes, at: offset + UInt64(PackBlockStore.headerSize))
        } catch {
            _ = ftruncate(pack.fd, off_t(offset))
            throw error
        }
        return (Location(pack: pack.number, offset: offset + UInt64(PackBlockStore.headerSize), length: UInt32(bytes.count), touched: touched),
                offset + UInt64(PackBlockStore.headerSize) + UInt64(bytes.count))
    }

    /// Indexes a record just appended to `pack` (append lock held), which now ends at `end`.
    private func appended(_ id: BlockID, to pack: Pack, at loc: Location, end: UInt64) {
        state.withLock { s in
            pack.deadBytes += loc.headerOffset - pack.size   // the hole before an aligned record, if any
            pack.size = end
            pack.liveBytes += UInt64(loc.length)
            s.index[id] = loc
            s.unsynced.insert(pack.number)
            s.usage.blocks += 1
            s.usage.bytes += UInt64(loc.length)
            s.usage.bytesWritten += UInt64(loc.length)
        }
    }

    // MARK: tiers

    /// The tier holding block `id`, nil if it is not here.
    public func tier(of id: BlockID) -> Int? {
        state.withLock { s in s.index[id].flatMap { s.packs[$0.pack]?.tier } }
    }

    /// Blocks, bytes and free space per tier, fastest first.
    public func tierUsage() -> [TierUsage] {
        var out = tiers.map { TierUsage(name: $0.name, root: $0.root, blocks: 0, bytes: 0, free: 0) }
        state.withLock { s in
            for l in s.index.values {
                guard let t = s.packs[l.pack]?.tier else { continue }
                out[t].blocks += 1
                out[t].bytes += UInt64(l.length)
            }
        }
        for t in out.indices {
            var v = statvfs()
            if statvfs(tierPacksDirs[t], &v) == 0 { out[t].free = Self.freeBytes(v) }
        }
        return out
    }

    /// Rewrites blocks into `tier` (those already there, or gone, are skipped): each is read and
    /// verified, appended to the tier's active pack; the packs written are fdatasynced; then the
    /// index points at the new records and the old ones are dropped and punched (`reclaim`).
    /// A block that garbage collection removed meanwhile has its new record dropped instead.
    /// Stops at the first failure to read or to write (a full tier: ENOSPC) with what moved
    /// so far kept. Returns the blocks and bytes moved.
    @discardableResult
    public func move(_ ids: [BlockID], to tier: Int) throws -> (blocks: Int, bytes: UInt64) {
        precondition(tiers.indices.contains(tier))
        var moved: [(id: BlockID, old: Location, new: Location)] = []
        var failure: (any Error)?
        for id in ids {
            guard let (old, oldPack) = locate(id, touching: false), oldPack.tier != tier else { continue }
            do {
                let buffer = try load(id, old, oldPack, verify: .sums)
                let length = Int(old.length)
                // A block large enough to be read directly moves as an aligned record with its
                // piece sums (PieceSums, outside the lock), so small reads of it on the new tier
                // go by pieces too.
                let sums = length >= PackBlockStore.directMinimum && Self.paddable(buffer, length)
                    ? PieceSums(of: UnsafeRawBufferPointer(start: buffer.pointer, count: length)) : nil
                appendLock.lock()
                defer { appendLock.unlock() }
                let pack = state.withLock { s in s.packs[s.actives[tier]]! }
                let direct = sums != nil ? pack.direct : nil
                // Room on the target itself: a move never spills elsewhere.
                var v = statvfs()
                if fstatvfs(pack.fd, &v) == 0 {
                    let needs = direct != nil ? PackBlockStore.pageUp(UInt64(length)) + UInt64(PackBlockStore.page) : UInt64(length + PackBlockStore.headerSize)
                    if Self.freeBytes(v) < needs + Self.metadataReserve(v) {
                        throw StoreError(.full, "tier \(tiers[tier].name) (\(tiers[tier].root)) is full")
                    }
                }
                let new: Location, end: UInt64
                if let direct, let sums {
                    (new, end) = try appendAligned(id, buffer, length: length, sums: sums, to: pack, direct: direct, touched: old.touched)
                } else {
                    (new, end) = try buffer.withUnsafeBytes { try appendBuffered(id, $0, to: pack, touched: old.touched) }
                }
                state.withLock { s in
                    pack.deadBytes += new.headerOffset - pack.size   // the hole before an aligned record, if any
                    pack.size = end
                    s.unsynced.insert(pack.number)
                }
                moved.append((id, old, new))
                if end >= packLimit { try rollActivePack(tier) }
            } catch {
                failure = error
                break
            }
        }
        // The new copies are durable before the old ones go.
        let written = state.withLock { s in Set(moved.map(\.new.pack)).compactMap { s.packs[$0] } }
        for p in written where fdatasync(p.fd) != 0 { throw StoreError.system("fdatasync", p.path) }
        let dirs = Set(written.map(\.tier))
        for t in dirs.sorted() { try fsyncDirectory(tierPacksDirs[t]) }
        var bytes: UInt64 = 0
        state.withLock { s in
            for m in moved {
                let newPack = s.packs[m.new.pack]
                if let cur = s.index[m.id], cur.pack == m.old.pack, cur.offset == m.old.offset {
                    var l = m.new
                    l.touched = cur.touched
                    s.index[m.id] = l
                    newPack?.liveBytes += UInt64(l.length)
                    if let op = s.packs[m.old.pack] { op.liveBytes -= min(op.liveBytes, UInt64(l.length)); op.deadBytes += UInt64(l.length) }
                    s.dead.append(m.old)
                    bytes += UInt64(l.length)
                } else {
                    newPack?.deadBytes += UInt64(m.new.length)
                    s.dead.append(m.new)
                }
            }
        }
        try reclaim()
        if let failure, moved.isEmpty { throw failure }
        return (moved.count, bytes)
    }

    /// Where a block's bytes are (for tests that corrupt them on purpose).
    public func location(of id: BlockID) -> (path: String, offset: UInt64, length: Int)? {
        state.withLock { s in
            guard let l = s.index[id], let p = s.packs[l.pack] else { return nil }
            return (p.path, l.offset, Int(l.length))
        }
    }
}
