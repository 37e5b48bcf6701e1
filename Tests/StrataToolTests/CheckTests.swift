import Foundation
import XCTest

/// `strata check` against `qemu-img check` on damaged images: the same verdict (exit code)
/// before the repair; after `strata check -r all`, `qemu-img check` finds the image clean and
/// every guest byte outside the ranges the repair reports lost is unchanged.
///
/// The image: 4 MiB, 64 KiB clusters; guest [0, 128 KiB) and [1 MiB, +64 KiB) written, a
/// snapshot taken, then [64 KiB, 128 KiB) rewritten (copied on write). So the active L2 table
/// maps guest cluster 0 to a cluster shared with the snapshot (refcount 2), guest cluster 1
/// to a cluster of its own (refcount 1, COPIED), guest cluster 16 to a shared one.
final class CheckTests: ToolTestCase {
    /// Where the metadata of `d.qcow2` lies, read from its header and tables.
    struct Layout {
        var clusterSize: UInt64
        var l1: UInt64
        var refcountTable: UInt64
        var refcountBlock0: UInt64
        /// The L2 table of active L1 entry 0.
        var l2: UInt64
        var snapshotTable: UInt64
        var length: UInt64
        var bytes: Data

        func u64(_ at: UInt64) -> UInt64 { bytes[Int(at)..<Int(at) + 8].reduce(0) { $0 << 8 | UInt64($1) } }
        /// Active L2 entry `i` of the first table.
        func l2Entry(_ i: Int) -> UInt64 { u64(l2 + UInt64(i) * 8) }
        /// Where the 16-bit refcount of host cluster `c` is stored.
        func refcount(of c: UInt64) -> UInt64 { refcountBlock0 + 2 * c }
    }

    static let offsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    static let copied: UInt64 = 1 << 63

