import Foundation
import XCTest

/// `strata template create|list` and `strata clone`: templates read as their source, refuse
/// every writer, and linked clones stand on them without touching them; QEMU agrees.
final class TemplateCloneTests: ToolTestCase {
    /// A 16 MiB qcow2 source with 32 KiB clusters: data at 0 and 5 MiB, a zero cluster at 2 MiB.
    func makeSource(_ name: String = "src.qcow2") throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=32k", name, "16M"), "create source")
        ok(try qemuIO("-c", "write -P 7 0 1M", "-c", "write -z 2M 64k", "-c", "write -P 9 5M 96k", name), "fill source")
    }

    func info(_ image: String) throws -> [String: Any] {
        (json(ok(try qemuImg("info", "--output", "json", "-U", image), "qemu-img info").stdout) as? [String: Any]) ?? [:]
    }

    func assertClean(_ image: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try qemuImg("check", "-U", image)
        XCTAssertEqual(r.status, 0, "qemu-img check \(image): \(r.stdout)\(r.stderr)", file: file, line: line)
    }

    func assertSame(_ a: String, _ b: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try qemuImg("compare", "-U", a, b)
        XCTAssertEqual(r.status, 0, "qemu-img compare \(a) \(b): \(r.stdout)\(r.stderr)", file: file, line: line)
    }

    func testLinkedClonesReadAsTheTemplateAndKeepTheirWritesToThemselves() throws {
        try makeSource()
        ok(try strata("template", "create", "src.qcow2", "t.qcow2"), "template create")
        ok(try strata("clone", "t.qcow2", "c1.qcow2"), "clone 1")
        ok(try strata("clone", "-q", "t.qcow2", "c2.qcow2"), "clone 2")

        // The template: a compact copy (the zero cluster and unallocated space dropped), marked, 0444.
        try assertSame("src.qcow2", "t.qcow2")
        let t = try info("t.qcow2")
        XCTAssertNil(t["backing-filename"])
        XCTAssertEqual(t["cluster-size"] as? Int, 32768)
        let mode = (try FileManager.default.attributesOfItem(atPath: path("t.qcow2"))[.posixPermissions] as? Int) ?? 0
        XCTAssertEqual(mode, 0o444)
        let ours = json(ok(try strata("info", "--output", "json", "t.qcow2"), "info").stdout) as? [String: Any]
        let data = ((ours?["format-specific"] as? [String: Any])?["data"] as? [String: Any])
        XCTAssertEqual(data?["template"] as? Bool, true)
        let map = ok(try qemuImg("map", "--output", "json", "t.qcow2"), "map").stdout
        let extents = (json(map) as? [[String: Any]]) ?? []
        let allocated = extents.filter { $0["data"] as? Bool == true }.reduce(0) { $0 + ($1["length"] as? Int ?? 0) }
        XCTAssertEqual(allocated, (1 << 20) + (96 << 10), "only the data clusters are in the template")

        // The clones: relative backing name, its format, the template's geometry and content.
        for c in ["c1.qcow2", "c2.qcow2"] {
            let i = try info(c)
            XCTAssertEqual(i["backing-filename"] as? String, "t.qcow2")
            XCTAssertEqual(i["backing-filename-format"] as? String, "qcow2")
            XCTAssertEqual(i["cluster-size"] as? Int, 32768)
            XCTAssertEqual(i["virtual-size"] as? Int, 16 << 20)
            try assertSame(c, "t.qcow2")
        }

        // A write to one clone stays there.
        let before = try contents("t.qcow2")
        ok(try strata("io", "-c", "write -P 3 4k 8k", "-c", "write -z 5M 32k", "c1.qcow2"), "write to clone 1")
        XCTAssertEqual(try qemuImg("compare", "c1.qcow2", "t.qcow2").status, 1, "clone 1 changed")
        ok(try qemuIO("-r", "-c", "read -P 3 4k 8k", "-c", "read -P 7 0 4k", "-c", "read -P 0 5M 32k", "c1.qcow2"), "clone 1 reads its writes")
        try assertSame("c2.qcow2", "t.qcow2")
        try assertSame("t.qcow2", "src.qcow2")
        XCTAssertEqual(try contents("t.qcow2"), before, "the template file is untouched")
        for f in ["t.qcow2", "c1.qcow2", "c2.qcow2"] { try assertClean(f) }
    }

    func testATemplateRefusesEveryWriterWithTheReason() throws {
        try makeSource()
        ok(try strata("template", "create", "-q", "src.qcow2", "t.qcow2"), "template create")
        let before = try contents("t.qcow2")
        for args in [["io", "-c", "write 0 4k", "t.qcow2"], ["resize", "t.qcow2", "32M"],
                     ["amend", "-o", "lazy_refcounts=on", "t.qcow2"], ["serve", "--socket", path("s.sock"), "t.qcow2"],
                     ["convert", "-n", "-O", "qcow2", "src.qcow2", "t.qcow2"]] {
            assertUserError(try strata(args), mentions: ["t.qcow2", "is a template", "strata clone"])
        }
        // Nor is it replaced by create, convert, template create or clone.
        for args in [["create", "-q", "-f", "qcow2", "t.qcow2", "1M"], ["convert", "-O", "qcow2", "src.qcow2", "t.qcow2"],
                     ["template", "create", "src.qcow2", "t.qcow2"], ["clone", "--full", "src.qcow2", "t.qcow2"]] {
            assertUserError(try strata(args), mentions: ["t.qcow2", "is a template", "never replaced"])
        }
        XCTAssertEqual(try contents("t.qcow2"), before)
        // Reading is fine.
        ok(try strata("io", "-r", "-c", "read -P 7 0 4k", "t.qcow2"), "read-only open")
        // QEMU ignores the mark and keeps it when it rewrites the header.
        ok(try qemuImg("amend", "-o", "lazy_refcounts=on", "t.qcow2"), "qemu-img amend")
        assertUserError(try strata("resize", "t.qcow2", "32M"), mentions: ["is a template"])
    }

    func testCloneRefusesWhatIsNoTemplateAndSaysWhatToDo() throws {
        try makeSource()
        try truncate("disk.raw", to: 1 << 20)
        for src in ["src.qcow2", "disk.raw"] {
            let r = try strata("clone", src, "c.qcow2")
            assertUserError(r, mentions: [src, "template", "strata template create \(src) TEMPLATE", "strata clone --full \(src)"])
        }
        assertUserError(try strata("clone", "missing.qcow2", "c.qcow2"), mentions: ["missing.qcow2", "No such file"])
        ok(try strata("template", "create", "-q", "src.qcow2", "t.qcow2"), "template create")
        try truncate("taken.qcow2", to: 0)
        assertUserError(try strata("clone", "t.qcow2", "taken.qcow2"), mentions: ["taken.qcow2", "already exists"])
        assertUserError(try strata("clone", "--snapshot", "s1", "t.qcow2", "c.qcow2"), mentions: ["--full"])
        XCTAssertFalse(FileManager.default.fileExists(atPath: path("c.qcow2")))
        XCTAssertFalse(FileManager.default.fileExists(atPath: path("t2.qcow2")))
        assertUserError(try strata("template"), mentions: ["create or list", "strata template --help"])
        assertUserError(try strata("template", "list", "nowhere"), mentions: ["nowhere", "No such file"])
    }

    func testFullCloneIsAnIndependentThinCopy() throws {
        // A chain: base ← overlay, with a zero cluster over base data.
        ok(try qemuImg("create", "-q", "-f", "qcow2", "base.qcow2", "8M"), "base")
        ok(try qemuIO("-c", "write -P 1 0 2M", "base.qcow2"), "base data")
        ok(try qemuImg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"), "overlay")
        ok(try qemuIO("-c", "write -P 2 1M 64k", "-c", "write -z 0 64k", "top.qcow2"), "overlay data")
        ok(try strata("clone", "--full", "top.qcow2", "full.qcow2"), "clone --full")
        XCTAssertNil(try info("full.qcow2")["backing-filename"])
        try assertSame("full.qcow2", "top.qcow2")
        try assertClean("full.qcow2")
        let map = (json(ok(try qemuImg("map", "--output", "json", "full.qcow2"), "map").stdout) as? [[String: Any]]) ?? []
        let allocated = map.filter { $0["data"] as? Bool == true }.reduce(0) { $0 + ($1["length"] as? Int ?? 0) }
        XCTAssertEqual(allocated, (2 << 20) - (64 << 10), "as thin as the source: the zeroed cluster and the unwritten rest are left out")
        XCTAssertEqual(try strata("info", "full.qcow2").stdout.contains("template"), false, "a full clone is no template")
        // Writable and independent: a write changes neither the source nor its base.
        ok(try strata("io", "-c", "write -P 5 0 4k", "full.qcow2"), "write to the full clone")
        ok(try qemuIO("-r", "-c", "read -P 0 0 4k", "top.qcow2"), "source unchanged")
        // A raw source too.
        try truncate("disk.raw", to: 4 << 20)
        try write("disk.raw", noise(100_000, seed: 1), at: 1 << 20)
        ok(try strata("clone", "--full", "-q", "disk.raw", "fromraw.qcow2"), "clone --full raw")
        try assertSame("fromraw.qcow2", "disk.raw")
    }

    func testFullCloneOfASnapshotCopiesThatState() throws {
        try makeSource()
        ok(try qemuImg("snapshot", "-c", "before", "src.qcow2"), "snapshot")
        ok(try qemuIO("-c", "write -P 4 0 64k", "-c", "write -P 4 8M 64k", "src.qcow2"), "write after the snapshot")
        ok(try strata("clone", "--full", "--snapshot", "before", "src.qcow2", "old.qcow2"), "clone --full --snapshot")
        ok(try qemuImg("convert", "-O", "qcow2", "-l", "snapshot.name=before", "src.qcow2", "ref.qcow2"), "qemu-img convert -l")
        try assertSame("old.qcow2", "ref.qcow2")
        ok(try qemuIO("-r", "-c", "read -P 7 0 64k", "-c", "read -P 0 8M 64k", "old.qcow2"), "the snapshot's state")
        XCTAssertNil(try info("old.qcow2")["snapshots"])
        try assertClean("old.qcow2")
        assertUserError(try strata("clone", "--full", "--snapshot", "nope", "src.qcow2", "x.qcow2"), mentions: ["src.qcow2", "nope"])
        XCTAssertFalse(FileManager.default.fileExists(atPath: path("x.qcow2")))
    }

    func testBackingNamesAreRelativeInOneFolderSoTheFolderCanMove() throws {
        try FileManager.default.createDirectory(atPath: path("vms"), withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: path("other"), withIntermediateDirectories: true)
        try makeSource()
        ok(try strata("template", "create", "-q", "src.qcow2", "vms/t.qcow2"), "template create")
        ok(try strata("clone", "-q", "vms/t.qcow2", "vms/c.qcow2"), "clone in the folder")
        ok(try strata("clone", "-q", "vms/t.qcow2", "other/c.qcow2"), "clone in another folder")
        XCTAssertEqual(try info("vms/c.qcow2")["backing-filename"] as? String, "t.qcow2")
        let absolute = try info("other/c.qcow2")["backing-filename"] as? String ?? ""
        XCTAssertTrue(absolute.hasPrefix("/") && absolute.hasSuffix("/vms/t.qcow2"), absolute)
        // Through a symbolic link to the folder, both resolve to one folder: still relative.
        try FileManager.default.createSymbolicLink(atPath: path("link"), withDestinationPath: path("vms"))
        ok(try strata("clone", "-q", "link/t.qcow2", "vms/d.qcow2"), "clone through a link")
        XCTAssertEqual(try info("vms/d.qcow2")["backing-filename"] as? String, "t.qcow2")
        // A link to the template names the template itself, never the link (which may later move on).
        try FileManager.default.createSymbolicLink(atPath: path("vms/current.qcow2"), withDestinationPath: "t.qcow2")
        ok(try strata("clone", "-q", "vms/current.qcow2", "vms/e.qcow2"), "clone through a link to the file")
        XCTAssertEqual(try info("vms/e.qcow2")["backing-filename"] as? String, "t.qcow2")
        // The folder moves; its clones still read their template.
        try FileManager.default.moveItem(atPath: path("vms"), toPath: path("moved"))
        try assertSame("moved/c.qcow2", "moved/t.qcow2")
        try assertClean("moved/c.qcow2")
    }

    func testTemplateListShowsClonesAndTheBytesTheyShare() throws {
        try makeSource()
        ok(try strata("template", "create", "-q", "src.qcow2", "t.qcow2"), "template create")
        ok(try strata("clone", "-q", "t.qcow2", "c1.qcow2"), "clone 1")
        ok(try strata("clone", "-q", "t.qcow2", "c2.qcow2"), "clone 2")
        ok(try strata("io", "-c", "write -P 3 0 64k", "c1.qcow2"), "write to clone 1")
        ok(try qemuImg("create", "-q", "-f", "qcow2", "-b", "c2.qcow2", "-F", "qcow2", "c2-top.qcow2"), "overlay on clone 2")
        try FileManager.default.createSymbolicLink(atPath: path("current.qcow2"), withDestinationPath: "t.qcow2")
        try write("notes.txt", Array("not an image".utf8))
        try write("broken.qcow2", [0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 9])  // the magic, then version 9
        let r = ok(try strata("template", "list", "--output", "json", "."), "template list")
        XCTAssertEqual(r.stderrLines.count, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("broken.qcow2: skipped"), r.stderr)
        let top = json(r.stdout) as? [String: Any]
        let templates = top?["templates"] as? [[String: Any]] ?? []
        XCTAssertEqual(templates.count, 1)
        let t = templates.first ?? [:]
        XCTAssertEqual(t["filename"] as? String, "t.qcow2")
        let data = (1 << 20) + (96 << 10)
        XCTAssertEqual(t["data-bytes"] as? Int, data)
        let clones = (t["clones"] as? [[String: Any]] ?? []).sorted { ($0["filename"] as? String ?? "") < ($1["filename"] as? String ?? "") }
        XCTAssertEqual(clones.map { $0["filename"] as? String ?? "" }, ["c1.qcow2", "c2-top.qcow2", "c2.qcow2"])
        XCTAssertEqual(clones.map { $0["depth"] as? Int ?? 0 }, [1, 2, 1])
        XCTAssertEqual(clones.map { $0["own-bytes"] as? Int ?? -1 }, [64 << 10, 0, 0])
        XCTAssertEqual(clones.map { $0["shared-bytes"] as? Int ?? -1 }, [data - (64 << 10), data, data])
        XCTAssertEqual(t["shared-bytes-total"] as? Int, 3 * data - (64 << 10))
        XCTAssertEqual((top?["skipped"] as? [[String: Any]])?.count, 1)
        let human = ok(try strata("template", "list", "."), "template list human").stdout
        XCTAssertTrue(human.contains("template: t.qcow2") && human.contains("clone: c1.qcow2"), human)
    }

    func testTemplatesOfRawImagesTemplatesAndImagesWithSnapshots() throws {
        try makeSource()
        ok(try qemuImg("snapshot", "-c", "before", "src.qcow2"), "snapshot")
        ok(try qemuIO("-c", "write -P 4 8M 64k", "src.qcow2"), "write after the snapshot")
        ok(try strata("template", "create", "-q", "src.qcow2", "t.qcow2"), "template of an image with snapshots")
        try assertSame("t.qcow2", "src.qcow2")
        XCTAssertNil(try info("t.qcow2")["snapshots"], "only the active state is copied")
        ok(try strata("template", "create", "-q", "t.qcow2", "tt.qcow2"), "template of a template")
        try assertSame("tt.qcow2", "t.qcow2")
        try truncate("disk.raw", to: 2 << 20)
        try write("disk.raw", noise(70_000, seed: 2), at: 4096)
        ok(try strata("template", "create", "-q", "disk.raw", "fromraw.qcow2"), "template of a raw file")
        try assertSame("fromraw.qcow2", "disk.raw")
        try assertClean("fromraw.qcow2")
        XCTAssertEqual(try info("fromraw.qcow2")["cluster-size"] as? Int, 65536)
        let left = try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0.contains(".partial-") }
        XCTAssertEqual(left, [], "no temporary copy is left behind")
    }

    /// `template create --dedup`: a source whose 448 data clusters hold only 4 distinct
    /// contents makes a template storing those 4 once, with no leaked or freed space; it reads
    /// as the source, checks clean, and a linked clone of it reads the same and writes apart.
    func testDedupTemplateStoresEachDistinctClusterOnce() throws {
        // 4 KiB clusters over 2 MiB: cluster k holds content k % 5 (content 0 is zeroes) for
        // k < 448, the last 64 clusters are zero.
        let kinds = [[UInt8](repeating: 0, count: 4096)] + (1...4).map { noise(4096, seed: UInt64(17 * $0)) }
        try truncate("src.raw", to: 2 << 20)
        for k in 0..<448 where k % 5 != 0 { try write("src.raw", kinds[k % 5], at: UInt64(k) << 12) }
        let dataClusters = (0..<448).filter { $0 % 5 != 0 }.count
        ok(try qemuImg("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k", "src.raw", "src.qcow2"), "source")

        ok(try strata("template", "create", "-q", "src.qcow2", "plain.qcow2"), "plain template")
        let r = ok(try strata("template", "create", "--dedup", "src.qcow2", "t.qcow2"), "template --dedup")
        XCTAssertEqual(r.stdout, "Template 't.qcow2' created from 'src.qcow2'\n")

        // Compact: the 4 contents plus metadata (header, L1, refcount table and block, one L2),
        // against every data cluster for the plain template. No freed duplicate stays in the file.
        let plain = try FileManager.default.attributesOfItem(atPath: path("plain.qcow2"))[.size] as? Int ?? 0
        let deduped = try FileManager.default.attributesOfItem(atPath: path("t.qcow2"))[.size] as? Int ?? 0
        XCTAssertGreaterThanOrEqual(plain, dataClusters * 4096)
        XCTAssertLessThanOrEqual(deduped, (4 + 8) * 4096, "about 4 data clusters and metadata: \(deduped) bytes")
        try assertClean("t.qcow2")
        try assertSame("src.qcow2", "t.qcow2")
        let ours = json(ok(try strata("info", "--space", "--output", "json", "t.qcow2"), "info --space").stdout) as? [String: Any]
        let data = (ours?["format-specific"] as? [String: Any])?["data"] as? [String: Any]
        XCTAssertEqual(data?["template"] as? Bool, true)
        XCTAssertEqual(data?["referenced-clusters"] as? Int, dataClusters)
        XCTAssertEqual(data?["stored-clusters"] as? Int, 4)
        XCTAssertEqual(data?["bytes-saved"] as? Int, (dataClusters - 4) * 4096)

        // A linked clone reads as the template; its writes (into a shared cluster too) stay in it.
        ok(try strata("clone", "-q", "t.qcow2", "c.qcow2"), "clone")
        try assertSame("c.qcow2", "src.qcow2")
        let before = try contents("t.qcow2")
        ok(try strata("io", "-c", "write -P 3 4k 8k", "c.qcow2"), "write to the clone")
        XCTAssertEqual(try contents("t.qcow2"), before, "the template is untouched")
        try assertSame("t.qcow2", "src.qcow2")
        try assertClean("c.qcow2")
        try write("src.raw", [UInt8](repeating: 3, count: 8192), at: 4096)
        ok(try qemuImg("compare", "-U", "-F", "raw", "c.qcow2", "src.raw"), "clone = source with its write")
    }

    func testDedupTemplateRefusesCompression() throws {
        try makeSource()
        assertUserError(try strata("template", "create", "-c", "--dedup", "src.qcow2", "t.qcow2"),
                        mentions: ["-c and --dedup cannot be combined"])
        XCTAssertFalse(FileManager.default.fileExists(atPath: path("t.qcow2")))
    }
}
