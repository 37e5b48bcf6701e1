import Foundation
import XCTest

/// `strata create`, `resize` and `io` against qemu-img and qemu-io; user mistakes.
final class CreateResizeIOTests: ToolTestCase {
    func testCreateAnnouncesLikeQemu() throws {
        ok(try qemuImg("create", "-q", "-f", "raw", "b.raw", "3M"), "backing")
        let cases: [[String]] = [
            ["-f", "qcow2", "X", "1G"],
            ["-f", "qcow2", "-o", "compat=0.10,cluster_size=4k", "X", "100M"],
            ["-f", "qcow2", "-o", "compression_type=zstd,lazy_refcounts=on,extended_l2=on,refcount_bits=8", "X", "1.5G"],
            ["-f", "qcow2", "-o", "compat=1.1", "-o", "size=2M", "X"],
            ["-f", "qcow2", "-b", "b.raw", "-F", "raw", "X"],
            ["-f", "raw", "X", "1000"],
            ["X", "64k"],
        ]
        for args in cases {
            let ours = ok(try run(Self.strataBinary!, ["create"] + args.map { $0 == "X" ? "s.img" : $0 }), "strata create \(args)")
            let theirs = ok(try run(Self.qemuImg!, ["create"] + args.map { $0 == "X" ? "q.img" : $0 }), "qemu-img create \(args)")
            XCTAssertEqual(ours.stdout.replacingOccurrences(of: "s.img", with: "q.img"), theirs.stdout, "\(args)")
            XCTAssertEqual(try virtualSize("s.img"), try virtualSize("q.img"), "size of \(args)")
            try? FileManager.default.removeItem(atPath: path("s.img"))
            try? FileManager.default.removeItem(atPath: path("q.img"))
        }
    }

    func testResizeGrowShrinkAgreesWithQemuInfo() throws {
        ok(try strata("create", "-q", "-f", "qcow2", "d.qcow2", "10M"), "create")
        ok(try strata("io", "-c", "write -P 7 0 1M", "-c", "write -P 8 9M 1M", "d.qcow2"), "fill")
        var r = ok(try strata("resize", "d.qcow2", "+6M"), "grow")
        XCTAssertEqual(r.stdout, "Image resized.\n")
        XCTAssertEqual(try virtualSize("d.qcow2"), 16 << 20)
        // Shrinking needs --shrink and changes nothing without it.
        assertUserError(try strata("resize", "d.qcow2", "4M"), mentions: ["d.qcow2", "--shrink"])
        XCTAssertEqual(try virtualSize("d.qcow2"), 16 << 20)
        // With --shrink, data past the end goes (qemu-img semantics); a relative size works.
        ok(try strata("resize", "--shrink", "d.qcow2", "--", "-12M"), "shrink")
        XCTAssertEqual(try virtualSize("d.qcow2"), 4 << 20)
        XCTAssertEqual(try qemuImg("check", "d.qcow2").status, 0, "clean after shrink")
        ok(try qemuIO("-c", "read -P 7 0 1M", "-c", "read -P 0 1M 3M", "d.qcow2"), "content kept below the new end")
        ok(try strata("resize", "--shrink", "d.qcow2", "-1M"), "shrink without --")
        XCTAssertEqual(try virtualSize("d.qcow2"), 3 << 20)
        assertUserError(try strata("resize", "d.qcow2", "1000"), mentions: ["d.qcow2"])
        assertUserError(try strata("resize", "d.qcow2", "--shrink", "0"), mentions: ["positive"])
        assertUserError(try strata("resize", "d.qcow2", "12Q"), mentions: ["12Q"])

        // Raw: the file length is the size.
        ok(try strata("create", "-q", "-f", "raw", "d.raw", "1M"), "create raw")
        ok(try strata("resize", "-f", "raw", "d.raw", "+1M"), "grow raw")
        XCTAssertEqual(try contents("d.raw").count, 2 << 20)
        r = ok(try strata("resize", "-f", "raw", "--shrink", "d.raw", "1536k"), "shrink raw")
        XCTAssertEqual(try contents("d.raw").count, 1536 << 10)
        XCTAssertEqual(try virtualSize("d.raw"), 1536 << 10)
    }

