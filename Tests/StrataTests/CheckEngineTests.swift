import Foundation
import XCTest
import TestSupport
@testable import Strata

/// The check and repair engine on images in memory: clean images stay clean, damage is
/// counted as qemu-img counts it, and a repair cut short by a crash at any point never
/// leaves a refcount below its references.
final class CheckEngineTests: XCTestCase {
    /// A 2 MiB image of 64 KiB clusters with data, a snapshot, and a cluster rewritten after it.
    func makeImage() throws -> MemoryStorage {
        let disk = MemoryStorage(name: "check.qcow2")
        try Qcow2Image.create(storage: disk, path: disk.name, options: CreateOptions(size: 2 << 20))
        let img = try Qcow2Image(storage: disk, options: OpenOptions(writable: true))
        let a = [UInt8](repeating: 1, count: 3 * 65536), b = [UInt8](repeating: 2, count: 65536)
        try a.withUnsafeBytes { try img.write($0, at: 0, fua: false) }
        try img.createSnapshot(name: "s1")
        try b.withUnsafeBytes { try img.write($0, at: 65536, fua: false) }
        try img.close()
        return disk
    }

    func check(_ disk: any BlockStorage, _ repair: CheckRepair? = nil) throws -> (CheckResult, [String]) {
        let box = LineBox()
        let r = try Qcow2Image.check(storage: disk, path: "check.qcow2", repair: repair) { box.lines.append($0) }
        return (r, box.lines)
    }

    final class LineBox: @unchecked Sendable { var lines: [String] = [] }

    func header(_ disk: MemoryStorage) -> (l1: UInt64, refTable: UInt64, refBlock: UInt64, l2: UInt64) {
        let b = disk.contents
        let l1 = b.be64(40), rt = b.be64(48)
        return (l1, rt, b.be64(Int(rt)) & ~511, b.be64(Int(l1)) & L1Entry.offsetMask)
    }

    func setRefcount(_ disk: MemoryStorage, cluster c: UInt64, to v: UInt16) throws {
        var f = [UInt8](repeating: 0, count: 2)
        f.put16(v, 0)
        try disk.writeBytes(f, at: header(disk).refBlock + 2 * c)
    }

    func testCleanImageHasNoErrors() throws {
        let (r, lines) = try check(try makeImage())
        XCTAssertEqual(r.exitCode, 0, "\(lines)")
        XCTAssertEqual(r.totalClusters, 32)
        XCTAssertEqual(r.allocatedClusters, 3)
        XCTAssertEqual(lines, [])
    }

    func testLeakIsCountedAndFreed() throws {
        let disk = try makeImage()
        let c = try disk.length() / 65536
        try disk.setLength((c + 1) * 65536)
        try setRefcount(disk, cluster: c, to: 1)
        let (r, lines) = try check(disk)
        XCTAssertEqual(r.leaks, 1)
        XCTAssertEqual(r.exitCode, 3)
        XCTAssertEqual(lines, ["Leaked cluster \(c) refcount=1 reference=0"])
        let (fixed, _) = try check(disk, .leaks)
        XCTAssertEqual(fixed.leaksFixed, 1)
        XCTAssertEqual(fixed.exitCode, 0)
    }

    func testRefcountTooLowIsRaised() throws {
        let disk = try makeImage()
        let host = disk.contents.be64(Int(header(disk).l2)) & L2Entry.offsetMask
        try setRefcount(disk, cluster: host / 65536, to: 1)
        let (r, _) = try check(disk)
        XCTAssertEqual(r.exitCode, 2)
        let (leaksOnly, _) = try check(disk, .leaks)
        XCTAssertEqual(leaksOnly.exitCode, 2, "-r leaks leaves corruptions alone")
        let (fixed, lines) = try check(disk, .all)
        XCTAssertEqual(fixed.exitCode, 0, "\(lines)")
        XCTAssertGreaterThan(fixed.corruptionsFixed, 0)
    }

    func testDestroyedRefcountTableIsRebuiltAtTheEnd() throws {
        let disk = try makeImage()
        let h = header(disk)
        let before = try disk.length()
        try disk.writeBytes([UInt8](repeating: 0, count: 65536), at: h.refTable)
        let (fixed, lines) = try check(disk, .all)
        XCTAssertEqual(fixed.exitCode, 0, "\(lines)")
        XCTAssertTrue(lines.contains("Rebuilding refcount structure"))
        XCTAssertGreaterThanOrEqual(header(disk).refTable, before, "the new table lies at the end of the file")
        let img = try Qcow2Image(storage: disk, options: OpenOptions())
        var buf = [UInt8](repeating: 0, count: 3 * 65536)
        try buf.withUnsafeMutableBytes { try img.read(into: $0, at: 0) }
        XCTAssertEqual(Array(buf[0..<65536]), [UInt8](repeating: 1, count: 65536))
        XCTAssertEqual(Array(buf[65536..<131072]), [UInt8](repeating: 2, count: 65536))
    }

