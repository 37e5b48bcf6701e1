import Foundation
import XCTest
import TestSupport

/// Running the built `strata` binary and QEMU's tools.
enum Peer {
    static func run(_ args: [String]) throws -> ProcessResult { try runProcess(args) }

    /// Runs and requires exit status 0.
    static func ok(_ args: [String], file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try run(args)
        if r.status != 0 {
            XCTFail("\(args.prefix(4).joined(separator: " ")) … exited \(r.status): \(r.err.prefix(2000))", file: file, line: line)
            throw CancellationError()
        }
    }

    static func tempDir(_ test: XCTestCase) throws -> String {
        for tool in ["qemu-img", "qemu-io"] where (try run(["sh", "-c", "command -v \(tool)"])).status != 0 {
            XCTFail("\(tool) is not installed: install the Debian package qemu-utils")
            throw XCTSkip("missing \(tool)")
        }
        let dir = NSTemporaryDirectory() + "strata-interop-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        test.addTeardownBlock { try? FileManager.default.removeItem(atPath: dir) }
        return dir
    }

    /// The `strata` binary built with the tests: `$STRATA_BIN`, next to the test bundle, or the
    /// package's newest `.build*/debug/strata`.
    static func strata() throws -> String {
        let fm = FileManager.default
        if let env = ProcessInfo.processInfo.environment["STRATA_BIN"], fm.isExecutableFile(atPath: env) { return env }
        for b in Bundle.allBundles where b.bundleURL.pathExtension == "xctest" {
            let c = b.bundleURL.deletingLastPathComponent().appendingPathComponent("strata").path
            if fm.isExecutableFile(atPath: c) { return c }
        }
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        for d in ((try? fm.contentsOfDirectory(atPath: root.path)) ?? []).filter({ $0.hasPrefix(".build") }).sorted() {
            let c = root.appendingPathComponent(d).appendingPathComponent("debug/strata").path
            if fm.isExecutableFile(atPath: c) { return c }
        }
        XCTFail("strata binary not found: build it first (swift build --product strata)")
        throw XCTSkip("no strata")
    }
}

