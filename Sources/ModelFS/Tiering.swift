import Foundation
import ModelFSCore
import ModelFSStore
import Synchronization

/// Storage tiers (issue #31): which blocks belong on the fast tier and which on the slow one,
/// by each file's directory rule and age, and the moves that put them there
/// (`PackBlockStore.move`). New blocks land on the fast tier (the store's first with room).
///
/// A directory's rule is the xattr `user.modelfs.tier` (`modelfs policy tier DIR RULE`), or its
/// parent's, up to the root (`auto`):
/// - `fast`: its files' blocks stay on (or come back to) the fast tier;
/// - `slow`: they go to the slow tier (the last) at the next pass;
/// - `auto`: they go there once the file has not been written for `age` seconds.
/// A block that any fast file references stays fast (blocks are shared across files). A pass
/// walks the namespace (`walkFiles`) every `interval` seconds; moves go in batches, each synced
/// before the old copies are dropped. Reads do not move blocks between tiers: a read of a slow
/// file is served from the flat copy (passthrough) or the cluster read cache, both on the data
/// dir, the fast tier.
public final class Tiering: @unchecked Sendable {
    public static let xattr = "user.modelfs.tier"

    public enum Rule: String, Sendable, CaseIterable { case fast, slow, auto }

    public struct Stats: Sendable, Codable, Equatable {
        public var passes = 0
        public var demotedBlocks = 0
        public var demotedBytes: UInt64 = 0
        public var promotedBlocks = 0
        public var promotedBytes: UInt64 = 0
        public var lastPassSeconds = 0.0
        /// Why the last pass stopped short (a full tier), if it did.
        public var lastProblem: String?
        public init() {}
    }

    let fs: FileSystem
    let store: PackBlockStore
    public let age: Double
    public let interval: Double
    private let queue = DispatchQueue(label: "modelfs.tiering")
    private var timer: (any DispatchSourceTimer)?
    private let counters = Mutex(Stats())
    static let batch = 64

    public init(fs: FileSystem, store: PackBlockStore, age: Double, interval: Double) {
        self.fs = fs; self.store = store; self.age = age; self.interval = interval
    }

    public var stats: Stats { counters.withLock { $0 } }

    public func start() {
        let t = DispatchSource.makeTimerSource(queue: queue)
        t.schedule(deadline: .now() + interval, repeating: interval)
        t.setEventHandler { [weak self] in
            do { _ = try self?.pass() } catch { _ = Log.every("tiering", 600, .warning, "tiering pass failed: \(error)") }
        }
        t.resume()
        timer = t
    }

    public func stop() { timer?.cancel(); timer = nil }

    /// One pass now, after any under way (`modelfs debug tier`).
    public func passNow() throws -> Stats { try queue.sync { try pass() } }

    /// A directory's rule: its own xattr, else its parent's, up to the root.
    func rule(_ dir: InodeNumber, _ known: inout [InodeNumber: Rule]) -> Rule {
        if let r = known[dir] { return r }
        var r: Rule
        if let v = try? fs.meta.getxattr(dir, name: Self.xattr), let own = Rule(rawValue: String(decoding: v, as: UTF8.self)) {
            r = own
        } else if dir == .root {
            r = .auto
        } else if let p = try? fs.meta.parent(of: dir) {
            r = rule(p, &known)
        } else {
            r = .auto
        }
        known[dir] = r
        return r
    }

    @discardableResult
    func pass() throws -> Stats {
        let begun = Date()
        let cutoff = Timestamp(totalNanoseconds: Int64((begun.timeIntervalSince1970 - age) * 1e9))
        var known: [InodeNumber: Rule] = [:]
        var fast = Set<BlockID>(), slow = Set<BlockID>()
        try fs.walkFiles(from: .root) { f in
            let r = f.parent.map { rule($0, &known) } ?? .auto
            let wantsFast = r == .fast || (r == .auto && f.mtime >= cutoff)
            for b in f.blocks { if wantsFast { fast.insert(b.id) } else { slow.insert(b.id) } }
        }
        slow.subtract(fast)
        let last = store.tiers.count - 1
        let down = slow.filter { (store.tier(of: $0) ?? last) != last }.sorted()
        let up = fast.filter { (store.tier(of: $0) ?? 0) != 0 }.sorted()
        var problem: String?
        var demoted = (0, UInt64(0)), promoted = (0, UInt64(0))
        for (ids, tier) in [(down, last), (up, 0)] {
            var at = 0
            while at < ids.count {
                let part = Array(ids[at..<min(at + Self.batch, ids.count)])
                at += part.count
                do {
                    let m = try store.move(part, to: tier)
                    if tier == 0 { promoted.0 += m.blocks; promoted.1 += m.bytes } else { demoted.0 += m.blocks; demoted.1 += m.bytes }
                } catch let e as StoreError where e.kind == .full {
                    problem = e.message
                    break
                }
            }
        }
        let seconds = Date().timeIntervalSince(begun)
        if demoted.0 + promoted.0 > 0 {
            Log.info("tiering: \(demoted.0) blocks (\(demoted.1 >> 20) MiB) to \(store.tiers[last].name), "
                     + "\(promoted.0) (\(promoted.1 >> 20) MiB) to \(store.tiers[0].name) in \(String(format: "%.2f", seconds)) s")
        }
        return counters.withLock { s in
            s.passes += 1
            s.demotedBlocks += demoted.0; s.demotedBytes += demoted.1
            s.promotedBlocks += promoted.0; s.promotedBytes += promoted.1
            s.lastPassSeconds = seconds
            s.lastProblem = problem
            return s
        }
    }
}
