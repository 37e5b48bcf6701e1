import Foundation
import XCTest

/// Flags and behaviours of qemu-img and qemu-io that `strata` keeps: qemu-io's handling of
/// bad `-c` commands, convert's `-p`, `-m`, `-S`, the cache flags, and `compare -s`.
final class QemuParityTests: ToolTestCase {
    /// qemu-io's output without its timing lines (`… ops/sec)`), which differ on every run.
    func withoutTimings(_ text: String) -> [String] {
        text.split(separator: "\n").map(String.init).filter { !$0.hasSuffix("ops/sec)") }
    }

    func testIORunsTheGoodCommandsAroundABadOneLikeQemuIO() throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "s.qcow2", "1M"), "create")
        ok(try qemuImg("create", "-q", "-f", "qcow2", "q.qcow2", "1M"), "create")
        let commands = ["write -P 1 0 4k", "frobnicate", "read -P 1 0 4k", "read 0 1x", "write -P 2 4k 4k",
                        "write -Q 0 1", "read", "", "flush x", "read -P 2 4k 4k"]
        let args = commands.flatMap { ["-c", $0] }
        let ours = try run(Self.strataBinary!, ["io"] + args + ["s.qcow2"])
        let theirs = try run(Self.qemuIO!, args + ["q.qcow2"])
        XCTAssertEqual(theirs.status, 1)
        XCTAssertEqual(ours.status, 1, "a bad command fails the run")
        XCTAssertEqual(withoutTimings(ours.stdout), [
            "wrote 4096/4096 bytes at offset 0",
            "read 4096/4096 bytes at offset 0",
            "wrote 4096/4096 bytes at offset 4096",
            "read 4096/4096 bytes at offset 4096",
        ], "the good commands all ran, in order")
        // qemu-io prints some of its complaints on stdout; the lines of the good commands agree.
        XCTAssertEqual(withoutTimings(ours.stdout), withoutTimings(theirs.stdout).filter {
            $0.hasPrefix("wrote ") || $0.hasPrefix("read ")
        })
        // One error line per bad command, naming the file and the command.
        XCTAssertEqual(ours.stderrLines.count, 5, ours.stderr)
        for (line, bad) in zip(ours.stderrLines, ["frobnicate", "read 0 1x", "write -Q 0 1", "read", "flush x"]) {
            XCTAssertTrue(line.hasPrefix("strata: s.qcow2: -c '\(bad)': "), line)
        }
        ok(try qemuIO("-c", "read -P 1 0 4k", "-c", "read -P 2 4k 4k", "s.qcow2"), "the writes reached the image")

        // A writing command on -r is refused; the others run.
        let ro = ["-r", "-c", "write 0 4k", "-c", "read -P 1 0 4k", "-c", "discard 0 4k"]
        let ourRO = try run(Self.strataBinary!, ["io"] + ro + ["s.qcow2"])
        let theirRO = try run(Self.qemuIO!, ro + ["q.qcow2"])
        XCTAssertEqual(ourRO.status, 1)
        XCTAssertEqual(theirRO.status, 1)
        XCTAssertEqual(withoutTimings(ourRO.stdout), withoutTimings(theirRO.stdout))
        XCTAssertEqual(withoutTimings(ourRO.stdout), ["read 4096/4096 bytes at offset 0"])
        XCTAssertEqual(ourRO.stderrLines, ["strata: s.qcow2: -c 'write 0 4k': the image is open read-only (-r)",
                                           "strata: s.qcow2: -c 'discard 0 4k': the image is open read-only (-r)"])
        // A blank command does nothing, successfully.
        XCTAssertEqual(ok(try strata("io", "-c", "", "-c", " ", "s.qcow2"), "blank commands").stdout, "")
        XCTAssertEqual(try qemuIO("-c", "", "q.qcow2").status, 0)
    }

    func testConvertProgressGoesToStdoutLikeQemu() throws {
        try truncate("src.raw", to: 8 << 20)
        try write("src.raw", noise(1 << 20, seed: 3), at: 0)
        try write("src.raw", noise(100 << 10, seed: 4), at: 5 << 20)
        let ours = ok(try strata("convert", "-p", "-O", "qcow2", "src.raw", "s.qcow2"), "strata convert -p")
        let theirs = ok(try qemuImg("convert", "-p", "-O", "qcow2", "src.raw", "q.qcow2"), "qemu-img convert -p")
        for r in [ours, theirs] {
            XCTAssertTrue(r.stdout.hasPrefix("    (0.00/100%)\r"), r.stdout.debugDescription)
            XCTAssertTrue(r.stdout.hasSuffix("    (100.00/100%)\r\n"), r.stdout.debugDescription)
            XCTAssertEqual(r.stderr, "")
        }
        // Every update is the same field, rewritten in place.
        let fields = ours.stdout.dropLast().split(separator: "\r")
        XCTAssertTrue(fields.allSatisfy { $0.range(of: #"^    \([0-9]+\.[0-9]{2}/100%\)$"#, options: .regularExpression) != nil }, ours.stdout.debugDescription)
        // With -q there is no bar; an empty image prints exactly what qemu-img prints.
        XCTAssertEqual(ok(try strata("convert", "-p", "-q", "src.raw", "quiet.raw"), "-p -q").stdout, "")
        try truncate("empty.raw", to: 0)
        XCTAssertEqual(ok(try strata("convert", "-p", "empty.raw", "e1.raw"), "empty").stdout,
                       ok(try qemuImg("convert", "-p", "empty.raw", "e2.raw"), "empty").stdout)
    }

    func testConvertWorkersAndSparseSizeLikeQemu() throws {
        try truncate("src.raw", to: 8 << 20)
        try write("src.raw", noise(1 << 20, seed: 5), at: 0)
        try write("src.raw", noise(4096, seed: 6), at: 6 << 20)
        // -m alone is accepted (the writes stay in order); so is -m with -W.
        for (i, args) in [["-m", "4"], ["-m", "16", "-W"], ["-W"]].enumerated() {
            ok(try run(Self.strataBinary!, ["convert"] + args + ["-O", "qcow2", "src.raw", "m\(i).qcow2"]), "strata convert \(args)")
            ok(try run(Self.qemuImg!, ["convert"] + args + ["-O", "qcow2", "src.raw", "mq\(i).qcow2"]), "qemu-img convert \(args)")
            ok(try qemuImg("compare", "src.raw", "m\(i).qcow2"), "content of \(args)")
        }
        // Out of range, as qemu-img sees it.
        for m in ["0", "17", "-1"] {
            assertUserError(try strata("convert", "-m", m, "src.raw", "bad.raw"), mentions: ["-m", m])
            XCTAssertEqual(try qemuImg("convert", "-m", m, "src.raw", "bad.raw").status, 1, "qemu-img -m \(m)")
        }
        // -S must be a multiple of 512 up to 16 MiB.
        for sparse in ["100", "511", "1000", "17M", "x"] {
            assertUserError(try strata("convert", "-S", sparse, "src.raw", "bad.raw"), mentions: ["-S", "'\(sparse)'"])
            XCTAssertEqual(try qemuImg("convert", "-S", sparse, "src.raw", "bad.raw").status, 1, "qemu-img -S \(sparse)")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: path("bad.raw")))
        // -S 0 allocates everything, like qemu-img (one data run, nothing left as a hole).
        ok(try strata("convert", "-S", "0", "-O", "qcow2", "src.raw", "full.qcow2"), "strata -S 0")
        ok(try qemuImg("convert", "-S", "0", "-O", "qcow2", "src.raw", "fullq.qcow2"), "qemu-img -S 0")
        for image in ["full.qcow2", "fullq.qcow2"] {
            let map = json(try qemuImg("map", "--output", "json", image).stdout) as? [[String: Any]] ?? []
            XCTAssertFalse(map.isEmpty)
            XCTAssertTrue(map.allSatisfy { $0["data"] as? Bool == true && $0["present"] as? Bool == true }, "\(image): \(map)")
        }
        ok(try qemuImg("compare", "src.raw", "full.qcow2"), "content of -S 0")
        // A multiple of 512 is taken as it is.
        ok(try strata("convert", "-S", "1536", "-O", "qcow2", "src.raw", "s1536.qcow2"), "-S 1536")
        ok(try qemuImg("compare", "src.raw", "s1536.qcow2"), "content of -S 1536")
    }

    func testCacheFlagsMapOntoTheEngineModes() throws {
        try truncate("src.raw", to: 4 << 20)
        try write("src.raw", noise(1 << 20, seed: 7), at: 512 << 10)
        for (t, T) in [("none", "writethrough"), ("off", "unsafe"), ("writethrough", "none"), ("unsafe", "writeback")] {
            let image = "c-\(t).qcow2"
            ok(try strata("convert", "-t", t, "-T", T, "-O", "qcow2", "src.raw", image), "convert -t \(t) -T \(T)")
            ok(try strata("compare", "-T", t, "src.raw", image), "compare -T \(t)")
            XCTAssertEqual(try qemuImg("check", image).status, 0)
            ok(try strata("io", "-t", t, "-c", "write -P 9 0 4k", "-c", "read -P 9 0 4k", image), "io -t \(t)")
            ok(try qemuIO("-c", "read -P 9 0 4k", image), "after io -t \(t)")
        }
        ok(try strata("io", "-n", "-c", "write -P 8 4k 4k", "c-none.qcow2"), "io -n")
        ok(try qemuIO("-c", "read -P 8 4k 4k", "c-none.qcow2"), "after io -n")
        // Names qemu does not know are refused by both; directsync has no engine mode and is
        // refused clearly rather than weakened.
        assertUserError(try strata("convert", "-t", "bogus", "src.raw", "x.raw"), mentions: ["'bogus'", "-t"])
        XCTAssertEqual(try qemuImg("convert", "-t", "bogus", "src.raw", "qx.raw").status, 1)
        assertUserError(try strata("convert", "-T", "bogus", "src.raw", "x.raw"), mentions: ["'bogus'", "-T"])
        assertUserError(try strata("compare", "-T", "bogus", "src.raw", "c-none.qcow2"), status: 2, mentions: ["'bogus'"])
        XCTAssertEqual(try qemuImg("compare", "-T", "bogus", "src.raw", "c-none.qcow2").status, 2)
        assertUserError(try strata("io", "-t", "bogus", "-c", "read 0 1", "c-none.qcow2"), mentions: ["'bogus'"])
        XCTAssertEqual(try qemuIO("-t", "bogus", "-c", "read 0 1", "c-none.qcow2").status, 1)
        assertUserError(try strata("convert", "-t", "directsync", "src.raw", "x.raw"), mentions: ["directsync", "not supported"])
        XCTAssertFalse(FileManager.default.fileExists(atPath: path("x.raw")))
    }

    /// `compare -s` against `qemu-img compare -s`, on pairs that differ in size, in allocation
    /// only, in zero clusters against holes, and in content.
    func testCompareStrictMatchesQemu() throws {
        try truncate("a.raw", to: 8 << 20)
        try write("a.raw", noise(1 << 20, seed: 8), at: 0)
        try write("a.raw", noise(100 << 10, seed: 9), at: 5 << 20)
        try FileManager.default.copyItem(atPath: path("a.raw"), toPath: path("b.raw"))
        try write("b.raw", [9], at: 6 << 20)
        try FileManager.default.copyItem(atPath: path("a.raw"), toPath: path("long.raw"))
        try truncate("long.raw", to: 9 << 20)
        ok(try qemuImg("convert", "-O", "qcow2", "a.raw", "a.qcow2"), "a.qcow2")
        ok(try qemuImg("create", "-q", "-f", "qcow2", "empty.qcow2", "8M"), "empty")
        ok(try qemuImg("create", "-q", "-f", "qcow2", "zero.qcow2", "8M"), "zero")
        ok(try qemuIO("-c", "write -z 1M 64k", "zero.qcow2"), "zero cluster")
        ok(try qemuImg("create", "-q", "-f", "qcow2", "written0.qcow2", "8M"), "written zeroes")
        ok(try qemuIO("-c", "write -P 0 2M 64k", "written0.qcow2"), "zero data")
        try FileManager.default.copyItem(atPath: path("written0.qcow2"), toPath: path("written5.qcow2"))
        ok(try qemuIO("-c", "write -P 5 2M 512", "written5.qcow2"), "data")

        let pairs: [[String]] = [
            ["a.raw", "a.raw"], ["a.raw", "long.raw"], ["long.raw", "a.raw"], ["a.raw", "b.raw"],
            ["a.raw", "a.qcow2"], ["a.qcow2", "a.raw"], ["empty.qcow2", "zero.qcow2"], ["zero.qcow2", "empty.qcow2"],
            ["empty.qcow2", "written0.qcow2"], ["written0.qcow2", "zero.qcow2"], ["written0.qcow2", "written5.qcow2"],
        ]
        for pair in pairs {
            for flags in [["-s"], ["-s", "-p"], ["-s", "-q"]] {
                let ours = try run(Self.strataBinary!, ["compare"] + flags + pair)
                let theirs = try run(Self.qemuImg!, ["compare"] + flags + pair)
                XCTAssertEqual(ours.status, theirs.status, "compare \(flags) \(pair): \(ours.stderr)")
                XCTAssertEqual(ours.stdout, theirs.stdout, "compare \(flags) \(pair)")
                XCTAssertEqual(ours.stderr, "")
            }
        }
        // Without -s the same pairs compare by content only: allocation does not matter.
        for pair in pairs {
            let ours = try run(Self.strataBinary!, ["compare"] + pair)
            let theirs = try run(Self.qemuImg!, ["compare"] + pair)
            XCTAssertEqual(ours.status, theirs.status, "compare \(pair)")
            XCTAssertEqual(ours.stdout, theirs.stdout, "compare \(pair)")
        }
        XCTAssertEqual(try strata("compare", "-s", "a.raw", "long.raw").stdout, "Strict mode: Image size mismatch!\n")
        XCTAssertEqual(try strata("compare", "-s", "empty.qcow2", "written0.qcow2").status, 1)
        XCTAssertEqual(try strata("compare", "empty.qcow2", "written0.qcow2").status, 0)
    }

    /// `compare -p`: the bar on stdout, the result after it on the same line, then the line
    /// ended, byte for byte as qemu-img prints it.
    func testCompareProgressIsQemusToTheByte() throws {
        try truncate("a.raw", to: 8 << 20)
        try write("a.raw", noise(1 << 20, seed: 10), at: 0)
        try write("a.raw", noise(100 << 10, seed: 11), at: 5 << 20)
        try FileManager.default.copyItem(atPath: path("a.raw"), toPath: path("b.raw"))
        try write("b.raw", [9], at: 6 << 20)
        try FileManager.default.copyItem(atPath: path("a.raw"), toPath: path("long.raw"))
        try truncate("long.raw", to: 9 << 20)
        try truncate("empty.raw", to: 0)
        // A fully allocated copy: its zeroes must be read, in qemu-img's chunks.
        try write("full.raw", [UInt8](repeating: 0, count: 8 << 20))
        try write("full.raw", Array(try contents("a.raw")))
        for pair in [["a.raw", "a.raw"], ["a.raw", "b.raw"], ["a.raw", "long.raw"], ["empty.raw", "a.raw"], ["empty.raw", "empty.raw"],
                     ["a.raw", "full.raw"], ["full.raw", "b.raw"]] {
            let ours = try run(Self.strataBinary!, ["compare", "-p"] + pair)
            let theirs = try run(Self.qemuImg!, ["compare", "-p"] + pair)
            XCTAssertEqual(ours.status, theirs.status, "compare -p \(pair)")
            XCTAssertEqual(ours.stdout, theirs.stdout, "compare -p \(pair)")
            XCTAssertEqual(ours.stderr, "")
        }
    }
}
