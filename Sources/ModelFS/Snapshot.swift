import Foundation
import ModelFSCore
import ModelFSMeta

/// `modelfs snapshot`: a read-only copy of a tree made of metadata alone. Each file of the copy
/// gets the source's committed manifest, so it references the same blocks (garbage collection
/// marks blocks from every manifest: they stay while either tree does) and no byte is copied or
/// replicated. Every inode of the copy is then made immutable (`InodeAttributes.immutable`).
extension FileSystem {
    public struct SnapshotOutcome: Sendable, Codable, Equatable {
        public var files = 0
        public var directories = 0
        /// Symlinks, FIFOs, sockets and device nodes.
        public var others = 0
        /// The files' bytes (shared, not copied).
        public var bytes: UInt64 = 0
        public init() {}
    }

    /// Files per metadata transaction (`createFiles`: on etcd, four operations each of the 128 a
    /// transaction may hold); twice as many inodes per `setattrs` (one write each).
    static let snapshotBatch = 25

    /// `setattrs` of `changes`, `snapshotBatch * 2` inodes a transaction.
    private func setattrsInBatches(_ changes: [(ino: InodeNumber, changes: AttributeChanges)]) throws {
        for start in stride(from: 0, to: changes.count, by: Self.snapshotBatch * 2) {
            try meta.setattrs(Array(changes[start..<min(start + Self.snapshotBatch * 2, changes.count)]), now: .now())
        }
    }

    /// Copies the tree at `src` to a new entry `name` of `parent`, then makes every inode of the
    /// copy immutable. A file open for writing is copied as last committed. Hard links inside the
    /// tree become separate files (sharing blocks). EEXIST if `name` exists; EINVAL if `parent`
    /// lies inside `src`. On failure the partial copy stays, mutable, for `deleteSnapshot`.
    public func snapshot(_ src: InodeNumber, into parent: InodeNumber, name: String) throws -> SnapshotOutcome {
        var up = parent
        while true {
            if up == src { throw FSError.invalid("a snapshot cannot be made inside its own source") }
            if up == .root { break }
            up = try meta.parent(of: up)
        }
        var out = SnapshotOutcome()
        // Every inode made, with the source's times: set last, with the flag, in one transaction each.
        var made: [(ino: InodeNumber, from: InodeAttributes)] = []
        func copyXattrs(_ from: InodeNumber, _ to: InodeNumber) throws {
            for n in try meta.listxattr(from) {
                try meta.setxattr(to, name: n, value: try meta.getxattr(from, name: n), mode: .any)
            }
        }
        func node(_ a: InodeAttributes, kind: FileKind, target: String? = nil) -> NewInode {
            NewInode(kind: kind, mode: a.mode, uid: a.uid, gid: a.gid, now: a.mtime, target: target, rdev: a.rdev)
        }
        let root = try meta.getattr(src)
        func copyOne(_ a: InodeAttributes, into dir: InodeNumber, as entry: String) throws -> InodeNumber {
            let made: InodeAttributes
            switch a.kind {
            case .regular:
                let ref = try meta.manifest(of: a.ino)
                made = try meta.createFiles(parent: dir, [(entry, node(a, kind: .regular), a.size, ref)])[0]
                out.files += 1; out.bytes += a.size
            case .symlink:
                made = try meta.create(parent: dir, name: entry, node(a, kind: .symlink, target: try meta.readlink(a.ino)))
                out.others += 1
            default:
                made = try meta.create(parent: dir, name: entry, node(a, kind: a.kind))
                if a.kind == .directory { out.directories += 1 } else { out.others += 1 }
            }
            return made.ino
        }
        let top = try copyOne(root, into: parent, as: name)
        made.append((top, root))
        try copyXattrs(src, top)
        if root.kind == .directory {
            var stack: [(from: InodeNumber, to: InodeNumber)] = [(src, top)]
            while let (from, to) = stack.popLast() {
                var cookie: UInt64 = 0
                while true {
                    let page = try meta.readdirPlus(from, after: cookie, limit: 256)
                    guard let last = page.last else { break }
                    cookie = last.0.cookie
                    // Regular files in batches: one transaction per `snapshotBatch` files.
                    let files = page.compactMap { e, a in a.flatMap { $0.kind == .regular ? (e.name, $0) : nil } }
                    for batch in stride(from: 0, to: files.count, by: Self.snapshotBatch).map({ files[$0..<min($0 + Self.snapshotBatch, files.count)] }) {
                        let refs = try meta.files(batch.map { $0.1.ino })
                        var entries: [(name: String, new: NewInode, size: UInt64, manifest: ManifestRef)] = []
                        var sources: [InodeAttributes] = []
                        for ((entry, _), found) in zip(batch, refs) {
                            guard let (a, ref) = found else { continue }   // removed meanwhile
                            entries.append((entry, node(a, kind: .regular), a.size, ref))
                            sources.append(a)
                        }
                        for (newAttrs, a) in zip(try meta.createFiles(parent: to, entries), sources) {
                            made.append((newAttrs.ino, a))
                            out.files += 1; out.bytes += a.size
                            try copyXattrs(a.ino, newAttrs.ino)
                        }
                    }
                    for (e, found) in page where found.map({ $0.kind != .regular }) ?? false {
                        let a = found!
                        let ino = try copyOne(a, into: to, as: e.name)
                        made.append((ino, a))
                        try copyXattrs(a.ino, ino)
                        if a.kind == .directory { stack.append((a.ino, ino)) }
                    }
                }
            }
        }
        // Children before their directories (a directory's times are set after its last entry),
        // `snapshotBatch * 2` inodes a transaction.
        let frozen = made.reversed().map { m in
            (ino: m.ino, changes: AttributeChanges(atime: m.from.atime, mtime: m.from.mtime, flags: m.from.flags | InodeAttributes.immutableFlag))
        }
        try setattrsInBatches(frozen)
        changed()
        return out
    }

