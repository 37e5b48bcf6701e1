import Foundation
import XCTest
import TestSupport
@testable import Strata

/// Snapshot operations under crashes: every write and sync of a session that creates,
/// deletes and reverts snapshots between guest writes is recorded, and the file is rebuilt as
/// a crash at many points would leave it. Each must pass `qemu-img check` with at most leaks,
/// and every snapshot it lists must still hold exactly the disk it was taken of.
final class SnapshotCrashTests: XCTestCase {
    func testCrashDuringSnapshotOperationsNeverCorrupts() throws {
        try requireTool("qemu-img", package: "qemu-utils")
        let dir = try tempDir(self)
        for cs in [4096, 65536] { try crashRun(dir: dir, clusterSize: cs, seed: UInt64(cs) + 7) }
    }

    func crashRun(dir: String, clusterSize cs: Int, seed: UInt64) throws {
        let size = 2 << 20
        let base = MemoryStorage(name: "\(dir)/snapcrash.qcow2")
        var o = CreateOptions(size: UInt64(size))
        o.clusterSize = cs
        try Qcow2Image.create(storage: base, path: base.name, options: o)
        let baseBytes = base.contents
        let rec = RecordingStorage(base)
        let img = try Qcow2Image(storage: rec, options: OpenOptions(writable: true, l2CacheBytes: 4 * cs, refcountCacheBytes: 4 * cs))

        var model = [UInt8](repeating: 0, count: size)
        var taken: [String: [UInt8]] = [:]
        var rng = SeededRandom(seed: seed)
        func writes(_ n: Int, _ tag: Int) throws {
            for i in 0..<n {
                let off = Int(rng.next() % UInt64(size - 2 * cs)), len = Int(rng.next() % UInt64(2 * cs)) + 1
                let byte = UInt8(truncatingIfNeeded: tag * 16 + i + 1)
                let data = [UInt8](repeating: byte, count: len)
                try data.withUnsafeBytes { try img.write($0, at: UInt64(off), fua: false) }
                fill(&model, off..<off + len, byte)
            }
        }
        try writes(30, 1)
        try img.createSnapshot(name: "a"); taken["a"] = model
        try writes(30, 2)
        try img.createSnapshot(name: "b"); taken["b"] = model
        try writes(20, 3)
        try img.deleteSnapshot("a"); taken["a"] = nil
        try writes(20, 4)
        try img.createSnapshot(name: "c"); taken["c"] = model
        try img.revertToSnapshot("b"); model = taken["b"]!
        try writes(20, 5)
        try img.deleteSnapshot("c")
        let events = rec.events
        try img.close()

        let syncs = events.indices.filter { events[$0] == .sync }.map { $0 + 1 }
        var points = Set(syncs)
        for _ in 0..<30 { points.insert(Int(rng.next() % UInt64(events.count + 1))) }
        let path = "\(dir)/snapcrash-\(cs).qcow2"
        for k in points.sorted() {
            try writeCrashImage(events, upTo: k, base: baseBytes, rng: &rng, to: path)

            // Leaks are allowed. So are COPIED flags out of step with a refcount that just
            // changed: qcow2 keeps "refcount is 1" in every L2 entry, and a refcount and the
            // entries that mirror it cannot change in one write (QEMU has the same window).
            // Either mismatch is safe for data (an entry marked COPIED whose cluster has a
            // leaked second reference, or a copy on write of a cluster nobody shares), and
            // `qemu-img check -r all` clears it. Anything else is corruption.
            let check = try runTool(["qemu-img", "check", path])
            let errors = (check.out + check.err).split(separator: "\n").filter { $0.hasPrefix("ERROR") }
            let onlyCopied = check.status == 2 && !errors.isEmpty && errors.allSatisfy { $0.hasPrefix("ERROR OFLAG_COPIED") }
            XCTAssertTrue(check.status == 0 || check.status == 3 || onlyCopied,
                          "crash after event \(k) of \(events.count) (cs \(cs)): \(check.out)\(check.err)")
            let ours = try Qcow2Image.check(path: path, repair: nil) { _ in }
            XCTAssertEqual(ours.exitCode, check.status, "strata's check and qemu-img's disagree after event \(k): \(check.out)\(check.err)")
            if onlyCopied {
                let repair = try runTool(["qemu-img", "check", "-r", "all", path])
                let again = try runTool(["qemu-img", "check", path])
                XCTAssertEqual(again.status, 0, "after repair: \(repair.out)\(again.out)")
            }
            let image = try Qcow2Image(path: path, options: OpenOptions(writable: false))
            let names = image.snapshots.map(\.name)
            try image.close()
            for name in names {
                guard let want = taken[name] else { continue }  // deleted later: only its leaks matter
                let snap = try Qcow2Image(path: path, options: OpenOptions(writable: false, snapshot: name))
                let got = try readAll(snap)
                try snap.close()
                if got != want {
                    XCTFail("crash after event \(k) (cs \(cs)): snapshot \(name) changed")
                    return
                }
            }
        }
    }
}

