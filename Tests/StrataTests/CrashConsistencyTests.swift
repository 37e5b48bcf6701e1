import Foundation
import XCTest
import TestSupport
@testable import Strata

/// Records every write and sync the engine makes, then rebuilds the file as a crash at many
/// points would leave it (every synced write, plus any subset of the unsynced ones). Each
/// such file must pass `qemu-img check` with at most leaks, and every byte that was flushed
/// and not written again must read back unchanged.
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

    func crashRun(dir: String, clusterSize cs: Int, extendedL2: Bool, seed: UInt64, compression: CompressionType? = nil) throws {
        let base = MemoryStorage(name: "\(dir)/crash.qcow2")
        var o = CreateOptions(size: 4 << 20)
        o.clusterSize = cs
        o.extendedL2 = extendedL2
        o.compressionType = compression ?? .zlib
        o.compressWrites = compression != nil
        // Small caches force write-back of tables between flushes too.
        try Qcow2Image.create(storage: base, path: base.name, options: o)
        let baseBytes = base.contents
        let rec = RecordingStorage(base)
        let img = try Qcow2Image(storage: rec, options: OpenOptions(writable: true, l2CacheBytes: 4 * cs, refcountCacheBytes: 4 * cs))

        var model = [UInt8](repeating: 0, count: 4 << 20)
        // (events count when the flush returned, model then, ops since the previous flush)
        var flushes: [(events: Int, model: [UInt8])] = [(0, model)]
        var opsAfter: [[Op]] = [[]]
        var rng = SeededRandom(seed: seed)
        for i in 0..<400 {
            let off = Int(rng.next() % UInt64(model.count - 3 * cs))
            let len = Int(rng.next() % UInt64(2 * cs)) + 1
            switch rng.next() % 8 {
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
            XCTAssertTrue(check.status == 0 || check.status == 3, "crash after event \(k) of \(events.count) (cs \(cs)): \(check.out)\(check.err)")

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
