import Foundation
import ModelFSCore

/// The namespace rules of modelfs, written once over any `TransactionalStore` (memory, SQLite,
/// etcd): every public method is one transaction of the store.
public final class KVMetadataEngine<Store: TransactionalStore>: MetadataEngine, @unchecked Sendable {
    public let store: Store
    /// What one file's xattrs may take, names and values together: 64 KiB, as CephFS allows
    /// (ext4: what fits its one 4 KiB block; the kernel's own limits are 64 KiB for one value
    /// and for the list of names), so a listxattr always fits its buffer. ENOSPC beyond, as ext4.
    public static var xattrSpace: Int { 64 << 10 }

    public init(store: Store, rootUID: UInt32, rootGID: UInt32) throws {
        self.store = store
        try store.write { tx in
            if try tx.inode(.root) == nil {
                let now = Timestamp.now()
                let attrs = InodeAttributes(ino: .root, kind: .directory, mode: 0o755, uid: rootUID, gid: rootGID,
                                            nlink: 2, size: 0, atime: now, mtime: now, ctime: now, version: 0)
                try tx.putInode(InodeRecord(attrs: attrs, parent: .root))
            }
        }
    }

    private func require(_ tx: any MetadataTransaction, _ ino: InodeNumber) throws -> InodeRecord {
        guard let r = try tx.inode(ino) else { throw FSError.noEntry("\(ino) does not exist") }
        return r
    }

    /// EPERM for an immutable inode (`InodeAttributes.immutable`): one of a snapshot.
    private func mutable(_ r: InodeRecord) throws {
        if r.attrs.immutable {
            throw FSError(EPERM, "\(r.attrs.ino) is immutable: part of a snapshot (`modelfs snapshot --delete` removes one)")
        }
    }

    private func requireDirectory(_ tx: any MetadataTransaction, _ ino: InodeNumber) throws -> InodeRecord {
        let r = try require(tx, ino)
        guard r.attrs.kind == .directory else { throw FSError.notDirectory() }
        guard r.attrs.nlink > 0 else { throw FSError.noEntry("directory was removed") }
        return r
    }

    /// Records a change of a directory's entries: its mtime and ctime.
    private func touch(_ tx: any MetadataTransaction, _ dir: inout InodeRecord, _ now: Timestamp, nlinkDelta: Int = 0) throws {
        dir.attrs.mtime = now
        dir.attrs.ctime = now
        dir.attrs.nlink = UInt32(Int(dir.attrs.nlink) + nlinkDelta)
        try tx.putInode(dir)
    }

    public func getattr(_ ino: InodeNumber) throws -> InodeAttributes {
        try store.read { tx in try require(tx, ino).attrs }
    }

    public func lookup(parent: InodeNumber, name: String) throws -> InodeAttributes {
        try store.read { tx in
            _ = try requireDirectory(tx, parent)
            guard let e = try tx.entry(parent, name) else { throw FSError.noEntry() }
            return try require(tx, e.ino).attrs
        }
    }

    public func create(parent: InodeNumber, name: String, _ new: NewInode) throws -> InodeAttributes {
        try validateName(name)
        return try store.write { tx in
            var dir = try requireDirectory(tx, parent)
            try mutable(dir)
            if try tx.entry(parent, name) != nil { throw FSError.exists() }
            let ino = try tx.allocateInode()
            let isDir = new.kind == .directory
            let attrs = InodeAttributes(ino: ino, kind: new.kind, mode: new.mode & 0o7777, uid: new.uid, gid: new.gid,
                                        nlink: isDir ? 2 : 1, size: UInt64(new.target.map(RawName.byteCount) ?? 0),
                                        atime: new.now, mtime: new.now, ctime: new.now, version: 0,
                                        rdev: new.kind == .charDevice || new.kind == .blockDevice ? new.rdev : 0)
            try tx.putInode(InodeRecord(attrs: attrs, parent: isDir ? parent : nil, target: new.target))
            try tx.addEntry(parent, name, EntryRecord(ino: ino, kind: new.kind))
            try touch(tx, &dir, new.now, nlinkDelta: isDir ? 1 : 0)
            return attrs
        }
    }

