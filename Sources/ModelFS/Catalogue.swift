import Foundation
import ModelFSCore

/// `modelfs ckpt`: which files under a directory make up checkpoints, recognised by the layout
/// each framework writes (names only: no file is opened), grouped into series, and the bytes each
/// checkpoint adds to the one before it in its series. Pure: the daemon feeds it a walk's files.
public enum Catalogue {
    /// A file as the catalogue needs it: its path below the walk's start ("" for the start).
    public struct File: Sendable {
        public var path: String
        public var size: UInt64
        public var mtime: Timestamp
        public var blocks: [ChunkRef]
        public init(path: String, size: UInt64, mtime: Timestamp, blocks: [ChunkRef]) {
            self.path = path; self.size = size; self.mtime = mtime; self.blocks = blocks
        }
    }

    /// One recognised checkpoint.
    public struct Checkpoint: Sendable, Equatable {
        /// Below the walk's start ("" when the start is the checkpoint). For a TensorFlow
        /// checkpoint, its prefix (`tf/ckpt-3`), which names no file.
        public var path: String
        /// Where its metadata lives (`user.modelfs.meta.*`): the directory, the file, or a
        /// TensorFlow checkpoint's `.index` file.
        public var anchor: String
        public var framework: String
        /// The checkpoint's name with every number as `#`, under its directory: checkpoints with
        /// the same series are steps of one run (`run/step-#.pt`).
        public var series: String
        /// The last number in the name that stands alone (`checkpoint-500`, `ckpt-3`, `epoch_2.pt`,
        /// orbax's `2`), nil when there is none (`model.safetensors`, `tiny-gpt2`).
        public var step: Int?
        /// Indices into the files given, in path order.
        public var files: [Int]
        public var bytes: UInt64
        /// Bytes of its distinct blocks that the previous checkpoint of its series does not have
        /// (for the first of a series, all its distinct blocks): what saving it added.
        public var newBytes: UInt64
        /// The newest mtime of its files.
        public var mtime: Timestamp
    }

    /// The checkpoints among `files`, by series and then by step (or mtime where there is none).
    /// `rootName` is the last component of the walk's start (a checkpoint directory's own name).
    public static func recognise(_ files: [File], rootName: String) -> [Checkpoint] {
        let root = Dir()
        for (i, f) in files.enumerated() {
            if f.path.isEmpty { root.files[rootName] = i; continue }
            var d = root
            let parts = f.path.split(separator: "/", omittingEmptySubsequences: true).map(String.init)
            for p in parts.dropLast() {
                if let next = d.dirs[p] { d = next } else { let n = Dir(); d.dirs[p] = n; d = n }
            }
            d.files[parts.last!] = i
        }
        var found: [Checkpoint] = []
        let rootIsFile = files.count == 1 && files[0].path.isEmpty
        func emit(_ path: String, anchor: String, framework: String, name: String, indices: [Int]) {
            let parent = (path as NSString).deletingLastPathComponent
            let template = seriesName(name)
            let sorted = indices.sorted { files[$0].path < files[$1].path }
            found.append(Checkpoint(path: path, anchor: anchor, framework: framework,
                                    series: parent.isEmpty ? template : parent + "/" + template, step: step(in: name),
                                    files: sorted, bytes: sorted.reduce(0) { $0 + files[$1].size }, newBytes: 0,
                                    mtime: sorted.map { files[$0].mtime }.max() ?? Timestamp(seconds: 0, nanoseconds: 0)))
        }
        func join(_ a: String, _ b: String) -> String { a.isEmpty ? b : a + "/" + b }
        func visit(_ d: Dir, _ path: String, _ name: String) {
            if let fw = directoryFramework(d, name: name) {
                emit(path, anchor: path, framework: fw, name: name, indices: d.allFiles())
                return
            }
            var claimed = Set<String>()
            // TensorFlow's tf.train.Checkpoint: PREFIX.index and PREFIX.data-NNNNN-of-NNNNN.
            for n in d.files.keys where n.hasSuffix(".index") {
                let prefix = String(n.dropLast(".index".count))
                let data = d.files.keys.filter { $0.hasPrefix(prefix + ".data-") }
                guard !data.isEmpty else { continue }
                let names = [n] + data
                claimed.formUnion(names)
                emit(join(path, prefix), anchor: join(path, n), framework: "tensorflow", name: prefix,
                     indices: names.map { d.files[$0]! })
            }
            for (n, i) in d.files where !claimed.contains(n) {
                guard let fw = fileFramework(n) else { continue }
                let p = rootIsFile ? "" : join(path, n)
                emit(p, anchor: p, framework: fw, name: n, indices: [i])
            }
            for (n, sub) in d.dirs { visit(sub, join(path, n), n) }
        }
        visit(root, "", rootName)
        return ordered(found, files)
    }

