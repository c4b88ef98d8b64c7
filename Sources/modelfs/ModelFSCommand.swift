import ArgumentParser
import Foundation
import ModelFSBuildInfo
import ModelFSCore

@main
struct ModelFSCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "modelfs",
        abstract: "A FUSE filesystem for model checkpoints: content-addressed, deduplicated blocks behind an ordinary directory.",
        discussion: """
            Save and load checkpoints with your framework's own calls (torch.save, safetensors, h5py, \
            np.save, …) into the mounted directory. Files are cut into content-defined blocks named by \
            their SHA-256, stored once, and verified on every read.

            Start:   modelfs mount ~/ckpt            (data in ~/.local/share/modelfs)
            Check:   modelfs status
            Stop:    modelfs umount ~/ckpt

            A cluster node: modelfs mount ~/ckpt --meta etcd://h1:2379,h2:2379,h3:2379 \\
                --secret-file /etc/modelfs/secret --advertise THIS_HOST:7420 --replicas 3 --ack 1
            """,
        version: "modelfs \(BuildInfo.description)",
        subcommands: [MountCommand.self, UmountCommand.self, StatusCommand.self, SyncCommand.self, WarmCommand.self,
                      VerifyCommand.self, PolicyCommand.self, CkptCommand.self, SnapshotCommand.self, ExportCommand.self, ImportCommand.self, NodeCommand.self, ConfigCommand.self, DebugCommand.self]
    )

    /// ArgumentParser's main, after the rewrites of `expandedArguments` (mount helper, --config).
    static func main() {
        let args: [String]
        do {
            args = try expandedArguments(rawArguments())
        } catch {
            FileHandle.standardError.write(Data("modelfs: \(error)\n".utf8))
            Foundation.exit(1)
        }
        do {
            var command = try parseAsRoot(args)
            try command.run()
        } catch {
            exit(withError: error)
        }
    }
}

/// Prints one line to stderr and exits non-zero: how every user-facing failure ends.
func fail(_ message: String, code: Int32 = 1) -> ExitCode {
    FileHandle.standardError.write(Data("modelfs: \(message)\n".utf8))
    return ExitCode(code)
}

/// How every `--json` prints: sorted keys, slashes as they are ("/ckpt", not "\\/ckpt"), any
/// path quoted and escaped by the encoder; `compact` gives one line (`status --watch --json`).
func printJSON<T: Encodable>(_ value: T, compact: Bool = false) throws {
    let enc = JSONEncoder()
    enc.outputFormatting = compact ? [.sortedKeys, .withoutEscapingSlashes] : [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
    print(String(decoding: try enc.encode(value), as: UTF8.self))
}

func humanBytes(_ n: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    var v = Double(n)
    var i = 0
    while v >= 1024 && i < units.count - 1 { v /= 1024; i += 1 }
    return i == 0 ? "\(n) B" : String(format: "%.1f", v) + " " + units[i]
}

/// Absolute, symlink-free form of a path (the mount table uses these).
func canonicalPath(_ path: String) -> String {
    let expanded = (path as NSString).expandingTildeInPath
    let absolute = expanded.hasPrefix("/") ? expanded : currentDirectory() + "/" + expanded
    if let r = realPath(absolute) { return r }
    return (absolute as NSString).standardizingPath
}
