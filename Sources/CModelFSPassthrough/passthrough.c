// See include/modelfs_passthrough.h.
#include "modelfs_passthrough.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

// From include/uapi/linux/fuse.h.
enum { OP_OPEN = 14, OP_INIT = 26, OP_CREATE = 35 };
#define INIT_EXT (1u << 30)
#define INIT2_PASSTHROUGH (1u << 5)   // FUSE_PASSTHROUGH is 1ULL << 37: bit 5 of flags2
#define FOPEN_PASSTHROUGH (1u << 7)
// fuse_in_header: len u32, opcode u32, unique u64, nodeid u64, uid, gid, pid u32, total_extlen u16, padding u16.
#define IN_HEADER 40
// fuse_init_in after the header: major, minor, max_readahead, flags, flags2 (7.36+).
#define INIT_IN_FLAGS 12
#define INIT_IN_FLAGS2 16
// fuse_init_out: major, minor, max_readahead, flags u32; max_background, congestion u16;
// max_write, time_gran u32; max_pages, map_alignment u16; flags2 u32; max_stack_depth u32.
#define INIT_OUT_FLAGS 12
#define INIT_OUT_FLAGS2 32
#define INIT_OUT_STACK 36
// fuse_open_out: fh u64, open_flags u32, backing_id i32. A CREATE reply is a fuse_entry_out
// (128 bytes) followed by it.
#define OPEN_OUT_SIZE 16
#define ENTRY_OUT_SIZE 128
// fuse_out_header: len u32, error i32, unique u64.
#define OUT_HEADER 16

struct backing_map { int32_t fd; uint32_t flags; uint64_t padding; };
#define DEV_IOC_BACKING_OPEN _IOW(229, 1, struct backing_map)
#define DEV_IOC_BACKING_CLOSE _IOW(229, 2, uint32_t)

static atomic_int enabled, offered, negotiated;
static atomic_ulong init_unique = 0;

// OPEN and CREATE requests in flight (their uniques), and the marks the open handler left (fh -> id).
// Both are small: one entry per request being served (at most the FUSE threads').
#define SLOTS 256
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t opens[SLOTS];
static int open_count;
static struct { uint64_t fh; int id; } marks[SLOTS];
static int mark_count;

void modelfs_pt_enable(int on) { atomic_store(&enabled, on); }
int modelfs_pt_offered(void) { return atomic_load(&offered); }
int modelfs_pt_negotiated(void) { return atomic_load(&negotiated); }

static uint32_t get32(const void *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t get64(const void *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static void put32(void *p, uint32_t v) { memcpy(p, &v, 4); }

// Operation metrics: each request's opcode and arrival time wait in a slot picked by its unique
// (the kernel steps uniques by 2; far fewer than FLIGHT requests are ever in flight, so a slot
// is long answered before it is used again), and its reply adds the latency to the opcode's
// histogram and the error to its errno's count. Relaxed atomics only: no lock on the hot path.
#define FLIGHT 4096
static struct { _Atomic uint64_t unique; _Atomic uint64_t start; _Atomic uint32_t opcode; } flight[FLIGHT];
static _Atomic uint64_t op_counts[MODELFS_OPS][MODELFS_OP_BUCKETS + 1];
static _Atomic uint64_t op_nanos[MODELFS_OPS];
static _Atomic uint64_t errno_counts[MODELFS_ERRNOS];
static const uint64_t bucket_ns[MODELFS_OP_BUCKETS] = {
    10000, 25000, 50000, 100000, 250000, 500000, 1000000, 2500000, 5000000, 10000000, 25000000,
    50000000, 100000000, 250000000, 500000000, 1000000000, 2500000000ull, 5000000000ull,
};

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void op_arrived(uint32_t opcode, uint64_t unique) {
    if (opcode >= MODELFS_OPS) return;
    size_t i = (size_t)(unique >> 1) % FLIGHT;
    atomic_store_explicit(&flight[i].opcode, opcode, memory_order_relaxed);
    atomic_store_explicit(&flight[i].start, now_ns(), memory_order_relaxed);
    atomic_store_explicit(&flight[i].unique, unique, memory_order_release);
}

static void op_answered(uint64_t unique, int32_t error) {
    if (error < 0 && -error < MODELFS_ERRNOS) atomic_fetch_add_explicit(&errno_counts[-error], 1, memory_order_relaxed);
    size_t i = (size_t)(unique >> 1) % FLIGHT;
    if (atomic_load_explicit(&flight[i].unique, memory_order_acquire) != unique) return;
    uint32_t opcode = atomic_load_explicit(&flight[i].opcode, memory_order_relaxed);
    uint64_t took = now_ns() - atomic_load_explicit(&flight[i].start, memory_order_relaxed);
    int b = 0;
    while (b < MODELFS_OP_BUCKETS && took > bucket_ns[b]) b++;
    atomic_fetch_add_explicit(&op_counts[opcode][b], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&op_nanos[opcode], took, memory_order_relaxed);
}

void modelfs_ops_snapshot(uint64_t *counts, uint64_t *nanos, uint64_t *errnos) {
    for (int o = 0; o < MODELFS_OPS; o++) {
        for (int b = 0; b <= MODELFS_OP_BUCKETS; b++)
            counts[o * (MODELFS_OP_BUCKETS + 1) + b] = atomic_load_explicit(&op_counts[o][b], memory_order_relaxed);
        nanos[o] = atomic_load_explicit(&op_nanos[o], memory_order_relaxed);
    }
    for (int e = 0; e < MODELFS_ERRNOS; e++) errnos[e] = atomic_load_explicit(&errno_counts[e], memory_order_relaxed);
}

uint64_t modelfs_ops_bucket_ns(int b) { return b < MODELFS_OP_BUCKETS ? bucket_ns[b] : 0; }

ssize_t modelfs_pt_read(int fd, void *buf, size_t len, void *userdata) {
    (void)userdata;
    ssize_t n = read(fd, buf, len);
    if (n < IN_HEADER) return n;
    const unsigned char *b = buf;
    uint32_t opcode = get32(b + 4);
    uint64_t unique = get64(b + 8);
    op_arrived(opcode, unique);
    if (!atomic_load(&enabled)) return n;
    if (opcode == OP_INIT && n >= IN_HEADER + INIT_IN_FLAGS2 + 4) {
        uint32_t flags = get32(b + IN_HEADER + INIT_IN_FLAGS);
        uint32_t flags2 = (flags & INIT_EXT) ? get32(b + IN_HEADER + INIT_IN_FLAGS2) : 0;
        atomic_store(&offered, (flags2 & INIT2_PASSTHROUGH) != 0);
        atomic_store(&init_unique, unique);
    } else if (opcode == OP_OPEN || opcode == OP_CREATE) {
        pthread_mutex_lock(&lock);
        if (open_count < SLOTS) opens[open_count++] = unique;
        pthread_mutex_unlock(&lock);
    }
    return n;
}

// Whether `unique` was an OPEN request (and forgets it).
static int take_open(uint64_t unique) {
    int found = 0;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < open_count; i++) {
        if (opens[i] == unique) { opens[i] = opens[--open_count]; found = 1; break; }
    }
    pthread_mutex_unlock(&lock);
    return found;
}

static int take_mark(uint64_t fh) {
    int id = 0;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < mark_count; i++) {
        if (marks[i].fh == fh) { id = marks[i].id; marks[i] = marks[--mark_count]; break; }
    }
    pthread_mutex_unlock(&lock);
    return id;
}

