import Foundation
import ModelFSCore
import ModelFSStore
import Synchronization

/// Removes blocks that no file references any more (after deletes, overwrites and failed
/// writes), by mark and sweep:
/// 1. note the time T, then take every referenced block (files open for writing, then committed
///    manifests) under the filesystem's commit lock;
/// 2. drop each unreferenced block last touched before T minus a margin, then compact packs
///    that are mostly dead (PackBlockStore.compact) so the space returns to the disk.
/// A block written after T, or found already stored by a writer after T (the store touches it
/// under the lock it removes under), is never removed; a block that a commit is about to
/// reference was written while the commit lock was held, so it is either in the snapshot or newer
/// than T.
public final class GarbageCollector: @unchecked Sendable {
    let fs: FileSystem
    let store: PackBlockStore
    let interval: Double
    private let queue = DispatchQueue(label: "modelfs.gc", qos: .utility)
    private var timer: (any DispatchSourceTimer)?
    private let pending = Mutex(false)

    /// Blocks touched within this many seconds before a pass are kept whether referenced or not.
    /// One node: 1 s (every writer is in this process, under the commit lock). A cluster node:
    /// 15 minutes, because the references to its copies are made by other nodes: a copy pushed
    /// while its file is still being written elsewhere, or confirmed by a `has` just before that
    /// node's commit, is not referenced yet (`has` touches the blocks it confirms).
    let grace: Double

    /// Other stores swept with the same marks (a cluster node's read cache).
    let others: [PackBlockStore]

    public init(fs: FileSystem, store: PackBlockStore, others: [PackBlockStore] = [], interval: Double = 60, grace: Double = 1) {
        self.fs = fs
        self.store = store
        self.others = others
        self.interval = interval
        self.grace = grace
    }

    public func start() {
        fs.onGarbage = { [weak self] in self?.requestSoon() }
        let t = DispatchSource.makeTimerSource(queue: queue)
        t.schedule(deadline: .now() + interval, repeating: interval)
        t.setEventHandler { [weak self] in _ = try? self?.collect() }
        t.resume()
        timer = t
    }

    /// Stops the timer. A pass asked for by a failed write runs now instead of 1.5 s later, so
    /// that a remount right after an ENOSPC finds the space back (its preflight refused a data
    /// dir with under 16 MiB free). With `idle` (one node, the FUSE loop ended: no write is under
    /// way, every session committed or failed) it keeps no grace period: the failed write's
    /// blocks were stored a moment ago, and no writer is left that could still reference them.
    public func stop(idle: Bool) {
        timer?.cancel(); timer = nil
        guard takePending() else { return }
        queue.sync { _ = try? collect(cutoff: idle ? .now() : nil) }
    }

    /// Runs a pass shortly (coalescing bursts of requests).
    public func requestSoon() {
        let already = pending.withLock { p -> Bool in defer { p = true }; return p }
        if already { return }
        queue.asyncAfter(deadline: .now() + 1.5) { [weak self] in
            guard let self, self.takePending() else { return }   // `stop` ran it already
            _ = try? self.collect()
        }
    }

    /// Whether a pass was asked for and has not run; it counts as run from here on.
    private func takePending() -> Bool { pending.withLock { p in defer { p = false }; return p } }

    /// One pass; returns the blocks and bytes removed. `cutoff` (tests, and `stop` when idle)
    /// replaces "`grace` seconds before the pass started".
    @discardableResult
    public func collect(cutoff: Timestamp? = nil) throws -> (blocks: UInt64, bytes: UInt64) {
        let cutoff = cutoff ?? Timestamp(totalNanoseconds: Timestamp.now().totalNanoseconds - Int64(grace * 1e9))
        let started = DispatchTime.now()
        let referenced = try fs.referencedBlocks()
        var blocks: UInt64 = 0, bytes: UInt64 = 0
        for s in [store] + others {
            var removed = false
            for (id, touched) in s.listBlocks() where touched < cutoff && !referenced.contains(id) {
                let freed = s.removeIfStale(id, cutoff: cutoff)
                if freed > 0 { blocks += 1; bytes += freed; removed = true }
            }
            if removed { try s.reclaim() }
        }
        if blocks > 0 {
            let seconds = Double(DispatchTime.now().uptimeNanoseconds - started.uptimeNanoseconds) / 1e9
            Log.info("garbage collection removed \(blocks) blocks (\(bytes) bytes) in \(String(format: "%.2f", seconds)) s")
        }
        return (blocks, bytes)
    }
}
