import Foundation
import ModelFSCore
import ModelFSMeta
import ModelFSStore
import Synchronization

// Extended attributes, and the cluster's state ones (`user.modelfs.*`).

extension FileSystem {
    /// `security.*` and `system.*` attributes are not kept (no labels, capabilities or ACLs), so
    /// asking for one needs no metadata read. That matters: without the writeback cache the kernel
    /// asks for `security.capability` before every write(), and on etcd that read cost a round
    /// trip per request (128 KiB writes ran at 17 MB/s).
    static func unsupportedXattr(_ name: String) -> Bool { name.hasPrefix("security.") || name.hasPrefix("system.") }

    public func getxattr(_ ino: InodeNumber, name: String) throws -> Data {
        if FileSystem.unsupportedXattr(name) { throw FSError.noData() }
        if let v = try stateXattr(ino, name: name) { return v }
        return try meta.getxattr(ino, name: name)
    }

    public func setxattr(_ ino: InodeNumber, name: String, value: Data, mode: XattrSetMode) throws {
        if FileSystem.stateXattrs.contains(name) { throw FSError(EPERM, "\(name) is read-only: it reports the file's replication state") }
        if name == ReplicationPolicy.xattr {
            // A replication policy (modelfs policy set): directories only, and it must parse.
            guard try meta.getattr(ino).kind == .directory else {
                throw FSError.invalid("a replication policy is set on a directory, not a file")
            }
            _ = try ReplicationPolicy(parsing: String(decoding: value, as: UTF8.self))
        }
        guard !FileSystem.unsupportedXattr(name) else {
            throw FSError(EOPNOTSUPP, "security.* and system.* attributes (labels, capabilities, ACLs) are not supported")
        }
        try meta.setxattr(ino, name: name, value: value, mode: mode)
    }

    public func listxattr(_ ino: InodeNumber) throws -> [String] { try meta.listxattr(ino) }

    public func removexattr(_ ino: InodeNumber, name: String) throws {
        if FileSystem.stateXattrs.contains(name) { throw FSError(EPERM, "\(name) is read-only: it reports the file's replication state") }
        try meta.removexattr(ino, name: name)
    }
}
