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

    /// What a loader that opened a file reads next.
    public enum Plan: Equatable, Sendable {
        /// These byte ranges of the file, in this order.
        case ranges(format: String, [Range<UInt64>])
        /// These files of the same directory, in this order (each whole, or by its own plan).
        case siblings(format: String, [Sibling])
    }

    /// A file of the same directory, by name.
    public enum Sibling: Equatable, Sendable {
        case named(String)
        /// Every file whose name starts so, in name order.
        case prefix(String)
        /// Every file whose name ends so, in name order.
        case suffix(String)

        public func matches(_ name: String) -> Bool {
            switch self {
            case .named(let n): return name == n
            case .prefix(let p): return name.hasPrefix(p)
            case .suffix(let s): return name.hasSuffix(s) && name.count > s.count
            }
        }
    }

    /// Files at least this large are looked at for their own ranges (safetensors); files up to
    /// `maxIndex` for the files they name (an index, a state file). Others are not read at all.
    public static let minRanged: UInt64 = 4 << 20
    public static let maxIndex: UInt64 = 16 << 20

    /// What a loader of the file reads next, from the file's first bytes (`read(range)` returns
    /// the bytes of a range, fewer at the end of the file); nil if the format is not one this
    /// knows. A first look at 8 bytes decides whether more is read.
    public static func plan(size: UInt64, read: (Range<UInt64>) throws -> [UInt8]) -> Plan? {
        guard size >= 8, let first = try? read(0..<8), first.count == 8 else { return nil }
        if size >= minRanged, let ranges = safetensors(size: size, first: first, read: read) {
            return .ranges(format: "safetensors", ranges)
        }
        guard size <= maxIndex else { return nil }
        switch first[0] {
        case UInt8(ascii: "{"): return huggingFaceIndex(size: size, read: read)
        case UInt8(ascii: "m"): return tensorflowState(size: size, read: read)
        case 0x80: return distributedCheckpoint(size: size, read: read)
        default: return nil
        }
    }

    /// A Hugging Face index (`model.safetensors.index.json`, `pytorch_model.bin.index.json`):
    /// JSON whose `weight_map` maps tensor names to shard files. `from_pretrained` loads
    /// `sorted(set(weight_map.values()))`, one shard after another.
    static func huggingFaceIndex(size: UInt64, read: (Range<UInt64>) throws -> [UInt8]) -> Plan? {
        guard let head = try? read(0..<min(size, 4096)), contains(head, "\"weight_map\""),
              let all = try? read(0..<size), all.count == Int(size),
              let json = try? JSONSerialization.jsonObject(with: Data(all)) as? [String: Any],
              let map = json["weight_map"] as? [String: Any] else { return nil }
        let shards = Set(map.values.compactMap { $0 as? String }).filter(plainName).sorted()
        return shards.isEmpty ? nil : .siblings(format: "huggingface-index", shards.map { .named($0) })
    }

    /// TensorFlow's `checkpoint` state file (text): `model_checkpoint_path: "ckpt-3"` names the
    /// latest checkpoint; `tf.train.Checkpoint.restore` reads `ckpt-3.index`, then its data shards.
    static func tensorflowState(size: UInt64, read: (Range<UInt64>) throws -> [UInt8]) -> Plan? {
        guard size <= 1 << 20, let all = try? read(0..<size), all.count == Int(size) else { return nil }
        let text = String(decoding: all, as: UTF8.self)
        guard text.hasPrefix("model_checkpoint_path:"),
              let line = text.split(separator: "\n").first,
              let open = line.firstIndex(of: "\""), let close = line.lastIndex(of: "\""), open < close else { return nil }
        let path = String(line[line.index(after: open)..<close])
        guard let base = path.split(separator: "/").last.map(String.init), plainName(base) else { return nil }
        return .siblings(format: "tensorflow-checkpoint", [.named(base + ".index"), .prefix(base + ".data-")])
    }

    /// `torch.distributed.checkpoint`'s `.metadata` (a pickle of
    /// `torch.distributed.checkpoint.metadata.Metadata`): the loader reads it, then the shards,
    /// `*.distcp`.
    static func distributedCheckpoint(size: UInt64, read: (Range<UInt64>) throws -> [UInt8]) -> Plan? {
        guard let head = try? read(0..<min(size, 256)), contains(head, "torch.distributed.checkpoint") else { return nil }
        return .siblings(format: "torch-distributed-checkpoint", [.suffix(".distcp")])
    }

    /// A name within the directory: no path separator, not `.` or `..`.
    static func plainName(_ name: String) -> Bool { !name.isEmpty && !name.contains("/") && name != "." && name != ".." }

    static func contains(_ bytes: [UInt8], _ text: String) -> Bool { Data(bytes).range(of: Data(text.utf8)) != nil }

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
        for r in ranges where !r.isEmpty && r.lowerBound < offsets[count] {
            var i = ChunkList.index(of: r.lowerBound, in: offsets)
            while i < count && offsets[i] < r.upperBound {
                if seen.insert(i).inserted { out.append(i) }
                i += 1
            }
        }
        return out
    }
}
