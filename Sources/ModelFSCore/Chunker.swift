/// Content-defined chunking, FastCDC style (Xia et al., 2016): a gear hash rolls over the bytes
/// and a chunk ends where the hash's masked bits are zero. Normalised chunking uses a stricter
/// mask before the average size and a looser one after it, so sizes cluster near the average.
/// Boundaries depend only on nearby content, so inserting bytes early in a file shifts a few
/// chunks and leaves the rest (and their BlockIDs) unchanged: consecutive checkpoints dedup.
///
/// The chunker is a streaming state machine: feed it bytes as they arrive and it reports where
/// the current chunk ends, so writes are chunked without buffering the file (DESIGN.md §3).
public struct ChunkerParameters: Sendable, Equatable {
    public var minSize: Int
    public var averageSize: Int
    public var maxSize: Int

    public init(minSize: Int, averageSize: Int, maxSize: Int) {
        precondition(minSize > 0 && minSize <= averageSize && averageSize <= maxSize)
        precondition(averageSize.nonzeroBitCount == 1, "average chunk size must be a power of two")
        self.minSize = minSize; self.averageSize = averageSize; self.maxSize = maxSize
    }

    /// 256 KiB min / 1 MiB average / 4 MiB max (DESIGN.md §1).
    public static let standard = ChunkerParameters(minSize: 256 << 10, averageSize: 1 << 20, maxSize: 4 << 20)
    /// The largest chunk any parameters make here (peers bound request bodies by it).
    public static let largestChunk = 4 << 20
}

/// The gear table: 256 pseudo-random 64-bit words from a fixed SplitMix64 seed, so every node
/// and every version of modelfs cuts the same content at the same places. Written once at
/// first use, then only read, so sharing the pointer between threads is safe.
nonisolated(unsafe) let gearTable: UnsafeMutablePointer<UInt64> = {
    let table = UnsafeMutablePointer<UInt64>.allocate(capacity: 256)
    var state: UInt64 = 0x6d6f_6465_6c66_7321  // "modelfs!"
    for i in 0..<256 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        table[i] = z ^ (z >> 31)
    }
    return table
}()

public struct Chunker: Sendable {
    public let parameters: ChunkerParameters
    private let maskStrict: UInt64
    private let maskLoose: UInt64
    /// Bytes of the current (unfinished) chunk seen so far.
    public private(set) var currentLength: Int = 0
    private var hash: UInt64 = 0

    public init(_ parameters: ChunkerParameters = .standard) {
        self.parameters = parameters
        let bits = parameters.averageSize.trailingZeroBitCount
        // FastCDC's normalisation level 2: two more bits before the average, two fewer after.
        maskStrict = Chunker.spreadMask(bits: bits + 2)
        maskLoose = Chunker.spreadMask(bits: max(1, bits - 2))
    }

    /// A mask with `bits` one-bits spread over the high half of the word, where the gear hash
    /// has mixed the most bytes.
    private static func spreadMask(bits: Int) -> UInt64 {
        var mask: UInt64 = 0
        var placed = 0
        var pos = 63
        while placed < bits && pos >= 0 {
            mask |= 1 << UInt64(pos)
            placed += 1
            pos -= 2
            if pos < 0 { pos = 62 }
        }
        return mask
    }

