import Foundation
import XCTest
import TestSupport
@testable import Strata

/// Offline dedup under crashes: a crash at any point of a dedup pass leaves leaks at most (or
/// the COPIED window qcow2 cannot close, which `qemu-img check -r all` clears), and the disk
/// always reads as it did before the pass.
final class DedupEngineTests: XCTestCase {
    func testCrashDuringDedupNeverChangesTheDisk() throws {
        try requireTool("qemu-img", package: "qemu-utils")
        let dir = try tempDir(self)
        let cs = 4096, size = 1 << 20
        let base = MemoryStorage(name: "\(dir)/dedupcrash.qcow2")
        var o = CreateOptions(size: UInt64(size))
        o.clusterSize = cs
        try Qcow2Image.create(storage: base, path: base.name, options: o)
        // Four distinct clusters repeated over the disk, some zero clusters written as data.
        var model = [UInt8](repeating: 0, count: size)
        let img0 = try Qcow2Image(storage: base, options: OpenOptions(writable: true))
        for k in 0..<(size / cs) {
            let byte = UInt8(k % 5 == 4 ? 0 : k % 4 + 1)
            let data = [UInt8](repeating: byte, count: cs)
            try data.withUnsafeBytes { try img0.write($0, at: UInt64(k * cs), fua: false) }
            fill(&model, k * cs..<(k + 1) * cs, byte)
        }
        try img0.close()
        let baseBytes = base.contents

        let rec = RecordingStorage(base)
        let img = try Qcow2Image(storage: rec, options: OpenOptions(writable: true, l2CacheBytes: 4 * cs, refcountCacheBytes: 4 * cs))
        let report = try img.deduplicate()
        XCTAssertEqual(report.zeroed, UInt64(size / cs / 5))
        XCTAssertEqual(report.shared, UInt64(size / cs) - report.zeroed - 4)
        let events = rec.events
        try img.close()

        var rng = SeededRandom(seed: 99)
        var points = Set(events.indices.filter { events[$0] == .sync }.map { $0 + 1 })
        for _ in 0..<30 { points.insert(Int(rng.next() % UInt64(events.count + 1))) }
        let path = "\(dir)/dedupcrash.qcow2"
        for k in points.sorted() {
            try writeCrashImage(events, upTo: k, base: baseBytes, rng: &rng, to: path)
            let check = try runTool(["qemu-img", "check", path])
            let errors = (check.out + check.err).split(separator: "\n").filter { $0.hasPrefix("ERROR") }
            let onlyCopied = check.status == 2 && !errors.isEmpty && errors.allSatisfy { $0.hasPrefix("ERROR OFLAG_COPIED") }
            XCTAssertTrue(check.status == 0 || check.status == 3 || onlyCopied, "crash after event \(k) of \(events.count): \(check.out)\(check.err)")
            let ours = try Qcow2Image.check(path: path, repair: nil) { _ in }
            XCTAssertEqual(ours.exitCode, check.status, "strata's check and qemu-img's disagree after event \(k): \(check.out)\(check.err)")
            let image = try Qcow2Image(path: path, options: OpenOptions(writable: false))
            let now = try readAll(image)
            try image.close()
            if now != model {
                XCTFail("crash after event \(k): the disk changed")
                return
            }
        }
    }
}
