import Foundation
import GRDB
import ModelFS
import ModelFSCore
import ModelFSWire
import ModelFSMeta
import ModelFSStore
import Synchronization

// Eager replication: each block a write session stores is sent to its other holders at once
// (on `modelfs-eager` threads), so at close() little is left to send.

extension Replicator {
    static let writeBackWidth = 4
    /// Blocks waiting or being sent at most: beyond, a K>1 writer waits, a K=1 writer leaves the
    /// block to its job (write-back never slows the writer for the network).
    static let eagerLimit = 64
    /// Bytes of just-written blocks kept in memory for their eager copies, at most (blocks beyond
    /// are sent from their pack, which reads them back from disk: the write pipeline stores
    /// blocks with O_DIRECT, so they are not in the page cache).
    static let heldLimit = 32 << 20

    public func sessionStore(_ store: any BlockStore, ino: InodeNumber, parent: InodeNumber?) -> any BlockStore {
        let p = policy(for: parent)
        guard p.replicas > 1 else { return store }
        return EagerStore(inner: store) { [weak self] id, buffer, length in self?.eager(id, policy: p, buffer: buffer, length: length) }
    }

    /// Starts copying a block this node just stored to its other holders: from `buffer` (its
    /// bytes, [0, length)) while at most `heldLimit` bytes are held so, else from its pack.
    func eager(_ id: BlockID, policy: ReplicationPolicy, buffer: BlockBuffer?, length: Int) {
        let me = membership.me
        let targets = Placement.targets(id, nodes: membership.placementNodes, replicas: policy.replicas, writer: me.id, spreadLabel: policy.spread)
            .filter { $0.id != me.id }
        guard !targets.isEmpty else { return }
        while true {
            let admitted = eagerState.withLock { s -> Bool in
                guard s.queued < Self.eagerLimit else { return false }
                s.queued += 1
                s.inflight[id, default: 0] += 1
                return true
            }
            if admitted { break }
            if policy.ack <= 1 || loop.isStopped { return }
            changed.lock(); _ = changed.wait(until: Date().addingTimeInterval(0.05)); changed.unlock()
        }
        // Write-back (K = 1) copies go on `writeBackWidth` threads, leaving the CPU to the
        // writer; a writer that waits for its copies anyway (K > 1) gets them on `width`.
        let workers = policy.ack <= 1 ? writeBackWorkers : eagerWorkers
        let held = buffer.flatMap { b in
            heldBytes.withLock { h -> BlockBuffer? in
                guard h + length <= Self.heldLimit else { return nil }
                h += length
                return b
            }
        }
        workers.async { [self] in
            let block = held.map { OutgoingBlock(id, in: $0, length: length, store: local) } ?? OutgoingBlock(id, from: local)
            let sent = send(block, to: targets, durable: false).sent
            if held != nil { heldBytes.withLock { $0 -= length } }
            eagerState.withLock { s in
                s.queued -= 1
                s.inflight[id]! -= 1
                if s.inflight[id] == 0 { s.inflight[id] = nil }
            }
            state.withLock { $0.replicatedBytes += sent }
            changed.lock(); changed.broadcast(); changed.unlock()
        }
    }

    /// Waits until no eager copy of these blocks is under way (so a pass does not send them twice).
    func waitForEager(_ blocks: [BlockID], until deadline: Date) {
        while Date() < deadline {
            let busy = eagerState.withLock { s in !s.inflight.isEmpty && blocks.contains { s.inflight[$0] != nil } }
            if !busy { return }
            changed.lock(); _ = changed.wait(until: min(deadline, Date().addingTimeInterval(0.05))); changed.unlock()
        }
    }
}

/// A write session's view of the store: every block it newly stores is handed to `onNew`.
final class EagerStore: ForwardingBlockStore, @unchecked Sendable {
    let inner: any BlockStore
    /// A block newly stored: its id, and its bytes when the store was handed a buffer.
    let onNew: @Sendable (BlockID, BlockBuffer?, Int) -> Void
    init(inner: any BlockStore, onNew: @escaping @Sendable (BlockID, BlockBuffer?, Int) -> Void) { self.inner = inner; self.onNew = onNew }

    @discardableResult
    func put(_ id: BlockID, _ bytes: UnsafeRawBufferPointer) throws -> Bool {
        let created = try inner.put(id, bytes)
        if created { onNew(id, nil, bytes.count) }
        return created
    }
    @discardableResult
    func put(_ id: BlockID, owned buffer: BlockBuffer, length: Int) throws -> Bool {
        let created = try inner.put(id, owned: buffer, length: length)
        if created { onNew(id, buffer, length) }
        return created
    }
}
