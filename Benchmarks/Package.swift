// swift-tools-version:6.1
import PackageDescription
import Foundation

// A path dependency is named after its folder, and the repository may be cloned into any folder.
let parent = URL(fileURLWithPath: Context.packageDirectory).deletingLastPathComponent().lastPathComponent

// Micro-benchmarks of the engine, as a nested package so the main package does not depend on
// package-benchmark. Run from this folder: `swift package benchmark` (see README.md).
let package = Package(
    name: "StrataBenchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(path: ".."),
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.1",
                 traits: ["MallocInterposer"]),
    ],
    targets: [
        .executableTarget(
            name: "ImageIO",
            dependencies: [
                .product(name: "Strata", package: parent),
                .product(name: "Benchmark", package: "benchmark"),
            ],
            path: "Benchmarks/ImageIO",
            plugins: [
                .plugin(name: "BenchmarkPlugin", package: "benchmark"),
            ]
        ),
    ],
    swiftLanguageModes: [.v5]
)