    /// Creates regular files in one directory, each with its content already committed (size and
    /// manifest, version 1), in one transaction: the namespace loader of the scale benchmark
    /// (`modelfs debug load`) builds 10^6 files this way, ~40 to an etcd transaction, under the
    /// same rules as `create` and `commit`. All or none; EEXIST if a name is taken.
    public func createFiles(parent: InodeNumber, _ files: [(name: String, new: NewInode, size: UInt64, manifest: ManifestRef)]) throws -> [InodeAttributes] {
        for f in files { try validateName(f.name) }
        return try store.write { tx in
            var dir = try requireDirectory(tx, parent)
            try mutable(dir)
            var out: [InodeAttributes] = []
            var now = dir.attrs.mtime
            if let taken = try tx.existingNames(parent, among: files.map(\.name)).first { throw FSError.exists("\(taken) exists") }
            for f in files {
                precondition(f.new.kind == .regular, "createFiles makes regular files")
                let ino = try tx.allocateInode()
                let attrs = InodeAttributes(ino: ino, kind: .regular, mode: f.new.mode & 0o7777, uid: f.new.uid, gid: f.new.gid,
                                            nlink: 1, size: f.size, atime: f.new.now, mtime: f.new.now, ctime: f.new.now, version: 1)
                try tx.putInode(InodeRecord(attrs: attrs))
                try tx.putManifest(ino, f.manifest.encoded())
                try tx.addEntry(parent, f.name, EntryRecord(ino: ino, kind: .regular))
                out.append(attrs)
                now = Swift.max(now, f.new.now)
            }
            try touch(tx, &dir, now)
            return out
        }
    }

    public func link(_ ino: InodeNumber, parent: InodeNumber, name: String, now: Timestamp) throws -> InodeAttributes {
        try validateName(name)
        return try store.write { tx in
            var dir = try requireDirectory(tx, parent)
            var target = try require(tx, ino)
            try mutable(dir)
            try mutable(target)
            guard target.attrs.kind != .directory else { throw FSError(EPERM, "hard links to directories are not allowed") }
            guard target.attrs.nlink > 0 else { throw FSError.noEntry("file was removed") }
            if try tx.entry(parent, name) != nil { throw FSError.exists() }
            target.attrs.nlink += 1
            target.attrs.ctime = now
            try tx.putInode(target)
            try tx.addEntry(parent, name, EntryRecord(ino: ino, kind: target.attrs.kind))
            try touch(tx, &dir, now)
            return target.attrs
        }
    }

    /// Drops one link of `ino` (whose entry the caller already removed). A file that loses its
    /// last link while nothing has it open is deleted here, in the same transaction: one write
    /// instead of two (this one, then `deleteInode` when the kernel forgets the inode).
    private func dropLink(_ tx: any MetadataTransaction, _ ino: InodeNumber, now: Timestamp,
                          isOpen: (InodeNumber) -> Bool = { _ in true }) throws -> RemovedLink {
        var r = try require(tx, ino)
        try mutable(r)
        if r.attrs.kind == .directory {
            r.attrs.nlink = 0
        } else {
            r.attrs.nlink = r.attrs.nlink > 0 ? r.attrs.nlink - 1 : 0
        }
        if r.attrs.nlink == 0 && r.attrs.kind != .directory && !isOpen(ino) {
            try tx.removeAllXattrs(ino)
            try tx.deleteInode(ino)
            return RemovedLink(ino: ino, kind: r.attrs.kind, nlink: 0, deleted: true)
        }
        r.attrs.ctime = now
        try tx.putInode(r)
        return RemovedLink(ino: ino, kind: r.attrs.kind, nlink: r.attrs.nlink)
    }

    public func unlink(parent: InodeNumber, name: String, now: Timestamp, isOpen: (InodeNumber) -> Bool) throws -> RemovedLink {
        try store.write { tx in
            var dir = try requireDirectory(tx, parent)
            try mutable(dir)
            guard let e = try tx.entry(parent, name) else { throw FSError.noEntry() }
            guard e.kind != .directory else { throw FSError.isDirectory() }
            try tx.removeEntry(parent, name)
            try touch(tx, &dir, now)
            return try dropLink(tx, e.ino, now: now, isOpen: isOpen)
        }
    }

