import Foundation
import XCTest
import TestSupport
@testable import Strata

/// Records every write and sync the engine makes, then rebuilds the file as a crash at many
/// points would leave it (every synced write, plus any subset of the unsynced ones). Each
/// such file must pass `qemu-img check` with at most leaks (Strata's own check must give
/// the same verdict), and every byte that was flushed and not written again must read back
/// unchanged.
final class CrashConsistencyTests: XCTestCase {
    struct Op { var offset: Int; var length: Int }

    func testCrashAtAnyPointLeaksAtMost() throws {
        try requireTool("qemu-img", package: "qemu-utils")
        let dir = try tempDir(self)
        for (cs, ext) in [(4096, false), (65536, false), (16384, true)] {
            try crashRun(dir: dir, clusterSize: cs, extendedL2: ext, seed: UInt64(cs))
        }
    }

    /// The same with every whole cluster written compressed (online compression): the
    /// compressed bytes, packed into shared host clusters, must be durable before the
    /// entries that point at them.
    func testCrashWithCompressedWritesLeaksAtMost() throws {
        try requireTool("qemu-img", package: "qemu-utils")
        let dir = try tempDir(self)
        for (cs, type) in [(4096, CompressionType.zlib)] {
            try crashRun(dir: dir, clusterSize: cs, extendedL2: false, seed: UInt64(cs) + 1, compression: type)
        }
    }

    /// Inline dedup: whole clusters from a small pool of contents, so writes share clusters
    /// and overwrites of shared ones copy on write. A crash may also leave qcow2's COPIED
    /// window (spec/format.md "Crash ordering"), which both checks call an OFLAG_COPIED
    /// error; nothing else.
    func testCrashWithInlineDedupLeaksAtMost() throws {
        try requireTool("qemu-img", package: "qemu-utils")
        let dir = try tempDir(self)
        try crashRun(dir: dir, clusterSize: 4096, extendedL2: false, seed: 4099, dedup: true)
    }

    /// 512-byte clusters with 64-bit refcounts: a refcount block covers 64 clusters and the
    /// first refcount table 2 MiB of file, so the workload makes the table grow (a new table
    /// written elsewhere, then the header switched) many times over.
    func testCrashWhileTheRefcountTableGrowsLeaksAtMost() throws {
        try requireTool("qemu-img", package: "qemu-utils")
        let dir = try tempDir(self)
        try crashRun(dir: dir, clusterSize: 512, extendedL2: false, seed: 513, refcountBits: 64)
    }

