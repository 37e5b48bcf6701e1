import Foundation
import XCTest
import TestSupport
@testable import Strata

/// Strata writes, QEMU checks and reads; QEMU writes, Strata reads.
final class EngineInteropTests: XCTestCase {
    struct Config { var cs = 65536; var refbits = 16; var ext = false; var zstd = false; var compat = 3 }

    /// Applies random writes, zero writes and discards to `img` and to `model` alike.
    func randomOps(_ img: any BlockDevice, model: inout [UInt8], seed: UInt64, count: Int, cs: Int) throws {
        var rng = SeededRandom(seed: seed)
        let size = model.count
        for i in 0..<count {
            let off = Int(rng.next() % UInt64(size))
            let len = min(size - off, Int(rng.next() % UInt64(3 * cs)) + 1)
            switch rng.next() % 10 {
            case 0...5:
                let byte = UInt8(truncatingIfNeeded: i &+ 1)
                let data = [UInt8](repeating: byte, count: len)
                try data.withUnsafeBytes { try img.write($0, at: UInt64(off), fua: false) }
                fill(&model, off..<off + len, byte)
            case 6...7:
                try img.writeZeroes(at: UInt64(off), length: UInt64(len), mayUnmap: rng.next() % 2 == 0, fua: false)
                fill(&model, off..<off + len, 0)
            default:
                try img.discard(at: UInt64(off), length: UInt64(len))
                // Whole clusters read as zero afterwards; partial ones keep their data.
                let first = (off + cs - 1) / cs * cs
                let last = (off + len) == size ? size : (off + len) / cs * cs
                if last > first { fill(&model, first..<last, 0) }
            }
            if i % 97 == 0 { try img.flush() }
        }
    }

    func testStrataImagesPassQemuCheckAndReadBack() throws {
        try requireTool("qemu-img", package: "qemu-utils")
        let dir = try tempDir(self)
        let configs: [Config] = [
            Config(), Config(cs: 4096), Config(cs: 512), Config(cs: 2 << 20),
            Config(refbits: 1), Config(refbits: 2), Config(refbits: 4), Config(refbits: 8),
            Config(refbits: 32), Config(refbits: 64), Config(cs: 512, refbits: 64),
            Config(ext: true), Config(cs: 16384, ext: true), Config(zstd: true), Config(compat: 2),
        ]
        for (n, c) in configs.enumerated() {
            let path = "\(dir)/img\(n).qcow2"
            var o = CreateOptions(size: 12 << 20 + 3 * 512)
            o.clusterSize = c.cs
            o.refcountBits = c.refbits
            o.extendedL2 = c.ext
            o.compressionType = c.zstd ? .zstd : .zlib
            o.version = UInt32(c.compat)
            try Qcow2Image.create(path: path, options: o)
            try assertQemuCheckClean(path)
            // qemu-img info agrees on every field with the same image made by qemu-img.
            let twin = "\(dir)/twin\(n).qcow2"
            let qopts = "cluster_size=\(c.cs),refcount_bits=\(c.refbits),extended_l2=\(c.ext ? "on" : "off"),compression_type=\(c.zstd ? "zstd" : "zlib"),compat=\(c.compat == 2 ? "0.10" : "1.1")"
            let qc = try runTool(["qemu-img", "create", "-q", "-f", "qcow2", "-o", qopts, twin, "\(12 << 20 + 3 * 512)"])
            XCTAssertEqual(qc.status, 0, qc.err)
            XCTAssertEqual(try qemuInfo(path), try qemuInfo(twin), "qemu-img info of strata's and qemu's image, config \(c)")
            let img = try Qcow2Image(path: path, options: OpenOptions(writable: true))
            var model = [UInt8](repeating: 0, count: Int(img.size))
            try randomOps(img, model: &model, seed: UInt64(n) + 1, count: 300, cs: c.cs)
            XCTAssertEqual(try readAll(img), model, "strata reads back its own writes, config \(c)")
            try img.close()
            try assertQemuCheckClean(path)
            XCTAssertEqual(try qemuRaw(path, dir: dir), model, "qemu-img reads what strata wrote, config \(c)")
        }
    }

