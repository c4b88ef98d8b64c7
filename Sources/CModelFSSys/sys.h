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
#endif