    /// Sorts by series, then step (mtime where either has none), and fills `newBytes`.
    static func ordered(_ found: [Checkpoint], _ files: [File]) -> [Checkpoint] {
        var list = found.sorted { a, b in
            if a.series != b.series { return a.series < b.series }
            if let x = a.step, let y = b.step, x != y { return x < y }
            if a.mtime != b.mtime { return a.mtime < b.mtime }
            return a.path < b.path
        }
        var previous: (series: String, ids: Set<BlockID>)?
        for k in list.indices {
            var ids = Set<BlockID>()
            var added: UInt64 = 0
            for i in list[k].files {
                for b in files[i].blocks where ids.insert(b.id).inserted {
                    if previous?.series != list[k].series || !previous!.ids.contains(b.id) { added += UInt64(b.length) }
                }
            }
            list[k].newBytes = added
            previous = (list[k].series, ids)
        }
        return list
    }

    final class Dir {
        var files: [String: Int] = [:]
        var dirs: [String: Dir] = [:]
        func allFiles() -> [Int] { Array(files.values) + dirs.values.flatMap { $0.allFiles() } }
    }

    /// A directory that is one checkpoint as a whole, by the files its framework puts in it.
    static func directoryFramework(_ d: Dir, name: String) -> String? {
        let f = d.files
        if f[".metadata"] != nil && f.keys.contains(where: { $0.hasSuffix(".distcp") }) { return "torch-dcp" }
        if f["_CHECKPOINT_METADATA"] != nil { return "orbax" }
        if f["_METADATA"] != nil && (f["manifest.ocdbt"] != nil || f["_sharding"] != nil) { return "orbax" }
        if f["saved_model.pb"] != nil || f["saved_model.pbtxt"] != nil { return "tensorflow-savedmodel" }
        let weights = f.keys.contains { $0.hasSuffix(".safetensors") || ($0.hasPrefix("pytorch_model") && $0.hasSuffix(".bin"))
            || $0 == "tf_model.h5" || $0 == "flax_model.msgpack" }
        if f["config.json"] != nil && weights { return "huggingface" }
        if f["model.safetensors.index.json"] != nil { return "safetensors-sharded" }
        if f["pytorch_model.bin.index.json"] != nil { return "torch-sharded" }
        if name.hasPrefix("models--") && d.dirs["snapshots"] != nil { return "huggingface-hub" }
        if let meta = d.dirs["metadata"], meta.files.keys.contains(where: { $0.hasPrefix("part-") }),
           d.dirs["data"] != nil || d.dirs["stages"] != nil || d.dirs["bestModel"] != nil { return "spark" }
        return nil
    }

    /// A file that is one checkpoint, by its name.
    static func fileFramework(_ name: String) -> String? {
        let n = name.lowercased()
        if n.hasSuffix(".tmp") || n.hasPrefix(".") { return nil }
        let ext = (n as NSString).pathExtension
        switch ext {
        case "safetensors": return "safetensors"
        case "pt", "pth", "ckpt": return "torch"
        case "bin": return n.hasPrefix("pytorch_model") ? "torch" : nil
        case "keras": return "keras"
        case "h5", "hdf5": return n.hasSuffix(".weights.h5") ? "keras-weights" : "hdf5"
        case "npy", "npz": return "numpy"
        case "joblib": return "joblib"
        case "gguf": return "gguf"
        case "onnx": return "onnx"
        case "msgpack": return "flax"
        default: return nil
        }
    }

