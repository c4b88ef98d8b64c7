import ArgumentParser
import Foundation
import Yams

/// A mount's flags in a YAML file (`modelfs mount --config FILE`): each key is a long flag of
/// `modelfs mount` without its dashes (`secret-file` or `secret_file`), each value its value:
///
///     meta: etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379
///     data: /var/lib/modelfs
///     secret-file: /etc/modelfs/secret
///     advertise: 10.0.0.7:7420
///     replicas: 3
///     passthrough: true          # false → --no-passthrough
///     options: [allow_other]     # -o, one entry each
///
/// The file becomes flags placed before the command line's, so a flag given on the command line
/// wins. The keys are checked against `modelfs mount` itself (no second list to drift), and
/// every problem is reported with its line.
struct ConfigFile {
    struct Entry {
        let key: String
        let line: Int
        let arguments: [String]
    }

    struct Problem: Error, CustomStringConvertible {
        let path: String
        let line: Int?
        let message: String
        var description: String { line.map { "\(path):\($0): \(message)" } ?? "\(path): \(message)" }
    }

    let path: String
    let entries: [Entry]

    /// Keys that are not flags a file may set.
    static let refused: [String: String] = [
        "foreground": "runs in the foreground or not is the caller's choice: pass -f on the command line (systemd does)",
        "ready-fd": "is internal",
        "config": "a config file cannot name another",
        "help": "is not a setting",
        "mountpoint": "the mountpoint is given on the command line (or by fstab or the systemd unit)",
    ]

    /// Reads and parses the file: a YAML mapping of scalars and lists of scalars.
    init(path: String) throws {
        self.path = path
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw Problem(path: path, line: nil, message: FileManager.default.fileExists(atPath: path)
                ? "cannot read it (permissions? not UTF-8?)" : "no such file")
        }
        let root: Node?
        do {
            root = try Yams.compose(yaml: text)
        } catch let e as YamlError {
            throw Problem(path: path, line: Self.line(of: e), message: "not valid YAML: \(Self.summary(of: e))")
        }
        guard let root else { entries = []; return }
        guard case .mapping(let mapping) = root else {
            throw Problem(path: path, line: root.mark?.line, message: "expected `key: value` lines (a YAML mapping)")
        }
        var entries: [Entry] = []
        var seen: [String: Int] = [:]
        for (k, v) in mapping {
            let line = k.mark?.line ?? v.mark?.line ?? 0
            guard let rawKey = k.scalar?.string, !rawKey.isEmpty else {
                throw Problem(path: path, line: line, message: "a key must be a flag's name")
            }
            let key = rawKey.replacingOccurrences(of: "_", with: "-")
            if let why = Self.refused[key] { throw Problem(path: path, line: line, message: "\(rawKey): \(why)") }
            if let first = seen[key] { throw Problem(path: path, line: line, message: "\(rawKey) is set twice (first on line \(first))") }
            seen[key] = line
            let flag = key == "options" || key == "o" ? "-o" : "--" + key
            var values: [Node] = []
            switch v {
            case .scalar: values = [v]
            case .sequence(let s): values = Array(s)
            case .mapping, .alias:
                throw Problem(path: path, line: line, message: "\(rawKey): expected a value or a list of values")
            }
            var args: [String] = []
            for value in values {
                guard let s = value.scalar?.string else {
                    throw Problem(path: path, line: value.mark?.line ?? line, message: "\(rawKey): a list holds values, not lists or mappings")
                }
                switch (s.lowercased(), value.scalar?.style) {
                case ("true", .plain?), ("yes", .plain?), ("on", .plain?): args.append(flag)
                case ("false", .plain?), ("no", .plain?), ("off", .plain?): args.append("--no-" + key)
                default: args += [flag, s]
                }
            }
            entries.append(Entry(key: rawKey, line: line, arguments: args))
        }
        self.entries = entries
    }

    /// Every entry's flags, in the file's order.
    var arguments: [String] { entries.flatMap(\.arguments) }

    /// What is wrong with the file, line by line: each key alone against `modelfs mount`'s own
    /// parser (an unknown key, a value of the wrong kind), then all of them together against its
    /// checks (ranges, sizes, the cluster flags), each problem pinned to the line of the flag it
    /// names. Empty when the file is good.
    func problems() -> [Problem] {
        var out = keyProblems()
        guard out.isEmpty else { return out }
        do {
            let command = try MountCommand.parse(["/"] + arguments)
            for problem in command.settingsProblems() {
                let line = entries.first { e in problem.contains("--" + e.key.replacingOccurrences(of: "_", with: "-")) }?.line
                out.append(Problem(path: path, line: line, message: problem))
            }
        } catch {
            out.append(Problem(path: path, line: nil, message: MountCommand.message(for: error)))
        }
        return out
    }

    /// The keys `modelfs mount` does not know and the values it cannot parse.
    func keyProblems() -> [Problem] {
        var out: [Problem] = []
        for e in entries {
            do {
                _ = try MountCommand.parse(["/"] + e.arguments)
            } catch {
                let m = MountCommand.message(for: error)
                let message = m.contains("Unknown option") || m.contains("Unexpected argument")
                    ? "unknown key \(e.key)" + (suggestion(for: e.key).map { " (did you mean \($0)?)" } ?? "")
                    : "\(e.key): " + m.replacingOccurrences(of: "Error: ", with: "")
                out.append(Problem(path: path, line: e.line, message: message))
            }
        }
        return out
    }

    /// The flag of `modelfs mount` closest to a misspelt key.
    func suggestion(for key: String) -> String? {
        let names = MountCommand.helpMessage(columns: 1000).split(separator: "\n").compactMap { line -> String? in
            guard let r = line.range(of: "--") else { return nil }
            let name = line[r.upperBound...].prefix { $0.isLetter || $0.isNumber || $0 == "-" }
            return name.isEmpty || name.hasPrefix("no-") ? nil : String(name)
        }
        let k = key.lowercased().replacingOccurrences(of: "_", with: "-")
        let best = names.map { ($0, editDistance(k, $0)) }.min { $0.1 < $1.1 }
        return best.flatMap { $0.1 <= max(2, k.count / 3) ? $0.0 : nil }
    }

    static func line(of error: YamlError) -> Int? {
        switch error {
        case .scanner(_, _, let mark, _), .parser(_, _, let mark, _), .composer(_, _, let mark, _): mark.line
        case .duplicatedKeysInMapping(_, let context): context.mark.line
        default: nil
        }
    }

    static func summary(of error: YamlError) -> String {
        switch error {
        case .scanner(let context, let problem, _, _), .parser(let context, let problem, _, _), .composer(let context, let problem, _, _):
            [context?.text, problem].compactMap { $0 }.filter { !$0.isEmpty }.joined(separator: ", ")
        case .duplicatedKeysInMapping(let keys, _): "key \(keys.joined(separator: ", ")) is set twice"
        default: "\(error)"
        }
    }
}

