import Foundation
import Synchronization
import ModelFSTestSupport
import Testing
@testable import ModelFSCore
@testable import ModelFSMeta

/// What the etcd engine must do beyond the conformance suite: several nodes (engines) on one
/// namespace, racing; a member lost; a cluster that is not there.
@Suite struct EtcdEngineTests {
    func twoNodes() throws -> (any MetadataEngine, any MetadataEngine) {
        let url = try EtcdTestCluster.shared.get().metaURL("nodes-\(UInt64.random(in: 0...UInt64.max))")
        return (try MetadataURL.open(url, rootUID: 0, rootGID: 0), try MetadataURL.open(url, rootUID: 0, rootGID: 0))
    }

    @Test func nodesShareOneNamespace() throws {
        let (a, b) = try twoNodes()
        let d = try a.create(parent: .root, name: "ckpt", dir())
        let f = try a.create(parent: d.ino, name: "step-1.pt", file())
        #expect(try b.lookup(parent: d.ino, name: "step-1.pt").ino == f.ino)
        _ = try b.rename(parent: d.ino, name: "step-1.pt", newParent: .root, newName: "moved.pt", flags: [], now: now)
        #expect(errno { _ = try a.lookup(parent: d.ino, name: "step-1.pt") } == ENOENT)
        #expect(try a.lookup(parent: .root, name: "moved.pt").ino == f.ino)
        // Inode numbers reserved by different nodes never collide.
        let g = try b.create(parent: .root, name: "g", file())
        #expect(g.ino != f.ino && g.ino != d.ino)
    }

    /// Creates of one name race from two nodes: exactly one wins, the other sees EEXIST.
    @Test func createExclusiveAcrossNodes() throws {
        let (a, b) = try twoNodes()
        for round in 0..<20 {
            let name = "race-\(round)"
            let results = Mutex<[Int32?]>([])
            DispatchQueue.concurrentPerform(iterations: 2) { i in
                let m = i == 0 ? a : b
                let e = errno { _ = try m.create(parent: .root, name: name, file()) }
                results.withLock { $0.append(e) }
            }
            let r = results.withLock { $0 }
            #expect(r.filter { $0 == nil }.count == 1 && r.filter { $0 == EEXIST }.count == 1, "round \(round): \(r)")
        }
    }

    /// Many concurrent creates from two nodes into one directory: every optimistic conflict is
    /// retried, none is lost, and the directory's link count adds up.
    @Test func concurrentCreatesAllLand() throws {
        let (a, b) = try twoNodes()
        let d = try a.create(parent: .root, name: "d", dir())
        let failures = Mutex(0)
        DispatchQueue.concurrentPerform(iterations: 8) { worker in
            let m = worker % 2 == 0 ? a : b
            for i in 0..<10 {
                do { _ = try m.create(parent: d.ino, name: "w\(worker)-\(i)", dir()) } catch { failures.withLock { $0 += 1 } }
            }
        }
        #expect(failures.withLock { $0 } == 0)
        #expect(try a.readdir(d.ino, after: 0, limit: 1000).count == 80)
        #expect(try b.getattr(d.ino).nlink == 2 + 80)
    }

    /// Two nodes each move a file between two directories in opposite directions, over and over:
    /// afterwards every file is in exactly one place (renames are atomic transactions).
    @Test func concurrentRenamesStayAtomic() throws {
        let (a, b) = try twoNodes()
        let x = try a.create(parent: .root, name: "x", dir())
        let y = try a.create(parent: .root, name: "y", dir())
        for i in 0..<6 { _ = try a.create(parent: x.ino, name: "f\(i)", file()) }
        DispatchQueue.concurrentPerform(iterations: 2) { w in
            let m = w == 0 ? a : b
            for round in 0..<10 {
                for i in 0..<6 {
                    let (from, to) = (round + w) % 2 == 0 ? (x.ino, y.ino) : (y.ino, x.ino)
                    _ = try? m.rename(parent: from, name: "f\(i)", newParent: to, newName: "f\(i)", flags: .noReplace, now: now)
                }
            }
        }
        let names = try (a.readdir(x.ino, after: 0, limit: 100) + a.readdir(y.ino, after: 0, limit: 100)).map(\.name).sorted()
        #expect(names == (0..<6).map { "f\($0)" }.sorted())
        #expect(try a.getattr(x.ino).nlink == 2 && a.getattr(y.ino).nlink == 2)
    }

