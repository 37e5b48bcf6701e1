import Foundation
import XCTest
@testable import Strata

/// Every named cap in ``Limits``, at its edge: a value just past it is refused with an error
/// that names the field, and (where the check is cheap to reach) the value at the cap gets
/// past that check. Images are made in memory by the engine, then one header field is patched.
///
/// The allocator's side of `maxHostOffset` (no allocation ends past 2^56) has no test: a
/// refcount table within `maxRefcountTableBytes` cannot describe a file that large unless
/// clusters are 2 MiB and refcounts 1 bit, and no test storage is that sparse.
final class LimitTests: XCTestCase {
    /// A fresh qcow2 image in memory, as bytes.
    func image(size: UInt64 = 1 << 20, clusterSize: Int = 512) throws -> [UInt8] {
        let storage = MemoryStorage(name: "limit.qcow2")
        var options = CreateOptions(size: size)
        options.clusterSize = clusterSize
        try Qcow2Image.create(storage: storage, path: "limit.qcow2", options: options)
        return storage.contents
    }

    /// Opens `bytes` read-only; the error's text, or nil when it opened.
    func openError(_ bytes: [UInt8]) -> String? {
        do {
            let disk = try Qcow2Image(storage: MemoryStorage(name: "limit.qcow2", bytes: bytes),
                                      options: OpenOptions(format: .qcow2))
            try disk.close()
            return nil
        } catch {
            return "\(error)"
        }
    }

    func assertRefused(_ bytes: [UInt8], mentioning field: String, file: StaticString = #filePath, line: UInt = #line) {
        guard let message = openError(bytes) else { return XCTFail("opened; expected an error about \(field)", file: file, line: line) }
        XCTAssertTrue(message.contains(field), "'\(message)' should name \(field)", file: file, line: line)
    }

    /// Opening fails, if at all, for some reason other than `field`'s cap.
    func assertNotRefusedFor(_ bytes: [UInt8], _ field: String, file: StaticString = #filePath, line: UInt = #line) {
        if let message = openError(bytes) {
            XCTAssertFalse(message.contains(field), "'\(message)' should not be about \(field)", file: file, line: line)
        }
    }

    // MARK: Header fields

    func testL1SizeAboveMaxL1BytesIsRefused() throws {
        var b = try image()
        b.put32(UInt32(Limits.maxL1Bytes / 8 + 1), 36)  // l1_size: one entry past 32 MiB
        assertRefused(b, mentioning: "l1_size")
        b.put32(UInt32(Limits.maxL1Bytes / 8), 36)      // l1_size: exactly 32 MiB (past the file's end)
        assertNotRefusedFor(b, "l1_size")
        assertRefused(b, mentioning: "l1_table_offset")
    }

    func testCreateRefusesASizeWhoseL1WouldExceedMaxL1Bytes() throws {
        // 512-byte clusters: one L1 entry maps 64 × 512 B = 32 KiB of disk.
        let perEntry: UInt64 = 32 << 10
        let storage = MemoryStorage(name: "limit.qcow2")
        var options = CreateOptions(size: Limits.maxL1Bytes / 8 * perEntry + perEntry)
        options.clusterSize = 512
        XCTAssertThrowsError(try Qcow2Image.create(storage: storage, path: "limit.qcow2", options: options))
    }

    func testRefcountTableAboveMaxRefcountTableBytesIsRefused() throws {
        var b = try image()
        b.put32(UInt32(Limits.maxRefcountTableBytes / 512 + 1), 56)  // refcount_table_clusters
        assertRefused(b, mentioning: "refcount_table_clusters")
        b.put32(UInt32(Limits.maxRefcountTableBytes / 512), 56)      // exactly 8 MiB: past the end
        assertNotRefusedFor(b, "refcount_table_clusters")
        assertRefused(b, mentioning: "refcount_table_offset")
    }

