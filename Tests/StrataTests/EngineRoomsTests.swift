import Foundation
import XCTest
import TestSupport
@testable import Strata

/// The engine's rooms, each on its own: overlap guard, pinning cache, refcount increments and
/// byte allocations, the table walker, quiescing, bitmaps, creation, probed raw images, and
/// walks whose cost follows the allocated data.
final class EngineRoomsTests: XCTestCase {
    var dir = ""

    override func setUpWithError() throws {
        try requireTool("qemu-img", package: "qemu-utils")
        dir = try tempDir(self)
    }

    /// qemu-img makes a 4 MiB image with data in its first cluster; returns its path.
    func qemuImage(_ name: String, size: String = "4M", options: String = "cluster_size=65536") throws -> String {
        let path = "\(dir)/\(name)"
        XCTAssertEqual(try runTool(["qemu-img", "create", "-q", "-f", "qcow2", "-o", options, path, size]).status, 0)
        XCTAssertEqual(try runTool(["qemu-io", "-f", "qcow2", path, "-c", "write -P 7 0 64k"]).status, 0)
        return path
    }

    // MARK: Overlap guard

    /// A hostile L2 entry (COPIED, so writable in place) that points at the L2 table itself:
    /// the write is refused before a byte lands, the corrupt bit is set, the table is intact.
    func testDataWriteOntoAnL2TableIsRefusedAndMarksTheImageCorrupt() throws {
        let path = try qemuImage("overlap.qcow2")
        var b = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        let l1 = Int(b.be64(40))
        let l2 = Int(b.be64(l1) & L1Entry.offsetMask)
        b.put64(UInt64(l2) | L2Entry.copied, l2 + 8)  // guest cluster 1 → the L2 table's own cluster
        try Data(b).write(to: URL(fileURLWithPath: path))
        let tableBefore = Array(b[l2..<l2 + 65536])

        let img = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        let data = [UInt8](repeating: 0xee, count: 4096)
        XCTAssertThrowsError(try data.withUnsafeBytes { try img.write($0, at: 65536, fua: false) }) { e in
            guard case StrataError.corrupt(let c) = e else { return XCTFail("\(e)") }
            XCTAssertEqual(c.kind, .overlap(.l2Table), "\(c)")
        }
        // Nothing more is written: writes are refused, close writes nothing.
        XCTAssertThrowsError(try data.withUnsafeBytes { try img.write($0, at: 0, fua: false) })
        try img.close()
        let after = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        XCTAssertEqual(Array(after[l2..<l2 + 65536]), tableBefore)
        let info = try runTool(["qemu-img", "info", "--output=json", "-U", path])
        XCTAssertTrue(info.out.contains("\"corrupt\": true"), info.out)
        // Read-only opens still read it; writable opens are refused.
        XCTAssertNoThrow(try Qcow2Image(path: path, options: OpenOptions()).close())
        XCTAssertThrowsError(try Qcow2Image(path: path, options: OpenOptions(writable: true)))
    }

    /// An L1 entry pointing at the refcount table: loading it as an L2 table is refused.
    func testL2TableOnTheRefcountTableIsRefused() throws {
        let path = try qemuImage("overlap2.qcow2")
        var b = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        b.put64(b.be64(48) | L1Entry.copied, Int(b.be64(40)))
        try Data(b).write(to: URL(fileURLWithPath: path))
        let img = try Qcow2Image(path: path, options: OpenOptions())
        defer { try? img.close() }
        var buf = [UInt8](repeating: 0, count: 512)
        XCTAssertThrowsError(try buf.withUnsafeMutableBytes { try img.read(into: $0, at: 0) }) { e in
            XCTAssertTrue("\(e)".contains("overlaps the refcount table"), "\(e)")
        }
    }

    // MARK: Table cache

    func testPinnedTablesAreNeverEvicted() {
        var cache = TableCache(capacity: 4)
        let pinned = Table(offset: 0, size: 512)
        cache.insert(pinned)
        cache.pin(pinned)
        for k in 1...64 { cache.insert(Table(offset: UInt64(k) * 512, size: 512)) }
        XCTAssertTrue(pinned.resident)
        XCTAssertNotNil(cache.get(0))
        cache.unpin(pinned)
        for k in 65...128 { cache.insert(Table(offset: UInt64(k) * 512, size: 512)) }
        XCTAssertFalse(pinned.resident, "once unpinned, the old table is evicted like any other")
    }

