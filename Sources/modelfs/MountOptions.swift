/// The `-o` options of `modelfs mount`: the ones modelfs handles itself, taken out of the list
/// libfuse gets (libfuse refuses options it does not know).
struct MountOptions {
    /// Options passed on to libfuse.
    var fuse: [String] = []
    /// `-o writeback_cache`: the kernel's writeback cache, off by default. With it, writes land
    /// in the page cache and reach the daemon later, merged, from the kernel's flusher: many small
    /// write() calls on a read-write descriptor cost one request per MiB instead of one each
    /// (measured: 256 MiB in 4 KiB writes + fsync, O_RDWR, 1.9 s against 3.1 s; write-only
    /// descriptors write directly either way and take 1.6 s). Without it every write() is sent
    /// in order, 1 MiB at a time, as it happens; that is faster for checkpoints, which are
    /// written in large sequential calls (before direct writes: torch.save of 1 GiB 1.6 s
    /// against 2.6 s, 2 GiB in 1 MiB writes 3.4 s against 5.8 s): the flusher's requests
    /// arrive out of order (hundreds of MiB were staged and read back per GiB), and a new
    /// mount's writeback is throttled to the kernel's initial 100 MB/s estimate of its speed.
    /// A cluster node never uses it: the kernel would then keep its own idea of a file's size
    /// and miss versions other nodes commit.
    var writebackCache = false

    init(_ options: [String]) {
        for option in options.flatMap({ $0.split(separator: ",").map(String.init) }) {
            switch option {
            case "writeback_cache": writebackCache = true
            case "no_writeback_cache": writebackCache = false
            default: fuse.append(option)
            }
        }
    }
}