void modelfs_pt_mark(uint64_t fh, int backing_id) {
    pthread_mutex_lock(&lock);
    if (mark_count < SLOTS) { marks[mark_count].fh = fh; marks[mark_count].id = backing_id; mark_count++; }
    pthread_mutex_unlock(&lock);
}

void modelfs_pt_unmark(uint64_t fh) { (void)take_mark(fh); }

ssize_t modelfs_pt_writev(int fd, struct iovec *iov, int count, void *userdata) {
    (void)userdata;
    if (count >= 1 && iov[0].iov_len >= OUT_HEADER) {
        int32_t error; memcpy(&error, (char *)iov[0].iov_base + 4, 4);
        uint64_t unique = get64((char *)iov[0].iov_base + 8);
        if (unique != 0) op_answered(unique, error);
    }
    if (atomic_load(&enabled) && count >= 2 && iov[0].iov_len >= OUT_HEADER) {
        int32_t error; memcpy(&error, (char *)iov[0].iov_base + 4, 4);
        uint64_t unique = get64((char *)iov[0].iov_base + 8);
        if (unique != 0 && unique == atomic_load(&init_unique)) {
            atomic_store(&init_unique, 0);
            if (error == 0 && atomic_load(&offered) && iov[1].iov_len >= INIT_OUT_STACK + 4) {
                unsigned char *o = iov[1].iov_base;
                uint32_t flags = get32(o + INIT_OUT_FLAGS);
                // The kernel turns passthrough off (the backing ioctl then answers EPERM) when the
                // writeback cache is on: agree only without it.
                if (!(flags & (1u << 16))) {   // FUSE_WRITEBACK_CACHE
                    put32(o + INIT_OUT_FLAGS, flags | INIT_EXT);
                    put32(o + INIT_OUT_FLAGS2, get32(o + INIT_OUT_FLAGS2) | INIT2_PASSTHROUGH);
                    put32(o + INIT_OUT_STACK, 1);
                    atomic_store(&negotiated, 1);
                }
            }
        } else if (take_open(unique) && error == 0 &&
                   (iov[1].iov_len == OPEN_OUT_SIZE || iov[1].iov_len == ENTRY_OUT_SIZE + OPEN_OUT_SIZE)) {
            unsigned char *o = (unsigned char *)iov[1].iov_base + iov[1].iov_len - OPEN_OUT_SIZE;
            int id = take_mark(get64(o));
            if (id > 0) {
                put32(o + 8, get32(o + 8) | FOPEN_PASSTHROUGH);
                put32(o + 12, (uint32_t)id);
            }
        }
    }
    return writev(fd, iov, count);
}

int modelfs_pt_backing_open(int session_fd, int file) {
    struct backing_map map = { .fd = file, .flags = 0, .padding = 0 };
    int id = ioctl(session_fd, DEV_IOC_BACKING_OPEN, &map);
    return id < 0 ? -errno : id;
}

int modelfs_pt_backing_close(int session_fd, int backing_id) {
    uint32_t id = (uint32_t)backing_id;
    return ioctl(session_fd, DEV_IOC_BACKING_CLOSE, &id) < 0 ? -errno : 0;
}
