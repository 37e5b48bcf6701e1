/// L1 table entry.
/// ```
/// bits 0-8 reserved | 9-55 L2 table offset | 56-62 reserved | 63 COPIED (refcount == 1)
/// ```
public struct L1Entry: Sendable, Equatable {
    public static let copied: UInt64 = 1 << 63
    public static let offsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    public var raw: UInt64
    public init(raw: UInt64) { self.raw = raw }
    public init(l2Offset: UInt64, copied: Bool) { raw = l2Offset | (copied ? Self.copied : 0) }
    public var l2Offset: UInt64 { raw & Self.offsetMask }
    public var isCopied: Bool { raw & Self.copied != 0 }
    /// Reserved bits set: the entry is corrupt.
    public var hasReservedBits: Bool { raw & ~(Self.offsetMask | Self.copied) != 0 }
}

/// What one guest cluster maps to, decoded from its L2 entry (and, with extended L2, its bitmap).
public enum ClusterMapping: Sendable, Equatable {
    /// No data in this image: read from the backing file (or zeroes).
    case unallocated
    /// Reads as zeroes; `host` is a preallocated cluster kept by the entry, or 0.
    case zero(host: UInt64)
    /// Uncompressed data at a host cluster.
    case data(host: UInt64, copied: Bool)
    /// Compressed data: starts at byte `host`, spans `sectors` 512-byte sectors counted from
    /// the sector holding `host`.
    case compressed(host: UInt64, sectors: UInt64)
}

/// Standard L2 entry.
/// ```
/// bit 0 reads-as-zero (v3) | 1-8 reserved | 9-55 host cluster offset | 56-61 reserved
/// bit 62 compressed | bit 63 COPIED
/// compressed: bits 0..x-1 host byte offset, x..61 additional sectors, x = 62 - (cluster_bits - 8)
/// ```
public struct L2Entry: Sendable, Equatable {
    public static let copied: UInt64 = 1 << 63
    public static let compressedFlag: UInt64 = 1 << 62
    public static let zeroFlag: UInt64 = 1
    public static let offsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    public var raw: UInt64
    public init(raw: UInt64) { self.raw = raw }
    public static let unallocated = L2Entry(raw: 0)

    public static func data(_ host: UInt64, copied: Bool) -> L2Entry {
        L2Entry(raw: host | (copied ? Self.copied : 0))
    }
    public static func zero(host: UInt64 = 0, copied: Bool = false) -> L2Entry {
        L2Entry(raw: host | zeroFlag | (copied && host != 0 ? Self.copied : 0))
    }
    public static func compressed(host: UInt64, sectors: UInt64, clusterBits: UInt32) -> L2Entry {
        let x = 62 - (UInt64(clusterBits) - 8)
        return L2Entry(raw: compressedFlag | (sectors << x) | host)
    }

    public var isCompressed: Bool { raw & Self.compressedFlag != 0 }
    public var isCopied: Bool { raw & Self.copied != 0 }
    public var hostOffset: UInt64 { raw & Self.offsetMask }

    /// Decodes the entry. `extended` images keep zero state in the bitmap, not bit 0.
    public func mapping(clusterBits: UInt32, extended: Bool) -> ClusterMapping {
        if isCompressed {
            let x = 62 - (UInt64(clusterBits) - 8)
            let host = raw & ((1 << x) - 1)
            let sectors = (raw >> x) & ((1 << (62 - x)) - 1)
            return .compressed(host: host, sectors: sectors + 1)
        }
        let host = hostOffset
        if !extended, raw & Self.zeroFlag != 0 { return .zero(host: host) }
        if host == 0 { return .unallocated }
        return .data(host: host, copied: isCopied)
    }

    /// Reserved bits set: the entry is corrupt (compressed entries have none to check).
    public func hasReservedBits(extended: Bool) -> Bool {
        if isCompressed { return false }
        let allowed = Self.offsetMask | Self.copied | (extended ? 0 : Self.zeroFlag)
        return raw & ~allowed != 0
    }
}

/// Extended L2 subcluster bitmap: bits 0-31 allocated, 32-63 reads-as-zero (one per subcluster).
public struct SubclusterBitmap: Sendable, Equatable {
    public var raw: UInt64
    public init(raw: UInt64) { self.raw = raw }
    public var allocated: UInt32 { UInt32(truncatingIfNeeded: raw) }
    public var zero: UInt32 { UInt32(truncatingIfNeeded: raw >> 32) }
    public init(allocated: UInt32, zero: UInt32) { raw = UInt64(allocated) | (UInt64(zero) << 32) }
    /// Both bits set for one subcluster is invalid.
    public var isValid: Bool { allocated & zero == 0 }
    public static let allZero = SubclusterBitmap(allocated: 0, zero: 0xffff_ffff)
    public static let allAllocated = SubclusterBitmap(allocated: 0xffff_ffff, zero: 0)
}

/// Mask of subclusters [first, last] inclusive.
@inline(__always) func subclusterMask(_ first: Int, _ last: Int) -> UInt32 {
    let hi: UInt64 = (UInt64(1) << UInt64(last + 1)) - 1
    let lo: UInt64 = (UInt64(1) << UInt64(first)) - 1
    return UInt32(truncatingIfNeeded: hi & ~lo)
}

/// Refcount block entries of 1 to 64 bits, packed as the spec says (bit 0 is the least
/// significant bit of a byte for sub-byte widths; wider entries are big-endian).
public enum RefcountCodec {
    @inline(__always)
    public static func get(_ block: UnsafeRawBufferPointer, index: Int, order: UInt32) -> UInt64 {
        switch order {
        case 0, 1, 2:
            let bits = 1 << Int(order)
            let perByte = 8 / bits
            let byte = block[index / perByte]
            let shift = (index % perByte) * bits
            return UInt64((byte >> UInt8(shift)) & UInt8((1 << bits) - 1))
        case 3: return UInt64(block[index])
        case 4: return UInt64(UInt16(bigEndian: block.loadUnaligned(fromByteOffset: index * 2, as: UInt16.self)))
        case 5: return UInt64(UInt32(bigEndian: block.loadUnaligned(fromByteOffset: index * 4, as: UInt32.self)))
        default: return UInt64(bigEndian: block.loadUnaligned(fromByteOffset: index * 8, as: UInt64.self))
        }
    }
    @inline(__always)
    public static func set(_ block: UnsafeMutableRawBufferPointer, index: Int, order: UInt32, value: UInt64) {
        switch order {
        case 0, 1, 2:
            let bits = 1 << Int(order)
            let perByte = 8 / bits
            let shift = (index % perByte) * bits
            let mask = UInt8(((1 << bits) - 1) << shift)
            let b = block[index / perByte]
            block[index / perByte] = (b & ~mask) | (UInt8(truncatingIfNeeded: value << UInt64(shift)) & mask)
        case 3: block[index] = UInt8(truncatingIfNeeded: value)
        case 4: block.storeBytes(of: UInt16(truncatingIfNeeded: value).bigEndian, toByteOffset: index * 2, as: UInt16.self)
        case 5: block.storeBytes(of: UInt32(truncatingIfNeeded: value).bigEndian, toByteOffset: index * 4, as: UInt32.self)
        default: block.storeBytes(of: value.bigEndian, toByteOffset: index * 8, as: UInt64.self)
        }
    }
    /// The largest refcount a width can hold.
    public static func maxValue(order: UInt32) -> UInt64 { order >= 6 ? .max : (1 << (1 << UInt64(order))) - 1 }
}
