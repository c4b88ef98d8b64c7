import Foundation
import Testing
@testable import ModelFS
@testable import ModelFSCore

/// Format-aware prefetch: which ranges a safetensors loader reads, in its order, and that
/// anything else is left to the sequential readahead.
@Suite struct FormatPrefetchTests {
    /// A safetensors file whose tensors are laid out in `layout` order, each `sizes[name]` bytes.
    static func safetensors(_ layout: [String], sizes: [String: Int], metadata: Bool = true) -> [UInt8] {
        var parts: [String] = metadata ? ["\"__metadata__\":{\"format\":\"pt\"}"] : []
        var offset = 0
        for name in layout {
            parts.append("\"\(name)\":{\"dtype\":\"U8\",\"shape\":[\(sizes[name]!)],\"data_offsets\":[\(offset),\(offset + sizes[name]!)]}")
            offset += sizes[name]!
        }
        var header = Array(("{" + parts.joined(separator: ",") + "}").utf8)
        header += [UInt8](repeating: 0x20, count: (8 - header.count % 8) % 8)
        var n = UInt64(header.count).littleEndian
        let length = withUnsafeBytes(of: &n) { Array($0) }
        return length + header + [UInt8](repeating: 7, count: offset)
    }

    static func plan(_ bytes: [UInt8]) -> (format: String, ranges: [Range<UInt64>])? {
        FormatPrefetch.plan(size: UInt64(bytes.count)) { r in
            Array(bytes[Int(min(r.lowerBound, UInt64(bytes.count)))..<Int(min(r.upperBound, UInt64(bytes.count)))])
        }
    }

    /// The header first, then the tensors in their names' order (safe_open's keys()), not the
    /// file's: here the layout is the reverse.
    @Test func safetensorsRangesComeInTheLoadersOrder() throws {
        let sizes = ["a": 100, "b": 300, "c": 50, "d": 0]
        let bytes = Self.safetensors(["d", "c", "b", "a"], sizes: sizes)
        let p = try #require(Self.plan(bytes))
        #expect(p.format == "safetensors")
        let base = UInt64(bytes.count - 450)
        #expect(p.ranges == [0..<base, (base + 350)..<(base + 450), (base + 50)..<(base + 350), base..<(base + 50)])
    }

    /// Chunks are listed in the order the ranges touch them, each once.
    @Test func chunkOrderFollowsTheRanges() {
        let offsets: [UInt64] = [0, 10, 20, 30, 40]
        #expect(FormatPrefetch.chunkOrder([0..<5, 35..<40, 12..<25, 5..<8], offsets: offsets) == [0, 3, 1, 2])
        #expect(FormatPrefetch.chunkOrder([45..<50], offsets: offsets) == [])
    }

    /// Not safetensors, or a header that lies: nil, and the sequential readahead stays.
    @Test func garbageAndTruncatedHeadersAreNotRecognised() {
        let good = Self.safetensors(["x", "y"], sizes: ["x": 64, "y": 64])
        #expect(Self.plan(good) != nil)
        // A header length beyond the file.
        var long = good
        long.replaceSubrange(0..<8, with: [0xFF, 0xFF, 0, 0, 0, 0, 0, 0])
        #expect(Self.plan(long) == nil)
        // Cut inside the data: the last tensor's end lies beyond the file.
        #expect(Self.plan(Array(good.dropLast(10))) == nil)
        // Not JSON.
        var junk = good
        for i in 8..<16 { junk[i] = 0x41 }
        #expect(Self.plan(junk) == nil)
        // Random bytes, and a file shorter than the length field.
        #expect(Self.plan((0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 2654435761 >> 7) }) == nil)
        #expect(Self.plan([1, 2, 3]) == nil)
        // Only metadata, no tensor.
        #expect(Self.plan(Self.safetensors([], sizes: [:])) == nil)
    }
}