    public func rmdir(parent: InodeNumber, name: String, now: Timestamp) throws -> RemovedLink {
        try store.write { tx in
            var dir = try requireDirectory(tx, parent)
            try mutable(dir)
            guard let e = try tx.entry(parent, name) else { throw FSError.noEntry() }
            guard e.kind == .directory else { throw FSError.notDirectory() }
            try mutable(try require(tx, e.ino))   // EPERM before ENOTEMPTY, as the kernel checks
            if try tx.hasEntries(e.ino) { throw FSError.notEmpty() }
            try tx.removeEntry(parent, name)
            try touch(tx, &dir, now, nlinkDelta: -1)
            return try dropLink(tx, e.ino, now: now)
        }
    }

    /// True if `dir` is `ancestor` or lies below it.
    private func isWithin(_ tx: any MetadataTransaction, _ dir: InodeNumber, _ ancestor: InodeNumber) throws -> Bool {
        var cur = dir
        var hops = 0
        while true {
            if cur == ancestor { return true }
            if cur == .root { return false }
            guard let p = try tx.inode(cur)?.parent else { return false }
            cur = p
            hops += 1
            if hops > 100_000 { throw MetaError(.corrupt, "directory tree has a cycle at \(cur)") }
        }
    }

    public func rename(parent: InodeNumber, name: String, newParent: InodeNumber, newName: String,
                       flags: RenameFlags, now: Timestamp, isOpen: (InodeNumber) -> Bool) throws -> RemovedLink? {
        try validateName(newName)
        if flags.contains(.noReplace) && flags.contains(.exchange) { throw FSError.invalid("RENAME_NOREPLACE with RENAME_EXCHANGE") }
        return try store.write { tx in
            try mutable(try requireDirectory(tx, parent))
            try mutable(try requireDirectory(tx, newParent))
            guard let src = try tx.entry(parent, name) else { throw FSError.noEntry() }
            let dst = try tx.entry(newParent, newName)
            if parent == newParent && name == newName {
                if dst == nil { throw FSError.noEntry() }
                return nil  // renaming a name onto itself does nothing
            }
            if let dst, dst.ino == src.ino { // two links to the same file: POSIX says do nothing
                return nil
            }
            if src.kind == .directory, try isWithin(tx, newParent, src.ino) {
                throw FSError.invalid("cannot move a directory into itself")
            }
            if flags.contains(.exchange) {
                guard let dst else { throw FSError.noEntry() }
                if dst.kind == .directory, try isWithin(tx, parent, dst.ino) {
                    throw FSError.invalid("cannot move a directory into itself")
                }
                try tx.removeEntry(parent, name)
                try tx.removeEntry(newParent, newName)
                try tx.addEntry(parent, name, dst)
                try tx.addEntry(newParent, newName, src)
                try reparent(tx, src, from: parent, to: newParent, now: now)
                try reparent(tx, dst, from: newParent, to: parent, now: now)
                try touchBoth(tx, parent, newParent, now)
                return nil
            }
            var replaced: RemovedLink?
            if let dst {
                if flags.contains(.noReplace) { throw FSError.exists() }
                switch (src.kind == .directory, dst.kind == .directory) {
                case (true, false): throw FSError.notDirectory()
                case (false, true): throw FSError.isDirectory()
                case (true, true): if try tx.hasEntries(dst.ino) { throw FSError.notEmpty() }
                default: break
                }
                try tx.removeEntry(newParent, newName)
                if dst.kind == .directory {
                    var np = try require(tx, newParent)
                    np.attrs.nlink -= 1
                    try tx.putInode(np)
                }
                replaced = try dropLink(tx, dst.ino, now: now, isOpen: isOpen)
            }
            try tx.removeEntry(parent, name)
            try tx.addEntry(newParent, newName, src)
            try reparent(tx, src, from: parent, to: newParent, now: now)
            try touchBoth(tx, parent, newParent, now)
            return replaced
        }
    }

