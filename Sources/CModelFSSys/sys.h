// glibc functions that Swift's Glibc module does not declare (they need _GNU_SOURCE or
// <malloc.h>). Declared here with their C prototypes, so Swift calls them with the C calling
// convention; each has one user, named beside it.
#ifndef MODELFS_SYS_H
#define MODELFS_SYS_H
#include <sys/types.h>
#include <sys/xattr.h>                                       // getxattr/setxattr: modelfs policy, modelfs ckpt tag
#include <stdio.h>
#include <fcntl.h>

int syncfs(int fd);                                          // PackBlockStore.syncFilesystem
int fallocate(int fd, int mode, off_t offset, off_t len);    // PackBlockStore.reclaim (punch holes)
int mallopt(int param, int value);                           // Daemon.run (allocator settings)
void *memmem(const void *haystack, size_t haystacklen, const void *needle, size_t needlelen);  // ZipCuts.offsets

static inline int modelfs_syncfs(int fd) { return syncfs(fd); }
static inline int modelfs_punch_hole(int fd, off_t offset, off_t len) {
    return fallocate(fd, 0x02 /* FALLOC_FL_PUNCH_HOLE */ | 0x01 /* FALLOC_FL_KEEP_SIZE */, offset, len);
}
static inline int modelfs_mallopt(int param, int value) { return mallopt(param, value); }
static inline int modelfs_m_mmap_threshold(void) { return -3; }
static inline int modelfs_m_arena_max(void) { return -8; }
static inline void modelfs_flush_stdout(void) { fflush(stdout); }  // progress bars
static inline int modelfs_o_direct(void) { return __O_DIRECT; }  // O_DIRECT (needs _GNU_SOURCE): PackBlockStore.openPack

// CRC32C (Castagnoli) of the pieces of a block (PackBlockStore's piece sums): the SSE 4.2
// instruction where the CPU has it, three pieces at a time (the instruction's latency is three
// cycles, its throughput one), else bit by bit. `out[i]` is the CRC of bytes
// [i*piece, min(len, (i+1)*piece)); each piece's CRC starts from 0xFFFFFFFF and is inverted.
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__)
#include <cpuid.h>
__attribute__((target("sse4.2")))
static inline uint32_t modelfs_crc32c_hw(uint32_t crc, const uint8_t *p, size_t n) {
    uint64_t c = crc;
    while (n >= 8) { uint64_t v; memcpy(&v, p, 8); c = __builtin_ia32_crc32di(c, v); p += 8; n -= 8; }
    uint32_t c32 = (uint32_t)c;
    while (n > 0) { c32 = __builtin_ia32_crc32qi(c32, *p); p++; n--; }
    return c32;
}
__attribute__((target("sse4.2")))
static inline void modelfs_crc32c_hw3(const uint8_t *a, const uint8_t *b, const uint8_t *c, size_t n, uint32_t out[3]) {
    uint64_t x = 0xFFFFFFFFu, y = 0xFFFFFFFFu, z = 0xFFFFFFFFu;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t u, v, w;
        memcpy(&u, a + i, 8); memcpy(&v, b + i, 8); memcpy(&w, c + i, 8);
        x = __builtin_ia32_crc32di(x, u); y = __builtin_ia32_crc32di(y, v); z = __builtin_ia32_crc32di(z, w);
    }
    out[0] = ~modelfs_crc32c_hw((uint32_t)x, a + i, n - i);
    out[1] = ~modelfs_crc32c_hw((uint32_t)y, b + i, n - i);
    out[2] = ~modelfs_crc32c_hw((uint32_t)z, c + i, n - i);
}
static inline int modelfs_crc32c_has_hw(void) {
    static int known = -1;   // read and set atomically: threads may ask at once
    int k = __atomic_load_n(&known, __ATOMIC_RELAXED);
    if (k < 0) {
        unsigned int eax, ebx, ecx, edx;
        k = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_SSE4_2) ? 1 : 0;
        __atomic_store_n(&known, k, __ATOMIC_RELAXED);
    }
    return k;
}
#else
static inline int modelfs_crc32c_has_hw(void) { return 0; }
#endif
static inline uint32_t modelfs_crc32c_sw(const uint8_t *p, size_t n) {   // bit by bit: a fallback only
    uint32_t c = 0xFFFFFFFFu;
    while (n-- > 0) {
        c ^= *p++;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1)));
    }
    return ~c;
}
static inline uint32_t modelfs_crc32c(const void *data, size_t n) {
#if defined(__x86_64__)
    if (modelfs_crc32c_has_hw()) return ~modelfs_crc32c_hw(0xFFFFFFFFu, (const uint8_t *)data, n);
#endif
    return modelfs_crc32c_sw((const uint8_t *)data, n);
}
static inline void modelfs_crc32c_pieces(const void *data, size_t len, size_t piece, uint32_t *out) {
    const uint8_t *p = (const uint8_t *)data;
    size_t whole = len / piece, i = 0;
#if defined(__x86_64__)
    if (modelfs_crc32c_has_hw())
        for (; i + 3 <= whole; i += 3) modelfs_crc32c_hw3(p + i * piece, p + (i + 1) * piece, p + (i + 2) * piece, piece, out + i);
#endif
    for (; i < whole; i++) out[i] = modelfs_crc32c(p + i * piece, piece);
    if (len > whole * piece) out[whole] = modelfs_crc32c(p + whole * piece, len - whole * piece);
}
#endif
