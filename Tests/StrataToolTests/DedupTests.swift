import Foundation
import XCTest

/// Offline dedup (`strata dedup`): identical clusters shared, the image still ordinary qcow2
/// (`qemu-img check` clean, no leaks; `qemu-img compare` equal), QEMU copying a shared
/// cluster on write, snapshots untouched.
final class DedupTests: ToolTestCase {
    func checkClean(_ image: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try qemuImg("check", image)
        XCTAssertEqual(r.status, 0, "qemu-img check \(image):\n\(r.stdout)\(r.stderr)", file: file, line: line)
    }

    func report(_ image: String) throws -> [String: Int] {
        json(ok(try strata("dedup", "--output", "json", image), "dedup").stdout) as? [String: Int] ?? [:]
    }

    func testRepeatedBlocksAreStoredOnceAndQemuCopiesSharedClustersOnWrite() throws {
        // 8 distinct random 64 KiB blocks, each written 16 times in a shuffled order, plus zeroes.
        let blocks = (0..<8).map { noise(64 << 10, seed: UInt64(2 * $0 + 11)) }
        try truncate("src.raw", to: 16 << 20)
        var order = Array(0..<128)
        var x: UInt64 = 7
        for k in order.indices.reversed() { x = x &* 6364136223846793005 &+ 1; order.swapAt(k, Int(x >> 33) % (k + 1)) }
        for (slot, b) in order.enumerated() { try write("src.raw", blocks[b % 8], at: UInt64(slot) << 16) }
        ok(try strata("convert", "-O", "qcow2", "-o", "cluster_size=4096", "src.raw", "d.qcow2"), "convert")
        // Zeroes written as data (64 clusters): they become zero clusters.
        ok(try qemuIO("-c", "write -P 0 1M 256k", "d.qcow2"), "zero data")
        try write("src.raw", [UInt8](repeating: 0, count: 256 << 10), at: 1 << 20)
        let before = dataBytes("d.qcow2")

        let r = try report("d.qcow2")
        XCTAssertEqual(r["scanned-clusters"], 128 * 16, "every data cluster was looked at: \(r)")
        XCTAssertEqual(r["zeroed-clusters"], 64, "\(r)")
        XCTAssertEqual(r["shared-clusters"], 128 * 16 - 64 - 8 * 16, "all but the first copy of each 4 KiB cluster: \(r)")
        try checkClean("d.qcow2")
        ok(try qemuImg("compare", "-F", "raw", "d.qcow2", "src.raw"), "same content")
        // info --space: what the active disk references against what the file stores.
        let info = json(ok(try strata("info", "--space", "--output", "json", "d.qcow2"), "info --space").stdout) as? [String: Any]
        let data = (info?["format-specific"] as? [String: Any])?["data"] as? [String: Any]
        XCTAssertEqual(data?["referenced-clusters"] as? Int, 128 * 16 - 64)
        XCTAssertEqual(data?["stored-clusters"] as? Int, 8 * 16)
        XCTAssertEqual(data?["bytes-saved"] as? Int, (128 * 16 - 64 - 8 * 16) * 4096)
        let after = dataBytes("d.qcow2")
        XCTAssertLessThan(after, 8 * (64 << 10) + (1 << 20), "about the unique data plus metadata: \(before) → \(after)")

        // QEMU writes into one copy: it copies on write, the other copies keep their data.
        let firstSlot = try XCTUnwrap(order.firstIndex(of: 3))
        let otherSlot = try XCTUnwrap(order.lastIndex(of: 3))
        ok(try qemuIO("-c", "write -P 9 \(firstSlot << 16) 4k", "d.qcow2"), "qemu-io write into a shared cluster")
        try checkClean("d.qcow2")
        try write("src.raw", [UInt8](repeating: 9, count: 4096), at: UInt64(firstSlot) << 16)
        ok(try qemuImg("compare", "-F", "raw", "d.qcow2", "src.raw"), "only the written copy changed (slot \(otherSlot) kept its data)")

        // A second run finds nothing more to share.
        XCTAssertEqual(try report("d.qcow2")["shared-clusters"], 0)
        try checkClean("d.qcow2")
    }

    func testSnapshotsKeepTheirDataAndDeletingThemFreesTheDuplicates() throws {
        ok(try strata("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "s.qcow2", "16M"), "create")
        ok(try qemuIO("-c", "write -P 1 0 2M", "-c", "write -P 2 4M 64k", "-c", "write -P 1 8M 1M", "s.qcow2"), "write")
        ok(try strata("snapshot", "create", "s.qcow2", "before"), "snapshot")
        ok(try qemuIO("-c", "write -P 2 12M 64k", "s.qcow2"), "write after the snapshot")
        ok(try qemuImg("convert", "-O", "raw", "s.qcow2", "now.raw"), "save")
        ok(try qemuImg("convert", "-l", "before", "-O", "raw", "s.qcow2", "before.raw"), "save")
        let r = try report("s.qcow2")
        XCTAssertGreaterThan(r["shared-clusters"] ?? 0, 700, "\(r)")
        try checkClean("s.qcow2")
        ok(try qemuImg("compare", "-F", "raw", "s.qcow2", "now.raw"), "active disk")
        ok(try qemuImg("convert", "-l", "before", "-O", "raw", "s.qcow2", "before-after.raw"), "snapshot")
        ok(try qemuImg("compare", "-f", "raw", "-F", "raw", "before.raw", "before-after.raw"), "the snapshot kept its data")
        let withSnapshot = dataBytes("s.qcow2")
        ok(try strata("snapshot", "delete", "s.qcow2", "before"), "delete the snapshot")
        try checkClean("s.qcow2")
        XCTAssertLessThan(dataBytes("s.qcow2"), withSnapshot / 4, "the duplicates only the snapshot held are freed")
        ok(try qemuImg("compare", "-F", "raw", "s.qcow2", "now.raw"), "active disk")
    }

    /// Two copies shared offline, then Strata overwrites one: the other owns its cluster
    /// alone again and gets COPIED back (the image was marked a dedup image), so qemu-img
    /// check stays clean.
    func testOverwritingOneOfTwoSharersKeepsTheImageClean() throws {
        ok(try strata("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "t.qcow2", "1M"), "create")
        ok(try qemuIO("-c", "write -P 4 0 4k", "-c", "write -P 4 64k 4k", "t.qcow2"), "two copies")
        XCTAssertEqual(try report("t.qcow2")["shared-clusters"], 1)
        try checkClean("t.qcow2")
        ok(try strata("io", "-c", "write -P 5 0 4k", "t.qcow2"), "overwrite one copy")
        try checkClean("t.qcow2")
        ok(try qemuIO("-c", "read -P 5 0 4k", "-c", "read -P 4 64k 4k", "t.qcow2"), "content")
    }

    func testMistakes() throws {
        try truncate("r.img", to: 1 << 20)
        assertUserError(try strata("dedup", "-f", "raw", "r.img"), mentions: ["raw"])
        assertUserError(try strata("dedup", "missing.qcow2"), mentions: ["missing.qcow2"])
        assertUserError(try strata("dedup"), mentions: ["file"])
    }
}