    /// etcd answers a commit "503, outcome unknown" (leader loss mid-write): the engine reads its
    /// commit marker back and learns the truth. Applied before the 503: the create returns once,
    /// not "exists" from a retry; not applied: it runs again and succeeds. Through a proxy that
    /// forges the 503 in front of a real member.
    @Test func aCommitWhoseOutcomeIsUnknownIsResolvedByItsMarker() throws {
        let etcd = try EtcdTestCluster.shared.get()
        let proxy = try FaultyTransport(to: etcd.members[0].clientPort)
        defer { proxy.stop() }
        let m = try MetadataURL.open("etcd://\(proxy.address)/maybe-\(UInt64.random(in: 0...UInt64.max))", rootUID: 0, rootGID: 0)
        _ = try m.create(parent: .root, name: "first", file())   // inode numbers reserved: the next create is one commit
        for (name, forward) in [("applied-then-503", true), ("503-not-applied", false)] {
            let before = proxy.faked.load(ordering: .relaxed)
            proxy.fault = .unavailable(marker: "/v3/kv/txn", forward: forward)
            let made = try m.create(parent: .root, name: name, file())
            #expect(proxy.faked.load(ordering: .relaxed) == before + 1, "\(name): the commit met the fault")
            #expect(try m.lookup(parent: .root, name: name).ino == made.ino, "\(name)")
            #expect(try m.readdir(.root, after: 0, limit: 100).filter { $0.name == name }.count == 1, "\(name)")
        }
    }

    /// A node's orphans (files unlinked while it held them open) are its own: another node sees
    /// them by owner and can delete them once that node is removed for good.
    @Test func orphansAreFoundByTheirOwner() throws {
        let url = try EtcdTestCluster.shared.get().metaURL("orphans-\(UInt64.random(in: 0...UInt64.max))")
        let a = try MetadataURL.open(url, rootUID: 0, rootGID: 0, clientID: "node-a")
        let b = try MetadataURL.open(url, rootUID: 0, rootGID: 0, clientID: "node-b")
        let f = try a.create(parent: .root, name: "open-then-deleted", file())
        #expect(try a.unlink(parent: .root, name: "open-then-deleted", now: now).nlink == 0)
        #expect(try a.orphans() == [f.ino])
        #expect(try b.orphans().isEmpty, "another node's orphan is not this node's to delete at its start")
        #expect(try b.orphans(of: "node-a") == [f.ino])
        #expect(try b.orphans(of: "node-c").isEmpty)
        try b.deleteInode(f.ino)
        #expect(try a.orphans().isEmpty && b.orphans(of: "node-a").isEmpty)
    }

    /// One of three members killed: reads and writes carry on (leader re-election included).
    @Test func survivesLossOfOneMember() throws {
        let cluster = try EtcdTestCluster(members: 3)
        defer { cluster.stop() }
        let m = try MetadataURL.open(cluster.metaURL("loss"), rootUID: 0, rootGID: 0)
        let before = try m.create(parent: .root, name: "before", file())
        // Kill the member the client talks to first: the client must move on to the others.
        cluster.kill(0)
        let after = try m.create(parent: .root, name: "after", file())
        #expect(try m.lookup(parent: .root, name: "before").ino == before.ino)
        #expect(try m.lookup(parent: .root, name: "after").ino == after.ino)
        cluster.kill(1)   // no quorum left: a clear error, not a hang forever
        let e = #expect(throws: MetaError.self) { _ = try m.create(parent: .root, name: "no-quorum", file()) }
        #expect(e?.kind == .unavailable)
        #expect(e?.cause is EtcdError)
        #expect(e?.message.contains("etcd") == true)
    }

