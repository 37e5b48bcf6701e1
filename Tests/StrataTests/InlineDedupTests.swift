import Foundation
import Synchronization
import XCTest
import TestSupport
@testable import Strata

/// Inline dedup (`-o dedup=on`): repeated whole clusters stored once, zero clusters as zero
/// entries, the disk byte-exact, `qemu-img check` clean; and under concurrent writers racing
/// in-place overwrites against shares, every read always returns what was written.
final class InlineDedupTests: XCTestCase {
    let cs = 4096

    func makeImage(_ dir: String, size: Int, name: String = "d.qcow2", dedup: Bool = true) throws -> String {
        let path = "\(dir)/\(name)"
        var o = CreateOptions(size: UInt64(size))
        o.clusterSize = cs
        o.dedupWrites = dedup
        try Qcow2Image.create(path: path, options: o)
        return path
    }

    func block(_ seed: UInt64) -> [UInt8] {
        var rng = SeededRandom(seed: seed)
        return (0..<cs).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
    }

    /// Host clusters referenced by the active disk's data entries, counted once each.
    func distinctHosts(_ img: Qcow2Image) throws -> Set<UInt64> {
        try img.lock.withLock {
            var hosts: Set<UInt64> = []
            for g in 0..<(img.md.header.size / UInt64(cs)) {
                let raw = try img.md.map.entry(g).raw
                if case .data(let h, _) = L2Entry(raw: raw).mapping(clusterBits: img.md.header.clusterBits, extended: false) { hosts.insert(h) }
            }
            return hosts
        }
    }

    func testRepeatedBlocksAreStoredOnceAndZeroClustersBecomeZeroEntries() throws {
        try requireTool("qemu-img", package: "qemu-utils")
        let dir = try tempDir(self)
        let size = 4 << 20
        let path = try makeImage(dir, size: size)
        let blocks = (0..<6).map { block(UInt64($0) + 1) }
        var model = [UInt8](repeating: 0, count: size)
        let img = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        XCTAssertNotNil(img.dedup, "the image's dedup flag turns inline dedup on")
        // 64 KiB writes of 16 clusters each: copies inside one request and across requests,
        // every fifth cluster all zeroes (written as data).
        var rng = SeededRandom(seed: 5)
        for chunk in 0..<(size / (64 << 10)) {
            var buf = [UInt8](repeating: 0, count: 64 << 10)
            for k in 0..<16 where (chunk * 16 + k) % 5 != 4 {
                let b = blocks[Int(rng.next() % 6)]
                buf.replaceSubrange(k * cs..<(k + 1) * cs, with: b)
            }
            let at = chunk * (64 << 10)
            try buf.withUnsafeBytes { try img.write($0, at: UInt64(at), fua: false) }
            model.replaceSubrange(at..<at + buf.count, with: buf)
        }
        // A partial-cluster write and an unaligned write across clusters: the normal path.
        let odd = block(99)
        try odd.withUnsafeBytes { try img.write(UnsafeRawBufferPointer(rebasing: $0[0..<1000]), at: 7, fua: false) }
        model.replaceSubrange(7..<1007, with: odd[0..<1000])
        try odd.withUnsafeBytes { try img.write($0, at: UInt64(3 * cs + 100), fua: false) }
        model.replaceSubrange(3 * cs + 100..<4 * cs + 100, with: odd)

        XCTAssertTrue(try readAll(img) == model, "content exact while open")
        let hosts = try distinctHosts(img)
        XCTAssertLessThanOrEqual(hosts.count, 6 + 3, "6 distinct blocks (plus the clusters the unaligned writes copied): \(hosts.count)")
        // Zero clusters are zero entries, not data.
        let zeroRaw = try img.lock.withLock { try img.md.map.entry(9).raw }
        XCTAssertTrue(zeroRaw == 0 || zeroRaw == L2Entry.zeroFlag, "unallocated or a zero entry: \(String(zeroRaw, radix: 16))")
        try img.close()

        try assertQemuCheckClean(path)
        XCTAssertTrue(try qemuRaw(path, dir: dir) == model, "QEMU reads the same disk")
        let fileSize = try FileManager.default.attributesOfItem(atPath: path)[.size] as! Int
        XCTAssertLessThan(fileSize, 64 * cs, "about the unique data plus metadata, not 4 MiB: \(fileSize)")

        // Reopened: overwrites into shared clusters copy on write.
        let again = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        let other = block(77)
        try other.withUnsafeBytes { try again.write($0, at: UInt64(cs), fua: false) }
        model.replaceSubrange(cs..<2 * cs, with: other)
        try other.withUnsafeBytes { try again.write(UnsafeRawBufferPointer(rebasing: $0[0..<512]), at: UInt64(2 * cs), fua: false) }
        model.replaceSubrange(2 * cs..<2 * cs + 512, with: other[0..<512])
        XCTAssertTrue(try readAll(again) == model)
        try again.close()
        try assertQemuCheckClean(path)
        XCTAssertTrue(try qemuRaw(path, dir: dir) == model)
    }