    func crashRun(dir: String, clusterSize cs: Int, extendedL2: Bool, seed: UInt64, compression: CompressionType? = nil,
                  dedup: Bool = false, refcountBits: Int = 16) throws {
        let base = MemoryStorage(name: "\(dir)/crash.qcow2")
        let diskSize = refcountBits == 64 ? 8 << 20 : 4 << 20
        var o = CreateOptions(size: UInt64(diskSize))
        o.clusterSize = cs
        o.extendedL2 = extendedL2
        o.refcountBits = refcountBits
        o.compressionType = compression ?? .zlib
        o.compressWrites = compression != nil
        o.dedupWrites = dedup
        // Small caches force write-back of tables between flushes too.
        try Qcow2Image.create(storage: base, path: base.name, options: o)
        let baseBytes = base.contents
        let rec = RecordingStorage(base)
        let img = try Qcow2Image(storage: rec, options: OpenOptions(writable: true, l2CacheBytes: 4 * cs, refcountCacheBytes: 4 * cs))

        var model = [UInt8](repeating: 0, count: diskSize)
        // (events count when the flush returned, model then, ops since the previous flush)
        var flushes: [(events: Int, model: [UInt8])] = [(0, model)]
        var opsAfter: [[Op]] = [[]]
        var rng = SeededRandom(seed: seed)
        for i in 0..<400 {
            let off = Int(rng.next() % UInt64(model.count - (refcountBits == 64 ? 50 : 3) * cs))
            // Longer writes where the file must outgrow its first refcount table.
            let len = Int(rng.next() % UInt64((refcountBits == 64 ? 48 : 2) * cs)) + 1
            switch rng.next() % 8 {
            case 0...4 where dedup:
                // Whole clusters, each one of 5 contents.
                let first = off / cs * cs, count = len / cs + 1
                for c in 0..<count {
                    let v = UInt8(truncatingIfNeeded: rng.next() % 5 + 1)
                    let data = [UInt8](repeating: v, count: cs)
                    try data.withUnsafeBytes { try img.write($0, at: UInt64(first + c * cs), fua: false) }
                    fill(&model, first + c * cs..<first + (c + 1) * cs, v)
                }
                opsAfter[opsAfter.count - 1].append(Op(offset: first, length: count * cs))
            case 0...4:
                let data = [UInt8](repeating: UInt8(truncatingIfNeeded: i + 1), count: len)
                try data.withUnsafeBytes { try img.write($0, at: UInt64(off), fua: false) }
                fill(&model, off..<off + len, UInt8(truncatingIfNeeded: i + 1))
            case 5:
                try img.writeZeroes(at: UInt64(off), length: UInt64(len), mayUnmap: true, fua: false)
                fill(&model, off..<off + len, 0)
            default:
                try img.discard(at: UInt64(off), length: UInt64(len))
                let first = (off + cs - 1) / cs * cs, last = (off + len) / cs * cs
                if last > first { fill(&model, first..<last, 0) }
            }
            opsAfter[opsAfter.count - 1].append(Op(offset: off, length: len))
            if rng.next() % 25 == 0 {
                try img.flush()
                flushes.append((rec.events.count, model))
                opsAfter.append([])
            }
        }
        let events = rec.events
        if refcountBits == 64 {
            let grown = img.lock.withLock { img.md.header.refcountTableClusters }
            let length = try rec.length()
            XCTAssertGreaterThan(grown, 1, "the workload grew the refcount table (file \(length) bytes)")
        }
        try img.close()

        // Crash points: every sync, and random points between.
        let syncs = events.indices.filter { events[$0] == .sync }.map { $0 + 1 }
        var points = Set(syncs.shuffled(using: &rng).prefix(80))
        for _ in 0..<40 { points.insert(Int(rng.next() % UInt64(events.count + 1))) }
        // Byte ranges never written after flush j (which must survive a crash after it).
        var untouchedAfter = [[Range<Int>]](repeating: [], count: flushes.count)
        var written: [Range<Int>] = []
        for j in stride(from: flushes.count - 1, through: 0, by: -1) {
            written += opsAfter[j].map { $0.offset..<$0.offset + $0.length }
            written.sort { $0.lowerBound < $1.lowerBound }
            var gaps: [Range<Int>] = []
            var pos = 0
            for r in written {
                if r.lowerBound > pos { gaps.append(pos..<r.lowerBound) }
                pos = max(pos, r.upperBound)
            }
            if pos < model.count { gaps.append(pos..<model.count) }
            untouchedAfter[j] = gaps
        }
        let path = "\(dir)/crash-\(cs).qcow2"
        for k in points.sorted() {
            let lastSync = try writeCrashImage(events, upTo: k, base: baseBytes, rng: &rng, to: path)

            let check = try runTool(["qemu-img", "check", path])
            let copiedWindow = dedup && check.status == 2
                && check.err.split(separator: "\n").filter { $0.hasPrefix("ERROR") }.allSatisfy { $0.contains("OFLAG_COPIED") }
            XCTAssertTrue(check.status == 0 || check.status == 3 || copiedWindow,
                          "crash after event \(k) of \(events.count) (cs \(cs)): \(check.out)\(check.err)")
            let ours = try Qcow2Image.check(path: path, repair: nil) { _ in }
            XCTAssertEqual(ours.exitCode, check.status, "strata's check and qemu-img's disagree after event \(k) (cs \(cs)): \(check.out)\(check.err)")

            // The last flush that had completed by the crash point.
            guard let j = flushes.lastIndex(where: { $0.events <= lastSync }) else { continue }
            let img = try Qcow2Image(path: path, options: OpenOptions(writable: false))
            let now = try readAll(img)
            try img.close()
            let flushed = flushes[j].model
            for r in untouchedAfter[j] {
                let same = now.withUnsafeBytes { a in flushed.withUnsafeBytes { b in
                    memcmp(a.baseAddress! + r.lowerBound, b.baseAddress! + r.lowerBound, r.count) == 0 } }
                if !same {
                    XCTFail("crash after event \(k) (cs \(cs)): flushed bytes in \(r) changed")
                    return
                }
            }
        }
    }
}
