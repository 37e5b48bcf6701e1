#if canImport(Glibc)
import Glibc
#endif

extension UnsafeMutableRawBufferPointer {
    /// Fills with zero bytes (memset: fast in every build mode).
    @inline(__always) func zero() {
        if let b = baseAddress, count > 0 { memset(b, 0, count) }
    }
}

extension UnsafeRawBufferPointer {
    /// A byte array copy (memcpy).
    func bytes() -> [UInt8] {
        [UInt8](unsafeUninitializedCapacity: count) { out, n in
            if let b = baseAddress, count > 0 { memcpy(out.baseAddress!, b, count) }
            n = count
        }
    }
}

/// Rounds up to a multiple of a power of two.
@inline(__always) func alignUp(_ v: UInt64, _ a: UInt64) -> UInt64 { (v &+ a &- 1) & ~(a &- 1) }
/// Divides, rounding up.
@inline(__always) func divUp(_ v: UInt64, _ d: UInt64) -> UInt64 { (v &+ d &- 1) / d }