    func testBackingNameAboveMaxBackingNameBytesIsRefused() throws {
        var b = try image(clusterSize: 65536)
        b.put64(1024, 8)                                      // backing_file_offset
        b.put32(UInt32(Limits.maxBackingNameBytes + 1), 16)   // backing_file_size: 1024
        assertRefused(b, mentioning: "backing_file_size")
        b.put32(UInt32(Limits.maxBackingNameBytes), 16)       // 1023: allowed (the name is then missing)
        assertNotRefusedFor(b, "backing_file_size")
    }

    func testCreateRefusesABackingNameAboveMaxBackingNameBytes() throws {
        var options = CreateOptions(size: 1 << 20)
        options.backingFile = String(repeating: "b", count: Int(Limits.maxBackingNameBytes) + 1)
        options.backingFormat = .raw
        options.unsafeBacking = true
        XCTAssertThrowsError(try Qcow2Image.create(storage: MemoryStorage(name: "limit.qcow2"), path: "limit.qcow2", options: options))
    }

    func testHeaderExtensionAboveMaxHeaderExtensionBytesIsRefused() throws {
        let cap = Int(Limits.maxHeaderExtensionBytes)
        // An unknown extension (type 0x12345678) of exactly the cap, then the end marker.
        var area = [UInt8](repeating: 0, count: 8 + cap + 8)
        area.put32(0x1234_5678, 0)
        area.put32(UInt32(cap), 4)
        let ok = try HeaderExtensions.decode(area, start: 0, limit: area.count, path: "limit.qcow2")
        XCTAssertEqual(ok.unknown.first?.1.count, cap)
        // One byte more (the area is large enough to hold it): refused.
        area.put32(UInt32(cap + 1), 4)
        area += [UInt8](repeating: 0, count: 8)
        XCTAssertThrowsError(try HeaderExtensions.decode(area, start: 0, limit: area.count, path: "limit.qcow2")) {
            XCTAssertTrue("\($0)".contains("header extension"), "\($0)")
        }
    }

    func testVirtualSizeAboveMaxVirtualSizeIsRefused() throws {
        var b = try image()
        b.put64(Limits.maxVirtualSize + 512, 24)  // size
        assertRefused(b, mentioning: "size")
        var options = CreateOptions(size: Limits.maxVirtualSize + (2 << 20))
        options.clusterSize = 2 << 20
        XCTAssertThrowsError(try Qcow2Image.create(storage: MemoryStorage(name: "limit.qcow2"), path: "limit.qcow2", options: options)) {
            XCTAssertTrue("\($0)".contains("largest virtual size"), "\($0)")
        }
        let disk = try Qcow2Image(storage: MemoryStorage(name: "limit.qcow2", bytes: try image()), options: OpenOptions(writable: true, format: .qcow2))
        defer { try? disk.close() }
        XCTAssertThrowsError(try disk.resize(to: Limits.maxVirtualSize + 512))
    }

    func testTableAtMaxHostOffsetIsRefused() throws {
        var b = try image()
        b.put64(Limits.maxHostOffset, 40)  // l1_table_offset: aligned, but at 2^56
        assertRefused(b, mentioning: "l1_table_offset")
    }

    // MARK: Snapshots

    func testMoreThanMaxSnapshotsIsRefused() throws {
        var b = try image()
        b.put32(UInt32(Limits.maxSnapshots + 1), 60)  // nb_snapshots
        b.put64(512, 64)                              // snapshots_offset
        // The active disk still opens; the table is refused, naming the count.
        let disk = try Qcow2Image(storage: MemoryStorage(name: "limit.qcow2", bytes: b), options: OpenOptions(format: .qcow2))
        defer { try? disk.close() }
        XCTAssertTrue(disk.snapshots.isEmpty)
        XCTAssertTrue(disk.snapshotTableError.map { "\($0)" }?.contains("nb_snapshots") ?? false, "\(String(describing: disk.snapshotTableError))")
        b.put32(UInt32(Limits.maxSnapshots), 60)      // exactly the cap: refused only for the table's end
        let again = try Qcow2Image(storage: MemoryStorage(name: "limit.qcow2", bytes: b), options: OpenOptions(format: .qcow2))
        defer { try? again.close() }
        XCTAssertFalse(again.snapshotTableError.map { "\($0)" }?.contains("nb_snapshots") ?? true)
    }

