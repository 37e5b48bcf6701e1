import Foundation
import XCTest

/// `strata convert` keeps content and sparseness; `strata compare` answers like qemu-img.
final class ConvertCompareTests: ToolTestCase {
    /// 8 MiB raw: noise, a written run of zeroes, a text run, holes, an unaligned tail byte.
    func makeRaw(_ name: String) throws {
        try truncate(name, to: 8 << 20)
        try write(name, noise(3 << 20, seed: 11), at: 0)
        try write(name, [UInt8](repeating: 0, count: 1 << 20), at: 3 << 20)
        try write(name, Array(String(repeating: "hello strata\n", count: 80_000).utf8), at: 4 << 20 + 123)
        try write(name, [0xff], at: (8 << 20) - 1)
    }

    func testRawToQcow2ToRawRoundTripIsByteIdenticalAndClean() throws {
        try makeRaw("orig.raw")
        ok(try strata("convert", "-f", "raw", "-O", "qcow2", "orig.raw", "mid.qcow2"), "convert raw→qcow2")
        let check = try qemuImg("check", "mid.qcow2")
        XCTAssertEqual(check.status, 0, "qemu-img check: \(check.stdout)\(check.stderr)")
        ok(try qemuImg("compare", "orig.raw", "mid.qcow2"), "qemu-img compare orig/mid")
        ok(try strata("convert", "-O", "raw", "mid.qcow2", "back.raw"), "convert qcow2→raw")
        XCTAssertEqual(try contents("orig.raw"), try contents("back.raw"), "round trip must be byte-identical")

        // Sparse: the zero runs (written and hole) are not allocated in the qcow2.
        let map = json(try qemuImg("map", "--output", "json", "mid.qcow2").stdout) as? [[String: Any]] ?? []
        let dataBytes = map.filter { $0["data"] as? Bool == true }.reduce(0) { $0 + ($1["length"] as? Int ?? 0) }
        XCTAssertLessThan(dataBytes, 6 << 20, "zero ranges must stay unallocated: \(map)")
        XCTAssertGreaterThanOrEqual(dataBytes, 4 << 20)
        // And the raw copy has holes where the source read zeroes.
        var st = stat()
        XCTAssertEqual(stat(path("back.raw"), &st), 0)
        XCTAssertLessThan(Int(st.st_blocks) * 512, 7 << 20, "raw output should be sparse")
    }