    /// Consumes bytes of the current chunk. Returns the number of bytes consumed: either all of
    /// `buffer` (no boundary yet) or the offset just past a boundary, in which case the chunk is
    /// complete and the state is reset for the next one.
    public mutating func consume(_ buffer: UnsafeRawBufferPointer) -> (consumed: Int, boundary: Bool) {
        let count = buffer.count
        guard count > 0, let base = buffer.baseAddress?.assumingMemoryBound(to: UInt8.self) else { return (0, false) }
        let minSize = parameters.minSize, avg = parameters.averageSize, maxSize = parameters.maxSize
        var i = 0
        var len = currentLength
        // Skip the first minSize bytes of a chunk: no boundary can fall there.
        if len < minSize {
            let skip = min(minSize - len, count)
            i += skip; len += skip
            if i == count { currentLength = len; return (count, len >= maxSize ? resetting(&len) : false) }
        }
        var h = hash
        // Strict mask up to the average size, the loose one after it, never past maxSize.
        if len < avg {
            let end = min(count, i + (avg - len))
            let (j, hj, found) = Chunker.scan(base, from: i, to: end, hash: h, mask: maskStrict)
            len += j - i; i = j; h = hj
            if found { return finish(i) }
        }
        if i < count && len < maxSize {
            let end = min(count, i + (maxSize - len))
            let (j, hj, found) = Chunker.scan(base, from: i, to: end, hash: h, mask: maskLoose)
            len += j - i; i = j; h = hj
            if found { return finish(i) }
        }
        if len >= maxSize { return finish(i) }
        hash = h
        currentLength = len
        return (i, false)
    }

    /// Rolls the gear hash over bytes [from, to) and stops just past the first byte after which
    /// `hash & mask == 0`. The plain loop, `h = (h << 1) &+ gear[b]` per byte, is one long chain
    /// of dependent shifts and adds (about 1.4 GB/s here); four bytes per step put the table
    /// lookups and most of the arithmetic beside the chain: h4 = (h << 4) + (g0 << 3) + (g1 << 2)
    /// + (g2 << 1) + g3, with the three intermediate hashes formed off it only to be tested
    /// (2.5–2.8 GB/s, the same boundaries; ChunkerTests compare it with the plain loop).
    @inline(__always)
    private static func scan(_ base: UnsafePointer<UInt8>, from: Int, to end: Int, hash: UInt64, mask: UInt64)
        -> (end: Int, hash: UInt64, found: Bool) {
        let gear = gearTable
        var i = from
        var h = hash
        while i + 4 <= end {
            let g0 = gear[Int(base[i])], g1 = gear[Int(base[i + 1])]
            let g2 = gear[Int(base[i + 2])], g3 = gear[Int(base[i + 3])]
            let a01 = (g0 << 1) &+ g1
            let a23 = (g2 << 1) &+ g3
            let h1 = (h << 1) &+ g0
            let h2 = (h << 2) &+ a01
            let h3 = (h2 << 1) &+ g2
            let h4 = (h << 4) &+ ((a01 << 2) &+ a23)
            if (h1 & mask) == 0 || (h2 & mask) == 0 || (h3 & mask) == 0 || (h4 & mask) == 0 {
                if h1 & mask == 0 { return (i + 1, h1, true) }
                if h2 & mask == 0 { return (i + 2, h2, true) }
                if h3 & mask == 0 { return (i + 3, h3, true) }
                return (i + 4, h4, true)
            }
            h = h4
            i += 4
        }
        while i < end {
            h = (h << 1) &+ gear[Int(base[i])]
            i += 1
            if h & mask == 0 { return (i, h, true) }
        }
        return (i, h, false)
    }

    private mutating func resetting(_ len: inout Int) -> Bool {
        len = 0; currentLength = 0; hash = 0
        return true
    }

    private mutating func finish(_ consumed: Int) -> (consumed: Int, boundary: Bool) {
        currentLength = 0
        hash = 0
        return (consumed, true)
    }

    /// Forgets the current chunk (its bytes were emitted by a forced cut).
    public mutating func reset() { currentLength = 0; hash = 0 }

    /// Splits a whole buffer into chunk lengths; the last chunk ends at the buffer's end.
    public static func split(_ buffer: UnsafeRawBufferPointer, parameters: ChunkerParameters = .standard) -> [Int] {
        var chunker = Chunker(parameters)
        var lengths: [Int] = []
        var start = 0
        var chunkStart = 0
        while start < buffer.count {
            let (n, boundary) = chunker.consume(UnsafeRawBufferPointer(rebasing: buffer[start...]))
            start += n
            if boundary { lengths.append(start - chunkStart); chunkStart = start }
        }
        if chunkStart < buffer.count { lengths.append(buffer.count - chunkStart) }
        return lengths
    }
}