    func testQemuImagesReadIdentically() throws {
        try requireTool("qemu-img", package: "qemu-utils")
        try requireTool("qemu-io", package: "qemu-utils")
        let dir = try tempDir(self)
        let opts = ["cluster_size=512", "cluster_size=4096", "cluster_size=65536", "cluster_size=2M",
                    "refcount_bits=1", "refcount_bits=8", "refcount_bits=64", "extended_l2=on",
                    "compat=0.10", "compression_type=zstd", "extended_l2=on,cluster_size=16k"]
        for (n, o) in opts.enumerated() {
            let path = "\(dir)/q\(n).qcow2"
            XCTAssertEqual(try runTool(["qemu-img", "create", "-q", "-f", "qcow2", "-o", o, path, "9M"]).status, 0)
            var cmds: [String] = []
            var rng = SeededRandom(seed: UInt64(n) + 100)
            for i in 0..<60 {
                let off = rng.next() % (9 << 20 - 70000)
                let len = rng.next() % 70000 + 1
                switch i % 4 {
                case 0, 1: cmds += ["-c", "write -P \(i % 250 + 1) \(off) \(len)"]
                case 2: cmds += ["-c", "write -z \(off / 512 * 512) \(len / 512 * 512 + 512)"]
                default: cmds += ["-c", "discard \(off / 512 * 512) \(len / 512 * 512 + 512)"]
                }
            }
            let r = try runTool(["qemu-io", "-f", "qcow2", path] + cmds)
            XCTAssertEqual(r.status, 0, r.err)
            let img = try Qcow2Image(path: path, options: OpenOptions(writable: false))
            XCTAssertEqual(try readAll(img), try qemuRaw(path, dir: dir), "strata reads qemu's \(o) image")
            try img.close()
        }
    }

