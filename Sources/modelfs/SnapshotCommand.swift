import ArgumentParser
import Foundation
import ModelFS
import ModelFSCore

/// `modelfs snapshot SRC DST`, `modelfs snapshot --delete DST` (FileSystem.snapshot).
struct SnapshotCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot",
        abstract: "A read-only, instant copy of a directory tree in the same mount: metadata only, every block shared.",
        discussion: """
            The copy takes no space for data and is not replicated again: its files reference the \
            source's blocks, which garbage collection keeps while either tree does. Every file and \
            directory of the copy is immutable (writes, renames, chmod, rm fail with EPERM, as for \
            `chattr +i`) until `modelfs snapshot --delete DST` removes it. Files open for writing \
            are copied as last committed (closed or fsynced).

              modelfs snapshot ~/ckpt/run1 ~/ckpt/run1@step-5000
              modelfs snapshot --delete ~/ckpt/run1@step-5000
            """)

    @Argument(help: "The directory (or file) to copy.") var source: String?
    @Argument(help: "Where the copy goes: a new name in the same mount.") var destination: String?
    @Option(name: .customLong("delete"), help: "Remove this snapshot (and nothing that is not one).") var delete: String?
    @Flag(help: "Print the outcome as JSON.") var json = false

    func validate() throws {
        if delete != nil {
            if source != nil { throw ValidationError("--delete takes only the snapshot to remove") }
        } else if source == nil || destination == nil {
            throw ValidationError("expected SRC DST (or --delete DST)")
        }
    }

    static func hex(_ name: String) -> String {
        RawName.bytes(name).map { String(format: "%02x", $0) }.joined()
    }

    /// A path that need not exist yet: its directory made canonical, its last name kept.
    static func newPath(_ path: String) -> (parent: String, name: String) {
        let expanded = (path as NSString).expandingTildeInPath
        let trimmed = expanded.count > 1 && expanded.hasSuffix("/") ? String(expanded.dropLast()) : expanded
        return (canonicalPath((trimmed as NSString).deletingLastPathComponent.isEmpty ? "." : (trimmed as NSString).deletingLastPathComponent),
                (trimmed as NSString).lastPathComponent)
    }

    func run() throws {
        let started = Date()
        var reply: SnapshotReply?
        let shown: String
        if let delete {
            let (parent, name) = Self.newPath(delete)
            shown = parent + "/" + name
            let record = try mountRecord(containing: shown)
            var st = stat()
            guard stat(parent, &st) == 0, lstat(shown, &st) == 0 || errno != ENOENT else {
                throw fail("\(shown): \(String(cString: strerror(errno)))")
            }
            stat(parent, &st)
            try controlStream(record, "unsnapshot \(st.st_ino) \(Self.hex(name))") { reply = try JSONDecoder().decode(SnapshotReply.self, from: $0) }
        } else {
            let (record, words) = try controlTarget(source!)
            let (parent, name) = Self.newPath(destination!)
            shown = parent + "/" + name
            guard name != "." && name != ".." && !name.isEmpty else { throw fail("\(destination!): give the copy a new name") }
            var st = stat()
            if lstat(shown, &st) == 0 { throw fail("\(shown) exists: a snapshot takes a new name") }
            guard stat(parent, &st) == 0 else { throw fail("\(parent): \(String(cString: strerror(errno)))") }
            guard st.st_mode & S_IFMT == S_IFDIR else { throw fail("\(parent) is not a directory") }
            guard (try? mountRecord(containing: parent))?.mountpoint == record.mountpoint else {
                throw fail("\(shown) is not in the mount of \(canonicalPath(source!)) (\(record.mountpoint)): a snapshot shares blocks within one mount")
            }
            try controlStream(record, "snapshot \(st.st_ino) \(Self.hex(name)) " + words) {
                reply = try JSONDecoder().decode(SnapshotReply.self, from: $0)
            }
        }
        guard let r = reply else { throw fail("no answer from the daemon") }
        if json { try printJSON(r); return }
        let o = r.outcome
        let what = "\(o.files) file\(o.files == 1 ? "" : "s") (\(humanBytes(o.bytes))), \(o.directories) director\(o.directories == 1 ? "y" : "ies")"
            + (o.others > 0 ? ", \(o.others) other" : "")
        if delete != nil {
            print("modelfs: deleted snapshot \(shown): \(what)")
        } else {
            print("modelfs: snapshot \(shown) of \(canonicalPath(source!)): \(what), no byte copied, in "
                  + String(format: "%.2f s", Date().timeIntervalSince(started)))
        }
    }
}
