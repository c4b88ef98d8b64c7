import ArgumentParser
import Foundation

/// `mount -t fuse.modelfs SOURCE DIR -o OPTIONS`, and so /etc/fstab and systemd's mount units.
///
/// mount(8) runs `/sbin/mount.fuse.modelfs SOURCE DIR -o OPTIONS` (a link to this binary, made
/// by scripts/install.sh) or, without that link, `/sbin/mount.fuse`, which runs
/// `modelfs SOURCE DIR -o OPTIONS` from the default PATH. Both land here and become
/// `modelfs mount DIR ...`:
/// - SOURCE is the data dir for a single node (`/var/lib/modelfs /ckpt fuse.modelfs defaults 0 0`),
///   or the etcd URL for a cluster node (with `data=DIR`, by default /var/lib/modelfs);
/// - an option named like a flag of `modelfs mount` is that flag (`secret_file=/etc/modelfs/secret`,
///   `replicas=3`, `config=/etc/modelfs/node.yaml`, `no_passthrough`);
/// - mount(8)'s and systemd's own options (`_netdev`, `nofail`, `noauto`, `x-systemd.*`, …)
///   are dropped; the rest (`allow_other`, `ro`, …) go to FUSE as `-o`.
enum MountHelper {
    /// Options only mount(8), fstab or systemd act on.
    static let ignored: Set<String> = ["defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group",
                                       "_netdev", "nofail", "comment"]

    /// True when `args` (without argv[0]) is a helper call: `SOURCE DIR [-o OPTS] ...`, SOURCE
    /// not a subcommand.
    static func isHelperCall(_ args: [String], subcommands: Set<String>) -> Bool {
        guard args.count >= 2, let first = args.first, !first.hasPrefix("-"), !subcommands.contains(first) else { return false }
        return !args[1].hasPrefix("-") && (args.count == 2 || args[2].hasPrefix("-"))
    }

    /// The `modelfs mount` arguments for a helper call's, or the one-line problem.
    static func mountArguments(_ args: [String]) throws -> [String] {
        var positional: [String] = []
        var options: [String] = []
        var i = 0
        while i < args.count {
            let a = args[i]
            switch a {
            case "-o":
                guard i + 1 < args.count else { throw HelperError("-o needs a list of options") }
                options += args[i + 1].split(separator: ",").map(String.init)
                i += 1
            case "-t", "-N":  // the type (fuse.modelfs), a namespace: nothing for us
                i += 1
            case "-n", "-s", "-v", "-i": break  // no mtab, sloppy, verbose, no helper
            case "-r": options.append("ro")
            case "-w": options.append("rw")
            default:
                if a.hasPrefix("-o") && a.count > 2 {
                    options += a.dropFirst(2).split(separator: ",").map(String.init)
                } else if a.hasPrefix("-") {
                    throw HelperError("unknown mount helper flag \(a)")
                } else {
                    positional.append(a)
                }
            }
            i += 1
        }
        guard positional.count == 2 else {
            throw HelperError("usage: mount.fuse.modelfs SOURCE MOUNTPOINT [-o OPTIONS] (SOURCE: the data dir, or etcd://HOST:PORT,... for a cluster node)")
        }
        let (source, mountpoint) = (positional[0], positional[1])
        var out = ["mount", mountpoint]
        var fuse: [String] = []
        var data: String?
        for option in options where !option.isEmpty {
            let (name, value) = option.split(separator: "=", maxSplits: 1).map(String.init).pair
            if ignored.contains(name) || name.hasPrefix("x-") { continue }
            let flag = name.replacingOccurrences(of: "_", with: "-")
            if flag == "data" { data = value; continue }
            let candidate = value.map { ["--" + flag, $0] } ?? ["--" + flag]
            if isMountFlag(candidate) {
                out += candidate
            } else {
                fuse.append(option)
            }
        }
        if source.hasPrefix("etcd://") || source.hasPrefix("sqlite:") || source.hasPrefix("memory:") {
            out += ["--meta", source, "--data", data ?? "/var/lib/modelfs"]
        } else {
            if let data, data != source { throw HelperError("the source \(source) is the data dir; data=\(data) names another") }
            out += ["--data", source]
        }
        if !fuse.isEmpty { out += ["-o", fuse.joined(separator: ",")] }
        return out
    }

    /// True when `modelfs mount` knows the flag (whatever its value's worth: a bad value is
    /// reported by the mount, with the flag's name).
    static func isMountFlag(_ candidate: [String]) -> Bool {
        do {
            _ = try MountCommand.parse(["/"] + candidate)
            return true
        } catch {
            let m = MountCommand.message(for: error)
            return !(m.contains("Unknown option") || m.contains("Unexpected argument"))
        }
    }

    struct HelperError: Error, CustomStringConvertible {
        let description: String
        init(_ d: String) { description = d }
    }
}

extension Array where Element == String {
    /// ["k", "v"] → ("k", "v"); ["k"] → ("k", nil).
    fileprivate var pair: (String, String?) { (self.first ?? "", count > 1 ? self[1] : nil) }
}

/// The command line as ArgumentParser gets it: a mount helper call becomes `mount ...`, and a
/// mount's `--config FILE` becomes the file's flags, placed before the command line's so these win.
func expandedArguments(_ argv: [String]) throws -> [String] {
    var args = Array(argv.dropFirst())
    let name = (argv.first.map { ($0 as NSString).lastPathComponent }) ?? "modelfs"
    let subcommands = Set(ModelFSCommand.configuration.subcommands.map { $0._commandName } + ["help"])
    if name.hasPrefix("mount.") || MountHelper.isHelperCall(args, subcommands: subcommands) {
        args = try MountHelper.mountArguments(args)
    }
    guard args.first == "mount" else { return args }
    var configs: [String] = []
    var rest: [String] = []
    var i = 1
    while i < args.count {
        let a = args[i]
        if a == "--" { rest += args[i...]; break }
        if a == "--config" {
            guard i + 1 < args.count else { throw MountHelper.HelperError("--config needs a file") }
            configs.append(args[i + 1])
            i += 2
            continue
        }
        if a.hasPrefix("--config=") { configs.append(String(a.dropFirst("--config=".count))); i += 1; continue }
        rest.append(a)
        i += 1
    }
    var fromFiles: [String] = []
    for path in configs {
        let file = try ConfigFile(path: path)
        if let problem = file.keyProblems().first { throw problem }
        fromFiles += file.arguments
    }
    return ["mount"] + fromFiles + rest
}
