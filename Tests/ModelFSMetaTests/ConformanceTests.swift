import Foundation
import ModelFSTestSupport
import Testing
@testable import ModelFSCore
@testable import ModelFSMeta

/// The one conformance suite every metadata engine must pass (DESIGN.md §2). Each test runs on
/// every engine. The etcd engine runs against a real 3-member etcd cluster on loopback, started
/// once for the test process (each test under its own cluster name, i.e. key prefix).
enum EngineKind: String, CaseIterable, CustomTestStringConvertible {
    case memory, sqlite, etcd
    var testDescription: String { rawValue }

    func make() throws -> (any MetadataEngine, cleanup: () -> Void) {
        switch self {
        case .memory:
            return (try MetadataURL.open("memory:", rootUID: 0, rootGID: 0), {})
        case .sqlite:
            let dir = NSTemporaryDirectory() + "modelfs-meta-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            return (try MetadataURL.open("sqlite:\(dir)/meta.db", rootUID: 0, rootGID: 0),
                    { try? FileManager.default.removeItem(atPath: dir) })
        case .etcd:
            let cluster = try EtcdTestCluster.shared.get()
            return (try MetadataURL.open(cluster.metaURL("conf-\(UInt64.random(in: 0...UInt64.max))"), rootUID: 0, rootGID: 0), {})
        }
    }
}

let now = Timestamp(seconds: 1_700_000_000, nanoseconds: 5)
func file(_ mode: UInt32 = 0o644) -> NewInode { NewInode(kind: .regular, mode: mode, uid: 1000, gid: 1000, now: now) }
func dir(_ mode: UInt32 = 0o755) -> NewInode { NewInode(kind: .directory, mode: mode, uid: 1000, gid: 1000, now: now) }

func errno(of body: () throws -> Void) -> Int32? {
    do { try body(); return nil } catch let e as FSError { return e.errno } catch { return -1 }
}

@Suite struct MetadataConformance {
    @Test(arguments: EngineKind.allCases) func createLookupGetattr(_ kind: EngineKind) throws {
        let (m, done) = try kind.make(); defer { done() }
        let a = try m.create(parent: .root, name: "a.bin", file(0o640))
        #expect(a.kind == .regular && a.mode == 0o640 && a.uid == 1000 && a.nlink == 1 && a.size == 0 && a.version == 0)
        #expect(try m.lookup(parent: .root, name: "a.bin") == a)
        #expect(try m.getattr(a.ino) == a)
        #expect(errno { _ = try m.create(parent: .root, name: "a.bin", file()) } == EEXIST)
        #expect(errno { _ = try m.lookup(parent: .root, name: "nope") } == ENOENT)
        #expect(errno { _ = try m.lookup(parent: a.ino, name: "x") } == ENOTDIR)
        let root = try m.getattr(.root)
        #expect(root.kind == .directory && root.mtime == now)
    }

