import ArgumentParser
import Foundation
import ModelFSCore
import ModelFSMeta
import ModelFSNode
import ModelFSPeer
import ModelFSWire

/// The flags of a cluster node (with `--meta etcd://...`).
struct ClusterOptions: ParsableArguments {
    @Option(help: "Address the peer server listens on (cluster mode).")
    var listen: String = ClusterSettings.defaults.listen

    @Option(help: "Address other nodes reach this node at (default: the --listen address; required when that is 0.0.0.0).")
    var advertise: String?

    @Option(help: "File holding the cluster secret; every node must use the same secret.")
    var secretFile: String?

    @Option(help: "PEM file of this node's peer certificate, signed by --tls-ca, its subject naming the cluster (O=NAME of --meta) and the node (CN=): mutual TLS on every peer connection (with --tls-key and --tls-ca).")
    var tlsCert: String?

    @Option(help: "PEM file (mode 600) of the key of --tls-cert.")
    var tlsKey: String?

    @Option(help: "PEM file of the cluster's CA: peers whose certificates it did not sign are refused.")
    var tlsCa: String?

    @Option(help: "PEM file of the CA that signed the etcd members' certificates: talk to etcd over TLS (https).")
    var etcdCa: String?

    @Option(help: "PEM file of this node's client certificate for etcd (with --etcd-key), when etcd asks for one (--client-cert-auth).")
    var etcdCert: String?

    @Option(help: "PEM file (mode 600) of the key of --etcd-cert.")
    var etcdKey: String?

    @Option(help: "etcd user this node logs in as, when etcd has auth enabled (with --etcd-password-file).")
    var etcdUser: String?

    @Option(help: "File (mode 600) holding the password of --etcd-user.")
    var etcdPasswordFile: String?

    @Option(help: "Default copies of every block, for directories without a policy.")
    var replicas: Int = ClusterSettings.defaults.policy.replicas

    @Option(help: "Default copies durable before close() returns (1: write-back; = --replicas: synchronous).")
    var ack: Int = ClusterSettings.defaults.policy.ack

    @Option(help: "Spread copies over the values of this node label (e.g. zone).")
    var spread: String?

    @Option(help: "This node's labels, e.g. zone=a,rack=r1.")
    var labels: String?

    @Option(help: "Read-cache budget for blocks fetched from peers (e.g. 512M, 8G).")
    var cacheSize: String = sizeText(ClusterSettings.defaults.cacheSize)

    @Option(help: "Files at least this large (e.g. 16M) are loaded cooperatively when several nodes read them at once: each block leaves its holders about once and the loaders pass it on to each other (fan-out); 0: never.")
    var fanoutMinSize: String = sizeText(ClusterSettings.defaults.fanoutMinSize)

    @Flag(help: "Do not prefetch by file format (opening a safetensors file fetches its header's tensors ahead of the loader, in the loader's order).")
    var noFormatPrefetch = !ClusterSettings.defaults.formatPrefetch

    @Option(help: "Unreplicated bytes this node may hold before writers are slowed (e.g. 16G).")
    var stagingSize: String = sizeText(ClusterSettings.defaults.stagingSize)

    @Option(help: "Seconds close() and fsync() wait for their copies before failing with EIO.")
    var ackTimeout: Double = ClusterSettings.defaults.ackTimeout

    @Option(help: "How a writer sends a block's copies: chain (to the first target, which sends it on to the next: the writer's link carries each byte once) or fanout (one PUT per target).")
    var replication: String = ClusterSettings.defaults.chain ? "chain" : "fanout"

    @Option(help: "This node's id (default: generated once and kept in DATA/node-id).")
    var nodeId: String?

    @Option(help: "Seconds without renewal after which etcd drops this node (it counts as down).")
    var leaseTtl: Int = ClusterSettings.defaults.leaseTtl

