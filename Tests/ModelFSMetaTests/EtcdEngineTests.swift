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
        let e = #expect(throws: FSError.self) { _ = try m.create(parent: .root, name: "no-quorum", file()) }
        #expect(e?.errno == EIO)
        #expect(e?.message.contains("etcd") == true)
    }

    @Test func unreachableClusterIsAClearError() {
        let port = freeLoopbackPort()
        let e = #expect(throws: FSError.self) { _ = try MetadataURL.open("etcd://127.0.0.1:\(port)", rootUID: 0, rootGID: 0) }
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