    func be64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (56 - 8 * UInt64($0))) } }
    func be16(_ v: UInt16) -> [UInt8] { [UInt8(v >> 8), UInt8(v & 0xff)] }

    func layout() throws -> Layout {
        let d = try contents("d.qcow2")
        var l = Layout(clusterSize: 0, l1: 0, refcountTable: 0, refcountBlock0: 0, l2: 0, snapshotTable: 0, length: UInt64(d.count), bytes: d)
        l.clusterSize = 1 << (l.u64(16) & 0xffff_ffff)           // cluster_bits: bytes 20-23
        l.l1 = l.u64(40)                                          // l1_table_offset
        l.refcountTable = l.u64(48)                               // refcount_table_offset
        l.snapshotTable = l.u64(64)                               // snapshots_offset
        l.refcountBlock0 = l.u64(l.refcountTable)
        l.l2 = l.u64(l.l1) & Self.offsetMask
        return l
    }

    /// Makes `d.qcow2` and its raw copy `before.raw`.
    func makeImage() throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "d.qcow2", "4M"), "create")
        ok(try qemuIO("-c", "write -P 1 0 128k", "-c", "write -P 2 1M 64k", "d.qcow2"), "write")
        ok(try qemuImg("snapshot", "-c", "s1", "d.qcow2"), "snapshot")
        ok(try qemuIO("-c", "write -P 3 64k 64k", "d.qcow2"), "write after the snapshot")
        ok(try qemuImg("convert", "-O", "raw", "d.qcow2", "before.raw"), "raw copy")
        ok(try qemuImg("check", "d.qcow2"), "the undamaged image is clean")
    }

    /// The guest ranges `strata check -r all` reports lost ("Lost guest bytes A..<B").
    func lostRanges(_ stderr: String) -> [Range<Int>] {
        stderr.split(separator: "\n").compactMap { line -> Range<Int>? in
            guard line.hasPrefix("Lost guest bytes "), let sp = line.dropFirst(17).split(separator: " ").first else { return nil }
            let parts = sp.components(separatedBy: "..<")
            guard parts.count == 2, let a = Int(parts[0]), let b = Int(parts[1]) else { return nil }
            return a..<b
        }
    }

    /// Damages the image, compares verdicts, repairs, and checks the result.
    /// `damage` returns guest ranges whose content the damage itself changed.
    /// With `sameReport`, `strata check -r all` must also print what `qemu-img check -r all`
    /// prints on stdout (the cases qemu-img repairs: the fixed counts and the final report).
    func damageCase(expect: Int32, sameReport: Bool = false, _ damage: (Layout) throws -> [Range<Int>],
                    file: StaticString = #filePath, line: UInt = #line) throws {
        try makeImage()
        let changed = try damage(try layout())
        let ours = try strata("check", "d.qcow2")
        let theirs = try qemuImg("check", "d.qcow2")
        XCTAssertEqual(ours.status, theirs.status, "verdict\nstrata:\n\(ours.stdout)\(ours.stderr)\nqemu-img:\n\(theirs.stdout)\(theirs.stderr)",
                       file: file, line: line)
        XCTAssertEqual(ours.status, expect, "strata check:\n\(ours.stdout)\(ours.stderr)", file: file, line: line)
        if sameReport {
            try FileManager.default.copyItem(atPath: path("d.qcow2"), toPath: path("q.qcow2"))
        }
        let repair = try strata("check", "-r", "all", "d.qcow2")
        if sameReport {
            let theirs = try qemuImg("check", "-r", "all", "q.qcow2")
            XCTAssertEqual(repair.stdout, theirs.stdout, "the report after -r all", file: file, line: line)
        }
        XCTAssertEqual(repair.status, 0, "strata check -r all:\n\(repair.stdout)\(repair.stderr)", file: file, line: line)
        let after = try qemuImg("check", "d.qcow2")
        XCTAssertEqual(after.status, 0, "qemu-img check after the repair:\n\(after.stdout)\(after.stderr)\nrepair:\n\(repair.stderr)",
                       file: file, line: line)
        XCTAssertEqual(try strata("check", "d.qcow2").status, 0, "strata check after the repair", file: file, line: line)
        ok(try qemuImg("convert", "-O", "raw", "d.qcow2", "after.raw"), "raw copy after", file: file, line: line)
        var before = [UInt8](try contents("before.raw")), now = [UInt8](try contents("after.raw"))
        XCTAssertEqual(before.count, now.count, file: file, line: line)
        for r in lostRanges(repair.stderr) + changed {
            for k in r where k < before.count { before[k] = 0; now[k] = 0 }
        }
        XCTAssertTrue(before == now, "guest bytes changed outside the lost ranges (\(lostRanges(repair.stderr)))\n\(repair.stderr)",
                      file: file, line: line)
    }

    // MARK: The damage matrix, by priority

    func testLeakedCluster() throws {
        try damageCase(expect: 3, sameReport: true) { l in
            // One cluster appended to the file, counted once, referenced by nothing.
            let c = l.length / l.clusterSize
            try truncate("d.qcow2", to: l.length + l.clusterSize)
            try write("d.qcow2", be16(1), at: l.refcount(of: c))
            return []
        }
    }

    func testRefcountTooLow() throws {
        try damageCase(expect: 2, sameReport: true) { l in
            // Guest cluster 0's host cluster is shared with the snapshot: 2 becomes 1.
            let host = l.l2Entry(0) & Self.offsetMask
            try write("d.qcow2", be16(1), at: l.refcount(of: host / l.clusterSize))
            return []
        }
    }

    func testRefcountZeroForUsedCluster() throws {
        try damageCase(expect: 2, sameReport: true) { l in
            let host = l.l2Entry(1) & Self.offsetMask
            try write("d.qcow2", be16(0), at: l.refcount(of: host / l.clusterSize))
            return []
        }
    }

    func testL2EntryPastEndOfFile() throws {
        try damageCase(expect: 2) { l in
            try write("d.qcow2", be64(Self.copied | (l.length + 100 * l.clusterSize)), at: l.l2 + 16 * 8)
            return [1 << 20 ..< (1 << 20) + 65536]
        }
    }

    func testL2EntryUnaligned() throws {
        try damageCase(expect: 2) { l in
            try write("d.qcow2", be64(l.l2Entry(16) + 512), at: l.l2 + 16 * 8)
            return [1 << 20 ..< (1 << 20) + 65536]
        }
    }

    func testL1EntryPointingAtRefcountBlock() throws {
        try damageCase(expect: 2) { l in
            try write("d.qcow2", be64(Self.copied | l.refcountBlock0), at: l.l1)
            return [0 ..< 4 << 20]
        }
    }

    func testTwoL2EntriesClaimOneCluster() throws {
        try damageCase(expect: 2, sameReport: true) { l in
            // Guest cluster 5 (never written) now maps guest cluster 1's cluster (refcount 1).
            try write("d.qcow2", be64(l.l2Entry(1)), at: l.l2 + 5 * 8)
            return [5 * 65536 ..< 6 * 65536]
        }
    }

    func testWrongCopiedFlag() throws {
        try damageCase(expect: 2, sameReport: true) { l in
            // Guest cluster 0 is shared (refcount 2): COPIED set says it may be written in place.
            try write("d.qcow2", be64(l.l2Entry(0) | Self.copied), at: l.l2)
            return []
        }
    }

    func testDestroyedRefcountTable() throws {
        try damageCase(expect: 2) { l in
            try write("d.qcow2", [UInt8](repeating: 0, count: Int(l.clusterSize)), at: l.refcountTable)
            return []
        }
    }

    func testGarbageSnapshotTable() throws {
        try damageCase(expect: 1) { l in
            try write("d.qcow2", [UInt8](repeating: 0xa5, count: 64), at: l.snapshotTable)
            return []
        }
    }

    func testDirtyBitWithLazyRefcounts() throws {
        try damageCase(expect: 2, sameReport: true) { l in
            // A lazy-refcounts writer that crashed: dirty bit set, a refcount not yet raised.
            try write("d.qcow2", be64(1), at: 72)                  // incompatible_features: dirty
            try write("d.qcow2", be64(1), at: 80)                  // compatible_features: lazy_refcounts
            let host = l.l2Entry(16) & Self.offsetMask
            try write("d.qcow2", be16(1), at: l.refcount(of: host / l.clusterSize))
            return []
        }
        XCTAssertEqual(try contents("d.qcow2")[79] & 1, 0, "the dirty bit is cleared")
    }

    func testDataClusterThatIsAlsoAnL2Table() throws {
        try damageCase(expect: 2) { l in
            // Guest cluster 2 maps the L2 table itself: a write there would overwrite the table.
            try write("d.qcow2", be64(Self.copied | l.l2), at: l.l2 + 2 * 8)
            return [2 * 65536 ..< 3 * 65536]
        }
        XCTAssertEqual(try layout().l2Entry(2) & Self.offsetMask, 0, "the entry no longer maps the table")
    }

    func testImageWithPersistentBitmapChecksLikeQemuImg() throws {
        try makeImage()
        ok(try qemuImg("bitmap", "--add", "d.qcow2", "b0"), "bitmap")
        let l = try layout()
        let c = (l.length + l.clusterSize - 1) / l.clusterSize      // the file may end mid-cluster
        try truncate("d.qcow2", to: (c + 1) * l.clusterSize)
        try write("d.qcow2", be16(1), at: l.refcount(of: c))
        for args in [["check", "d.qcow2"], ["check", "--output", "json", "d.qcow2"]] {
            let ours = try strata(args), theirs = try qemuImg(args)
            XCTAssertEqual(ours.stdout, theirs.stdout, args.joined(separator: " "))
            XCTAssertEqual(ours.status, 3)
        }
        ok(try strata("check", "-r", "leaks", "d.qcow2"), "repair")
        ok(try qemuImg("check", "d.qcow2"), "clean")
        XCTAssertTrue(ok(try qemuImg("info", "d.qcow2"), "info").stdout.contains("b0"))
    }

    func testRepairingLeaksOnlyRefusesWhatNeedsARebuildLikeQemuImg() throws {
        try makeImage()
        let l = try layout()
        try write("d.qcow2", be16(0), at: l.refcount(of: (l.l2Entry(1) & Self.offsetMask) / l.clusterSize))
        try FileManager.default.copyItem(atPath: path("d.qcow2"), toPath: path("q.qcow2"))
        let ours = try strata("check", "-r", "leaks", "d.qcow2"), theirs = try qemuImg("check", "-r", "leaks", "q.qcow2")
        XCTAssertEqual(ours.status, 1, ours.stderr)
        XCTAssertEqual(ours.status, theirs.status)
        XCTAssertTrue(ours.stderr.contains("ERROR need to rebuild refcount structures"), ours.stderr)
        XCTAssertEqual(try contents("d.qcow2"), try contents("q.qcow2"), "nothing changed")
    }

    // MARK: Output

    func testHumanAndJSONOutputMatchQemuImg() throws {
        try makeImage()
        let l = try layout()
        let c = l.length / l.clusterSize
        try truncate("d.qcow2", to: l.length + l.clusterSize)
        try write("d.qcow2", be16(1), at: l.refcount(of: c))
        try write("d.qcow2", be64(l.l2Entry(0) | Self.copied), at: l.l2)
        for args in [["check", "d.qcow2"], ["check", "--output", "json", "d.qcow2"]] {
            let ours = try strata(args), theirs = try qemuImg(args)
            XCTAssertEqual(ours.stdout, theirs.stdout, args.joined(separator: " "))
            XCTAssertEqual(ours.status, theirs.status)
            XCTAssertEqual(ours.stderrLines, theirs.stderrLines, args.joined(separator: " "))
        }
        let ours = try strata("check", "-r", "leaks", "--output", "json", "d.qcow2")
        XCTAssertEqual(ours.status, 2)
        let j = json(ours.stdout) as? [String: Any]
        XCTAssertEqual(j?["leaks-fixed"] as? Int, 1)
        XCTAssertEqual(j?["corruptions"] as? Int, 1)
        let r = try strata("check", "-r", "all", "d.qcow2")
        XCTAssertEqual(r.status, 0)
        XCTAssertTrue(r.stdout.hasPrefix("The following inconsistencies were found and repaired:\n\n    0 leaked clusters\n    1 corruptions\n\nDouble checking the fixed image now...\nNo errors were found on the image.\n"), r.stdout)
    }

    func testRawImageHasNoChecksLikeQemuImg() throws {
        ok(try qemuImg("create", "-q", "-f", "raw", "r.raw", "1M"), "create")
        for args in [["check", "r.raw"], ["check", "-f", "raw", "r.raw"]] {
            XCTAssertEqual(try strata(args).status, 63, args.joined(separator: " "))
            XCTAssertEqual(try qemuImg(args).status, 63, args.joined(separator: " "))
        }
    }

    func testRepairOptionsAreValidated() throws {
        try makeImage()
        XCTAssertEqual(try strata("check", "-r", "some", "d.qcow2").status, 1)
        XCTAssertEqual(try strata("check", "-r", "all", "-U", "d.qcow2").status, 1)
        XCTAssertEqual(try strata("check", "-U", "d.qcow2").status, 0)
    }

    /// A dirty image (a lazy-refcounts writer that crashed, a refcount not yet raised) is
    /// repaired when strata opens it for writing, as QEMU does, instead of being refused.
    func testDirtyImageIsRepairedOnOpenForWriting() throws {
        try makeImage()
        let l = try layout()
        try write("d.qcow2", be64(1), at: 72)                      // incompatible_features: dirty
        try write("d.qcow2", be64(1), at: 80)                      // compatible_features: lazy_refcounts
        let host = l.l2Entry(16) & Self.offsetMask
        try write("d.qcow2", be16(1), at: l.refcount(of: host / l.clusterSize))
        XCTAssertEqual(try qemuImg("check", "d.qcow2").status, 2)
        ok(try strata("io", "-c", "write -P 9 1M 4k", "d.qcow2"), "write to the dirty image")
        ok(try qemuImg("check", "d.qcow2"), "clean after the open repaired it")
        ok(try qemuIO("-c", "read -P 9 1M 4k", "-c", "read -P 2 1028k 60k", "d.qcow2"), "the write and the rest of the cluster")
        ok(try qemuImg("convert", "-l", "s1", "-O", "raw", "d.qcow2", "snap.raw"), "the snapshot's state")
        XCTAssertEqual([UInt8](try contents("snap.raw")[(1 << 20)..<((1 << 20) + 65536)]), [UInt8](repeating: 2, count: 65536),
                       "the snapshot kept its copy")
    }

    /// Two entries claiming one cluster of a 1-bit refcount image: no count can be true.
    /// qemu-img -r all leaves it corrupt ("overflow cluster"); ours copies the cluster for the
    /// second entry, so both keep their bytes and qemu-img finds the image clean.
    func testTwoEntriesClaimingOneClusterOfAOneBitImageAreSeparated() throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", "d.qcow2", "4M"), "create")
        ok(try qemuIO("-c", "write -P 1 0 64k", "-c", "write -P 2 64k 64k", "d.qcow2"), "write")
        let l = try layout()
        try write("d.qcow2", be64(l.l2Entry(0)), at: l.l2 + 16 * 8)   // guest 1 MiB -> guest 0's cluster
        ok(try qemuImg("convert", "-O", "raw", "d.qcow2", "before.raw"), "raw copy")
        XCTAssertEqual(try qemuImg("check", "d.qcow2").status, 2)
        XCTAssertEqual(try strata("check", "d.qcow2").status, 2)
        ok(try run("/bin/cp", [path("d.qcow2"), path("q.qcow2")]), "copy")
        XCTAssertEqual(try qemuImg("check", "-r", "all", "q.qcow2").status, 2, "qemu-img cannot repair it")

        let repaired = try strata("check", "-r", "all", "d.qcow2")
        XCTAssertEqual(repaired.status, 0, repaired.stderr + repaired.stdout)
        XCTAssertTrue(repaired.stderr.contains("1-bit refcount cannot count its references"), repaired.stderr)
        ok(try qemuImg("check", "d.qcow2"), "qemu-img check after the repair")
        ok(try qemuImg("compare", "-f", "raw", "-F", "qcow2", "before.raw", "d.qcow2"), "every guest byte kept")
        // The two entries are separate now: a write to one leaves the other.
        ok(try qemuIO("-c", "write -P 3 1M 64k", "d.qcow2"), "write")
        ok(try qemuIO("-c", "read -P 1 0 64k", "d.qcow2"), "guest 0 keeps its data")
        ok(try qemuImg("check", "d.qcow2"), "qemu-img check after the write")
    }

    // MARK: Strata's own marks

    /// A template is sealed when made; a write by QEMU breaks the seal, which check reports
    /// (without changing qemu-img's verdict); a writable file mode is reported and repaired.
    func testTemplateSealIsCheckedAndBrokenByAQemuWrite() throws {
        ok(try strata("create", "-f", "qcow2", "base.qcow2", "4M"), "create")
        ok(try qemuIO("-c", "write -P 7 0 1M", path("base.qcow2")), "qemu-io write")
        ok(try strata("template", "create", "base.qcow2", "t.qcow2"), "template create")
        func template(_ r: RunResult) -> [String: Any]? { (json(r.stdout) as? [String: Any])?["template"] as? [String: Any] }
        let sealed = ok(try strata("check", "--output", "json", "t.qcow2"), "check")
        XCTAssertEqual(template(sealed)?["sealed"] as? Bool, true)
        XCTAssertEqual(template(sealed)?["writable-mode"] as? Bool, false)
        XCTAssertTrue(ok(try strata("check", "t.qcow2"), "check").stdout.contains("Template: sealed"))

        ok(try qemuIO("-c", "write -P 9 0 64k", path("t.qcow2")), "qemu-io write into the template")
        let broken = try strata("check", "--output", "json", "t.qcow2")
        XCTAssertEqual(broken.status, 0, "a broken seal is not a qcow2 error: \(broken.stderr)")
        XCTAssertEqual(template(broken)?["sealed"] as? Bool, false)
        XCTAssertTrue(broken.stderr.contains("linked clones made before then may read changed data"), broken.stderr)
        XCTAssertEqual(try qemuImg("check", path("t.qcow2")).status, 0)

        XCTAssertEqual(chmod(path("t.qcow2"), 0o644), 0)
        XCTAssertEqual(template(try strata("check", "--output", "json", "t.qcow2"))?["writable-mode"] as? Bool, true)
        let fixed = ok(try strata("check", "-r", "leaks", "t.qcow2"), "check -r leaks")
        XCTAssertTrue(fixed.stdout.contains("made read-only"), fixed.stdout)
        XCTAssertEqual(try FileManager.default.attributesOfItem(atPath: path("t.qcow2"))[.posixPermissions] as? Int, 0o444)
        // An image that is no template carries no template field (qemu-img's JSON shape).
        XCTAssertNil(template(ok(try strata("check", "--output", "json", "base.qcow2"), "check")))
    }

    /// The dedup index's records are compared with the tables: a record whose guest cluster
    /// was discarded is stale, a repair rewrites the file without it, and an index QEMU
    /// made untrusted (by writing the image) is reported as not used.
    func testDedupIndexRecordsAreCheckedAndStaleOnesDropped() throws {
        ok(try strata("create", "-f", "qcow2", "-o", "dedup=on,cluster_size=4096", "d.qcow2", "4M"), "create")
        ok(try strata("io", "-c", "write -P 5 0 64k", "-c", "write -P 6 64k 64k", "-c", "write -P 8 128k 4k", "d.qcow2"), "io write")
        func index(_ r: RunResult) -> [String: Any]? { (json(r.stdout) as? [String: Any])?["dedup-index"] as? [String: Any] }
        let fresh = index(ok(try strata("check", "--output", "json", "d.qcow2"), "check"))
        XCTAssertEqual(fresh?["records"] as? Int, 3)
        XCTAssertEqual(fresh?["stale-records"] as? Int, 0)
        XCTAssertEqual(fresh?["checked"] as? Bool, true)

        // Guest cluster 32 (the 4k of pattern 8) is the only one naming its host cluster.
        ok(try strata("io", "-c", "discard 128k 4k", "-c", "discard 0 4k", "d.qcow2"), "io discard")
        let stale = try strata("check", "--output", "json", "d.qcow2")
        XCTAssertEqual(stale.status, 0, "stale records are no error: \(stale.stderr)")
        XCTAssertEqual(index(stale)?["stale-records"] as? Int, 2)
        let repaired = index(ok(try strata("check", "-r", "leaks", "--output", "json", "d.qcow2"), "check -r leaks"))
        XCTAssertEqual(repaired?["stale-records-dropped"] as? Int, 2)
        let after = index(ok(try strata("check", "--output", "json", "d.qcow2"), "check"))
        XCTAssertEqual(after?["records"] as? Int, 1)
        XCTAssertEqual(after?["stale-records"] as? Int, 0)
        XCTAssertEqual(try qemuImg("check", path("d.qcow2")).status, 0)
        // The kept record still dedups: a new copy of pattern 6 shares its cluster.
        let before = try contents("d.qcow2").count
        ok(try strata("io", "-c", "write -P 6 1M 64k", "d.qcow2"), "io write")
        XCTAssertEqual(try contents("d.qcow2").count, before, "the copy should share the indexed cluster")

        ok(try qemuIO("-c", "write -P 1 2M 4k", path("d.qcow2")), "qemu-io write")
        let untrusted = index(ok(try strata("check", "--output", "json", "d.qcow2"), "check"))
        XCTAssertTrue((untrusted?["unusable"] as? String)?.contains("not trusted") ?? false, "\(String(describing: untrusted))")
        XCTAssertTrue(ok(try strata("check", "d.qcow2"), "check").stdout.contains("Dedup index: not used"))
    }
}
