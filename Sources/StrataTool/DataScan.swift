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

/// Finding the first difference, or the first non-zero byte, in buffers (compare).
enum DataScan {
    /// Bytes per chunk read at once by compare.
    static let chunkSize = 2 << 20

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
            if !ZeroBuffer.isZero(UnsafeRawBufferPointer(rebasing: a[i..<(i + n)])) {
                for j in i..<(i + n) where a[j] != 0 { return j }
            }
            i += n
        }
        return nil
    }
}
