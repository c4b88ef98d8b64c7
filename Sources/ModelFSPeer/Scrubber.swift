import Foundation
import ModelFSCore
import ModelFSWire
import ModelFSStore
import Synchronization

public struct ScrubStatus: Codable, Sendable, Equatable {
    /// Bytes per second the scrubber reads at most (0: off).
    public var rate: UInt64 = 0
    public var passes = 0
    /// Progress of the pass under way (0…1; 1 between passes).
    public var progress = 1.0
    public var scrubbedBlocks: UInt64 = 0
    public var scrubbedBytes: UInt64 = 0
    public var corruptFound: UInt64 = 0
    public var repaired: UInt64 = 0
    /// Corrupt replicas no good copy could replace (the block's other copies, if any, remain).
    public var unrepairable: UInt64 = 0
    public var lastPassAt: Double?
    public var lastCorrupt: String?
}

/// Re-reads and re-hashes this node's replicas in the background at a bounded rate (DESIGN.md
/// §1: a mismatch is a missing replica, repaired). A corrupt replica is dropped and replaced by a
/// verified copy from a peer; readers never see its bytes, because every read from disk is
/// verified and falls back to the peers (ClusterBlockStore), which also reports it here.
public final class Scrubber: Sendable {
    let local: PackBlockStore
    let membership: Membership
    let client: PeerClient
    let rate: UInt64
    let every: Double
    private let state: Mutex<ScrubStatus>
    private let loop = BackgroundLoop("modelfs-scrubber")
    private let repairQueue = DispatchQueue(label: "modelfs.repair")
    private let repairing = Mutex<Set<BlockID>>([])

    /// `rate` bytes per second at most (0 turns the background pass off; repairs still run);
    /// a new pass starts `every` seconds after the previous one began.
    public init(local: PackBlockStore, membership: Membership, client: PeerClient, rate: UInt64, every: Double) {
        self.local = local
        self.membership = membership
        self.client = client
        self.rate = rate
        self.every = every
        var s = ScrubStatus()
        s.rate = rate
        state = Mutex(s)
    }

    public var status: ScrubStatus { state.withLock { $0 } }

    public func start() {
        guard rate > 0 else { return }
        loop.start { [weak self] in
            guard let self else { return 0 }
            let began = Date()
            self.pass()
            return max(0.05, began.addingTimeInterval(self.every).timeIntervalSinceNow)
        }
    }

    public func stop() { loop.stop() }

    /// One pass over every replica, sleeping as needed to stay under `rate`.
    func pass() {
        let blocks = local.listBlocks().map(\.id)
        let start = Date()
        var bytes: UInt64 = 0
        for (i, id) in blocks.enumerated() {
            if loop.isStopped { return }
            guard let length = local.location(of: id)?.length else { continue }
            if local.verify(id) == false {
                state.withLock { $0.corruptFound += 1; $0.lastCorrupt = id.hex }
                _ = repair(id)
            }
            bytes += UInt64(length)
            state.withLock { s in
                s.scrubbedBlocks += 1
                s.scrubbedBytes += UInt64(length)
                s.progress = Double(i + 1) / Double(blocks.count)
            }
            // Bounded rate: ahead of schedule, wait (woken early only to stop).
            let due = Double(bytes) / Double(rate) - Date().timeIntervalSince(start)
            if due > 0.005, loop.sleep(due) { return }
        }
        state.withLock { s in s.passes += 1; s.progress = 1; s.lastPassAt = Date().timeIntervalSince1970 }
    }

    /// Replaces this node's replica of `id` (corrupt) with a verified copy from a peer. The bad
    /// copy is dropped first: it is worth nothing, and a read must not find it again.
    @discardableResult
    public func repair(_ id: BlockID) -> Bool {
        guard repairing.withLock({ $0.insert(id).inserted }) else { return false }
        defer { _ = repairing.withLock { $0.remove(id) } }
        if local.verify(id) == true { return true }
        do { try local.remove(id) } catch { Log.error("cannot drop corrupt block \(id.hex): \(error)") }
        for node in Placement.order(id, membership.peers) + membership.lost {
            guard let b = try? client.get(id, from: node) else { continue }   // verified by get
            do {
                try b.withUnsafeBytes { _ = try local.put(id, $0) }
                try local.sync([id])
                state.withLock { $0.repaired += 1 }
                Log.warning("replaced corrupt replica of block \(id.hex) with a good copy from \(node.id)")
                return true
            } catch {
                Log.error("cannot store the good copy of block \(id.hex): \(error)")
            }
        }
        state.withLock { $0.unrepairable += 1 }
        Log.error("corrupt replica of block \(id.hex) dropped: no peer has a good copy to replace it")
        return false
    }

    /// A reader found `id` corrupt: repair it in the background.
    public func repairSoon(_ id: BlockID) {
        state.withLock { $0.corruptFound += 1; $0.lastCorrupt = id.hex }
        repairQueue.async { [weak self] in _ = self?.repair(id) }
    }
}
