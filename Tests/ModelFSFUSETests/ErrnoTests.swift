import Foundation
import ModelFS
import ModelFSCore
import ModelFSFUSE
import ModelFSMeta
import ModelFSStore
import Testing

/// Every row of the errno table at the FUSE boundary (`Errno.answer`).
@Suite struct ErrnoTests {
    struct Unexpected: Error {}

    @Test func theWholeTable() {
        let rows: [(any Error, Int32, ordinary: Bool, expected: Bool)] = [
            (FSError.noEntry(), ENOENT, true, true),
            (FSError.exists(), EEXIST, true, true),
            (FSError.notEmpty(), ENOTEMPTY, true, true),
            (FSError(EPERM, "immutable"), EPERM, true, true),
            (FSError(EBUSY, "open for writing on node b"), EBUSY, false, true),
            (FSError.noSpace("staging: disk full"), ENOSPC, false, true),
            (FSError.io("a read failed"), EIO, false, true),
            (StoreError(.full, "block store: disk full"), ENOSPC, false, true),
            (StoreError.system("write pack", "/d/p", errno: ENOSPC), ENOSPC, false, true),
            (StoreError.system("write pack", "/d/p", errno: EDQUOT), EDQUOT, false, true),
            (StoreError.system("fdatasync", "/d/p", errno: EROFS), EROFS, false, true),
            (StoreError.system("read pack", "/d/p", errno: EBADF), EIO, false, true),
            (StoreError(.missing, "block is missing"), EIO, false, true),
            (StoreError(.corrupt, "block is corrupt"), EIO, false, true),
            (StoreError(.inconsistent, "pack in two tiers"), EIO, false, true),
            (MetaError(.full, "etcd quota"), ENOSPC, false, true),
            (MetaError(.unavailable, "etcd unreachable"), EIO, false, true),
            (MetaError(.conflict, "kept conflicting"), EIO, false, true),
            (MetaError(.corrupt, "record unreadable"), EIO, false, true),
            (MetaError(.fenced, "fenced"), EIO, false, true),
            (MetaError(.database, "sqlite"), EIO, false, true),
            (EtcdError.unreachable("no endpoint"), EIO, false, true),
            (EtcdError.rejected(code: 8, message: "too many operations"), EIO, false, true),
            (ReplicationError(.notDurable, "2 copies not reached"), EIO, false, true),
            (ReplicationError(.journal, "journal"), EIO, false, true),
            (Unexpected(), EIO, false, false),
        ]
        for (error, errno, ordinary, expected) in rows {
            let a = Errno.answer(error)
            #expect(a.errno == errno, "\(error)")
            #expect(a.ordinary == ordinary, "\(error)")
            #expect(a.expected == expected, "\(error)")
        }
    }

    /// The cause is kept as an error, not flattened into a string.
    @Test func causesStayErrors() {
        let inner = StoreError(.corrupt, "block 00ff is corrupt")
        let outer = FSError.io("reading inode 7", cause: inner)
        #expect((outer.cause as? StoreError)?.kind == .corrupt)
        #expect("\(outer)".contains("block 00ff is corrupt"))
    }
}
