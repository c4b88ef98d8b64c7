import Foundation
import Synchronization
import ModelFSCore

/// Healing yields to the foreground, as a storage node's recovery yields to client I/O. While a
/// node serves readers or writers (its own filesystem's block reads and writes, or blocks
/// fetched from it or sent to it for another node's reader or writer), the healing copies it
/// sends and receives are held together to `busyRate` bytes per second; once it has been quiet
/// for `quiet`, they go as fast as the node does. A busy rate of 0: healing never yields.
/// Copies of blocks down to their last live copy never yield: redundancy comes back first.
///
/// The healer's own cap (`--heal-rate`) applies on top, across the cluster.
public final class ForegroundYield: Sendable {
    public let busyRate: UInt64
    /// Nanoseconds without foreground work after which the node counts as idle.
    static let quiet: UInt64 = 250_000_000

    /// When this node last did foreground work.
    private let foreground = RecentActivity(quiet: ForegroundYield.quiet)
    private struct Bucket {
        /// When the next healing bytes are due while busy.
        var next: UInt64 = 0
        var waitedNanos: UInt64 = 0
        var heldCopies: UInt64 = 0
    }
    private let bucket = Mutex(Bucket())
    /// Healing bytes this node has sent and received.
    private let sent = Atomic<UInt64>(0)
    private let received = Atomic<UInt64>(0)

    public init(busyRate: UInt64) { self.busyRate = busyRate }

    static func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds }

    /// Foreground work on this node, now: one clock read and one relaxed store (called once per
    /// block read or written, not per request).
    public func noteForeground() { noteForeground(at: Self.now()) }

    func noteForeground(at t: UInt64) { foreground.note(at: t) }

    /// When foreground work was last noted (0: never).
    var notedAt: UInt64 { foreground.notedAt }

    /// Whether foreground work ran within the last `quiet`.
    public var busy: Bool { busy(at: Self.now()) }

    func busy(at t: UInt64) -> Bool { foreground.busy(at: t) }

    /// Reserves `bytes` of healing at time `t`: nanoseconds to wait before they go, 0 when idle.
    func reserve(_ bytes: Int, at t: UInt64) -> UInt64 {
        guard busyRate > 0, bytes > 0, busy(at: t) else { return 0 }
        return bucket.withLock { b in
            let start = max(b.next, t)
            b.next = start + UInt64(Double(bytes) / Double(busyRate) * 1e9)
            let wait = start - t
            if wait > 0 {
                b.waitedNanos += wait
                b.heldCopies += 1
            }
            return wait
        }
    }

    /// Called before `bytes` of healing (a copy sent, or one `received`): while the node is busy,
    /// a `yielding` copy waits until it is due at `busyRate`. A copy of a block down to its last
    /// live copy does not yield (durability first), and is only counted.
    public func admit(_ bytes: Int, received isReceived: Bool, yielding: Bool = true) {
        if isReceived {
            received.wrappingAdd(UInt64(max(bytes, 0)), ordering: .relaxed)
        } else {
            sent.wrappingAdd(UInt64(max(bytes, 0)), ordering: .relaxed)
        }
        guard yielding else { return }
        let wait = reserve(bytes, at: Self.now())
        if wait > 0 { Thread.sleep(forTimeInterval: Double(wait) / 1e9) }
    }

    /// What `modelfs status` shows of it.
    public struct Status: Codable, Sendable, Equatable {
        /// `--heal-rate-busy`, bytes/s (0: healing never yields).
        public var busyRate: UInt64
        /// Foreground work within the last quarter second.
        public var busy: Bool
        /// Seconds healing copies on this node waited for the foreground, since it started.
        public var yieldedSeconds: Double
        /// Healing copies that waited.
        public var heldCopies: UInt64
        /// Healing bytes this node sent and received since it started.
        public var sentBytes: UInt64
        public var receivedBytes: UInt64
    }

    public var status: Status {
        let b = bucket.withLock { $0 }
        return Status(busyRate: busyRate, busy: busy, yieldedSeconds: Double(b.waitedNanos) / 1e9, heldCopies: b.heldCopies,
                      sentBytes: sent.load(ordering: .relaxed), receivedBytes: received.load(ordering: .relaxed))
    }
}
