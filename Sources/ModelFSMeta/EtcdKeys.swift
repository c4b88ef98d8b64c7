import Foundation
import ModelFSCore

/// Every key modelfs keeps in etcd, in one place. A cluster's keys all live under
/// `/modelfs/NAME/` (one etcd can hold several clusters); below that:
///
/// | key | kind | what | written by |
/// |---|---|---|---|
/// | `i/INO` | per inode | attributes (JSON) | the metadata engine |
/// | `e/DIR/NAME` | per entry | a directory entry → inode | the metadata engine |
/// | `m/INO` | per file | the committed manifest | the metadata engine |
/// | `x/INO/NAME` | per xattr | an extended attribute | the metadata engine |
/// | `o/INO` | per orphan | an unlinked inode still open somewhere | the metadata engine |
/// | `t/CLIENT/SLOT` | per transaction | a commit marker ("maybe committed" resolution) | the metadata engine |
/// | `w/INO` | per file being written | the writer's lock, under its lease | WriterLock |
/// | `n/next_ino` | one | the inode number allocator | the metadata engine |
/// | `n/stats/CLIENT`, `n/stats/_base` | per client | file and byte counters (statfs) | the metadata engine |
/// | `n/healer` | one | which node heals, under its lease | Healer |
/// | `n/heal` | one | the healer's last status | Healer |
/// | `n/cluster_id` | one | the cluster's identity (nodes refuse another's data dir) | ClusterNode |
/// | `nodes/ID` | per live node | address, labels, usage; under its lease | Membership |
/// | `members/ID` | per node ever joined | the roster (no lease) | Membership |
/// | `drain/ID` | per draining node | a drain mark | Membership |
/// | `f/INO.VERSION/ID` | per node loading a large file version | a fan-out loader; under the node's lease | Fanout |
/// | `h/INO/ID` | per node reading a superseded version | a reader's hold (the version it reads); under the node's lease | VersionHolds |
/// | `g/scanner` | one | which node scans the manifests for every node's garbage collection, under its lease | ReferenceScans |
/// | `g/ask/ID` | per node whose collection pass waits | the pass's candidate blocks; under the node's lease | ReferenceScans |
/// | `g/answer/ID` | per node whose ask was answered | the candidates a manifest references; under the asker's lease | ReferenceScans |
///
/// `EtcdKeys.layout` lists them for the test that no prefix shadows another key (a range
/// over one must never return another's keys).
public struct EtcdKeys: Sendable {
    /// `/modelfs/NAME/`.
    public let root: Data

    public init(cluster: String) { root = Data("/modelfs/\(cluster)/".utf8) }

    /// `root` + a key below it.
    public func key(_ relative: String) -> Data { root + Data(relative.utf8) }

    public var inodes: Data { key("i/") }
    public var entries: Data { key("e/") }
    public var manifests: Data { key("m/") }
    public var xattrs: Data { key("x/") }
    public var orphans: Data { key("o/") }
    public var markers: Data { key("t/") }
    public var writers: Data { key("w/") }
    public var nextInode: Data { key("n/next_ino") }
    public var stats: Data { key("n/stats/") }
    public var statsBase: Data { key("n/stats/_base") }
    public var healer: Data { key("n/healer") }
    public var healStatus: Data { key("n/heal") }
    public var clusterID: Data { key("n/cluster_id") }
    public var nodes: Data { key("nodes/") }
    public var members: Data { key("members/") }
    public var drain: Data { key("drain/") }
    public var loaders: Data { key("f/") }
    public var holds: Data { key("h/") }
    public var gcScanner: Data { key("g/scanner") }
    public var gcAsks: Data { key("g/ask/") }
    public var gcAnswers: Data { key("g/answer/") }
    public func gcAsk(_ node: String) -> Data { gcAsks + Data(node.utf8) }
    public func gcAnswer(_ node: String) -> Data { gcAnswers + Data(node.utf8) }

    /// An inode number as keys spell it: 16 hex digits, so keys sort by number.
    public static func hex(_ ino: InodeNumber) -> String {
        let s = String(ino.rawValue, radix: 16)
        return String(repeating: "0", count: 16 - s.count) + s
    }

    public func inode(_ ino: InodeNumber) -> Data { inodes + Data(Self.hex(ino).utf8) }
    public func manifest(_ ino: InodeNumber) -> Data { manifests + Data(Self.hex(ino).utf8) }
    public func orphan(_ ino: InodeNumber) -> Data { orphans + Data(Self.hex(ino).utf8) }
    public func writer(_ ino: InodeNumber) -> Data { writers + Data(Self.hex(ino).utf8) }
    /// The prefix of a directory's entries.
    public func entries(of dir: InodeNumber) -> Data { entries + Data("\(Self.hex(dir))/".utf8) }
    /// The prefix of an inode's extended attributes.
    public func xattrs(of ino: InodeNumber) -> Data { xattrs + Data("\(Self.hex(ino))/".utf8) }
    /// The prefix of a client's commit markers, and one of them.
    public func markers(of client: String) -> Data { markers + Data("\(client)/".utf8) }
    public func marker(of client: String, slot: Int) -> Data { markers(of: client) + Data("\(slot)".utf8) }
    public func stats(of client: String) -> Data { stats + Data(client.utf8) }
    public func node(_ id: String) -> Data { nodes + Data(id.utf8) }
    public func member(_ id: String) -> Data { members + Data(id.utf8) }
    public func drain(_ id: String) -> Data { drain + Data(id.utf8) }
    /// The prefix of a file version's fan-out loaders, and one of them.
    public func loaders(of file: FileVersion) -> Data { loaders + Data("\(file.text)/".utf8) }
    public func loader(of file: FileVersion, node: String) -> Data { loaders(of: file) + Data(node.utf8) }
    /// A node's hold on a superseded version of `ino` (the version is the value).
    public func hold(_ ino: InodeNumber, node: String) -> Data { holds + Data("\(Self.hex(ino))/\(node)".utf8) }
    /// The inode a hold key (under `holds`) is on.
    public func heldInode(_ key: Data) -> InodeNumber? {
        guard key.starts(with: holds) else { return nil }
        let rest = key.dropFirst(holds.count)
        guard let slash = rest.firstIndex(of: UInt8(ascii: "/")), let n = UInt64(String(decoding: rest[..<slash], as: UTF8.self), radix: 16) else { return nil }
        return InodeNumber(n)
    }

    /// Each key below `root`: its text, and whether it is a prefix (ranged over) or one key.
    /// A prefix's own nested keys name it as `within`.
    public static let layout: [(key: String, prefix: Bool, within: String?)] = [
        ("i/", true, nil), ("e/", true, nil), ("m/", true, nil), ("x/", true, nil), ("o/", true, nil),
        ("t/", true, nil), ("w/", true, nil),
        ("n/next_ino", false, nil), ("n/stats/", true, nil), ("n/stats/_base", false, "n/stats/"),
        ("n/healer", false, nil), ("n/heal", false, nil), ("n/cluster_id", false, nil),
        ("nodes/", true, nil), ("members/", true, nil), ("drain/", true, nil), ("f/", true, nil),
        ("h/", true, nil), ("g/scanner", false, nil), ("g/ask/", true, nil), ("g/answer/", true, nil),
    ]
}
