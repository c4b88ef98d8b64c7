import Foundation
import ModelFSCore
import ModelFSStore
import Synchronization

/// A block store that fails on purpose, over a real one (unit tests only): puts fail as a full
/// disk once `puts` is used up, chosen blocks read as missing or corrupt, syncs fail. Everything
/// else is the inner store's.
public final class FaultyBlockStore: ForwardingBlockStore, Sendable {
    public let inner: any BlockStore
    public struct Faults: Sendable {
        /// Puts that still succeed; then every put fails as a full disk (nil: no limit).
        public var puts: Int?
        /// Blocks whose reads fail: as missing from the store, or as corrupt.
        public var missing: Set<BlockID> = []
        public var corrupt: Set<BlockID> = []
        /// Syncs fail (an I/O error from fdatasync).
        public var failSync = false
        public init(puts: Int? = nil) { self.puts = puts }
    }
    private let faults: Mutex<Faults>
    /// Changes the faults from now on.
    public func change(_ f: (inout Faults) -> Void) { faults.withLock { f(&$0) } }
    /// Reads and puts that failed, as counted here.
    public let failures = Atomic<Int>(0)

    public init(_ inner: any BlockStore, _ faults: Faults = Faults()) {
        self.inner = inner
        self.faults = Mutex(faults)
    }

    private func takePut() throws {
        let ok = faults.withLock { f -> Bool in
            guard let n = f.puts else { return true }
            guard n > 0 else { return false }
            f.puts = n - 1
            return true
        }
        if !ok {
            failures.add(1, ordering: .relaxed)
            throw StoreError(.full, "faulty test store: disk full")
        }
    }

    public func put(_ id: BlockID, _ bytes: UnsafeRawBufferPointer) throws -> Bool {
        try takePut()
        return try inner.put(id, bytes)
    }

    public func read(_ id: BlockID) throws -> BlockBuffer {
        let (missing, corrupt) = faults.withLock { ($0.missing.contains(id), $0.corrupt.contains(id)) }
        if missing || corrupt { failures.add(1, ordering: .relaxed) }
        if missing { throw StoreError(.missing, "faulty test store: block \(id.hex) is missing") }
        if corrupt { throw StoreError(.corrupt, "faulty test store: block \(id.hex) is corrupt") }
        return try inner.read(id)
    }

    public func sync(_ ids: [BlockID]) throws {
        if faults.withLock({ $0.failSync }) { throw StoreError(.system(EIO), "faulty test store: fdatasync: Input/output error") }
        try inner.sync(ids)
    }
}
