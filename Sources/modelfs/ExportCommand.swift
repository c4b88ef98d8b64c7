import ArgumentParser
import CModelFSSys
import Crypto
import Foundation
import ModelFS

/// What `modelfs export` writes beside a checkpoint's files (`modelfs-manifest.json`) and
/// `modelfs import` checks every byte against: each file's size and SHA-256, each entry's mode
/// and mtime, and the `modelfs ckpt tag` metadata that lived in xattrs on the mount.
struct ExportManifest: Codable {
    static let fileName = "modelfs-manifest.json"
    static let currentFormat = "modelfs-export/1"

    struct Entry: Codable {
        /// Below the exported root, "/"-separated.
        var path: String
        /// "file", "directory" or "symlink".
        var kind: String
        var size: UInt64?
        var sha256: String?
        var target: String?
        var mode: UInt32
        var mtime: Double
        var metadata: [String: String]?
    }
    var format: String
    /// The path it was exported from, and when.
    var source: String
    var exported: String
    /// The exported directory's (or file's) own metadata.
    var metadata: [String: String]
    var entries: [Entry]
}

/// Copying trees in and out of a mount with every file hashed on the way and read back.
enum TreeCopy {
    static let bufferSize = 4 << 20

    struct Source {
        var path: String
        var rel: String
        var st: stat
    }

    /// Every entry below `root` (a directory), parents before children, in name order.
    static func walk(_ root: String) throws -> [Source] {
        var out: [Source] = []
        func visit(_ dir: String, _ rel: String) throws {
            let names = try directoryNames(dir).sorted()
            for n in names {
                let p = dir + "/" + n
                var st = stat()
                guard lstat(p, &st) == 0 else { throw fail("\(p): \(String(cString: strerror(errno)))") }
                let r = rel.isEmpty ? n : rel + "/" + n
                out.append(Source(path: p, rel: r, st: st))
                if st.st_mode & S_IFMT == S_IFDIR { try visit(p, r) }
            }
        }
        try visit(root, "")
        return out
    }

    static func hex(_ d: SHA256.Digest) -> String { d.map { String(format: "%02x", $0) }.joined() }

    /// Reads `path` to its end in `bufferSize` pieces, handing each to `each`; returns the size
    /// and the SHA-256 of the bytes read.
    static func stream(_ path: String, _ each: (UnsafeRawBufferPointer) throws -> Void = { _ in }) throws -> (size: UInt64, sha256: String) {
        let i = open(path, O_RDONLY | O_CLOEXEC)
        guard i >= 0 else { throw fail("\(path): \(String(cString: strerror(errno)))") }
        defer { close(i) }
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: bufferSize, alignment: 4096)
        defer { buf.deallocate() }
        var h = SHA256()
        var total: UInt64 = 0
        while true {
            let n = read(i, buf.baseAddress, bufferSize)
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw fail("\(path): \(String(cString: strerror(errno)))") }
            if n == 0 { break }
            let piece = UnsafeRawBufferPointer(rebasing: buf[0..<n])
            h.update(bufferPointer: piece)
            try each(piece)
            total += UInt64(n)
        }
        return (total, hex(h.finalize()))
    }

    /// Copies `from` to a new file `to` (fsynced, its pages then dropped from the page cache),
    /// returning its size and the SHA-256 of the bytes read.
    static func copy(_ from: String, _ to: String) throws -> (size: UInt64, sha256: String) {
        let o = open(to, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard o >= 0 else { throw fail("\(to): \(String(cString: strerror(errno)))") }
        defer { close(o) }
        let result = try stream(from) { try writeAll(o, $0, to) }
        guard fsync(o) == 0 else { throw fail("\(to): \(String(cString: strerror(errno)))") }
        // Synced pages can be dropped: the read-back that follows then reads the disk, not memory.
        _ = posix_fadvise(o, 0, 0, POSIX_FADV_DONTNEED)
        return result
    }

    /// The SHA-256 of a file as read now.
    static func hash(_ path: String) throws -> (size: UInt64, sha256: String) { try stream(path) }

    static func setTimes(_ path: String, mtime: Double) {
        let ts = timespec(tv_sec: Int(mtime.rounded(.down)), tv_nsec: Int((mtime - mtime.rounded(.down)) * 1e9))
        var times = [ts, ts]
        _ = utimensat(AT_FDCWD, path, &times, AT_SYMLINK_NOFOLLOW)
    }

    static func mtime(_ st: stat) -> Double { Double(st.st_mtim.tv_sec) + Double(st.st_mtim.tv_nsec) / 1e9 }

    /// Removes a partial copy, quietly: the failure that led here is what gets reported.
    static func discard(_ path: String) { removeTree(path) }

    static func fsyncDirectory(_ path: String) {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if fd >= 0 { fsync(fd); close(fd) }
    }

    /// Where a copy is built before it takes its name: beside it, so the rename is atomic.
    static func partial(_ dest: String) -> String {
        (dest as NSString).deletingLastPathComponent + "/." + (dest as NSString).lastPathComponent + ".modelfs-partial-\(getpid())"
    }
}

