import Foundation
import XCTest
import TestSupport
@testable import Strata

/// The persistent dedup index: a reopened image finds what earlier runs stored without a
/// rescan; after QEMU writes the image the file is no longer trusted (the autoclear bit) and
/// offline dedup rebuilds it; a hostile or damaged file costs ratio, never data.
extension InlineDedupTests {
    func write(_ img: Qcow2Image, _ block: [UInt8], cluster: Int) throws {
        try block.withUnsafeBytes { try img.write($0, at: UInt64(cluster * cs), fua: false) }
    }

    func testReopenedImageSharesWithWhatEarlierRunsStored() throws {
        try requireTool("qemu-img", package: "qemu-utils")
        let dir = try tempDir(self)
        let path = try makeImage(dir, size: 1 << 20)
        XCTAssertTrue(FileManager.default.fileExists(atPath: path + ".dedup-index"), "create starts the index file")
        let a = block(31), b = block(32)
        let first = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        XCTAssertEqual(first.dedupIndexState, .valid(records: 0, complete: true))
        try write(first, a, cluster: 0)
        try write(first, b, cluster: 1)
        try first.close()

        let second = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        XCTAssertEqual(second.dedupIndexState, .valid(records: 2, complete: true))
        XCTAssertEqual(second.dedup?.count, 2, "loaded, not rescanned")
        try write(second, a, cluster: 5)
        try write(second, b, cluster: 9)
        XCTAssertEqual(try distinctHosts(second).count, 2, "the copies share the clusters the first run stored")
        try second.close()
        try assertQemuCheckClean(path)
        var model = [UInt8](repeating: 0, count: 1 << 20)
        for (k, blk) in [(0, a), (1, b), (5, a), (9, b)] { model.replaceSubrange(k * cs..<(k + 1) * cs, with: blk) }
        XCTAssertTrue(try qemuRaw(path, dir: dir) == model)
    }

    func testQemuWriteMakesTheIndexStaleAndOfflineDedupRebuildsIt() throws {
        try requireTool("qemu-io", package: "qemu-utils")
        let dir = try tempDir(self)
        let path = try makeImage(dir, size: 1 << 20)
        let a = block(41)
        let first = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        try write(first, a, cluster: 0)
        try first.close()
        let r = try runTool(["qemu-io", "-f", "qcow2", path, "-c", "write -P 0x5a 64k 4k"])
        XCTAssertEqual(r.status, 0, r.err)

        // QEMU cleared the bit: the file is not used, and is started afresh.
        let second = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        guard case .stale = second.dedupIndexState else { return XCTFail("\(second.dedupIndexState)") }
        XCTAssertEqual(second.dedup?.count, 0)
        try write(second, a, cluster: 3)
        XCTAssertEqual(try distinctHosts(second).count, 3, "what the stale file named is not found")
        try second.close()
        let third = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        XCTAssertEqual(third.dedupIndexState, .valid(records: 1, complete: false), "the new file holds what was indexed since")
        try third.close()

        // Offline dedup shares the copies and rebuilds a complete file.
        let offline = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        XCTAssertEqual(try offline.deduplicate().shared, 1)
        try offline.close()
        let fourth = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        XCTAssertEqual(fourth.dedupIndexState, .valid(records: 2, complete: true))
        try write(fourth, a, cluster: 7)
        XCTAssertEqual(try distinctHosts(fourth).count, 2)
        try fourth.close()
        try assertQemuCheckClean(path)
    }

    /// Records naming the wrong cluster, a metadata cluster, clusters outside the image, and
    /// a torn last record: every write still reads back exactly and the image checks clean.
    func testHostileIndexFileCostsRatioNeverData() throws {
        try requireTool("qemu-img", package: "qemu-utils")
        let dir = try tempDir(self)
        let path = try makeImage(dir, size: 1 << 20)
        let a = block(51), b = block(52), c = block(53)
        let first = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        for (k, blk) in [a, b, c].enumerated() { try write(first, blk, cluster: k) }
        let (hostB, l1Cluster) = try first.lock.withLock {
            (L2Entry(raw: try first.md.map.entry(1).raw).ownedHost! >> 12, first.md.header.l1TableOffset >> 12)
        }
        try first.close()

        let side = path + ".dedup-index"
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: side)).prefix(64))
        func record(_ h: UInt64, _ host: UInt64, _ guest: UInt64) {
            for v in [h, host, guest] { withUnsafeBytes(of: v.bigEndian) { bytes += $0 } }
        }
        func hash(_ blk: [UInt8]) -> UInt64 { blk.withUnsafeBytes { ContentHash.of($0) } }
        record(hash(a), hostB, 1)           // a live entry, other content
        record(hash(b), l1Cluster, 0)       // a metadata cluster, through a guest entry that maps elsewhere
        record(hash(c), 1 << 40, 1 << 40)   // outside the file and the disk
        bytes += [1, 2, 3, 4, 5]            // a torn record
        try Data(bytes).write(to: URL(fileURLWithPath: side))

        let second = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        XCTAssertEqual(second.dedup?.count, 2, "the record outside the image is skipped")
        for (k, blk) in [(4, a), (5, b), (6, c)] { try write(second, blk, cluster: k) }
        var model = [UInt8](repeating: 0, count: 1 << 20)
        for (k, blk) in [(0, a), (1, b), (2, c), (4, a), (5, b), (6, c)] { model.replaceSubrange(k * cs..<(k + 1) * cs, with: blk) }
        XCTAssertTrue(try readAll(second) == model)
        try second.close()
        try assertQemuCheckClean(path)
        XCTAssertTrue(try qemuRaw(path, dir: dir) == model)

        // A file of another image is not used at all.
        let other = try makeImage(dir, size: 1 << 20, name: "other.qcow2")
        try FileManager.default.removeItem(atPath: other + ".dedup-index")
        try FileManager.default.copyItem(atPath: side, toPath: other + ".dedup-index")
        let third = try Qcow2Image(path: other, options: OpenOptions(writable: true))
        XCTAssertEqual(third.dedupIndexState, .stale(reason: "\(other).dedup-index: it belongs to another image"))
        try third.close()
    }
}
