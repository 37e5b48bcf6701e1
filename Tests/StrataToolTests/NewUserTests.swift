import Foundation
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// What a new user hit first, each as the command they typed, with qemu-img beside it.
final class NewUserTests: ToolTestCase {
    func size(_ name: String) throws -> UInt64 {
        (try FileManager.default.attributesOfItem(atPath: path(name))[.size] as? NSNumber)?.uint64Value ?? 0
    }

    /// `create` over existing files gives a fresh blank image every time, like qemu-img, and
    /// the same file qemu-img would make.
    func testCreateOverExistingFilesGivesAFreshImage() throws {
        // Twice in a row: no false lock conflict.
        ok(try strata("create", "-q", "-f", "qcow2", "x.qcow2", "1M"), "first create")
        ok(try qemuIO("-c", "write -P 5 0 64k", "x.qcow2"), "data")
        ok(try strata("create", "-q", "-f", "qcow2", "x.qcow2", "1M"), "second create")
        XCTAssertEqual(try qemuImg("check", "x.qcow2").status, 0)
        ok(try qemuIO("-c", "read -P 0 0 64k", "x.qcow2"), "the old data is gone")
        // Same length as qemu-img's own.
        ok(try qemuImg("create", "-q", "-f", "qcow2", "q.qcow2", "1M"), "qemu-img create")
        XCTAssertEqual(try size("x.qcow2"), try size("q.qcow2"))

        // qcow2 over a raw file with data.
        try write("r.raw", [UInt8](repeating: 0xab, count: 1 << 20))
        ok(try strata("create", "-q", "-f", "qcow2", "r.raw", "2M"), "qcow2 over raw")
        XCTAssertEqual(try qemuImg("check", "r.raw").status, 0)

        // raw over a former qcow2 with a backing file: no byte and no format survives.
        ok(try qemuImg("create", "-q", "-f", "qcow2", "base.qcow2", "1M"), "base")
        ok(try qemuImg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"), "overlay")
        ok(try strata("create", "-q", "-f", "raw", "top.qcow2", "1M"), "raw over qcow2")
        let info = try qemuImg("info", "top.qcow2")
        XCTAssertTrue(info.stdout.contains("file format: raw") && !info.stdout.contains("backing"), info.stdout)
        XCTAssertEqual(try contents("top.qcow2"), Data(count: 1 << 20))
    }

    func testCreateRefusesAnImageInUseAndLeavesIt() throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "held.qcow2", "1M"), "create")
        ok(try qemuIO("-c", "write -P 3 0 64k", "held.qcow2"), "fill")
        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: Self.qemuIO!)
        holder.arguments = ["-f", "qcow2", path("held.qcow2"), "-c", "sleep 3000"]
        try holder.run()
        defer { holder.waitUntilExit() }
        usleep(500_000)
        for format in ["qcow2", "raw"] {
            let r = try strata("create", "-q", "-f", format, "held.qcow2", "2M")
            assertUserError(r, mentions: ["held.qcow2", "lock"])
        }
        assertUserError(try strata("convert", "-O", "raw", "held.qcow2", "held.qcow2"), mentions: ["held.qcow2"])
        holder.waitUntilExit()
        ok(try qemuIO("-c", "read -P 3 0 64k", "held.qcow2"), "untouched")

        // Held by strata serve: refused as well; once the server is gone, create works.
        let server = Process()
        server.executableURL = URL(fileURLWithPath: Self.strataBinary!)
        server.arguments = ["serve", "--socket", path("s.sock"), path("held.qcow2")]
        server.standardError = FileHandle.nullDevice
        server.standardOutput = FileHandle.nullDevice
        try server.run()
        for _ in 0..<200 where !FileManager.default.fileExists(atPath: path("s.sock")) { usleep(20_000) }
        assertUserError(try strata("create", "-q", "-f", "qcow2", "held.qcow2", "2M"), mentions: ["held.qcow2", "lock"])
        server.terminate()
        server.waitUntilExit()
        ok(try qemuIO("-c", "read -P 3 0 64k", "held.qcow2"), "still untouched")
        ok(try strata("create", "-q", "-f", "qcow2", "held.qcow2", "2M"), "free again")
    }

    /// A refused create leaves nothing behind; an existing file keeps its bytes.
    func testRefusedCreateLeavesNoFile() throws {
        let r = try strata("create", "-q", "-f", "qcow2", "huge.qcow2", "64P")
        assertUserError(r, mentions: ["huge.qcow2", "L1 table"])
        XCTAssertFalse(FileManager.default.fileExists(atPath: path("huge.qcow2")))
        try write("keep.raw", Array("keep".utf8))
        assertUserError(try strata("create", "-q", "-f", "qcow2", "keep.raw", "64P"), mentions: ["keep.raw"])
        XCTAssertEqual(try contents("keep.raw"), Data("keep".utf8))
    }

    /// convert into an existing file: truncated first (no stale bytes where the source has
    /// holes), or written over with -n (holes written as zeroes).
    func testConvertIntoExistingFilesLeavesNoStaleBytes() throws {
        try truncate("src.raw", to: 4 << 20)
        try write("src.raw", noise(100_000, seed: 1), at: 1 << 20)
        try write("dst.raw", [UInt8](repeating: 0x77, count: 4 << 20))
        ok(try strata("convert", "-f", "raw", "-O", "raw", "src.raw", "dst.raw"), "convert over raw")
        ok(try qemuImg("compare", "-f", "raw", "-F", "raw", "src.raw", "dst.raw"), "identical")
        ok(try strata("create", "-q", "-f", "qcow2", "dst.qcow2", "1M"), "existing qcow2")
        ok(try qemuIO("-c", "write -P 9 0 1M", "dst.qcow2"), "fill")
        ok(try strata("convert", "-f", "raw", "-O", "qcow2", "src.raw", "dst.qcow2"), "convert over qcow2")
        ok(try qemuImg("compare", "-f", "raw", "-F", "qcow2", "src.raw", "dst.qcow2"), "identical")
        XCTAssertEqual(try qemuImg("check", "dst.qcow2").status, 0)

        // -n: the target stays (format, size), its old bytes do not.
        ok(try qemuImg("create", "-q", "-f", "qcow2", "n.qcow2", "8M"), "target")
        ok(try qemuIO("-c", "write -P 9 0 8M", "n.qcow2"), "fill")
        ok(try strata("convert", "-n", "-f", "raw", "-O", "qcow2", "src.raw", "n.qcow2"), "convert -n")
        ok(try qemuImg("convert", "-O", "raw", "n.qcow2", "n.raw"), "read back")
        XCTAssertEqual(try contents("n.raw").prefix(4 << 20), try contents("src.raw"), "the source's bytes, holes as zeroes")
        ok(try qemuIO("-c", "read -P 9 4M 4M", "n.qcow2"), "past the source's end the target keeps its bytes, as with qemu-img")
        XCTAssertEqual(try qemuImg("check", "n.qcow2").status, 0)
        XCTAssertEqual(try virtualSize("n.qcow2"), 8 << 20)
        assertUserError(try strata("convert", "-n", "-O", "qcow2", "-o", "cluster_size=4k", "src.raw", "n.qcow2"), mentions: ["n.qcow2", "-o"])
        assertUserError(try strata("convert", "-n", "-O", "qcow2", "src.raw", "missing.qcow2"), mentions: ["missing.qcow2"])
        ok(try qemuImg("create", "-q", "-f", "qcow2", "small.qcow2", "1M"), "small target")
        assertUserError(try strata("convert", "-n", "-f", "raw", "-O", "qcow2", "src.raw", "small.qcow2"), mentions: ["small.qcow2", "smaller"])
    }

    /// convert -B: the new image stands on the backing file and holds what the source's top
    /// image holds, zeroes included; qemu-img reads the same as the source and finds it clean.
    func testConvertOntoABackingFile() throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "base.qcow2", "4M"), "base")
        ok(try qemuIO("-c", "write -P 1 0 4M", "base.qcow2"), "base data")
        ok(try qemuImg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"), "top")
        ok(try qemuIO("-c", "write -P 2 1M 64k", "-c", "write -z 2M 128k", "top.qcow2"), "top data")
        ok(try strata("convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2", "new.qcow2"), "convert -B")
        XCTAssertEqual(try qemuImg("check", "new.qcow2").status, 0)
        ok(try qemuImg("compare", "top.qcow2", "new.qcow2"), "same content")
        let map = json(try qemuImg("map", "--output=json", "new.qcow2").stdout) as? [[String: Any]] ?? []
        let own = map.filter { ($0["depth"] as? Int) == 0 && ($0["present"] as? Bool) == true }
        XCTAssertEqual(own.map { ($0["start"] as? Int) ?? -1 }, [1 << 20, 2 << 20], "only the top image's ranges are in the new image: \(map)")
        assertUserError(try strata("convert", "-O", "qcow2", "-B", "base.qcow2", "top.qcow2", "x.qcow2"), mentions: ["x.qcow2", "-F"])
        assertUserError(try strata("convert", "-O", "raw", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2", "x.raw"), mentions: ["x.raw"])
    }

    /// An empty 16 TiB image: map, compare and info walk it in a few steps (per cluster they
    /// would take hours), and say what qemu-img says.
    func testEmptyHugeImagesCostWhatTheirDataCosts() throws {
        ok(try strata("create", "-q", "-f", "qcow2", "huge.qcow2", "16T"), "create")
        ok(try strata("create", "-q", "-f", "qcow2", "huge2.qcow2", "16T"), "create")
        let ours = try strata("map", "--output", "json", "huge.qcow2")
        XCTAssertEqual(ours.stdout, try qemuImg("map", "--output=json", "huge.qcow2").stdout)
        ok(try strata("compare", "huge.qcow2", "huge2.qcow2"), "compare")
        ok(try qemuIO("-c", "write -P 4 15T 64k", "huge2.qcow2"), "data near the end")
        let differ = try strata("compare", "huge.qcow2", "huge2.qcow2")
        XCTAssertEqual(differ.status, 1)
        XCTAssertEqual(differ.stdout, try qemuImg("compare", "huge.qcow2", "huge2.qcow2").stdout)
        XCTAssertEqual(try strata("map", "--output", "json", "huge2.qcow2").stdout,
                       try qemuImg("map", "--output=json", "huge2.qcow2").stdout)
        ok(try strata("convert", "-O", "qcow2", "huge2.qcow2", "copy.qcow2"), "convert")
        ok(try qemuImg("compare", "huge2.qcow2", "copy.qcow2"), "copy identical")
        XCTAssertLessThan(try size("copy.qcow2"), 64 << 20)
    }

    /// An image that names itself as its backing file: create refuses it (however spelled);
    /// info still shows the header of one made by other means, like qemu-img.
    func testSelfReferencingBackingFile() throws {
        for name in ["me.qcow2", "./me.qcow2"] {
            assertUserError(try strata("create", "-f", "qcow2", "-u", "-b", name, "-F", "qcow2", "me.qcow2", "1M"),
                            mentions: ["me.qcow2", "itself"])
            XCTAssertFalse(FileManager.default.fileExists(atPath: path("me.qcow2")))
        }
        ok(try qemuImg("create", "-q", "-f", "qcow2", "loop.qcow2", "1M"), "create")
        ok(try qemuImg("rebase", "-u", "-b", "loop.qcow2", "-F", "qcow2", "loop.qcow2"), "make it loop")
        XCTAssertEqual(try strata("info", "loop.qcow2").stdout, try qemuImg("info", "loop.qcow2").stdout)
        assertUserError(try strata("info", "--backing-chain", "loop.qcow2"), mentions: ["loop.qcow2", "loop"])
        XCTAssertEqual(try strata("info", "missing-backing.qcow2").status, 1)
        ok(try qemuImg("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", "orphan.qcow2", "1M"), "orphan")
        XCTAssertEqual(try strata("info", "--output", "json", "orphan.qcow2").stdout,
                       try qemuImg("info", "--output=json", "orphan.qcow2").stdout)
    }

    /// Persistent bitmaps: info lists them as qemu-img does; a write keeps them (marked in
    /// use) and leaks nothing.
    func testBitmapsAreListedAndKept() throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "bm.qcow2", "64M"), "create")
        ok(try qemuImg("bitmap", "--add", "bm.qcow2", "b0"), "bitmap")
        ok(try qemuImg("bitmap", "--add", "-g", "512k", "bm.qcow2", "b1"), "bitmap")
        ok(try qemuImg("bitmap", "--disable", "bm.qcow2", "b1"), "disable")
        XCTAssertEqual(try strata("info", "--output", "json", "bm.qcow2").stdout, try qemuImg("info", "--output=json", "bm.qcow2").stdout)
        XCTAssertEqual(try strata("info", "bm.qcow2").stdout, try qemuImg("info", "bm.qcow2").stdout)
        ok(try strata("io", "-c", "write -P 1 0 64k", "bm.qcow2"), "write")
        let check = try qemuImg("check", "bm.qcow2")
        XCTAssertEqual(check.status, 0, check.stdout + check.stderr)
        XCTAssertEqual(try strata("info", "--output", "json", "bm.qcow2").stdout, try qemuImg("info", "--output=json", "bm.qcow2").stdout)
        XCTAssertTrue(try qemuImg("info", "bm.qcow2").stdout.contains("in-use"))
    }

    /// map of an extended-L2 image: unallocated subclusters of an allocated cluster show the
    /// host offset, as qemu-img shows them.
    func testMapOfExtendedL2ImagesAgreesWithQemu() throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "e.qcow2", "1M"), "create")
        ok(try qemuIO("-c", "write -P 1 4k 2k", "-c", "write -z 40k 4k", "-c", "write -P 2 200k 8k", "e.qcow2"), "writes")
        for args in [["--output=json"], []] {
            XCTAssertEqual(try strata(["map"] + (args.isEmpty ? [] : ["--output", "json"]) + ["e.qcow2"]).stdout,
                           try qemuImg(["map"] + args + ["e.qcow2"]).stdout)
        }
    }

    /// measure prints what qemu-img measure prints, human and JSON.
    func testMeasureAgreesWithQemu() throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "m.qcow2", "64M"), "create")
        ok(try qemuIO("-c", "write -P 1 1M 3M", "m.qcow2"), "data")
        ok(try qemuImg("bitmap", "--add", "m.qcow2", "b0"), "bitmap")
        for args in [["--size", "10G", "-O", "qcow2"], ["-O", "qcow2", "m.qcow2"], ["-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=8", "m.qcow2"],
                     ["-O", "raw", "m.qcow2"], ["--size", "1T"], ["-O", "qcow2", "-o", "compat=0.10", "m.qcow2"]] {
            XCTAssertEqual(try strata(["measure"] + args).stdout, try qemuImg(["measure"] + args).stdout, "\(args)")
            XCTAssertEqual(try strata(["measure", "--output", "json"] + args).stdout,
                           try qemuImg(["measure", "--output=json"] + args).stdout, "\(args)")
        }
        assertUserError(try strata("measure", "--size", "1G", "m.qcow2"), mentions: ["--size"])
        assertUserError(try strata("measure"), mentions: ["--size"])
        assertUserError(try strata("measure", "-O", "qcow2", "-o", "cluster_size=4k,extended_l2=on", "--size", "1G"), mentions: ["extended L2"])
    }

    /// amend changes what qemu-img amend changes, and refuses what it refuses.
    func testAmendAgreesWithQemu() throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "a.qcow2", "8M"), "create")
        ok(try qemuIO("-c", "write -P 1 0 1M", "-c", "write -z 2M 1M", "a.qcow2"), "data")
        ok(try qemuImg("snapshot", "-c", "s", "a.qcow2"), "snapshot")
        ok(try strata("amend", "-o", "refcount_bits=64,lazy_refcounts=on", "a.qcow2"), "amend")
        var info = try qemuImg("info", "a.qcow2").stdout
        XCTAssertTrue(info.contains("refcount bits: 64") && info.contains("lazy refcounts: true"), info)
        XCTAssertEqual(try qemuImg("check", "a.qcow2").status, 0)
        assertUserError(try strata("amend", "-o", "compat=0.10", "a.qcow2"), mentions: ["a.qcow2", "refcount_bits=16"])
        ok(try strata("amend", "-o", "compat=0.10,refcount_bits=16,lazy_refcounts=off", "a.qcow2"), "downgrade")
        info = try qemuImg("info", "a.qcow2").stdout
        XCTAssertTrue(info.contains("compat: 0.10"), info)
        XCTAssertEqual(try qemuImg("check", "a.qcow2").status, 0)
        ok(try qemuIO("-c", "read -P 1 0 1M", "-c", "read -P 0 2M 1M", "a.qcow2"), "data kept")
        assertUserError(try strata("amend", "-o", "cluster_size=4k", "a.qcow2"), mentions: ["a.qcow2", "cluster_size"])
        assertUserError(try strata("amend", "-o", "backing_file=x", "a.qcow2"), mentions: ["a.qcow2", "rebase"])
        assertUserError(try strata("amend", "a.qcow2"), mentions: ["-o"])
        try truncate("r.raw", to: 1 << 20)
        assertUserError(try strata("amend", "-f", "raw", "-o", "size=2M", "r.raw"), mentions: ["r.raw"])
    }

    /// A raw image opened for writing without its format: a warning, and writes that would
    /// make it probe as qcow2 are refused; named with -f raw, it takes anything.
    func testProbedRawImagesWarnAndKeepTheirFormat() throws {
        try truncate("guest.raw", to: 1 << 20)
        let probed = try strata("io", "-c", "write -P 0x51 0 1", "-c", "write -P 0x46 1 1", "-c", "write -P 0x49 2 1",
                                "-c", "write -P 0xfb 3 1", "guest.raw")
        XCTAssertEqual(probed.status, 1)
        XCTAssertTrue(probed.stderr.contains("warning: guest.raw") && probed.stderr.contains("-f raw"), probed.stderr)
        XCTAssertTrue(probed.stdout.contains("write failed") && probed.stdout.contains("look like qcow2"), probed.stdout)
        XCTAssertTrue(try qemuImg("info", "guest.raw").stdout.contains("file format: raw"))
        let named = try strata("io", "-f", "raw", "-c", "write -P 0xfb 3 1", "guest.raw")
        ok(named, "named raw")
        XCTAssertEqual(named.stderr, "")
        XCTAssertEqual(Array(try contents("guest.raw").prefix(4)), [0x51, 0x46, 0x49, 0xfb], "the magic is complete now")
    }

    /// `write -z -u` on a raw file frees the space (a hole, as qemu-io leaves); `write -z`
    /// without -u keeps it allocated; both read as zeroes.
    func testZeroWritesOnRawFilesPunchHolesWhenAllowed() throws {
        func allocated(_ name: String) throws -> Int {
            var st = stat()
            XCTAssertEqual(stat(path(name), &st), 0)
            return Int(st.st_blocks) * 512
        }
        try truncate("z.raw", to: 4 << 20)
        ok(try strata("io", "-f", "raw", "-c", "write -P 7 0 4M", "z.raw"), "fill")
        XCTAssertGreaterThanOrEqual(try allocated("z.raw"), 4 << 20)
        ok(try strata("io", "-f", "raw", "-c", "write -z 0 1M", "z.raw"), "zero, keep")
        XCTAssertGreaterThanOrEqual(try allocated("z.raw"), 4 << 20)
        ok(try strata("io", "-f", "raw", "-c", "write -z -u 1M 2M", "z.raw"), "zero, unmap")
        XCTAssertLessThanOrEqual(try allocated("z.raw"), 2 << 20 + 65536)
        ok(try qemuIO("-f", "raw", "-c", "read -P 0 0 3M", "-c", "read -P 7 3M 1M", "z.raw"), "content")
        // qemu-io does the same to its twin.
        try truncate("q.raw", to: 4 << 20)
        ok(try qemuIO("-f", "raw", "-c", "write -P 7 0 4M", "-c", "write -z -u 1M 2M", "q.raw"), "qemu-io")
        XCTAssertEqual(try allocated("z.raw"), try allocated("q.raw"))
    }
}
