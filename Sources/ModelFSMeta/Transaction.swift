import Foundation
import ModelFSCore

/// An inode's row, without its manifest (which is read only when a file is opened).
public struct InodeRecord: Sendable, Equatable {
    public var attrs: InodeAttributes
    /// The containing directory, for directories only (they have exactly one).
    public var parent: InodeNumber?
    public var target: String?
    public init(attrs: InodeAttributes, parent: InodeNumber? = nil, target: String? = nil) {
        self.attrs = attrs; self.parent = parent; self.target = target
    }
}

public struct EntryRecord: Sendable, Equatable {
    public var ino: InodeNumber
    public var kind: FileKind
}

/// The primitive reads and writes an engine offers inside one transaction. The namespace rules
/// (rename cases, link counts, times) are written once, in `KVMetadataEngine`, on top of this.
public protocol MetadataTransaction {
    func inode(_ ino: InodeNumber) throws -> InodeRecord?
    func putInode(_ record: InodeRecord) throws
    func deleteInode(_ ino: InodeNumber) throws
    func allocateInode() throws -> InodeNumber
    func manifest(_ ino: InodeNumber) throws -> Data?
    func putManifest(_ ino: InodeNumber, _ data: Data) throws

    func entry(_ parent: InodeNumber, _ name: String) throws -> EntryRecord?
    /// Adds an entry with a fresh cookie (greater than any given before in that directory).
    func addEntry(_ parent: InodeNumber, _ name: String, _ entry: EntryRecord) throws
    func removeEntry(_ parent: InodeNumber, _ name: String) throws
    func hasEntries(_ dir: InodeNumber) throws -> Bool
    /// Which of `names` are entries of `dir` (an engine may answer with one read).
    func existingNames(_ dir: InodeNumber, among names: [String]) throws -> Set<String>
    func entries(_ dir: InodeNumber, after cookie: UInt64, limit: Int) throws -> [DirectoryEntry]

    func xattr(_ ino: InodeNumber, _ name: String) throws -> Data?
    func putXattr(_ ino: InodeNumber, _ name: String, _ value: Data) throws
    func removeXattr(_ ino: InodeNumber, _ name: String) throws
    func xattrNames(_ ino: InodeNumber) throws -> [String]
    /// The bytes of all of `ino`'s xattrs, names (as stored) and values together.
    func xattrBytes(_ ino: InodeNumber) throws -> Int
    func removeAllXattrs(_ ino: InodeNumber) throws

    /// Throws (EIO, "fenced") unless `fence` still entitles this client to commit `ino`, whose
    /// current content version is `version` (see `CommitFence`). Engines without write locks
    /// (one node) have nothing to check.
    func checkFence(_ ino: InodeNumber, _ fence: CommitFence, version: UInt64) throws

    func orphans() throws -> [InodeNumber]
    /// Another client's orphans (an engine with one client has none).
    func orphans(of client: String) throws -> [InodeNumber]
    /// Manifests of inodes numbered above `after`, in inode order, at most `limit` (a page of a
    /// scan that may run across many transactions: garbage collection).
    func manifests(after: InodeNumber, limit: Int) throws -> [(InodeNumber, Data)]
    /// The records of many inodes (an engine may read them in batches): a directory page's
    /// attributes for readdirplus.
    func inodes(_ inos: [InodeNumber]) throws -> [InodeRecord?]
    /// The records and manifests of many inodes (an engine may read them in batches).
    func inodesAndManifests(_ inos: [InodeNumber]) throws -> [(InodeRecord?, Data?)]
    func stats() throws -> MetadataStats
}

extension MetadataTransaction {
    public func checkFence(_ ino: InodeNumber, _ fence: CommitFence, version: UInt64) throws {}
    public func existingNames(_ dir: InodeNumber, among names: [String]) throws -> Set<String> {
        Set(try names.filter { try entry(dir, $0) != nil })
    }
    public func inodes(_ inos: [InodeNumber]) throws -> [InodeRecord?] {
        try inos.map { try inode($0) }
    }
    public func inodesAndManifests(_ inos: [InodeNumber]) throws -> [(InodeRecord?, Data?)] {
        try inos.map { (try inode($0), try manifest($0)) }
    }
}

/// A store that runs closures as atomic transactions: all of a write's effects or none.
public protocol TransactionalStore: Sendable {
    func read<T>(_ body: (any MetadataTransaction) throws -> T) throws -> T
    func write<T>(_ body: (any MetadataTransaction) throws -> T) throws -> T
    /// Makes committed writes durable against power loss.
    func sync() throws
}
