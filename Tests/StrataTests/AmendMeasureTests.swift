import Foundation
import XCTest
import TestSupport
@testable import Strata

/// Amending images in place, and measuring what a new image needs, with qemu-img as the oracle.
final class AmendMeasureTests: XCTestCase {
    var dir = ""

    override func setUpWithError() throws {
        try requireTool("qemu-img", package: "qemu-utils")
        dir = try tempDir(self)
    }

    func qemu(_ args: String...) throws {
        let r = try runTool(["qemu-img"] + args)
        XCTAssertEqual(r.status, 0, "qemu-img \(args.joined(separator: " ")): \(r.err)")
    }
    func qemuIO(_ path: String, _ cmd: String) throws {
        let r = try runTool(["qemu-io", "-f", "qcow2", path, "-c", cmd])
        XCTAssertEqual(r.status, 0, r.err)
    }

    /// An image with data, zero clusters (plain and preallocated) and two snapshots, made by QEMU.
    func busyImage(_ name: String, options: String = "compat=1.1") throws -> (String, [UInt8]) {
        let path = "\(dir)/\(name)"
        try qemu("create", "-q", "-f", "qcow2", "-o", options, path, "8M")
        try qemuIO(path, "write -P 1 0 1M")
        try qemu("snapshot", "-c", "s1", path)
        try qemuIO(path, "write -z 64k 128k")       // zero clusters keeping their hosts (shared with s1)
        try qemuIO(path, "write -z -u 2M 128k")     // plain zero clusters
        try qemuIO(path, "write -P 2 4M 64k")
        try qemu("snapshot", "-c", "s2", path)
        try qemuIO(path, "write -P 3 512k 64k")
        return (path, try qemuRaw(path, dir: dir))
    }

    func snapshotContents(_ path: String, _ name: String) throws -> [UInt8] {
        let copy = "\(dir)/snap-\(UUID().uuidString).qcow2"
        try qemu("convert", "-U", "-l", "snapshot.name=\(name)", "-O", "qcow2", path, copy)
        return try qemuRaw(copy, dir: dir)
    }

    func testRefcountWidthChangesBothWaysKeepEverything() throws {
        let (path, content) = try busyImage("width.qcow2")
        let s1 = try snapshotContents(path, "s1")
        for bits in [64, 2, 8, 16] {
            let img = try Qcow2Image(path: path, options: OpenOptions(writable: true))
            var o = AmendOptions()
            o.refcountBits = bits
            try img.amend(o)
            try img.close()
            try assertQemuCheckClean(path)
            let info = try runTool(["qemu-img", "info", path]).out
            XCTAssertTrue(info.contains("refcount bits: \(bits)"), info)
            XCTAssertEqual(try qemuRaw(path, dir: dir), content, "after refcount_bits=\(bits)")
            XCTAssertEqual(try snapshotContents(path, "s1"), s1)
        }
        // Snapshots share clusters (refcount 3: active, s1, s2): one bit cannot hold that.
        let img = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        var o = AmendOptions()
        o.refcountBits = 1
        XCTAssertThrowsError(try img.amend(o)) { e in XCTAssertTrue("\(e)".contains("has a refcount of 3"), "\(e)") }
        try img.close()
        try assertQemuCheckClean(path)
    }

    func testDowngradeExpandsZeroClustersEverywhereAndUpgradeComesBack() throws {
        let (path, content) = try busyImage("compat.qcow2")
        let s1 = try snapshotContents(path, "s1"), s2 = try snapshotContents(path, "s2")
        var img = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        var o = AmendOptions()
        o.version = 2
        try img.amend(o)
        try img.close()
        try assertQemuCheckClean(path)
        XCTAssertTrue(try runTool(["qemu-img", "info", path]).out.contains("compat: 0.10"))
        XCTAssertEqual(try qemuRaw(path, dir: dir), content)
        XCTAssertEqual(try snapshotContents(path, "s1"), s1)
        XCTAssertEqual(try snapshotContents(path, "s2"), s2)

        img = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        o.version = 3
        o.lazyRefcounts = true
        try img.amend(o)
        try img.close()
        try assertQemuCheckClean(path)
        let info = try runTool(["qemu-img", "info", path]).out
        XCTAssertTrue(info.contains("compat: 1.1") && info.contains("lazy refcounts: true"), info)
        XCTAssertEqual(try qemuRaw(path, dir: dir), content)
        XCTAssertEqual(try snapshotContents(path, "s2"), s2)
    }

    /// A version 2 image with snapshots (no extra data): the upgrade writes the snapshot
    /// table anew with the extra data version 3 needs.
    func testUpgradeOfAVersion2ImageWithSnapshots() throws {
        let (path, content) = try busyImage("v2.qcow2", options: "compat=0.10")
        let s1 = try snapshotContents(path, "s1")
        let img = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        var o = AmendOptions()
        o.version = 3
        try img.amend(o)
        try img.close()
        try assertQemuCheckClean(path)
        XCTAssertEqual(try qemuRaw(path, dir: dir), content)
        XCTAssertEqual(try snapshotContents(path, "s1"), s1)
        let list = try runTool(["qemu-img", "snapshot", "-l", path]).out
        XCTAssertTrue(list.contains("s1") && list.contains("s2"), list)
    }