    /// A commit carries the writer's fence: refused once another node took the write lock (or
    /// took it after this node's lapsed), allowed while the lock is the one taken at the epoch,
    /// and allowed after a lapse nobody used (the file is still at the writer's base version).
    @Test func commitsAreFencedByTheWriteLock() throws {
        let name = "fence-\(UInt64.random(in: 0...UInt64.max))"
        let url = try EtcdTestCluster.shared.get().metaURL(name)
        let a = try MetadataURL.open(url, rootUID: 0, rootGID: 0)
        let b = try MetadataURL.open(url, rootUID: 0, rootGID: 0)
        let client = try #require((a as? KVMetadataEngine<EtcdTransactionalStore>)?.store.client)
        let f = try a.create(parent: .root, name: "f", file())
        let lock = Data("/modelfs/\(name)/w/\(EtcdTransactionalStore.hex(f.ino))".utf8)
        func take(_ node: String) throws -> Int64 {
            let r = try client.txn(compare: [.absent(lock)], success: [.put(lock, Data(node.utf8))])
            #expect(r.succeeded)
            return r.revision
        }
        let m = ManifestRef.inline(Manifest(chunks: []))
        let epochA = try take("a")
        var fenceA = CommitFence(epoch: epochA, baseVersion: f.version)
        fenceA.baseVersion = try a.commit(f.ino, size: 0, manifest: m, mtime: now, fence: fenceA).version

        // A's lock lapses (its lease expired), B takes the file and commits: A is fenced.
        try client.delete(lock)
        let fenceB = CommitFence(epoch: try take("b"), baseVersion: fenceA.baseVersion)
        let v = try b.commit(f.ino, size: 1, manifest: m, mtime: now, fence: fenceB).version
        let e = #expect(throws: MetaError.self) { _ = try a.commit(f.ino, size: 2, manifest: m, mtime: now, fence: fenceA) }
        #expect(e?.kind == .fenced)
        #expect(e?.message.hasPrefix("fenced") == true)
        #expect(e?.message.contains("node b's") == true)
        #expect(try a.getattr(f.ino).size == 1 && a.getattr(f.ino).version == v)

        // B's lock lapses and nobody takes it: B (still at its base version) may commit; A,
        // whose base is older, may not.
        try client.delete(lock)
        var fenceB2 = fenceB
        fenceB2.baseVersion = v
        #expect(try b.commit(f.ino, size: 3, manifest: m, mtime: now, fence: fenceB2).size == 3)
        let e2 = #expect(throws: MetaError.self) { _ = try a.commit(f.ino, size: 4, manifest: m, mtime: now, fence: fenceA) }
        #expect(e2?.kind == .fenced)
        #expect(e2?.message.contains("lapsed") == true)
        // Without a fence (one node, or a truncate by path) nothing is checked.
        #expect(try a.commit(f.ino, size: 5, manifest: m, mtime: now).size == 5)
    }

    /// statfs and status read counters kept by every change (`n/stats/`), not a scan of every
    /// inode: after creates, commits, links, renames over files, rmdirs, unlinks of open and
    /// closed files and the deletion of an orphan, from two nodes, the counters say what a scan
    /// says; and a node's orphans come from the orphan index, its own only.
    @Test func countersAndTheOrphanIndexMatchAScan() throws {
        let (a, b) = try twoNodes()
        func scanned() throws -> MetadataStats {
            try (a as! KVMetadataEngine<EtcdTransactionalStore>).store.read { tx in try (tx as! EtcdTransaction).scannedStats() }
        }
        var rng = SystemRandomNumberGenerator()
        let d = try a.create(parent: .root, name: "d", dir())
        var files: [(InodeNumber, String)] = []
        for i in 0..<40 {
            let m = i % 2 == 0 ? a : b
            let f = try m.create(parent: d.ino, name: "f\(i)", file())
            let chunk = ChunkRef(id: BlockID.hash(Data("\(i)".utf8)), length: 100)
            _ = try m.commit(f.ino, size: UInt64.random(in: 1...1_000_000, using: &rng), manifest: .inline(Manifest(chunks: [chunk])), mtime: now)
            files.append((f.ino, "f\(i)"))
        }
        let sub = try b.create(parent: d.ino, name: "sub", dir())
        _ = try a.create(parent: .root, name: "l", NewInode(kind: .symlink, mode: 0o777, uid: 0, gid: 0, now: now, target: "d/f1"))
        _ = try b.link(files[2].0, parent: .root, name: "hard", now: now)
        _ = try a.rename(parent: d.ino, name: "f3", newParent: d.ino, newName: "f4", flags: [], now: now, isOpen: { _ in false })
        _ = try b.unlink(parent: d.ino, name: "f5", now: now, isOpen: { _ in false })
        _ = try a.unlink(parent: d.ino, name: "f2", now: now, isOpen: { _ in false })   // still linked as /hard
        _ = try b.rmdir(parent: d.ino, name: "sub", now: now)
        // Open on A while unlinked there: an orphan of A's, not B's, until A deletes it. B's is
        // the directory it removed.
        _ = try a.unlink(parent: d.ino, name: "f6", now: now, isOpen: { _ in true })
        #expect(try a.orphans() == [files[6].0])
        #expect(try b.orphans() == [sub.ino])   // a removed directory waits for the kernel to forget it
        func flush() {
            for m in [a, b] { (m as! KVMetadataEngine<EtcdTransactionalStore>).store.flushCounters() }
        }
        flush()
        #expect(try a.stats() == scanned())
        try a.deleteInode(files[6].0)
        try b.deleteInode(sub.ino)
        #expect(try a.orphans() == [] && b.orphans() == [])
        // A's last change is not flushed yet: its own count has it already; B's has it once flushed.
        let want = try scanned()
        #expect(want.files == 40 - 3 && want.directories == 2 && want.symlinks == 1)
        #expect(try a.stats() == want)
        flush()
        #expect(try a.stats() == want)
        #expect(try b.stats() == want)
    }

