import Foundation

/// A typed inode number; 1 is the root directory (FUSE_ROOT_ID).
public struct InodeNumber: Hashable, Sendable, Comparable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(_ raw: UInt64) { rawValue = raw }
    public static let root = InodeNumber(1)
    public static func < (a: InodeNumber, b: InodeNumber) -> Bool { a.rawValue < b.rawValue }
    public var description: String { "inode \(rawValue)" }
}

public enum FileKind: UInt8, Sendable, Codable, CaseIterable {
    case regular = 1, directory = 2, symlink = 3
    /// Special files: the inode (its mode, owner, times and, for devices, its device number) is
    /// kept like any other; what opening one does is the kernel's (a pipe, a socket, a device
    /// driver), never this filesystem's.
    case fifo = 4, socket = 5, charDevice = 6, blockDevice = 7

    /// The S_IFMT bits of this kind.
    public var modeBits: UInt32 {
        switch self {
        case .regular: return 0o100000
        case .directory: return 0o040000
        case .symlink: return 0o120000
        case .fifo: return 0o010000
        case .socket: return 0o140000
        case .charDevice: return 0o020000
        case .blockDevice: return 0o060000
        }
    }

    /// The kind whose S_IFMT bits `mode` carries, nil for none.
    public init?(modeBits mode: UInt32) {
        guard let k = FileKind.allCases.first(where: { $0.modeBits == mode & 0o170000 }) else { return nil }
        self = k
    }

    /// The d_type value readdir reports.
    public var direntType: UInt8 {
        switch self {
        case .regular: return 8
        case .directory: return 4
        case .symlink: return 10
        case .fifo: return 1
        case .socket: return 12
        case .charDevice: return 2
        case .blockDevice: return 6
        }
    }

    /// A FIFO, socket or device node.
    public var isSpecial: Bool { rawValue >= FileKind.fifo.rawValue }
}

/// Seconds and nanoseconds since the epoch, as the kernel sends and expects them.
public struct Timestamp: Hashable, Sendable, Comparable {
    public var seconds: Int64
    public var nanoseconds: Int32
    public init(seconds: Int64, nanoseconds: Int32) { self.seconds = seconds; self.nanoseconds = nanoseconds }
    public init(totalNanoseconds n: Int64) {
        seconds = n >= 0 ? n / 1_000_000_000 : (n - 999_999_999) / 1_000_000_000
        nanoseconds = Int32(n - seconds * 1_000_000_000)
    }
    /// Nanoseconds since 1970, saturating outside years 1678…2262 (see `representable`).
    public var totalNanoseconds: Int64 {
        let (s, o1) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        let (t, o2) = s.addingReportingOverflow(Int64(nanoseconds))
        if o1 || o2 { return seconds < 0 ? .min : .max }
        return t
    }
    /// Whether this time fits 64-bit nanoseconds (what the metadata engines store).
    public var representable: Bool {
        let (s, o1) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        return !o1 && !s.addingReportingOverflow(Int64(nanoseconds)).overflow
    }
    /// The time now, from the same coarse clock the kernel stamps files with (a `touch`
    /// through the writeback cache takes the kernel's time: a finer clock here would make
    /// that time earlier than the creation time this process gave the file).
    public static func now() -> Timestamp {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME_COARSE, &ts)
        return Timestamp(seconds: Int64(ts.tv_sec), nanoseconds: Int32(ts.tv_nsec))
    }
    public static func < (a: Timestamp, b: Timestamp) -> Bool { a.totalNanoseconds < b.totalNanoseconds }
}

/// What the metadata engine knows of an inode.
public struct InodeAttributes: Hashable, Sendable {
    public var ino: InodeNumber
    public var kind: FileKind
    /// Permission bits including setuid/setgid/sticky (no S_IFMT bits).
    public var mode: UInt32
    public var uid: UInt32
    public var gid: UInt32
    public var nlink: UInt32
    public var size: UInt64
    public var atime: Timestamp
    public var mtime: Timestamp
    public var ctime: Timestamp
    /// Content version: bumped by every commit of new content; 0 for a file never written.
    public var version: UInt64
    /// The device number of a character or block device node (the kernel's encoding of major
    /// and minor, as `mknod` gave it); 0 for every other kind.
    public var rdev: UInt32
    /// Inode flags, as `chattr` names them; only `immutableFlag` is kept (see `immutable`).
    public var flags: UInt32

    /// FS_IMMUTABLE_FL: the inode is part of a snapshot (`modelfs snapshot`).
    public static let immutableFlag: UInt32 = 0x10

