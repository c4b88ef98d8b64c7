import Foundation
import ModelFSCore

/// Format-aware prefetch (issue #30): loaders do not read checkpoints in file order, so for a
/// format it recognises this says which byte ranges a loader will read, in its order; the store
/// then fetches the blocks holding them ahead of the loader. Unknown formats, and headers that
/// do not parse or do not fit the file, give nil: the sequential readahead stays. A wrong guess
/// costs bandwidth, never correctness (prefetched blocks are verified like any other).
public enum FormatPrefetch {
    /// The most header bytes read to recognise a file (safetensors caps its header at 100 MB;
    /// a real model's is a few hundred KiB).
    public static let maxHeader = 16 << 20

    /// The ranges a loader of the file reads, in its order, from the file's first bytes
    /// (`read(range)` returns the bytes of a range, fewer at the end of the file); nil if the
    /// format is not one this knows.
    public static func plan(size: UInt64, read: (Range<UInt64>) throws -> [UInt8]) -> (format: String, ranges: [Range<UInt64>])? {
        guard size >= 8, let first = try? read(0..<8), first.count == 8 else { return nil }
        if let ranges = safetensors(size: size, first: first, read: read) { return ("safetensors", ranges) }
        return nil
    }

    /// safetensors: an 8-byte little-endian header length N, N bytes of JSON (name → dtype,
    /// shape, data_offsets [begin, end) relative to the end of the header; `__metadata__` is not
    /// a tensor), then the data. `safe_open(...).keys()` lists the names sorted, and `load_file`
    /// and Hugging Face's loaders take the tensors in that order; the writer lays them out by
    /// dtype alignment first, so that order jumps about the file. The header itself comes first.
    static func safetensors(size: UInt64, first: [UInt8], read: (Range<UInt64>) throws -> [UInt8]) -> [Range<UInt64>]? {
        let n = first.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
        guard n >= 2, n <= UInt64(maxHeader), 8 + n <= size else { return nil }
        guard let header = try? read(8..<(8 + n)), header.count == Int(n), header.first == UInt8(ascii: "{") else { return nil }
        guard let json = try? JSONSerialization.jsonObject(with: Data(header)) as? [String: Any] else { return nil }
        let base = 8 + n
        var tensors: [(String, Range<UInt64>)] = []
        for (name, value) in json where name != "__metadata__" {
            guard let t = value as? [String: Any], let offsets = t["data_offsets"] as? [Any], offsets.count == 2,
                  let a = (offsets[0] as? NSNumber)?.int64Value, let b = (offsets[1] as? NSNumber)?.int64Value,
                  a >= 0, b >= a, base + UInt64(b) <= size else { return nil }
            tensors.append((name, (base + UInt64(a))..<(base + UInt64(b))))
        }
        guard !tensors.isEmpty else { return nil }
        return [0..<base] + tensors.sorted { $0.0 < $1.0 }.map(\.1).filter { !$0.isEmpty }
    }

    /// The chunks (indexes into `offsets`, where offsets[i] is where chunk i starts and the
    /// last element is the end) that hold `ranges`, in the ranges' order, each once.
    static func chunkOrder(_ ranges: [Range<UInt64>], offsets: [UInt64]) -> [Int] {
        let count = offsets.count - 1
        guard count > 0 else { return [] }
        var seen = Set<Int>(), out: [Int] = []
        func index(of offset: UInt64) -> Int {
            var lo = 0, hi = count - 1
            while lo < hi {
                let mid = (lo + hi + 1) / 2
                if offsets[mid] <= offset { lo = mid } else { hi = mid - 1 }
            }
            return lo
        }
        for r in ranges where !r.isEmpty && r.lowerBound < offsets[count] {
            var i = index(of: r.lowerBound)
            while i < count && offsets[i] < r.upperBound {
                if seen.insert(i).inserted { out.append(i) }
                i += 1
            }
        }
        return out
    }
}
