// The only place modelfs touches libfuse3's headers. Swift cannot import macros or
// variadic functions, so each is wrapped here in a small inline function that says why.
#ifndef MODELFS_CFUSE3_SHIM_H
#define MODELFS_CFUSE3_SHIM_H

// Must be defined here: a cSettings define is not seen when Swift imports this header.
#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>
#include <sys/types.h>
#include <sys/stat.h>
#include <sys/file.h>
#include <sys/xattr.h>
#include <sys/statvfs.h>
#include <sys/vfs.h>
#include <sys/sysmacros.h>
#include <fcntl.h>
#include <errno.h>
#include <string.h>
#include <stdlib.h>
#include <unistd.h>
#include <linux/fs.h>
#include <linux/falloc.h>

// fuse_session_loop_mt is a versioned symbol on Debian and a macro elsewhere.
static inline int modelfs_session_loop_mt(struct fuse_session *se, unsigned int max_threads) {
    struct fuse_loop_config *cfg = fuse_loop_cfg_create();
    if (cfg == NULL) return -1;
    fuse_loop_cfg_set_max_threads(cfg, max_threads);
    fuse_loop_cfg_set_clone_fd(cfg, 0);
    int rc = fuse_session_loop_mt(se, cfg);
    fuse_loop_cfg_destroy(cfg);
    return rc;
}

// FUSE_ARGS_INIT is a macro; build the argument vector field by field.
static inline struct fuse_args modelfs_args_init(int argc, char **argv) {
    struct fuse_args a = { argc, argv, 0 };
    return a;
}

// fuse_log is variadic.
static inline void modelfs_log(enum fuse_log_level level, const char *message) {
    fuse_log(level, "%s\n", message);
}

// The flag constants below are macros (or need _GNU_SOURCE); export them as functions so that
// Swift sees plain values.
static inline unsigned int modelfs_rename_noreplace(void) { return RENAME_NOREPLACE; }
static inline unsigned int modelfs_rename_exchange(void) { return RENAME_EXCHANGE; }
static inline int modelfs_falloc_keep_size(void) { return FALLOC_FL_KEEP_SIZE; }
static inline int modelfs_falloc_punch_hole(void) { return FALLOC_FL_PUNCH_HOLE; }
static inline unsigned int modelfs_major(dev_t d) { return major(d); }
static inline unsigned int modelfs_minor(dev_t d) { return minor(d); }

// fuse_file_info packs its flags into C bitfields, which Swift imports only partially.
static inline void modelfs_fi_set_keep_cache(struct fuse_file_info *fi, int v) { fi->keep_cache = v ? 1 : 0; }
static inline void modelfs_fi_set_direct_io(struct fuse_file_info *fi, int v) { fi->direct_io = v ? 1 : 0; }
static inline void modelfs_fi_set_noflush(struct fuse_file_info *fi, int v) { fi->noflush = v ? 1 : 0; }
static inline int modelfs_fi_writepage(const struct fuse_file_info *fi) { return fi->writepage; }

#endif
