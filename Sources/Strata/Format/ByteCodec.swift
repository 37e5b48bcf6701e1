/// Big-endian field access on byte arrays: the only place on-disk endianness is handled.
extension Array where Element == UInt8 {
    @inline(__always) func be64(_ at: Int) -> UInt64 {
        withUnsafeBytes { UInt64(bigEndian: $0.loadUnaligned(fromByteOffset: at, as: UInt64.self)) }
    }
    @inline(__always) func be32(_ at: Int) -> UInt32 {
        withUnsafeBytes { UInt32(bigEndian: $0.loadUnaligned(fromByteOffset: at, as: UInt32.self)) }
    }
    @inline(__always) func be16(_ at: Int) -> UInt16 {
        withUnsafeBytes { UInt16(bigEndian: $0.loadUnaligned(fromByteOffset: at, as: UInt16.self)) }
    }
    @inline(__always) mutating func put64(_ v: UInt64, _ at: Int) {
        withUnsafeMutableBytes { $0.storeBytes(of: v.bigEndian, toByteOffset: at, as: UInt64.self) }
    }
    @inline(__always) mutating func put32(_ v: UInt32, _ at: Int) {
        withUnsafeMutableBytes { $0.storeBytes(of: v.bigEndian, toByteOffset: at, as: UInt32.self) }
    }
    @inline(__always) mutating func put16(_ v: UInt16, _ at: Int) {
        withUnsafeMutableBytes { $0.storeBytes(of: v.bigEndian, toByteOffset: at, as: UInt16.self) }
    }
}

extension UnsafeMutableRawBufferPointer {
    @inline(__always) func be64(_ index: Int) -> UInt64 {
        UInt64(bigEndian: loadUnaligned(fromByteOffset: index &* 8, as: UInt64.self))
    }
    @inline(__always) func put64(_ v: UInt64, _ index: Int) {
        storeBytes(of: v.bigEndian, toByteOffset: index &* 8, as: UInt64.self)
    }
}

/// A table of 64-bit entries (L1, refcount table) as big-endian bytes, zero-padded to `size`.
func encodeTable(_ entries: [UInt64], size: Int? = nil) -> [UInt8] {
    var b = [UInt8](repeating: 0, count: size ?? entries.count * 8)
    for (i, v) in entries.enumerated() { b.put64(v, i * 8) }
    return b
}
