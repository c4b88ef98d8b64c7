import CModelFSSys
import Foundation
import ModelFSCore
import ModelFSStore
import Synchronization

/// Plain files holding exactly one version's bytes [0, size), for FUSE passthrough: the kernel
/// reads (and maps) them directly, with no round trip to the daemon and ext4's page cache
/// (docs/ARCHITECTURE.md "Reads through passthrough").
///
/// - A copy is named by its content (`key`: the SHA-256 of the version's chunk list and size),
///   so two files with the same bytes share one copy and a copy never goes stale: a new version
///   has a new name.
/// - It is built from verified blocks (the filesystem's block reader: local packs, the read
///   cache, peers) into `.tmp-KEY`, then renamed into place, not synced: its bytes reach the disk
///   when the kernel writes them back. Copies are trusted at a start only after a clean end
///   (`close`: builds stopped, the filesystem synced, then the marker `.clean` written); after a
///   crash every copy is dropped and rebuilt on demand, so neither a half-built `.tmp-` file nor a
///   renamed copy whose pages never reached the disk is ever used. Synced as it was built, a
///   2 GiB copy spent seconds in its fdatasync, and every open meanwhile read through the daemon.
/// - Builds run one at a time in the background, asked for by a read-only open that found no copy
///   (that open and those before the copy is in place read through the daemon as before).
/// - The copies are a cache with a byte budget (`--flat-size`), evicted least recently used
///   among those no open handle uses (`pin`/`unpin`).
public final class FlatCopies: Sendable {
    public let directory: String
    public let budget: UInt64
    /// Files smaller than this are not copied (a few pages: the daemon serves them as fast).
    public let minimumSize: UInt64

    public struct Stats: Sendable, Codable {
        public var bytes: UInt64 = 0
        public var copies = 0
        /// Read-only opens served from a copy, and those that found none (a build was asked for).
        public var hits: UInt64 = 0
        public var misses: UInt64 = 0
        public var built: UInt64 = 0
        public var evicted: UInt64 = 0
        public var failed: UInt64 = 0
        /// Builds not made because some of the version's blocks were not on this node.
        public var notHere: UInt64 = 0
        public init() {}
    }

    /// A build finds a block of the version missing from this node: no copy now (not a failure).
    public struct NotHere: Error { public var block: BlockID }

    private struct Entry { var size: UInt64; var lastUse: UInt64; var pins: Int }
    private struct State {
        var entries: [String: Entry] = [:]
        var building: Set<String> = []
        var stats = Stats()
        var clock: UInt64 = 0
        /// `close` began: no copy is put in place any more.
        var closed = false
    }
    /// The marker a clean end leaves (see the type's comment).
    static let cleanMarker = ".clean"
    private var markerPath: String { "\(directory)/\(Self.cleanMarker)" }
    private let state = Mutex(State())
    private let builder = Workers("modelfs-flat", count: 1)

    public init(directory: String, budget: UInt64, minimumSize: UInt64 = 64 << 10) throws {
        self.directory = directory
        self.budget = budget
        self.minimumSize = minimumSize
        let fm = FileManager.default
        try fm.createDirectory(atPath: directory, withIntermediateDirectories: true)
        // Trusted only after a clean end; the marker goes now (this run has not ended cleanly yet).
        let marker = markerPath
        let clean = fm.fileExists(atPath: marker)
        unlink(marker)
        var entries: [(String, Entry, Date)] = []
        var dropped = 0
        for name in try fm.contentsOfDirectory(atPath: directory) {
            let path = "\(directory)/\(name)"
            if name.hasPrefix(".tmp-") { try? fm.removeItem(atPath: path); continue }
            if name.hasPrefix(".") { continue }
            if !clean { try? fm.removeItem(atPath: path); dropped += 1; continue }
            guard let a = try? fm.attributesOfItem(atPath: path), let size = a[.size] as? UInt64 else { continue }
            entries.append((name, Entry(size: size, lastUse: 0, pins: 0), (a[.modificationDate] as? Date) ?? .distantPast))
        }
        if dropped > 0 {
            Log.info("flat copies: the last run did not end cleanly; its \(dropped) copies are dropped (rebuilt when read)")
        }
        // Oldest first, so the first evicted after a restart are the ones used least lately.
        entries.sort { $0.2 < $1.2 }
        state.withLock { s in
            for (name, var e, _) in entries {
                s.clock += 1
                e.lastUse = s.clock
                s.entries[name] = e
                s.stats.bytes += e.size
            }
            s.stats.copies = s.entries.count
        }
        evict()
    }

    /// The content name of a version: its chunks (ids and lengths) and its size.
    static func key(_ manifest: Manifest, size: UInt64) -> String {
        var h = BlockID.Hasher()
        var bytes = [UInt8]()
        bytes.reserveCapacity(manifest.chunks.count * 36 + 8)
        for c in manifest.chunks {
            bytes += c.id.bytes
            withUnsafeBytes(of: c.length.littleEndian) { bytes += $0 }
        }
        withUnsafeBytes(of: size.littleEndian) { bytes += $0 }
        bytes.withUnsafeBytes { h.update($0) }
        return h.finalize().hex
    }

    public func path(_ key: String) -> String { "\(directory)/\(key)" }

