#if canImport(Glibc)
import Glibc
#endif

/// A shared, read-only buffer of zero bytes, for writing zeroes without allocating and for
/// telling whether a buffer is all zeroes.
public final class ZeroBuffer: Sendable {
    public static let shared = ZeroBuffer()
    /// Bytes in the buffer.
    public let count = 1 << 20
    nonisolated(unsafe) let pointer: UnsafeRawBufferPointer
    private init() {
        let p = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 4096)
        p.zero()
        pointer = UnsafeRawBufferPointer(p)
    }

    /// True when every byte of `bytes` is zero (memcmp against the shared buffer).
    public static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        let z = shared.pointer
        var i = 0
        while i < bytes.count {
            let n = min(z.count, bytes.count - i)
            if memcmp(bytes.baseAddress! + i, z.baseAddress!, n) != 0 { return false }
            i += n
        }
        return true
    }

    /// Runs of blocks (of `granularity` bytes, the last one maybe short) that are not all
    /// zero, merged where they touch; offsets are relative to the buffer.
    public static func dataRuns(_ bytes: UnsafeRawBufferPointer, granularity: Int) -> [Range<Int>] {
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
}
