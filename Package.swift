// swift-tools-version:6.0
import PackageDescription

// The layers of modelfs, one target each (DESIGN.md §7):
// CFuse3 → ModelFSCore → ModelFSStore / ModelFSMeta → ModelFS → ModelFSFUSE → modelfs (CLI).
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
            dependencies: [.product(name: "Crypto", package: "swift-crypto")]
        ),
        // glibc functions Swift's Glibc module leaves out (syncfs, fallocate, mallopt).
        .systemLibrary(name: "CModelFSSys", path: "Sources/CModelFSSys"),
        .target(name: "ModelFSStore", dependencies: ["ModelFSCore", "CModelFSSys"]),
        .target(
            name: "ModelFSMeta",
            dependencies: ["ModelFSCore", .product(name: "GRDB", package: "GRDB.swift")]
        ),
        .target(name: "ModelFS", dependencies: ["ModelFSCore", "ModelFSStore", "ModelFSMeta"]),
        .target(name: "ModelFSFUSE", dependencies: ["CFuse3", "ModelFS"]),
        .executableTarget(
            name: "modelfs",
            dependencies: [
                "ModelFSFUSE", "ModelFS", "CModelFSSys",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .target(name: "ModelFSTestSupport", path: "Sources/ModelFSTestSupport"),
        .testTarget(name: "ModelFSCoreTests", dependencies: ["ModelFSCore", "ModelFSStore", "ModelFSTestSupport"]),
        .testTarget(name: "ModelFSMetaTests", dependencies: ["ModelFSMeta"]),
        .testTarget(name: "ModelFSTests", dependencies: ["ModelFS", "ModelFSTestSupport"]),
    ]
)
