import Foundation
import XCTest
import TestSupport

import Strata
@testable import StrataNBD

/// Real NBD clients against an in-process server: nbdinfo, nbdcopy, qemu-img, qemu-io, fio.
final class PeerToolTests: XCTestCase {
    private let M = 1 << 20

    private func json(_ text: String, file: StaticString = #filePath, line: UInt = #line) throws -> Any {
        try JSONSerialization.jsonObject(with: Data(text.utf8))
    }

    func testNbdinfoReportsSizeFlagsContextsAndBlockSizes() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/disk.qcow2", size: "96M", options: ["cluster_size=128k"])
        try makeRaw("\(dir)/ro.raw", size: 5 * M)
        let server = try TestServer(dir: dir, exports: [
            TestExport(name: "disk", path: "\(dir)/disk.qcow2", description: "a test disk"),
            TestExport(name: "ro", path: "\(dir)/ro.raw", readOnly: true),
        ])
        let info = try Peer.expectSuccess("nbdinfo", ["--json", server.uri("disk")])
        let top = try XCTUnwrap(try json(info.out) as? [String: Any])
        XCTAssertEqual(top["protocol"] as? String, "newstyle-fixed")
        XCTAssertEqual(top["structured"] as? Bool, true)
        let disk = try XCTUnwrap((top["exports"] as? [[String: Any]])?.first)
        XCTAssertEqual(disk["export-size"] as? Int, 96 * M)
        XCTAssertEqual(disk["description"] as? String, "a test disk")
        XCTAssertEqual(disk["is_read_only"] as? Bool, false)
        for flag in ["can_multi_conn", "can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_df", "can_cache"] {
            XCTAssertEqual(disk[flag] as? Bool, true, flag)
        }
        XCTAssertEqual(disk["is_rotational"] as? Bool, false)
        XCTAssertEqual((disk["contexts"] as? [String])?.sorted(), ["base:allocation", "qemu:allocation-depth"])
        XCTAssertEqual(disk["block_size_minimum"] as? Int, 1)
        XCTAssertEqual(disk["block_size_preferred"] as? Int, 128 << 10, "preferred = cluster size")
        XCTAssertEqual(disk["block_size_maximum"] as? Int, 32 * M)

        let roInfo = try Peer.expectSuccess("nbdinfo", ["--json", server.uri("ro")])
        let ro = try XCTUnwrap(((try json(roInfo.out) as? [String: Any])?["exports"] as? [[String: Any]])?.first)
        XCTAssertEqual(ro["export-size"] as? Int, 5 * M)
        XCTAssertEqual(ro["is_read_only"] as? Bool, true)
        XCTAssertEqual(ro["can_trim"] as? Bool, false)
        XCTAssertEqual(ro["can_zero"] as? Bool, false)
        XCTAssertEqual(ro["can_multi_conn"] as? Bool, true)