    @Test(arguments: EngineKind.allCases) func namesAreValidated(_ kind: EngineKind) throws {
        let (m, done) = try kind.make(); defer { done() }
        for bad in ["", ".", "..", "a/b"] { #expect(errno { _ = try m.create(parent: .root, name: bad, file()) } == EINVAL) }
        #expect(errno { _ = try m.create(parent: .root, name: String(repeating: "x", count: 256), file()) } == ENAMETOOLONG)
        _ = try m.create(parent: .root, name: String(repeating: "x", count: 255), file())
    }

    @Test(arguments: EngineKind.allCases) func directoriesCountLinks(_ kind: EngineKind) throws {
        let (m, done) = try kind.make(); defer { done() }
        let d = try m.create(parent: .root, name: "d", dir())
        #expect(try d.nlink == 2 && (try m.getattr(.root)).nlink == 3)
        _ = try m.create(parent: d.ino, name: "e", dir())
        #expect((try m.getattr(d.ino)).nlink == 3)
        #expect(try m.parent(of: d.ino) == .root)
        #expect(errno { _ = try m.rmdir(parent: .root, name: "d", now: now) } == ENOTEMPTY)
        #expect(errno { _ = try m.unlink(parent: .root, name: "d", now: now) } == EISDIR)
        _ = try m.rmdir(parent: d.ino, name: "e", now: now)
        let r = try m.rmdir(parent: .root, name: "d", now: now)
        #expect(try r.nlink == 0 && (try m.getattr(.root)).nlink == 2)
        #expect(errno { _ = try m.create(parent: d.ino, name: "late", file()) } == ENOENT)
    }

    @Test(arguments: EngineKind.allCases) func hardLinksAndUnlink(_ kind: EngineKind) throws {
        let (m, done) = try kind.make(); defer { done() }
        let a = try m.create(parent: .root, name: "a", file())
        let d = try m.create(parent: .root, name: "d", dir())
        let l = try m.link(a.ino, parent: d.ino, name: "b", now: now)
        #expect(try l.nlink == 2 && (try m.lookup(parent: d.ino, name: "b")).ino == a.ino)
        #expect(errno { _ = try m.link(d.ino, parent: .root, name: "dl", now: now) } == EPERM)
        #expect(try m.unlink(parent: .root, name: "a", now: now).nlink == 1)
        let last = try m.unlink(parent: d.ino, name: "b", now: now)
        #expect(last.nlink == 0 && last.ino == a.ino)
        #expect(try m.orphans() == [a.ino])
        try m.deleteInode(a.ino)
        #expect(try m.orphans().isEmpty)
        #expect(errno { _ = try m.getattr(a.ino) } == ENOENT)
        #expect(errno { try m.deleteInode(d.ino) } == EBUSY)
    }

    @Test(arguments: EngineKind.allCases) func aLastLinkNobodyHasOpenIsDeletedByTheUnlinkItself(_ kind: EngineKind) throws {
        let (m, done) = try kind.make(); defer { done() }
        let a = try m.create(parent: .root, name: "a", file())
        try m.setxattr(a.ino, name: "user.k", value: Data("v".utf8), mode: .any)
        _ = try m.link(a.ino, parent: .root, name: "a2", now: now)
        var asked: [InodeNumber] = []
        // Not the last link: nothing is deleted, whatever isOpen says.
        let first = try m.unlink(parent: .root, name: "a", now: now, isOpen: { asked.append($0); return false })
        #expect(first == RemovedLink(ino: a.ino, kind: .regular, nlink: 1))
        #expect(try m.getattr(a.ino).nlink == 1)
        // The last link, nothing open: gone in the same transaction, xattrs too, no orphan left.
        let last = try m.unlink(parent: .root, name: "a2", now: now, isOpen: { asked.append($0); return false })
        #expect(last == RemovedLink(ino: a.ino, kind: .regular, nlink: 0, deleted: true))
        #expect(asked.contains(a.ino))
        #expect(errno { _ = try m.getattr(a.ino) } == ENOENT)
        #expect(errno { _ = try m.getxattr(a.ino, name: "user.k") } != nil)
        #expect(try m.orphans().isEmpty)
        // The last link of a file that is open: it stays, unlinked, for deleteInode.
        let b = try m.create(parent: .root, name: "b", file())
        let kept = try m.unlink(parent: .root, name: "b", now: now, isOpen: { $0 == b.ino })
        #expect(kept == RemovedLink(ino: b.ino, kind: .regular, nlink: 0))
        #expect(try m.orphans() == [b.ino])
        // A rename over a file nobody has open deletes the replaced file.
        let c = try m.create(parent: .root, name: "c", file())
        let d = try m.create(parent: .root, name: "d", file())
        let replaced = try m.rename(parent: .root, name: "c", newParent: .root, newName: "d", flags: [], now: now,
                                    isOpen: { _ in false })
        #expect(replaced == RemovedLink(ino: d.ino, kind: .regular, nlink: 0, deleted: true))
        #expect(errno { _ = try m.getattr(d.ino) } == ENOENT)
        #expect(try m.lookup(parent: .root, name: "d").ino == c.ino)
    }

    @Test(arguments: EngineKind.allCases) func renameCases(_ kind: EngineKind) throws {
        let (m, done) = try kind.make(); defer { done() }
        let a = try m.create(parent: .root, name: "a", file())
        let b = try m.create(parent: .root, name: "b", file())
        let d = try m.create(parent: .root, name: "d", dir())
        let e = try m.create(parent: .root, name: "e", dir())
        let sub = try m.create(parent: d.ino, name: "sub", dir())
        _ = try m.create(parent: e.ino, name: "full", file())
        // file over file replaces atomically and reports the replaced inode
        let replaced = try m.rename(parent: .root, name: "a", newParent: .root, newName: "b", flags: [], now: now)
        #expect(replaced == RemovedLink(ino: b.ino, kind: .regular, nlink: 0))
        #expect((try m.lookup(parent: .root, name: "b")).ino == a.ino)
        #expect(errno { _ = try m.lookup(parent: .root, name: "a") } == ENOENT)
        // RENAME_NOREPLACE
        let c = try m.create(parent: .root, name: "c", file())
        #expect(errno { _ = try m.rename(parent: .root, name: "c", newParent: .root, newName: "b", flags: .noReplace, now: now) } == EEXIST)
        // kinds must match; non-empty directory targets are refused
        #expect(errno { _ = try m.rename(parent: .root, name: "d", newParent: .root, newName: "c", flags: [], now: now) } == ENOTDIR)
        #expect(errno { _ = try m.rename(parent: .root, name: "c", newParent: .root, newName: "d", flags: [], now: now) } == EISDIR)
        #expect(errno { _ = try m.rename(parent: .root, name: "d", newParent: .root, newName: "e", flags: [], now: now) } == ENOTEMPTY)
        // a directory cannot move into itself
        #expect(errno { _ = try m.rename(parent: .root, name: "d", newParent: sub.ino, newName: "x", flags: [], now: now) } == EINVAL)
        #expect(errno { _ = try m.rename(parent: .root, name: "d", newParent: d.ino, newName: "x", flags: [], now: now) } == EINVAL)
        // whole directory moves in O(1), with its content and link counts
        _ = try m.create(parent: sub.ino, name: "deep", file())
        _ = try m.rename(parent: .root, name: "d", newParent: e.ino, newName: "moved", flags: [], now: now)
        #expect(try m.parent(of: d.ino) == e.ino)
        #expect((try m.lookup(parent: sub.ino, name: "deep")).kind == .regular)
        #expect(try (try m.getattr(.root)).nlink == 3 && (try m.getattr(e.ino)).nlink == 3)
        // dir over empty dir
        let empty = try m.create(parent: .root, name: "empty", dir())
        let r2 = try m.rename(parent: e.ino, name: "moved", newParent: .root, newName: "empty", flags: [], now: now)
        #expect(r2?.ino == empty.ino && r2?.nlink == 0)
        #expect(try (try m.getattr(.root)).nlink == 4 && (try m.getattr(e.ino)).nlink == 2)
        // exchange swaps
        _ = try m.rename(parent: .root, name: "c", newParent: .root, newName: "b", flags: .exchange, now: now)
        #expect(try (try m.lookup(parent: .root, name: "b")).ino == c.ino && (try m.lookup(parent: .root, name: "c")).ino == a.ino)
        // renaming onto another link of the same inode does nothing
        _ = try m.link(a.ino, parent: .root, name: "a2", now: now)
        #expect(try m.rename(parent: .root, name: "c", newParent: .root, newName: "a2", flags: [], now: now) == nil)
        #expect((try m.getattr(a.ino)).nlink == 2)
        #expect(errno { _ = try m.rename(parent: .root, name: "missing", newParent: .root, newName: "z", flags: [], now: now) } == ENOENT)
    }

    @Test(arguments: EngineKind.allCases) func readdirCookiesAreStable(_ kind: EngineKind) throws {
        let (m, done) = try kind.make(); defer { done() }
        for i in 0..<300 { _ = try m.create(parent: .root, name: "f\(i)", file()) }
        var seen: [String] = []
        var cookie: UInt64 = 0
        var removed = false
        while true {
            let page = try m.readdir(.root, after: cookie, limit: 37)
            if page.isEmpty { break }
            seen += page.map(\.name)
            cookie = page.last!.cookie
            if !removed { // entries removed or added mid-listing do not disturb the rest
                _ = try m.unlink(parent: .root, name: "f0", now: now)
                _ = try m.create(parent: .root, name: "late", file())
                removed = true
            }
        }
        #expect(Set(seen).count == seen.count, "no entry listed twice")
        #expect(Set(seen).isSuperset(of: (1..<300).map { "f\($0)" }))
    }

    @Test(arguments: EngineKind.allCases) func setattrAndCommit(_ kind: EngineKind) throws {
        let (m, done) = try kind.make(); defer { done() }
        let a = try m.create(parent: .root, name: "a", file())
        let t = Timestamp(seconds: 42, nanoseconds: 7)
        let b = try m.setattr(a.ino, AttributeChanges(mode: 0o4600, uid: 5, gid: 6, size: 999, atime: t, mtime: t), now: now)
        #expect(b.mode == 0o4600 && b.uid == 5 && b.gid == 6 && b.atime == t && b.mtime == t && b.size == 0)
        let manifest = Manifest(chunks: [ChunkRef(id: BlockID.hash(Data("x".utf8)), length: 1)])
        let c = try m.commit(a.ino, size: 1, manifest: .inline(manifest), mtime: now)
        #expect(c.size == 1 && c.version == 1)
        #expect(try m.manifest(of: a.ino) == .inline(manifest))
        let big = ManifestRef.block(BlockID.hash(Data("m".utf8)), chunkCount: 5000)
        #expect(try m.commit(a.ino, size: 10, manifest: big, mtime: now).version == 2)
        #expect(try m.manifest(of: a.ino) == big)
        #expect(try m.allManifests().contains(big))
        let st = try m.stats()
        #expect(st.files == 1 && st.logicalBytes == 10 && st.directories == 1)
    }

    @Test(arguments: EngineKind.allCases) func symlinks(_ kind: EngineKind) throws {
        let (m, done) = try kind.make(); defer { done() }
        let s = try m.create(parent: .root, name: "l", NewInode(kind: .symlink, mode: 0o777, uid: 0, gid: 0, now: now, target: "../x/y"))
        #expect(try m.readlink(s.ino) == "../x/y" && s.size == 6)
        let f = try m.create(parent: .root, name: "f", file())
        #expect(errno { _ = try m.readlink(f.ino) } == EINVAL)
    }

    @Test(arguments: EngineKind.allCases) func specialFilesKeepTheirKindAndDevice(_ kind: EngineKind) throws {
        let (m, done) = try kind.make(); defer { done() }
        let dev = UInt32(7 << 8 | 200)   // major 7, minor 200 (the kernel's old encoding)
        let made: [(String, FileKind, UInt32)] = [("p", .fifo, 0), ("s", .socket, 0), ("c", .charDevice, 0x103), ("b", .blockDevice, dev)]
        for (name, k, rdev) in made {
            let a = try m.create(parent: .root, name: name, NewInode(kind: k, mode: 0o640, uid: 7, gid: 8, now: now, rdev: rdev))
            #expect(a.kind == k && a.rdev == rdev && a.nlink == 1 && a.size == 0)
        }
        // A device number given with a kind that has none is not kept.
        let f = try m.create(parent: .root, name: "f", NewInode(kind: .fifo, mode: 0o600, uid: 0, gid: 0, now: now, rdev: 99))
        #expect(f.rdev == 0)
        for (name, k, rdev) in made {
            let a = try m.lookup(parent: .root, name: name)
            #expect(a.kind == k && a.rdev == rdev && a.mode == 0o640 && a.uid == 7 && a.gid == 8, "\(name): \(a)")
            #expect(try m.getattr(a.ino).rdev == rdev)
        }
        let listed = try m.readdir(.root, after: 0, limit: 100)
        #expect(Dictionary(uniqueKeysWithValues: listed.map { ($0.name, $0.kind) })["b"] == .blockDevice)
        #expect(try m.stats().specials == 5 && m.stats().files == 0)
        // They link, rename and unlink like any inode, and the counters follow.
        let c = try m.lookup(parent: .root, name: "c")
        _ = try m.link(c.ino, parent: .root, name: "c2", now: now)
        #expect(try m.lookup(parent: .root, name: "c2").nlink == 2)
        _ = try m.unlink(parent: .root, name: "c", now: now, isOpen: { _ in false })
        _ = try m.unlink(parent: .root, name: "c2", now: now, isOpen: { _ in false })
        #expect(errno { _ = try m.getattr(c.ino) } == ENOENT)
        #expect(try m.stats().specials == 4)
    }

    @Test(arguments: EngineKind.allCases) func xattrs(_ kind: EngineKind) throws {
        let (m, done) = try kind.make(); defer { done() }
        let a = try m.create(parent: .root, name: "a", file())
        #expect(errno { _ = try m.getxattr(a.ino, name: "user.x") } == ENODATA)
        #expect(errno { try m.setxattr(a.ino, name: "user.x", value: Data("1".utf8), mode: .replace) } == ENODATA)
        try m.setxattr(a.ino, name: "user.x", value: Data("1".utf8), mode: .create)
        #expect(errno { try m.setxattr(a.ino, name: "user.x", value: Data("2".utf8), mode: .create) } == EEXIST)
        try m.setxattr(a.ino, name: "user.x", value: Data("2".utf8), mode: .replace)
        try m.setxattr(a.ino, name: "user.a", value: Data(), mode: .any)
        #expect(try m.getxattr(a.ino, name: "user.x") == Data("2".utf8))
        #expect(try m.listxattr(a.ino) == ["user.a", "user.x"])
        try m.removexattr(a.ino, name: "user.x")
        #expect(errno { try m.removexattr(a.ino, name: "user.x") } == ENODATA)
        #expect(try m.listxattr(a.ino) == ["user.a"])
    }

    /// A file's xattrs take at most 64 KiB, names and values together (ENOSPC beyond); a file
    /// with hundreds of them is removed whole (etcd: one range delete, not a delete per key in a
    /// transaction etcd caps at 128 operations).
    @Test(arguments: EngineKind.allCases) func xattrSpaceIsBoundedAndManyGoWithTheFile(_ kind: EngineKind) throws {
        let (m, done) = try kind.make(); defer { done() }
        let a = try m.create(parent: .root, name: "a", file())
        var used = 0, n = 0
        while true {
            let name = "user.var_\(n)", value = Data(String(repeating: "v", count: 100).utf8)
            if let e = errno(of: { try m.setxattr(a.ino, name: name, value: value, mode: .create) }) {
                #expect(e == ENOSPC)
                #expect(used + name.utf8.count + value.count > 64 << 10)
                break
            }
            used += name.utf8.count + value.count
            n += 1
        }
        #expect(n > 500 && used <= 64 << 10)
        // Growing a value past the space is refused; shrinking one, and then growing it back, is not.
        #expect(errno { try m.setxattr(a.ino, name: "user.var_0", value: Data(count: 4096), mode: .replace) } == ENOSPC)
        try m.setxattr(a.ino, name: "user.var_0", value: Data("s".utf8), mode: .replace)
        try m.setxattr(a.ino, name: "user.var_0", value: Data(count: 100), mode: .replace)
        #expect(try m.listxattr(a.ino).count == n)
        // Another file has its own space.
        let b = try m.create(parent: .root, name: "b", file())
        try m.setxattr(b.ino, name: "user.k", value: Data(count: 60 << 10), mode: .create)
        // The last link goes: the inode and every xattr with it.
        _ = try m.unlink(parent: .root, name: "a", now: now, isOpen: { _ in false })
        #expect(errno { _ = try m.getattr(a.ino) } == ENOENT)
        #expect(errno { _ = try m.getxattr(a.ino, name: "user.var_1") } != nil)
    }

    /// An immutable inode (a snapshot's) refuses every change with EPERM, as `chattr +i` does:
    /// content, attributes, xattrs, links, and the entries of an immutable directory. Its flags
    /// alone may change (thawing it), and the flag is stored like any attribute.
    @Test(arguments: EngineKind.allCases) func immutableInodesRefuseEveryChange(_ kind: EngineKind) throws {
        let (m, done) = try kind.make(); defer { done() }
        let d = try m.create(parent: .root, name: "d", NewInode(kind: .directory, mode: 0o755, uid: 0, gid: 0, now: now))
        let f = try m.create(parent: d.ino, name: "f", file())
        try m.setxattr(f.ino, name: "user.k", value: Data("v".utf8), mode: .create)
        let free = try m.create(parent: .root, name: "free", file())
        for ino in [f.ino, d.ino] {
            let a = try m.setattr(ino, AttributeChanges(flags: InodeAttributes.immutableFlag), now: now)
            #expect(a.immutable)
        }
        #expect(try m.getattr(f.ino).immutable && m.lookup(parent: d.ino, name: "f").flags == InodeAttributes.immutableFlag)
        let refused: [() throws -> Void] = [
            { _ = try m.setattr(f.ino, AttributeChanges(mode: 0o600), now: now) },
            { _ = try m.commit(f.ino, size: 1, manifest: .empty, mtime: now) },
            { try m.setxattr(f.ino, name: "user.k2", value: Data(), mode: .any) },
            { try m.removexattr(f.ino, name: "user.k") },
            { _ = try m.create(parent: d.ino, name: "g", file()) },
            { _ = try m.link(f.ino, parent: .root, name: "l", now: now) },
            { _ = try m.unlink(parent: d.ino, name: "f", now: now) },
            { _ = try m.rename(parent: d.ino, name: "f", newParent: .root, newName: "f2", flags: [], now: now) },
            { _ = try m.rename(parent: .root, name: "free", newParent: d.ino, newName: "x", flags: [], now: now) },
            { _ = try m.rename(parent: .root, name: "d", newParent: .root, newName: "d2", flags: [], now: now) },
            { _ = try m.rmdir(parent: .root, name: "d", now: now) },
        ]
        for (i, change) in refused.enumerated() { #expect(errno(of: change) == EPERM, "change \(i)") }
        #expect(try m.getattr(f.ino).mode == 0o644 && m.listxattr(f.ino) == ["user.k"] && m.getattr(free.ino).nlink == 1)
        // setattrs is all or none: the change refused on f undoes the one on free.
        #expect(errno { try m.setattrs([(free.ino, AttributeChanges(mode: 0o600)), (f.ino, AttributeChanges(mode: 0o600))], now: now) } == EPERM)
        #expect(try m.getattr(free.ino).mode == 0o644)
        try m.setattrs([(free.ino, AttributeChanges(mode: 0o600)), (f.ino, AttributeChanges(flags: InodeAttributes.immutableFlag))], now: now)
        #expect(try m.getattr(free.ino).mode == 0o600)
        // Thawed, it changes again.
        for ino in [d.ino, f.ino] { _ = try m.setattr(ino, AttributeChanges(flags: 0), now: now) }
        _ = try m.unlink(parent: d.ino, name: "f", now: now)
        _ = try m.rmdir(parent: .root, name: "d", now: now)
    }

    @Test(arguments: EngineKind.allCases) func failedTransactionChangesNothing(_ kind: EngineKind) throws {
        let (m, done) = try kind.make(); defer { done() }
        let d = try m.create(parent: .root, name: "d", dir())
        _ = try m.create(parent: d.ino, name: "x", file())
        let before = try m.getattr(.root)
        // The rename fails late (non-empty target) after reading several rows: nothing changes.
        _ = try m.create(parent: .root, name: "e", dir())
        #expect(errno { _ = try m.rename(parent: .root, name: "e", newParent: .root, newName: "d", flags: [], now: now) } == ENOTEMPTY)
        #expect((try m.lookup(parent: .root, name: "e")).kind == .directory)
        #expect((try m.getattr(.root)).nlink == before.nlink + 1)
    }

    @Test func sqliteSurvivesReopen() throws {
        let dir = NSTemporaryDirectory() + "modelfs-meta-reopen-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var m: (any MetadataEngine)? = try MetadataURL.open("sqlite:\(dir)/m.db", rootUID: 0, rootGID: 0)
        let a = try m!.create(parent: .root, name: "keep", file())
        try m!.sync()
        m = nil
        let again = try MetadataURL.open("sqlite:\(dir)/m.db", rootUID: 0, rootGID: 0)
        #expect((try again.lookup(parent: .root, name: "keep")).ino == a.ino)
        let b = try again.create(parent: .root, name: "next", file())
        #expect(b.ino != a.ino)
    }

    @Test func aSQLiteDatabaseMadeBeforeDeviceNumbersGetsTheColumn() throws {
        let dir = NSTemporaryDirectory() + "modelfs-meta-rdev-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        do {
            let m = try MetadataURL.open("sqlite:\(dir)/m.db", rootUID: 0, rootGID: 0)
            _ = try m.create(parent: .root, name: "old", file())
            try m.sync()
        }
        do {
            // As a database of an earlier version: no rdev column.
            let store = try SQLiteTransactionalStore(path: "\(dir)/m.db")
            try store.pool.write { try $0.execute(sql: "ALTER TABLE inodes DROP COLUMN rdev") }
        }
        let m = try MetadataURL.open("sqlite:\(dir)/m.db", rootUID: 0, rootGID: 0)
        #expect(try m.lookup(parent: .root, name: "old").rdev == 0)
        let d = try m.create(parent: .root, name: "dev", NewInode(kind: .blockDevice, mode: 0o600, uid: 0, gid: 0, now: now, rdev: 0x0801))
        #expect(try m.getattr(d.ino).rdev == 0x0801)
    }

    @Test func sqliteRowsOfARolledBackTransactionAreNeverSeen() throws {
        // The SQLite store keeps inode rows in memory (InodeRows): what a transaction wrote must
        // reach them only once it committed.
        let dir = NSTemporaryDirectory() + "modelfs-meta-rows-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let ino = InodeNumber(5)
        // The first store is closed before a second one opens the file (exclusive locking).
        let b: InodeNumber = try {
        let store = try SQLiteTransactionalStore(path: dir + "/m.db")
        let rec = InodeRecord(attrs: InodeAttributes(ino: ino, kind: .regular, mode: 0o644, uid: 1, gid: 1, nlink: 1, size: 10,
                                                     atime: now, mtime: now, ctime: now, version: 1))
        try store.write { try $0.putInode(rec) }
        #expect(try store.read { try $0.inode(ino) } == rec)
        struct Boom: Error {}
        var bigger = rec
        bigger.attrs.size = 99
        #expect(throws: Boom.self) {
            try store.write { tx in try tx.putInode(bigger); #expect(try tx.inode(ino) == bigger); throw Boom() }
        }
        #expect(try store.read { try $0.inode(ino) } == rec)
        #expect(throws: Boom.self) {
            try store.write { tx in try tx.deleteInode(ino); #expect(try tx.inode(ino) == nil); throw Boom() }
        }
        #expect(try store.read { try $0.inode(ino) } == rec)
        try store.write { try $0.putInode(bigger) }
        #expect(try store.read { try $0.inode(ino) } == bigger)
        try store.write { try $0.deleteInode(ino) }
        #expect(try store.read { try $0.inode(ino) } == nil)
        // An inode number taken by a transaction that rolled back is not given again.
        let a = try store.write { try $0.allocateInode() }
        let lost = try? store.write { tx -> InodeNumber in _ = try tx.allocateInode(); throw Boom() }
        #expect(lost == nil)
        let b = try store.write { try $0.allocateInode() }
        #expect(b.rawValue == a.rawValue + 2)
        return b
        }()
        // What the database holds is what the memory said: a second store on the file agrees.
        let reopened = try SQLiteTransactionalStore(path: dir + "/m.db")
        #expect(try reopened.read { try $0.inode(ino) } == nil)
        #expect(try reopened.write { try $0.allocateInode() }.rawValue > b.rawValue)
    }

    @Test func sqliteCountersFollowEveryChangeWithoutAScan() throws {
        // statfs and status read counters kept by the committed transactions (InodeRows.counted),
        // counted by one scan the first time: after every kind of change they equal a new scan.
        let tmp = NSTemporaryDirectory() + "modelfs-meta-counters-\(getpid())"
        try FileManager.default.createDirectory(atPath: tmp, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: tmp) }
        let store = try SQLiteTransactionalStore(path: tmp + "/m.db")
        let m = try KVMetadataEngine(store: store, rootUID: 0, rootGID: 0)
        func scanned() throws -> MetadataStats { try store.read { try ($0 as! SQLiteTransaction).scannedStats() } }
        let before = try m.create(parent: .root, name: "before", file())
        _ = try m.commit(before.ino, size: 77, manifest: .inline(Manifest(chunks: [])), mtime: now)
        #expect(try m.stats() == scanned())   // the first call counts by a scan
        let d = try m.create(parent: .root, name: "d", dir())
        var files: [InodeNumber] = []
        for i in 0..<30 {
            let f = try m.create(parent: d.ino, name: "f\(i)", file())
            _ = try m.commit(f.ino, size: UInt64(1000 * i + 1), manifest: .inline(Manifest(chunks: [])), mtime: now)
            files.append(f.ino)
        }
        _ = try m.create(parent: .root, name: "l", NewInode(kind: .symlink, mode: 0o777, uid: 0, gid: 0, now: now, target: "d/f1"))
        _ = try m.create(parent: .root, name: "p", NewInode(kind: .fifo, mode: 0o644, uid: 0, gid: 0, now: now))
        _ = try m.link(files[2], parent: .root, name: "hard", now: now)
        _ = try m.setattr(files[3], AttributeChanges(size: 5), now: now)
        _ = try m.rename(parent: d.ino, name: "f4", newParent: d.ino, newName: "f5", flags: [], now: now, isOpen: { _ in false })
        _ = try m.unlink(parent: d.ino, name: "f2", now: now, isOpen: { _ in false })   // still linked as /hard
        _ = try m.unlink(parent: d.ino, name: "f6", now: now, isOpen: { _ in true })    // an orphan until deleted
        #expect(try m.stats() == scanned())
        try m.deleteInode(files[6])
        let sub = try m.create(parent: d.ino, name: "sub", dir())
        _ = try m.rmdir(parent: d.ino, name: "sub", now: now)
        try m.deleteInode(sub.ino)
        // A transaction that rolls back changes nothing.
        struct Boom: Error {}
        _ = try? store.write { tx -> Void in try tx.deleteInode(files[7]); throw Boom() }
        let want = try scanned()
        #expect(want.files == 1 + 30 - 2 && want.directories == 2 && want.symlinks == 1 && want.specials == 1)
        #expect(try m.stats() == want)
    }

