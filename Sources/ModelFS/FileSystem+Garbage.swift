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
    func changed() { changes.add(1, ordering: .relaxed) }

    /// Blocks may have become garbage (a failed or abandoned write): the collector hears of it.
    func garbageHint() { events.garbageMayExist() }
}