    // MARK: Refcounts and allocator

    /// Byte allocations pack into shared clusters, one reference per allocation on each
    /// cluster they touch, spanning into the next cluster when it follows directly.
    func testByteAllocationsShareClustersAndCountReferences() throws {
        let storage = MemoryStorage(name: "\(dir)/bytes.qcow2")
        var o = CreateOptions(size: 1 << 20)
        o.clusterSize = 4096
        try Qcow2Image.create(storage: storage, path: storage.name, options: o)
        let img = try Qcow2Image(storage: storage, options: OpenOptions(writable: true))
        try img.lock.withLock {
            let a = img.md.allocator, r = img.md.refcounts
            let first = try a.allocateBytes(1000)
            XCTAssertEqual(first % 4096, 0)
            let second = try a.allocateBytes(1000)
            XCTAssertEqual(second, first + 1000)
            XCTAssertEqual(try r.get(first / 4096), 2)
            // 3000 bytes from 2000: spans into the next cluster, which directly follows.
            let third = try a.allocateBytes(3000)
            XCTAssertEqual(third, first + 2000)
            XCTAssertEqual(try r.get(first / 4096), 3)
            XCTAssertEqual(try r.get(first / 4096 + 1), 1)
            XCTAssertTrue(try r.increment(first / 4096))
            XCTAssertEqual(try r.get(first / 4096), 4)
        }
        try img.close()
    }

    /// With 1-bit refcounts a shared cluster cannot take a second reference: increment says so
    /// and changes nothing.
    func testIncrementStopsAtTheWidthsMaximum() throws {
        let storage = MemoryStorage(name: "\(dir)/narrow.qcow2")
        var o = CreateOptions(size: 1 << 20)
        o.refcountBits = 1
        try Qcow2Image.create(storage: storage, path: storage.name, options: o)
        let img = try Qcow2Image(storage: storage, options: OpenOptions(writable: true))
        try img.lock.withLock {
            let (host, _) = try img.md.allocator.allocate(1)
            XCTAssertFalse(try img.md.refcounts.increment(host / 65536))
            XCTAssertEqual(try img.md.refcounts.get(host / 65536), 1)
        }
    }

    // MARK: Walker

    /// The walker reaches the active L1's tables and each snapshot's (qemu-img made them).
    func testWalkerVisitsActiveAndSnapshotTables() throws {
        let path = try qemuImage("snap.qcow2", size: "1G")
        XCTAssertEqual(try runTool(["qemu-img", "snapshot", "-c", "one", path]).status, 0)
        XCTAssertEqual(try runTool(["qemu-io", "-f", "qcow2", path, "-c", "write -P 8 600M 64k"]).status, 0)
        XCTAssertEqual(try runTool(["qemu-img", "snapshot", "-c", "two", path]).status, 0)
        let img = try Qcow2Image(path: path, options: OpenOptions())
        defer { try? img.close() }
        XCTAssertEqual(img.snapshots.map(\.name), ["one", "two"])
        var visits: [(L1Source, Int)] = []
        var dataEntries = 0
        try img.lock.withLock {
            try img.md.walker.forEachL2 { v in
                visits.append((v.source, v.l1Index))
                for j in 0..<Int(v.geometry.l2Entries) where v.entry(j).raw & L2Entry.offsetMask != 0 { dataEntries += 1 }
            }
        }
        // Active: tables 0 and 1 (600M is in the second 512 MiB); "one": table 0; "two": 0 and 1.
        XCTAssertEqual(visits.map { "\($0.0):\($0.1)" }, [
            "active:0", "active:1", "snapshot(0):0", "snapshot(1):0", "snapshot(1):1",
        ])
        XCTAssertEqual(dataEntries, 5)
    }

    // MARK: Quiesce

