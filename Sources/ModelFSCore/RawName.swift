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
        var scalars = String.UnicodeScalarView()
        var i = 0
        while i < bytes.count {
            let n = sequenceLength(bytes[i])
            if n > 1, i + n <= bytes.count,
               let s = String(validating: UnsafeBufferPointer(rebasing: bytes[i..<(i + n)]), as: UTF8.self),
               let scalar = s.unicodeScalars.first, scalar.value < base {
                scalars.append(scalar)
                i += n
            } else if n == 1 {
                scalars.append(Unicode.Scalar(bytes[i]))
                i += 1
            } else {
                scalars.append(Unicode.Scalar(base + UInt32(bytes[i]))!)
                i += 1
            }
        }
        return String(scalars)
    }

    public static func string(_ bytes: [UInt8]) -> String {
        bytes.withUnsafeBufferPointer { string($0) }
    }

    /// The name's bytes (without a terminating NUL).
    public static func bytes(_ s: String) -> [UInt8] {
        if !s.utf8.contains(0xF4) { return Array(s.utf8) }
        var out: [UInt8] = []
        out.reserveCapacity(s.utf8.count)
        for scalar in s.unicodeScalars {
            if scalar.value >= base {
                out.append(UInt8(scalar.value - base))
            } else {
                out += String(scalar).utf8
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
