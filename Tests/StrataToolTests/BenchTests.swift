import Foundation
import XCTest

/// `strata bench`: real runs on small qcow2 and raw images, read and write, both access
/// patterns, depth 1 and more, flush intervals; the JSON report's shape; what a write bench
/// leaves on disk (checked against `qemu-img bench` on a twin image); and the argument errors.
/// Speed is never asserted, only that the figures are sane.
final class BenchTests: ToolTestCase {
    /// Runs `strata bench … --output json` and returns the parsed report.
    func benchJSON(_ args: [String], file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
        let r = ok(try strata(["bench", "--output", "json"] + args), "bench \(args)", file: file, line: line)
        return try XCTUnwrap(json(r.stdout, file: file, line: line) as? [String: Any], file: file, line: line)
    }

    /// The checks every report must pass: `count` ops, throughput above zero, ordered percentiles.
    func assertSane(_ report: [String: Any], count: Int, file: StaticString = #filePath, line: UInt = #line) throws {
        XCTAssertEqual(report["count"] as? Int, count, file: file, line: line)
        XCTAssertGreaterThan(report["elapsed-ns"] as? Int ?? 0, 0, file: file, line: line)
        XCTAssertGreaterThan(report["ops-per-sec"] as? Int ?? 0, 0, file: file, line: line)
        XCTAssertGreaterThan(report["bytes-per-sec"] as? Int ?? 0, 0, file: file, line: line)
        let lat = try XCTUnwrap(report["latency-ns"] as? [String: Any], file: file, line: line)
        let values = try ["min", "p50", "p99", "p99.9", "max"].map { try XCTUnwrap(lat[$0] as? Int, "latency-ns.\($0)", file: file, line: line) }
        XCTAssertGreaterThan(values[0], 0, "min", file: file, line: line)
        XCTAssertEqual(values, values.sorted(), "min <= p50 <= p99 <= p99.9 <= max: \(lat)", file: file, line: line)
        XCTAssertNotNil(lat["mean"] as? Int, file: file, line: line)
    }