    /// One snapshot table entry: 40 fixed bytes, extra data, id, name.
    func snapshotEntry(extra: Int, id: Int, name: Int) -> [UInt8] {
        var e = [UInt8](repeating: 0, count: 40)
        e.put64(512, 0)              // l1_table_offset
        e.put32(2, 8)                // l1_size
        e.put16(UInt16(id), 12)      // id_str_size
        e.put16(UInt16(name), 14)    // name_size
        e.put32(UInt32(extra), 36)   // extra_data_size
        e += [UInt8](repeating: 0, count: extra) + [UInt8](repeating: 0x31, count: id) + [UInt8](repeating: 0x61, count: name)
        return e + [UInt8](repeating: 0, count: (8 - e.count % 8) % 8)
    }

    func testSnapshotExtraDataAboveMaxSnapshotExtraBytesIsRefused() throws {
        let cap = Int(Limits.maxSnapshotExtraBytes)
        XCTAssertEqual(try SnapshotRecord.decodeTable(snapshotEntry(extra: cap, id: 1, name: 1), count: 1, tableOffset: 0, path: "t").count, 1)
        XCTAssertThrowsError(try SnapshotRecord.decodeTable(snapshotEntry(extra: cap + 1, id: 1, name: 1), count: 1, tableOffset: 0, path: "t")) {
            XCTAssertTrue("\($0)".contains("extra data"), "\($0)")
        }
    }

    func testSnapshotNameAboveMaxSnapshotNameBytesIsRefused() throws {
        let cap = Int(Limits.maxSnapshotNameBytes)
        XCTAssertEqual(try SnapshotRecord.decodeTable(snapshotEntry(extra: 16, id: cap, name: cap), count: 1, tableOffset: 0, path: "t").first?.name.utf8.count, cap)
        XCTAssertThrowsError(try SnapshotRecord.decodeTable(snapshotEntry(extra: 16, id: 1, name: cap + 1), count: 1, tableOffset: 0, path: "t"))
        XCTAssertThrowsError(try SnapshotRecord.decodeTable(snapshotEntry(extra: 16, id: cap + 1, name: 1), count: 1, tableOffset: 0, path: "t"))
        // And when creating one.
        let disk = try Qcow2Image(storage: MemoryStorage(name: "limit.qcow2", bytes: try image()), options: OpenOptions(writable: true, format: .qcow2))
        defer { try? disk.close() }
        XCTAssertNoThrow(try disk.createSnapshot(name: String(repeating: "n", count: cap)))
        XCTAssertThrowsError(try disk.createSnapshot(name: String(repeating: "m", count: cap + 1)))
    }

    // MARK: Bitmaps

    func testBitmapsExtensionCountsAreCapped() throws {
        func ext(count: UInt32, directorySize: UInt64) -> [UInt8] {
            var b = [UInt8](repeating: 0, count: BitmapsExtension.length)
            b.put32(count, 0)              // nb_bitmaps
            b.put64(directorySize, 8)      // bitmap_directory_size
            b.put64(65536, 16)             // bitmap_directory_offset
            return b
        }
        XCTAssertNoThrow(try BitmapsExtension.decode(ext(count: UInt32(Limits.maxBitmaps), directorySize: Limits.maxBitmapDirectoryBytes), path: "t"))
        XCTAssertThrowsError(try BitmapsExtension.decode(ext(count: UInt32(Limits.maxBitmaps + 1), directorySize: 24), path: "t")) {
            XCTAssertTrue("\($0)".contains("nb_bitmaps"), "\($0)")
        }
        XCTAssertThrowsError(try BitmapsExtension.decode(ext(count: 1, directorySize: Limits.maxBitmapDirectoryBytes + 1), path: "t")) {
            XCTAssertTrue("\($0)".contains("bitmap_directory_size"), "\($0)")
        }
    }