    /// Nothing about it changes: not its content, attributes, xattrs or (for a directory) its
    /// entries, and it is not renamed, linked or removed (EPERM, as `chattr +i` on ext4).
    public var immutable: Bool { flags & Self.immutableFlag != 0 }

    public init(ino: InodeNumber, kind: FileKind, mode: UInt32, uid: UInt32, gid: UInt32, nlink: UInt32,
                size: UInt64, atime: Timestamp, mtime: Timestamp, ctime: Timestamp, version: UInt64, rdev: UInt32 = 0,
                flags: UInt32 = 0) {
        self.ino = ino; self.kind = kind; self.mode = mode; self.uid = uid; self.gid = gid
        self.nlink = nlink; self.size = size; self.atime = atime; self.mtime = mtime; self.ctime = ctime
        self.version = version; self.rdev = rdev; self.flags = flags
    }
}

/// A directory entry as readdir returns it. `cookie` is a stable position: listing resumes after
/// it even if other entries are added or removed meanwhile.
public struct DirectoryEntry: Hashable, Sendable {
    public var name: String
    public var ino: InodeNumber
    public var kind: FileKind
    public var cookie: UInt64
    public init(name: String, ino: InodeNumber, kind: FileKind, cookie: UInt64) {
        self.name = name; self.ino = ino; self.kind = kind; self.cookie = cookie
    }
}

/// Which attributes a setattr changes.
public struct AttributeChanges: Sendable, Equatable {
    public var mode: UInt32?
    public var uid: UInt32?
    public var gid: UInt32?
    public var size: UInt64?
    public var atime: Timestamp?
    public var mtime: Timestamp?
    /// New inode flags (`modelfs snapshot` freezing and thawing a tree; never from the kernel).
    public var flags: UInt32?
    public init(mode: UInt32? = nil, uid: UInt32? = nil, gid: UInt32? = nil, size: UInt64? = nil,
                atime: Timestamp? = nil, mtime: Timestamp? = nil, flags: UInt32? = nil) {
        self.mode = mode; self.uid = uid; self.gid = gid; self.size = size; self.atime = atime; self.mtime = mtime
        self.flags = flags
    }
}

public struct RenameFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// Linux RENAME_NOREPLACE (1) and RENAME_EXCHANGE (2).
    public static let noReplace = RenameFlags(rawValue: 1)
    public static let exchange = RenameFlags(rawValue: 2)
}

public enum XattrSetMode: Sendable { case any, create, replace }

/// Names are validated once, at the engine boundary.
public func validateName(_ name: String) throws {
    if name.isEmpty || name == "." || name == ".." || name.utf8.contains(UInt8(ascii: "/")) || name.utf8.contains(0) {
        throw FSError.invalid("invalid file name \"\(name)\"")
    }
    if RawName.byteCount(name) > 255 { throw FSError(ENAMETOOLONG, "file name longer than 255 bytes") }
}

/// One committed version of a file, as readers on every node name it: its inode, its version
/// (the inode's commit counter, the same on every node) and its size. Cluster nodes loading the
/// same version cooperate (fan-out, docs/ARCHITECTURE.md); it travels as `text`, e.g.
/// `00000000000000a3.7`.
public struct FileVersion: Hashable, Sendable, CustomStringConvertible {
    public let ino: InodeNumber
    public let version: UInt64
    public let size: UInt64
    public init(ino: InodeNumber, version: UInt64, size: UInt64) {
        self.ino = ino; self.version = version; self.size = size
    }

    /// `INO.VERSION`, the inode in 16 hex digits (the size is not part of it).
    public var text: String {
        let hex = String(ino.rawValue, radix: 16)
        return String(repeating: "0", count: max(0, 16 - hex.count)) + hex + ".\(version)"
    }

    /// Parses `text` (size 0: the name does not carry it); nil for anything else.
    public init?(text: some StringProtocol) {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 2, parts[0].count == 16, (1...20).contains(parts[1].count),
              parts[0].utf8.allSatisfy({ (48...57).contains($0) || (97...102).contains($0) }),
              parts[1].utf8.allSatisfy({ (48...57).contains($0) }),
              let ino = UInt64(parts[0], radix: 16), let version = UInt64(parts[1]) else { return nil }
        self.init(ino: InodeNumber(ino), version: version, size: 0)
    }

    public var description: String { "\(ino) version \(version)" }

    /// Equal when they name the same version (the size follows from it).
    public static func == (a: FileVersion, b: FileVersion) -> Bool { a.ino == b.ino && a.version == b.version }
    public func hash(into h: inout Hasher) { h.combine(ino); h.combine(version) }
}
