import Foundation
import XCTest
import Strata

/// commit and rebase against qemu-img: the same chain is built twice (prefix `q` and `s`),
/// qemu-img works on one and strata on the other, and the results must read the same, name
/// the same backing files, and check clean.
final class ChainTests: ToolTestCase {
    // MARK: Helpers

    /// base (64M: 1M of 1s at 0, 3M of 9s at 10M) ← mid (2s at 1M, zeroes at 10M) ← top
    /// (3s across 512k..1.5M, an unaligned 5000 bytes of 4s at 20M): a chain of depth 3.
    func makeChain(_ p: String, in folder: String = "", baseSize: String = "64M", baseFormat: String = "qcow2") throws {
        let base = "\(p)base.\(baseFormat)"
        ok(try qemuImg("create", "-q", "-f", baseFormat, folder + base, baseSize), "base")
        ok(try qemuIO("-f", baseFormat, "-c", "write -P 1 0 1M", "-c", "write -P 9 10M 3M", folder + base), "base data")
        ok(try qemuImg("create", "-q", "-f", "qcow2", "-b", base, "-F", baseFormat, "\(folder)\(p)mid.qcow2", "64M"), "mid")
        ok(try qemuIO("-c", "write -P 2 1M 1M", "-c", "write -z 10M 64k", "\(folder)\(p)mid.qcow2"), "mid data")
        ok(try qemuImg("create", "-q", "-f", "qcow2", "-b", "\(p)mid.qcow2", "-F", "qcow2", "\(folder)\(p)top.qcow2"), "top")
        ok(try qemuIO("-c", "write -P 3 512k 1M", "-c", "write -P 4 20M 5000", "\(folder)\(p)top.qcow2"), "top data")
    }

    func assertSame(_ a: String, _ b: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try qemuImg("compare", a, b)
        XCTAssertEqual(r.status, 0, "\(a) and \(b) differ: \(r.stdout)\(r.stderr)", file: file, line: line)
    }

    /// `backing-filename` and `backing-filename-format` as qemu-img reports them.
    func backing(_ image: String) throws -> [String] {
        let info = json(try qemuImg("info", "--output=json", "-U", image).stdout) as? [String: Any] ?? [:]
        return [info["backing-filename"] as? String ?? "-", info["backing-filename-format"] as? String ?? "-"]
    }

    func assertClean(_ images: [String], file: StaticString = #filePath, line: UInt = #line) throws {
        for i in images {
            let r = try qemuImg("check", i)
            XCTAssertEqual(r.status, 0, "qemu-img check \(i): \(r.stdout)\(r.stderr)", file: file, line: line)
        }
    }

    /// The twin of each name: `q…` for `s…`.
    func twin(_ s: String) -> String { "q" + s.dropFirst() }

    /// Runs qemu-img on the q chain and strata on the s chain with the same arguments
    /// (`%` in an argument stands for the prefix).
    func both(_ command: String, _ args: [String]) throws {
        ok(try qemuImg([command] + args.map { $0.replacingOccurrences(of: "%", with: "q") }), "qemu-img \(command)")
        ok(try strata([command] + args.map { $0.replacingOccurrences(of: "%", with: "s") }), "strata \(command)")
    }

    /// Both chains read the same, image by image, and name the same backing files.
    func assertTwins(_ images: [String], file: StaticString = #filePath, line: UInt = #line) throws {
        for s in images {
            try assertSame(twin(s), s, file: file, line: line)
            XCTAssertEqual(try backing(s).map { $0.replacingOccurrences(of: "sbase", with: "qbase").replacingOccurrences(of: "smid", with: "qmid").replacingOccurrences(of: "snew", with: "qnew") },
                           try backing(twin(s)), "backing of \(s)", file: file, line: line)
        }
        try assertClean(images + images.map(twin), file: file, line: line)
    }

    // MARK: commit

    func testCommitWritesIntoTheBackingFileAndEmptiesTheOverlayLikeQemuImg() throws {
        try makeChain("q")
        try makeChain("s")
        let before = try strata("compare", "stop.qcow2", "qtop.qcow2")
        XCTAssertEqual(before.status, 0)
        try both("commit", ["%top.qcow2"])
        try assertTwins(["stop.qcow2", "smid.qcow2", "sbase.qcow2"])
        // The overlay is empty: it holds no cluster and reads its backing file.
        let map = try strata("map", "--output=json", "stop.qcow2").stdout
        XCTAssertFalse(map.contains("\"depth\": 0, \"present\": true"), map)
        ok(try qemuIO("-c", "read -P 3 512k 1M", "-c", "read -P 4 20M 5000", "smid.qcow2"), "the data is in mid")
        // A second run has nothing left to do, and changes nothing.
        try both("commit", ["%top.qcow2"])
        try assertTwins(["stop.qcow2", "smid.qcow2", "sbase.qcow2"])
    }

