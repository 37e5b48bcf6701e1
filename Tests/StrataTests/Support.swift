import Foundation
import XCTest
import TestSupport
@testable import Strata

/// Runs an external program and returns (exit status, stdout, stderr).
@discardableResult
func runTool(_ args: [String]) throws -> (status: Int32, out: String, err: String) {
    let r = try runProcess(args)
    return (r.status, r.out, r.err)
}

/// Fails the test (instead of skipping) when a peer tool is missing.
func requireTool(_ name: String, package: String) throws {
    let r = try runTool(["sh", "-c", "command -v \(name)"])
    if r.status != 0 { XCTFail("\(name) is not installed: install the Debian package \(package)"); throw XCTSkip("missing \(name)") }
}

/// A fresh temporary folder, removed when the test ends.
func tempDir(_ test: XCTestCase) throws -> String {
    let dir = NSTemporaryDirectory() + "strata-test-" + UUID().uuidString
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    test.addTeardownBlock { try? FileManager.default.removeItem(atPath: dir) }
    return dir
}

func readAll(_ dev: any BlockDevice) throws -> [UInt8] {
    var b = [UInt8](repeating: 0, count: Int(dev.size))
    try b.withUnsafeMutableBytes { try dev.read(into: $0, at: 0) }
    return b
}

func qemuRaw(_ path: String, dir: String, format: String = "qcow2") throws -> [UInt8] {
    let out = dir + "/qemu-raw-\(UUID().uuidString).raw"
    let r = try runTool(["qemu-img", "convert", "-U", "-f", format, "-O", "raw", path, out])
    XCTAssertEqual(r.status, 0, r.err)
    defer { try? FileManager.default.removeItem(atPath: out) }
    return [UInt8](try Data(contentsOf: URL(fileURLWithPath: out)))
}

/// `qemu-img check` must report no errors and no leaks (exit 0).
func assertQemuCheckClean(_ path: String, file: StaticString = #filePath, line: UInt = #line) throws {
    let r = try runTool(["qemu-img", "check", path])
    XCTAssertEqual(r.status, 0, "qemu-img check \(path):\n\(r.out)\(r.err)", file: file, line: line)
}

/// Runs a program and returns its standard output bytes.
func runToolData(_ args: [String]) throws -> [UInt8] {
    [UInt8](try runProcess(args).outData)
}

/// Sets a byte range of a model disk (memset: quick in debug builds too).
func fill(_ model: inout [UInt8], _ range: Range<Int>, _ byte: UInt8) {
    model.withUnsafeMutableBytes { _ = memset($0.baseAddress! + range.lowerBound, Int32(byte), range.count) }
}

/// Writes to `path` the file a crash after recorded event `k` could leave: `base`, then every
/// event up to the last sync before `k` (durable), then a random subset of the ones after it.
/// Returns the index just past that last sync.
@discardableResult
func writeCrashImage(_ events: [StorageEvent], upTo k: Int, base: [UInt8], rng: inout SeededRandom, to path: String) throws -> Int {
    let lastSync = events[..<k].lastIndex(of: .sync).map { $0 + 1 } ?? 0
    let disk = MemoryStorage(bytes: base)
    try RecordingStorage.replay(events[..<lastSync], onto: disk)
    try RecordingStorage.replay(events[lastSync..<k].filter { _ in rng.next() % 2 == 0 }, onto: disk)
    try Data(disk.contents).write(to: URL(fileURLWithPath: path))
    return lastSync
}