    func testDedupIsOffUnlessAskedAndRefusedWithCompression() throws {
        let dir = try tempDir(self)
        let plain = try makeImage(dir, size: 1 << 20, name: "p.qcow2", dedup: false)
        let img = try Qcow2Image(path: plain, options: OpenOptions(writable: true))
        XCTAssertNil(img.dedup)
        try img.close()
        var o = OpenOptions(writable: true)
        o.dedupWrites = true
        let asked = try Qcow2Image(path: plain, options: o)
        XCTAssertNotNil(asked.dedup)
        try asked.close()
        o.compressWrites = true
        XCTAssertThrowsError(try Qcow2Image(path: plain, options: o))
        var v2 = CreateOptions(size: 1 << 20)
        v2.version = 2
        v2.dedupWrites = true
        XCTAssertThrowsError(try Qcow2Image.create(path: "\(dir)/v2.qcow2", options: v2))
    }

    /// Writers of identical and different whole clusters, and partial overwrites that go in
    /// place into clusters other writers are sharing, all at once. Each writer owns its own
    /// guest clusters, so every read-back is exact against its model.
    func testConcurrentSharesNeverSeeInPlaceOverwrites() throws {
        try concurrentWriters(dedup: true)
    }

    /// Regression (found by the test above, with or without dedup): a cluster freed by a flush
    /// was handed out again before the flush punched its space, and the punch erased the new
    /// owner's data. Freed clusters are now reusable only after their punch.
    func testFreedClustersAreNotReusedBeforeTheirPunch() throws {
        try concurrentWriters(dedup: false)
    }

