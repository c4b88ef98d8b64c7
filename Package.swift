// swift-tools-version:6.0
import PackageDescription

// The layers of modelfs, one target each (DESIGN.md §7), each using only those to its left:
// ModelFSCore → ModelFSStore, ModelFSMeta → ModelFS → ModelFSFUSE (+ CFuse3, CModelFSPassthrough),
// ModelFSWire (+ CModelFSTLS) → ModelFSPeer → ModelFSNode (one mount's parts composed: the store,
// the engine, a cluster node, the filesystem, GC, FUSE) → modelfs (the CLI and the daemon process).
let package = Package(
    name: "modelfs",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "modelfs", targets: ["modelfs"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        .package(url: "https://github.com/groue/GRDB.swift", from: "7.10.0"),
        // The cluster: the etcd engine speaks HTTP through AsyncHTTPClient; the peer server and
        // client are blocking sockets of their own, using SwiftNIO's HTTP types (DESIGN.md §5).
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.3"),
        .package(url: "https://github.com/swift-server/async-http-client", from: "1.37.0"),
        // TLS to etcd (AsyncHTTPClient's TLS, so already in the graph).
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
        // The log goes through swift-log (AsyncHTTPClient's logging API, so already in the graph).
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        // The config file (`--config`, `modelfs config check`): YAML, with each key's line.
        .package(url: "https://github.com/jpsim/Yams", from: "6.2.2"),
    ],
    targets: [
        .systemLibrary(
            name: "CFuse3",
            path: "Sources/CFuse3",
            pkgConfig: "fuse3",
            providers: [.apt(["libfuse3-dev"])]
        ),
        .target(
            name: "ModelFSCore",
            dependencies: [
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // glibc functions Swift's Glibc module leaves out (syncfs, fallocate, mallopt).
        .systemLibrary(name: "CModelFSSys", path: "Sources/CModelFSSys"),
        .target(name: "ModelFSStore", dependencies: ["ModelFSCore", "CModelFSSys"]),
        .target(
            name: "ModelFSMeta",
            dependencies: [
                "ModelFSCore",
                .product(name: "GRDB", package: "GRDB.swift"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ]
        ),
        .target(name: "ModelFS", dependencies: ["ModelFSCore", "ModelFSStore", "ModelFSMeta", "CModelFSSys"]),
        // libfuse 3.14's /dev/fuse hooks that turn FUSE passthrough on (see its header).
        .target(name: "CModelFSPassthrough"),
        .target(name: "ModelFSFUSE", dependencies: ["CFuse3", "CModelFSPassthrough", "ModelFS", "ModelFSMeta", "ModelFSStore", "ModelFSCore"]),
        // Mutual TLS between peers, through the system's OpenSSL (libssl-dev; see its header).
        .target(name: "CModelFSTLS", linkerSettings: [.linkedLibrary("ssl"), .linkedLibrary("crypto")]),
        // The wire between nodes: the peer server and its routes, the client, block transfers,
        // TLS (DESIGN.md §5). Knows blocks and nodes, not the filesystem or the cluster's logic.
        .target(
            name: "ModelFSWire",
            dependencies: [
                "ModelFSStore", "ModelFSCore", "CModelFSTLS",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ]
        ),
        // The cluster's logic over the wire: placement, membership, replication, the writer
        // lock, healing, scrubbing, the block store that reaches peers (DESIGN.md §5).
        .target(
            name: "ModelFSPeer",
            dependencies: [
                "ModelFSWire", "ModelFS", "ModelFSMeta", "ModelFSStore", "ModelFSCore",
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "GRDB", package: "GRDB.swift"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ]
        ),
        // One mount composed from the layers below: its settings as values, the cluster node's
        // parts and their wiring, everything given at construction (the CLI only parses and calls).
        .target(
            name: "ModelFSNode",
            dependencies: ["ModelFSPeer", "ModelFSWire", "ModelFSFUSE", "ModelFS", "ModelFSMeta", "ModelFSStore", "ModelFSCore"]
        ),
        // The version and the commit being built (`modelfs --version`).
        .plugin(name: "BuildInfoPlugin", capability: .buildTool()),
        .target(name: "ModelFSBuildInfo", plugins: ["BuildInfoPlugin"]),
        .executableTarget(
            name: "modelfs",
            dependencies: [
                "ModelFSNode", "ModelFSFUSE", "ModelFS", "ModelFSPeer", "ModelFSWire", "CModelFSSys", "ModelFSBuildInfo",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                // SHA-256 of whole files: `modelfs export` and `import` manifests.
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Yams", package: "Yams"),
            ]
        ),
        // Test support: etcd members and processes tests start, random data, and the fault injectors
        // (FaultyBlockStore over a real store, FaultyTransport between a real client and server).
        .target(name: "ModelFSTestSupport", dependencies: ["ModelFSStore", "ModelFSCore"], path: "Sources/ModelFSTestSupport"),
        .testTarget(name: "ModelFSCoreTests", dependencies: ["ModelFSCore", "ModelFSStore", "ModelFSTestSupport"]),
        .testTarget(name: "ModelFSMetaTests", dependencies: ["ModelFSMeta", "ModelFSTestSupport"]),
        .testTarget(name: "ModelFSTests", dependencies: ["ModelFS", "ModelFSTestSupport"]),
        .testTarget(name: "ModelFSPeerTests", dependencies: ["ModelFSPeer", "ModelFSWire", "ModelFSTestSupport"]),
        .testTarget(name: "ModelFSFUSETests", dependencies: ["ModelFSFUSE", "ModelFSTestSupport"]),
        .testTarget(name: "ModelFSNodeTests", dependencies: ["ModelFSNode", "ModelFSMeta", "ModelFSTestSupport"]),
    ]
)
