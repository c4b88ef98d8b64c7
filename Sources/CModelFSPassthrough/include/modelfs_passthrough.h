// FUSE passthrough with libfuse 3.14, which predates its API (3.17): the daemon installs its own
// read and writev for /dev/fuse (fuse_session_custom_io) and patches two kinds of replies on
// their way to the kernel. docs/ARCHITECTURE.md "Reads through passthrough" has the why; the
// offsets are from the kernel's include/uapi/linux/fuse.h (protocol 7.40).
#ifndef MODELFS_PASSTHROUGH_H
#define MODELFS_PASSTHROUGH_H

#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

// The hooks, with libfuse's fuse_custom_io signatures.
ssize_t modelfs_pt_read(int fd, void *buf, size_t len, void *userdata);
ssize_t modelfs_pt_writev(int fd, struct iovec *iov, int count, void *userdata);

// Turns the INIT patch on (before the mount answers INIT). The kernel must offer passthrough in
// its INIT; `modelfs_pt_negotiated` says afterwards whether it was agreed.
void modelfs_pt_enable(int on);
int modelfs_pt_offered(void);
int modelfs_pt_negotiated(void);

// Registers `file` with the kernel as a backing file: its backing id (> 0), or -errno.
int modelfs_pt_backing_open(int session_fd, int file);
// Drops a backing id (the kernel keeps the file while opens use it).
int modelfs_pt_backing_close(int session_fd, int backing_id);

// The reply to the OPEN (or CREATE) request about to be sent with file handle `fh` passes through to
// `backing_id`: the writev hook sets FOPEN_PASSTHROUGH and the id in it. Called before
// fuse_reply_open; the entry is consumed by that reply.
void modelfs_pt_mark(uint64_t fh, int backing_id);
// Forgets a mark whose reply was never sent (the open failed after marking).
void modelfs_pt_unmark(uint64_t fh);

// Per-operation metrics, kept by the same hooks on every mount (with or without passthrough):
// a latency histogram per FUSE opcode (request read to reply written) and a count per errno
// answered. Snapshot into counts[MODELFS_OPS * (MODELFS_OP_BUCKETS + 1)] (the last bucket is
// +Inf), nanos[MODELFS_OPS] (sums) and errnos[MODELFS_ERRNOS].
#define MODELFS_OPS 64
#define MODELFS_OP_BUCKETS 18
#define MODELFS_ERRNOS 134
void modelfs_ops_snapshot(uint64_t *counts, uint64_t *nanos, uint64_t *errnos);
// The upper bound of histogram bucket `bucket`, in nanoseconds.
uint64_t modelfs_ops_bucket_ns(int bucket);

#endif
