import Foundation
import ModelFSCore

/// What a new inode is made of.
public struct NewInode: Sendable {
    public var kind: FileKind
    public var mode: UInt32
    public var uid: UInt32
    public var gid: UInt32
    public var now: Timestamp
    /// Symlink target, for `.symlink` only.
    public var target: String?
    /// Device number, for `.charDevice` and `.blockDevice` only.
    public var rdev: UInt32
    public init(kind: FileKind, mode: UInt32, uid: UInt32, gid: UInt32, now: Timestamp, target: String? = nil, rdev: UInt32 = 0) {
        self.kind = kind; self.mode = mode; self.uid = uid; self.gid = gid; self.now = now; self.target = target
        self.rdev = rdev
    }
}

/// An inode that lost a link: the caller deletes it once `nlink == 0` and nothing holds it open,
/// unless the engine already did (`deleted`: its last link went while nothing had it open).
public struct RemovedLink: Sendable, Equatable {
    public var ino: InodeNumber
    public var kind: FileKind
    public var nlink: UInt32
    public var deleted = false
}

public struct MetadataStats: Sendable, Equatable, Codable {
    public var files: UInt64 = 0
    public var directories: UInt64 = 0
    public var symlinks: UInt64 = 0
    /// FIFOs, sockets and device nodes.
    public var specials: UInt64 = 0
    /// Sum of regular files' sizes, each inode counted once however many links it has.
    public var logicalBytes: UInt64 = 0
    public init() {}

    /// Counts one linked inode of `kind` (of `size` bytes) `sign` times.
    public mutating func count(_ kind: FileKind, size: UInt64, sign: Int64 = 1) {
        func add(_ x: inout UInt64, _ d: Int64) { x = UInt64(max(0, Int64(clamping: x) + d)) }
        switch kind {
        case .regular: add(&files, sign); add(&logicalBytes, sign * Int64(clamping: size))
        case .directory: add(&directories, sign)
        case .symlink: add(&symlinks, sign)
        case .fifo, .socket, .charDevice, .blockDevice: add(&specials, sign)
        }
    }

    enum CodingKeys: String, CodingKey { case files, directories, symlinks, specials, logicalBytes }
    /// Tolerant: a status from a daemon before special files has no `specials`.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        files = try c.decodeIfPresent(UInt64.self, forKey: .files) ?? 0
        directories = try c.decodeIfPresent(UInt64.self, forKey: .directories) ?? 0
        symlinks = try c.decodeIfPresent(UInt64.self, forKey: .symlinks) ?? 0
        specials = try c.decodeIfPresent(UInt64.self, forKey: .specials) ?? 0
        logicalBytes = try c.decodeIfPresent(UInt64.self, forKey: .logicalBytes) ?? 0
    }
}

