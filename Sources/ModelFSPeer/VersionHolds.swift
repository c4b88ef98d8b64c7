import Foundation
import Synchronization
import ModelFSCore
import ModelFSMeta

/// Readers' holds on superseded versions, so garbage collection can take a replaced version's
/// blocks promptly without taking them from under a reader on another node (issue #28: a
/// steady in-place rewrite on a cluster kept every superseded version for `--gc-delay`).
///
/// A node whose open handles read version v of a file (a view, `FileSystem.readerVersion`) and
/// hears that the file has a newer version or is gone places `h/INO/NODE` = v in etcd, under its
/// membership lease, and deletes it once no handle reads v any more (the last one closed, or a
/// later open moved them on to the new version). It hears of versions from the namespace watch
/// (`changed`, every origin, its own commits included) and of its own opens (`opened`): an open
/// that read the old version while the change was on its way is caught either way round.
/// `GarbageCollector` waits `--gc-superseded-delay` after a version is replaced (time for the
/// holds to be placed: the readers hear of it from the same watch), then reads the holds once
/// per pass (`heldInodes`, one range over the holds, not over the namespace) and leaves the
/// versions of held inodes for later.
///
/// A node cut off from etcd for longer than the delay cannot place its hold; its reads of the
/// old version are then served by what it holds itself (its replicas, its read cache) and fail
/// with EIO for a block only other nodes had (docs/SEMANTICS.md).
public final class VersionHolds: @unchecked Sendable {
    let etcd: EtcdClient
    let keys: EtcdKeys
    let membership: Membership
    let readerVersion: @Sendable (InodeNumber) -> UInt64?
    /// How long a version heard of is remembered for opens that race it.
    static let remember = 120.0

    private struct State {
        /// Inode → the version this node's readers hold, and whether its key is in etcd
        /// under the lease it was put with (0: not yet).
        var held: [InodeNumber: (version: UInt64, lease: Int64)] = [:]
        /// The latest version heard of per inode (nil: deleted), recently.
        var latest: [InodeNumber: (version: UInt64?, at: Date)] = [:]
        var placed: UInt64 = 0

        /// Whether readers of `v` need a hold, `latest` being the version heard of (nil: the
        /// file is gone); marks it wanted if so and not held yet.
        mutating func want(_ ino: InodeNumber, reading v: UInt64, latest: UInt64?) -> Bool {
            guard latest.map({ $0 > v }) ?? true, held[ino]?.version != v else { return false }
            held[ino] = (v, 0)
            return true
        }
    }
    private let state = Mutex(State())
    private let loop = BackgroundLoop("modelfs-holds")

    public init(etcd: EtcdClient, keys: EtcdKeys, membership: Membership, readerVersion: @escaping @Sendable (InodeNumber) -> UInt64?) {
        self.etcd = etcd
        self.keys = keys
        self.membership = membership
        self.readerVersion = readerVersion
    }

    public func start() { loop.start { [weak self] in self?.round() ?? 1 } }
    public func stop() { loop.stop() }

    /// What status shows: holds this node has now, and placed since it started.
    public var counts: (holding: Int, placed: UInt64) { state.withLock { ($0.held.count, $0.placed) } }

    /// The namespace watch saw `ino` at `version` (nil: deleted).
    public func changed(_ ino: InodeNumber, version: UInt64?) {
        let reading = readerVersion(ino)
        let want = state.withLock { s -> Bool in
            s.latest[ino] = (version, Date())
            guard let v = reading else { return false }
            return s.want(ino, reading: v, latest: version)
        }
        if want { loop.poke() }
    }

    /// An open of `ino` made a view of `version`.
    public func opened(_ ino: InodeNumber, version: UInt64) {
        let want = state.withLock { s -> Bool in
            guard let l = s.latest[ino] else { return false }
            return s.want(ino, reading: version, latest: l.version)
        }
        if want { loop.poke() }
    }

    /// The inodes some node holds an old version of (one range over `h/`, keys only).
    public func heldInodes() throws -> Set<InodeNumber> {
        Set(try etcd.rangeAll(prefix: keys.holds, keysOnly: true).kvs.compactMap { keys.heldInode($0.key) })
    }

    /// Places the holds wanted, deletes those no handle needs; returns the seconds to the next round.
    private func round() -> Double {
        let now = Date()
        let me = membership.me.id, lease = membership.lease
        let (place, drop) = state.withLock { s -> ([(InodeNumber, UInt64)], [InodeNumber]) in
            s.latest = s.latest.filter { now.timeIntervalSince($0.value.at) < Self.remember }
            var place: [(InodeNumber, UInt64)] = [], drop: [InodeNumber] = []
            for (ino, h) in s.held {
                if readerVersion(ino) != h.version { drop.append(ino) } else if h.lease != lease { place.append((ino, h.version)) }
            }
            for ino in drop { s.held[ino] = nil }
            return (place, drop)
        }
        var failed: String?
        if lease != 0 {
            for (ino, version) in place {
                do {
                    try etcd.put(keys.hold(ino, node: me), Data(String(version).utf8), lease: lease)
                    state.withLock { s in
                        if s.held[ino]?.version == version { s.held[ino]?.lease = lease; s.placed += 1 }
                    }
                } catch { failed = "\(error)" }
            }
        } else if !place.isEmpty {
            failed = "no membership lease"
        }
        for ino in drop {
            // A failed delete leaves the key until this node's lease goes; a later round does not
            // retry it (the hold only delays collection).
            do { try etcd.delete(keys.hold(ino, node: me)) } catch { failed = "\(error)" }
        }
        if let failed {
            Log.every("version holds", 60, .warning, "cannot place a reader's hold on a superseded version in etcd (it may be collected under the reader): \(failed)")
        }
        return state.withLock { $0.held.isEmpty && $0.latest.isEmpty } ? 5 : 1
    }
}