    /// The copy `key` if it is in place, pinned (the caller unpins it when its handle closes); a
    /// miss asks `build` to make it in the background, unless it is being made or too large.
    /// `check` runs first in the background (it throws `NotHere` when the copy cannot be made
    /// now), then room is made and `build` writes the copy.
    func take(_ key: String, size: UInt64, check: @escaping @Sendable () throws -> Void = {},
              build: @escaping @Sendable (_ into: Int32) throws -> Void) -> String? {
        enum Outcome { case hit, build, none }
        let outcome = state.withLock { s -> Outcome in
            s.clock += 1
            if var e = s.entries[key] {
                e.pins += 1
                e.lastUse = s.clock
                s.entries[key] = e
                s.stats.hits += 1
                return .hit
            }
            s.stats.misses += 1
            // One copy may take at most half the budget, so it never evicts everything else.
            guard size >= minimumSize, size <= budget / 2, !s.building.contains(key) else { return .none }
            s.building.insert(key)
            return .build
        }
        switch outcome {
        case .hit: return path(key)
        case .none: return nil
        case .build:
            builder.async { [self] in make(key, size: size, check, build) }
            return nil
        }
    }

    /// A clean end (the daemon unmounting): no copy is put in place from here on, the build
    /// under way stops at its next 4 MiB (`closing`) and is waited for (at most `wait` seconds),
    /// the copies' bytes are flushed (syncfs) and the marker is written, so the next start keeps
    /// them. A build still running at the deadline leaves no marker: the next start drops the
    /// copies, as after a crash.
    public func close(wait: Double = 10) {
        state.withLock { $0.closed = true }
        builder.stop()
        let deadline = Date().addingTimeInterval(wait)
        while state.withLock({ !$0.building.isEmpty }) {
            guard Date() < deadline else {
                Log.warning("flat copies: a build was still running at unmount; the copies will be rebuilt at the next start")
                return
            }
            usleep(10_000)
        }
        let dir = Glibc.open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard dir >= 0 else { return }
        defer { Glibc.close(dir) }
        guard modelfs_syncfs(dir) == 0 else {
            Log.warning("flat copies: syncfs failed (\(String(cString: strerror(errno)))); they will be rebuilt at the next start")
            return
        }
        let marker = markerPath
        let fd = Glibc.open(marker, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0o600)
        guard fd >= 0 else { return }
        let synced = fsync(fd) == 0
        Glibc.close(fd)
        if !synced || fsync(dir) != 0 { unlink(marker) }
    }

    /// `close` began: a build under way stops at its next step.
    public var closing: Bool { state.withLock { $0.closed } }

    public func unpin(_ key: String) {
        state.withLock { s in
            if var e = s.entries[key] { e.pins = max(0, e.pins - 1); s.entries[key] = e }
        }
        evict()
    }

    public var stats: Stats { state.withLock { $0.stats } }

    private func make(_ key: String, size: UInt64, _ check: () throws -> Void, _ build: (Int32) throws -> Void) {
        let tmp = "\(directory)/.tmp-\(key)"
        var ok = false
        var notHere = false
        defer {
            if !ok { unlink(tmp) }
            state.withLock { s in
                s.building.remove(key)
                if ok {
                    s.clock += 1
                    s.entries[key] = Entry(size: size, lastUse: s.clock, pins: 0)
                    s.stats.bytes += size
                    s.stats.built += 1
                } else if notHere {
                    s.stats.notHere += 1
                } else {
                    s.stats.failed += 1
                }
                s.stats.copies = s.entries.count
            }
            if ok { evict() }
        }
        do { try check() } catch { notHere = error is NotHere; if !notHere { Log.warning("flat copy \(key): \(error)") }; return }
        // Room first: the build may push the copies over the budget only by what no one can drop.
        evict(reserving: size)
        // And room on the disk: a copy never takes the space the block store keeps free for the
        // metadata (a full fast tier is normal with --tier).
        var v = statvfs()
        if statvfs(directory, &v) == 0 {
            if PackBlockStore.freeBytes(v) < size + PackBlockStore.metadataReserve(v) {
                _ = Log.every("flat-no-room", 300, .info, "flat copies: not made while the data dir's disk has \(PackBlockStore.freeBytes(v) >> 20) MiB free (reads go through the daemon)")
                return
            }
        }
        let fd = Glibc.open(tmp, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            Log.warning("flat copy \(key): cannot create \(tmp): \(String(cString: strerror(errno)))")
            return
        }
        defer { Glibc.close(fd) }
        do {
            try build(fd)
            // Not after `close` began: its sync may be behind this copy's bytes.
            try state.withLock { s in
                guard !s.closed else { throw FSError.io("the filesystem is being unmounted") }
                guard rename(tmp, path(key)) == 0 else { throw FSError.io("rename: \(String(cString: strerror(errno)))") }
            }
            ok = true
        } catch is NotHere {
            notHere = true
        } catch {
            Log.warning("flat copy \(key) (\(size) bytes) not made: \(error)")
        }
    }

    /// Drops the least recently used unpinned copies until the copies (plus `reserving` bytes to
    /// come) fit the budget.
    private func evict(reserving: UInt64 = 0) {
        let victims = state.withLock { s -> [String] in
            var out: [String] = []
            while s.stats.bytes + reserving > budget {
                guard let (k, e) = s.entries.filter({ $0.value.pins == 0 }).min(by: { $0.value.lastUse < $1.value.lastUse }) else { break }
                s.entries[k] = nil
                s.stats.bytes -= e.size
                s.stats.evicted += 1
                out.append(k)
            }
            s.stats.copies = s.entries.count
            return out
        }
        // A copy still open through passthrough elsewhere stays readable: the kernel holds it.
        for k in victims { unlink(path(k)) }
    }
}
