import ArgumentParser
import CModelFSSys
import Foundation
import ModelFS
import ModelFSCore

/// `modelfs ckpt`: the checkpoint catalogue. The daemon recognises checkpoints under a path
/// (`Catalogue`); metadata is xattrs `user.modelfs.meta.KEY` set through the mount, so every
/// node sees it, it moves with renames, and `getfattr -d` reads it without this command.
struct CkptCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ckpt",
        abstract: "The checkpoints under a path: list them, tag them with metadata, find the best.",
        discussion: """
            Checkpoints are recognised by the layout their framework writes: torch files, safetensors, \
            Hugging Face directories (and hub caches), torch.distributed.checkpoint, TensorFlow \
            checkpoints and SavedModels, Orbax steps, Keras and HDF5 files, Spark ML model directories.

              modelfs ckpt list ~/ckpt/run1
              modelfs ckpt tag ~/ckpt/run1/step-500.pt eval.accuracy=0.91 dataset=wiki-2026
              modelfs ckpt find ~/ckpt/run1 --where 'eval.accuracy>=0.9' --max eval.accuracy
              modelfs ckpt show ~/ckpt/run1/step-500.pt
            """,
        subcommands: [List.self, Show.self, Find.self, Tag.self])

    /// The catalogue of `path` from the daemon of its mount.
    static func catalogue(_ path: String) throws -> CatalogueReport {
        let (record, words) = try controlTarget(path)
        var report: CatalogueReport?
        try controlStream(record, "ckpt " + words) { report = try JSONDecoder().decode(CatalogueReport.self, from: $0) }
        guard let report else { throw fail("no catalogue from the daemon of \(record.mountpoint)") }
        return report
    }

    /// "12s", "5m", "3h", "2d".
    static func age(_ s: Double) -> String {
        if s < 120 { return "\(Int(s))s" }
        if s < 7200 { return "\(Int(s / 60))m" }
        if s < 172_800 { return "\(Int(s / 3600))h" }
        return "\(Int(s / 86400))d"
    }

    static func relative(_ p: String, to base: String) -> String {
        p == base ? (p as NSString).lastPathComponent : (p.hasPrefix(base + "/") ? String(p.dropFirst(base.count + 1)) : p)
    }

    static func metadataText(_ m: [String: String]) -> String {
        m.keys.sorted().map { "\($0)=\(m[$0]!)" }.joined(separator: " ")
    }

    static func printTable(_ list: [CatalogueReport.Checkpoint], base: String) {
        var rows = [["CHECKPOINT", "FRAMEWORK", "STEP", "SIZE", "NEW", "STATE", "AGE", "METADATA"]]
        for c in list {
            rows.append([relative(c.path, to: base), c.framework, c.step.map(String.init) ?? "-", humanBytes(c.bytes),
                         humanBytes(c.newBytes), c.state == "replicated" ? c.state : "\(c.state) \(c.replicas)/\(c.wanted)",
                         age(c.ageSeconds), metadataText(c.metadata)])
        }
        let widths = (0..<7).map { col in rows.map { $0[col].count }.max()! }
        for r in rows {
            var line = ""
            for col in 0..<7 { line += r[col].padding(toLength: widths[col], withPad: " ", startingAt: 0) + "  " }
            print((line + r[7]).trimmingCharacters(in: .whitespaces))
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "The checkpoints under PATH: framework, step, size, bytes new since the previous of its series, replication, age, metadata.")
        @Argument(help: "A directory (or checkpoint) inside a modelfs mount; the current directory if none.") var path: String = "."
        @Flag(help: "Print the catalogue as JSON (schema in docs/STATUS.md).") var json = false

        func run() throws {
            let report = try CkptCommand.catalogue(path)
            if json { try printJSON(report); return }
            if report.checkpoints.isEmpty { print("modelfs: no checkpoint under \(report.path)"); return }
            CkptCommand.printTable(report.checkpoints, base: report.path)
            if !report.unansweredNodes.isEmpty { print("nodes not answering (their copies are not counted): \(report.unansweredNodes.joined(separator: ", "))") }
        }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "One checkpoint: its files, its series and what it added, its replication and its metadata.")
        @Argument(help: "A checkpoint file or directory, or a TensorFlow checkpoint's prefix (run/ckpt-3).") var path: String
        @Flag(help: "Print it as JSON (one checkpoint of `ckpt list --json`).") var json = false

        func run() throws {
            let p = canonicalPath(path)
            // Its directory's catalogue: the previous checkpoint of its series is a sibling.
            let report = try CkptCommand.catalogue((p as NSString).deletingLastPathComponent)
            guard let c = report.checkpoints.first(where: { $0.path == p }) else {
                throw fail("\(p) is not a checkpoint modelfs recognises (`modelfs ckpt list \((p as NSString).deletingLastPathComponent)` shows those it does)")
            }
            if json { try printJSON(c); return }
            let f = DateFormatter()
            f.dateFormat = "yyyy-MM-dd HH:mm:ss zzz"
            print("checkpoint  \(c.path)")
            print("framework   \(c.framework)" + (c.step.map { ", step \($0)" } ?? ""))
            print("series      \(c.series)")
            print("size        \(humanBytes(c.bytes)) in \(c.files.count) file\(c.files.count == 1 ? "" : "s"); "
                  + "\(humanBytes(c.newBytes)) new since the previous checkpoint of its series")
            print("state       \(c.state) (\(c.replicas) of \(c.wanted) copies)")
            print("saved       \(f.string(from: Date(timeIntervalSince1970: c.mtime))) (\(CkptCommand.age(c.ageSeconds)) ago)")
            if c.metadata.isEmpty { print("metadata    none (modelfs ckpt tag \(c.path) KEY=VALUE…)") } else { print("metadata") }
            for k in c.metadata.keys.sorted() { print("  \(k) = \(c.metadata[k]!)") }
            print("files")
            // A directory's files below it; a file's (or a TensorFlow prefix's) beside it.
            let base = c.files.allSatisfy { $0.hasPrefix(c.path + "/") } ? c.path : (c.path as NSString).deletingLastPathComponent
            for file in c.files { print("  " + CkptCommand.relative(file, to: base)) }
        }
    }

    struct Find: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "The checkpoints under PATH whose metadata meet every --where; their paths, one per line.",
            discussion: """
                A condition is KEY OP VALUE (OP: >= <= > < = != ) or KEY alone (present). KEY is a metadata \
                key, or one of step, framework, series, bytes, newBytes, state, age (seconds). Values \
                compare as numbers when both are numbers, as text otherwise. Exits 1 when none matches.
                """)
        @Argument(help: "A directory inside a modelfs mount.") var path: String = "."
        @Option(name: .customLong("where"), help: "A condition; repeat for several (all must hold).") var conditions: [String] = []
        @Flag(help: "Only the newest match (by mtime).") var latest = false
        @Option(help: "Only the match with the greatest value of this key.") var max: String?
        @Option(help: "Only the match with the least value of this key.") var min: String?
        @Flag(help: "Print the matches as JSON.") var json = false

        func validate() throws {
            if [latest, max != nil, min != nil].filter({ $0 }).count > 1 { throw ValidationError("--latest, --max and --min pick one each: give one of them") }
        }

        func run() throws {
            let where_ = try conditions.map { text in
                do { return try Catalogue.Condition(parsing: text) } catch let e as FSError { throw fail(e.message) }
            }
            let report = try CkptCommand.catalogue(path)
            var matches = report.checkpoints.filter { c in where_.allSatisfy { $0.holds(Find.value(c, $0.key)) } }
            if latest, let newest = matches.max(by: { ($0.mtime, $0.step ?? 0) < ($1.mtime, $1.step ?? 0) }) { matches = [newest] }
            if let key = max ?? min {
                let scored = matches.compactMap { c in Find.value(c, key).flatMap(Double.init).map { (c, $0) } }
                let pick = max != nil ? scored.max { $0.1 < $1.1 } : scored.min { $0.1 < $1.1 }
                matches = pick.map { [$0.0] } ?? []
            }
            if json { try printJSON(matches) } else { for c in matches { print(c.path) } }
            if matches.isEmpty {
                FileHandle.standardError.write(Data("modelfs: no checkpoint under \(report.path) matches\n".utf8))
                throw ExitCode(1)
            }
        }

        /// A checkpoint's value for `key`: its metadata first, then its own fields.
        static func value(_ c: CatalogueReport.Checkpoint, _ key: String) -> String? {
            if let v = c.metadata[key] { return v }
            switch key {
            case "step": return c.step.map(String.init)
            case "framework": return c.framework
            case "series": return c.series
            case "bytes": return String(c.bytes)
            case "newBytes": return String(c.newBytes)
            case "state": return c.state
            case "age": return String(c.ageSeconds)
            case "path": return c.path
            default: return nil
            }
        }
    }

    struct Tag: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Set metadata on a checkpoint (or any file or directory): KEY=VALUE pairs, stored as xattrs user.modelfs.meta.KEY.",
            discussion: "Every node sees it; it stays with the file through renames, `cp -a` and `modelfs snapshot`. With no pair and no --delete, prints what is set.")
        @Argument(help: "A file or directory inside a modelfs mount, or a TensorFlow checkpoint's prefix.") var path: String
        @Argument(help: "KEY=VALUE pairs (eval.accuracy=0.91 dataset=wiki parent=run1/step-400.pt).") var pairs: [String] = []
        @Option(name: .customLong("delete"), help: "A key to remove; repeat for several.") var deletions: [String] = []

        func run() throws {
            _ = try mountRecord(containing: path)
            var p = canonicalPath(path)
            if access(p, F_OK) != 0 && access(p + ".index", F_OK) == 0 { p += ".index" }   // a TensorFlow prefix
            guard access(p, F_OK) == 0 else { throw fail("\(p): \(String(cString: strerror(errno)))") }
            var set: [(String, String)] = []
            for pair in pairs {
                guard let eq = pair.firstIndex(of: "=") else { throw fail("'\(pair)': expected KEY=VALUE") }
                let key = String(pair[..<eq])
                guard Catalogue.validKey(key) else { throw fail("'\(key)': a key is not empty and has no '=', space or control character") }
                set.append((key, String(pair[pair.index(after: eq)...])))
            }
            for key in deletions where !Catalogue.validKey(key) { throw fail("'\(key)': not a metadata key") }
            for (key, value) in set {
                let name = Catalogue.metaPrefix + key
                let r = value.utf8CString.withUnsafeBufferPointer { v in setxattr(p, name, v.baseAddress, v.count - 1, 0) }
                if r != 0 {
                    let why = errno == ENOSPC ? "no room: a file's xattr names and values fit in 64 KiB" : String(cString: strerror(errno))
                    throw fail("\(p): cannot set \(key): \(why)")
                }
            }
            for key in deletions where removexattr(p, Catalogue.metaPrefix + key) != 0 {
                if errno == ENODATA { throw fail("\(p): no metadata \(key) to delete") }
                throw fail("\(p): cannot delete \(key): \(String(cString: strerror(errno)))")
            }
            if set.isEmpty && deletions.isEmpty {
                for (k, v) in try Tag.read(p).sorted(by: { $0.key < $1.key }) { print("\(k)=\(v)") }
            }
        }

        /// The metadata of `p`, read through the mount.
        static func read(_ p: String) throws -> [String: String] {
            let size = listxattr(p, nil, 0)
            guard size >= 0 else { throw fail("\(p): \(String(cString: strerror(errno)))") }
            var names = [CChar](repeating: 0, count: size + 1)
            let n = listxattr(p, &names, names.count)
            guard n >= 0 else { throw fail("\(p): \(String(cString: strerror(errno)))") }
            var out: [String: String] = [:]
            for name in names[0..<n].split(separator: 0).map({ String(decoding: $0.map { UInt8(bitPattern: $0) }, as: UTF8.self) })
                where name.hasPrefix(Catalogue.metaPrefix) {
                let len = getxattr(p, name, nil, 0)
                guard len >= 0 else { continue }
                var value = [UInt8](repeating: 0, count: len)
                let got = getxattr(p, name, &value, len)
                guard got >= 0 else { continue }
                out[String(name.dropFirst(Catalogue.metaPrefix.count))] = String(decoding: value[0..<got], as: UTF8.self)
            }
            return out
        }
    }
}