    /// Removes the snapshot at `name` in `parent`: clears the immutable flag of every inode, top
    /// down, then removes them, bottom up. EPERM if its top is not immutable (not a snapshot, or
    /// one that failed before its end: that one `rm -r` removes).
    public func deleteSnapshot(parent: InodeNumber, name: String) throws -> SnapshotOutcome {
        let top = try meta.lookup(parent: parent, name: name)
        guard top.immutable else { throw FSError(EPERM, "not a snapshot (its top is not immutable): remove it with rm -r") }
        var out = SnapshotOutcome()
        func thaw(_ a: InodeAttributes) throws {
            if a.immutable { _ = try meta.setattr(a.ino, AttributeChanges(flags: a.flags & ~InodeAttributes.immutableFlag), now: .now()) }
        }
        try thaw(top)
        // Depth first: a directory is removed once its entries are. Each page's entries are
        // thawed together (`setattrs`, as `snapshot` freezes them), then removed one by one.
        func remove(_ dir: InodeNumber) throws {
            while true {
                let page = try meta.readdirPlus(dir, after: 0, limit: 256)
                if page.isEmpty { return }
                let frozen = page.compactMap { $0.1 }.filter(\.immutable)
                    .map { (ino: $0.ino, changes: AttributeChanges(flags: $0.flags & ~InodeAttributes.immutableFlag)) }
                try setattrsInBatches(frozen)
                for (e, found) in page {
                    guard let a = found else { continue }
                    if a.kind == .directory {
                        try remove(a.ino)
                        try rmdir(parent: dir, name: e.name)
                        out.directories += 1
                    } else {
                        try unlink(parent: dir, name: e.name)
                        if a.kind == .regular { out.files += 1; out.bytes += a.size } else { out.others += 1 }
                    }
                }
            }
        }
        if top.kind == .directory {
            try remove(top.ino)
            try rmdir(parent: parent, name: name)
            out.directories += 1
        } else {
            try unlink(parent: parent, name: name)
            if top.kind == .regular { out.files += 1; out.bytes += top.size } else { out.others += 1 }
        }
        return out
    }
}
