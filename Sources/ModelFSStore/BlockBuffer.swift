import Foundation

/// Bytes of one block in memory: allocated once, filled once, then only read, so it can be
/// shared between threads and handed to the kernel without copies.
public final class BlockBuffer: @unchecked Sendable {
    public let pointer: UnsafeMutableRawPointer
    public let count: Int

    public init(count: Int) {
        self.count = count
        pointer = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1), alignment: 4096)
    }

    deinit { pointer.deallocate() }

    /// The bytes, valid only inside `body` (the buffer is kept alive for the call: a pointer taken
    /// from a temporary outlives it once ARC releases the object after its last use).
    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try withExtendedLifetime(self) { try body(UnsafeRawBufferPointer(start: pointer, count: count)) }
    }

    public var data: Data { withUnsafeBytes { Data($0) } }
}