    func testCommitWithBaseImpliesKeepingTheOverlay() throws {
        try makeChain("q")
        try makeChain("s")
        try both("commit", ["-b", "%base.qcow2", "%top.qcow2"])
        try assertTwins(["stop.qcow2", "sbase.qcow2"])
        XCTAssertEqual(try backing("stop.qcow2"), ["smid.qcow2", "qcow2"], "the overlay's header is unchanged")
        ok(try qemuIO("-c", "read -P 3 512k 1M", "-c", "read -P 2 1536k 512k", "-c", "read -P 0 10M 64k", "sbase.qcow2"), "top and mid reached base")
        ok(try qemuIO("-c", "read -P 3 512k 1M", "stop.qcow2"), "the overlay was not emptied")
    }

    func testCommitKeepsTheOverlayWithD() throws {
        try makeChain("q")
        try makeChain("s")
        try both("commit", ["-d", "%top.qcow2"])
        try assertTwins(["stop.qcow2", "smid.qcow2"])
        let map = try strata("map", "--output=json", "stop.qcow2").stdout
        XCTAssertTrue(map.contains("\"depth\": 0, \"present\": true"), map)
    }

    func testCommitGrowsASmallerBackingFile() throws {
        try makeChain("q", baseSize: "16M")
        try makeChain("s", baseSize: "16M")
        try both("commit", ["-b", "%base.qcow2", "%top.qcow2"])
        XCTAssertEqual(try virtualSize("sbase.qcow2"), 64 << 20)
        try assertTwins(["sbase.qcow2", "stop.qcow2"])
    }

    func testCommitIntoARawBackingFile() throws {
        try makeChain("q", baseFormat: "raw")
        try makeChain("s", baseFormat: "raw")
        try both("commit", ["-q", "-b", "%base.raw", "%top.qcow2"])
        try assertSame("qbase.raw", "sbase.raw")
        try assertSame("qtop.qcow2", "stop.qcow2")
        try assertClean(["smid.qcow2", "stop.qcow2"])
    }

    func testCommitMistakesAreOneClearLine() throws {
        try makeChain("s")
        ok(try qemuImg("create", "-q", "-f", "qcow2", "alone.qcow2", "1M"), "alone")
        assertUserError(try strata("commit", "alone.qcow2"), mentions: ["alone.qcow2", "no backing file to commit into"])
        assertUserError(try strata("commit", "-b", "alone.qcow2", "stop.qcow2"), mentions: ["'alone.qcow2' is not in the backing chain"])
        ok(try qemuImg("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", "orphan.qcow2", "1M"), "orphan")
        assertUserError(try strata("commit", "orphan.qcow2"), mentions: ["orphan.qcow2", "backing file 'gone.qcow2' is missing"])
        assertUserError(try strata("commit", "nothere.qcow2"), mentions: ["nothere.qcow2"])
        try write("r.raw", [UInt8](repeating: 1, count: 4096))
        assertUserError(try strata("commit", "-f", "raw", "r.raw"), mentions: ["r.raw", "no backing file"])
        // Nothing was written anywhere.
        try assertClean(["stop.qcow2", "smid.qcow2", "sbase.qcow2"])
        ok(try qemuIO("-c", "read -P 3 512k 1M", "stop.qcow2"), "top untouched")
    }