/// The namespace and its attributes (DESIGN.md §2). Every method is one atomic transaction:
/// it either happens entirely or not at all, in every engine. Methods are thread-safe.
///
/// Contracts shared by all engines (the conformance suite checks each):
/// - Names are validated (no "/", NUL, "." or ".."; at most 255 bytes) → EINVAL/ENAMETOOLONG.
/// - `create` is exclusive: an existing name gives EEXIST.
/// - `rename` replaces the target atomically (file over file, dir over empty dir), refuses a dir
///   over a file (ENOTDIR), a file over a dir (EISDIR), a non-empty dir target (ENOTEMPTY), a
///   dir moved into its own subtree (EINVAL); `.noReplace` gives EEXIST if the target exists;
///   `.exchange` swaps two entries. Directory rename is O(1).
/// - Unlinking the last link leaves the inode with `nlink == 0`; it lives until `deleteInode`,
///   except that `unlink` and a replacing `rename` delete a file (not a directory) in the same
///   transaction when `isOpen` — asked inside it — says nothing has it open.
/// - `setattr` ignores `size`: content and size change only through `commit`.
public protocol MetadataEngine: AnyObject, Sendable {
    func getattr(_ ino: InodeNumber) throws -> InodeAttributes
    func lookup(parent: InodeNumber, name: String) throws -> InodeAttributes
    func create(parent: InodeNumber, name: String, _ new: NewInode) throws -> InodeAttributes
    func link(_ ino: InodeNumber, parent: InodeNumber, name: String, now: Timestamp) throws -> InodeAttributes
    func unlink(parent: InodeNumber, name: String, now: Timestamp, isOpen: (InodeNumber) -> Bool) throws -> RemovedLink
    func rmdir(parent: InodeNumber, name: String, now: Timestamp) throws -> RemovedLink
    /// Returns the inode that lost its link when the target was replaced.
    func rename(parent: InodeNumber, name: String, newParent: InodeNumber, newName: String,
                flags: RenameFlags, now: Timestamp, isOpen: (InodeNumber) -> Bool) throws -> RemovedLink?
    func setattr(_ ino: InodeNumber, _ changes: AttributeChanges, now: Timestamp) throws -> InodeAttributes
    /// `setattr` of several inodes in one transaction, all or none (`modelfs snapshot` setting
    /// the times and flag of a new tree: on etcd one round trip per batch, not per inode).
    func setattrs(_ changes: [(ino: InodeNumber, changes: AttributeChanges)], now: Timestamp) throws
    /// Entries with a cookie greater than `after`, in cookie order ("." and ".." not included).
    func readdir(_ dir: InodeNumber, after cookie: UInt64, limit: Int) throws -> [DirectoryEntry]
    /// `readdir` with each entry's attributes (nil for one removed meanwhile), read in batches:
    /// READDIRPLUS, so `ls -l` costs a few requests per page instead of a lookup per name.
    func readdirPlus(_ dir: InodeNumber, after cookie: UInt64, limit: Int) throws -> [(DirectoryEntry, InodeAttributes?)]
    func parent(of dir: InodeNumber) throws -> InodeNumber
    func readlink(_ ino: InodeNumber) throws -> String
    func manifest(of ino: InodeNumber) throws -> ManifestRef
    /// Installs a new content version: size, manifest, mtime/ctime; bumps `version`. With a
    /// `fence` (a cluster node's write session), refused with EIO unless the writer still holds
    /// the file (see `CommitFence`).
    func commit(_ ino: InodeNumber, size: UInt64, manifest: ManifestRef, mtime: Timestamp, fence: CommitFence?) throws -> InodeAttributes
    /// Regular files in one directory, each with its content committed (version 1), in one
    /// transaction (the scale benchmark's loader).
    func createFiles(parent: InodeNumber, _ files: [(name: String, new: NewInode, size: UInt64, manifest: ManifestRef)]) throws -> [InodeAttributes]
    func getxattr(_ ino: InodeNumber, name: String) throws -> Data
    func setxattr(_ ino: InodeNumber, name: String, value: Data, mode: XattrSetMode) throws
    func listxattr(_ ino: InodeNumber) throws -> [String]
    func removexattr(_ ino: InodeNumber, name: String) throws
    /// Removes an inode whose `nlink` is 0, with its xattrs and manifest. EBUSY if it still has links.
    func deleteInode(_ ino: InodeNumber) throws
    /// Inodes with `nlink == 0` (left by a crash while they were open).
    func orphans() throws -> [InodeNumber]
    /// The orphans another client (a cluster node, by id) left: deleted once that node is removed
    /// for good (`modelfs node remove`), as it would have at its next start.
    func orphans(of client: String) throws -> [InodeNumber]
    /// The attributes and manifests of many inodes at once (nil for one that is gone): the
    /// namespace walk's batch (healing, `status PATH`), a few etcd requests per 1,000 files
    /// instead of two per file.
    func files(_ inos: [InodeNumber]) throws -> [(attrs: InodeAttributes, manifest: ManifestRef)?]
    /// Every manifest reference in the namespace (page by page, not one snapshot).
    func allManifests() throws -> [ManifestRef]
    /// A page of the namespace's manifests: those of inodes numbered above `after`, in inode
    /// order, at most `limit`; each page its own transaction (garbage collection pages through
    /// at a bounded rate instead of reading the whole namespace at once).
    func manifests(after: InodeNumber, limit: Int) throws -> [(InodeNumber, ManifestRef)]
    /// Makes every committed transaction durable against power loss.
    func sync() throws
    func stats() throws -> MetadataStats
}

extension MetadataEngine {
    public func commit(_ ino: InodeNumber, size: UInt64, manifest: ManifestRef, mtime: Timestamp) throws -> InodeAttributes {
        try commit(ino, size: size, manifest: manifest, mtime: mtime, fence: nil)
    }
}

/// What lets a cluster node commit a file it took for writing: the revision at which it took
/// the file's write lock (`w/INO`, under its lease), and the content version it started from.
///
/// A commit is refused (fenced) when the lock is now another node's, or was taken again since
/// (a node cut off past its lease came back: another node may have written the file meanwhile).
/// A lock that lapsed and that nobody took while the file stayed at `baseVersion` costs nothing:
/// nobody else wrote, so the commit goes on (the lapse was a network blip, not a conflict); a
/// node that takes the file from then on makes this writer's later commits fail.
public struct CommitFence: Sendable, Equatable {
    public var epoch: Int64
    public var baseVersion: UInt64
    public init(epoch: Int64, baseVersion: UInt64) { self.epoch = epoch; self.baseVersion = baseVersion }
}

