/// Derived sizes of an image: entries per table, shifts and masks.
public struct Geometry: Sendable, Equatable {
    public let clusterBits: UInt32
    public let extendedL2: Bool
    public var clusterSize: UInt64 { 1 << UInt64(clusterBits) }
    /// Bytes per L2 entry (8, or 16 with extended entries).
    public var l2EntryBytes: UInt64 { extendedL2 ? 16 : 8 }
    public var l2Entries: UInt64 { clusterSize / l2EntryBytes }
    /// Guest bytes one L2 table maps.
    public var l2Coverage: UInt64 { l2Entries * clusterSize }
    public var subclusterSize: UInt64 { extendedL2 ? clusterSize / 32 : clusterSize }
    public init(clusterBits: UInt32, extendedL2: Bool) {
        self.clusterBits = clusterBits
        self.extendedL2 = extendedL2
    }
    public func l1Entries(forSize size: UInt64) -> UInt64 { divUp(size, l2Coverage) }
}
