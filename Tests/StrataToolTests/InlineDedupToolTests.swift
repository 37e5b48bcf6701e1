import Foundation
import XCTest

/// Inline dedup end to end: `strata create -o dedup=on`, a client copying a disk of repeated
/// blocks through `strata serve --dedup`; the image stores about the unique data, reads back
/// byte-exact, `qemu-img check` is clean, and QEMU copies a shared cluster on write.
final class InlineDedupToolTests: ToolTestCase {
    func testClientCopyThroughServeDedupStoresRepeatedBlocksOnce() throws {
        guard let nbdcopy = Self.which("nbdcopy") else { throw XCTSkip("no nbdcopy (libnbd-bin)") }
        // 8 distinct random 64 KiB blocks over 128 slots (8 MiB), and 1 MiB of zeroes.
        let blocks = (0..<8).map { noise(64 << 10, seed: UInt64(3 * $0 + 5)) }
        try truncate("src.raw", to: 9 << 20)
        var x: UInt64 = 11
        var slotOf: [Int: Int] = [:]
        for slot in 0..<128 {
            x = x &* 6364136223846793005 &+ 1
            let b = Int(x >> 33) % 8
            if slotOf[b] == nil { slotOf[b] = slot }
            try write("src.raw", blocks[b], at: UInt64(slot) << 16)
        }
        ok(try strata("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,dedup=on", "d.qcow2", "9M"), "create")

        try copyThroughServeDedup(nbdcopy, "src.raw", into: "d.qcow2")

        ok(try qemuImg("check", "d.qcow2"), "qemu-img check: no errors, no leaks")
        ok(try qemuImg("compare", "-F", "raw", "d.qcow2", "src.raw"), "byte-exact")
        let stored = dataBytes("d.qcow2")
        XCTAssertLessThan(stored, 8 * (64 << 10) + (512 << 10), "about the 512 KiB of unique data plus metadata, not 8 MiB: \(stored)")

        // QEMU writes into one copy of block 3: it copies on write, the other copies keep their data.
        let slot = try XCTUnwrap(slotOf[3])
        ok(try qemuIO("-c", "write -P 9 \(slot << 16) 4k", "d.qcow2"), "qemu-io write into a shared cluster")
        ok(try qemuImg("check", "d.qcow2"), "check after QEMU's write")
        try write("src.raw", [UInt8](repeating: 9, count: 4096), at: UInt64(slot) << 16)
        ok(try qemuImg("compare", "-F", "raw", "d.qcow2", "src.raw"), "only the written copy changed")
    }

    /// Copies `source` into `image` with nbdcopy through `strata serve --dedup`; returns
    /// what the server printed on stderr.
    @discardableResult
    func copyThroughServeDedup(_ nbdcopy: String, _ source: String, into image: String) throws -> String {
        let server = Process()
        server.executableURL = URL(fileURLWithPath: Self.strataBinary!)
        server.arguments = ["serve", "--dedup", "--socket", path("s.sock"), "--export", "disk=\(image)"]
        server.currentDirectoryURL = dir
        let errors = Pipe()
        server.standardOutput = FileHandle.nullDevice
        server.standardError = errors
        try? FileManager.default.removeItem(atPath: path("s.sock"))
        try server.run()
        for _ in 0..<250 where !FileManager.default.fileExists(atPath: path("s.sock")) { usleep(20_000) }
        let copy = try run(nbdcopy, [path(source), "nbd+unix:///disk?socket=\(path("s.sock"))"])
        server.terminate()
        server.waitUntilExit()
        ok(copy, "nbdcopy into strata serve --dedup")
        return String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    }

    /// The index persists: a second server finds the clusters the first one stored. After
    /// QEMU writes the image, the server says the index is not used, and `strata dedup`
    /// rebuilds it.
    func testIndexSurvivesARestartAndQemuWritesMakeItStale() throws {
        guard let nbdcopy = Self.which("nbdcopy") else { throw XCTSkip("no nbdcopy (libnbd-bin)") }
        let blocks = (0..<4).map { noise(64 << 10, seed: UInt64(7 * $0 + 1)) }
        try truncate("one.raw", to: 8 << 20)
        try truncate("two.raw", to: 8 << 20)
        for slot in 0..<32 {
            try write("one.raw", blocks[slot % 4], at: UInt64(slot) << 16)
            for at in [0, 4 << 20] { try write("two.raw", blocks[slot % 4], at: UInt64(at + slot << 16)) }
        }
        ok(try strata("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,dedup=on", "d.qcow2", "8M"), "create")
        try copyThroughServeDedup(nbdcopy, "one.raw", into: "d.qcow2")
        let first = dataBytes("d.qcow2")
        let quiet = try copyThroughServeDedup(nbdcopy, "two.raw", into: "d.qcow2")
        XCTAssertFalse(quiet.contains("dedup index"), quiet)
        XCTAssertLessThanOrEqual(dataBytes("d.qcow2"), first + (64 << 10), "the second run shares what the first stored")
        ok(try qemuImg("check", "d.qcow2"), "check")
        ok(try qemuImg("compare", "-F", "raw", "d.qcow2", "two.raw"), "byte-exact")

        ok(try qemuIO("-c", "write -P 3 7M 4k", "d.qcow2"), "QEMU writes the image")
        var info = try strata("info", "--space", "--output", "json", "d.qcow2")
        XCTAssertTrue(info.stdout.contains("\"state\": \"stale\""), info.stdout)
        let warned = try copyThroughServeDedup(nbdcopy, "two.raw", into: "d.qcow2")
        XCTAssertTrue(warned.contains("its dedup index is not used"), warned)
        XCTAssertTrue(warned.contains("strata dedup d.qcow2"), warned)

        ok(try strata("dedup", "d.qcow2"), "offline dedup rebuilds the index")
        info = try strata("info", "--space", "--output", "json", "d.qcow2")
        XCTAssertTrue(info.stdout.contains("\"state\": \"valid\""), info.stdout)
        XCTAssertTrue(info.stdout.contains("\"complete\": true"), info.stdout)
        ok(try qemuImg("check", "d.qcow2"), "check after the rebuild")
        ok(try qemuImg("compare", "-F", "raw", "d.qcow2", "two.raw"), "byte-exact after the rebuild")
    }

    func testCompressAndDedupTogetherAreRefused() throws {
        assertUserError(try strata("create", "-f", "qcow2", "-o", "compress=on,dedup=on", "c.qcow2", "1M"),
                        mentions: ["compress=on and dedup=on"])
        XCTAssertFalse(FileManager.default.fileExists(atPath: path("c.qcow2")))
    }
}
