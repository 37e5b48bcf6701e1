import Foundation
import XCTest
import Synchronization
import TestSupport
@testable import Strata

/// Small reads through a deep backing chain that qemu-img and qemu-io made, against qemu-img's
/// own flattening: the layers mix cluster sizes (4 KiB to 128 KiB), a raw base, a shorter
/// middle layer, compressed clusters, zero clusters, extended L2 subclusters and partial
/// cluster writes, so that every kind of unit is read, both before and after the top image
/// remembers where the chain's units lie (``ChainResolution``), and from many threads.
final class ChainReadTests: XCTestCase {
    func testSmallReadsThroughADeepMixedChainMatchQemuImg() throws {
        let dir = try Peer.tempDir(self)
        let size = 8 << 20
        // The base: bytes that differ within every unit, so a read at a wrong offset shows.
        var rng = SeededRandom(seed: 42)
        let base = (0..<size / 8).flatMap { _ in withUnsafeBytes(of: rng.next()) { Array($0) } }
        try Data(base).write(to: URL(fileURLWithPath: "\(dir)/l0.raw"))
        // (cluster size, options, size, qemu-io commands) for each overlay, bottom first.
        let layers: [(Int, String, Int, [String])] = [
            (65536, "", size, ["write -P 2 0 1M", "write -c -P 3 1M 256k", "write -z 2M 128k", "write -P 4 3M 1000"]),
            (4096, "", size, ["write -P 5 64k 8k", "write -z 1M 64k", "discard 4M 64k", "write -P 6 5M 3k"]),
            (131072, "", 6 << 20, ["write -P 7 2M 128k", "write -P 8 3M 64k", "write -c -P 9 4M 128k"]),
            (65536, ",extended_l2=on", size, ["write -P 10 0 2k", "write -z 6M 16k", "write -P 11 7M 24k"]),
            (32768, "", size, ["write -P 12 128k 32k", "write -P 13 6M 100k"]),
        ]
        var below = ("\(dir)/l0.raw", "raw")
        for (i, (cs, options, layerSize, commands)) in layers.enumerated() {
            let path = "\(dir)/l\(i + 1).qcow2"
            try Peer.ok(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=\(cs)\(options)",
                         "-b", below.0, "-F", below.1, path, "\(layerSize)"])
            try Peer.ok(["qemu-io", "-f", "qcow2", path] + commands.flatMap { ["-c", $0] })
            below = (path, "qcow2")
        }
        let top = "\(dir)/top.qcow2"
        try Peer.ok(["qemu-img", "create", "-q", "-f", "qcow2", "-b", below.0, "-F", "qcow2", top, "\(size)"])
        try Peer.ok(["qemu-io", "-f", "qcow2", top, "-c", "write -P 14 5M 64k"])
        try Peer.ok(["qemu-img", "convert", "-O", "raw", top, "\(dir)/expected.raw"])
        let expected = [UInt8](try Data(contentsOf: URL(fileURLWithPath: "\(dir)/expected.raw")))
        XCTAssertEqual(expected.count, size)

        for writable in [false, true] {
            let disk = try Qcow2Image(path: top, options: OpenOptions(writable: writable))
            defer { try? disk.close() }
            XCTAssertNotNil(disk.chainResolution, "a chain of six read-only layers is resolved")
            // Every 4 KiB block, twice (cold, then remembered), then random small reads on threads.
            for _ in 0..<2 {
                var buf = [UInt8](repeating: 0xEE, count: 4096)
                for off in stride(from: 0, to: size, by: 4096) {
                    try buf.withUnsafeMutableBytes { try disk.read(into: $0, at: UInt64(off)) }
                    if buf != Array(expected[off..<off + 4096]) {
                        return XCTFail("4 KiB block at \(off) differs from qemu-img's (writable: \(writable))")
                    }
                }
            }
            XCTAssertGreaterThan(disk.chainResolution?.remembered ?? 0, 100, "units held whole by one layer are remembered")
            let failures = Atomic<Int>(0)
            DispatchQueue.concurrentPerform(iterations: 4) { t in
                var rng = SeededRandom(seed: UInt64(t + 1))
                var buf = [UInt8](repeating: 0, count: 70_000)
                for _ in 0..<2000 {
                    let len = Int(rng.next() % 9000) + 1
                    let off = Int(rng.next() % UInt64(size - len))
                    let ok = (try? buf.withUnsafeMutableBytes { try disk.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<len]), at: UInt64(off)) }) != nil
                    if !ok || buf[0..<len] != expected[off..<off + len] { failures.add(1, ordering: .relaxed) }
                }
            }
            XCTAssertEqual(failures.load(ordering: .relaxed), 0, "threaded small reads differ from qemu-img's (writable: \(writable))")
        }
        // A write to the top over a remembered unit reads back (the top is never remembered).
        let disk = try Qcow2Image(path: top, options: OpenOptions(writable: true))
        var buf = [UInt8](repeating: 0, count: 4096)
        try buf.withUnsafeMutableBytes { try disk.read(into: $0, at: 3 << 20) }
        try [UInt8](repeating: 99, count: 4096).withUnsafeBytes { try disk.write($0, at: 3 << 20, fua: false) }
        try buf.withUnsafeMutableBytes { try disk.read(into: $0, at: 3 << 20) }
        XCTAssertEqual(buf, [UInt8](repeating: 99, count: 4096))
        try disk.close()
    }
}