    /// Moves a directory's ".." and the parents' link counts; touches a moved inode's ctime.
    private func reparent(_ tx: any MetadataTransaction, _ e: EntryRecord, from: InodeNumber, to: InodeNumber, now: Timestamp) throws {
        var r = try require(tx, e.ino)
        try mutable(r)
        r.attrs.ctime = now
        if e.kind == .directory && from != to {
            r.parent = to
            var f = try require(tx, from); f.attrs.nlink -= 1; try tx.putInode(f)
            var t = try require(tx, to); t.attrs.nlink += 1; try tx.putInode(t)
        }
        try tx.putInode(r)
    }

    private func touchBoth(_ tx: any MetadataTransaction, _ a: InodeNumber, _ b: InodeNumber, _ now: Timestamp) throws {
        var ra = try require(tx, a); try touch(tx, &ra, now)
        if a != b { var rb = try require(tx, b); try touch(tx, &rb, now) }
    }

    public func setattr(_ ino: InodeNumber, _ changes: AttributeChanges, now: Timestamp) throws -> InodeAttributes {
        try store.write { tx in try apply(tx, ino, changes, now: now) }
    }

    public func setattrs(_ changes: [(ino: InodeNumber, changes: AttributeChanges)], now: Timestamp) throws {
        try store.write { tx in
            for c in changes { _ = try apply(tx, c.ino, c.changes, now: now) }
        }
    }

    private func apply(_ tx: any MetadataTransaction, _ ino: InodeNumber, _ changes: AttributeChanges, now: Timestamp) throws -> InodeAttributes {
        var r = try require(tx, ino)
        // Flags alone may change on an immutable inode (that is how a snapshot is thawed).
        if changes != AttributeChanges(flags: changes.flags) { try mutable(r) }
        if let f = changes.flags { r.attrs.flags = f }
        if let m = changes.mode { r.attrs.mode = m & 0o7777 }
        if let u = changes.uid { r.attrs.uid = u }
        if let g = changes.gid { r.attrs.gid = g }
        if let a = changes.atime { r.attrs.atime = a }
        if let m = changes.mtime { r.attrs.mtime = m }
        r.attrs.ctime = now
        try tx.putInode(r)
        return r.attrs
    }

    public func readdir(_ dir: InodeNumber, after cookie: UInt64, limit: Int) throws -> [DirectoryEntry] {
        try store.read { tx in
            _ = try requireDirectory(tx, dir)
            return try tx.entries(dir, after: cookie, limit: limit)
        }
    }

    public func readdirPlus(_ dir: InodeNumber, after cookie: UInt64, limit: Int) throws -> [(DirectoryEntry, InodeAttributes?)] {
        try store.read { tx in
            _ = try requireDirectory(tx, dir)
            let entries = try tx.entries(dir, after: cookie, limit: limit)
            return zip(entries, try tx.inodes(entries.map(\.ino))).map { ($0, $1?.attrs) }
        }
    }

    public func parent(of dir: InodeNumber) throws -> InodeNumber {
        try store.read { tx in try requireDirectory(tx, dir).parent ?? .root }
    }

    public func readlink(_ ino: InodeNumber) throws -> String {
        try store.read { tx in
            let r = try require(tx, ino)
            guard r.attrs.kind == .symlink, let t = r.target else { throw FSError.invalid("not a symlink") }
            return t
        }
    }

    public func manifest(of ino: InodeNumber) throws -> ManifestRef {
        try store.read { tx in
            _ = try require(tx, ino)
            guard let d = try tx.manifest(ino) else { return .empty }
            return try ManifestRef(decoding: d)
        }
    }