    func testCommitIntoATemplateIsRefused() throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "tmpl.qcow2", "1M"), "template")
        ok(try qemuIO("-c", "write -P 7 0 64k", "tmpl.qcow2"), "template data")
        let t = try Qcow2Image(path: path("tmpl.qcow2"), options: OpenOptions(writable: true, format: .qcow2))
        try t.markAsTemplate()
        try t.close()
        ok(try qemuImg("create", "-q", "-f", "qcow2", "-b", "tmpl.qcow2", "-F", "qcow2", "clone.qcow2"), "clone")
        ok(try qemuIO("-c", "write -P 8 0 4k", "clone.qcow2"), "clone data")
        assertUserError(try strata("commit", "clone.qcow2"), mentions: ["tmpl.qcow2", "is a template; its linked clones read through it"])
        ok(try qemuIO("-c", "read -P 8 0 4k", "clone.qcow2"), "the clone keeps its data")
        ok(try qemuIO("-c", "read -P 7 0 64k", "tmpl.qcow2"), "the template is unchanged")
    }

    // MARK: rebase

    func testSafeRebaseKeepsTheContentLikeQemuImg() throws {
        for p in ["q", "s"] {
            try makeChain(p)
            ok(try qemuImg("create", "-q", "-f", "qcow2", "\(p)new.qcow2", "32M"), "new base")
            ok(try qemuIO("-c", "write -P 1 0 768k", "-c", "write -P 6 4M 1M", "\(p)new.qcow2"), "new base data")
        }
        try both("rebase", ["-b", "%new.qcow2", "-F", "qcow2", "%top.qcow2"])
        try assertTwins(["stop.qcow2"])
        XCTAssertEqual(try backing("stop.qcow2"), ["snew.qcow2", "qcow2"])
        ok(try qemuIO("-c", "read -P 1 0 512k", "-c", "read -P 3 512k 1M", "-c", "read -P 2 1536k 512k", "-c", "read -P 0 4M 1M",
                      "-c", "read -P 0 10240k 64k", "-c", "read -P 9 10304k 64k", "stop.qcow2"), "strata's result reads right")
        // A second run changes nothing.
        try both("rebase", ["-b", "%new.qcow2", "-F", "qcow2", "%top.qcow2"])
        try assertTwins(["stop.qcow2"])
    }

    func testRebaseOntoAnImageOfTheOldChain() throws {
        try makeChain("q")
        try makeChain("s")
        try both("rebase", ["-b", "%base.qcow2", "-F", "qcow2", "%top.qcow2"])
        try assertTwins(["stop.qcow2"])
        XCTAssertEqual(try backing("stop.qcow2"), ["sbase.qcow2", "qcow2"])
    }

    func testFlattenPullsEverythingInLikeQemuImg() throws {
        try makeChain("q")
        try makeChain("s")
        try both("rebase", ["-b", "", "%top.qcow2"])
        try assertTwins(["stop.qcow2"])
        XCTAssertEqual(try backing("stop.qcow2"), ["-", "-"])
        try FileManager.default.removeItem(atPath: path("smid.qcow2"))
        try FileManager.default.removeItem(atPath: path("sbase.qcow2"))
        try assertSame("qtop.qcow2", "stop.qcow2")
        // Again, on an image with no backing file: nothing to do, like qemu-img.
        try both("rebase", ["-b", "", "%top.qcow2"])
        try assertSame("qtop.qcow2", "stop.qcow2")
    }

    func testRebaseOntoARawFileAndRelativeNamesInTheImageFolder() throws {
        for p in ["q", "s"] {
            try FileManager.default.createDirectory(atPath: path("\(p)d"), withIntermediateDirectories: true)
            try makeChain("", in: "\(p)d/")
            try truncate("\(p)d/new.raw", to: 64 << 20)
            try write("\(p)d/new.raw", [UInt8](repeating: 9, count: 1 << 20), at: 10 << 20)
        }
        // "new.raw" is the file next to the image, not in the working directory.
        try both("rebase", ["-b", "new.raw", "-F", "raw", "%d/top.qcow2"])
        try assertSame("qd/top.qcow2", "sd/top.qcow2")
        XCTAssertEqual(try backing("sd/top.qcow2"), try backing("qd/top.qcow2"))
        XCTAssertEqual(try backing("sd/top.qcow2"), ["new.raw", "raw"])
        try assertClean(["sd/top.qcow2"])
    }

    func testUnsafeRebaseOnlyRewritesTheHeader() throws {
        try makeChain("q")
        try makeChain("s")
        // The backing file moved: -u points at its new place, without opening the old one.
        for p in ["q", "s"] {
            try FileManager.default.moveItem(atPath: path("\(p)mid.qcow2"), toPath: path("\(p)moved.qcow2"))
        }
        assertUserError(try strata("commit", "stop.qcow2"), mentions: ["stop.qcow2", "backing file 'smid.qcow2' is missing"])
        try both("rebase", ["-u", "-b", "%moved.qcow2", "-F", "qcow2", "%top.qcow2"])
        XCTAssertEqual(try backing("stop.qcow2"), ["smoved.qcow2", "qcow2"])
        try assertSame("qtop.qcow2", "stop.qcow2")
        try assertClean(["stop.qcow2"])
        let chain = ok(try strata("info", "--backing-chain", "stop.qcow2"), "info --backing-chain").stdout
        XCTAssertTrue(chain.contains("image: smoved.qcow2") && chain.contains("image: sbase.qcow2"), chain)
    }

    func testRebaseMistakesAreOneClearLine() throws {
        try makeChain("s")
        assertUserError(try strata("rebase", "stop.qcow2"), mentions: ["-b"])
        assertUserError(try strata("rebase", "-b", "sbase.qcow2", "stop.qcow2"), mentions: ["-F"])
        assertUserError(try strata("rebase", "-b", "nope.qcow2", "-F", "qcow2", "stop.qcow2"), mentions: ["stop.qcow2", "new backing file 'nope.qcow2' does not exist"])
        assertUserError(try strata("rebase", "-b", "stop.qcow2", "-F", "qcow2", "stop.qcow2"), mentions: ["its own backing file"])
        try write("r.raw", [UInt8](repeating: 1, count: 4096))
        assertUserError(try strata("rebase", "-f", "raw", "-b", "", "r.raw"), mentions: ["r.raw", "raw images have no backing file"])
        try FileManager.default.removeItem(atPath: path("smid.qcow2"))
        assertUserError(try strata("rebase", "-b", "sbase.qcow2", "-F", "qcow2", "stop.qcow2"), mentions: ["smid.qcow2", "is missing", "rebase -u"])
        XCTAssertEqual(try backing("stop.qcow2"), ["smid.qcow2", "qcow2"], "nothing changed")
    }

    /// A new backing file that reads through the image itself is refused in both modes (qemu-img
    /// accepts it with -u, and the image no longer opens); a chain that loops is not committed.
    func testRebaseRefusesLoopsAndCommitDetectsThem() throws {
        try makeChain("s")
        ok(try qemuImg("create", "-q", "-f", "qcow2", "-b", "stop.qcow2", "-F", "qcow2", "above.qcow2"), "overlay of top")
        for u in [[], ["-u"]] {
            assertUserError(try strata(["rebase"] + u + ["-b", "above.qcow2", "-F", "qcow2", "smid.qcow2"]), mentions: ["smid.qcow2", "would loop"])
            assertUserError(try strata(["rebase"] + u + ["-b", "smid.qcow2", "-F", "qcow2", "smid.qcow2"]), mentions: ["its own backing file"])
        }
        XCTAssertEqual(try backing("smid.qcow2"), ["sbase.qcow2", "qcow2"])
        ok(try qemuImg("rebase", "-u", "-b", "above.qcow2", "-F", "qcow2", "smid.qcow2"), "qemu-img makes the loop")
        assertUserError(try strata("commit", "stop.qcow2"), mentions: ["loops"])
        assertUserError(try strata("commit", "-b", "sbase.qcow2", "stop.qcow2"), mentions: ["loops"])
        // -u mends it.
        ok(try strata("rebase", "-u", "-b", "sbase.qcow2", "-F", "qcow2", "smid.qcow2"), "mend")
        ok(try strata("commit", "-q", "stop.qcow2"), "commit after mending")
        try assertClean(["stop.qcow2", "smid.qcow2", "sbase.qcow2"])
    }

    // MARK: Cost

    /// A 4 TiB chain with a few MiB written: commit, rebase and flatten follow the data.
    func testHugeSparseChainsCostWhatIsAllocated() throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "b.qcow2", "4T"), "base")
        ok(try qemuIO("-c", "write -P 1 1G 1M", "-c", "write -P 5 4095G 1M", "b.qcow2"), "base data")
        ok(try qemuImg("create", "-q", "-f", "qcow2", "n.qcow2", "4T"), "new base")
        ok(try qemuIO("-c", "write -P 1 1G 512k", "n.qcow2"), "new base data")
        for t in ["t1", "t2", "t3"] {
            ok(try qemuImg("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "\(t).qcow2"), "overlay")
            ok(try qemuIO("-c", "write -P 2 3T 1M", "-c", "write -P 3 100k 1M", "\(t).qcow2"), "overlay data")
        }
        func timed(_ args: String...) throws -> Double {
            let start = Date()
            ok(try strata(args), args.joined(separator: " "))
            return Date().timeIntervalSince(start)
        }
        let rebase = try timed("rebase", "-b", "n.qcow2", "-F", "qcow2", "t1.qcow2")
        let flatten = try timed("rebase", "-b", "", "t2.qcow2")
        let commit = try timed("commit", "-q", "t3.qcow2")
        XCTAssertLessThan(rebase, 1.0)
        XCTAssertLessThan(flatten, 1.0)
        XCTAssertLessThan(commit, 1.0)
        try assertSame("t1.qcow2", "t2.qcow2")
        ok(try qemuIO("-c", "read -P 1 1G 1M", "-c", "read -P 5 4095G 1M", "-c", "read -P 2 3T 1M", "-c", "read -P 3 100k 1M", "t1.qcow2"), "rebased")
        ok(try qemuIO("-c", "read -P 2 3T 1M", "-c", "read -P 3 100k 1M", "-c", "read -P 5 4095G 1M", "b.qcow2"), "committed")
        try assertClean(["t1.qcow2", "t2.qcow2", "t3.qcow2", "b.qcow2"])
    }
}
