import Foundation
import ModelFSCore

/// A committed file as replication, healing and `modelfs status PATH` see it.
public struct FileBlocks: Sendable {
    public var ino: InodeNumber
    /// The directory it was reached through (its policy applies).
    public var parent: InodeNumber?
    /// Path below the walk's start ("" for the start itself).
    public var path: String
    public var size: UInt64
    public var version: UInt64
    public var mtime: Timestamp
    /// Every block the committed version references, with its length: the chunks in file order
    /// (repeats included), then the manifest's own block when the manifest is stored as one.
    public var blocks: [ChunkRef]
}

/// What a cluster knows of one file's copies (the `user.modelfs.*` xattrs).
public struct FileReplicaState: Sendable, Equatable {
    /// Copies of its least-copied block on live nodes.
    public var replicas: Int
    /// Bytes of its blocks with fewer than the policy's R copies on live nodes.
    public var pendingBytes: UInt64
    public var policy: ReplicationPolicy
    public init(replicas: Int, pendingBytes: UInt64, policy: ReplicationPolicy) {
        self.replicas = replicas; self.pendingBytes = pendingBytes; self.policy = policy
    }
}

extension FileSystem {
    /// The blocks a file's committed version references (see `FileBlocks.blocks`).
    public func committedBlocks(_ ino: InodeNumber) throws -> [ChunkRef] {
        try committedBlocks(of: try meta.manifest(of: ino))
    }

    func committedBlocks(of ref: ManifestRef) throws -> [ChunkRef] {
        switch ref {
        case .inline(let m): return m.chunks
        case .block(let id, _):
            let b = try reader.block(id)
            return try Manifest(decoding: b.data).chunks + [ChunkRef(id: id, length: UInt32(b.count))]
        }
    }

    /// Calls `visit` for every regular file at or below `start`, depth first, each inode once
    /// (a hard-linked file under its first path). `parent` is the directory `start` was reached
    /// through, if `start` is a file. Files that vanish during the walk are skipped.
    public func walkFiles(from start: InodeNumber, parent: InodeNumber? = nil, _ visit: (FileBlocks) throws -> Void) throws {
        var seen = Set<InodeNumber>()
        func file(_ ino: InodeNumber, _ parent: InodeNumber?, _ path: String) throws {
            guard seen.insert(ino).inserted else { return }
            let a: InodeAttributes
            let blocks: [ChunkRef]
            do {
                a = try meta.getattr(ino)
                blocks = try committedBlocks(ino)
            } catch let e as FSError where e.errno == ENOENT { return }
            try visit(FileBlocks(ino: ino, parent: parent, path: path, size: a.size, version: a.version, mtime: a.mtime, blocks: blocks))
        }
        let root = try meta.getattr(start)
        guard root.kind == .directory else {
            if root.kind == .regular { try file(start, parent, "") }
            return
        }
        var stack: [(InodeNumber, String)] = [(start, "")]
        while let (dir, prefix) = stack.popLast() {
            var cookie: UInt64 = 0
            while true {
                let entries: [DirectoryEntry]
                do { entries = try meta.readdir(dir, after: cookie, limit: 1024) } catch let e as FSError where e.errno == ENOENT { break }
                if entries.isEmpty { break }
                // The page's files are read in one batch (`MetadataEngine.files`): on etcd a
                // few requests per page instead of two per file.
                let fresh = entries.filter { $0.kind == .regular && seen.insert($0.ino).inserted }
                let found = try meta.files(fresh.map(\.ino))
                for (e, f) in zip(fresh, found) {
                    guard let (a, ref) = f else { continue }   // gone meanwhile
                    let blocks: [ChunkRef]
                    do { blocks = try committedBlocks(of: ref) } catch let e as FSError where e.errno == ENOENT { continue }
                    let path = prefix.isEmpty ? e.name : prefix + "/" + e.name
                    try visit(FileBlocks(ino: e.ino, parent: dir, path: path, size: a.size, version: a.version, mtime: a.mtime, blocks: blocks))
                }
                for e in entries where e.kind == .directory {
                    stack.append((e.ino, prefix.isEmpty ? e.name : prefix + "/" + e.name))
                }
                cookie = entries.last!.cookie
            }
        }
    }

    // MARK: state xattrs

    /// Read-only attributes that say what the cluster holds of a file, so `getfattr -n` answers
    /// without the CLI: `user.modelfs.replicas`, `.pending_bytes`, `.version`, and on a file
    /// `.policy` (the policy that applies to it). They are not listed by listxattr, so copying
    /// tools (cp -a, rsync -X) do not try to write them elsewhere.
    static let stateXattrs: Set<String> = ["user.modelfs.replicas", "user.modelfs.pending_bytes", "user.modelfs.version"]

    /// The value of a state xattr, or nil if `name` is not one for this inode.
    func stateXattr(_ ino: InodeNumber, name: String) throws -> Data? {
        let isState = FileSystem.stateXattrs.contains(name)
        guard isState || name == ReplicationPolicy.xattr else { return nil }
        let a = try meta.getattr(ino)
        if name == ReplicationPolicy.xattr {
            // A directory's own policy is an ordinary xattr (set by `modelfs policy set`).
            guard a.kind == .regular else { return nil }
        } else if a.kind != .regular {
            return nil
        }
        if name == "user.modelfs.version" { return Data(String(a.version).utf8) }
        let state: FileReplicaState
        if let replication {
            state = replication.fileState(blocks: try committedBlocks(ino), parent: parentHint(ino))
        } else {
            state = FileReplicaState(replicas: 1, pendingBytes: 0, policy: ReplicationPolicy(replicas: 1, ack: 1))
        }
        switch name {
        case "user.modelfs.replicas": return Data(String(state.replicas).utf8)
        case "user.modelfs.pending_bytes": return Data(String(state.pendingBytes).utf8)
        default: return Data(state.policy.description.utf8)
        }
    }
}