    func testBitmapDirectoryEntriesAreCapped() throws {
        func entry(tableSize: UInt32, nameSize: Int) -> [UInt8] {
            var e = [UInt8](repeating: 0, count: 24)
            e.put64(65536, 0)               // bitmap_table_offset
            e.put32(tableSize, 8)           // bitmap_table_size
            e[17] = 16                      // granularity_bits
            e.put16(UInt16(nameSize), 18)   // name_size
            e += [UInt8](repeating: 0x62, count: nameSize)
            return e + [UInt8](repeating: 0, count: (8 - e.count % 8) % 8)
        }
        let nameCap = Int(Limits.maxBitmapNameBytes), tableCap = UInt32(Limits.maxBitmapTableEntries)
        XCTAssertEqual(try BitmapDirectoryEntry.decodeDirectory(entry(tableSize: tableCap, nameSize: nameCap), count: 1, offset: 0, path: "t").first?.name.utf8.count, nameCap)
        XCTAssertThrowsError(try BitmapDirectoryEntry.decodeDirectory(entry(tableSize: 1, nameSize: nameCap + 1), count: 1, offset: 0, path: "t"))
        XCTAssertThrowsError(try BitmapDirectoryEntry.decodeDirectory(entry(tableSize: tableCap + 1, nameSize: 1), count: 1, offset: 0, path: "t"))
    }

    // MARK: Backing chain, memory

    func testBackingChainDeeperThanMaxBackingChainDepthIsRefused() throws {
        let dir = try tempDir(self)
        var options = CreateOptions(size: 64 << 10)
        options.clusterSize = 512
        try Qcow2Image.create(path: "\(dir)/0.qcow2", options: options)
        func chained(over i: Int) -> CreateOptions {
            var o = CreateOptions(size: 64 << 10)
            o.clusterSize = 512
            o.backingFile = "\(i - 1).qcow2"
            o.backingFormat = .qcow2
            return o
        }
        for i in 1..<Limits.maxBackingChainDepth { try Qcow2Image.create(path: "\(dir)/\(i).qcow2", options: chained(over: i)) }
        // Creating one more on top opens the chain below it, which is refused...
        let top = Limits.maxBackingChainDepth
        XCTAssertThrowsError(try Qcow2Image.create(path: "\(dir)/\(top).qcow2", options: chained(over: top)))
        // ...unless the backing file is not opened (-u).
        var unsafe = chained(over: top)
        unsafe.unsafeBacking = true
        try Qcow2Image.create(path: "\(dir)/\(top).qcow2", options: unsafe)
        // Top plus maxBackingChainDepth backing files: one too many.
        XCTAssertThrowsError(try Qcow2Image(path: "\(dir)/\(Limits.maxBackingChainDepth).qcow2", options: OpenOptions())) {
            XCTAssertTrue("\($0)".contains("\(Limits.maxBackingChainDepth)"), "\($0)")
        }
        // A chain of exactly maxBackingChainDepth images opens.
        let disk = try Qcow2Image(path: "\(dir)/\(Limits.maxBackingChainDepth - 1).qcow2", options: OpenOptions())
        try disk.close()
    }

    func testMemoryStorageStopsAtMaxMemoryStorage() throws {
        let storage = MemoryStorage(name: "mem")
        XCTAssertThrowsError(try [UInt8](repeating: 1, count: 1).withUnsafeBytes { try storage.write($0, at: Limits.maxMemoryStorage) })
        XCTAssertThrowsError(try storage.setLength(Limits.maxMemoryStorage + 1))
        XCTAssertEqual(try storage.length(), 0)
    }