/// Opens an engine from a `--meta` URL: `sqlite:PATH`, `memory:` or
/// `etcd://HOST:PORT[,HOST:PORT...][/NAME]` (NAME: the cluster's key prefix, default "default").
public enum MetadataURL {
    public static func open(_ url: String, rootUID: UInt32, rootGID: UInt32,
                            clientID: String = UUID().uuidString, etcd security: EtcdSecurity = .none) throws -> any MetadataEngine {
        if url == "memory:" || url == "memory" {
            return try KVMetadataEngine(store: MemoryTransactionalStore(), rootUID: rootUID, rootGID: rootGID)
        }
        if url.hasPrefix("sqlite:") {
            let path = String(url.dropFirst("sqlite:".count))
            guard !path.isEmpty else { throw FSError.invalid("--meta sqlite: needs a path, e.g. sqlite:/data/meta.db") }
            let store = try SQLiteTransactionalStore(path: path)
            return try KVMetadataEngine(store: store, rootUID: rootUID, rootGID: rootGID)
        }
        if url.hasPrefix("etcd://") {
            let (endpoints, name) = try parseEtcd(url)
            let store = try EtcdTransactionalStore(endpoints: endpoints, name: name, clientID: clientID, security: security)
            return try KVMetadataEngine(store: store, rootUID: rootUID, rootGID: rootGID)
        }
        let scheme = url.split(separator: ":", maxSplits: 1).first.map(String.init) ?? url
        throw FSError.invalid("unknown --meta scheme \"\(scheme)\": use sqlite:PATH, etcd://HOST:PORT,... or memory:")
    }
}

extension MetadataURL {
    /// `etcd://h1:2379,h2:2379/NAME` → (["h1:2379", "h2:2379"], "NAME").
    public static func parseEtcd(_ url: String) throws -> (endpoints: [String], name: String) {
        let rest = url.dropFirst("etcd://".count)
        let parts = rest.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
        let endpoints = (parts.first ?? "").split(separator: ",").map(String.init).filter { !$0.isEmpty }
        let name = parts.count > 1 && !parts[1].isEmpty ? String(parts[1]) : "default"
        guard !endpoints.isEmpty, endpoints.allSatisfy({ $0.contains(":") }) else {
            throw FSError.invalid("--meta \(url): name the etcd members as etcd://HOST:PORT[,HOST:PORT...][/NAME]")
        }
        guard name.allSatisfy({ $0.isLetter || $0.isNumber || "-_.".contains($0) }) else {
            throw FSError.invalid("--meta \(url): the cluster name may hold letters, digits, '-', '_' and '.' only")
        }
        return (endpoints, name)
    }
}

extension MetadataEngine {
    /// Unlink that leaves a last-link inode for `deleteInode` (as if it were open).
    public func unlink(parent: InodeNumber, name: String, now: Timestamp) throws -> RemovedLink {
        try unlink(parent: parent, name: name, now: now, isOpen: { _ in true })
    }

    /// Rename that leaves a replaced last-link inode for `deleteInode` (as if it were open).
    public func rename(parent: InodeNumber, name: String, newParent: InodeNumber, newName: String,
                       flags: RenameFlags, now: Timestamp) throws -> RemovedLink? {
        try rename(parent: parent, name: name, newParent: newParent, newName: newName, flags: flags, now: now,
                   isOpen: { _ in true })
    }
}

/// Signed changes to the namespace's counters: etcd keeps each client's sum in `n/stats/CLIENT`,
/// SQLite its running total in memory (`InodeRows.counted`).
struct StatsDelta: Codable, Equatable {
    /// Regular files, directories, symlinks, bytes, special files (FIFOs, sockets, devices).
    var f: Int64 = 0, d: Int64 = 0, s: Int64 = 0, b: Int64 = 0, x: Int64 = 0

    init() {}
    /// Tolerant: a node's sum written before special files has no `x`.
    init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        f = try c.decodeIfPresent(Int64.self, forKey: .f) ?? 0
        d = try c.decodeIfPresent(Int64.self, forKey: .d) ?? 0
        s = try c.decodeIfPresent(Int64.self, forKey: .s) ?? 0
        b = try c.decodeIfPresent(Int64.self, forKey: .b) ?? 0
        x = try c.decodeIfPresent(Int64.self, forKey: .x) ?? 0
    }

    var isZero: Bool { self == StatsDelta() }

    /// Counts a record (as `MetadataStats` does: linked inodes only) `sign` times.
    mutating func add(_ r: InodeRecord?, _ sign: Int64) {
        guard let r, r.attrs.nlink > 0 else { return }
        switch r.attrs.kind {
        case .regular: f += sign; b += sign * Int64(clamping: r.attrs.size)
        case .directory: d += sign
        case .symlink: s += sign
        case .fifo, .socket, .charDevice, .blockDevice: x += sign
        }
    }

    static func += (a: inout StatsDelta, x: StatsDelta) { a.f += x.f; a.d += x.d; a.s += x.s; a.b += x.b; a.x += x.x }

    var stats: MetadataStats {
        var m = MetadataStats()
        m.files = UInt64(max(0, f)); m.directories = UInt64(max(0, d)); m.symlinks = UInt64(max(0, s))
        m.specials = UInt64(max(0, x))
        m.logicalBytes = UInt64(max(0, b))
        return m
    }
}