    @Option(help: "Seconds a node may be down before its blocks are copied elsewhere (a restart within this costs no copying).")
    var deadAfter: Double = ClusterSettings.defaults.deadAfter

    @Option(help: "Seconds between the healer's looks at the cluster (one node runs it): it reads the namespace only when nodes joined, died, left or drain, when its last pass did something, or every --heal-full-every.")
    var healInterval: Double = ClusterSettings.defaults.healInterval

    @Option(help: "Seconds after which the healer reads the whole namespace even when nothing changed.")
    var healFullEvery: Double = ClusterSettings.defaults.healFullEvery

    @Option(help: "Files a second, at most, the healer reads while it walks the namespace (0: no limit).")
    var healScanRate: Int = Int(ClusterSettings.defaults.healScanRate)

    @Option(help: "Bytes per second of healing copies (re-replication, drain, rebalancing) across the cluster, applied by the node that runs the healer; 0: as fast as the nodes go.")
    var healRate: String = sizeText(ClusterSettings.defaults.healRate)

    @Option(help: "Bytes per second of healing copies a node sends and receives while it serves readers or writers (its own or other nodes'); at full speed once it has been idle for a quarter second. 0: healing never yields.")
    var healRateBusy: String = sizeText(ClusterSettings.defaults.healRateBusy)

    @Option(help: "Bytes per second the scrubber re-reads and re-hashes this node's replicas at (0: off).")
    var scrubRate: String = sizeText(ClusterSettings.defaults.scrubRate)

    @Option(help: "Seconds from the start of one scrub pass to the next.")
    var scrubEvery: Double = ClusterSettings.defaults.scrubEvery

    @Option(help: "Seconds a block nothing references is kept before garbage collection removes it (copies for writes still under way, leftovers of crashes).")
    var gcDelay: Double = ClusterSettings.defaults.gcDelay

    @Option(help: "Seconds the blocks of a replaced or deleted version are kept (at most --gc-delay), and after that for as long as a reader on any node still has that version open.")
    var gcSupersededDelay: Double = ClusterSettings.defaults.gcSupersededDelay

    @Option(help: "Manifests a second, at most, garbage collection reads from etcd while it pages through the namespace (a pass runs after content changed somewhere, or hourly).")
    var gcScanRate: Int = Int(ClusterSettings.defaults.gcScanRate)

    /// The flags again, to hand to the daemon process.
    var arguments: [String] {
        var a = ["--listen", listen, "--replicas", String(replicas), "--ack", String(ack), "--cache-size", cacheSize, "--fanout-min-size", fanoutMinSize,
                 "--staging-size", stagingSize, "--ack-timeout", String(ackTimeout), "--replication", replication, "--lease-ttl", String(leaseTtl),
                 "--dead-after", String(deadAfter), "--heal-interval", String(healInterval),
                 "--heal-full-every", String(healFullEvery), "--heal-scan-rate", String(healScanRate), "--heal-rate", healRate, "--heal-rate-busy", healRateBusy, "--scrub-rate", scrubRate,
                 "--scrub-every", String(scrubEvery), "--gc-delay", String(gcDelay),
                 "--gc-superseded-delay", String(gcSupersededDelay), "--gc-scan-rate", String(gcScanRate)]
        if noFormatPrefetch { a.append("--no-format-prefetch") }
        if let advertise { a += ["--advertise", advertise] }
        if let secretFile { a += ["--secret-file", secretFile] }
        if let spread { a += ["--spread", spread] }
        if let labels { a += ["--labels", labels] }
        if let nodeId { a += ["--node-id", nodeId] }
        for (flag, value) in [("--tls-cert", tlsCert), ("--tls-key", tlsKey), ("--tls-ca", tlsCa), ("--etcd-ca", etcdCa), ("--etcd-cert", etcdCert), ("--etcd-key", etcdKey),
                              ("--etcd-user", etcdUser), ("--etcd-password-file", etcdPasswordFile)] {
            if let value { a += [flag, value] }
        }
        return a
    }

