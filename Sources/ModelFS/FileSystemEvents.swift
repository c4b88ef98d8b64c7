import ModelFSCore
import Synchronization

/// What the filesystem tells the parts composed beside it. The composition makes it first and
/// gives it to the filesystem at construction; the parts made from the filesystem afterwards
/// (the garbage collector, a cluster node's readers' holds) subscribe to it, so the filesystem
/// has no hook a caller sets and knows none of its listeners' types. Subscribers are called on
/// the filesystem's thread of the moment and must be quick.
public final class FileSystemEvents: Sendable {
    private let garbage = Mutex<[@Sendable () -> Void]>([])
    private let readViews = Mutex<[@Sendable (InodeNumber, UInt64) -> Void]>([])

    public init() {}

    /// Blocks may have become garbage (a failed or abandoned write).
    public func onGarbage(_ f: @escaping @Sendable () -> Void) { garbage.withLock { $0.append(f) } }
    /// An open installed a view of (inode, version) for reading.
    public func onReadView(_ f: @escaping @Sendable (InodeNumber, UInt64) -> Void) { readViews.withLock { $0.append(f) } }

    func garbageMayExist() { for f in garbage.withLock({ $0 }) { f() } }
    func readViewInstalled(_ ino: InodeNumber, version: UInt64) { for f in readViews.withLock({ $0 }) { f(ino, version) } }
}