    func concurrentWriters(dedup: Bool) throws {
        try requireTool("qemu-img", package: "qemu-utils")
        let dir = try tempDir(self)
        let writers = 4, perWriter = 32
        let size = writers * perWriter * cs
        let path = try makeImage(dir, size: size, dedup: dedup)
        let img = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        let patterns = (0..<3).map { block(UInt64($0) + 40) }
        let failures = Mutex<[String]>([])
        let models = Mutex<[Int: [UInt8]]>([:])
        DispatchQueue.concurrentPerform(iterations: writers) { w in
            var rng = SeededRandom(seed: UInt64(w) * 7 + 3)
            var model = [UInt8](repeating: 0, count: perWriter * cs)
            let base = w * perWriter * cs
            var buf = [UInt8](repeating: 0, count: cs)
            do {
                for step in 0..<600 {
                    let k = Int(rng.next() % UInt64(perWriter))
                    let at = k * cs
                    switch rng.next() % 6 {
                    case 0, 1:
                        // A whole cluster of one of the few patterns: shares with other writers
                        // (now and then with FUA: a flush frees released clusters for reuse).
                        let p = patterns[Int(rng.next() % 3)]
                        try p.withUnsafeBytes { try img.write($0, at: UInt64(base + at), fua: step % 16 == 0) }
                        model.replaceSubrange(at..<at + cs, with: p)
                    case 4:
                        // Freed: the index entries naming this cluster go stale.
                        if rng.next() % 2 == 0 {
                            try img.discard(at: UInt64(base + at), length: UInt64(self.cs))
                        } else {
                            try img.writeZeroes(at: UInt64(base + at), length: UInt64(self.cs), mayUnmap: true, fua: false)
                        }
                        model.replaceSubrange(at..<at + cs, with: [UInt8](repeating: 0, count: cs))
                    case 2:
                        // A partial overwrite: in place when this writer's entry owns the cluster
                        // (others may be comparing against it at this very moment).
                        let off = Int(rng.next() % UInt64(cs - 64))
                        let bytes = [UInt8](repeating: UInt8(truncatingIfNeeded: step &+ w), count: 64)
                        try bytes.withUnsafeBytes { try img.write($0, at: UInt64(base + at + off), fua: false) }
                        model.replaceSubrange(at + off..<at + off + 64, with: bytes)
                    default:
                        // A whole cluster of this writer's own, then a pattern again.
                        let own = self.block(rng.next())
                        try own.withUnsafeBytes { try img.write($0, at: UInt64(base + at), fua: false) }
                        model.replaceSubrange(at..<at + cs, with: own)
                    }
                    try buf.withUnsafeMutableBytes { try img.read(into: $0, at: UInt64(base + at)) }
                    if buf[...] != model[at..<at + cs] {
                        failures.withLock { $0.append("writer \(w) step \(step): cluster \(k) reads wrong data") }
                        return
                    }
                }
            } catch {
                failures.withLock { $0.append("writer \(w): \(error)") }
            }
            models.withLock { $0[w] = model }
        }
        XCTAssertEqual(failures.withLock { $0 }, [])
        var whole: [UInt8] = []
        for w in 0..<writers { whole += models.withLock { $0[w] } ?? [] }
        XCTAssertTrue(try readAll(img) == whole, "the whole disk is exact")
        try img.close()
        try assertQemuCheckClean(path)
        XCTAssertTrue(try qemuRaw(path, dir: dir) == whole)
    }

    /// A cluster shared in one session, one copy overwritten in the next: the copy left gets
    /// COPIED back (no record of the share survives the session; close walks the tables).
    func testCopyLeftAloneInALaterSessionGetsCopiedBack() throws {
        try requireTool("qemu-img", package: "qemu-utils")
        let dir = try tempDir(self)
        let path = try makeImage(dir, size: 1 << 20)
        let p = block(21), q = block(22)
        let first = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        for k in 0..<2 { try p.withUnsafeBytes { try first.write($0, at: UInt64(k * cs), fua: false) } }
        XCTAssertEqual(try distinctHosts(first).count, 1)
        try first.close()
        try assertQemuCheckClean(path)
        let second = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        try q.withUnsafeBytes { try second.write($0, at: 0, fua: false) }
        try second.close()
        try assertQemuCheckClean(path)
        XCTAssertTrue(try qemuRaw(path, dir: dir) == q + p + [UInt8](repeating: 0, count: (1 << 20) - 2 * cs))
    }

