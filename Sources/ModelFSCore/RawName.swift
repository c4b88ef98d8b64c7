/// Linux names (and symlink targets, and xattr names) are bytes: any byte but `/` and NUL, not
/// necessarily UTF-8 (ext4 takes a Latin-1 name as it is). modelfs keeps them as Swift strings
/// everywhere inside (the engines' keys and records, logs), so the kernel's bytes are mapped to a
/// string losslessly at the FUSE edge and back when they go out:
///
/// - A name that is valid UTF-8 is the string it spells, unchanged (every name in practice).
/// - A byte that is not part of a valid UTF-8 sequence becomes the scalar U+10FF00 + byte, from
///   the last 256 code points of the supplementary private use area B (as Python's
///   "surrogateescape" does with lone surrogates, which a Swift string cannot hold).
/// - So that the map stays one-to-one, a valid character in that same range (U+10FF00…U+10FFFF)
///   is escaped the same way, byte by byte.
///
/// Reading the string back maps each scalar of that range to its byte and the others to their
/// UTF-8. The string form is what SQLite's `name` column and etcd's `d/PARENT/NAME` keys hold
/// (both UTF-8, so a Latin-1 name costs 4 bytes per escaped byte there); its byte length is not
/// the name's: limits are checked on the bytes (`RawName.byteCount`).
public enum RawName {
    static let base: UInt32 = 0x10FF00

    /// The string for a name's bytes.
    public static func string(_ bytes: UnsafeBufferPointer<UInt8>) -> String {
        // U+10FF00 and above start with 0xF4; without it, valid UTF-8 is the string as it is.
        if !bytes.contains(0xF4), let s = String(validating: bytes, as: UTF8.self) { return s }
        // The string's UTF-8 built directly (a scalar view appended scalar by scalar, with a
        // String(validating:) per sequence, was a tenth of the daemon's CPU under stress-ng's
        // filename stressor, whose names are random bytes).
        var out = [UInt8]()
        out.reserveCapacity(bytes.count * 2)
        var i = 0
        while i < bytes.count {
            let n = validSequence(bytes, at: i)
            if n > 0 {
                out.append(contentsOf: UnsafeBufferPointer(rebasing: bytes[i..<(i + n)]))
                i += n
            } else {
                // U+10FF00 + byte in UTF-8: F4 8F, then BC…BF and 80…BF by the byte's bits.
                let b = bytes[i]
                out.append(contentsOf: [0xF4, 0x8F, 0xBC | (b >> 6), 0x80 | (b & 0x3F)])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// The length of the valid UTF-8 sequence at `i` that spells a scalar below `base`, or 0
    /// (a byte to escape): RFC 3629's table (no overlong forms, no surrogates, nothing above
    /// U+10FFFF), and U+10FF00…U+10FFFF (F4 8F BC…BF) escaped too.
    static func validSequence(_ b: UnsafeBufferPointer<UInt8>, at i: Int) -> Int {
        let lead = b[i]
        let n = sequenceLength(lead)
        guard n > 0, i + n <= b.count else { return 0 }
        if n == 1 { return 1 }
        // The second byte's range depends on the lead; the rest are 80…BF.
        let second = b[i + 1]
        let (lo, hi): (UInt8, UInt8) = switch lead {
        case 0xE0: (0xA0, 0xBF)
        case 0xED: (0x80, 0x9F)
        case 0xF0: (0x90, 0xBF)
        case 0xF4: (0x80, 0x8F)
        default: (0x80, 0xBF)
        }
        guard second >= lo && second <= hi else { return 0 }
        for k in 2..<n where b[i + k] & 0xC0 != 0x80 { return 0 }
        if lead == 0xF4 && second == 0x8F && b[i + 2] >= 0xBC { return 0 }
        return n
    }

    public static func string(_ bytes: [UInt8]) -> String {
        bytes.withUnsafeBufferPointer { string($0) }
    }

    /// The name's bytes (without a terminating NUL).
    public static func bytes(_ s: String) -> [UInt8] {
        if !s.utf8.contains(0xF4) { return Array(s.utf8) }
        // The string is valid UTF-8: an escaped byte is F4 8F BC…BF 80…BF, everything else
        // is copied as it is.
        let u = Array(s.utf8)
        var out: [UInt8] = []
        out.reserveCapacity(u.count)
        var i = 0
        while i < u.count {
            if u[i] == 0xF4, i + 3 < u.count, u[i + 1] == 0x8F, u[i + 2] >= 0xBC {
                out.append(((u[i + 2] & 0x03) << 6) | (u[i + 3] & 0x3F))
                i += 4
            } else {
                out.append(u[i])
                i += 1
            }
        }
        return out
    }

    /// The name's length in bytes, as the kernel counts it.
    public static func byteCount(_ s: String) -> Int {
        s.utf8.contains(0xF4) ? bytes(s).count : s.utf8.count
    }

    /// `body` with the name as a NUL-terminated C string (for libfuse).
    public static func withCString<T>(_ s: String, _ body: (UnsafePointer<CChar>) throws -> T) rethrows -> T {
        if !s.utf8.contains(0xF4) { return try s.withCString(body) }
        return try (bytes(s) + [0]).withUnsafeBytes { try body($0.baseAddress!.assumingMemoryBound(to: CChar.self)) }
    }

    /// How many bytes a UTF-8 sequence starting with `lead` has (1 for ASCII; 0 for a byte that
    /// cannot start one).
    static func sequenceLength(_ lead: UInt8) -> Int {
        switch lead {
        case 0x00...0x7F: 1
        case 0xC2...0xDF: 2
        case 0xE0...0xEF: 3
        case 0xF0...0xF4: 4
        default: 0
        }
    }
}