/// Levenshtein distance, for "did you mean".
func editDistance(_ a: String, _ b: String) -> Int {
    let a = Array(a), b = Array(b)
    var row = Array(0...b.count)
    for i in 1...max(1, a.count) where !a.isEmpty {
        var prev = row[0]
        row[0] = i
        for j in stride(from: 1, through: b.count, by: 1) {
            let cur = row[j]
            row[j] = min(row[j] + 1, row[j - 1] + 1, prev + (a[i - 1] == b[j - 1] ? 0 : 1))
            prev = cur
        }
    }
    return a.isEmpty ? b.count : row[b.count]
}

struct ConfigCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "config",
        abstract: "Check a config file for `modelfs mount --config`.",
        subcommands: [Check.self])

    struct Check: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Explain what is wrong with a config file, line by line (exit 1), or print the flags it stands for.")

        @Argument(help: "The YAML file.")
        var file: String

        func run() throws {
            let config: ConfigFile
            do { config = try ConfigFile(path: file) } catch let p as ConfigFile.Problem { throw fail(p.description) }
            let problems = config.problems()
            if problems.isEmpty {
                print("\(file): ok: modelfs mount " + config.arguments.map(shellQuoted).joined(separator: " "))
                return
            }
            for p in problems { FileHandle.writeStderr("modelfs: \(p)\n") }
            throw ExitCode(1)
        }
    }
}

/// `s` as one shell word.
func shellQuoted(_ s: String) -> String {
    if !s.isEmpty && s.allSatisfy({ $0.isLetter || $0.isNumber || "-_./:=,@%+".contains($0) }) { return s }
    return "'" + s.replacingOccurrences(of: "'", with: "'\\''") + "'"
}
