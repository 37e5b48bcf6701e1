import Strata

#if canImport(Glibc)
import Glibc
#endif

/// A page-aligned buffer owned by one worker, reused for every chunk.
final class ChunkBuffer {
    let bytes: UnsafeMutableRawBufferPointer
    init(count: Int) {
        bytes = .allocate(byteCount: count, alignment: 4096)
        bytes.initializeMemory(as: UInt8.self, repeating: 0)
    }
    deinit { bytes.deallocate() }

    /// The first `count` bytes.
    func prefix(_ count: Int) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(rebasing: bytes[0..<count])
    }
}

/// Finding zeroes: in block status (ranges that need no reading) and in buffers (blocks that
/// need no writing).
enum DataScan {
    /// Bytes per chunk read or written at once by convert and compare.
    static let chunkSize = 2 << 20

    nonisolated(unsafe) private static let zeroes: UnsafeRawBufferPointer = {
        let p = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        p.initializeMemory(as: UInt8.self, repeating: 0)
        return UnsafeRawBufferPointer(p)
    }()

    /// True when every byte is zero.
    static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        var i = 0
        while i < bytes.count {
            let n = min(zeroes.count, bytes.count - i)
            if memcmp(bytes.baseAddress! + i, zeroes.baseAddress!, n) != 0 { return false }
            i += n
        }
        return true
    }

    /// Runs of blocks (of `granularity` bytes, the last one maybe short) that are not all
    /// zero, merged where they touch; offsets are relative to the buffer.
    static func dataRuns(_ bytes: UnsafeRawBufferPointer, granularity: Int) -> [Range<Int>] {
        var runs: [Range<Int>] = []
        var i = 0
        while i < bytes.count {
            let n = min(granularity, bytes.count - i)
            if !isZero(UnsafeRawBufferPointer(rebasing: bytes[i..<(i + n)])) {
                if let last = runs.last, last.upperBound == i {
                    runs[runs.count - 1] = last.lowerBound..<(i + n)
                } else {
                    runs.append(i..<(i + n))
                }
            }
            i += n
        }
        return runs
    }

    /// Index of the first byte that differs, or nil.
    static func firstDifference(_ a: UnsafeRawBufferPointer, _ b: UnsafeRawBufferPointer) -> Int? {
        let count = min(a.count, b.count)
        // memcmp per 4 KiB block to find the block, then bytes.
        var i = 0
        while i < count {
            let n = min(4096, count - i)
            if memcmp(a.baseAddress! + i, b.baseAddress! + i, n) != 0 {
                for j in i..<(i + n) where a[j] != b[j] { return j }
            }
            i += n
        }
        return nil
    }

    /// Index of the first non-zero byte, or nil.
    static func firstNonZero(_ a: UnsafeRawBufferPointer) -> Int? {
        var i = 0
        while i < a.count {
            let n = min(4096, a.count - i)
            if !isZero(UnsafeRawBufferPointer(rebasing: a[i..<(i + n)])) {
                for j in i..<(i + n) where a[j] != 0 { return j }
            }
            i += n
        }
        return nil
    }

    /// `[start, end)` cut into runs that are known to read as zeroes (`zero` true) or that
    /// must be read, per the device's block status, in windows of 1 GiB.
    static func ranges(of device: any BlockDevice, from start: UInt64, to end: UInt64,
                       name: String, _ body: (_ offset: UInt64, _ length: UInt64, _ zero: Bool) throws -> Void) throws {
        var pos = start
        while pos < end {
            let extents = try device.blockStatus(at: pos, length: min(1 << 30, end - pos))
            var advanced = false
            for ext in extents {
                let s = max(ext.offset, pos), e = min(ext.offset + ext.length, end)
                guard e > s else { continue }
                // A gap in the answer is treated as data that must be read.
                if s > pos { try body(pos, s - pos, false) }
                try body(s, e - s, ext.status.contains(.zero))
                pos = e
                advanced = true
            }
            guard advanced else {
                throw CLIError.refused(file: name, reason: "block status returned no extent at offset \(pos)")
            }
        }
    }
}