    /// A crash at any point of a repair (refcounts raised, COPIED cleared, leaks freed) leaves
    /// no refcount below its references: only leaks and the original damage.
    func testRepairCutShortNeverLowersARefcountBelowItsReferences() throws {
        try crashDuringRepair { disk in
            let h = header(disk)
            // A leak, a refcount too low, and COPIED wrongly set on a shared cluster.
            let c = try disk.length() / 65536
            try disk.setLength((c + 1) * 65536)
            try setRefcount(disk, cluster: c, to: 1)
            let shared = disk.contents.be64(Int(h.l2)) & L2Entry.offsetMask
            var e = [UInt8](repeating: 0, count: 8)
            e.put64(shared | L2Entry.copied, 0)
            try disk.writeBytes(e, at: h.l2)
            let third = disk.contents.be64(Int(h.l2) + 16) & L2Entry.offsetMask
            try setRefcount(disk, cluster: third / 65536, to: 1)
        }
    }

    /// The same for a rebuild of a destroyed refcount table, with an entry past the end of
    /// the file dropped on the way.
    func testRebuildCutShortNeverLowersARefcountBelowItsReferences() throws {
        try crashDuringRepair { disk in
            let h = header(disk)
            var e = [UInt8](repeating: 0, count: 8)
            e.put64(L2Entry.copied | (1 << 30), 0)
            try disk.writeBytes(e, at: h.l2 + 8 * 20)
            try disk.writeBytes([UInt8](repeating: 0, count: 65536), at: h.refTable)
        }
    }

    func crashDuringRepair(_ damage: (MemoryStorage) throws -> Void, file: StaticString = #filePath, line: UInt = #line) throws {
        let disk = try makeImage()
        try damage(disk)
        let base = disk.contents
        let (_, damagedLines) = try check(MemoryStorage(name: "check.qcow2", bytes: base))
        let tooLow = damagedLines.filter { $0.hasPrefix("ERROR cluster") }.count

        let rec = RecordingStorage(MemoryStorage(name: "check.qcow2", bytes: base))
        let (fixed, lines) = try check(rec, .all)
        XCTAssertEqual(fixed.exitCode, 0, "\(lines)", file: file, line: line)
        let events = rec.events
        var rng = SeededRandom(seed: 11)
        let dir = try tempDir(self)
        for k in 0...events.count {
            try writeCrashImage(events, upTo: k, base: base, rng: &rng, to: "\(dir)/crash.qcow2")
            let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: "\(dir)/crash.qcow2")))
            let (_, lines) = try check(MemoryStorage(name: "check.qcow2", bytes: bytes))
            XCTAssertLessThanOrEqual(lines.filter { $0.hasPrefix("ERROR cluster") }.count, tooLow, "crash after event \(k): \(lines)",
                                     file: file, line: line)
        }
    }

    /// A lazy-refcounts writer that crashed left the dirty bit and a refcount too low: an open
    /// for writing repairs the image first (as QEMU does) instead of refusing it.
    func testDirtyImageIsRepairedWhenOpenedForWriting() throws {
        let disk = try makeImage()
        let h = header(disk)
        var f = [UInt8](repeating: 0, count: 8)
        f.put64(IncompatibleFeatures.dirty.rawValue, 0)
        try disk.writeBytes(f, at: 72)
        f.put64(CompatibleFeatures.lazyRefcounts.rawValue, 0)
        try disk.writeBytes(f, at: 80)
        let shared = disk.contents.be64(Int(h.l2)) & L2Entry.offsetMask
        try setRefcount(disk, cluster: shared / 65536, to: 1)
        XCTAssertEqual(try check(disk).0.exitCode, 2)

        let img = try Qcow2Image(storage: disk, options: OpenOptions(writable: true))
        XCTAssertFalse(img.header.incompatibleFeatures.contains(.dirty))
        let c = [UInt8](repeating: 7, count: 65536)
        try c.withUnsafeBytes { try img.write($0, at: 0, fua: false) }
        try img.close()
        let (r, lines) = try check(disk)
        XCTAssertEqual(r.exitCode, 0, "\(lines)")
        // The snapshot kept its data: the write copied the shared cluster instead of overwriting it.
        let snap = try Qcow2Image(storage: disk, options: { var o = OpenOptions(); o.snapshot = "s1"; return o }())
        var buf = [UInt8](repeating: 0, count: 65536)
        try buf.withUnsafeMutableBytes { try snap.read(into: $0, at: 0) }
        XCTAssertEqual(buf, [UInt8](repeating: 1, count: 65536))
    }
}