    public func commit(_ ino: InodeNumber, size: UInt64, manifest: ManifestRef, mtime: Timestamp, fence: CommitFence?) throws -> InodeAttributes {
        try store.write { tx in
            var r = try require(tx, ino)
            try mutable(r)
            guard r.attrs.kind == .regular else { throw FSError.isDirectory() }
            if let fence { try tx.checkFence(ino, fence, version: r.attrs.version) }
            r.attrs.size = size
            r.attrs.mtime = mtime
            r.attrs.ctime = Swift.max(mtime, r.attrs.ctime)
            r.attrs.version += 1
            try tx.putInode(r)
            try tx.putManifest(ino, manifest.encoded())
            return r.attrs
        }
    }

    public func getxattr(_ ino: InodeNumber, name: String) throws -> Data {
        try store.read { tx in
            _ = try require(tx, ino)
            guard let v = try tx.xattr(ino, name) else { throw FSError.noData() }
            return v
        }
    }

    public func setxattr(_ ino: InodeNumber, name: String, value: Data, mode: XattrSetMode) throws {
        guard !name.isEmpty, RawName.byteCount(name) <= 255 else { throw FSError(ERANGE, "xattr name must be 1–255 bytes") }
        guard value.count <= 64 << 10 else { throw FSError(E2BIG, "xattr value larger than 64 KiB") }
        try store.write { tx in
            var r = try require(tx, ino)
            try mutable(r)
            let old = try tx.xattr(ino, name)
            let exists = old != nil
            if mode == .create && exists { throw FSError.exists("attribute exists") }
            if mode == .replace && !exists { throw FSError.noData() }
            // Only a change that grows the file's xattrs is checked against their space.
            let before = old.map { name.utf8.count + $0.count } ?? 0, after = name.utf8.count + value.count
            if after > before, try tx.xattrBytes(ino) - before + after > Self.xattrSpace {
                throw FSError(ENOSPC, "a file's xattrs take at most \(Self.xattrSpace >> 10) KiB, names and values together")
            }
            try tx.putXattr(ino, name, value)
            r.attrs.ctime = Timestamp.now()
            try tx.putInode(r)
        }
    }

    public func listxattr(_ ino: InodeNumber) throws -> [String] {
        try store.read { tx in
            _ = try require(tx, ino)
            return try tx.xattrNames(ino)
        }
    }

    public func removexattr(_ ino: InodeNumber, name: String) throws {
        try store.write { tx in
            try mutable(try require(tx, ino))
            guard try tx.xattr(ino, name) != nil else { throw FSError.noData() }
            try tx.removeXattr(ino, name)
        }
    }

    public func deleteInode(_ ino: InodeNumber) throws {
        try store.write { tx in
            guard let r = try tx.inode(ino) else { return }
            guard r.attrs.nlink == 0 else { throw FSError(EBUSY, "\(ino) still has \(r.attrs.nlink) links") }
            try tx.removeAllXattrs(ino)
            try tx.deleteInode(ino)
        }
    }

    public func orphans() throws -> [InodeNumber] { try store.read { tx in try tx.orphans() } }
    public func orphans(of client: String) throws -> [InodeNumber] { try store.read { tx in try tx.orphans(of: client) } }

    public func files(_ inos: [InodeNumber]) throws -> [(attrs: InodeAttributes, manifest: ManifestRef)?] {
        try store.read { tx in
            try tx.inodesAndManifests(inos).map { r, m in
                guard let r, r.attrs.kind == .regular else { return nil }
                return (r.attrs, try m.map { try ManifestRef(decoding: $0) } ?? .inline(Manifest()))
            }
        }
    }

    public func manifests(after: InodeNumber, limit: Int) throws -> [(InodeNumber, ManifestRef)] {
        try store.read { tx in try tx.manifests(after: after, limit: limit).map { ($0.0, try ManifestRef(decoding: $0.1)) } }
    }

    public func allManifests() throws -> [ManifestRef] {
        var out: [ManifestRef] = []
        var after = InodeNumber(0)
        while true {
            let page = try manifests(after: after, limit: 1000)
            out += page.map(\.1)
            guard page.count == 1000, let last = page.last else { return out }
            after = last.0
        }
    }

    public func sync() throws { try store.sync() }

    public func stats() throws -> MetadataStats { try store.read { tx in try tx.stats() } }
}