    /// While a quiesce body runs, other threads' requests wait; the body's own thread may
    /// still use the image; afterwards everything goes on.
    func testQuiesceHoldsOtherRequestsUntilItEnds() throws {
        let storage = MemoryStorage(name: "\(dir)/q.qcow2")
        try Qcow2Image.create(storage: storage, path: storage.name, options: CreateOptions(size: 4 << 20))
        let img = try Qcow2Image(storage: storage, options: OpenOptions(writable: true))
        let entered = DispatchSemaphore(value: 0)
        let done = DispatchSemaphore(value: 0)
        let order = OrderLog()
        DispatchQueue.global().async {
            try! img.quiesce {
                entered.signal()
                let byte: [UInt8] = [1]
                try byte.withUnsafeBytes { try img.write($0, at: 0, fua: false) }  // its own thread passes
                usleep(300_000)
                order.append("body done")
            }
            done.signal()
        }
        entered.wait()
        var buf = [UInt8](repeating: 0, count: 1)
        try buf.withUnsafeMutableBytes { try img.read(into: $0, at: 0) }
        order.append("read done")
        done.wait()
        XCTAssertEqual(order.items, ["body done", "read done"])
        XCTAssertEqual(buf, [1])
        try img.close()
    }

    // MARK: Bitmaps

    /// Writing to an image with a persistent bitmap marks the bitmap in use (stale, as after a
    /// crash of its owner) instead of dropping it: nothing leaks, qemu-img sees the flag, and
    /// qemu-img can remove the bitmap cleanly.
    func testWritesKeepBitmapsReferencedAndMarkThemInUse() throws {
        let path = try qemuImage("bitmap.qcow2", size: "64M")
        XCTAssertEqual(try runTool(["qemu-img", "bitmap", "--add", path, "b0"]).status, 0)
        let img = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        XCTAssertEqual(img.bitmaps.map(\.name), ["b0"])
        let data = [UInt8](repeating: 2, count: 65536)
        try data.withUnsafeBytes { try img.write($0, at: 65536, fua: false) }
        try img.close()
        try assertQemuCheckClean(path)
        let info = try runTool(["qemu-img", "info", path])
        XCTAssertTrue(info.out.contains("in-use"), info.out)
        XCTAssertFalse(info.err.contains("lacking bitmap support"), info.err)
        XCTAssertEqual(try runTool(["qemu-img", "bitmap", "--remove", path, "b0"]).status, 0)
        try assertQemuCheckClean(path)
        XCTAssertEqual(try qemuRaw(path, dir: dir)[65536], 2)
    }

