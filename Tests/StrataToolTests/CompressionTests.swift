import Foundation
import XCTest

/// `strata convert -c` and `strata template create -c`: each compression type round trips;
/// QEMU checks and reads zlib and zstd images and refuses lz4 ones by name; the output does
/// not depend on the number of workers.
final class CompressionTests: ToolTestCase {
    /// 6 MiB + 4 KiB raw (a partial last 64 KiB cluster): noise (does not shrink), a byte
    /// pattern, text, a hole, written zeroes, a text tail.
    func makeRaw(_ name: String) throws {
        try truncate(name, to: 6 << 20 + 4096)
        try write(name, noise(256 << 10, seed: 5), at: 0)
        try write(name, [UInt8](repeating: 0x5a, count: 1 << 20), at: 1 << 20)
        try write(name, Array(String(repeating: "compressed strata cluster\n", count: 40_000).utf8), at: 2 << 20 + 77)
        try write(name, [UInt8](repeating: 0, count: 512 << 10), at: 4 << 20)
        try write(name, Array(String(repeating: "tail ", count: 800).utf8), at: 6 << 20)
    }

    /// Percentage of compressed clusters `qemu-img check` reports (nil if none printed).
    func compressedShare(_ check: RunResult) -> Double? {
        guard let line = check.stdout.split(separator: "\n").first(where: { $0.contains("compressed clusters") }),
              let pct = line.split(separator: ",").last?.split(separator: "%").first?.trimmingCharacters(in: .whitespaces) else { return nil }
        return Double(pct)
    }

    func roundTrip(_ type: String) throws {
        try makeRaw("src.raw")
        let img = "\(type).qcow2"
        ok(try strata("convert", "-c", "-O", "qcow2", "-o", "compression_type=\(type)", "src.raw", img), "convert -c \(type)")
        ok(try strata("compare", "src.raw", img), "strata compare \(type)")
        ok(try strata("convert", "-O", "raw", img, "back.raw"), "strata reads \(type)")
        XCTAssertTrue(try contents("src.raw") == contents("back.raw"), "\(type) round trip")
        let size = try FileManager.default.attributesOfItem(atPath: path(img))[.size] as? Int ?? 0
        XCTAssertLessThan(size, 2 << 20, "\(type): the image must be compressed (\(size) bytes)")
        if type == "lz4" { return }
        let check = try qemuImg("check", img)
        XCTAssertEqual(check.status, 0, "qemu-img check \(type): \(check.stdout)\(check.stderr)")
        XCTAssertGreaterThan(compressedShare(check) ?? 0, 50, check.stdout)
        ok(try qemuImg("compare", "src.raw", img), "qemu-img compare \(type)")
        ok(try qemuIO("-r", "-c", "read -P 0x5a 1M 1M", "-c", "read -P 0 4M 512k", img), "qemu-io reads \(type)")
        // QEMU copies a compressed cluster on write; Strata reads the result.
        ok(try qemuIO("-c", "write -P 0x77 1040k 4k", img), "qemu-io writes into a compressed cluster")
        ok(try strata("io", "-r", "-c", "read -P 0x77 1040k 4k", "-c", "read -P 0x5a 1044k 60k", img), "strata reads QEMU's copy")
        // And Strata copies on write too.
        ok(try strata("io", "-c", "write -P 0x66 2M 4k", img), "strata writes into a compressed cluster")
        ok(try qemuIO("-r", "-c", "read -P 0x66 2M 4k", img), "qemu-io reads Strata's copy")
        let again = try qemuImg("check", img)
        XCTAssertEqual(again.status, 0, "qemu-img check after the writes: \(again.stdout)\(again.stderr)")
    }

    func testZlibRoundTrip() throws { try roundTrip("zlib") }
    func testZstdRoundTrip() throws { try roundTrip("zstd") }

    func testLZ4RoundTripAndQemuRefusesIt() throws {
        try roundTrip("lz4")
        let info = try qemuImg("info", "lz4.qcow2")
        XCTAssertNotEqual(info.status, 0)
        XCTAssertTrue(info.stderr.contains("unknown compression type: 128"), info.stderr)
        let ours = try strata("info", "--output", "json", "lz4.qcow2")
        XCTAssertTrue(ours.stdout.contains("\"compression-type\": \"lz4\""), ours.stdout)
        ok(try strata("io", "-c", "write -P 0x66 2M 4k", "lz4.qcow2"), "strata writes into an lz4 cluster")
        ok(try strata("io", "-r", "-c", "read -P 0x66 2M 4k", "-c", "read -P 0x5a 1M 64k", "lz4.qcow2"), "and reads it back")
    }

    func testCreateSetsLZ4AndTheIncompatibleBit() throws {
        ok(try strata("create", "-q", "-f", "qcow2", "-o", "compression_type=lz4", "e.qcow2", "1M"), "create lz4")
        let bytes = [UInt8](try contents("e.qcow2"))
        XCTAssertEqual(bytes[104], 128)                   // compression_type: lz4
        XCTAssertEqual(bytes[79] & 0x08, 0x08)            // incompatible_features bit 3 (big-endian, byte 72..79)
        let info = try qemuImg("info", "e.qcow2")
        XCTAssertTrue(info.stderr.contains("unknown compression type: 128"), info.stderr)
    }