struct ExportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export",
        abstract: "Write a checkpoint out of the mount to a plain directory, with a manifest of every file's SHA-256, each read back and checked.",
        discussion: """
            DEST must not exist; it appears only once every file is written, synced and read back. \
            The manifest (DEST/modelfs-manifest.json) holds sizes, SHA-256s, modes, mtimes and the \
            `modelfs ckpt tag` metadata; `modelfs import DEST PATH` checks it all on the way back in.

              modelfs export ~/ckpt/run1/checkpoint-500 /mnt/archive/run1-500
            """)

    @Argument(help: "A checkpoint directory or file inside a modelfs mount, or a TensorFlow checkpoint's prefix.") var path: String
    @Argument(help: "A new directory (outside the mount or in it).") var destination: String
    @Flag(help: "Print the manifest written as JSON.") var json = false

    func run() throws {
        _ = try mountRecord(containing: path)
        var src = canonicalPath(path)
        var st = stat()
        // A TensorFlow checkpoint's prefix names no file: its .index and .data-* files.
        var only: ((String) -> Bool)?
        if lstat(src, &st) != 0 {
            let dir = (src as NSString).deletingLastPathComponent, prefix = (src as NSString).lastPathComponent
            guard access(src + ".index", F_OK) == 0 else { throw fail("\(src): \(String(cString: strerror(ENOENT)))") }
            only = { $0 == prefix + ".index" || $0.hasPrefix(prefix + ".data-") }
            src = dir
            guard lstat(src, &st) == 0 else { throw fail("\(src): \(String(cString: strerror(errno)))") }
        }
        let (parent, name) = SnapshotCommand.newPath(destination)
        let dest = parent + "/" + name
        var dst = stat()
        if lstat(dest, &dst) == 0 { throw fail("\(dest) exists: export writes a new directory") }
        guard stat(parent, &dst) == 0, dst.st_mode & S_IFMT == S_IFDIR else { throw fail("\(parent): not a directory") }

        let sources: [TreeCopy.Source]
        switch st.st_mode & S_IFMT {
        case S_IFDIR:
            sources = try TreeCopy.walk(src).filter { s in only.map { $0(s.rel) } ?? true }
        case S_IFREG:
            sources = [TreeCopy.Source(path: src, rel: (src as NSString).lastPathComponent, st: st)]
        default:
            throw fail("\(src): export takes a directory or a regular file")
        }
        let work = TreeCopy.partial(dest)
        guard mkdir(work, 0o755) == 0 else { throw fail("\(work): \(String(cString: strerror(errno)))") }
        do {
            let f = ISO8601DateFormatter()
            var manifest = ExportManifest(format: ExportManifest.currentFormat, source: only == nil ? src : canonicalPath(path),
                                          exported: f.string(from: Date()),
                                          metadata: only == nil && st.st_mode & S_IFMT == S_IFDIR ? try CkptCommand.Tag.read(src) : [:], entries: [])
            var bytes: UInt64 = 0, files = 0, skipped: [String] = []
            for s in sources {
                let to = work + "/" + s.rel
                var e = ExportManifest.Entry(path: s.rel, kind: "file", mode: UInt32(s.st.st_mode & 0o7777), mtime: TreeCopy.mtime(s.st))
                switch s.st.st_mode & S_IFMT {
                case S_IFDIR:
                    e.kind = "directory"
                    guard mkdir(to, 0o755) == 0 else { throw fail("\(to): \(String(cString: strerror(errno)))") }
                case S_IFLNK:
                    e.kind = "symlink"
                    let target = try linkTarget(s.path)
                    e.target = target
                    guard symlink(target, to) == 0 else { throw fail("\(to): \(String(cString: strerror(errno)))") }
                case S_IFREG:
                    let (size, sha) = try TreeCopy.copy(s.path, to)
                    // Read back from DEST's disk: what is there is what was read from the mount.
                    let back = try TreeCopy.hash(to)
                    guard back == (size, sha) else { throw fail("\(to) reads back differently from what was written (a failing disk?)") }
                    e.size = size; e.sha256 = sha
                    bytes += size; files += 1
                default:
                    skipped.append(s.rel)
                    continue
                }
                let meta = try CkptCommand.Tag.read(s.path)
                if !meta.isEmpty { e.metadata = meta }
                manifest.entries.append(e)
            }
            // Modes and times once the contents are in, deepest first.
            for e in manifest.entries.reversed() where e.kind != "symlink" {
                chmod(work + "/" + e.path, mode_t(e.mode))
                TreeCopy.setTimes(work + "/" + e.path, mtime: e.mtime)
            }
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
            let data = try enc.encode(manifest)
            let mpath = work + "/" + ExportManifest.fileName
            try writeNew(mpath, data)
            TreeCopy.fsyncDirectory(work)
            guard rename(work, dest) == 0 else { throw fail("\(dest): \(String(cString: strerror(errno)))") }
            TreeCopy.fsyncDirectory(parent)
            if json { try printJSON(manifest); return }
            print("modelfs: exported \(files) file\(files == 1 ? "" : "s") (\(humanBytes(bytes))) of \(manifest.source) to \(dest), "
                  + "each read back and matched (SHA-256s in \(ExportManifest.fileName))")
            if !skipped.isEmpty { print("modelfs: not exported (special files): \(skipped.joined(separator: ", "))") }
        } catch {
            TreeCopy.discard(work)
            throw error
        }
    }
}