    /// Opening for writing without writing leaves the bitmaps as they were.
    func testOpeningWritableWithoutWritingLeavesBitmapsAlone() throws {
        let path = try qemuImage("bitmap2.qcow2", size: "64M")
        XCTAssertEqual(try runTool(["qemu-img", "bitmap", "--add", path, "b0"]).status, 0)
        let before = try Data(contentsOf: URL(fileURLWithPath: path))
        try Qcow2Image(path: path, options: OpenOptions(writable: true)).close()
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path)), before)
    }

    // MARK: Creation

    func testCreateOverAnExistingFileGivesAFreshImage() throws {
        let path = "\(dir)/old.qcow2"
        // A former qcow2 with a backing file and data.
        XCTAssertEqual(try runTool(["qemu-img", "create", "-q", "-f", "qcow2", "\(dir)/base.qcow2", "1M"]).status, 0)
        XCTAssertEqual(try runTool(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", path]).status, 0)
        XCTAssertEqual(try runTool(["qemu-io", "-f", "qcow2", path, "-c", "write -P 9 0 512k"]).status, 0)
        try Qcow2Image.create(path: path, options: CreateOptions(size: 2 << 20))
        try assertQemuCheckClean(path)
        let img = try Qcow2Image(path: path, options: OpenOptions())
        XCTAssertNil(img.backingFileName)
        XCTAssertEqual(try readAll(img), [UInt8](repeating: 0, count: 2 << 20))
        try img.close()
        // Raw over a former qcow2: no byte of it survives.
        try RawImage.create(path: path, size: 1 << 20)
        XCTAssertEqual(try probeFormat(path: path), .raw)
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path)), Data(count: 1 << 20))
    }

    func testNewImagesAreLaidOutLikeQemuImgs() throws {
        for (size, options) in [("1G", "cluster_size=65536"), ("1M", "cluster_size=65536"), ("0", "cluster_size=65536"),
                                ("100G", "cluster_size=4096"), ("3G", "cluster_size=65536,extended_l2=on")] {
            let ours = "\(dir)/ours.qcow2", theirs = "\(dir)/theirs.qcow2"
            XCTAssertEqual(try runTool(["qemu-img", "create", "-q", "-f", "qcow2", "-o", options, theirs, size]).status, 0)
            let sizeBytes = try runTool(["qemu-img", "info", "--output=json", theirs]).out
                .split(separator: "\n").first { $0.contains("\"virtual-size\"") }!
                .filter(\.isNumber)
            var o = CreateOptions(size: UInt64(sizeBytes)!)
            o.clusterSize = options.contains("4096") ? 4096 : 65536
            o.extendedL2 = options.contains("extended_l2=on")
            try Qcow2Image.create(path: ours, options: o)
            try assertQemuCheckClean(ours)
            let a = try FileManager.default.attributesOfItem(atPath: ours)[.size] as! UInt64
            let b = try FileManager.default.attributesOfItem(atPath: theirs)[.size] as! UInt64
            XCTAssertEqual(a, b, "file length for \(size) \(options)")
        }
    }

    /// Refused options touch nothing: no file is made, an existing one keeps its bytes.
    func testRefusedCreateLeavesNoFileAndKeepsAnExistingOne() throws {
        let path = "\(dir)/huge.qcow2"
        XCTAssertThrowsError(try Qcow2Image.create(path: path, options: CreateOptions(size: 64 << 50))) { e in
            XCTAssertTrue("\(e)".contains("L1 table"), "\(e)")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: path))
        FileManager.default.createFile(atPath: path, contents: Data("keep me".utf8))
        XCTAssertThrowsError(try Qcow2Image.create(path: path, options: CreateOptions(size: 64 << 50)))
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path)), Data("keep me".utf8))
    }

    func testCreateRefusesAnImageThatIsItsOwnBackingFile() throws {
        var o = CreateOptions(size: 1 << 20)
        o.backingFile = "me.qcow2"
        o.backingFormat = .qcow2
        o.unsafeBacking = true
        XCTAssertThrowsError(try Qcow2Image.create(path: "\(dir)/me.qcow2", options: o)) { e in
            XCTAssertTrue("\(e)".contains("is the image itself"), "\(e)")
        }
        o.backingFile = "./me.qcow2"  // spelled differently, same file
        XCTAssertThrowsError(try Qcow2Image.create(path: "\(dir)/me.qcow2", options: o))
        XCTAssertFalse(FileManager.default.fileExists(atPath: "\(dir)/me.qcow2"))
    }

    /// Another process (qemu-io) holds the image: create refuses and the image is untouched.
    func testCreateRefusesAnImageAnotherProcessHolds() throws {
        let path = try qemuImage("held.qcow2")
        let before = try Data(contentsOf: URL(fileURLWithPath: path))
        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        holder.arguments = ["qemu-io", "-f", "qcow2", path, "-c", "sleep 3000"]
        try holder.run()
        defer { holder.waitUntilExit() }
        usleep(500_000)
        XCTAssertThrowsError(try Qcow2Image.create(path: path, options: CreateOptions(size: 1 << 20))) { e in
            XCTAssertTrue("\(e)".contains("lock"), "\(e)")
        }
        XCTAssertThrowsError(try RawImage.create(path: path, size: 1 << 20))
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path)), before)
    }

    // MARK: Probed raw images

    /// A probed raw image refuses a write that would make its first sector a qcow2 header
    /// (whose backing file could name any host file); other writes there pass, and a raw
    /// image opened with its format named takes anything.
    func testProbedRawImageRefusesToBecomeAnotherFormat() throws {
        let path = "\(dir)/guest.raw"
        try RawImage.create(path: path, size: 1 << 20)
        let probed = try openImage(path: path, options: OpenOptions(writable: true))
        var header = [UInt8](repeating: 0, count: 512)
        header[0...3] = [0x51, 0x46, 0x49, 0xfb]
        XCTAssertThrowsError(try header.withUnsafeBytes { try probed.write($0, at: 0, fua: false) }) { e in
            XCTAssertEqual((e as? StrataError)?.errnoValue, EPERM)
            XCTAssertTrue("\(e)".contains("qcow2"), "\(e)")
        }
        // Byte by byte, too: the magic's last byte completes it.
        try header[0..<3].withUnsafeBytes { try probed.write($0, at: 0, fua: false) }
        XCTAssertThrowsError(try header[3..<4].withUnsafeBytes { try probed.write($0, at: 3, fua: false) })
        let plain = [UInt8](repeating: 0x55, count: 512)
        try plain.withUnsafeBytes { try probed.write($0, at: 0, fua: false) }
        try probed.close()
        XCTAssertEqual(try probeFormat(path: path), .raw)
        let named = try openImage(path: path, options: OpenOptions(writable: true, format: .raw))
        try header.withUnsafeBytes { try named.write($0, at: 0, fua: false) }
        try named.close()
        XCTAssertEqual(try probeFormat(path: path), .qcow2)
    }

    // MARK: Cost follows data

    /// A 1 PiB image: block status, reads, zero writes and discards over the whole disk take
    /// a step per allocated L2 table (per cluster it would be 2^34 steps and never finish).
    func testWholeDiskWalksOfAnEmptyPetabyteImageFinish() throws {
        let path = "\(dir)/peta.qcow2"
        try Qcow2Image.create(path: path, options: CreateOptions(size: 1 << 50))
        let img = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        let size = img.size
        XCTAssertEqual(try img.blockStatus(at: 0, length: size).count, 1)
        let far = size - 65536
        let data = [UInt8](repeating: 3, count: 65536)
        try data.withUnsafeBytes { try img.write($0, at: far, fua: false) }
        try data.withUnsafeBytes { try img.write($0, at: size / 2, fua: false) }
        let extents = try img.blockStatus(at: 0, length: size)
        XCTAssertEqual(extents.map(\.offset), [0, size / 2, size / 2 + 65536, far])
        var zeroRuns = 0
        try img.read(at: 0, length: 1 << 30, runs: { _, _, zero in
            if zero { zeroRuns += 1 }
            return nil
        })
        XCTAssertEqual(zeroRuns, 1)
        try img.writeZeroes(at: 0, length: size / 2, mayUnmap: true, fua: false)
        try img.discard(at: 0, length: size)
        XCTAssertEqual(try img.blockStatus(at: 0, length: size).count, 1)
        try img.resize(to: 1 << 30)
        try img.close()
        try assertQemuCheckClean(path)
    }

    /// Zeroing a whole disk over a backing file sets a zero entry in every L2 table; the
    /// dirty tables are written back as the request goes (the cache holds 4), and the result
    /// is what qemu-img reads and checks clean.
    func testLongRequestsWriteBackTablesAsTheyGo() throws {
        let base = "\(dir)/base.qcow2", top = "\(dir)/top.qcow2"
        XCTAssertEqual(try runTool(["qemu-img", "create", "-q", "-f", "qcow2", base, "64M"]).status, 0)
        XCTAssertEqual(try runTool(["qemu-io", "-f", "qcow2", base, "-c", "write -P 1 0 64M"]).status, 0)
        var o = CreateOptions()
        o.clusterSize = 4096
        o.backingFile = "base.qcow2"
        o.backingFormat = .qcow2
        try Qcow2Image.create(path: top, options: o)
        let img = try Qcow2Image(path: top, options: OpenOptions(writable: true, l2CacheBytes: 4 * 4096, refcountCacheBytes: 4 * 4096))
        try img.writeZeroes(at: 0, length: 64 << 20, mayUnmap: true, fua: false)
        XCTAssertLessThanOrEqual(img.lock.withLock { img.md.map.cache.tables.count }, 8, "tables written back and evicted")
        try img.close()
        try assertQemuCheckClean(top)
        XCTAssertEqual(try qemuRaw(top, dir: dir), [UInt8](repeating: 0, count: 64 << 20))
    }
}

/// Items appended from several threads, in order.
final class OrderLog: @unchecked Sendable {
    private let lock = NSLock()  // guards `storage`
    private var storage: [String] = []
    func append(_ s: String) { lock.lock(); storage.append(s); lock.unlock() }
    var items: [String] { lock.lock(); defer { lock.unlock() }; return storage }
}