import Foundation
import ModelFSCore
import Synchronization

/// Verified blocks kept in memory, least recently used evicted first, within a byte budget.
/// Sequential reads arrive as 128 KiB–1 MiB requests while blocks are ~1 MiB: each block is read
/// and verified once and its slices are served from here.
public final class BlockCache: @unchecked Sendable {
    private struct Entry { var buffer: BlockBuffer; var tick: UInt64 }
    private struct State {
        var entries: [BlockID: Entry] = [:]
        var bytes = 0
        var tick: UInt64 = 0
        var hits: UInt64 = 0
        var misses: UInt64 = 0
    }
    private let state = Mutex(State())
    public let budget: Int

    public init(budget: Int) { self.budget = budget }

    public func get(_ id: BlockID) -> BlockBuffer? {
        state.withLock { s in
            s.tick += 1
            guard var e = s.entries[id] else { s.misses += 1; return nil }
            s.hits += 1
            e.tick = s.tick
            s.entries[id] = e
            return e.buffer
        }
    }

    /// Whether a block is cached (without counting a hit or a miss).
    public func contains(_ id: BlockID) -> Bool { state.withLock { $0.entries[id] != nil } }

    /// The blocks of `ids` that are not cached, in order (one lock for all of them).
    public func missing(_ ids: some Sequence<BlockID>) -> [BlockID] {
        state.withLock { s in ids.filter { s.entries[$0] == nil } }
    }

    public func insert(_ id: BlockID, _ buffer: BlockBuffer) {
        guard buffer.count <= budget else { return }
        state.withLock { s in
            s.tick += 1
            if let old = s.entries[id] { s.bytes -= old.buffer.count }
            s.entries[id] = Entry(buffer: buffer, tick: s.tick)
            s.bytes += buffer.count
            if s.bytes > budget {
                // Evict the oldest entries until within budget (sorting is fine: the cache holds
                // tens of blocks, and eviction runs once per insert that overflows).
                for (key, e) in s.entries.sorted(by: { $0.value.tick < $1.value.tick }) {
                    if s.bytes <= budget { break }
                    if key == id { continue }
                    s.entries[key] = nil
                    s.bytes -= e.buffer.count
                }
            }
        }
    }

    public var statistics: (bytes: Int, hits: UInt64, misses: UInt64) {
        state.withLock { ($0.bytes, $0.hits, $0.misses) }
    }
}