    func testConvertQcow2ChainFlattens() throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "base.qcow2", "6M"), "create base")
        ok(try qemuIO("-c", "write -P 1 0 1M", "-c", "write -P 2 3M 100k", "base.qcow2"), "fill base")
        ok(try qemuImg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"), "create top")
        ok(try qemuIO("-c", "write -P 3 512k 1M", "-c", "write -z 3M 64k", "top.qcow2"), "fill top")
        ok(try strata("convert", "-O", "qcow2", "-o", "cluster_size=16k,compression_type=zstd", "top.qcow2", "flat.qcow2"), "convert chain")
        ok(try qemuImg("compare", "top.qcow2", "flat.qcow2"), "qemu-img compare chain vs flat")
        XCTAssertEqual(try qemuImg("check", "flat.qcow2").status, 0)
        let info = json(try qemuImg("info", "--output", "json", "flat.qcow2").stdout) as? [String: Any]
        XCTAssertNil(info?["backing-filename"], "convert flattens the chain")
        XCTAssertEqual(info?["cluster-size"] as? Int, 16384)
        XCTAssertEqual((info?["format-specific"] as? [String: Any])?["data"].flatMap { ($0 as? [String: Any])?["compression-type"] as? String }, "zstd")
        // Several workers with out-of-order writes give the same content.
        ok(try strata("convert", "-m", "4", "-W", "-O", "qcow2", "top.qcow2", "flat4.qcow2"), "convert -m 4 -W")
        ok(try qemuImg("compare", "top.qcow2", "flat4.qcow2"), "compare -m 4 output")
        XCTAssertEqual(try qemuImg("check", "flat4.qcow2").status, 0)
    }

    func testCompareExitCodesAndMessagesMatchQemu() throws {
        try makeRaw("a.raw")
        ok(try strata("convert", "-O", "qcow2", "a.raw", "a.qcow2"), "convert")
        // Identical (across formats).
        var r = try strata("compare", "a.raw", "a.qcow2")
        XCTAssertEqual(r.status, 0)
        XCTAssertEqual(r.stdout, "Images are identical.\n")

        // One byte differs: same message and offset as qemu-img (the 512-byte sector).
        try FileManager.default.copyItem(atPath: path("a.raw"), toPath: path("b.raw"))
        try write("b.raw", [0x42], at: 5_000_000)
        r = try strata("compare", "-f", "raw", "-F", "raw", "a.raw", "b.raw")
        let q = try qemuImg("compare", "-f", "raw", "-F", "raw", "a.raw", "b.raw")
        XCTAssertEqual(r.status, 1)
        XCTAssertEqual(q.status, 1)
        XCTAssertEqual(r.stdout, q.stdout)
        XCTAssertEqual(r.stdout, "Content mismatch at offset 4999680!\n")
        // Against the qcow2 (data vs zero cluster: a byte in a hole of the source).
        try FileManager.default.copyItem(atPath: path("a.raw"), toPath: path("c.raw"))
        try write("c.raw", [0x01], at: 6 << 20 + 700)
        r = try strata("compare", "a.qcow2", "c.raw")
        XCTAssertEqual(r.status, 1)
        XCTAssertEqual(r.stdout, try qemuImg("compare", "a.qcow2", "c.raw").stdout)

        // Different sizes: equal when the extra part reads as zeroes, else a mismatch.
        try FileManager.default.copyItem(atPath: path("a.raw"), toPath: path("longer.raw"))
        try truncate("longer.raw", to: 9 << 20)
        r = try strata("compare", "a.qcow2", "longer.raw")
        XCTAssertEqual(r.status, 0, r.stdout + r.stderr)
        XCTAssertEqual(r.stdout, try qemuImg("compare", "a.qcow2", "longer.raw").stdout)
        try write("longer.raw", [0x07], at: (8 << 20) + 4096)
        r = try strata("compare", "longer.raw", "a.qcow2")
        XCTAssertEqual(r.status, 1)
        XCTAssertEqual(r.stdout, try qemuImg("compare", "longer.raw", "a.qcow2").stdout)

        // Errors: exit 2 with one line.
        assertUserError(try strata("compare", "a.raw", "missing.qcow2"), status: 2, mentions: ["missing.qcow2"])
        assertUserError(try strata("compare", "a.raw"), status: 2, mentions: ["second"])
        assertUserError(try strata("compare", "-f", "qcow2", "a.raw", "a.qcow2"), status: 2, mentions: ["a.raw"])
    }

    func testConvertRefusesToOverwriteItsSource() throws {
        try makeRaw("same.raw")
        let before = try contents("same.raw")
        assertUserError(try strata("convert", "-O", "qcow2", "same.raw", "same.raw"), mentions: ["same.raw"])
        XCTAssertEqual(try contents("same.raw"), before)
    }

    // MARK: The copy pipeline (several workers read ahead; without -W one writes at a time, in order)

    /// 40 MiB qcow2 (64 KiB clusters) and its raw reference: 24 runs of distinct noise at
    /// unaligned offsets (some across 2 MiB chunk boundaries), a written run of zeroes, two
    /// zero-flag ranges over data, and holes between. Any chunk written at the wrong offset or
    /// from another chunk's buffer changes the bytes.
    func makeScattered() throws {
        try truncate("scattered.raw", to: 40 << 20)
        for k in 0..<24 {
            try write("scattered.raw", noise(200_000 + k * 9_000, seed: UInt64(100 + k)), at: UInt64(k) * 1_700_000 + 777)
        }
        try write("scattered.raw", [UInt8](repeating: 0, count: 1 << 20), at: 30 << 20)
        ok(try qemuImg("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=64k", "scattered.raw", "scattered.qcow2"), "qemu-img convert to qcow2")
        ok(try qemuIO("-c", "write -z 4M 192k", "-c", "write -z 20M 1M", "scattered.qcow2"), "zero clusters")
        ok(try qemuImg("convert", "-f", "qcow2", "-O", "raw", "scattered.qcow2", "reference.raw"), "qemu-img convert reference")
    }

    func testPipelinedConvertKeepsEveryChunkInPlaceBothWays() throws {
        try makeScattered()
        let reference = try contents("reference.raw")
        let flagSets: [[String]] = [[], ["-m", "1"], ["-m", "3"], ["-m", "16"], ["-W"], ["-W", "-m", "3"]]
        for flags in flagSets {
            let what = flags.isEmpty ? "defaults" : flags.joined(separator: " ")
            ok(try strata(["convert"] + flags + ["-f", "qcow2", "-O", "raw", "scattered.qcow2", "out.raw"]), "qcow2→raw \(what)")
            XCTAssertEqual(try contents("out.raw"), reference, "qcow2→raw with \(what) must be byte-identical to qemu-img's")
            XCTAssertLessThan(dataBytes("out.raw"), 12 << 20, "qcow2→raw with \(what) must leave holes")
            ok(try strata(["convert"] + flags + ["-f", "raw", "-O", "qcow2", "out.raw", "back.qcow2"]), "raw→qcow2 \(what)")
            ok(try qemuImg("compare", "-f", "raw", "-F", "qcow2", "reference.raw", "back.qcow2"), "compare raw→qcow2 \(what)")
            XCTAssertEqual(try qemuImg("check", "back.qcow2").status, 0, "check raw→qcow2 \(what)")
            try FileManager.default.removeItem(atPath: path("out.raw"))
            try FileManager.default.removeItem(atPath: path("back.qcow2"))
        }
    }

    func testConvertOntoExistingTargetReplacesItsGarbage() throws {
        try makeScattered()
        let reference = try contents("reference.raw")
        for flags: [String] in [[], ["-W"]] {
            let what = flags.isEmpty ? "in order" : "with -W"
            // A raw target full of noise: holes and zero ranges of the source must be zeroed.
            try write("garbage.raw", noise(40 << 20, seed: 7))
            ok(try strata(["convert", "-n"] + flags + ["-f", "qcow2", "-O", "raw", "scattered.qcow2", "garbage.raw"]), "-n raw \(what)")
            XCTAssertEqual(try contents("garbage.raw"), reference, "-n onto a raw target \(what)")
            // A qcow2 target with every cluster allocated.
            ok(try qemuImg("create", "-q", "-f", "qcow2", "garbage.qcow2", "40M"), "create qcow2 target")
            ok(try qemuIO("-c", "write -P 0xa5 0 40M", "garbage.qcow2"), "fill qcow2 target")
            ok(try strata(["convert", "-n"] + flags + ["-f", "qcow2", "-O", "qcow2", "scattered.qcow2", "garbage.qcow2"]), "-n qcow2 \(what)")
            ok(try qemuImg("compare", "-f", "raw", "-F", "qcow2", "reference.raw", "garbage.qcow2"), "compare -n qcow2 \(what)")
            XCTAssertEqual(try qemuImg("check", "garbage.qcow2").status, 0)
        }
    }

    /// More chunks than the copy takes in one batch (600 MiB of 2 MiB chunks, each one to
    /// zero or copy on an existing target): the batches follow each other in order.
    func testConvertOntoExistingTargetAcrossBatches() throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "big.qcow2", "600M"), "create source")
        ok(try qemuIO("-c", "write -P 1 1M 64k", "-c", "write -P 2 511M 2M", "-c", "write -P 3 599M 1M", "big.qcow2"), "fill source")
        try truncate("target.raw", to: 600 << 20)
        let garbage: [UInt64] = [100 << 20, (512 << 20) + 4096, (600 << 20) - 100]
        for (k, at) in garbage.enumerated() {
            try write("target.raw", noise(100, seed: UInt64(k + 1)), at: at)
        }
        ok(try strata("convert", "-n", "-f", "qcow2", "-O", "raw", "big.qcow2", "target.raw"), "convert -n")
        ok(try qemuImg("compare", "-f", "qcow2", "-F", "raw", "big.qcow2", "target.raw"), "compare")
    }
}
