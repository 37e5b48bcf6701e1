import Foundation
import XCTest
@testable import Strata

/// Inputs the fuzz targets (fuzz/) found crashing, each reduced to the field that mattered and
/// rebuilt here by hand on an image the engine makes in memory.
final class FuzzRegressionTests: XCTestCase {
    /// A 1 MiB image with 512-byte clusters and some data, as bytes.
    func image() throws -> [UInt8] {
        let storage = MemoryStorage(name: "fuzz.qcow2")
        var options = CreateOptions(size: 1 << 20)
        options.clusterSize = 512
        try Qcow2Image.create(storage: storage, path: "fuzz.qcow2", options: options)
        let disk = try Qcow2Image(storage: storage, options: OpenOptions(writable: true, format: .qcow2))
        try [UInt8](repeating: 0xAB, count: 2048).withUnsafeBytes { try disk.write($0, at: 0, fua: false) }
        try disk.close()
        return storage.contents
    }

    func check(_ bytes: [UInt8], repair: CheckRepair?) throws -> (CheckResult, [UInt8]) {
        let storage = MemoryStorage(name: "fuzz.qcow2", bytes: bytes)
        let r = try Qcow2Image.check(storage: storage, path: "fuzz.qcow2", repair: repair) { _ in }
        return (r, storage.contents)
    }

    /// fuzz_check-crash-def9cea1: a refcount table entry of all ones. Reading the stored
    /// refcounts computed `offset + cluster size`, which overflowed (a trap) instead of
    /// treating the block as missing.
    func testCheckWithRefcountTableEntryNear2To64() throws {
        var b = try image()
        let table = Int(b.be64(48))                 // refcount_table_offset
        b.put64(UInt64.max, table)                  // refcount table entry 0: 0xffff_ffff_ffff_ffff
        let (found, _) = try check(b, repair: nil)
        XCTAssertGreaterThan(found.corruptions, 0, "every cluster lost its count")
        // -r all rebuilds the refcount structure, after which the image is clean.
        let (repaired, after) = try check(b, repair: .all)
        XCTAssertEqual(repaired.checkErrors, 0)
        XCTAssertEqual(repaired.corruptions, 0)
        let (again, _) = try check(after, repair: nil)
        XCTAssertEqual([again.corruptions, again.leaks, again.checkErrors], [0, 0, 0])
    }

    /// fuzz_snapshots-crash-4ee0bd5a: the same overflow, reached by opening for writing an image
    /// whose dirty bit is set (the open repairs it first, as QEMU does). Opening a hostile
    /// image writable must repair or refuse it, never trap.
    func testWritableOpenOfDirtyImageWithRefcountTableEntryNear2To64() throws {
        var b = try image()
        b.put64(UInt64.max, Int(b.be64(48)))        // refcount table entry 0: all ones
        b.put64(b.be64(72) | 1, 72)                 // incompatible_features: dirty
        b.put64(b.be64(80) | 1, 80)                 // compatible_features: lazy refcounts
        let storage = MemoryStorage(name: "fuzz.qcow2", bytes: b)
        do {
            let disk = try Qcow2Image(storage: storage, options: OpenOptions(writable: true, format: .qcow2))
            try disk.close()
            let (again, _) = try check(storage.contents, repair: nil)
            XCTAssertEqual([again.corruptions, again.leaks, again.checkErrors], [0, 0, 0])
        } catch let e as StrataError {
            XCTAssertTrue("\(e)".contains("fuzz.qcow2"), "\(e)")
        }
    }

    /// fuzz_check-crash-cd71a253: a snapshot whose L1 table lies on the refcount table. Its
    /// entry 0 (really refcount table entry 0) points at a refcount block, which `-r all` took
    /// for a bad L1 entry and zeroed, wiping every refcount: the image was worse after the
    /// repair than before. Now the snapshot table counts as unreadable and is discarded.
    func testRepairOfSnapshotL1TableOnTheRefcountTable() throws {
        let storage = MemoryStorage(name: "fuzz.qcow2", bytes: try image())
        let disk = try Qcow2Image(storage: storage, options: OpenOptions(writable: true, format: .qcow2))
        _ = try disk.createSnapshot(name: "s1")
        try disk.close()
        var b = storage.contents
        let refcountTable = b.be64(48)              // refcount_table_offset
        let entry = Int(b.be64(64))                 // snapshots_offset: the first entry
        b.put64(refcountTable, entry)               // l1_table_offset: the refcount table
        b.put32(1, entry + 8)                       // l1_size: 1
        let (found, _) = try check(b, repair: nil)
        XCTAssertGreaterThan(found.checkErrors, 0, "the snapshot table cannot be read")
        let (repaired, after) = try check(b, repair: .all)
        XCTAssertEqual(repaired.discardedSnapshots, 1)
        XCTAssertEqual([repaired.corruptions, repaired.leaks, repaired.checkErrors], [0, 0, 0])
        XCTAssertEqual(after.be64(Int(refcountTable)), b.be64(Int(refcountTable)), "refcount table entry 0 kept")
        let (again, _) = try check(after, repair: nil)
        XCTAssertEqual([again.corruptions, again.leaks, again.checkErrors], [0, 0, 0])
    }

    /// fuzz_check-crash-22cd6fb6 and -b1da22c1: two active L1 entries share one L2 table (or
    /// two compressed clusters share a host cluster) in an image with 1-bit refcounts, and the
    /// refcount structure must be rebuilt. No 1-bit count can say 2: after `-r all` the check
    /// honestly reports those clusters (refcount=1 reference=2), and nothing else. With
    /// 16-bit refcounts the same damage is repaired clean.
    func testRepairOfL2TableSharedByTwoL1Entries() throws {
        for bits in [16, 1] {
            let storage = MemoryStorage(name: "fuzz.qcow2")
            var options = CreateOptions(size: 1 << 20)
            options.clusterSize = 512
            options.refcountBits = bits
            try Qcow2Image.create(storage: storage, path: "fuzz.qcow2", options: options)
            let disk = try Qcow2Image(storage: storage, options: OpenOptions(writable: true, format: .qcow2))
            try [UInt8](repeating: 0xAB, count: 2048).withUnsafeBytes { try disk.write($0, at: 0, fua: false) }
            try disk.close()
            var b = storage.contents
            let l1 = Int(b.be64(40))                                // l1_table_offset
            b.put64(b.be64(l1) & ~(UInt64(1) << 63), l1 + 20 * 8)  // L1 entry 20: entry 0's L2 table, COPIED clear
            b.put64(0, Int(b.be64(48)))                             // refcount table entry 0: gone (a rebuild)
            let (_, after) = try check(b, repair: .all)
            var lines: [String] = []
            let again = try Qcow2Image.check(storage: MemoryStorage(name: "fuzz.qcow2", bytes: after), path: "fuzz.qcow2",
                                             repair: nil) { lines.append($0) }
            if bits == 16 {
                XCTAssertEqual([again.corruptions, again.leaks, again.checkErrors], [0, 0, 0], "\(lines)")
            } else {
                // The L2 table and the four data clusters it maps are each referenced twice.
                XCTAssertEqual([again.corruptions, again.leaks, again.checkErrors], [5, 0, 0], "\(lines)")
                XCTAssertTrue(lines.filter { $0.hasPrefix("ERROR") }.allSatisfy { $0.hasSuffix("refcount=1 reference=2") }, "\(lines)")
            }
        }
    }
}
