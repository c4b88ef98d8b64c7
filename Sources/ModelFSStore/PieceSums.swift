import CModelFSSys
import Foundation
import ModelFSCore

/// The CRC32C of each 8 KiB piece of a block (issue #27): what lets a small read of a block on
/// this node's disk read and check only the pieces it touches, instead of reading and hashing the
/// whole block (a 4 KiB read of a 1 MiB block cost a 1 MiB read and a 1 MiB SHA-256).
///
/// The sums are computed when the block is stored, from the same buffer whose SHA-256 is its
/// name (the writer hashed it, or a peer's copy was checked against its id before it was
/// stored), and kept in the free part of its aligned record's header page ("MFB2": 40 bytes of
/// header, then zeros to the page's end in records written before the sums existed):
///
///     "PCS1" (4) | piece shift (1) | 0 (1) | count, UInt16 LE (2) | count × CRC32C, UInt32 LE
///     | CRC32C of the page's bytes [4, here) (4): length, id, tag, shift, count and sums
///
/// The table's own CRC covers the record's length and id, so a table is only ever believed for
/// the block it was written with. Whole-block reads check the sums too (`read`), about ten
/// times cheaper than hashing. CRC32C (3FS and Ceph BlueStore keep the same per block) detects
/// what disks do — flipped bits, torn or misdirected writes, punched pages — but is not a
/// cryptographic hash: the SHA-256 name still guards every block that arrives from a peer, and
/// `verify` (the scrubber, `modelfs verify`) hashes. Bytes whose sums do not match are never
/// returned: the whole block's hash then decides (and names the corruption).
///
/// Older binaries read these records as before (they look at the first 40 bytes of the page);
/// records without a table (written before, moved by tiering, or small "MFB1" ones) are read
/// whole, as before.
public struct PieceSums: Sendable, Equatable {
    public let shift: Int
    public let sums: [UInt32]

    public var pieceSize: Int { 1 << shift }

    static let tag: [UInt8] = Array("PCS1".utf8)
    /// 8 KiB: a 4 KiB read costs an 8 KiB read (16 KiB when it straddles two pieces); a 1 MiB
    /// block has 128 sums, a 4 MiB one 512. (16 KiB pieces read 20 KB per random 4 KiB read
    /// on average, and gave 7,285-7,566 cold reads/s against 7,348-9,678 for 8 KiB.)
    public static let defaultShift = 13
    /// What fits after the 40-byte header in one 4 KiB page with the tag and the table's CRC.
    static let maxCount = (PackBlockStore.page - PackBlockStore.headerSize - 12) / 4

    /// The piece shift for a block of `length` bytes: 8 KiB, larger only for blocks over
    /// ~8 MiB (the table must fit in the header page).
    static func shift(for length: Int) -> Int {
        var s = defaultShift
        while pieces(length, shift: s) > maxCount { s += 1 }
        return s
    }

    /// How many pieces of `1 << shift` bytes a block of `length` bytes has.
    static func pieces(_ length: Int, shift: Int) -> Int { (length + (1 << shift) - 1) >> shift }

    public init(shift: Int, sums: [UInt32]) { self.shift = shift; self.sums = sums }

    /// The sums of `bytes`.
    public init(of bytes: UnsafeRawBufferPointer) {
        let s = PieceSums.shift(for: bytes.count)
        self.init(shift: s, sums: PieceSums.crcs(bytes, shift: s))
    }

    /// The CRC32C of each piece of `bytes`, three pieces at a time where the CPU can.
    private static func crcs(_ bytes: UnsafeRawBufferPointer, shift: Int) -> [UInt32] {
        var out = [UInt32](repeating: 0, count: pieces(bytes.count, shift: shift))
        if !out.isEmpty {
            out.withUnsafeMutableBufferPointer { modelfs_crc32c_pieces(bytes.baseAddress!, bytes.count, 1 << shift, $0.baseAddress!) }
        }
        return out
    }

    /// Whether every piece of `bytes` (the whole block) matches its sum.
    func match(_ bytes: UnsafeRawBufferPointer) -> Bool {
        PieceSums.pieces(bytes.count, shift: shift) == sums.count && firstMismatch(bytes, from: 0) == nil
    }

    /// The first piece of `bytes` (pieces `first`, `first + 1`, …, the last one possibly short)
    /// that does not match its sum, or nil.
    func firstMismatch(_ bytes: UnsafeRawBufferPointer, from first: Int) -> Int? {
        let got = PieceSums.crcs(bytes, shift: shift)
        guard first + got.count <= sums.count else { return first }
        return got.indices.first { got[$0] != sums[first + $0] }.map { first + $0 }
    }

    /// The CRC32C of one piece's bytes.
    static func crc(_ p: UnsafeRawPointer, _ n: Int) -> UInt32 { modelfs_crc32c(p, n) }

    /// Writes the table into a record's header page after its 40-byte header (which must be
    /// there already: the table's CRC covers its length and id).
    func write(into page: UnsafeMutableRawPointer) {
        var at = PackBlockStore.headerSize
        func put(_ bytes: some Sequence<UInt8>) { for b in bytes { page.storeBytes(of: b, toByteOffset: at, as: UInt8.self); at += 1 } }
        func put32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { put($0) } }
        put(PieceSums.tag)
        put([UInt8(shift), 0, UInt8(sums.count & 0xFF), UInt8(sums.count >> 8)])
        for s in sums { put32(s) }
        put32(PieceSums.crc(page + 4, at - 4))
    }

    /// The table in a header page, if it holds one for a record of this id and length whose CRC
    /// matches; nil for a page without one (an older record) or with a damaged one.
    static func read(from page: UnsafeRawPointer, id: BlockID, length: Int) -> PieceSums? {
        let h = PackBlockStore.headerSize
        func byte(_ i: Int) -> UInt8 { page.load(fromByteOffset: i, as: UInt8.self) }
        func u32(_ i: Int) -> UInt32 { (0..<4).reduce(UInt32(0)) { $0 | UInt32(byte(i + $1)) << (8 * $1) } }
        guard (0..<4).allSatisfy({ byte(h + $0) == tag[$0] }) else { return nil }
        let shift = Int(byte(h + 4)), count = Int(byte(h + 6)) | Int(byte(h + 7)) << 8
        guard shift >= 12, shift < 32, count <= maxCount, count == pieces(length, shift: shift),
              u32(4) == UInt32(length), BlockID(bytes: Array(UnsafeRawBufferPointer(start: page + 8, count: 32))) == id
        else { return nil }
        let end = h + 8 + 4 * count
        guard u32(end) == crc(page + 4, end - 4) else { return nil }
        return PieceSums(shift: shift, sums: (0..<count).map { u32(h + 8 + 4 * $0) })
    }
}

/// Bytes [start, start + buffer.count) of a block, each piece checked against its sum.
public struct PieceRead: Sendable {
    public let buffer: BlockBuffer
    public let start: Int
    public init(buffer: BlockBuffer, start: Int) { self.buffer = buffer; self.start = start }
}