    func testQemuCompressedImagesRead() throws {
        try requireTool("qemu-img", package: "qemu-utils")
        let dir = try tempDir(self)
        let raw = "\(dir)/src.raw"
        var bytes = [UInt8](repeating: 0, count: 4 << 20)
        var rng = SeededRandom(seed: 7)
        for i in stride(from: 0, to: bytes.count, by: 512) where rng.next() % 3 != 0 {
            let v = UInt8(truncatingIfNeeded: rng.next() % 4)  // compressible
            for j in i..<i + 512 { bytes[j] = v &+ UInt8(truncatingIfNeeded: j % 7) }
        }
        try Data(bytes).write(to: URL(fileURLWithPath: raw))
        for ct in ["zlib", "zstd"] {
            for cs in ["4k", "64k", "1M"] {
                let out = "\(dir)/c-\(ct)-\(cs).qcow2"
                let r = try runTool(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=\(ct),cluster_size=\(cs)", raw, out])
                XCTAssertEqual(r.status, 0, r.err)
                let img = try Qcow2Image(path: out, options: OpenOptions(writable: true))
                XCTAssertEqual(try readAll(img), bytes, "compressed \(ct) \(cs)")
                // Overwrite parts of compressed clusters: copy-on-write out of the compressed data.
                var model = bytes
                try randomOps(img, model: &model, seed: 9, count: 100, cs: Int(img.preferredBlockSize))
                try img.close()
                try assertQemuCheckClean(out)
                XCTAssertEqual(try qemuRaw(out, dir: dir), model)
            }
        }
    }

    /// raw base ← qcow2 (relative backing name) ← qcow2 ← qcow2: each layer written by qemu-io;
    /// strata reads the top like qemu-img does, then writes through the chain.
    func testDeepChainWithRawBase() throws {
        try requireTool("qemu-io", package: "qemu-utils")
        let dir = try tempDir(self)
        let base = "\(dir)/base.raw"
        XCTAssertEqual(try runTool(["qemu-img", "create", "-q", "-f", "raw", base, "6M"]).status, 0)
        XCTAssertEqual(try runTool(["qemu-io", "-f", "raw", base, "-c", "write -P 1 0 6M"]).status, 0)
        var below = (path: base, fmt: "raw")
        var rng = SeededRandom(seed: 5)
        for (n, cs) in ["2M", "4k", "64k"].enumerated() {
            let path = "\(dir)/layer\(n).qcow2"
            // Relative backing names resolve against the overlay's folder.
            let name = (below.path as NSString).lastPathComponent
            let size = n == 2 ? "8M" : "6M"  // the top is larger than its backing
            let r = try runTool(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=\(cs)", "-b", name, "-F", below.fmt, path, size])
            XCTAssertEqual(r.status, 0, r.err)
            var cmds: [String] = []
            for i in 0..<(n == 0 ? 2 : 12) {
                let off = rng.next() % (6 << 20 - 100_000), len = rng.next() % 30_000 + 1
                cmds += ["-c", i % 5 == 4 ? "write -z \(off) \(len)" : "write -P \(n * 50 + i + 2) \(off) \(len)"]
            }
            XCTAssertEqual(try runTool(["qemu-io", "-f", "qcow2", path] + cmds).status, 0)
            below = (path, "qcow2")
        }
        let top = below.path
        let img = try Qcow2Image(path: top, options: OpenOptions(writable: true))
        XCTAssertEqual(try readAll(img), try qemuRaw(top, dir: dir), "strata reads a 3-deep chain like qemu-img")
        let depths = Set(try img.blockStatus(at: 0, length: img.size).map(\.depth))
        XCTAssertEqual(depths, [0, 1, 2, 3, 4], "allocation depth covers every layer and the hole past the base")
        var model = try readAll(img)
        try randomOps(img, model: &model, seed: 11, count: 200, cs: 65536)
        try img.close()
        try assertQemuCheckClean(top)
        XCTAssertEqual(try qemuRaw(top, dir: dir), model)
    }

    /// cache=none: aligned guest data bypasses the page cache through an O_DIRECT descriptor.
    func testCacheNoneUsesDirectIO() throws {
        let dir = try tempDir(self)
        let path = "\(dir)/direct.qcow2"
        try Qcow2Image.create(path: path, options: CreateOptions(size: 16 << 20))
        let img = try Qcow2Image(path: path, options: OpenOptions(writable: true, cache: .none))
        XCTAssertGreaterThanOrEqual((img.storage as! FileStorage).directFD, 0)
        // Aligned buffers take the direct descriptor; unaligned ones the buffered one.
        let aligned = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { aligned.deallocate() }
        aligned.initializeMemory(as: UInt8.self, repeating: 0x3c)
        try img.write(UnsafeRawBufferPointer(aligned), at: 1 << 20, fua: false)
        var model = [UInt8](repeating: 0, count: 16 << 20)
        for i in (1 << 20)..<(2 << 20) { model[i] = 0x3c }
        try randomOps(img, model: &model, seed: 21, count: 150, cs: 65536)
        XCTAssertEqual(try readAll(img), model)
        try img.close()
        try assertQemuCheckClean(path)
        XCTAssertEqual(try qemuRaw(path, dir: dir), model)
    }

    /// Growing past the L1 table's clusters moves the table; shrinking is refused while data
    /// lies past the new end and allowed after it is discarded.
    func testResizeMovesL1AndShrinks() throws {
        try requireTool("qemu-img", package: "qemu-utils")
        let dir = try tempDir(self)
        let path = "\(dir)/grow.qcow2"
        var o = CreateOptions(size: 1 << 30)
        o.clusterSize = 4096
        try Qcow2Image.create(path: path, options: o)
        let img = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        let a = [UInt8](repeating: 0x11, count: 8192)
        try a.withUnsafeBytes { try img.write($0, at: 1 << 29, fua: false) }
        let oldL1 = img.header.l1TableOffset
        try img.resize(to: 64 << 30)
        XCTAssertNotEqual(img.header.l1TableOffset, oldL1, "the L1 table moved")
        XCTAssertEqual(img.header.l1Size, 32768)
        try a.withUnsafeBytes { try img.write($0, at: (64 << 30) - 8192, fua: false) }
        XCTAssertThrowsError(try img.resize(to: 32 << 30)) { XCTAssertTrue("\($0)".contains("allocated"), "\($0)") }
        try img.discard(at: 32 << 30, length: 32 << 30)
        try img.resize(to: 32 << 30)
        try img.close()
        try assertQemuCheckClean(path)
        let info = try runTool(["qemu-img", "info", "--output", "json", path])
        XCTAssertTrue(info.out.contains("\"virtual-size\": \(32 << 30)"), info.out)
        let io = try runTool(["qemu-io", "-f", "qcow2", path, "-c", "read -P 17 \(1 << 29) 8192", "-c", "read -P 0 \((32 << 30) - 8192) 8192"])
        XCTAssertEqual(io.status, 0)
        XCTAssertFalse(io.out.contains("verification failed"), io.out)
    }

    /// An image with an internal snapshot (made by qemu-img): strata's writes copy the shared
    /// L2 table and data clusters, refcounts stay exact, and the snapshot keeps its data.
    func testWritesNextToAnInternalSnapshot() throws {
        try requireTool("qemu-io", package: "qemu-utils")
        let dir = try tempDir(self)
        let path = "\(dir)/snap.qcow2"
        XCTAssertEqual(try runTool(["qemu-img", "create", "-q", "-f", "qcow2", path, "8M"]).status, 0)
        XCTAssertEqual(try runTool(["qemu-io", "-f", "qcow2", path, "-c", "write -P 1 0 4M"]).status, 0)
        XCTAssertEqual(try runTool(["qemu-img", "snapshot", "-c", "s1", path]).status, 0)
        let before = try qemuRaw(path, dir: dir)
        let img = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        var model = before
        try randomOps(img, model: &model, seed: 31, count: 150, cs: 65536)
        try img.close()
        try assertQemuCheckClean(path)
        XCTAssertEqual(try qemuRaw(path, dir: dir), model, "the active layer has strata's writes")
        XCTAssertEqual(try runTool(["qemu-img", "snapshot", "-a", "s1", path]).status, 0)
        XCTAssertEqual(try qemuRaw(path, dir: dir), before, "the snapshot kept its data")
        try assertQemuCheckClean(path)
    }

    /// `qemu-img info --output json` without the fields that name or measure the file itself.
    func qemuInfo(_ path: String) throws -> NSDictionary {
        let r = try runTool(["qemu-img", "info", "-U", "--output", "json", path])
        XCTAssertEqual(r.status, 0, r.err)
        let d = try JSONSerialization.jsonObject(with: Data(r.out.utf8)) as! [String: Any]
        return d.filter { !["filename", "actual-size"].contains($0.key) } as NSDictionary
    }
}
