import Foundation
import XCTest

/// The mistakes a new user makes first: sizes, `-o` lists, settings given twice, the root
/// command. Each is refused as qemu-img refuses it, in one `strata: ` line that says what is
/// wrong and names the file when there is one.
final class ArgumentErrorTests: ToolTestCase {
    /// Asserts one error line whose message (after `strata: ` and, when `file` is given,
    /// `FILE: `) starts in lower case.
    func assertErrorLine(_ r: RunResult, status: Int32 = 1, file: String?, mentions: [String] = [],
                         _ what: String, line: UInt = #line) {
        assertUserError(r, status: status, mentions: mentions, line: line)
        var message = Substring(r.stderr.dropFirst("strata: ".count))
        if let file {
            XCTAssertTrue(message.hasPrefix("\(file): "), "\(what): the error must name \(file) first: \(r.stderr)", line: line)
            message = message.dropFirst(file.count + 2)
        }
        XCTAssertFalse(message.first?.isUppercase ?? true, "\(what): the message starts in lower case: \(r.stderr)", line: line)
    }

    func testSettingsGivenTwiceAreRefusedLikeQemu() throws {
        ok(try qemuImg("create", "-q", "-f", "raw", "b.raw", "1M"), "backing")
        let cases: [(args: [String], mention: String)] = [
            (["-f", "qcow2", "-o", "size=2G", "X", "1G"], "image size"),
            (["-f", "raw", "-o", "size=1M", "X", "1M"], "image size"),
            (["-f", "qcow2", "-o", "backing_file=b.raw,backing_fmt=raw", "-b", "b.raw", "X", "1M"], "backing file"),
            (["-f", "qcow2", "-o", "backing_fmt=raw", "-F", "raw", "-b", "b.raw", "X", "1M"], "backing format"),
        ]
        for c in cases {
            let ours = try run(Self.strataBinary!, ["create"] + c.args.map { $0 == "X" ? "s.img" : $0 })
            assertErrorLine(ours, file: "s.img", mentions: [c.mention, "only once"], "create \(c.args)")
            XCTAssertFalse(FileManager.default.fileExists(atPath: path("s.img")), "nothing created for \(c.args)")
        }
        // qemu-img refuses the size given twice (and, for -b against -o backing_file, silently
        // takes -b: we refuse rather than guess).
        let theirs = try qemuImg("create", "-f", "qcow2", "-o", "size=2G", "q.img", "1G")
        XCTAssertEqual(theirs.status, 1)
        XCTAssertTrue(theirs.stderr.contains("The image size must be specified only once"), theirs.stderr)
    }

    func testEmptyAndDanglingOptionListsAreRefusedLikeQemu() throws {
        for list in ["", ",", ",,", "cluster_size=4k,", "cluster_size=4k,,,"] {
            let ours = try strata("create", "-f", "qcow2", "-o", list, "s.qcow2", "1M")
            assertErrorLine(ours, file: nil, mentions: ["invalid option list '\(list)'"], "-o '\(list)'")
            let theirs = try qemuImg("create", "-f", "qcow2", "-o", list, "q.qcow2", "1M")
            XCTAssertEqual(theirs.status, 1, "qemu-img -o '\(list)'")
            XCTAssertTrue(theirs.stderr.contains("Invalid option list"), theirs.stderr)
            let convert = try strata("convert", "-O", "qcow2", "-o", list, "s.qcow2", "t.qcow2")
            assertErrorLine(convert, file: nil, mentions: ["invalid option list"], "convert -o '\(list)'")
        }
        // An escaped comma at the end is a comma in the value, not a dangling one.
        let escaped = try strata("create", "-f", "qcow2", "-o", "cluster_size=4k,,", "s.qcow2", "1M")
        assertErrorLine(escaped, file: "s.qcow2", mentions: ["'4k,'"], "-o cluster_size=4k,,")
    }

