import Foundation

/// Bytes of one block in memory: allocated once, filled once, then only read, so it can be
/// shared between threads and handed to the kernel without copies.
///
/// Memory comes from a small pool of power-of-two sizes (64 KiB–8 MiB): blocks are read and
/// dropped at disk speed, and fresh memory costs a page fault and a page clear per 4 KiB
/// (measured: a third of the daemon's CPU on a cold read). The pool keeps at most 64 MiB free.
public final class BlockBuffer: @unchecked Sendable {
    public let pointer: UnsafeMutableRawPointer
    public let count: Int
    /// Bytes allocated (page-aligned, a multiple of 4 KiB up to 8 MiB): room after `count` that a
    /// store may use to pad a direct write.
    public let capacity: Int

    public init(count: Int) {
        self.count = count
        capacity = BufferPool.sizeClass(count)
        pointer = BufferPool.shared.take(capacity)
    }

    deinit { BufferPool.shared.give(pointer, capacity) }

    /// The bytes, valid only inside `body` (the buffer is kept alive for the call: a pointer taken
    /// from a temporary outlives it once ARC releases the object after its last use).
    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try withExtendedLifetime(self) { try body(UnsafeRawBufferPointer(start: pointer, count: count)) }
    }

    public var data: Data { withUnsafeBytes { Data($0) } }
}

/// Free buffers by size class, bounded in total.
final class BufferPool: @unchecked Sendable {
    static let shared = BufferPool()
    static let maxFreeBytes = 64 << 20
    private let lock = NSLock()
    private var lists: [Int: [UnsafeMutableRawPointer]] = [:]
    private var freeBytes = 0

    /// The capacity a buffer of `count` bytes gets: the next power of two, at least 64 KiB;
    /// sizes above 8 MiB are allocated exactly and not pooled.
    static func sizeClass(_ count: Int) -> Int {
        guard count > 64 << 10 else { return 64 << 10 }
        guard count <= 8 << 20 else { return count }
        return 1 << (Int.bitWidth - (count - 1).leadingZeroBitCount)
    }

    func take(_ capacity: Int) -> UnsafeMutableRawPointer {
        lock.lock()
        if let p = lists[capacity]?.popLast() {
            freeBytes -= capacity
            lock.unlock()
            return p
        }
        lock.unlock()
        return UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 4096)
    }

    func give(_ p: UnsafeMutableRawPointer, _ capacity: Int) {
        lock.lock()
        if capacity <= 8 << 20 && freeBytes + capacity <= BufferPool.maxFreeBytes {
            lists[capacity, default: []].append(p)
            freeBytes += capacity
            lock.unlock()
            return
        }
        lock.unlock()
        p.deallocate()
    }
}