    /// Checks the flags; returns the one-line problem, if any.
    func problem() -> String? {
        guard let secretFile else {
            return "a cluster node needs --secret-file FILE holding the cluster secret (the same on every node)"
        }
        if let why = unsafeSecretFile(secretFile) { return why }
        guard let secret = readSecret(secretFile) else {
            return "cannot read the secret file \(secretFile); create it (e.g. (umask 077; head -c 32 /dev/urandom | base64 > \(secretFile)))"
        }
        if secret.count < 8 {
            return "the secret in \(secretFile) is shorter than 8 characters; use a long random one"
        }
        if let problem = credentialProblem() { return problem }
        if replicas < 1 || replicas > 16 || ack < 1 || ack > replicas {
            return "--replicas \(replicas) --ack \(ack): need 1 <= ack <= replicas <= 16"
        }
        if parseHostPort(listen) == nil { return "--listen \(listen): expected HOST:PORT, e.g. 0.0.0.0:7420" }
        if let advertise, parseHostPort(advertise) == nil { return "--advertise \(advertise): expected HOST:PORT" }
        if advertise == nil, parseHostPort(listen)?.host == "0.0.0.0" {
            return "--listen \(listen) binds every address: say which one other nodes should use with --advertise HOST:PORT"
        }
        if parseSize(cacheSize) == nil { return "--cache-size \(cacheSize): expected a size such as 512M or 8G" }
        if parseSize(fanoutMinSize) == nil { return "--fanout-min-size \(fanoutMinSize): expected a size such as 16M, or 0 for never" }
        if parseSize(stagingSize) == nil { return "--staging-size \(stagingSize): expected a size such as 512M or 16G" }
        if parseLabels(labels ?? "") == nil { return "--labels \(labels ?? ""): expected KEY=VALUE[,KEY=VALUE...]" }
        if ackTimeout <= 0 { return "--ack-timeout must be positive" }
        if leaseTtl < 2 || leaseTtl > 3600 { return "--lease-ttl \(leaseTtl): use 2 to 3600 seconds" }
        if deadAfter < 0 { return "--dead-after must be 0 or more seconds" }
        if healInterval <= 0 { return "--heal-interval must be positive" }
        if parseSize(healRate) == nil { return "--heal-rate \(healRate): expected a rate in bytes per second such as 200M (0: no cap)" }
        if parseSize(healRateBusy) == nil { return "--heal-rate-busy \(healRateBusy): expected a rate in bytes per second such as 100M (0: healing never yields)" }
        if parseSize(scrubRate) == nil { return "--scrub-rate \(scrubRate): expected a rate in bytes per second such as 16M (0: off)" }
        if scrubEvery <= 0 { return "--scrub-every must be positive" }
        if gcDelay < 1 { return "--gc-delay must be at least 1 second" }
        if gcSupersededDelay < 1 { return "--gc-superseded-delay must be at least 1 second (the time readers on other nodes have to hold a version)" }
        if replication != "chain" && replication != "fanout" { return "--replication must be chain or fanout" }
        if healFullEvery <= 0 { return "--heal-full-every must be more than 0 seconds" }
        if healScanRate < 0 { return "--heal-scan-rate must be 0 (no limit) or more files a second" }
        if gcScanRate < 0 { return "--gc-scan-rate must be 0 (no limit) or more manifests a second" }
        return nil
    }

