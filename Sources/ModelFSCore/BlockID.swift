import Crypto
import Foundation

/// The name of a block: the SHA-256 of its bytes. Blocks are immutable, so the name is also
/// the checksum that every reader verifies (DESIGN.md §1).
public struct BlockID: Hashable, Sendable, Comparable, CustomStringConvertible {
    /// The 32 digest bytes, as four big-endian words so the value is a cheap, hashable struct.
    public let w0, w1, w2, w3: UInt64

    public init(w0: UInt64, w1: UInt64, w2: UInt64, w3: UInt64) {
        self.w0 = w0; self.w1 = w1; self.w2 = w2; self.w3 = w3
    }

    /// Builds an id from exactly 32 digest bytes.
    public init?<C: Collection>(bytes: C) where C.Element == UInt8 {
        guard bytes.count == 32 else { return nil }
        var words = [UInt64](repeating: 0, count: 4)
        for (i, b) in bytes.enumerated() { words[i / 8] = (words[i / 8] << 8) | UInt64(b) }
        self.init(w0: words[0], w1: words[1], w2: words[2], w3: words[3])
    }

    /// Parses 64 lowercase or uppercase hex digits; anything else (path tricks included) is nil.
    public init?(hex: some StringProtocol) {
        let utf8 = Array(hex.utf8)
        guard utf8.count == 64 else { return nil }
        var bytes = [UInt8](); bytes.reserveCapacity(32)
        var i = 0
        while i < 64 {
            guard let hi = BlockID.nibble(utf8[i]), let lo = BlockID.nibble(utf8[i + 1]) else { return nil }
            bytes.append(hi << 4 | lo)
            i += 2
        }
        self.init(bytes: bytes)
    }

    private static func nibble(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
        default: return nil
        }
    }

    /// SHA-256 of the given bytes (swift-crypto; BoringSSL uses the CPU's SHA extensions).
    public static func hash(_ buffer: UnsafeRawBufferPointer) -> BlockID {
        var hasher = SHA256()
        hasher.update(bufferPointer: buffer)
        return BlockID(digest: hasher.finalize())
    }

    public static func hash(_ data: Data) -> BlockID {
        data.withUnsafeBytes { hash($0) }
    }

    /// SHA-256 over bytes that arrive in pieces (a block received from a peer is hashed as it
    /// streams in, with no second pass over it).
    public struct Hasher {
        var sha = SHA256()
        public init() {}
        public mutating func update(_ bytes: UnsafeRawBufferPointer) { sha.update(bufferPointer: bytes) }
        public func finalize() -> BlockID { BlockID(digest: sha.finalize()) }
    }

    init(digest: SHA256.Digest) {
        var w = (UInt64(0), UInt64(0), UInt64(0), UInt64(0))
        digest.withUnsafeBytes { raw in
            w.0 = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
            w.1 = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
            w.2 = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 16, as: UInt64.self))
            w.3 = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 24, as: UInt64.self))
        }
        self.init(w0: w.0, w1: w.1, w2: w.2, w3: w.3)
    }

    /// The 32 digest bytes.
    public var bytes: [UInt8] {
        var out = [UInt8](); out.reserveCapacity(32)
        for w in [w0, w1, w2, w3] { for s in stride(from: 56, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: w >> UInt64(s))) } }
        return out
    }

    /// 64 lowercase hex digits.
    public var hex: String {
        let digits = Array("0123456789abcdef".utf8)
        var out = [UInt8](); out.reserveCapacity(64)
        for b in bytes { out.append(digits[Int(b >> 4)]); out.append(digits[Int(b & 15)]) }
        return String(decoding: out, as: UTF8.self)
    }

    public var description: String { hex }

    public static func < (a: BlockID, b: BlockID) -> Bool {
        (a.w0, a.w1, a.w2, a.w3) < (b.w0, b.w1, b.w2, b.w3)
    }
}
