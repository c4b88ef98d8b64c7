import Glibc

/// File reads and writes the store and the flat copies share.
public enum FileIO {
    /// Reads up to `count` bytes at `offset` of `fd` with `pread`, again after a short read or
    /// EINTR, until `count` or the end of the file. Returns the bytes read, or -1 on an error.
    public static func preadAll(_ fd: Int32, _ into: UnsafeMutableRawPointer, _ count: Int, at offset: UInt64) -> Int {
        var done = 0
        while done < count {
            let r = pread(fd, into + done, count - done, off_t(offset) + off_t(done))
            if r < 0 { if errno == EINTR { continue }; return -1 }
            if r == 0 { break }
            done += r
        }
        return done
    }

    /// Writes `pieces` one after another at `offset` of `fd` with `pwritev`, again after a short
    /// write (from where it stopped) or EINTR. Returns 0, or the errno of the write that failed
    /// (EIO for a write that wrote nothing).
    public static func pwritevAll(_ fd: Int32, _ pieces: [iovec], at offset: UInt64) -> Int32 {
        let total = pieces.reduce(0) { $0 + $1.iov_len }
        var done = 0
        while done < total {
            // Skip what is written already.
            var skip = done
            var first = 0
            while skip >= pieces[first].iov_len { skip -= pieces[first].iov_len; first += 1 }
            var rest = Array(pieces[first...])
            rest[0].iov_base += skip
            rest[0].iov_len -= skip
            let r = rest.withUnsafeBufferPointer { pwritev(fd, $0.baseAddress, Int32($0.count), off_t(offset) + off_t(done)) }
            if r < 0 {
                if errno == EINTR { continue }
                return errno
            }
            if r == 0 { return EIO }
            done += r
        }
        return 0
    }
}
