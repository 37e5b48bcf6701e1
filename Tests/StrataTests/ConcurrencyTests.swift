import Foundation
import XCTest
import TestSupport
@testable import Strata

final class ConcurrencyTests: XCTestCase {
    /// Many threads write disjoint bytes of the same unallocated clusters at once: if a cluster
    /// were allocated twice, one thread's bytes would be lost (and qemu-img would see a leak).
    func testConcurrentWritesIntoSameClustersAllocateOnce() throws {
        try requireTool("qemu-img", package: "qemu-utils")
        let dir = try tempDir(self)
        for (cs, ext) in [(4096, false), (65536, false), (65536, true)] {
            let path = "\(dir)/conc-\(cs)-\(ext).qcow2"
            var o = CreateOptions(size: 8 << 20)
            o.clusterSize = cs
            o.extendedL2 = ext
            try Qcow2Image.create(path: path, options: o)
            let img = try Qcow2Image(path: path, options: OpenOptions(writable: true))
            let threads = 8
            let chunk = 512
            // Each cluster gets one 512-byte chunk from each thread, in a scrambled order.
            let clusters = 64
            DispatchQueue.concurrentPerform(iterations: threads) { t in
                var rng = SeededRandom(seed: UInt64(t))
                var order = Array(0..<clusters)
                order.shuffle(using: &rng)
                for c in order {
                    let data = [UInt8](repeating: UInt8(t + 1), count: chunk)
                    let off = UInt64(c * cs + t * (cs / threads))
                    try! data.withUnsafeBytes { try img.write($0, at: off, fua: false) }
                    if c % 16 == 0 { try! img.flush() }
                }
            }
            let all = try readAll(img)
            for c in 0..<clusters {
                for t in 0..<threads {
                    let off = c * cs + t * (cs / threads)
                    XCTAssertEqual(Array(all[off..<off + chunk]), [UInt8](repeating: UInt8(t + 1), count: chunk), "cluster \(c) thread \(t)")
                }
            }
            try img.close()
            try assertQemuCheckClean(path)
        }
    }

    /// Readers of allocated data run while writers allocate elsewhere, and see stable data.
    func testReadersDoNotSeeUnrelatedWrites() throws {
        let dir = try tempDir(self)
        let path = "\(dir)/rw.qcow2"
        try Qcow2Image.create(path: path, options: CreateOptions(size: 16 << 20))
        let img = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        let pattern = [UInt8](repeating: 0x5a, count: 1 << 20)
        try pattern.withUnsafeBytes { try img.write($0, at: 0, fua: false) }
        DispatchQueue.concurrentPerform(iterations: 6) { t in
            var rng = SeededRandom(seed: UInt64(t) + 50)
            for _ in 0..<300 {
                if t % 2 == 0 {
                    var buf = [UInt8](repeating: 0, count: 4096)
                    let off = rng.next() % ((1 << 20) - 4096)
                    try! buf.withUnsafeMutableBytes { try img.read(into: $0, at: off) }
                    XCTAssertEqual(buf, [UInt8](repeating: 0x5a, count: 4096))
                } else {
                    let off = (1 << 20) + rng.next() % ((15 << 20) - 70000)
                    let data = [UInt8](repeating: UInt8(t), count: Int(rng.next() % 70000) + 1)
                    try! data.withUnsafeBytes { try img.write($0, at: off, fua: false) }
                    if rng.next() % 20 == 0 { try! img.flush() }
                    if rng.next() % 10 == 0 { try! img.discard(at: off / 65536 * 65536, length: 65536) }
                }
            }
        }
        try img.close()
        if (try? requireTool("qemu-img", package: "qemu-utils")) != nil { try assertQemuCheckClean(path) }
    }
}

/// Strata and QEMU never write one image at once (QEMU's OFD lock bytes).
final class ImageLockTests: XCTestCase {
    func testQemuHoldingImageBlocksStrataWrites() throws {
        try requireTool("qemu-io", package: "qemu-utils")
        let dir = try tempDir(self)
        let path = "\(dir)/locked.qcow2"
        XCTAssertEqual(try runTool(["qemu-img", "create", "-q", "-f", "qcow2", path, "1M"]).status, 0)
        // qemu-io in interactive mode keeps the image open (and locked) until stdin closes.
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/qemu-io")
        p.arguments = ["-f", "qcow2", path]
        let stdin = Pipe()
        p.standardInput = stdin
        p.standardOutput = Pipe()
        try p.run()
        defer { try? stdin.fileHandleForWriting.close(); p.waitUntilExit() }
        // Wait until qemu-io holds its write-permission lock byte (testing takes no lock, so
        // the probe cannot make qemu-io's own open fail).
        let probe = try FileStorage(path: path, mode: .readOnly)
        defer { probe.close() }
        var locked = false
        for _ in 0..<500 where !locked {
            locked = !(try Syscalls.ofdTest(probe.fd, exclusive: true, start: ImageLock.permBase + 1, length: 1))
            if !locked { usleep(10_000) }
        }
        XCTAssertTrue(locked, "qemu-io did not take its image lock")
        XCTAssertThrowsError(try Qcow2Image(path: path, options: OpenOptions(writable: true))) { e in
            XCTAssertTrue("\(e)".contains("lock"), "\(e)")
        }
        XCTAssertThrowsError(try Qcow2Image(path: path, options: OpenOptions(writable: false)))
        // With force-share a reader may look.
        let reader = try Qcow2Image(path: path, options: OpenOptions(writable: false, forceShare: true))
        try reader.close()
    }

    func testStrataHoldingImageBlocksQemuWrites() throws {
        try requireTool("qemu-io", package: "qemu-utils")
        let dir = try tempDir(self)
        let path = "\(dir)/locked2.qcow2"
        try Qcow2Image.create(path: path, options: CreateOptions(size: 1 << 20))
        let img = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        let r = try runTool(["qemu-io", "-f", "qcow2", path, "-c", "write 0 512"])
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.err.contains("lock"), r.err)
        try img.close()
        let r2 = try runTool(["qemu-io", "-f", "qcow2", path, "-c", "write 0 512"])
        XCTAssertEqual(r2.status, 0, r2.err)
    }
}