    func testDowngradeRefusals() throws {
        let path = "\(dir)/ext.qcow2"
        try qemu("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", path, "1M")
        let img = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        var o = AmendOptions()
        o.version = 2
        XCTAssertThrowsError(try img.amend(o)) { e in XCTAssertTrue("\(e)".contains("extended L2"), "\(e)") }
        o = AmendOptions()
        o.version = 2
        o.refcountBits = 8
        XCTAssertThrowsError(try img.amend(o)) { e in XCTAssertTrue("\(e)".contains("refcount_bits=16"), "\(e)") }
        try img.close()
        try assertQemuCheckClean(path)
    }

    func testAmendSizeShrinksDroppingData() throws {
        let (path, content) = try busyImage("size.qcow2")
        let img = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        var o = AmendOptions()
        o.size = 1 << 20
        try img.amend(o)
        try img.close()
        try assertQemuCheckClean(path)
        XCTAssertEqual(try qemuRaw(path, dir: dir), Array(content.prefix(1 << 20)))
    }

    // MARK: Measure

    /// The JSON qemu-img measure prints, as numbers.
    func qemuMeasure(_ args: [String]) throws -> (UInt64, UInt64, UInt64?) {
        let r = try runTool(["qemu-img", "measure", "--output=json"] + args)
        XCTAssertEqual(r.status, 0, r.err)
        let o = try JSONSerialization.jsonObject(with: Data(r.out.utf8)) as! [String: Any]
        return ((o["required"] as! NSNumber).uint64Value, (o["fully-allocated"] as! NSNumber).uint64Value,
                (o["bitmaps"] as? NSNumber)?.uint64Value)
    }

    func testMeasureAgreesWithQemu() throws {
        let (busy, _) = try busyImage("m.qcow2")
        try qemu("bitmap", "--add", busy, "b0")
        let raw = "\(dir)/m.raw"
        _ = FileManager.default.createFile(atPath: raw, contents: nil)
        let h = try FileHandle(forWritingTo: URL(fileURLWithPath: raw))
        try h.seek(toOffset: 300_000)
        h.write(Data(repeating: 7, count: 200_000))
        try h.truncate(atOffset: 10 << 20)
        try h.close()
        let base = "\(dir)/base.qcow2", top = "\(dir)/top.qcow2"
        try qemu("create", "-q", "-f", "qcow2", base, "4M")
        try qemuIO(base, "write -P 5 1M 100k")
        try qemu("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
        try qemuIO(top, "write -P 6 3M 10k")

        struct Case { var source: String?; var size: UInt64?; var format: ImageFormat; var o: CreateOptions; var qemuArgs: [String] }
        var cases: [Case] = []
        for (src, fmt) in [(busy, "qcow2"), (raw, "raw"), (top, "qcow2")] {
            for opts in ["cluster_size=65536", "cluster_size=4096,refcount_bits=64", "cluster_size=2M,extended_l2=on", "compat=0.10"] {
                var o = CreateOptions()
                o.clusterSize = opts.contains("4096") ? 4096 : opts.contains("2M") ? 2 << 20 : 65536
                o.refcountBits = opts.contains("64") ? 64 : 16
                o.extendedL2 = opts.contains("extended_l2")
                o.version = opts.contains("0.10") ? 2 : 3
                cases.append(Case(source: src, size: nil, format: .qcow2, o: o, qemuArgs: ["-f", fmt, "-O", "qcow2", "-o", opts, src]))
            }
            cases.append(Case(source: src, size: nil, format: .raw, o: CreateOptions(), qemuArgs: ["-f", fmt, "-O", "raw", src]))
        }
        cases.append(Case(source: nil, size: 10 << 30, format: .qcow2, o: CreateOptions(), qemuArgs: ["--size", "10G", "-O", "qcow2"]))
        cases.append(Case(source: nil, size: 1 << 40, format: .raw, o: CreateOptions(), qemuArgs: ["--size", "1T", "-O", "raw"]))
        for c in cases {
            let src = try c.source.map { try openImage(path: $0, options: OpenOptions(forceShare: true)) }
            defer { try? src?.close() }
            let m = try SizeMeasurement.of(format: c.format, options: c.o, size: c.size, source: src, path: c.source ?? "new")
            let (req, full, bitmaps) = try qemuMeasure(c.qemuArgs)
            XCTAssertEqual(m.required, req, "required: \(c.qemuArgs)")
            XCTAssertEqual(m.fullyAllocated, full, "fully allocated: \(c.qemuArgs)")
            XCTAssertEqual(m.bitmaps, bitmaps, "bitmaps: \(c.qemuArgs)")
        }
    }
}