        // --list goes through NBD_OPT_LIST and NBD_OPT_INFO for each export.
        let list = try Peer.expectSuccess("nbdinfo", ["--list", "--json", server.uri("")])
        let names = ((try json(list.out) as? [String: Any])?["exports"] as? [[String: Any]])?.compactMap { $0["export-name"] as? String }
        XCTAssertEqual(names, ["disk", "ro"])
    }

    func testNbdinfoMapFollowsWritesZeroesAndTrims() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/m.qcow2", size: "4M")
        let server = try TestServer(dir: dir, exports: [TestExport(name: "m", path: "\(dir)/m.qcow2")])
        let uri = server.uri("m")
        func map(_ context: String = "base:allocation") throws -> [[Int]] {
            let r = try Peer.expectSuccess("nbdinfo", ["--map=\(context)", "--json", uri])
            let entries = try XCTUnwrap(try json(r.out) as? [[String: Any]])
            return entries.map { [$0["offset"] as! Int, $0["length"] as! Int, $0["type"] as! Int] }
        }
        XCTAssertEqual(try map(), [[0, 4 * M, 3]], "a new image is one hole")
        try Peer.expectSuccess("qemu-io", ["-f", "raw", uri, "-c", "write -P 9 64k 128k", "-c", "write -P 8 1M 64k"])
        XCTAssertEqual(try map(), [[0, 64 << 10, 3], [64 << 10, 128 << 10, 0], [192 << 10, M - (192 << 10), 3],
                                   [M, 64 << 10, 0], [M + (64 << 10), 3 * M - (64 << 10), 3]])
        XCTAssertEqual(try map("qemu:allocation-depth"),
                       [[0, 64 << 10, 0], [64 << 10, 128 << 10, 1], [192 << 10, M - (192 << 10), 0],
                        [M, 64 << 10, 1], [M + (64 << 10), 3 * M - (64 << 10), 0]])
        try Peer.expectSuccess("qemu-io", ["-f", "raw", uri, "-c", "discard 64k 64k", "-c", "write -z 1M 64k"])
        let after = try map()
        XCTAssertEqual(after.first, [0, 128 << 10, 3], "the trimmed cluster is a hole again")
        XCTAssertEqual((after.first { $0[0] == M }?[2] ?? 0) & 2, 2, "the zeroed cluster reports zero: \(after)")
    }

    func testNbdcopyBothWaysIsByteExactAndKeepsTheCopySparse() throws {
        let dir = try makeTempDir(self)
        let src = "\(dir)/src.raw"
        try makeRaw(src, size: 64 * M)
        var rng = SeededRandom(seed: 42)
        for i in 0..<8 {
            let offset = UInt64(i) * 8 * UInt64(M) + UInt64.random(in: 0..<64, using: &rng) * 4096
            try writeFile(src, at: offset, (0..<(256 << 10)).map { _ in UInt8.random(in: 1...255, using: &rng) })
        }
        try makeQcow2("\(dir)/dst.qcow2", size: "64M")
        let server = try TestServer(dir: dir, exports: [TestExport(name: "dst", path: "\(dir)/dst.qcow2")])
        try Peer.expectSuccess("nbdcopy", [src, server.uri("dst")])
        try Peer.expectSuccess("nbdcopy", ["--connections=4", "--requests=16", server.uri("dst"), "\(dir)/back.raw"])
        XCTAssertTrue(FileManager.default.contentsEqual(atPath: src, andPath: "\(dir)/back.raw"), "round trip is byte-exact")
        try server.stop()

        // The copy skipped the source's holes: about 2 MiB of data allocated, not 64 MiB.
        let map = try Peer.expectSuccess("qemu-img", ["map", "--output=json", "\(dir)/dst.qcow2"])
        let extents = try XCTUnwrap(try json(map.out) as? [[String: Any]])
        let allocated = extents.filter { $0["data"] as? Bool == true }.reduce(0) { $0 + ($1["length"] as! Int) }
        XCTAssertGreaterThanOrEqual(allocated, 2 * M)
        XCTAssertLessThanOrEqual(allocated, 3 * M, "holes in the source stay holes in the copy")
        try Peer.expectSuccess("qemu-img", ["check", "\(dir)/dst.qcow2"])
        try Peer.expectSuccess("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", src, "\(dir)/dst.qcow2"])
    }

    func testQemuImgConvertAndCompareOverNBD() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/src.qcow2", size: "32M")
        try Peer.expectSuccess("qemu-io", ["-f", "qcow2", "\(dir)/src.qcow2",
                                           "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 5M 300k", "-c", "write -P 0x33 31M 1M"])
        try makeQcow2("\(dir)/into.qcow2", size: "32M")
        let server = try TestServer(dir: dir, exports: [
            TestExport(name: "src", path: "\(dir)/src.qcow2", readOnly: true),
            TestExport(name: "into", path: "\(dir)/into.qcow2"),
        ])
        // Out of the server...
        try Peer.expectSuccess("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", server.uri("src"), "\(dir)/out.qcow2"])
        try Peer.expectSuccess("qemu-img", ["compare", "-U", "-f", "qcow2", "-F", "qcow2", "\(dir)/src.qcow2", "\(dir)/out.qcow2"])
        // ...and into it.
        try Peer.expectSuccess("qemu-img", ["convert", "-n", "-f", "qcow2", "-O", "raw", "\(dir)/out.qcow2", server.uri("into")])
        try Peer.expectSuccess("qemu-img", ["compare", "-f", "raw", "-F", "raw", server.uri("src"), server.uri("into")])
        // A difference is found, through the server.
        try Peer.expectSuccess("qemu-io", ["-f", "raw", server.uri("into"), "-c", "write -P 0x44 7M 512"])
        let differ = try Peer.run(try Peer.path("qemu-img"), ["compare", "-f", "raw", "-F", "raw", server.uri("src"), server.uri("into")])
        XCTAssertEqual(differ.status, 1, "compare sees the changed sector:\n\(differ.transcript)")
        try server.stop()
        try Peer.expectSuccess("qemu-img", ["check", "\(dir)/into.qcow2"])
    }

    /// Seeded random writes, zeroes and trims through qemu-io over NBD, the same commands
    /// applied by qemu-io to a local raw twin; the two must be identical.
    func testQemuIODifferentialAgainstALocalTwin() throws {
        let dir = try makeTempDir(self)
        let size = 16 * M
        try makeQcow2("\(dir)/img.qcow2", size: "16M")
        try makeRaw("\(dir)/twin.raw", size: size)
        let server = try TestServer(dir: dir, exports: [TestExport(name: "img", path: "\(dir)/img.qcow2")])
        var rng = SeededRandom(seed: 0xC0FFEE)
        var commands: [String] = []
        for _ in 0..<300 {
            switch UInt8.random(in: 0..<10, using: &rng) {
            case 0:
                // Whole 64 KiB clusters, so the qcow2 side really frees them (a partial discard is a no-op).
                let cluster = Int.random(in: 0..<(size >> 16) - 4, using: &rng)
                commands.append("discard \(cluster << 16) \(Int.random(in: 1...4, using: &rng) << 16)")
            case 1:
                let offset = Int.random(in: 0..<size - 4096, using: &rng)
                commands.append("write -z \(offset) \(Int.random(in: 1...min(300_000, size - offset), using: &rng))")
            default:
                let length = Int.random(in: 1...(256 << 10), using: &rng)
                let offset = Int.random(in: 0...(size - length), using: &rng)
                commands.append("write -P \(Int.random(in: 1...255, using: &rng)) \(offset) \(length)")
            }
        }
        let args = commands.flatMap { ["-c", $0] }
        try Peer.expectSuccess("qemu-io", ["-f", "raw", server.uri("img")] + args)
        try Peer.expectSuccess("qemu-io", ["-f", "raw", "\(dir)/twin.raw"] + args)
        try Peer.expectSuccess("qemu-img", ["compare", "-f", "raw", "-F", "raw", "\(dir)/twin.raw", server.uri("img")])
        try server.stop()
        try Peer.expectSuccess("qemu-img", ["check", "\(dir)/img.qcow2"])
        try Peer.expectSuccess("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", "\(dir)/twin.raw", "\(dir)/img.qcow2"])
    }

    func testFioRandomWritesWithVerification() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/fio.qcow2", size: "32M")
        let server = try TestServer(dir: dir, exports: [TestExport(name: "fio", path: "\(dir)/fio.qcow2")])
        // Four jobs, each on its own 8 MiB slice (fio's verify needs disjoint ranges).
        let r = try Peer.expectSuccess("fio", [
            "--name=strata", "--ioengine=nbd", "--uri=\(server.uri("fio"))", "--rw=randwrite", "--bs=4k",
            "--iodepth=16", "--numjobs=4", "--size=8M", "--offset_increment=8M", "--verify=crc32c",
            "--group_reporting", "--output-format=json", "--verify_state_save=0",
        ], timeout: 120)
        let report = try XCTUnwrap(try json(String(r.out[r.out.firstIndex(of: "{")!...])) as? [String: Any])
        let job = try XCTUnwrap((report["jobs"] as? [[String: Any]])?.first)
        XCTAssertEqual(job["error"] as? Int, 0)
        let written = ((job["write"] as? [String: Any])?["io_bytes"] as? Int) ?? 0
        let verified = ((job["read"] as? [String: Any])?["io_bytes"] as? Int) ?? 0
        XCTAssertEqual(written, 32 * M)
        XCTAssertEqual(verified, 32 * M, "every block was read back and verified")
        try server.stop()
        try Peer.expectSuccess("qemu-img", ["check", "\(dir)/fio.qcow2"])
    }

    /// A fragmented image (every other 512-byte cluster), a probed raw image and an empty
    /// 16 TiB image, through libnbd; then nbdinfo --map and qemu-img map of the huge disk.
    func testOnePassReadsProbedRawAndHugeDisks() throws {
        let dir = try makeTempDir(self)
        let fragmented = "\(dir)/frag.qcow2"
        try makeQcow2(fragmented, size: "4M", options: ["cluster_size=512"])
        let img = try Qcow2Image(path: fragmented, options: OpenOptions(writable: true))
        for k in stride(from: 0, to: 8192, by: 2) {
            let bytes = [UInt8](repeating: UInt8(k % 251 + 1), count: 512)
            try bytes.withUnsafeBytes { try img.write($0, at: UInt64(k * 512), fua: false) }
        }
        try img.close()
        try makeRaw("\(dir)/guest.raw", size: M)
        try makeQcow2("\(dir)/huge.qcow2", size: "16T")
        let server = try TestServer(dir: dir, exports: [
            TestExport(name: "frag", path: fragmented), TestExport(name: "raw", path: "\(dir)/guest.raw"),
            TestExport(name: "huge", path: "\(dir)/huge.qcow2"),
        ])
        try Peer.python("one_pass_reads.py", [server.uri("frag"), server.uri("raw"), server.uri("huge")])
        let map = try Peer.expectSuccess("nbdinfo", ["--map", server.uri("huge")], timeout: 60)
        XCTAssertEqual(map.out.split(separator: "\n").count, 1, map.out)
        XCTAssertTrue(map.out.contains("17592186044416") && map.out.contains("hole,zero"), map.out)
        let qmap = try Peer.expectSuccess("qemu-img", ["map", "--output=json", "-f", "raw", server.uri("huge")], timeout: 60)
        XCTAssertEqual(qmap.out.split(separator: "\n").count, 1, qmap.out)
        try server.stop()
        XCTAssertEqual(try probeFormat(path: "\(dir)/guest.raw"), .raw)
    }
}
