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

        let server = Process()
        server.executableURL = URL(fileURLWithPath: Self.strataBinary!)
        server.arguments = ["serve", "--dedup", "--socket", path("s.sock"), "--export", "disk=d.qcow2"]
        server.currentDirectoryURL = dir
        server.standardOutput = FileHandle.nullDevice
        server.standardError = FileHandle.nullDevice
        try server.run()
        for _ in 0..<250 where !FileManager.default.fileExists(atPath: path("s.sock")) { usleep(20_000) }
        let copy = try run(nbdcopy, [path("src.raw"), "nbd+unix:///disk?socket=\(path("s.sock"))"])
        server.terminate()
        server.waitUntilExit()
        ok(copy, "nbdcopy into strata serve --dedup")

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

    func testCompressAndDedupTogetherAreRefused() throws {
        assertUserError(try strata("create", "-f", "qcow2", "-o", "compress=on,dedup=on", "c.qcow2", "1M"),
                        mentions: ["compress=on and dedup=on"])
        XCTAssertFalse(FileManager.default.fileExists(atPath: path("c.qcow2")))
    }
}
