// Mutual TLS for the peer protocol's blocking sockets, through the system's OpenSSL (libssl3).
// The peer server and BlockTransfer move block bytes with recv/send/sendfile on plain blocking
// descriptors; with TLS on, SocketIO routes those calls here for the connections that carry a
// session. Every peer presents a certificate signed by the cluster's CA whose subject names the
// cluster (O=) and the node (CN=); both sides check both. docs/DEPLOY.md "Peer TLS".
#ifndef MODELFS_TLS_H
#define MODELFS_TLS_H

#include <stddef.h>
#include <sys/types.h>

typedef struct modelfs_tls_ctx modelfs_tls_ctx;

// A context for both directions: the CA that signs every node, this node's certificate and
// key (PEM files). NULL with a message in err on failure.
modelfs_tls_ctx *modelfs_tls_ctx_new(const char *ca, const char *cert, const char *key, char *err, size_t errlen);
void modelfs_tls_ctx_free(modelfs_tls_ctx *ctx);
// This node's certificate: its subject's O and CN, and seconds until it expires (negative:
// expired). 0 on success.
int modelfs_tls_ctx_identity(modelfs_tls_ctx *ctx, char *org, size_t orglen, char *cn, size_t cnlen, long *expires_in);

// The handshake on a connected blocking descriptor, as server (accept) or client: the peer's
// certificate must chain to the CA and be within its dates; its subject's O and CN are
// returned for the caller to check. A session, or NULL with a message in err.
void *modelfs_tls_handshake(modelfs_tls_ctx *ctx, int fd, int server, char *org, size_t orglen,
                            char *cn, size_t cnlen, char *err, size_t errlen);
// Like recv/send on a blocking socket: bytes moved, 0 at the end of the stream (read), -1 with
// errno set (EAGAIN when SO_RCVTIMEO/SO_SNDTIMEO passed, EIO for a TLS error).
ssize_t modelfs_tls_read(void *session, void *buf, size_t len);
ssize_t modelfs_tls_write(void *session, const void *buf, size_t len);
// Bytes already decrypted and waiting in the session (poll(2) cannot see them).
int modelfs_tls_pending(void *session);
// Frees the session without a close_notify (the descriptor is closed by the caller).
void modelfs_tls_free(void *session);

#endif
