import Foundation
import Synchronization
import XCTest
import TestSupport
@testable import Strata

/// Compressed clusters written by the engine: each codec round trips, clusters that do not
/// shrink stay uncompressed, later writes copy compressed clusters on write, and QEMU reads
/// (and checks) what we write for zlib and zstd.
final class CompressedWriteTests: XCTestCase {
    /// A cluster of text-like bytes (compressible), varied by `seed`.
    func compressible(_ count: Int, seed: Int) -> [UInt8] {
        let words = Array("the quick brown fox \(seed) jumps over the lazy dog; ".utf8)
        return (0..<count).map { words[($0 + seed) % words.count] }
    }

    func random(_ count: Int, seed: UInt64) -> [UInt8] {
        var rng = SeededRandom(seed: seed)
        return (0..<count).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
    }

    func testCodecsRoundTripAndRefuseWhatDoesNotShrink() throws {
        for type in CompressionType.allCases {
            for cs in [512, 65536] {
                let c = ClusterCompressor(type: type, clusterSize: cs)
                let input = compressible(cs, seed: cs)
                let packed = try XCTUnwrap(input.withUnsafeBytes { c.compress($0).map { Array($0) } }, "\(type) \(cs)")
                XCTAssertLessThan(packed.count, cs)
                // Trailing bytes (the rest of the last sector) are ignored by the reader.
                let stored = packed + [UInt8](repeating: 0xa5, count: 300)
                var out = [UInt8](repeating: 0, count: cs)
                let ok = stored.withUnsafeBytes { i in out.withUnsafeMutableBytes { Codec.decompress(type, i, into: $0) } }
                XCTAssertTrue(ok, "\(type) \(cs)")
                XCTAssertEqual(out, input, "\(type) \(cs)")
                // Random bytes do not shrink: stored uncompressed.
                let noise = random(cs, seed: UInt64(cs))
                XCTAssertNil(noise.withUnsafeBytes { c.compress($0) }, "\(type) \(cs)")
            }
        }
    }

    func testLZ4IsAnLZ4Frame() throws {
        let c = ClusterCompressor(type: .lz4, clusterSize: 4096)
        let packed = compressible(4096, seed: 1).withUnsafeBytes { Array(c.compress($0)!) }
        XCTAssertEqual(Array(packed[0..<4]), [0x04, 0x22, 0x4d, 0x18])  // LZ4 frame magic 0x184D2204, little-endian
        XCTAssertEqual(Array(packed.suffix(4)), [0, 0, 0, 0])           // end mark
    }

    /// Writes compressed clusters (one random, one partial last cluster) and a copy-on-write
    /// into a compressed cluster; checks reads before and after reopening, and QEMU's view.
    func roundTrip(type: CompressionType, cs: Int, ext: Bool = false, version: UInt32 = 3) throws {
        let dir = try tempDir(self)
        let path = "\(dir)/c.qcow2"
        let tailBytes = cs == 512 ? cs : cs / 2  // sizes are whole sectors
        let size = 6 * cs + tailBytes  // a partial last cluster
        var o = CreateOptions(size: UInt64(size))
        o.clusterSize = cs
        o.extendedL2 = ext
        o.compressionType = type
        o.version = version
        try Qcow2Image.create(path: path, options: o)
        var model = [UInt8](repeating: 0, count: size)
        do {
            let img = try Qcow2Image(path: path, options: OpenOptions(writable: true, format: .qcow2))
            let comp = img.makeCompressor()
            for k in [0, 1, 2, 4] {
                let data = k == 2 ? random(cs, seed: 7) : compressible(cs, seed: k)
                let stored = try data.withUnsafeBytes { try img.writeCompressed($0, at: UInt64(k * cs), compressor: comp) }
                XCTAssertEqual(stored, k != 2, "cluster \(k)")
                model.replaceSubrange(k * cs..<(k + 1) * cs, with: data)
            }
            let tail = compressible(tailBytes, seed: 9)
            XCTAssertTrue(try tail.withUnsafeBytes { try img.writeCompressed($0, at: UInt64(6 * cs), compressor: comp) })
            model.replaceSubrange(6 * cs..<size, with: tail)
            // Rewriting a compressed cluster compressed frees its old bytes.
            let again = compressible(cs, seed: 11)
            try again.withUnsafeBytes { _ = try img.writeCompressed($0, at: UInt64(4 * cs), compressor: comp) }
            model.replaceSubrange(4 * cs..<5 * cs, with: again)
            XCTAssertTrue(try readAll(img) == model, "\(type) cs \(cs) ext \(ext)")
            // A partial write into a compressed cluster copies it on write.
            let patch = [UInt8](repeating: 0xee, count: 100)
            try patch.withUnsafeBytes { try img.write($0, at: UInt64(cs + 10), fua: false) }
            model.replaceSubrange(cs + 10..<cs + 110, with: patch)
            XCTAssertTrue(try readAll(img) == model, "\(type) cs \(cs) ext \(ext)")
            try img.close()
        }
        let img = try Qcow2Image(path: path, options: OpenOptions(format: .qcow2))
        XCTAssertTrue(try readAll(img) == model, "\(type) cs \(cs) ext \(ext)")
        var kinds: [Bool] = []
        try img.forEachExtent(at: 0, length: UInt64(size)) { kinds.append($0.compressed); return true }
        XCTAssertTrue(kinds.contains(true))
        try img.close()
        if type != .lz4 {
            try assertQemuCheckClean(path)
            XCTAssertTrue(try qemuRaw(path, dir: dir) == model, "qemu reads \(type) cs \(cs) ext \(ext)")
        }
    }