    @Test func unreachableClusterIsAClearError() {
        let port = freeLoopbackPort()
        let e = #expect(throws: MetaError.self) { _ = try MetadataURL.open("etcd://127.0.0.1:\(port)", rootUID: 0, rootGID: 0) }
        #expect(e?.kind == .unavailable)
        #expect(e?.message.contains("cannot reach etcd at 127.0.0.1:\(port)") == true)
        #expect(e?.message.contains("start the etcd cluster") == true)
    }

    @Test func malformedURLsAreClearErrors() {
        for bad in ["etcd://", "etcd://hostwithoutport", "etcd://h:1/bad name"] {
            let e = #expect(throws: FSError.self) { _ = try MetadataURL.open(bad, rootUID: 0, rootGID: 0) }
            #expect(e?.errno == EINVAL, "\(bad)")
        }
    }
}

@Suite struct EtcdKeysTests {
    /// A range over one prefix must never return another component's keys: no key of the
    /// layout starts with a prefix of the layout unless it is declared nested in it, and no two
    /// keys are the same.
    @Test func noPrefixShadowsAnotherKey() {
        let layout = EtcdKeys.layout
        #expect(Set(layout.map(\.key)).count == layout.count)
        for p in layout where p.prefix {
            #expect(p.key.hasSuffix("/"), "\(p.key) is ranged over, so it ends with a slash")
            for k in layout where k.key != p.key && k.key.hasPrefix(p.key) {
                #expect(k.within == p.key, "\(k.key) falls under the prefix \(p.key)")
            }
        }
        for k in layout where !k.prefix { #expect(!k.key.hasSuffix("/"), "\(k.key) is one key") }
    }

    /// The accessors are the layout's keys, below the cluster's root; per-item keys sit under
    /// their prefix and sort by inode number.
    @Test func accessorsSpellTheLayout() {
        let k = EtcdKeys(cluster: "c1")
        func rel(_ d: Data) -> String { String(decoding: d.dropFirst(k.root.count), as: UTF8.self) }
        #expect(String(decoding: k.root, as: UTF8.self) == "/modelfs/c1/")
        let named = [k.inodes, k.entries, k.manifests, k.xattrs, k.orphans, k.markers, k.writers, k.nextInode, k.stats,
                     k.statsBase, k.healer, k.healStatus, k.clusterID, k.nodes, k.members, k.drain, k.loaders, k.holds,
                     k.gcScanner, k.gcAsks, k.gcAnswers].map(rel)
        #expect(named.sorted() == EtcdKeys.layout.map(\.key).sorted())
        #expect(rel(k.inode(InodeNumber(0x2a))) == "i/000000000000002a")
        #expect(rel(k.entries(of: InodeNumber(1))) == "e/0000000000000001/")
        #expect(rel(k.marker(of: "n1", slot: 3)) == "t/n1/3")
        #expect(rel(k.gcAsk("n1")) == "g/ask/n1" && rel(k.gcAnswer("n1")) == "g/answer/n1")
        #expect(rel(k.node("h1")) == "nodes/h1" && rel(k.member("h1")) == "members/h1" && rel(k.drain("h1")) == "drain/h1")
        let file = FileVersion(ino: InodeNumber(0xa3), version: 7, size: 1)
        #expect(rel(k.loader(of: file, node: "h1")) == "f/00000000000000a3.7/h1")
        #expect(rel(k.hold(InodeNumber(0xa3), node: "h1")) == "h/00000000000000a3/h1")
        #expect(k.heldInode(k.hold(InodeNumber(0xa3), node: "h1")) == InodeNumber(0xa3))
        #expect(k.heldInode(k.loader(of: file, node: "h1")) == nil && k.heldInode(k.holds + Data("zz/h1".utf8)) == nil)
        #expect(FileVersion(text: file.text) == file && FileVersion(text: "a3.7") == nil && FileVersion(text: "00000000000000a3.x") == nil)
        #expect(k.inode(InodeNumber(9)).lexicographicallyPrecedes(k.inode(InodeNumber(10))))
        #expect(!k.root.starts(with: EtcdKeys(cluster: "c").root), "cluster c's keys do not take in cluster c1's")
    }
}
