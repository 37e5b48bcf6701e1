import Foundation
import XCTest
@testable import Strata

/// The I/O an event loop does itself, without a hop to the I/O threads: `readIfCached` and
/// `writeInPlaceIfCached`. Whenever they say they did it, the result must be the blocking
/// call's; they must say no (having changed nothing) where they would have to wait or work:
/// an L2 table not in the cache, a compressed cluster, a cluster that needs copy-on-write or
/// allocation, a dedup or compressing image.
final class EventLoopIOTests: XCTestCase {
    private let cluster = 65536

    /// A qcow2 image (written by QEMU) on a qcow2 backing file: data, zero clusters,
    /// a compressed cluster, unallocated clusters that fall through to the backing file, and
    /// a tail past the backing file's end.
    private func makeImage(_ dir: String) throws -> String {
        let base = dir + "/base.qcow2", top = dir + "/top.qcow2"
        XCTAssertEqual(try runTool(["qemu-img", "create", "-q", "-f", "qcow2", base, "1M"]).status, 0)
        XCTAssertEqual(try runTool(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 512k", base]).status, 0)
        XCTAssertEqual(try runTool(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "2M"]).status, 0)
        for cmd in ["write -P 0x22 64k 128k", "write -z 256k 64k", "write -c -P 0x33 384k 64k", "write -P 0x44 1100k 100k"] {
            let r = try runTool(["qemu-io", "-f", "qcow2", "-c", cmd, top])
            XCTAssertEqual(r.status, 0, r.err)
        }
        return top
    }

    private func blockingRead(_ img: Qcow2Image, _ offset: Int, _ count: Int) throws -> [UInt8] {
        var b = [UInt8](repeating: 0xEE, count: count)
        try b.withUnsafeMutableBytes { try img.read(into: $0, at: UInt64(offset)) }
        return b
    }

    private func cachedRead(_ img: Qcow2Image, _ offset: Int, _ count: Int) -> [UInt8]? {
        var b = [UInt8](repeating: 0xEE, count: count)
        let ok = b.withUnsafeMutableBytes { img.readIfCached(into: $0, at: UInt64(offset)) }
        return ok ? b : nil
    }

    func testWhatItReadsIsWhatTheBlockingReadReturns() throws {
        try requireTool("qemu-io", package: "qemu-utils")
        let dir = try tempDir(self)
        let img = try Qcow2Image(path: try makeImage(dir), options: OpenOptions())
        defer { try? img.close() }
        _ = try readAll(img)  // tables cached, file pages in the page cache

        // Kinds one by one: data, data from the backing file, zeroes, past the backing
        // file's end, and ranges across them.
        let answered: [(Int, Int)] = [(64 << 10, 4096), (70 << 10, 100_000), (0, 64 << 10), (200 << 10, 8192),
                                      (256 << 10, 64 << 10), (1100 << 10, 100 << 10), (600 << 10, 4096),
                                      (0, 384 << 10), (1 << 20, 1 << 20), (5, 7)]
        for (o, n) in answered {
            guard let got = cachedRead(img, o, n) else { XCTFail("read of \(n) bytes at \(o) was not answered"); continue }
            XCTAssertEqual(got, try blockingRead(img, o, n), "\(n) bytes at \(o)")
        }
        // A compressed cluster is work for an I/O thread, never the caller's.
        XCTAssertNil(cachedRead(img, 384 << 10, 4096))
        XCTAssertNil(cachedRead(img, 300 << 10, 128 << 10))
        // Out of range: no answer (the blocking read reports the error).
        XCTAssertNil(cachedRead(img, 2 << 20, 1))

        // Random ranges: whenever it answers, it agrees.
        var rng = SystemRandomNumberGenerator()
        var answeredCount = 0
        for _ in 0..<300 {
            let o = Int.random(in: 0..<(2 << 20) - 1, using: &rng)
            let n = Int.random(in: 1...min(200_000, (2 << 20) - o), using: &rng)
            if let got = cachedRead(img, o, n) {
                answeredCount += 1
                XCTAssertEqual(got, try blockingRead(img, o, n), "\(n) bytes at \(o)")
            }
        }
        XCTAssertGreaterThan(answeredCount, 100)
    }

    func testAnL2TableNotInTheCacheIsNotReadWithoutWaiting() throws {
        try requireTool("qemu-io", package: "qemu-utils")
        let dir = try tempDir(self)
        let path = dir + "/wide.qcow2"
        // 4 KiB clusters: one L2 table covers 2 MiB, so these six writes land in six tables.
        XCTAssertEqual(try runTool(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "64M"]).status, 0)
        let writes = (0..<6).flatMap { k in ["-c", "write -P \(0x50 + k) \(k * 4)M 8k"] }
        XCTAssertEqual(try runTool(["qemu-io", "-f", "qcow2"] + writes + [path]).status, 0)
        // The smallest L2 cache there is: four tables.
        var options = OpenOptions()
        options.l2CacheBytes = 4096
        let img = try Qcow2Image(path: path, options: options)
        defer { try? img.close() }
        func pattern(_ k: Int, _ n: Int) -> [UInt8] { [UInt8](repeating: UInt8(0x50 + k), count: n) }

        for k in 0..<6 { XCTAssertEqual(try blockingRead(img, k << 22, 8192), pattern(k, 8192)) }
        // Tables 2...5 are cached; 0 and 1 were evicted.
        XCTAssertEqual(cachedRead(img, 5 << 22, 4096), pattern(5, 4096))
        XCTAssertNil(cachedRead(img, 0, 4096), "table 0 is not cached: answering would read it")
        XCTAssertEqual(try blockingRead(img, 0, 8192), pattern(0, 8192))
        XCTAssertEqual(cachedRead(img, 0, 4096), pattern(0, 4096))
    }