    func testBadSizesSayWhatIsWrongWithThem() throws {
        let cases: [(args: [String], file: String?, mentions: [String])] = [
            // A negative SIZE looks like an option to the parser, but is a size.
            (["create", "-f", "qcow2", "s.qcow2", "-1"], "s.qcow2", ["'-1'", "negative"]),
            (["create", "-f", "qcow2", "s.qcow2", "--", "-1"], "s.qcow2", ["'-1'", "negative"]),
            (["create", "-f", "qcow2", "s.qcow2", "100E"], "s.qcow2", ["'100E'", "too large"]),
            (["create", "-f", "qcow2", "s.qcow2", "8E"], "s.qcow2", ["'8E'", "too large"]),
            (["create", "-f", "qcow2", "s.qcow2", "12X"], "s.qcow2", ["'12X'", "expected a number"]),
            (["create", "-f", "qcow2", "-o", "size=100E", "s.qcow2"], "s.qcow2", ["'100E'", "too large"]),
            (["create", "-f", "qcow2", "-o", "refcount_bits=x", "s.qcow2", "1M"], "s.qcow2", ["'x'", "refcount_bits", "expected a number"]),
            (["create", "-f", "qcow2", "-o", "cluster_size=-4k", "s.qcow2", "1M"], "s.qcow2", ["'-4k'", "negative"]),
            (["map", "--start-offset", "-1", "r.raw"], nil, ["start offset", "'-1'", "negative"]),
            (["map", "--start-offset=-1", "r.raw"], nil, ["start offset", "'-1'", "negative"]),
            (["map", "--max-length", "100E", "r.raw"], nil, ["max length", "'100E'", "too large"]),
            (["resize", "r.raw", "12Q"], "r.raw", ["'12Q'", "expected a number"]),
        ]
        ok(try strata("create", "-q", "-f", "raw", "r.raw", "1M"), "create r.raw")
        for c in cases {
            assertErrorLine(try run(Self.strataBinary!, c.args), file: c.file, mentions: c.mentions, "\(c.args)")
            // qemu-img refuses every one of them too.
            XCTAssertEqual(try run(Self.qemuImg!, c.args.map { $0 == "s.qcow2" ? "q.qcow2" : $0 }).status, 1, "qemu-img \(c.args)")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: path("s.qcow2")))
        // A refcount width that is a number but not a power of two says so.
        assertErrorLine(try strata("create", "-f", "qcow2", "-o", "refcount_bits=3", "s.qcow2", "1M"),
                        file: "s.qcow2", mentions: ["power of two"], "refcount_bits=3")
    }

    func testRootCommandVersionAndUnknownCommands() throws {
        let bare = try strata()
        assertErrorLine(bare, file: nil, mentions: ["strata --help"], "no arguments")
        XCTAssertEqual(try qemuImg().status, 1, "qemu-img without arguments fails too")

        for flag in ["--version", "-V"] {
            let r = ok(try strata(flag), flag)
            XCTAssertNotNil(r.stdout.range(of: #"^strata version [0-9]+\.[0-9]+\.[0-9]+\n$"#, options: .regularExpression), "\(flag): \(r.stdout)")
            XCTAssertEqual(r.stderr, "")
        }

        // qemu-img's dd, which strata does not have.
        let unknown = try strata("dd", "x.qcow2")
        XCTAssertEqual(unknown.status, 1)
        XCTAssertEqual(unknown.stderr, "strata: unknown command 'dd' (see 'strata --help')\n")
        XCTAssertEqual(unknown.stdout, "")
        XCTAssertEqual(try qemuImg("nosuch", "x.qcow2").status, 1)
        let helpUnknown = try strata("help", "dd")
        XCTAssertEqual(helpUnknown.status, 1)
        XCTAssertEqual(helpUnknown.stderr, "strata: unknown command 'dd' (see 'strata --help')\n")

        // Known commands keep their help.
        XCTAssertTrue(ok(try strata("help", "create"), "help create").stdout.contains("USAGE: strata create"))
        XCTAssertTrue(ok(try strata("create", "--help"), "create --help").stdout.contains("USAGE: strata create"))
    }

    /// A table of typical mistakes across every subcommand: each gives exactly one `strata: `
    /// line on stderr, naming the file first when the mistake is about one, in lower case,
    /// with nothing on stdout and no crash; exit 1 (2 for compare).
    func testEveryTypicalMistakeGivesOneLineNamingItsFile() throws {
        ok(try strata("create", "-q", "-f", "raw", "r.raw", "1M"), "create r.raw")
        ok(try strata("create", "-q", "-f", "qcow2", "q.qcow2", "1M"), "create q.qcow2")
        let table: [(args: [String], file: String?)] = [
            ([], nil),
            (["dd", "q.qcow2"], nil),
            (["bench", "-c", "0", "q.qcow2"], nil),
            (["bench", "-s", "2M", "q.qcow2"], "q.qcow2"),
            (["bench", "nope.qcow2"], "nope.qcow2"),
            (["check", "missing.qcow2"], "missing.qcow2"),
            (["check", "-r", "some", "q.qcow2"], nil),
            (["--bogus"], nil),
            (["create"], nil),
            (["create", "-Z", "n.qcow2", "1M"], nil),
            (["create", "-f", "vmdk", "n.img", "1M"], nil),
            (["create", "-f", "qcow2", "n.qcow2", "1M", "2M"], nil),
            (["create", "-f", "qcow2", "n.qcow2"], "n.qcow2"),
            (["create", "-f", "qcow2", "n.qcow2", "-1"], "n.qcow2"),
            (["create", "-f", "qcow2", "-o", "cluster_size=3000", "n.qcow2", "1M"], "n.qcow2"),
            (["create", "-f", "qcow2", "-o", "nosuch=1", "n.qcow2", "1M"], "n.qcow2"),
            (["create", "-f", "qcow2", "-o", "lazy_refcounts", "n.qcow2", "1M"], "n.qcow2"),
            (["create", "-f", "qcow2", "-o", "compat=0.10,lazy_refcounts=on", "n.qcow2", "1M"], "n.qcow2"),
            (["create", "-f", "qcow2", "-b", "r.raw", "n.qcow2"], "n.qcow2"),
            (["create", "-f", "qcow2", "-b", "missing.qcow2", "-F", "qcow2", "n.qcow2"], "missing.qcow2"),
            (["create", "-f", "raw", "-b", "r.raw", "n.img"], "n.img"),
            (["info"], nil),
            (["info", "r.raw", "q.qcow2"], nil),
            (["info", "nope.qcow2"], "nope.qcow2"),
            (["info", "-f", "qcow2", "r.raw"], "r.raw"),
            (["info", "--output", "xml", "r.raw"], nil),
            (["map", "nope.qcow2"], "nope.qcow2"),
            (["map", "--max-length", "x", "r.raw"], nil),
            (["map", "-f", "qcow2", "r.raw"], "r.raw"),
            (["convert", "r.raw"], nil),
            (["convert", "-O", "qcow2", "nope.raw", "o.qcow2"], "nope.raw"),
            (["convert", "-O", "qcow2", "-o", "size=1M", "r.raw", "o.qcow2"], "o.qcow2"),
            (["convert", "-O", "qcow2", "-o", "cluster_size=1k,extended_l2=on", "r.raw", "o.qcow2"], "o.qcow2"),
            (["convert", "-S", "100", "r.raw", "o.raw"], nil),
            (["convert", "-S", "-1", "r.raw", "o.raw"], nil),
            (["convert", "-m", "0", "r.raw", "o.raw"], nil),
            (["convert", "-m", "x", "r.raw", "o.raw"], nil),
            (["convert", "-t", "bogus", "r.raw", "o.raw"], nil),
            (["convert", "-T", "directsync", "r.raw", "o.raw"], nil),
            (["convert", "r.raw", "r.raw"], "r.raw"),
            (["compare", "r.raw"], nil),
            (["compare", "-x", "r.raw", "r.raw"], nil),
            (["compare", "-T", "bogus", "r.raw", "r.raw"], nil),
            (["compare", "r.raw", "nope.raw"], "nope.raw"),
            (["compare", "-f", "qcow2", "r.raw", "q.qcow2"], "r.raw"),
            (["resize", "q.qcow2"], nil),
            (["resize", "q.qcow2", "-Z"], nil),
            (["resize", "q.qcow2", "12Q"], "q.qcow2"),
            (["resize", "q.qcow2", "1000"], "q.qcow2"),
            (["resize", "q.qcow2", "--shrink", "0"], "q.qcow2"),
            (["resize", "nope.qcow2", "1G"], "nope.qcow2"),
            (["io", "q.qcow2"], nil),
            (["io", "-U", "-c", "read 0 1", "q.qcow2"], nil),
            (["io", "-t", "bogus", "-c", "read 0 1", "q.qcow2"], nil),
            (["io", "-c", "read 0 1", "nope.qcow2"], "nope.qcow2"),
            (["io", "-c", "frobnicate", "q.qcow2"], "q.qcow2"),
            (["io", "-c", "read 0 1x", "q.qcow2"], "q.qcow2"),
            (["io", "-c", "write -P 300 0 1", "q.qcow2"], "q.qcow2"),
            (["io", "-r", "-c", "write 0 512", "q.qcow2"], "q.qcow2"),
            (["serve", "--socket", "s.sock", "--port", "1", "q.qcow2"], nil),
            (["serve", "--socket", "s.sock", "nope.qcow2"], "nope.qcow2"),
        ]
        for c in table {
            let status: Int32 = c.args.first == "compare" ? 2 : 1
            assertErrorLine(try run(Self.strataBinary!, c.args), status: status, file: c.file, "strata \(c.args)")
        }
        for name in ["n.qcow2", "n.img", "o.qcow2", "o.raw"] {
            XCTAssertFalse(FileManager.default.fileExists(atPath: path(name)), "\(name) must not be created by a refused command")
        }
    }
}