/// A snapshot taken while other threads write holds every write completed before the call
/// and none started after it returned.
final class LiveSnapshotTests: XCTestCase {
    func testSnapshotDuringWritesIsConsistent() throws {
        try requireTool("qemu-img", package: "qemu-utils")
        let dir = try tempDir(self)
        let path = "\(dir)/live.qcow2"
        var o = CreateOptions(size: 16 << 20)
        o.clusterSize = 4096
        try Qcow2Image.create(path: path, options: o)
        let img = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        let writers = 4, blocks = 64, block = 4096
        // Per write: (block, counter, started, finished) in a monotonic clock; written under a lock.
        struct Write { var block: Int; var counter: UInt32; var start: UInt64; var end: UInt64 }
        let log = Locked<[Write]>([])
        let stop = ManagedAtomicFlag()
        var window: (UInt64, UInt64) = (0, 0)
        let group = DispatchGroup()
        for w in 0..<writers {
            group.enter()
            Thread.detachNewThread {
                defer { group.leave() }
                var counter: UInt32 = 0
                var rng = SeededRandom(seed: UInt64(w + 1))
                while !stop.isSet {
                    counter += 1
                    let b = w * blocks + Int(rng.next() % UInt64(blocks))
                    var data = [UInt8](repeating: 0, count: block)
                    data.withUnsafeMutableBytes { $0.storeBytes(of: counter, as: UInt32.self) }
                    let start = DispatchTime.now().uptimeNanoseconds
                    try! data.withUnsafeBytes { try img.write($0, at: UInt64(b * block), fua: false) }
                    let end = DispatchTime.now().uptimeNanoseconds
                    log.update { $0.append(Write(block: b, counter: counter, start: start, end: end)) }
                }
            }
        }
        usleep(100_000)
        let s0 = DispatchTime.now().uptimeNanoseconds
        try img.createSnapshot(name: "live")
        let s1 = DispatchTime.now().uptimeNanoseconds
        window = (s0, s1)
        usleep(100_000)
        stop.set()
        group.wait()
        try img.close()
        XCTAssertEqual(try runTool(["qemu-img", "check", path]).status, 0)

        let snap = try Qcow2Image(path: path, options: OpenOptions(writable: false, snapshot: "live"))
        let bytes = try readAll(snap)
        try snap.close()
        let writes = log.value
        var byBlock: [Int: [Write]] = [:]
        for w in writes { byBlock[w.block, default: []].append(w) }
        var checked = 0
        for (b, list) in byBlock {
            let held = bytes[(b * block)..<(b * block + 4)].withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) }
            // Every write to b that completed before the call must be in (the latest of them or a later one).
            let completed = list.filter { $0.end < window.0 }.map(\.counter).max() ?? 0
            XCTAssertGreaterThanOrEqual(held, completed, "block \(b) lost a write completed before the snapshot")
            // No write that started after the call returned may be in it.
            if held != 0, let w = list.first(where: { $0.counter == held }) {
                XCTAssertLessThan(w.start, window.1, "block \(b) holds a write started after the snapshot")
            }
            checked += 1
        }
        XCTAssertGreaterThan(checked, 0)
        print("live snapshot: \(writes.count) writes, snapshot took \((window.1 - window.0) / 1000) µs")
    }
}

/// A value shared between threads, guarded by `lock`.
final class Locked<T>: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: T
    init(_ v: T) { stored = v }
    var value: T { lock.lock(); defer { lock.unlock() }; return stored }
    func update(_ f: (inout T) -> Void) { lock.lock(); f(&stored); lock.unlock() }
}

/// A flag set once by one thread and read by others.
final class ManagedAtomicFlag: @unchecked Sendable {
    private let flag = Locked(false)
    var isSet: Bool { flag.value }
    func set() { flag.update { $0 = true } }
}
