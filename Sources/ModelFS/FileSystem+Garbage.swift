import Foundation
import ModelFSCore
import ModelFSMeta
import ModelFSStore
import Synchronization

// What garbage collection asks of the filesystem: the blocks open sessions and committed
// versions reference, and the count of changes that can leave blocks unreferenced.

extension FileSystem {
    /// The blocks every open session references, each read under its session's lock if that
    /// is free; the first session whose lock is held stops the look and is returned as `busy`.
    private func openSessionBlocks() -> (blocks: Set<BlockID>, busy: WriteSession?) {
        var out = Set<BlockID>()
        for s in withTables({ t in t.live.values.compactMap(\.session) }) {
            guard s.lock.try() else { return (out, s) }
            out.formUnion(s.referencedBlocks)
            s.lock.unlock()
        }
        return (out, nil)
    }

    /// The blocks every open write session references, taken under the commit lock with no
    /// session mid-commit (see GarbageCollector for why this, then the manifests read without
    /// the lock, marks every block a file references).
    public func sessionBlocks() -> Set<BlockID> {
        commitLock.lock(); defer { commitLock.unlock() }
        // A session commits with its own lock held and then takes the commit lock, so its lock
        // is only tried here: waiting for it with the commit lock held deadlocked a flush
        // against a collection pass. A busy session is waited for with the commit lock let go,
        // and the look at the sessions starts again.
        while true {
            let (blocks, busy) = openSessionBlocks()
            guard let busy else { return blocks }
            commitLock.unlock()
            busy.lock.lock(); busy.lock.unlock()
            commitLock.lock()
        }
    }

    /// The blocks a committed version references: its chunks, and the manifest's own block when
    /// the manifest is stored as one.
    public func blocks(of ref: ManifestRef) throws -> [BlockID] {
        switch ref {
        case .inline(let m): return m.chunks.map(\.id)
        case .block(let id, _): return [id] + (try Manifest(decoding: reader.block(id).data).chunks.map(\.id))
        }
    }

    /// Which of `wanted` the committed manifests reference, read a page (`page` manifests, each
    /// page its own read of the metadata engine) at a time, stopping once every one is found:
    /// at most `rate` manifests a second (0: no limit), and after a page that took t a pause of
    /// `pause` × t, so a busy metadata store slows the scan instead of the scan slowing
    /// everyone. A paced scan also yields to writers: while the namespace changed within the
    /// last `quiet` (a commit, a create, a delete, here or on another node), the next page waits,
    /// up to `yieldAtMost` seconds after the last one, and `scanYieldBudget` seconds over the
    /// whole scan (writers that never stop, creating files faster than one page per wait, would
    /// otherwise keep it from ever reaching the last page). `stop` ends it early by throwing. Garbage
    /// collection's mark phase, on this node or, for the whole cluster, on the node that scans
    /// for the others (`ReferenceScanner`).
    public func scanReferences(_ wanted: Set<BlockID>, rate: UInt64, pause: Double, page: Int = 1000,
                               yieldAtMost: Double = FileSystem.scanYield,
                               stop: () -> Bool = { false }) throws -> (referenced: Set<BlockID>, manifests: Int, yielded: Double) {
        var left = wanted, found = Set<BlockID>(), read = 0
        let pacer = Pacer(rate: rate)
        var after = InodeNumber(0)
        var yielded: UInt64 = 0
        var lastPage: UInt64?
        func stopped() -> FSError { FSError.io("the scan of the manifests was stopped") }
        while !left.isEmpty {
            if stop() { throw stopped() }
            if pause > 0, let last = lastPage, yielded < UInt64(Self.scanYieldBudget * 1e9) {
                let began = RecentActivity.now()
                var now = began
                while now - last < UInt64(yieldAtMost * 1e9), namespaceActivity.busy(at: now) {
                    if stop() { throw stopped() }
                    usleep(20_000)
                    now = RecentActivity.now()
                }
                yielded += now - began
            }
            let asked = DispatchTime.now()
            let manifests = try meta.manifests(after: after, limit: page)
            if pause > 0 {
                let took = Double(DispatchTime.now().uptimeNanoseconds - asked.uptimeNanoseconds) / 1e9
                usleep(UInt32(min(2.0, pause * took) * 1e6))
            }
            for (_, ref) in manifests {
                for id in try blocks(of: ref) where left.remove(id) != nil { found.insert(id) }
            }
            read += manifests.count
            lastPage = RecentActivity.now()
            guard manifests.count == page, let last = manifests.last else { break }
            after = last.0
            pacer.spent(UInt64(manifests.count))
        }
        return (found, read, Double(yielded) / 1e9)
    }

    /// Seconds a paced scan of the manifests waits at most between two pages while writers are
    /// active (`scanReferences`), and over a whole scan; what counts as active: a namespace
    /// change within `scanQuiet` (nanoseconds).
    public static let scanYield = 5.0
    public static let scanYieldBudget = 300.0
    static let scanQuiet: UInt64 = 250_000_000

    /// A namespace change: this node's (`changed`), or another node's seen in the watch.
    public func noteNamespaceChange() { namespaceActivity.note() }

    /// Every block that a file references, committed or open for writing (tests; garbage
    /// collection pages through the manifests itself).
    public func referencedBlocks() throws -> Set<BlockID> {
        var out = sessionBlocks()
        for ref in try meta.allManifests() { out.formUnion(try blocks(of: ref)) }
        return out
    }

    /// Bumped by every change that can leave blocks unreferenced: a commit (the version it
    /// replaces), a link removed (the inode may go with it), an unlinked inode deleted. Garbage
    /// collection runs a pass only after one (or after its full interval).
    public var contentChanges: UInt64 { changes.load(ordering: .relaxed) }
    func changed() {
        changes.add(1, ordering: .relaxed)
        noteNamespaceChange()
    }

    /// Blocks may have become garbage (a failed or abandoned write): the collector hears of it.
    func garbageHint() { events.garbageMayExist() }
}
