import Foundation
import XCTest
import TestSupport
@testable import Strata

/// The RBD store under the engine, on the test cluster: asynchronous reads
/// (`startRead`) give what blocking reads give, through a backing file in the pool too, and
/// refuse what they cannot do without waiting.
final class RBDStorageTests: XCTestCase {
    func testStartedReadsMatchBlockingReads() throws {
        let conf = try Ceph.conf()
        let base = Ceph.name("lib-base", conf: conf), top = Ceph.name("lib-top", conf: conf)
        defer { Ceph.remove([top, base], conf: conf) }
        let mib: UInt64 = 1 << 20
        try Qcow2Image.create(path: base, options: CreateOptions(size: 4 * mib))
        do {
            let b = try Qcow2Image(path: base, options: OpenOptions(writable: true))
            try [UInt8](repeating: 0x11, count: Int(2 * mib)).withUnsafeBytes { try b.write($0, at: 0, fua: false) }
            try b.close()
        }
        var o = CreateOptions(size: 4 * mib)
        o.backingFile = base
        o.backingFormat = .qcow2
        try Qcow2Image.create(path: top, options: o)
        let img = try Qcow2Image(path: top, options: OpenOptions(writable: true))
        defer { try? img.close() }
        XCTAssertTrue(img.asynchronousIO)
        try [UInt8](repeating: 0x22, count: 192 << 10).withUnsafeBytes { try img.write($0, at: 64 << 10, fua: false) }
        try img.writeZeroes(at: 512 << 10, length: 64 << 10, mayUnmap: false, fua: false)
        try img.flush()

        func started(_ offset: UInt64, _ count: Int) -> [UInt8]? {
            var out = [UInt8](repeating: 0xEE, count: count)
            let done = DispatchSemaphore(value: 0)
            let result = Box()
            out.withUnsafeMutableBytes { buf in
                let io = AsyncIO { ok in result.ok = ok; done.signal() }
                let ok = img.startRead(at: offset, length: count, runs: { off, n, _ in
                    let s = Int(off - offset)
                    return UnsafeMutableRawBufferPointer(rebasing: buf[s..<s + n])
                }, io: io)
                io.finishStarting(ok: ok)
                done.wait()
            }
            return result.ok ? out : nil
        }
        func blocking(_ offset: UInt64, _ count: Int) throws -> [UInt8] {
            var out = [UInt8](repeating: 0xEE, count: count)
            try out.withUnsafeMutableBytes { try img.read(into: $0, at: offset) }
            return out
        }
        // Tables cached, as a served disk's are after its first reads.
        _ = try blocking(0, Int(4 * mib))
        // Own data, the backing file's data, zeroes, unallocated past the backing file's
        // data, and ranges across them.
        for (offset, count) in [(UInt64(64 << 10), 4096), (0, 64 << 10), (0, 1 << 20), (500 << 10, 100 << 10),
                                (3 * mib, 4096), (2 * mib - 4096, 8192), (5, 7)] {
            guard let got = started(offset, count) else { XCTFail("read of \(count) at \(offset) was not started"); continue }
            XCTAssertEqual(got, try blocking(offset, count), "\(count) bytes at \(offset)")
        }
        // Past the end: refused, for the blocking read to report.
        XCTAssertNil(started(4 * mib, 1))

        // Overwrites in place: started, and read back; anything needing metadata refused.
        func startedWrite(_ offset: UInt64, _ bytes: [UInt8]) -> Bool {
            let done = DispatchSemaphore(value: 0)
            let result = Box()
            bytes.withUnsafeBytes { buf in
                let io = AsyncIO { ok in result.ok = ok; done.signal() }
                io.finishStarting(ok: img.startWrite(buf, at: offset, io: io))
                done.wait()
            }
            return result.ok
        }
        XCTAssertTrue(startedWrite(64 << 10, [UInt8](repeating: 0x33, count: 8192)))
        XCTAssertEqual(try blocking(64 << 10, 8192), [UInt8](repeating: 0x33, count: 8192))
        XCTAssertEqual(started(64 << 10, 12288), [UInt8](repeating: 0x33, count: 8192) + [UInt8](repeating: 0x22, count: 4096))
        XCTAssertFalse(startedWrite(3 * mib, [UInt8](repeating: 1, count: 4096)), "an allocating write")
        XCTAssertFalse(startedWrite(0, [UInt8](repeating: 1, count: 4096)), "a cluster of the backing file")
        XCTAssertFalse(startedWrite(64 << 10, [UInt8](repeating: 1, count: 100)), "a partial page")
        XCTAssertEqual(try blocking(0, 4096), [UInt8](repeating: 0x11, count: 4096))
        // A table not in memory is not loaded by a started read.
        let fresh = try Qcow2Image(path: top, options: OpenOptions(format: .qcow2, forceShare: true))
        defer { try? fresh.close() }
        let done = DispatchSemaphore(value: 0)
        let result = Box()
        var out = [UInt8](repeating: 0, count: 4096)
        out.withUnsafeMutableBytes { buf in
            let io = AsyncIO { ok in result.ok = ok; done.signal() }
            let ok = fresh.startRead(at: 64 << 10, length: 4096, runs: { _, _, _ in buf }, io: io)
            XCTAssertFalse(ok)
            io.finishStarting(ok: ok)
            done.wait()
        }
        XCTAssertFalse(result.ok)
    }
}

private final class Box: @unchecked Sendable {
    var ok = false
}
