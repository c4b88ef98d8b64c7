/// A set of disjoint, sorted half-open byte ranges: the dirty extents of a file being written.
public struct ByteRangeSet: Sendable, Equatable {
    public private(set) var ranges: [Range<UInt64>] = []

    public init() {}

    public var isEmpty: Bool { ranges.isEmpty }
    public var totalBytes: UInt64 { ranges.reduce(0) { $0 + ($1.upperBound - $1.lowerBound) } }

    /// Index of the first range whose upper bound is > offset.
    private func firstIndex(endingAfter offset: UInt64) -> Int {
        var lo = 0, hi = ranges.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if ranges[mid].upperBound <= offset { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    public mutating func insert(_ r: Range<UInt64>) {
        guard !r.isEmpty else { return }
        var lower = r.lowerBound, upper = r.upperBound
        // Merge with ranges that overlap or touch.
        var i = firstIndex(endingAfter: lower)
        if i > 0 && ranges[i - 1].upperBound == lower { i -= 1 }
        var j = i
        while j < ranges.count && ranges[j].lowerBound <= upper {
            lower = min(lower, ranges[j].lowerBound)
            upper = max(upper, ranges[j].upperBound)
            j += 1
        }
        ranges.replaceSubrange(i..<j, with: [lower..<upper])
    }

    public mutating func remove(_ r: Range<UInt64>) {
        guard !r.isEmpty else { return }
        let i = firstIndex(endingAfter: r.lowerBound)
        var j = i
        var replacement: [Range<UInt64>] = []
        while j < ranges.count && ranges[j].lowerBound < r.upperBound {
            let x = ranges[j]
            if x.lowerBound < r.lowerBound { replacement.append(x.lowerBound..<r.lowerBound) }
            if x.upperBound > r.upperBound { replacement.append(r.upperBound..<x.upperBound) }
            j += 1
        }
        ranges.replaceSubrange(i..<j, with: replacement)
    }

    /// Removes everything at or beyond `size`.
    public mutating func clip(to size: UInt64) { remove(size..<UInt64.max) }

    /// The range that contains `offset`, if any.
    public func range(containing offset: UInt64) -> Range<UInt64>? {
        let i = firstIndex(endingAfter: offset)
        return i < ranges.count && ranges[i].lowerBound <= offset ? ranges[i] : nil
    }

    public func intersects(_ r: Range<UInt64>) -> Bool {
        guard !r.isEmpty else { return false }
        let i = firstIndex(endingAfter: r.lowerBound)
        return i < ranges.count && ranges[i].lowerBound < r.upperBound
    }

    /// The parts of `r` covered by the set (`covered == true`) and not covered, in order.
    public func pieces(of r: Range<UInt64>) -> [(range: Range<UInt64>, covered: Bool)] {
        var out: [(Range<UInt64>, Bool)] = []
        var pos = r.lowerBound
        var i = firstIndex(endingAfter: pos)
        while pos < r.upperBound {
            if i < ranges.count && ranges[i].lowerBound <= pos {
                let end = min(ranges[i].upperBound, r.upperBound)
                out.append((pos..<end, true)); pos = end; i += 1
            } else {
                let end = i < ranges.count ? min(ranges[i].lowerBound, r.upperBound) : r.upperBound
                out.append((pos..<end, false)); pos = end
            }
        }
        return out
    }
}