    /// Shrinking an overlay and growing it again must not bring the backing file's bytes back
    /// (qemu-img zero-fills the whole new area when the backing file reaches into it).
    func testGrowingOverALongerBackingFileReadsZeroes() throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "long.qcow2", "8M"), "create backing")
        ok(try qemuIO("-c", "write -P 1 0 8M", "long.qcow2"), "fill backing")
        for tool in ["strata", "qemu"] {
            let img = "\(tool).qcow2"
            ok(try qemuImg("create", "-q", "-f", "qcow2", "-b", "long.qcow2", "-F", "qcow2", img), "create overlay")
            let program = tool == "strata" ? Self.strataBinary! : Self.qemuImg!
            ok(try run(program, ["resize", "--shrink", img, "4M"]), "\(tool) shrink")
            ok(try run(program, ["resize", img, "10M"]), "\(tool) grow")
        }
        let verify = try qemuIO("-c", "read -P 1 0 4M", "-c", "read -P 0 4M 6M", "strata.qcow2")
        XCTAssertEqual(verify.status, 0)
        XCTAssertFalse(verify.stdout.contains("Pattern verification failed"), verify.stdout)
        XCTAssertEqual(try qemuImg("map", "--output", "json", "strata.qcow2").stdout,
                       try qemuImg("map", "--output", "json", "qemu.qcow2").stdout.replacingOccurrences(of: "qemu.qcow2", with: "strata.qcow2"))
        XCTAssertEqual(try qemuImg("check", "strata.qcow2").status, 0)
    }

    func testIOWritesWhatQemuIOReadsAndPrintsTheSameFirstLines() throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "io.qcow2", "4M"), "create")
        let ours = ok(try strata("io", "-c", "write -P 0x5a 0 64k", "-c", "write 64k 512", "-c", "write -z -u 1M 128k",
                                 "-c", "discard 2M 64k", "-c", "flush", "-c", "read -P 0x5a 0 64k", "-c", "read -v 65530 20", "io.qcow2"), "strata io")
        // Each op prints qemu-io's first line, then a statistics line.
        let lines = ours.stdoutLines
        func isDump(_ l: String) -> Bool { l.count > 11 && l.prefix(8).allSatisfy(\.isHexDigit) && l.dropFirst(8).hasPrefix(":  ") }
        XCTAssertEqual(lines.filter { !$0.contains("ops/sec") && !isDump($0) }, [
            "wrote 65536/65536 bytes at offset 0",
            "wrote 512/512 bytes at offset 65536",
            "wrote 131072/131072 bytes at offset 1048576",
            "discard 65536/65536 bytes at offset 2097152",
            "read 65536/65536 bytes at offset 0",
            "read 20/20 bytes at offset 65530",
        ])
        // qemu-io's statistics line: "64 KiB, 1 ops; 00.00 sec (… KiB/sec and … ops/sec)".
        guard lines.count >= 4 else { return XCTFail("too little output: \(ours.stdout)") }
        XCTAssertTrue(lines[1].hasPrefix("64 KiB, 1 ops; ") && lines[1].contains(" sec (") && lines[1].hasSuffix(" ops/sec)"), lines[1])
        XCTAssertTrue(lines[3].hasPrefix("512 bytes, 1 ops; "), lines[3])
        // The hexdump equals qemu-io's.
        let theirs = ok(try qemuIO("-c", "read -v 65530 20", "io.qcow2"), "qemu-io read -v")
        XCTAssertEqual(lines.filter(isDump), theirs.stdoutLines.filter(isDump))
        XCTAssertEqual(lines.filter(isDump).count, 2)
        // qemu-io sees the data: default pattern 0xcd, the zeroes.
        ok(try qemuIO("-c", "read -P 0x5a 0 64k", "-c", "read -P 0xcd 64k 512", "-c", "read -P 0 1M 128k", "io.qcow2"), "qemu-io verifies")
        let verify = try qemuIO("-c", "read -P 0x5a 0 64k", "-c", "read -P 0xcd 64k 512", "-c", "read -P 0 1M 128k", "io.qcow2")
        XCTAssertFalse(verify.stdout.contains("Pattern verification failed"), verify.stdout)
        XCTAssertEqual(try qemuImg("check", "io.qcow2").status, 0)
    }

    func testIOPatternMismatchFailsLikeQemuIO() throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "p.qcow2", "1M"), "create")
        ok(try qemuIO("-c", "write -P 5 0 64k", "p.qcow2"), "qemu-io write")
        ok(try strata("io", "-c", "read -P 5 0 64k", "p.qcow2"), "matching pattern")
        let ours = try strata("io", "-c", "read -P 6 0 64k", "-c", "read -P 5 0 4k", "p.qcow2")
        let theirs = try qemuIO("-c", "read -P 6 0 64k", "-c", "read -P 5 0 4k", "p.qcow2")
        XCTAssertEqual(ours.status, 1, "a pattern mismatch must fail the run")
        XCTAssertEqual(theirs.status, 1)
        XCTAssertEqual(ours.stdoutLines.first, "Pattern verification failed at offset 0, 65536 bytes")
        XCTAssertEqual(ours.stdoutLines.first, theirs.stdoutLines.first)
        // Later commands still run, as in qemu-io.
        XCTAssertTrue(ours.stdout.contains("read 4096/4096 bytes at offset 0"))
        // I/O past the end fails the run too.
        let past = try strata("io", "-c", "read 1M 512", "p.qcow2")
        XCTAssertEqual(past.status, 1)
        XCTAssertTrue(past.stdout.hasPrefix("read failed: "), past.stdout)
    }

    func testUserErrorsPrintOneClearLine() throws {
        ok(try strata("create", "-q", "-f", "raw", "r.raw", "1M"), "create")
        assertUserError(try strata("create", "-f", "qcow2", "n.qcow2", "12X"), mentions: ["12X"])
        assertUserError(try strata("create", "-f", "qcow2", "n.qcow2"), mentions: ["n.qcow2", "size"])
        assertUserError(try strata("create", "-f", "qcow2", "-o", "cluster_size=3000", "n.qcow2", "1M"), mentions: ["n.qcow2", "cluster"])
        assertUserError(try strata("create", "-f", "qcow2", "-o", "nosuch=1", "n.qcow2", "1M"), mentions: ["nosuch"])
        assertUserError(try strata("create", "-f", "qcow2", "-o", "compat=0.10,lazy_refcounts=on", "n.qcow2", "1M"), mentions: ["n.qcow2", "lazy"])
        assertUserError(try strata("create", "-f", "qcow2", "-b", "r.raw", "n.qcow2"), mentions: ["n.qcow2", "-F"])
        assertUserError(try strata("create", "-f", "vmdk", "n.img", "1M"), mentions: ["vmdk"])
        XCTAssertFalse(FileManager.default.fileExists(atPath: path("n.qcow2")), "nothing created on error")
        assertUserError(try strata("info", "nope.qcow2"), mentions: ["nope.qcow2"])
        assertUserError(try strata("info", "-f", "qcow2", "r.raw"), mentions: ["r.raw"])
        assertUserError(try strata("map", "--output", "xml", "r.raw"), mentions: ["xml"])
        assertUserError(try strata("io", "-f", "raw", "-c", "read 0 1x", "r.raw"), mentions: ["1x"])
        assertUserError(try strata("io", "-f", "raw", "-c", "frobnicate", "r.raw"), mentions: ["frobnicate"])
        assertUserError(try strata("io", "-f", "raw", "-c", "write -P 300 0 1", "r.raw"), mentions: ["300"])
        assertUserError(try strata("convert", "-O", "qcow2", "nope.raw", "out.qcow2"), mentions: ["nope.raw"])
        assertUserError(try strata("nosuchcommand"), mentions: ["nosuchcommand"])
        XCTAssertEqual(try strata("--help").status, 0)
    }

    func testImagesInUseAreRefusedNotClobbered() throws {
        guard let nbd = Self.which("qemu-nbd") else { return XCTFail("qemu-nbd not found: install qemu-utils") }
        ok(try qemuImg("create", "-q", "-f", "qcow2", "busy.qcow2", "1M"), "create")
        ok(try qemuIO("-c", "write -P 3 0 64k", "busy.qcow2"), "fill")
        let server = Process()
        server.executableURL = URL(fileURLWithPath: nbd)
        server.arguments = ["-k", path("nbd.sock"), "-f", "qcow2", path("busy.qcow2")]
        try server.run()
        defer { server.terminate(); server.waitUntilExit() }
        for _ in 0..<100 where !FileManager.default.fileExists(atPath: path("nbd.sock")) { usleep(20_000) }

        assertUserError(try strata("info", "busy.qcow2"), mentions: ["busy.qcow2", "lock"])
        ok(try strata("info", "-U", "busy.qcow2"), "info -U on an image in use")
        assertUserError(try strata("io", "-c", "write 0 512", "busy.qcow2"), mentions: ["busy.qcow2", "lock"])
        assertUserError(try strata("resize", "busy.qcow2", "+1M"), mentions: ["busy.qcow2", "lock"])
        let create = try strata("create", "-q", "-f", "qcow2", "busy.qcow2", "2M")
        XCTAssertEqual(create.status, 1, "create over an image in use must fail")
        XCTAssertTrue(create.stderr.contains("lock"), create.stderr)
        server.terminate()
        server.waitUntilExit()
        XCTAssertEqual(try qemuImg("check", "busy.qcow2").status, 0)
        ok(try qemuIO("-c", "read -P 3 0 64k", "busy.qcow2"), "data survived")
        XCTAssertEqual(try virtualSize("busy.qcow2"), 1 << 20)
    }
}