    // MARK: Snapshot table size

    /// An image whose snapshot table of 65536 entries (`maxSnapshots`) is `entryBytes` each
    /// (fixed 40 bytes plus extra data, no L1 table), laid out after the image.
    func imageWithSnapshotTable(entryBytes: Int, lastEntryBytes: Int) throws -> [UInt8] {
        var b = try image(clusterSize: 65536)
        let tableOffset = (b.count + 65535) / 65536 * 65536
        let count = Int(Limits.maxSnapshots)
        b += [UInt8](repeating: 0, count: tableOffset - b.count + (count - 1) * entryBytes + lastEntryBytes)
        for i in 0..<count {
            let at = tableOffset + i * entryBytes
            b.put32(UInt32((i == count - 1 ? lastEntryBytes : entryBytes) - 40), at + 36)  // extra_data_size
        }
        b.put32(UInt32(count), 60)         // nb_snapshots
        b.put64(UInt64(tableOffset), 64)   // snapshots_offset
        return b
    }

    func testSnapshotTableAboveMaxSnapshotTableBytesIsRefused() throws {
        // 65536 entries of 1024 bytes: exactly 64 MiB.
        XCTAssertEqual(Limits.maxSnapshotTableBytes, UInt64(Limits.maxSnapshots) * 1024)
        let atCap = try Qcow2Image(storage: MemoryStorage(name: "limit.qcow2", bytes: try imageWithSnapshotTable(entryBytes: 1024, lastEntryBytes: 1024)),
                                   options: OpenOptions(format: .qcow2))
        XCTAssertNil(atCap.snapshotTableError)
        XCTAssertEqual(atCap.snapshots.count, Int(Limits.maxSnapshots))
        try atCap.close()
        // The last entry 8 bytes longer: the table is 8 bytes past the cap.
        let past = try Qcow2Image(storage: MemoryStorage(name: "limit.qcow2", bytes: try imageWithSnapshotTable(entryBytes: 1024, lastEntryBytes: 1032)),
                                  options: OpenOptions(format: .qcow2))
        defer { try? past.close() }
        XCTAssertTrue(past.snapshots.isEmpty)
        XCTAssertTrue(past.snapshotTableError.map { "\($0)" }?.contains("\(Limits.maxSnapshotTableBytes) bytes") ?? false,
                      "\(String(describing: past.snapshotTableError))")
    }

    // MARK: Dedup index

    /// The in-memory index holds `maxDedupIndexEntries` entries (the capacity a dedup image
    /// opens with); past that, new hashes are not recorded (dedup ratio drops), while known
    /// hashes still update. The edge is shown on an index of 1024 entries: the code is the same.
    func testDedupIndexStopsRecordingAtMaxDedupIndexEntries() throws {
        var options = CreateOptions(size: 1 << 20)
        options.dedupWrites = true
        let storage = MemoryStorage(name: "limit.qcow2")
        try Qcow2Image.create(storage: storage, path: "limit.qcow2", options: options)
        let disk = try Qcow2Image(storage: MemoryStorage(name: "limit.qcow2", bytes: storage.contents), options: OpenOptions(writable: true))
        XCTAssertEqual(disk.dedup?.capacity, Limits.maxDedupIndexEntries)
        try disk.close()

        let cap = 1024
        let index = DedupIndex(capacity: cap)
        for h in 0..<UInt64(cap) { index.insert(h &* 0x9E37_79B9_7F4A_7C15, DedupIndex.Entry(host: h + 1, guest: h)) }
        XCTAssertEqual(index.lookup(UInt64(cap - 1) &* 0x9E37_79B9_7F4A_7C15)?.host, UInt64(cap), "the cap-th entry is recorded")
        let extra: UInt64 = 0xDEAD_BEEF_0000_0001
        index.insert(extra, DedupIndex.Entry(host: 7, guest: 7))
        XCTAssertNil(index.lookup(extra), "one past the cap is not recorded")
        index.insert(0, DedupIndex.Entry(host: 9, guest: 9))
        XCTAssertEqual(index.lookup(0)?.host, 9, "a known hash still updates at the cap")
    }