    func testZlibRoundTrip() throws {
        try requireTool("qemu-img", package: "qemu-utils")
        try roundTrip(type: .zlib, cs: 65536)
        try roundTrip(type: .zlib, cs: 4096)
        try roundTrip(type: .zlib, cs: 512)
        try roundTrip(type: .zlib, cs: 65536, version: 2)
        try roundTrip(type: .zlib, cs: 65536, ext: true)
    }

    func testZstdRoundTrip() throws {
        try requireTool("qemu-img", package: "qemu-utils")
        try roundTrip(type: .zstd, cs: 65536)
        try roundTrip(type: .zstd, cs: 2 << 20)
        try roundTrip(type: .zstd, cs: 32768, ext: true)
    }

    func testLZ4RoundTrip() throws {
        try roundTrip(type: .lz4, cs: 65536)
        try roundTrip(type: .lz4, cs: 4096)
        try roundTrip(type: .lz4, cs: 65536, ext: true)
    }

    /// Many small compressed clusters share host clusters; discarding them all leaves no
    /// leak and no error for QEMU.
    func testSharedHostClustersAreReleased() throws {
        try requireTool("qemu-img", package: "qemu-utils")
        let dir = try tempDir(self)
        let path = "\(dir)/s.qcow2"
        var o = CreateOptions(size: 64 * 4096)
        o.clusterSize = 4096
        try Qcow2Image.create(path: path, options: o)
        let img = try Qcow2Image(path: path, options: OpenOptions(writable: true, format: .qcow2))
        let comp = img.makeCompressor()
        for k in 0..<64 {
            try compressible(4096, seed: k).withUnsafeBytes { _ = try img.writeCompressed($0, at: UInt64(k * 4096), compressor: comp) }
        }
        try img.flush()
        try img.discard(at: 0, length: 32 * 4096)
        try img.close()
        try assertQemuCheckClean(path)
    }

    /// Online compression: the image's `compress` flag (or the open option) stores every
    /// aligned whole cluster of a guest write compressed; the rest is written as usual, and
    /// partial writes into compressed clusters copy them on write.
    func testOnlineCompressionOfWholeClusterWrites() throws {
        try requireTool("qemu-img", package: "qemu-utils")
        let dir = try tempDir(self)
        let cs = 65536
        let size = 16 * cs + 4096
        for (name, flag) in [("flag", true), ("option", false)] {
            let path = "\(dir)/\(name).qcow2"
            var o = CreateOptions(size: UInt64(size))
            o.compressionType = .zstd
            o.compressWrites = flag
            try Qcow2Image.create(path: path, options: o)
            var open = OpenOptions(writable: true, format: .qcow2)
            open.compressWrites = !flag
            let img = try Qcow2Image(path: path, options: open)
            XCTAssertEqual(img.extensions.strata?.flags.contains(.compress) ?? false, flag)
            var model = [UInt8](repeating: 0, count: size)
            func put(_ data: [UInt8], _ at: Int) throws {
                try data.withUnsafeBytes { try img.write($0, at: UInt64(at), fua: false) }
                model.replaceSubrange(at..<at + data.count, with: data)
            }
            try put(compressible(3 * cs + 1000, seed: 1), 100)             // head, 2 whole clusters, tail
            try put(compressible(cs, seed: 2), 8 * cs)                      // one whole cluster
            try put(random(cs, seed: 3), 9 * cs)                            // does not shrink
            try put([UInt8](repeating: 0x42, count: 512), 8 * cs + 512)     // into a compressed cluster
            try put(compressible(4096, seed: 4), 16 * cs)                   // the partial last cluster
            XCTAssertTrue(try readAll(img) == model)
            var compressed: UInt64 = 0
            try img.forEachExtent(at: 0, length: UInt64(size)) { if $0.compressed { compressed += $0.length }; return true }
            XCTAssertEqual(compressed, UInt64(2 * cs + 4096), name)         // clusters 1, 2 and the last
            try img.close()
            try assertQemuCheckClean(path)
            XCTAssertTrue(try qemuRaw(path, dir: dir) == model, name)
        }
    }

