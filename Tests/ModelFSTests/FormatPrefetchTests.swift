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

    static func plan(_ bytes: [UInt8]) -> FormatPrefetch.Plan? {
        FormatPrefetch.plan(size: UInt64(bytes.count)) { r in
            Array(bytes[Int(min(r.lowerBound, UInt64(bytes.count)))..<Int(min(r.upperBound, UInt64(bytes.count)))])
        }
    }

    /// A safetensors file padded to `minRanged` (smaller ones are not looked at for ranges).
    static func big(_ layout: [String], sizes: [String: Int]) -> [UInt8] {
        var sizes = sizes
        let pad = "~pad"
        sizes[pad] = Int(FormatPrefetch.minRanged)
        return safetensors(layout + [pad], sizes: sizes)
    }

    /// The header first, then the tensors in their names' order (safe_open's keys()), not the
    /// file's: here the layout is the reverse.
    @Test func safetensorsRangesComeInTheLoadersOrder() throws {
        let sizes = ["a": 100, "b": 300, "c": 50, "d": 0]
        let bytes = Self.big(["d", "c", "b", "a"], sizes: sizes)
        let base = UInt64(bytes.count - 450) - FormatPrefetch.minRanged
        let pad = (base + 450)..<(base + 450 + FormatPrefetch.minRanged)
        #expect(Self.plan(bytes) == .ranges(format: "safetensors", [0..<base, (base + 350)..<(base + 450), (base + 50)..<(base + 350), base..<(base + 50), pad]))
        // Under minRanged, a safetensors file is not looked at.
        #expect(Self.plan(Self.safetensors(["a"], sizes: ["a": 10])) == nil)
    }

    /// Chunks are listed in the order the ranges touch them, each once.
    @Test func chunkOrderFollowsTheRanges() {
        let offsets: [UInt64] = [0, 10, 20, 30, 40]
        #expect(FormatPrefetch.chunkOrder([0..<5, 35..<40, 12..<25, 5..<8], offsets: offsets) == [0, 3, 1, 2])
        #expect(FormatPrefetch.chunkOrder([45..<50], offsets: offsets) == [])
    }

    /// Not safetensors, or a header that lies: nil, and the sequential readahead stays.
    @Test func garbageAndTruncatedHeadersAreNotRecognised() {
        let good = Self.big(["x", "y"], sizes: ["x": 64, "y": 64])
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
        #expect(Self.plan(Self.big([], sizes: [:])) != nil)
        #expect(Self.plan(Self.safetensors([], sizes: [:])) == nil)
    }

    /// An index or state file names the files the loader reads next, in its order.
    @Test func indexesNameTheirShardsInTheLoadersOrder() {
        let hf = Array("""
            {"metadata": {"total_size": 12}, "weight_map": {"b": "model-00002-of-00002.safetensors",
             "a": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors", "d": "../escape"}}
            """.utf8)
        #expect(Self.plan(hf) == .siblings(format: "huggingface-index", [.named("model-00001-of-00002.safetensors"),
                                                                         .named("model-00002-of-00002.safetensors")]))
        #expect(Self.plan(Array("{\"name\": \"not an index\", \"weight_map\": 3}".utf8)) == nil)
        #expect(Self.plan(Array("{\"model_type\": \"llama\"}".utf8)) == nil)
        let tf = Array("model_checkpoint_path: \"/data/run/ckpt-3\"\nall_model_checkpoint_paths: \"ckpt-1\"\n".utf8)
        #expect(Self.plan(tf) == .siblings(format: "tensorflow-checkpoint", [.named("ckpt-3.index"), .prefix("ckpt-3.data-")]))
        #expect(Self.plan(Array("model_checkpoint_path: nothing quoted\n".utf8)) == nil)
        var dcp: [UInt8] = [0x80, 0x04, 0x95, 0x34, 0, 0, 0, 0, 0, 0, 0, 0x8C, 0x25]
        dcp += Array("torch.distributed.checkpoint.metadata".utf8) + [0x94]
        #expect(Self.plan(dcp) == .siblings(format: "torch-distributed-checkpoint", [.suffix(".distcp")]))
        #expect(Self.plan([0x80, 0x04, 0x95, 1, 2, 3, 4, 5, 6, 7]) == nil)
        #expect(FormatPrefetch.Sibling.suffix(".distcp").matches("__0_0.distcp") && !FormatPrefetch.Sibling.suffix(".distcp").matches(".distcp"))
    }
}