    /// A 4 MiB qcow2 image whose first 2 MiB hold data (some reads hit data, some holes).
    func makeQcow2(_ name: String, size: String = "4M") throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", name, size), "create")
        ok(try qemuIO("-c", "write -P 0x5a 0 2M", name), "fill")
    }

    // MARK: Read

    func testReadBenchOnQcow2BothAccessPatternsAndDepths() throws {
        try makeQcow2("r.qcow2")
        for access in ["sequential", "random"] {
            for depth in ["1", "8"] {
                let report = try benchJSON(["-c", "3000", "-d", depth, "--access", access, "-f", "qcow2", "r.qcow2"])
                try assertSane(report, count: 3000)
                XCTAssertEqual(report["operation"] as? String, "read")
                XCTAssertEqual(report["access"] as? String, access)
                XCTAssertEqual(report["depth"] as? Int, Int(depth))
                XCTAssertEqual(report["buffer-size"] as? Int, 4096)
                XCTAssertEqual(report["step"] as? Int, 4096)
                XCTAssertEqual(report["image-size"] as? Int, 4 << 20)
                XCTAssertEqual(report["flushes"] as? Int, 0)
            }
        }
        XCTAssertEqual(try qemuImg("check", "r.qcow2").status, 0)
    }

    func testReadBenchOnRawWithBufferStepAndOffset() throws {
        try truncate("r.raw", to: 1 << 20)
        let report = try benchJSON(["-c", "500", "-d", "3", "-s", "64k", "-S", "8k", "-o", "4096", "-f", "raw", "r.raw"])
        try assertSane(report, count: 500)
        XCTAssertEqual(report["buffer-size"] as? Int, 65536)
        XCTAssertEqual(report["step"] as? Int, 8192)
        XCTAssertEqual(report["offset"] as? Int, 4096)
        // The brief's spellings: -t read|write and --pattern random|sequential.
        let random = try benchJSON(["-c", "200", "-t", "read", "--pattern", "random", "-f", "raw", "r.raw"])
        try assertSane(random, count: 200)
        XCTAssertEqual(random["access"] as? String, "random")
    }

    func testHumanOutputStartsAsQemuImgBenchDoes() throws {
        try makeQcow2("h.qcow2")
        let mine = ok(try strata("bench", "-c", "100", "-d", "4", "-f", "qcow2", "h.qcow2"), "bench")
        let theirs = ok(try qemuImg("bench", "-c", "100", "-d", "4", "-f", "qcow2", "h.qcow2"), "qemu-img bench")
        XCTAssertEqual(mine.stdoutLines.first, theirs.stdoutLines.first)
        XCTAssertEqual(mine.stdoutLines.first, "Sending 100 read requests, 4096 bytes each, 4 in parallel (starting at offset 0, step size 4096)")
        XCTAssertTrue(mine.stdoutLines.contains { $0.hasPrefix("Run completed in ") && $0.hasSuffix(" seconds.") }, mine.stdout)
        XCTAssertTrue(mine.stdoutLines.contains { $0.hasPrefix("100 ops in ") && $0.contains("ops/s") && $0.contains("MiB/s") }, mine.stdout)
        XCTAssertTrue(mine.stdoutLines.contains { $0.contains("p50") && $0.contains("p99 ") && $0.contains("p99.9") && $0.contains("max") }, mine.stdout)
        XCTAssertEqual(mine.stderr, "", "no progress line when stderr is not a terminal")

        let flushing = ok(try strata("bench", "-w", "-c", "10", "-d", "4", "--flush-interval", "4", "-f", "qcow2", "h.qcow2"), "bench -w")
        let qemuFlushing = ok(try qemuImg("bench", "-w", "-c", "10", "-d", "4", "--flush-interval=4", "-f", "qcow2", "h.qcow2"), "qemu-img bench -w")
        XCTAssertEqual(Array(flushing.stdoutLines.prefix(2)), Array(qemuFlushing.stdoutLines.prefix(2)))

        let quiet = ok(try strata("bench", "-q", "-c", "100", "-f", "qcow2", "h.qcow2"), "bench -q")
        XCTAssertEqual(quiet.stdout + quiet.stderr, "")
    }

    // MARK: Write

    /// A sequential write bench writes what `qemu-img bench` writes with the same flags (the
    /// pattern byte, request after request), leaving a clean image.
    func testSequentialWriteBenchMatchesQemuImgBenchOnATwin() throws {
        for fmt in ["qcow2", "raw"] {
            let mine = "w-mine.\(fmt)", twin = "w-qemu.\(fmt)"
            for name in [mine, twin] { ok(try qemuImg("create", "-q", "-f", fmt, name, "1M"), "create") }
            let report = try benchJSON(["-w", "--pattern", "0xab", "-c", "200", "-d", "8", "-f", fmt, mine])
            try assertSane(report, count: 200)
            XCTAssertEqual(report["operation"] as? String, "write")
            XCTAssertEqual(report["pattern"] as? Int, 0xab)
            ok(try qemuImg(["bench", "-q", "-w", "--pattern=0xab", "-c", "200", "-d", "8", "-f", fmt, twin]), "qemu-img bench")
            ok(try qemuImg("compare", "-f", fmt, "-F", fmt, mine, twin), "\(fmt): same data as qemu-img bench")
            if fmt == "qcow2" { ok(try qemuImg("check", mine), "check") }
            ok(try qemuIO("-f", fmt, "-c", "read -P 0xab 0 800k", "-c", "read -P 0 800k 224k", mine), "\(fmt): data as written")
        }
    }

    /// Past the end, offsets wrap modulo image size - buffer size (qemu's fix ff2ab634; before
    /// it, qemu-img wrapped modulo the image size and a request could overrun the end): 600
    /// requests of 4 KiB on 1 MiB cover [0, 1020k) and never the last 4 KiB. An odd step that
    /// would end past the image wraps inside it too.
    func testSequentialOffsetsWrapInsideTheImage() throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "wrap.qcow2", "1M"), "create")
        _ = try benchJSON(["-w", "--pattern", "0x11", "-c", "600", "-d", "4", "-f", "qcow2", "wrap.qcow2"])
        ok(try qemuIO("-c", "read -P 0x11 0 1020k", "-c", "read -P 0 1020k 4k", "wrap.qcow2"), "wrapped before the last buffer")
        let odd = try benchJSON(["-w", "-c", "1000", "-s", "4k", "-S", "5000", "-f", "qcow2", "wrap.qcow2"])
        try assertSane(odd, count: 1000)
        ok(try qemuImg("check", "wrap.qcow2"), "check")
    }

    func testRandomWriteBenchLeavesPatternBlocksAndACleanImage() throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "rw.qcow2", "2M"), "create")
        let report = try benchJSON(["-w", "--access", "random", "--seed", "7", "--pattern", "0x3c", "-c", "300", "-d", "6", "-f", "qcow2", "rw.qcow2"])
        try assertSane(report, count: 300)
        XCTAssertEqual(report["seed"] as? Int, 7)
        ok(try qemuImg("check", "rw.qcow2"), "check")
        ok(try qemuImg("convert", "-O", "raw", "rw.qcow2", "rw.raw"), "convert")
        let data = try contents("rw.raw")
        XCTAssertEqual(data.count, 2 << 20)
        var written = 0
        for block in stride(from: 0, to: data.count, by: 4096) {
            let bytes = Set(data[block..<(block + 4096)])
            XCTAssertTrue(bytes == [0] || bytes == [0x3c], "block at \(block) is neither untouched nor the pattern: \(bytes)")
            if bytes == [0x3c] { written += 1 }
        }
        // 300 uniform picks among 512 blocks land on about 230 distinct ones.
        XCTAssertGreaterThan(written, 100)
        XCTAssertLessThanOrEqual(written, 300)
        // The same seed picks the same blocks.
        ok(try qemuImg("create", "-q", "-f", "qcow2", "rw2.qcow2", "2M"), "create")
        _ = try benchJSON(["-w", "--access", "random", "--seed", "7", "--pattern", "0x3c", "-c", "300", "-d", "2", "-f", "qcow2", "rw2.qcow2"])
        ok(try qemuImg("compare", "rw.qcow2", "rw2.qcow2"), "same seed, same offsets")
    }

    /// qemu-img's rule: a flush before request i when count - i is a multiple of N, and one
    /// at the end: 100 requests, N = 16 → before 4, 20, 36, 52, 68, 84, and at the end.
    func testFlushIntervalWithAndWithoutDrain() throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "f.qcow2", "1M"), "create")
        for extra in [[], ["--no-drain"]] {
            for depth in ["1", "5"] {
                let report = try benchJSON(["-w", "-c", "100", "-d", depth, "--flush-interval", "16", "-f", "qcow2"] + extra + ["f.qcow2"])
                try assertSane(report, count: 100)
                XCTAssertEqual(report["flushes"] as? Int, 7, "\(extra) depth \(depth)")
                XCTAssertEqual(report["flush-interval"] as? Int, 16)
                XCTAssertEqual(report["drain"] as? Bool, extra.isEmpty)
            }
        }
        ok(try qemuImg("check", "f.qcow2"), "check")
    }

    // MARK: Errors

    func testArgumentErrorsAreClear() throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "e.qcow2", "64k"), "create")
        let cases: [([String], [String])] = [
            (["-c", "0"], ["request count", "'0'", "-c"]),
            (["-c", "-5"], ["request count", "'-5'"]),
            (["-c", "many"], ["request count", "'many'"]),
            (["-d", "0"], ["queue depth", "-d"]),
            (["-d", "5000"], ["queue depth", "1024"]),
            (["-s", "0"], ["buffer size", "-s"]),
            (["-s", "-4k"], ["buffer size", "negative"]),
            (["-S", "-1"], ["step size"]),
            (["-o", "-512"], ["offset"]),
            (["--flush-interval", "4"], ["--flush-interval", "write"]),
            (["-w", "--flush-interval", "0"], ["flush interval", "'0'"]),
            (["-w", "--no-drain"], ["--no-drain", "--flush-interval"]),
            (["-w", "-d", "8", "--flush-interval", "4"], ["--flush-interval 4", "queue depth"]),
            (["-w", "--pattern", "300"], ["--pattern", "300", "0 to 255"]),
            (["--pattern", "7"], ["--pattern", "-w"]),
            (["--access", "diagonal"], ["diagonal"]),
            (["-t", "sideways"], ["cache mode", "sideways"]),
            (["-w", "-t", "read"], ["-w", "-t read"]),
            (["-w", "-U"], ["-U", "write"]),
        ]
        for (args, mentions) in cases {
            assertUserError(try strata(["bench"] + args + ["e.qcow2"]), mentions: mentions)
        }
        assertUserError(try strata("bench", "-s", "128k", "e.qcow2"), mentions: ["e.qcow2", "buffer size", "larger than the image"])
        assertUserError(try strata("bench", "-o", "61441", "e.qcow2"), mentions: ["e.qcow2", "offset 61441"])
        assertUserError(try strata("bench", "missing.qcow2"), mentions: ["missing.qcow2"])
        assertUserError(try strata("bench"), mentions: ["file"])
        // Nothing was written by any of them.
        ok(try qemuImg("check", "e.qcow2"), "check")
        XCTAssertEqual(try qemuImg("map", "--output", "json", "e.qcow2").stdout.contains("\"data\": true"), false)
    }

    /// An image another process holds open for writing: a write bench (and a plain read
    /// bench) are refused naming the lock; `-U` reads it.
    func testLockedImageRefusesWritesAndReadsWithForceShare() throws {
        guard let nbd = Self.which("qemu-nbd") else { return XCTFail("qemu-nbd not found: install qemu-utils") }
        try makeQcow2("busy.qcow2")
        let server = Process()
        server.executableURL = URL(fileURLWithPath: nbd)
        server.arguments = ["-k", path("nbd.sock"), "-f", "qcow2", path("busy.qcow2")]
        try server.run()
        defer { server.terminate(); server.waitUntilExit() }
        for _ in 0..<100 where !FileManager.default.fileExists(atPath: path("nbd.sock")) { usleep(20_000) }

        assertUserError(try strata("bench", "-w", "-c", "10", "busy.qcow2"), mentions: ["busy.qcow2", "lock"])
        assertUserError(try strata("bench", "-c", "10", "busy.qcow2"), mentions: ["busy.qcow2", "lock"])
        let report = try benchJSON(["-U", "-c", "100", "busy.qcow2"])
        try assertSane(report, count: 100)
    }
}