    /// An index file with more records than an index of its capacity ever writes (four times
    /// the entries plus four batches) is not loaded; one at that count is.
    func testDedupIndexFileAboveItsRecordCapIsNotLoaded() throws {
        let capacity = 8, id = [UInt8](repeating: 3, count: 16)
        let most = 4 * capacity + 4 * DedupIndex.persistBatch
        func file(records: Int) throws -> DedupIndexFile {
            let f = DedupIndexFile(storage: MemoryStorage(name: "x.dedup-index"), id: id, clusterBits: 16)
            try f.rewrite([:], complete: false)
            try f.serialized { try f.appendLocked((0..<records).map { (UInt64($0), DedupIndex.Entry(host: 1, guest: 0)) }) }
            return f
        }
        guard case .success(let entries) = try file(records: most).load(capacity: capacity, hostClusters: 2, guestClusters: 1) else {
            return XCTFail("a file at the record cap should load")
        }
        XCTAssertEqual(entries.count, capacity)
        guard case .failure(.unusable(let why)) = try file(records: most + 1).load(capacity: capacity, hostClusters: 2, guestClusters: 1) else {
            return XCTFail("a file past the record cap should be refused")
        }
        XCTAssertTrue(why.contains("\(most + 1) records"), why)
    }

    // MARK: Repair

    /// `check -r all` copies clusters a refcount width cannot count, at most
    /// `maxRepairCopyBytes`: shown with a cap of one cluster on a 1-bit image where three
    /// entries claim one cluster (two copies needed, one made, the image still corrupt),
    /// then with the real cap (both made, the image clean).
    func testRepairCopiesAtMostMaxRepairCopyBytes() throws {
        let storage = MemoryStorage(name: "r.qcow2")
        var options = CreateOptions(size: 1 << 20)
        options.clusterSize = 512
        options.refcountBits = 1
        try Qcow2Image.create(storage: storage, path: "r.qcow2", options: options)
        let disk = try Qcow2Image(storage: storage, options: OpenOptions(writable: true))
        try [UInt8](repeating: 7, count: 512).withUnsafeBytes { try disk.write($0, at: 0, fua: false) }
        try disk.close()
        var b = storage.contents
        let l2 = Int(b.be64(Int(b.be64(40))) & L2Entry.offsetMask)
        b.put64(b.be64(l2), l2 + 8)
        b.put64(b.be64(l2), l2 + 16)      // guest clusters 1 and 2 claim guest 0's cluster
        let damaged = b
        XCTAssertLessThan(Limits.maxRepairCopyBytes, UInt64(Int.max))

        let capped = MemoryStorage(name: "r.qcow2", bytes: damaged)
        var checker = try RefcountChecker(storage: capped, path: "r.qcow2")
        try checker.count(target: true, countRefcountStructure: true)
        var lines: [String] = []
        XCTAssertEqual(try checker.breakOverflowingShares(maxBytes: 512) { lines.append($0) }, 1)
        XCTAssertTrue(lines.contains { $0.contains("Not copying more than 512 bytes") }, "\(lines)")

        let full = MemoryStorage(name: "r.qcow2", bytes: damaged)
        XCTAssertEqual(try Qcow2Image.check(storage: full, path: "r.qcow2", repair: .all) { _ in }.exitCode, 0)
        let repaired = try Qcow2Image(storage: full, options: OpenOptions())
        defer { try? repaired.close() }
        var out = [UInt8](repeating: 0, count: 1536)
        try out.withUnsafeMutableBytes { try repaired.read(into: $0, at: 0) }
        XCTAssertEqual(out, [UInt8](repeating: 7, count: 1536), "every entry keeps its bytes")
    }
}