    /// Concurrent compressed writers (online compression from 4 threads, with flushes and
    /// overwrites racing) leave a clean image that reads as the last writes.
    func testConcurrentCompressedWriters() throws {
        try requireTool("qemu-img", package: "qemu-utils")
        let dir = try tempDir(self)
        let path = "\(dir)/mt.qcow2"
        let cs = 4096, clusters = 256
        var o = CreateOptions(size: UInt64(cs * clusters))
        o.clusterSize = cs
        o.compressWrites = true
        try Qcow2Image.create(path: path, options: o)
        let img = try Qcow2Image(path: path, options: OpenOptions(writable: true, format: .qcow2))
        // Thread t writes every cluster k with k % 4 == t, twice (the second pass wins).
        let failures = Mutex<[String]>([])
        let data = (0..<clusters).map { compressible(cs, seed: $0) }
        DispatchQueue.concurrentPerform(iterations: 4) { t in
            do {
                for pass in 0..<2 {
                    for k in stride(from: t, to: clusters, by: 4) {
                        let bytes = pass == 0 ? [UInt8](repeating: UInt8(k % 251), count: cs) : data[k]
                        try bytes.withUnsafeBytes { try img.write($0, at: UInt64(k * cs), fua: false) }
                        if k % 37 == 0 { try img.flush() }
                    }
                }
            } catch {
                failures.withLock { $0.append("\(error)") }
            }
        }
        XCTAssertEqual(failures.withLock { $0 }, [])
        let expected = Array(data.joined())
        XCTAssertTrue(try readAll(img) == expected)
        try img.close()
        try assertQemuCheckClean(path)
        XCTAssertTrue(try qemuRaw(path, dir: dir) == expected)
    }

    /// A damaged LZ4 frame fails the read of its cluster with a corruption error (no crash,
    /// no garbage), and the other clusters still read.
    func testDamagedLZ4FrameFailsItsReadOnly() throws {
        let dir = try tempDir(self)
        let path = "\(dir)/bad.qcow2"
        var o = CreateOptions(size: 2 * 65536)
        o.compressionType = .lz4
        try Qcow2Image.create(path: path, options: o)
        do {
            let img = try Qcow2Image(path: path, options: OpenOptions(writable: true, format: .qcow2))
            let comp = img.makeCompressor()
            try compressible(65536, seed: 1).withUnsafeBytes { _ = try img.writeCompressed($0, at: 0, compressor: comp) }
            try [UInt8](repeating: 7, count: 65536).withUnsafeBytes { try img.write($0, at: 65536, fua: false) }
            try img.close()
        }
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        let magic: [UInt8] = [0x04, 0x22, 0x4d, 0x18]
        let at = try XCTUnwrap((0..<bytes.count - 4).first { Array(bytes[$0..<$0 + 4]) == magic })
        for k in at + 11..<at + 40 { bytes[k] = 0xff }  // end of the frame descriptor and the first block
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        let img = try Qcow2Image(path: path, options: OpenOptions(format: .qcow2))
        defer { try? img.close() }
        var buf = [UInt8](repeating: 0, count: 65536)
        XCTAssertThrowsError(try buf.withUnsafeMutableBytes { try img.read(into: $0, at: 0) }) { error in
            XCTAssertTrue("\(error)".contains("does not decompress"), "\(error)")
        }
        try buf.withUnsafeMutableBytes { try img.read(into: $0, at: 65536) }
        XCTAssertEqual(buf, [UInt8](repeating: 7, count: 65536))
    }
}