    /// Extended L2 entries (subclusters): shared entries are fully allocated, zero clusters
    /// are zero bitmaps, partial writes into a shared cluster copy it on write.
    func testExtendedL2() throws {
        try requireTool("qemu-img", package: "qemu-utils")
        let dir = try tempDir(self)
        let ecs = 32768, size = 2 << 20
        let path = "\(dir)/ext.qcow2"
        var o = CreateOptions(size: UInt64(size))
        o.clusterSize = ecs
        o.extendedL2 = true
        o.dedupWrites = true
        try Qcow2Image.create(path: path, options: o)
        var rng = SeededRandom(seed: 3)
        let blocks = (0..<3).map { _ in (0..<ecs).map { _ in UInt8(truncatingIfNeeded: rng.next()) } }
        var model = [UInt8](repeating: 0, count: size)
        let img = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        for k in 0..<(size / ecs) {
            let b = k % 4 == 3 ? [UInt8](repeating: 0, count: ecs) : blocks[k % 3]
            try b.withUnsafeBytes { try img.write($0, at: UInt64(k * ecs), fua: false) }
            model.replaceSubrange(k * ecs..<(k + 1) * ecs, with: b)
        }
        let x = [UInt8](repeating: 0xab, count: 3000)
        try x.withUnsafeBytes { try img.write($0, at: UInt64(ecs + 100), fua: false) }
        model.replaceSubrange(ecs + 100..<ecs + 3100, with: x)
        XCTAssertTrue(try readAll(img) == model)
        try img.close()
        try assertQemuCheckClean(path)
        XCTAssertTrue(try qemuRaw(path, dir: dir) == model)
        let fileSize = try FileManager.default.attributesOfItem(atPath: path)[.size] as! Int
        XCTAssertLessThan(fileSize, 16 * ecs, "3 distinct clusters, one copied on write, plus metadata: \(fileSize)")
    }

    /// Shares across a live snapshot: the snapshot keeps its data, and after it is deleted
    /// the image is still clean (COPIED exact).
    func testSharesAcrossASnapshot() throws {
        try requireTool("qemu-img", package: "qemu-utils")
        let dir = try tempDir(self)
        let path = try makeImage(dir, size: 1 << 20)
        let p = block(31), q = block(32)
        let img = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        try p.withUnsafeBytes { try img.write($0, at: 0, fua: false) }
        _ = try img.createSnapshot(name: "s")
        try p.withUnsafeBytes { try img.write($0, at: UInt64(cs), fua: false) }
        try p.withUnsafeBytes { try img.write($0, at: UInt64(2 * cs), fua: false) }
        XCTAssertEqual(try distinctHosts(img).count, 1, "shared with the cluster the snapshot holds too")
        try q.withUnsafeBytes { try img.write($0, at: 0, fua: true) }
        try img.close()
        try assertQemuCheckClean(path)
        let tail = [UInt8](repeating: 0, count: (1 << 20) - 3 * cs)
        XCTAssertTrue(try qemuRaw(path, dir: dir) == q + p + p + tail)
        let again = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        _ = try again.deleteSnapshot("s")
        try p.withUnsafeBytes { try again.write($0, at: UInt64(3 * cs), fua: false) }
        try q.withUnsafeBytes { try again.write($0, at: UInt64(cs), fua: false) }
        try again.close()
        try assertQemuCheckClean(path)
        XCTAssertTrue(try qemuRaw(path, dir: dir) == q + q + p + p + [UInt8](repeating: 0, count: (1 << 20) - 4 * cs))
    }

    // MARK: The race, made deterministic

    /// An image on `HookStorage` with cluster 0 holding `p` (its host cluster returned).
    func ownedCluster(_ storage: HookStorage, _ p: [UInt8]) throws -> (Qcow2Image, UInt64) {
        var o = CreateOptions(size: 1 << 20)
        o.clusterSize = cs
        o.dedupWrites = true
        try Qcow2Image.create(storage: storage, path: storage.name, options: o)
        let img = try Qcow2Image(storage: storage, options: OpenOptions(writable: true))
        try p.withUnsafeBytes { try img.write($0, at: 0, fua: false) }
        let raw = try img.lock.withLock { try img.md.map.entry(0).raw }
        return (img, L2Entry(raw: raw).hostOffset)
    }

