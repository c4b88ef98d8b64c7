import CModelFSTLS
import Foundation
import ModelFSCore
import NIOSSL
import Synchronization

/// Mutual TLS between nodes (`--tls-cert`, `--tls-key`, `--tls-ca`). Every node holds a
/// certificate signed by the cluster's CA whose subject names the cluster (`O=`, the NAME of
/// `--meta etcd://.../NAME`) and the node (`CN=`). Each connection's two ends verify each other:
/// a certificate not signed by the CA, out of its dates, or for another cluster is refused, and
/// both sides log why. The block path keeps its plain blocking sockets: after the handshake
/// SocketIO reads and writes a connection's bytes through its OpenSSL session (a GET's block
/// sent from its pack is read into memory and encrypted: sendfile cannot encrypt without the
/// kernel's TLS, which this kernel lacks). The cluster secret is still required on every request.
public final class PeerTLS: @unchecked Sendable {
    let ctx: OpaquePointer
    public let cluster: String
    /// This node's certificate's CN.
    public let node: String
    public let caFile: String
    public let certFile: String
    public let keyFile: String
    /// Seconds until this node's certificate expires.
    public let expiresIn: Double
    /// The same identity for AsyncHTTPClient (PeerClient's requests other than block transfers):
    /// the CA, this node's certificate; addresses are not names, so the chain is what is checked
    /// (and the server checks this node's cluster).
    let clientConfiguration: TLSConfiguration

    public init(ca: String, cert: String, key: String, cluster: String) throws {
        var err = [CChar](repeating: 0, count: 512)
        guard let ctx = modelfs_tls_ctx_new(ca, cert, key, &err, err.count) else {
            throw FSError.invalid("peer TLS: \(cText(err))")
        }
        var org = [CChar](repeating: 0, count: 256), cn = [CChar](repeating: 0, count: 256)
        var expires = 0
        _ = modelfs_tls_ctx_identity(ctx, &org, org.count, &cn, cn.count, &expires)
        let o = cText(org)
        guard o == cluster else {
            modelfs_tls_ctx_free(ctx)
            throw FSError.invalid("peer TLS: --tls-cert \(cert) is for cluster \"\(o)\" (its subject's O), this node joins \"\(cluster)\"")
        }
        guard expires > 0 else {
            modelfs_tls_ctx_free(ctx)
            throw FSError.invalid("peer TLS: --tls-cert \(cert) has expired")
        }
        do {
            var c = TLSConfiguration.makeClientConfiguration()
            c.minimumTLSVersion = .tlsv13
            c.trustRoots = .file(ca)
            c.certificateVerification = .noHostnameVerification
            c.certificateChain = try NIOSSLCertificate.fromPEMFile(cert).map { .certificate($0) }
            c.privateKey = .privateKey(try NIOSSLPrivateKey(file: key, format: .pem))
            clientConfiguration = c
        } catch {
            modelfs_tls_ctx_free(ctx)
            throw FSError.invalid("peer TLS: cannot load \(cert) or \(key): \(error)")
        }
        self.ctx = ctx
        self.cluster = cluster
        node = cText(cn)
        caFile = ca; certFile = cert; keyFile = key
        expiresIn = Double(expires)
        SocketIO.tlsOn.store(true, ordering: .releasing)
    }

    deinit { modelfs_tls_ctx_free(ctx) }

    /// A refused handshake or identity.
    public struct Refused: Error, CustomStringConvertible { public let description: String }

    /// The handshake on a connected descriptor; its bytes then go through the session (SocketIO).
    /// Returns the peer's node name (its CN).
    @discardableResult
    func secure(_ fd: Int32, server: Bool) throws -> String {
        var org = [CChar](repeating: 0, count: 256), cn = [CChar](repeating: 0, count: 256), err = [CChar](repeating: 0, count: 512)
        guard let session = modelfs_tls_handshake(ctx, fd, server ? 1 : 0, &org, org.count, &cn, cn.count, &err, err.count) else {
            throw Refused(description: cText(err))
        }
        let o = cText(org)
        guard o == cluster else {
            modelfs_tls_free(session)
            throw Refused(description: "the peer's certificate is for cluster \"\(o)\", not \"\(cluster)\"")
        }
        let bits = UInt(bitPattern: session)
        SocketIO.sessions.withLock { $0[fd] = bits }
        return cText(cn)
    }
}

/// The NUL-terminated text in a C buffer.
func cText(_ buffer: [CChar]) -> String {
    String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
