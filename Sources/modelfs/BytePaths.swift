import CModelFSSys
import Foundation
import Glibc
import ModelFSCore

// Paths in the CLI are bytes, as Linux has them: a path on the command line, or a name read
// from a directory, need not be UTF-8 (ext4 and modelfs take any byte but "/" and NUL). The CLI
// holds them as RawName strings (valid UTF-8 as it is; any other byte as one private-use
// scalar), the same form the daemon's namespace uses, and turns them back into their bytes for
// the kernel.
//
// Swift would turn a String argument of a C call into its UTF-8, which writes an escaped byte as
// four bytes: a different path. So this file declares, for every call the CLI makes with a
// path, an overload that takes a String and passes the path's bytes; being this module's own
// and an exact match for a String, it is the one `stat(p, &st)` and the like resolve to (a
// String literal included). Names read back from the kernel (readdir, readlink, realpath,
// getcwd) come through `RawName.string`. Foundation's FileManager decodes names as UTF-8 and
// replaces what is not (a Latin-1 "café" became "caf\u{FFFD}", which then did not exist): the
// CLI does not use it on user paths.

/// The arguments as given, byte for byte (CommandLine.arguments replaces bytes that are not
/// UTF-8 with U+FFFD).
func rawArguments() -> [String] {
    (0..<Int(CommandLine.argc)).map { i in
        guard let p = CommandLine.unsafeArgv[i] else { return "" }
        return p.withMemoryRebound(to: UInt8.self, capacity: strlen(p)) { RawName.string(UnsafeBufferPointer(start: $0, count: strlen(p))) }
    }
}

@discardableResult
func stat(_ path: String, _ buf: UnsafeMutablePointer<Glibc.stat>) -> Int32 {
    RawName.withCString(path) { fstatat(AT_FDCWD, $0, buf, 0) }
}
@discardableResult
func lstat(_ path: String, _ buf: UnsafeMutablePointer<Glibc.stat>) -> Int32 {
    RawName.withCString(path) { fstatat(AT_FDCWD, $0, buf, AT_SYMLINK_NOFOLLOW) }
}
@discardableResult
func open(_ path: String, _ flags: Int32) -> Int32 {
    RawName.withCString(path) { Glibc.open($0, flags) }
}
@discardableResult
func open(_ path: String, _ flags: Int32, _ mode: mode_t) -> Int32 {
    RawName.withCString(path) { Glibc.open($0, flags, mode) }
}
@discardableResult
func access(_ path: String, _ mode: Int32) -> Int32 { RawName.withCString(path) { Glibc.access($0, mode) } }
@discardableResult
func mkdir(_ path: String, _ mode: mode_t) -> Int32 { RawName.withCString(path) { Glibc.mkdir($0, mode) } }
@discardableResult
func unlink(_ path: String) -> Int32 { RawName.withCString(path) { Glibc.unlink($0) } }
@discardableResult
func chmod(_ path: String, _ mode: mode_t) -> Int32 { RawName.withCString(path) { Glibc.chmod($0, mode) } }
@discardableResult
func rename(_ from: String, _ to: String) -> Int32 {
    RawName.withCString(from) { f in RawName.withCString(to) { Glibc.rename(f, $0) } }
}
@discardableResult
func symlink(_ target: String, _ path: String) -> Int32 {
    RawName.withCString(target) { t in RawName.withCString(path) { Glibc.symlink(t, $0) } }
}
@discardableResult
func utimensat(_ dirfd: Int32, _ path: String, _ times: UnsafePointer<timespec>, _ flags: Int32) -> Int32 {
    RawName.withCString(path) { Glibc.utimensat(dirfd, $0, times, flags) }
}
@discardableResult
func statvfs(_ path: String, _ buf: UnsafeMutablePointer<Glibc.statvfs>) -> Int32 {
    RawName.withCString(path) { statvfs($0, buf) }   // Glibc's: `Glibc.statvfs` names the struct
}
// Extended attributes: the path as bytes; attribute names are modelfs's own (ASCII).
@discardableResult
func getxattr(_ path: String, _ name: String, _ value: UnsafeMutableRawPointer?, _ size: Int) -> Int {
    RawName.withCString(path) { CModelFSSys.getxattr($0, name, value, size) }
}
@discardableResult
func setxattr(_ path: String, _ name: String, _ value: UnsafeRawPointer?, _ size: Int, _ flags: Int32) -> Int32 {
    RawName.withCString(path) { CModelFSSys.setxattr($0, name, value, size, flags) }
}
@discardableResult
func listxattr(_ path: String, _ list: UnsafeMutablePointer<CChar>?, _ size: Int) -> Int {
    RawName.withCString(path) { CModelFSSys.listxattr($0, list, size) }
}
@discardableResult
func removexattr(_ path: String, _ name: String) -> Int32 {
    RawName.withCString(path) { CModelFSSys.removexattr($0, name) }
}