    func testStorageWithoutAPageCacheNeverAnswers() throws {
        let dir = try tempDir(self)
        let path = dir + "/direct.qcow2"
        XCTAssertEqual(try runTool(["qemu-img", "create", "-q", "-f", "qcow2", path, "1M"]).status, 0)
        XCTAssertEqual(try runTool(["qemu-io", "-f", "qcow2", "-c", "write -P 0x77 0 64k", path]).status, 0)
        let img = try Qcow2Image(path: path, options: OpenOptions(cache: .none))
        defer { try? img.close() }
        _ = try readAll(img)
        // cache=none bypasses the page cache: every data read goes to the disk.
        XCTAssertNil(cachedRead(img, 0, 4096))
        // Zeroes need no data read at all.
        XCTAssertEqual(cachedRead(img, 512 << 10, 4096), [UInt8](repeating: 0, count: 4096))
    }

    private func inPlace(_ img: Qcow2Image, _ byte: UInt8, _ offset: Int, _ count: Int) -> Bool {
        [UInt8](repeating: byte, count: count).withUnsafeBytes { img.writeInPlaceIfCached($0, at: UInt64(offset)) }
    }

    func testOverwritesInPlaceOnlyWhereNoMetadataChanges() throws {
        try requireTool("qemu-io", package: "qemu-utils")
        let dir = try tempDir(self)
        let path = dir + "/w.qcow2"
        XCTAssertEqual(try runTool(["qemu-img", "create", "-q", "-f", "qcow2", path, "4M"]).status, 0)
        for cmd in ["write -P 0x11 0 256k", "write -c -P 0x22 1M 64k", "write -z 2M 64k"] {
            XCTAssertEqual(try runTool(["qemu-io", "-f", "qcow2", "-c", cmd, path]).status, 0)
        }
        var model = try qemuRaw(path, dir: dir)
        let img = try Qcow2Image(path: path, options: OpenOptions(writable: true))
        _ = try readAll(img)
        // Nothing was written yet through this open image: the first write prepares the
        // header (autoclear bits), which only the blocking write does.
        XCTAssertFalse(inPlace(img, 0x33, 0, 4096))
        try [UInt8](repeating: 0x33, count: 4096).withUnsafeBytes { try img.write($0, at: 0, fua: false) }
        fill(&model, 0..<4096, 0x33)

        // Owned data, whole pages: written in place.
        XCTAssertTrue(inPlace(img, 0x44, 8192, 8192))
        fill(&model, 8192..<16384, 0x44)
        XCTAssertTrue(inPlace(img, 0x45, 60 << 10, 8192))  // across two clusters of one host run
        fill(&model, (60 << 10)..<(68 << 10), 0x45)
        // Everything else is refused and leaves the disk as it was.
        XCTAssertFalse(inPlace(img, 0x55, 512, 4096), "not page aligned")
        XCTAssertFalse(inPlace(img, 0x55, 252 << 10, 8192), "half in an unallocated cluster")
        XCTAssertFalse(inPlace(img, 0x55, 1 << 20, 4096), "compressed: needs a new cluster")
        XCTAssertFalse(inPlace(img, 0x55, 2 << 20, 4096), "a zero cluster: needs a new cluster")
        XCTAssertFalse(inPlace(img, 0x55, 3 << 20, 4096), "unallocated")
        XCTAssertFalse(inPlace(img, 0x55, (4 << 20) - 4096, 8192), "past the end")
        XCTAssertEqual(try readAll(img), model)

        // A cluster shared with a snapshot must be copied first: never in place.
        try img.createSnapshot(name: "s")
        XCTAssertFalse(inPlace(img, 0x66, 0, 4096))
        try [UInt8](repeating: 0x66, count: 4096).withUnsafeBytes { try img.write($0, at: 0, fua: false) }
        fill(&model, 0..<4096, 0x66)
        XCTAssertTrue(inPlace(img, 0x67, 4096, 4096), "the copied cluster is owned again")
        fill(&model, 4096..<8192, 0x67)
        XCTAssertEqual(try readAll(img), model)
        try img.close()

        try assertQemuCheckClean(path)
        XCTAssertEqual(try qemuRaw(path, dir: dir), model)
    }

    func testDedupAndCompressingImagesNeverWriteInPlaceWithoutTheirPlan() throws {
        let dir = try tempDir(self)
        for (name, dedup, compress) in [("dedup", true, false), ("compress", false, true)] {
            let path = "\(dir)/\(name).qcow2"
            var o = CreateOptions(size: 1 << 20)
            o.dedupWrites = dedup
            try Qcow2Image.create(path: path, options: o)
            var open = OpenOptions(writable: true)
            open.compressWrites = compress
            let img = try Qcow2Image(path: path, options: open)
            defer { try? img.close() }
            try [UInt8](repeating: 0x11, count: 65536).withUnsafeBytes { try img.write($0, at: 0, fua: false) }
            XCTAssertFalse(inPlace(img, 0x22, 0, 4096), name)
            XCTAssertEqual(try blockingRead(img, 0, 4096), [UInt8](repeating: 0x11, count: 4096), name)
        }
    }
}