    @Test func sqliteInodeNumbersAreNeverGivenTwiceAcrossRestartsAndRollbacks() throws {
        // The store keeps `next_inode` as a bound reserved InodeRows.reservation at a time.
        let dir = NSTemporaryDirectory() + "modelfs-meta-bound-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/m.db"
        func stored(_ store: SQLiteTransactionalStore) throws -> Int64 {
            try store.pool.read { try Int64.fetchOne($0, sql: "SELECT value FROM settings WHERE key = 'next_inode'")! }
        }
        struct Boom: Error {}
        var given = Set<UInt64>()
        let n = Int(InodeRows.reservation)
        let last: UInt64 = try {
            let store = try SQLiteTransactionalStore(path: path)
            var first: UInt64?
            for _ in 0..<(n + 10) {
                let ino = try store.write { try $0.allocateInode() }.rawValue
                #expect(given.insert(ino).inserted)
                first = first ?? ino
            }
            // One write of the bound per reservation, not one per number: the second one now.
            #expect(try stored(store) == Int64(first!) + 2 * Int64(n))
            // A transaction that moves the bound and rolls back: the bound it stored is gone,
            // so the next allocation stores one again.
            let before = try stored(store)
            var taken: UInt64 = 0
            while taken < UInt64(before) - 1 {
                taken = try store.write { try $0.allocateInode() }.rawValue
                #expect(given.insert(taken).inserted)
            }
            #expect(throws: Boom.self) { try store.write { tx -> Void in _ = try tx.allocateInode(); throw Boom() } }
            #expect(try stored(store) == before)
            let after = try store.write { try $0.allocateInode() }.rawValue
            #expect(given.insert(after).inserted)
            #expect(try stored(store) > Int64(after))
            return after
        }()
        // A restart continues above everything given out (the rest of the reservation is skipped).
        let reopened = try SQLiteTransactionalStore(path: path)
        for _ in 0..<3 {
            let ino = try reopened.write { try $0.allocateInode() }.rawValue
            #expect(ino > last)
            #expect(given.insert(ino).inserted)
        }
    }

    @Test func unknownSchemeIsAClearError() {
        let e = #expect(throws: FSError.self) { _ = try MetadataURL.open("foo:bar", rootUID: 0, rootGID: 0) }
        #expect(e?.message.contains("unknown --meta scheme") == true)
    }
}