/// The absolute, symlink-free path (nil with errno set, as realpath(3)).
func realPath(_ path: String) -> String? {
    RawName.withCString(path) { p in
        guard let r = realpath(p, nil) else { return nil }
        defer { free(r) }
        return RawName.string(UnsafeBufferPointer(start: UnsafeRawPointer(r).assumingMemoryBound(to: UInt8.self), count: strlen(r)))
    }
}

/// The current directory, byte for byte.
func currentDirectory() -> String {
    var buf = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
    guard getcwd(&buf, buf.count) != nil else { return FileManager.default.currentDirectoryPath }
    return RawName.string(buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) })
}

/// The names in a directory (without "." and ".."), byte for byte, unsorted.
func directoryNames(_ path: String) throws -> [String] {
    guard let d = RawName.withCString(path, { opendir($0) }) else { throw fail("\(path): \(String(cString: strerror(errno)))") }
    defer { closedir(d) }
    var names: [String] = []
    while true {
        errno = 0
        guard let e = readdir(d) else {
            if errno != 0 { throw fail("\(path): \(String(cString: strerror(errno)))") }
            return names
        }
        let name = withUnsafeBytes(of: e.pointee.d_name) { raw -> String in
            let bytes = raw.bindMemory(to: UInt8.self)
            return RawName.string(UnsafeBufferPointer(rebasing: bytes[0..<(bytes.firstIndex(of: 0) ?? bytes.count)]))
        }
        if name != "." && name != ".." { names.append(name) }
    }
}

/// A symlink's target, byte for byte.
func linkTarget(_ path: String) throws -> String {
    var buf = [UInt8](repeating: 0, count: Int(PATH_MAX) + 1)
    let n = RawName.withCString(path) { p in buf.withUnsafeMutableBytes { readlink(p, $0.baseAddress!.assumingMemoryBound(to: CChar.self), $0.count) } }
    guard n >= 0 else { throw fail("\(path): \(String(cString: strerror(errno)))") }
    return RawName.string(Array(buf[0..<n]))
}

/// Removes `path` and everything below it, quietly (a partial copy being discarded).
func removeTree(_ path: String) {
    var st = stat()
    guard lstat(path, &st) == 0 else { return }
    if st.st_mode & S_IFMT == S_IFDIR {
        for n in (try? directoryNames(path)) ?? [] { removeTree(path + "/" + n) }
        _ = RawName.withCString(path) { rmdir($0) }
    } else {
        _ = unlink(path)
    }
}

/// A file's whole content (nil if it cannot be read).
func readWhole(_ path: String) -> Data? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var out = Data()
    var buf = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let n = read(fd, &buf, buf.count)
        if n < 0 && errno == EINTR { continue }
        guard n >= 0 else { return nil }
        if n == 0 { return out }
        out.append(contentsOf: buf[0..<n])
    }
}

/// Writes all of `bytes` to `fd` (the file at `path`, named in the error), through short writes
/// and EINTR.
func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, _ path: String) throws {
    var at = 0
    while at < bytes.count {
        let w = write(fd, bytes.baseAddress! + at, bytes.count - at)
        if w < 0 && errno == EINTR { continue }
        guard w > 0 else { throw fail("\(path): \(String(cString: strerror(errno)))") }
        at += w
    }
}

/// Writes a new file `path` (mode 0644) holding `data`, fsynced.
func writeNew(_ path: String, _ data: Data) throws {
    let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
    guard fd >= 0 else { throw fail("\(path): \(String(cString: strerror(errno)))") }
    defer { close(fd) }
    try data.withUnsafeBytes { try writeAll(fd, $0, path) }
    guard fsync(fd) == 0 else { throw fail("\(path): \(String(cString: strerror(errno)))") }
}