struct ImportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "import",
        abstract: "Copy a directory exported by `modelfs export` into the mount, checking every file against its manifest.",
        discussion: """
            Each file's SHA-256 is computed as it is read from SRC and compared with the manifest, \
            then read back from the mount and compared again; the metadata, modes and mtimes are \
            restored. PATH must not exist; it appears only when all of that has passed, and nothing \
            is left behind when it does not. A directory without a manifest is copied and read \
            back the same way.

              modelfs import /mnt/archive/run1-500 ~/ckpt/run1/checkpoint-500
            """)

    @Argument(help: "A directory written by `modelfs export` (or any plain directory).") var source: String
    @Argument(help: "A new path inside a modelfs mount.") var path: String
    @Flag(help: "Print the outcome as JSON.") var json = false

    struct Outcome: Codable {
        var path: String
        var files: Int
        var bytes: UInt64
        var verifiedAgainstManifest: Bool
    }

    func run() throws {
        let src = canonicalPath(source)
        var st = stat()
        guard stat(src, &st) == 0 else { throw fail("\(src): \(String(cString: strerror(errno)))") }
        guard st.st_mode & S_IFMT == S_IFDIR else { throw fail("\(src): import takes a directory (what `modelfs export` writes)") }
        let (parent, name) = SnapshotCommand.newPath(path)
        let dest = parent + "/" + name
        _ = try mountRecord(containing: parent)
        if lstat(dest, &st) == 0 { throw fail("\(dest) exists: import makes a new path") }
        guard stat(parent, &st) == 0, st.st_mode & S_IFMT == S_IFDIR else { throw fail("\(parent): not a directory") }

        let mpath = src + "/" + ExportManifest.fileName
        var manifest: ExportManifest?
        var mst = stat()
        if lstat(mpath, &mst) == 0 {
            guard let data = readWhole(mpath) else { throw fail("\(mpath): cannot read") }
            do { manifest = try JSONDecoder().decode(ExportManifest.self, from: data) } catch {
                throw fail("\(mpath): not a modelfs export manifest (\(error))")
            }
            guard manifest!.format == ExportManifest.currentFormat else {
                throw fail("\(mpath): format \(manifest!.format); this modelfs reads \(ExportManifest.currentFormat)")
            }
            for e in manifest!.entries where e.path.split(separator: "/").contains(where: { $0 == ".." || $0 == "." }) || e.path.hasPrefix("/") {
                throw fail("\(mpath): entry \(e.path) leaves the directory")
            }
        }
        // Without a manifest: what is there, as found.
        let entries: [ExportManifest.Entry] = try manifest?.entries ?? TreeCopy.walk(src).compactMap { s in
            var e = ExportManifest.Entry(path: s.rel, kind: "file", mode: UInt32(s.st.st_mode & 0o7777), mtime: TreeCopy.mtime(s.st))
            switch s.st.st_mode & S_IFMT {
            case S_IFDIR: e.kind = "directory"
            case S_IFLNK: e.kind = "symlink"; e.target = try linkTarget(s.path)
            case S_IFREG: break
            default: return nil
            }
            return e
        }
        let work = TreeCopy.partial(dest)
        guard mkdir(work, 0o755) == 0 else { throw fail("\(work): \(String(cString: strerror(errno)))") }
        var out = Outcome(path: dest, files: 0, bytes: 0, verifiedAgainstManifest: manifest != nil)
        do {
            for e in entries {
                let from = src + "/" + e.path, to = work + "/" + e.path
                switch e.kind {
                case "directory":
                    guard mkdir(to, 0o755) == 0 else { throw fail("\(to): \(String(cString: strerror(errno)))") }
                case "symlink":
                    guard let t = e.target, symlink(t, to) == 0 else { throw fail("\(to): \(String(cString: strerror(errno)))") }
                default:
                    let (size, sha) = try TreeCopy.copy(from, to)
                    if let want = e.sha256, want != sha || e.size != size {
                        throw fail("\(from): its SHA-256 or size differs from the manifest's (the export is damaged or was changed); nothing imported")
                    }
                    guard try TreeCopy.hash(to) == (size, sha) else {
                        throw fail("\(e.path) reads back from the mount differently from what was written; nothing imported")
                    }
                    out.files += 1; out.bytes += size
                }
                for (k, v) in e.metadata ?? [:] {
                    guard setxattr(to, Catalogue.metaPrefix + k, v, v.utf8.count, 0) == 0 else {
                        throw fail("\(to): cannot restore metadata \(k): \(String(cString: strerror(errno)))")
                    }
                }
            }
            for (k, v) in manifest?.metadata ?? [:] where setxattr(work, Catalogue.metaPrefix + k, v, v.utf8.count, 0) != 0 {
                throw fail("\(dest): cannot restore metadata \(k): \(String(cString: strerror(errno)))")
            }
            for e in entries.reversed() where e.kind != "symlink" {
                chmod(work + "/" + e.path, mode_t(e.mode))
                TreeCopy.setTimes(work + "/" + e.path, mtime: e.mtime)
            }
            guard rename(work, dest) == 0 else { throw fail("\(dest): \(String(cString: strerror(errno)))") }
        } catch {
            TreeCopy.discard(work)
            throw error
        }
        if json { try printJSON(out); return }
        print("modelfs: imported \(out.files) file\(out.files == 1 ? "" : "s") (\(humanBytes(out.bytes))) to \(dest), each read back and "
              + (manifest != nil ? "matched against \(ExportManifest.fileName)" : "matched (no manifest in \(src): checked against the bytes read)"))
    }
}