    /// An in-place write into the candidate planned *after* the byte comparison and before the
    /// share (the candidate is still COPIED then): it must not land in a shared cluster.
    func testInPlaceWritePlannedDuringTheComparisonCopiesOnWrite() throws {
        let storage = HookStorage(MemoryStorage(name: "race1.qcow2"))
        let p = block(7)
        let (img, host) = try ownedCluster(storage, p)
        let x = [UInt8](repeating: 0xee, count: 64)
        let done = DispatchSemaphore(value: 0)
        storage.setAfterRead { offset, count in
            guard offset == host && count == self.cs else { return false }
            Thread.detachNewThread {
                try! x.withUnsafeBytes { try img.write($0, at: 100, fua: false) }
                done.signal()
            }
            usleep(150_000)  // the other write is planned (or waits) now
            return true
        }
        try p.withUnsafeBytes { try img.write($0, at: UInt64(cs), fua: false) }
        done.wait()
        try assertRaceOutcome(img, block: p, overwrite: x)
    }

    /// An in-place write into the candidate planned *before* the comparison and landing after
    /// it: the share must be refused.
    func testInPlaceWriteInFlightRefusesTheShare() throws {
        let storage = HookStorage(MemoryStorage(name: "race2.qcow2"))
        let p = block(8)
        let (img, host) = try ownedCluster(storage, p)
        let x = [UInt8](repeating: 0xdd, count: 64)
        let inFlight = DispatchSemaphore(value: 0)
        let done = DispatchSemaphore(value: 0)
        storage.setBeforeWrite { offset, count in
            guard offset == host + 100 && count == 64 else { return false }
            inFlight.signal()
            usleep(150_000)  // the dedup writer compares and decides meanwhile
            return true
        }
        Thread.detachNewThread {
            try! x.withUnsafeBytes { try img.write($0, at: 100, fua: false) }
            done.signal()
        }
        inFlight.wait()
        try p.withUnsafeBytes { try img.write($0, at: UInt64(cs), fua: false) }
        done.wait()
        try assertRaceOutcome(img, block: p, overwrite: x)
    }
}

extension InlineDedupTests {
    /// After an in-place write of `overwrite` at byte 100 of cluster 0 raced a dedup write of
    /// `block` into cluster 1: cluster 0 holds the overwrite, cluster 1 still holds `block`.
    func assertRaceOutcome(_ img: Qcow2Image, block: [UInt8], overwrite: [UInt8],
                           file: StaticString = #filePath, line: UInt = #line) throws {
        var expected0 = block
        expected0.replaceSubrange(100..<100 + overwrite.count, with: overwrite)
        let all = try readAll(img)
        XCTAssertTrue(Array(all[0..<cs]) == expected0, "the overwritten cluster", file: file, line: line)
        XCTAssertTrue(Array(all[cs..<2 * cs]) == block, "the deduplicated copy kept its data", file: file, line: line)
        try img.close()
    }
}

/// Storage that runs a one-shot hook after a read or before a write (the hook returns whether
/// it fired; once it has, it is dropped).
final class HookStorage: BlockStorage, @unchecked Sendable {
    let inner: any BlockStorage
    private let hooks = Mutex<(read: ((UInt64, Int) -> Bool)?, write: ((UInt64, Int) -> Bool)?)>((nil, nil))
    var name: String { inner.name }
    init(_ inner: any BlockStorage) { self.inner = inner }
    func setAfterRead(_ h: @escaping (UInt64, Int) -> Bool) { hooks.withLock { $0.read = h } }
    func setBeforeWrite(_ h: @escaping (UInt64, Int) -> Bool) { hooks.withLock { $0.write = h } }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        let n = try inner.read(into: buffer, at: offset)
        if let h = hooks.withLock({ $0.read }), h(offset, buffer.count) { hooks.withLock { $0.read = nil } }
        return n
    }
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        if let h = hooks.withLock({ $0.write }), h(offset, buffer.count) { hooks.withLock { $0.write = nil } }
        try inner.write(buffer, at: offset)
    }
    func sync() throws { try inner.sync() }
    func length() throws -> UInt64 { try inner.length() }
    func setLength(_ length: UInt64) throws { try inner.setLength(length) }
    func punchHole(at offset: UInt64, length: UInt64) throws -> Bool { try inner.punchHole(at: offset, length: length) }
    func zeroRange(at offset: UInt64, length: UInt64) throws -> Bool { try inner.zeroRange(at: offset, length: length) }
}