    /// The name with every run of digits as `#` (`checkpoint-500` → `checkpoint-#`).
    static func seriesName(_ name: String) -> String {
        var out = ""
        var inDigits = false
        for c in name {
            if c.isASCII && c.isNumber {
                if !inDigits { out.append("#") }
                inDigits = true
            } else {
                out.append(c); inDigits = false
            }
        }
        return out
    }

    /// The last run of digits with no letter on either side (`w-03.weights.h5` → 3, `gpt2` → nil).
    static func step(in name: String) -> Int? {
        let chars = Array(name)
        var best: Int?
        var i = 0
        while i < chars.count {
            guard chars[i].isASCII && chars[i].isNumber else { i += 1; continue }
            var j = i
            while j < chars.count && chars[j].isASCII && chars[j].isNumber { j += 1 }
            let before = i == 0 || !chars[i - 1].isLetter
            let after = j == chars.count || !chars[j].isLetter
            if before && after, let v = Int(String(chars[i..<j])) { best = v }
            i = j
        }
        return best
    }

    // MARK: queries (`modelfs ckpt find --where`)

    /// One condition of `--where`: `KEY OP VALUE` with OP one of `>= <= != == = > <`, or `KEY`
    /// alone (the key is present). Numbers compare as numbers when both sides are numbers,
    /// otherwise as strings.
    public struct Condition: Sendable, Equatable {
        public enum Op: String, Sendable, CaseIterable { case ge = ">=", le = "<=", ne = "!=", eq2 = "==", eq = "=", gt = ">", lt = "<" }
        public var key: String
        public var op: Op?
        public var value: String

        public init(parsing text: String) throws {
            // The first operator found, longest first at each position.
            let chars = Array(text)
            for i in chars.indices {
                for op in Op.allCases where text.dropFirst(i).hasPrefix(op.rawValue) {
                    key = String(chars[..<i]).trimmingCharacters(in: .whitespaces)
                    value = String(chars[(i + op.rawValue.count)...]).trimmingCharacters(in: .whitespaces)
                    self.op = op
                    guard !key.isEmpty else { throw FSError.invalid("--where '\(text)': no key before \(op.rawValue)") }
                    return
                }
            }
            key = text.trimmingCharacters(in: .whitespaces)
            op = nil
            value = ""
            guard !key.isEmpty else { throw FSError.invalid("--where '': expected KEY, or KEY OP VALUE with OP one of >= <= != = > <") }
        }

        /// Whether a record whose `key` is `actual` (nil: absent) satisfies this condition.
        public func holds(_ actual: String?) -> Bool {
            guard let op else { return actual != nil }
            guard let actual else { return op == .ne }
            let order: Int
            if let a = Double(actual), let b = Double(value) {
                order = a < b ? -1 : (a > b ? 1 : 0)
            } else {
                order = actual < value ? -1 : (actual > value ? 1 : 0)
            }
            switch op {
            case .ge: return order >= 0
            case .le: return order <= 0
            case .gt: return order > 0
            case .lt: return order < 0
            case .eq, .eq2: return order == 0
            case .ne: return order != 0
            }
        }
    }

    /// The prefix of the xattrs that hold a file's or directory's metadata.
    public static let metaPrefix = "user.modelfs.meta."

    /// Whether `key` can name metadata: not empty, no `=`, no whitespace or control character,
    /// and the xattr name it makes within the kernel's 255 bytes.
    public static func validKey(_ key: String) -> Bool {
        !key.isEmpty && (metaPrefix + key).utf8.count <= 255
            && !key.unicodeScalars.contains { $0 == "=" || $0.properties.isWhitespace || $0.value < 0x20 || $0.value == 0x7f }
    }
}
