// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "Strata",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "Strata", targets: ["Strata"]),
        .library(name: "StrataNBD", targets: ["StrataNBD"]),
        .executable(name: "strata", targets: ["StrataTool"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-crypto", from: "4.5.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
    ],
    targets: [
        .systemLibrary(name: "CLZ4", pkgConfig: "liblz4",
                       providers: [.apt(["liblz4-dev"])]),
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd",
                       providers: [.apt(["libzstd-dev"])]),
        .systemLibrary(name: "CZlib", pkgConfig: "zlib",
                       providers: [.apt(["zlib1g-dev"])]),
        .target(name: "Strata", dependencies: [
            "CLZ4", "CZstd", "CZlib",
            .product(name: "Crypto", package: "swift-crypto"),
        ]),
        .target(name: "StrataNBD", dependencies: [
            "Strata",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .executableTarget(name: "StrataTool", dependencies: [
            "Strata", "StrataNBD",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Histogram", package: "hdrhistogram-swift"),
        ]),
        .target(name: "TestSupport", path: "Tests/TestSupport"),
        .testTarget(name: "StrataTests", dependencies: ["Strata", "TestSupport"]),
        .testTarget(name: "StrataNBDTests", dependencies: ["StrataNBD", "Strata", "TestSupport"]),
        .testTarget(name: "InteropTests", dependencies: ["Strata", "TestSupport"]),
        .testTarget(name: "StrataToolTests", dependencies: ["Strata", "TestSupport"]),
    ],
    swiftLanguageModes: [.v5]
)