    func testOutputIsTheSameWhateverTheWorkers() throws {
        try makeRaw("src.raw")
        ok(try strata("convert", "-c", "-m", "1", "-O", "qcow2", "-o", "compression_type=zstd", "src.raw", "one.qcow2"), "1 worker")
        ok(try strata("convert", "-c", "-m", "16", "-O", "qcow2", "-o", "compression_type=zstd", "src.raw", "many.qcow2"), "16 workers")
        XCTAssertTrue(try contents("one.qcow2") == contents("many.qcow2"), "convert -c must not depend on -m")
    }

    func testCompressionNeedsQcow2() throws {
        try makeRaw("src.raw")
        assertUserError(try strata("convert", "-c", "src.raw", "out.raw"), mentions: ["out.raw", "-c", "qcow2"])
        ok(try qemuImg("create", "-q", "-f", "raw", "r.raw", "7M"), "create raw")
        assertUserError(try strata("convert", "-c", "-n", "src.raw", "r.raw"), mentions: ["r.raw", "-c", "qcow2"])
    }

    /// -B: only what the source's top image holds is written, compressed; its zero ranges
    /// hide the backing file's data.
    func testCompressOntoABackingFile() throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "base.qcow2", "4M"), "create base")
        ok(try qemuIO("-c", "write -P 1 0 4M", "base.qcow2"), "fill base")
        ok(try qemuImg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"), "create top")
        ok(try qemuIO("-c", "write -P 2 1M 200k", "-c", "write -z 3M 64k", "top.qcow2"), "fill top")
        ok(try strata("convert", "-c", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2", "o.qcow2"), "convert -c -B")
        let check = try qemuImg("check", "o.qcow2")
        XCTAssertEqual(check.status, 0, check.stdout + check.stderr)
        ok(try qemuImg("compare", "top.qcow2", "o.qcow2"), "same content")
        ok(try qemuIO("-r", "-c", "read -P 2 1M 200k", "-c", "read -P 1 1224k 48k", "-c", "read -P 0 3M 64k", "-c", "read -P 1 0 1M", "o.qcow2"), "reads")
        let map = json(try qemuImg("map", "--output", "json", "o.qcow2").stdout) as? [[String: Any]] ?? []
        let own = map.filter { $0["depth"] as? Int == 0 && ($0["data"] as? Bool == true) }.reduce(0) { $0 + ($1["length"] as? Int ?? 0) }
        XCTAssertLessThanOrEqual(own, 4 * 65536, "only the clusters the top touches: \(map)")
    }

    /// -n: zero ranges of the source become zeroes over the existing image's data.
    func testCompressIntoAnExistingImage() throws {
        try makeRaw("src.raw")
        ok(try qemuImg("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", "old.qcow2", "8M"), "create target")
        ok(try qemuIO("-c", "write -P 9 0 8M", "old.qcow2"), "old data")
        ok(try strata("convert", "-c", "-n", "-O", "qcow2", "src.raw", "old.qcow2"), "convert -c -n")
        let check = try qemuImg("check", "old.qcow2")
        XCTAssertEqual(check.status, 0, check.stdout + check.stderr)
        ok(try qemuIO("-r", "-c", "read -P 0x5a 1M 1M", "-c", "read -P 0 4M 512k", "-c", "read -P 9 7M 64k", "old.qcow2"), "content")
    }

    func testTemplateCreateCompressed() throws {
        try makeRaw("src.raw")
        ok(try strata("convert", "-O", "qcow2", "-o", "compression_type=zstd", "src.raw", "src.qcow2"), "source")
        ok(try strata("template", "create", "-q", "-c", "src.qcow2", "t.qcow2"), "template create -c")
        let check = try qemuImg("check", "t.qcow2")
        XCTAssertEqual(check.status, 0, check.stdout + check.stderr)
        XCTAssertGreaterThan(compressedShare(check) ?? 0, 50, check.stdout)
        ok(try qemuImg("compare", "src.raw", "t.qcow2"), "template content")
        ok(try strata("clone", "t.qcow2", "c.qcow2"), "clone of a compressed template")
        ok(try strata("io", "-c", "write -P 0x11 1M 4k", "c.qcow2"), "write to the clone")
        ok(try qemuIO("-r", "-c", "read -P 0x11 1M 4k", "-c", "read -P 0x5a 1052k 64k", "c.qcow2"), "clone reads")
    }

    func testCreateCompressOnStoresGuestWritesCompressed() throws {
        ok(try strata("create", "-q", "-f", "qcow2", "-o", "compress=on,compression_type=zstd", "on.qcow2", "8M"), "create compress=on")
        ok(try strata("io", "-c", "write -P 0x33 0 1M", "-c", "write -P 0x44 1000k 100k", "on.qcow2"), "guest writes")
        let check = try qemuImg("check", "on.qcow2")
        XCTAssertEqual(check.status, 0, check.stdout + check.stderr)
        XCTAssertGreaterThan(compressedShare(check) ?? 0, 80, check.stdout)
        ok(try qemuIO("-r", "-c", "read -P 0x33 0 1000k", "-c", "read -P 0x44 1000k 24k", "on.qcow2"), "QEMU reads them")
        assertUserError(try strata("create", "-q", "-f", "qcow2", "-o", "compress=on,compat=0.10", "v2.qcow2", "8M"),
                        mentions: ["compress=on", "compat=1.1"])
    }
}