    /// The peer TLS and etcd TLS/auth flags' problem, if any: files that go together, that must
    /// be readable, and keys and passwords that must be private.
    func credentialProblem() -> String? {
        let peer = [tlsCert, tlsKey, tlsCa].compactMap { $0 }.count
        if peer != 0 && peer != 3 { return "--tls-cert, --tls-key and --tls-ca go together: give all three or none" }
        if (etcdCert == nil) != (etcdKey == nil) { return "--etcd-cert and --etcd-key go together: give both or neither" }
        if (etcdUser == nil) != (etcdPasswordFile == nil) { return "--etcd-user and --etcd-password-file go together: give both or neither" }
        let files = [("--tls-cert", tlsCert), ("--tls-key", tlsKey), ("--tls-ca", tlsCa), ("--etcd-ca", etcdCa),
                     ("--etcd-cert", etcdCert), ("--etcd-key", etcdKey), ("--etcd-password-file", etcdPasswordFile)]
        for (flag, path) in files {
            guard let path else { continue }
            if access(path, R_OK) != 0 { return "\(flag) \(path): cannot read it (\(String(cString: strerror(errno))))" }
        }
        for (flag, path) in [("--tls-key", tlsKey), ("--etcd-key", etcdKey), ("--etcd-password-file", etcdPasswordFile)] {
            if let path, let why = unsafeSecretFile(path, flag: flag) { return why }
        }
        return nil
    }

    /// How to reach etcd: TLS files and the user, its password read from its file.
    var etcdSecurity: EtcdSecurity {
        EtcdSecurity(caFile: etcdCa, certFile: etcdCert, keyFile: etcdKey, user: etcdUser,
                     password: etcdPasswordFile.flatMap { try? String(contentsOfFile: $0, encoding: .utf8) }?
                         .trimmingCharacters(in: .newlines))
    }

    var secret: String { secretFile.flatMap(readSecret) ?? "" }
    var policy: ReplicationPolicy { ReplicationPolicy(replicas: replicas, ack: ack, spread: spread) }

    /// The flags as a node's settings (after `problem()` found none: every size parses).
    var settings: ClusterSettings {
        var s = ClusterSettings(secret: secret, listen: listen)
        s.advertise = advertise
        if let tlsCert, let tlsKey, let tlsCa { s.tls = (cert: tlsCert, key: tlsKey, ca: tlsCa) }
        s.etcdSecurity = etcdSecurity
        s.policy = policy
        s.labels = parseLabels(labels ?? "") ?? [:]
        s.cacheSize = parseSize(cacheSize)!
        s.fanoutMinSize = parseSize(fanoutMinSize)!
        s.formatPrefetch = !noFormatPrefetch
        s.stagingSize = parseSize(stagingSize)!
        s.ackTimeout = ackTimeout
        s.chain = replication == "chain"
        s.nodeID = nodeId
        s.leaseTtl = leaseTtl
        s.deadAfter = deadAfter
        s.healInterval = healInterval
        s.healFullEvery = healFullEvery
        s.healScanRate = UInt64(healScanRate)
        s.healRate = parseSize(healRate)!
        s.healRateBusy = parseSize(healRateBusy)!
        s.scrubRate = parseSize(scrubRate)!
        s.scrubEvery = scrubEvery
        s.gcDelay = gcDelay
        s.gcSupersededDelay = gcSupersededDelay
        s.gcScanRate = UInt64(gcScanRate)
        return s
    }
}

/// Why a file holding a secret or a key must not be used, if it must not: other users can read
/// or change it (like ssh, any group or other permission bit refuses it), or it is not a
/// regular file. The secret itself is never put in a message or a log.
func unsafeSecretFile(_ path: String, flag: String = "--secret-file") -> String? {
    var st = stat()
    guard stat(path, &st) == 0 else { return nil }  // "cannot read" is reported by the caller
    if st.st_mode & S_IFMT != S_IFREG { return "\(flag) \(path) is not a regular file" }
    if st.st_mode & 0o077 != 0 {
        return "\(flag) \(path) is open to other users (mode \(String(st.st_mode & 0o777, radix: 8))); make it private with: chmod 600 \(path)"
    }
    return nil
}

/// A secret or token file's text without surrounding whitespace, nil if it cannot be read.
func readSecret(_ path: String) -> String? {
    (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
}
