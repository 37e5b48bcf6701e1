// swift-tools-version:6.0
import PackageDescription
import Foundation

// libFuzzer targets, as a nested package. Each target is a *library* holding one
// `LLVMFuzzerTestOneInput`: SwiftPM compiles it (and the engine) with the fuzzer and address
// sanitizers, and run.sh links its objects with `swiftc -sanitize=fuzzer,address`, since a
// SwiftPM executable target cannot be linked against libFuzzer's `main`. Build and run with
// ./run.sh, never with `swift build` alone (see README.md).

// A path dependency is named after its folder, and the repository may be cloned into any folder.
let parent = URL(fileURLWithPath: Context.packageDirectory).deletingLastPathComponent().lastPathComponent

let package = Package(
    name: "StrataFuzz",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(path: ".."),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
    ],
    targets: [
        .target(name: "FuzzImage", dependencies: [
            .product(name: "Strata", package: parent),
        ]),
        .target(name: "FuzzNBD", dependencies: [
            .product(name: "StrataNBD", package: parent),
            .product(name: "Strata", package: parent),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "FuzzCheck", dependencies: [
            .product(name: "Strata", package: parent),
        ]),
        .target(name: "FuzzSnapshots", dependencies: [
            .product(name: "Strata", package: parent),
        ]),
        .target(name: "FuzzControl", dependencies: [
            .product(name: "StrataNBD", package: parent),
            .product(name: "Strata", package: parent),
            .product(name: "Logging", package: "swift-log"),
        ]),
    ],
    swiftLanguageModes: [.v5]
)
