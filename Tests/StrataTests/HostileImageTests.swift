import Foundation
import XCTest
import TestSupport
@testable import Strata

/// Malformed and hostile images: each gets a clear error, never a crash, a hang or a huge
/// allocation. Each case patches one field of a valid image, named in the test.
final class HostileImageTests: XCTestCase {
    var dir = ""

    override func setUpWithError() throws {
        try requireTool("qemu-img", package: "qemu-utils")
        dir = try tempDir(self)
    }

    /// A valid 4 MiB image (64 KiB clusters) with data in its first cluster, as bytes.
    func validImage() throws -> [UInt8] {
        let path = "\(dir)/valid-\(UUID().uuidString).qcow2"
        XCTAssertEqual(try runTool(["qemu-img", "create", "-q", "-f", "qcow2", path, "4M"]).status, 0)
        XCTAssertEqual(try runTool(["qemu-io", "-f", "qcow2", path, "-c", "write -P 7 0 64k"]).status, 0)
        return [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
    }

    /// Opens `bytes` as a file and reads all of it; returns the error text (or nil on success).
    func openAndRead(_ bytes: [UInt8], writable: Bool = false, name: String = "hostile.qcow2") -> String? {
        let path = "\(dir)/\(name)"
        FileManager.default.createFile(atPath: path, contents: Data(bytes))
        do {
            let img = try Qcow2Image(path: path, options: OpenOptions(writable: writable))
            defer { try? img.close() }
            _ = try readAll(img)
            _ = try img.blockStatus(at: 0, length: img.size)
            return nil
        } catch let e as StrataError {
            return e.description
        } catch {
            return "\(error)"
        }
    }

    func expectError(_ bytes: [UInt8], contains: String, writable: Bool = false, file: StaticString = #filePath, line: UInt = #line) {
        guard let msg = openAndRead(bytes, writable: writable) else {
            XCTFail("expected an error mentioning '\(contains)'", file: file, line: line)
            return
        }
        XCTAssertTrue(msg.contains(contains), "error '\(msg)' should mention '\(contains)'", file: file, line: line)
        XCTAssertTrue(msg.contains("hostile.qcow2"), "error '\(msg)' should name the file", file: file, line: line)
    }

    func testValidImageOpens() throws {
        XCTAssertNil(openAndRead(try validImage()))
    }

    func testTruncatedHeader() throws {
        expectError(Array(try validImage().prefix(50)), contains: "truncated")
    }

    func testTruncatedBeforeTables() throws {
        // Cut the file inside the first cluster: the refcount table (at 64 KiB) is gone.
        expectError(Array(try validImage().prefix(4096)), contains: "past the end of the file")
    }

    func testAbsurdL1Size() throws {
        var b = try validImage()
        b.put32(0xffff_ffff, 36)  // l1_size
        expectError(b, contains: "l1_size")
    }

    func testAbsurdRefcountTableClusters() throws {
        var b = try validImage()
        b.put32(0x7fff_ffff, 56)  // refcount_table_clusters
        expectError(b, contains: "refcount_table_clusters")
    }

    func testL1OffsetPastEnd() throws {
        var b = try validImage()
        b.put64(1 << 40, 40)  // l1_table_offset
        expectError(b, contains: "l1_table_offset")
    }

    func testL1OffsetUnaligned() throws {
        var b = try validImage()
        b.put64(b.be64(40) + 512, 40)
        expectError(b, contains: "aligned")
    }

    func testClusterBitsOutOfRange() throws {
        var b = try validImage()
        b.put32(31, 20)  // cluster_bits
        expectError(b, contains: "cluster_bits")
    }

    func testBackingNameTooLong() throws {
        var b = try validImage()
        b.put64(1024, 8)       // backing_file_offset
        b.put32(5000, 16)      // backing_file_size
        expectError(b, contains: "backing_file_size")
    }

    func testUnknownIncompatibleFeatureIsNamed() throws {
        var b = try validImage()
        b.put64(b.be64(72) | (1 << 40), 72)
        expectError(b, contains: "incompatible feature bit 40")
    }

    func testL2EntryPastEnd() throws {
        var b = try validImage()
        let l1 = Int(b.be64(40))
        let l2 = Int(b.be64(l1) & L1Entry.offsetMask)
        b.put64((1 << 50) | L2Entry.copied, l2)  // first L2 entry → far past the end
        expectError(b, contains: "past the end of the file")
    }

    func testL2EntryUnaligned() throws {
        var b = try validImage()
        let l1 = Int(b.be64(40))
        let l2 = Int(b.be64(l1) & L1Entry.offsetMask)
        b.put64(b.be64(l2) + 512, l2)
        expectError(b, contains: "not cluster aligned")
    }

    func testL1EntryPastEnd() throws {
        var b = try validImage()
        let l1 = Int(b.be64(40))
        b.put64((1 << 45) | L1Entry.copied, l1)
        expectError(b, contains: "past the end of the file")
    }

    func testCompressedGarbage() throws {
        var b = try validImage()
        let l1 = Int(b.be64(40))
        let l2 = Int(b.be64(l1) & L1Entry.offsetMask)
        let data = b.be64(l2) & L2Entry.offsetMask
        b.put64(L2Entry.compressed(host: data, sectors: 3, clusterBits: 16).raw, l2)
        for i in Int(data)..<Int(data) + 2048 { b[i] = 0xff }  // not a deflate stream
        expectError(b, contains: "does not decompress")
    }

    func testBackingChainLoop() throws {
        let a = "\(dir)/a.qcow2", bpath = "\(dir)/b.qcow2"
        XCTAssertEqual(try runTool(["qemu-img", "create", "-q", "-f", "qcow2", a, "1M"]).status, 0)
        XCTAssertEqual(try runTool(["qemu-img", "create", "-q", "-f", "qcow2", "-b", a, "-F", "qcow2", bpath]).status, 0)
        // Make a's backing file b: a → b → a.
        XCTAssertEqual(try runTool(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", bpath, "-F", "qcow2", a]).status, 0)
        XCTAssertThrowsError(try Qcow2Image(path: bpath, options: OpenOptions())) { e in
            XCTAssertTrue("\(e)".contains("loops"), "\(e)")
        }
    }

    func testBackingWithoutFormatIsNotProbed() throws {
        let base = "\(dir)/base.raw", top = "\(dir)/top.qcow2"
        FileManager.default.createFile(atPath: base, contents: Data(count: 1 << 20))
        XCTAssertEqual(try runTool(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top]).status, 0)
        // Drop the backing format extension by rebasing unsafely with no format... qemu-img
        // insists on one, so patch the extension type to an unknown one instead.
        var b = [UInt8](try Data(contentsOf: URL(fileURLWithPath: top)))
        var pos = Int(b.be32(100))
        while b.be32(pos) != 0 {
            if b.be32(pos) == HeaderExtensions.backingFormatType { b.put32(0x1234_5678, pos) }
            pos += 8 + (Int(b.be32(pos + 4)) + 7) / 8 * 8
        }
        try Data(b).write(to: URL(fileURLWithPath: top))
        XCTAssertThrowsError(try Qcow2Image(path: top, options: OpenOptions())) { e in
            XCTAssertTrue("\(e)".contains("no recorded format"), "\(e)")
        }
        // Given explicitly, it opens.
        let img = try Qcow2Image(path: top, options: OpenOptions(backingFormat: .raw))
        try img.close()
    }

    func testCorruptBitRefusesWrites() throws {
        var b = try validImage()
        b.put64(b.be64(72) | IncompatibleFeatures.corrupt.rawValue, 72)
        XCTAssertNil(openAndRead(b, writable: false))
        XCTAssertTrue(openAndRead(b, writable: true)?.contains("marked corrupt") ?? false)
    }

    /// Random bit flips in the header and tables never crash the engine.
    func testRandomCorruptionNeverCrashes() throws {
        let valid = try validImage()
        var rng = SeededRandom(seed: 42)
        for _ in 0..<300 {
            var b = valid
            for _ in 0..<4 {
                let region = rng.next() % 2 == 0 ? 0..<112 : 0..<b.count
                let i = Int(rng.next() % UInt64(region.count)) + region.lowerBound
                b[i] ^= UInt8(1 << (rng.next() % 8))
            }
            _ = openAndRead(b, writable: rng.next() % 2 == 0)
        }
    }
}
