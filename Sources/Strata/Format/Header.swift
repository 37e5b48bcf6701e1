/// The qcow2 header (first cluster), decoded and validated. Pure value; no I/O.
///
/// ```
///  0  magic "QFI\xfb"            4 version (2|3)           8 backing_file_offset
/// 16  backing_file_size         20 cluster_bits           24 size
/// 32  crypt_method              36 l1_size                40 l1_table_offset
/// 48  refcount_table_offset     56 refcount_table_clusters
/// 60  nb_snapshots              64 snapshots_offset
/// v3: 72 incompatible  80 compatible  88 autoclear  96 refcount_order  100 header_length
///     104 compression_type (1 byte, when header_length > 104)
/// ```
public struct Qcow2Header: Sendable, Equatable {
    public static let magic: UInt32 = 0x5146_49fb
    public static let v2Length: UInt32 = 72
    public static let v3BaseLength: UInt32 = 104
    /// Header length we write: base + compression_type byte padded to 8.
    public static let v3WriteLength: UInt32 = 112

    public var version: UInt32 = 3
    public var backingFileOffset: UInt64 = 0
    public var backingFileSize: UInt32 = 0
    public var clusterBits: UInt32 = 16
    public var size: UInt64 = 0
    public var cryptMethod: UInt32 = 0
    public var l1Size: UInt32 = 0
    public var l1TableOffset: UInt64 = 0
    public var refcountTableOffset: UInt64 = 0
    public var refcountTableClusters: UInt32 = 0
    public var nbSnapshots: UInt32 = 0
    public var snapshotsOffset: UInt64 = 0
    public var incompatibleFeatures: IncompatibleFeatures = []
    public var compatibleFeatures: CompatibleFeatures = []
    public var autoclearFeatures: AutoclearFeatures = []
    public var refcountOrder: UInt32 = 4
    public var headerLength: UInt32 = Qcow2Header.v3WriteLength
    public var compressionType: CompressionType = .zlib
    /// Bytes of additional header fields past the ones we know (preserved on rewrite).
    public var unknownTail: [UInt8] = []

    public init() {}

    public var clusterSize: UInt64 { 1 << UInt64(clusterBits) }
    public var refcountBits: UInt64 { 1 << UInt64(refcountOrder) }
    public var extendedL2: Bool { incompatibleFeatures.contains(.extendedL2) }

    /// Decodes and validates the fixed header. `bytes` holds at least the first cluster's
    /// header area (the caller reads `min(fileSize, 2 MiB)` bytes or fewer).
    public static func decode(_ bytes: [UInt8], path: String, fileSize: UInt64) throws -> Qcow2Header {
        func bad(_ f: String, _ v: UInt64, _ r: String) -> StrataError { .invalidHeader(path: path, field: f, value: v, reason: r) }
        guard bytes.count >= 72 else {
            if bytes.count >= 4, bytes.be32(0) == magic { throw StrataError.corrupt(Corruption(path: path, kind: .truncated, offset: 0, detail: "file is truncated (\(bytes.count) bytes, the header needs 72)")) }
            throw StrataError.notQcow2(path: path)
        }
        guard bytes.be32(0) == magic else { throw StrataError.notQcow2(path: path) }
        var h = Qcow2Header()
        h.version = bytes.be32(4)
        guard h.version == 2 || h.version == 3 else { throw StrataError.unsupportedVersion(path: path, version: h.version) }
        h.backingFileOffset = bytes.be64(8)
        h.backingFileSize = bytes.be32(16)
        h.clusterBits = bytes.be32(20)
        h.size = bytes.be64(24)
        h.cryptMethod = bytes.be32(32)
        h.l1Size = bytes.be32(36)
        h.l1TableOffset = bytes.be64(40)
        h.refcountTableOffset = bytes.be64(48)
        h.refcountTableClusters = bytes.be32(56)
        h.nbSnapshots = bytes.be32(60)
        h.snapshotsOffset = bytes.be64(64)
        if h.version == 2 {
            h.headerLength = v2Length
            h.refcountOrder = 4
        } else {
            guard bytes.count >= Int(v3BaseLength) else { throw StrataError.corrupt(Corruption(path: path, kind: .truncated, offset: 0, detail: "file is truncated inside the v3 header")) }
            h.incompatibleFeatures = IncompatibleFeatures(rawValue: bytes.be64(72))
            h.compatibleFeatures = CompatibleFeatures(rawValue: bytes.be64(80))
            h.autoclearFeatures = AutoclearFeatures(rawValue: bytes.be64(88))
            h.refcountOrder = bytes.be32(96)
            h.headerLength = bytes.be32(100)
            guard h.headerLength >= v3BaseLength, h.headerLength % 8 == 0 else {
                throw bad("header_length", UInt64(h.headerLength), "must be at least 104 and a multiple of 8")
            }
        }
        guard h.clusterBits >= 9, h.clusterBits <= 21 else {
            throw bad("cluster_bits", UInt64(h.clusterBits), "cluster size must be 512 B to 2 MiB")
        }
        let cs = h.clusterSize
        guard UInt64(h.headerLength) <= cs, Int(h.headerLength) <= bytes.count || h.version == 2 else {
            throw bad("header_length", UInt64(h.headerLength), "larger than the cluster or the file")
        }
        if h.version == 3, h.headerLength > v3BaseLength {
            let raw = bytes[Int(v3BaseLength)]
            guard let ct = CompressionType(rawValue: raw) else {
                throw bad("compression_type", UInt64(raw), "unknown compression type")
            }
            h.compressionType = ct
            if h.headerLength > v3BaseLength + 8 {
                h.unknownTail = Array(bytes[Int(v3BaseLength + 8)..<Int(h.headerLength)])
            }
        }
        if h.incompatibleFeatures.contains(.compressionType) != (h.compressionType != .zlib) {
            throw bad("compression_type", UInt64(h.compressionType.rawValue), "does not agree with the compression type feature bit")
        }
        guard h.refcountOrder <= 6 else { throw bad("refcount_order", UInt64(h.refcountOrder), "refcount width above 64 bits") }
        guard h.cryptMethod == 0 else { throw StrataError.unsupportedFeature(path: path, feature: "encryption (crypt_method \(h.cryptMethod))") }
        guard h.size <= Limits.maxVirtualSize else { throw bad("size", h.size, "virtual size above \(Limits.maxVirtualSize)") }
        if h.extendedL2, h.clusterBits < 14 {
            throw bad("cluster_bits", UInt64(h.clusterBits), "extended L2 entries need clusters of at least 16 KiB")
        }
        // L1 table: bounded, aligned, inside the file.
        let l1Bytes = UInt64(h.l1Size) * 8
        guard l1Bytes <= Limits.maxL1Bytes else { throw bad("l1_size", UInt64(h.l1Size), "L1 table above \(Limits.maxL1Bytes) bytes") }
        let geometry = Geometry(clusterBits: h.clusterBits, extendedL2: h.extendedL2)
        let needed = geometry.l1Entries(forSize: h.size)
        guard UInt64(h.l1Size) >= needed else { throw bad("l1_size", UInt64(h.l1Size), "too small for the virtual size (needs \(needed))") }
        if h.l1Size > 0 {
            try checkTable(h.l1TableOffset, l1Bytes, "l1_table_offset", cs, fileSize, path)
        }
        let rtBytes = UInt64(h.refcountTableClusters) * cs
        guard h.refcountTableClusters > 0, rtBytes <= Limits.maxRefcountTableBytes else {
            throw bad("refcount_table_clusters", UInt64(h.refcountTableClusters), "must be 1 to \(Limits.maxRefcountTableBytes / cs)")
        }
        try checkTable(h.refcountTableOffset, rtBytes, "refcount_table_offset", cs, fileSize, path)
        // The snapshot table is checked when it is read (``checkSnapshotTable(fileSize:path:)``):
        // a bad one must not stop reads of the active disk.
        if h.backingFileOffset != 0 {
            guard UInt64(h.backingFileSize) <= Limits.maxBackingNameBytes else {
                throw bad("backing_file_size", UInt64(h.backingFileSize), "backing file name longer than \(Limits.maxBackingNameBytes) bytes")
            }
            guard h.backingFileOffset <= cs, h.backingFileOffset + UInt64(h.backingFileSize) <= cs else {
                throw bad("backing_file_offset", h.backingFileOffset, "backing file name must lie in the first cluster")
            }
        }
        return h
    }

    /// Checks where the header says the snapshot table is: at most ``Limits/maxSnapshots``
    /// entries of at least 40 bytes each, cluster aligned, inside the file.
    public func checkSnapshotTable(fileSize: UInt64, path: String) throws {
        guard UInt64(nbSnapshots) <= Limits.maxSnapshots else {
            throw StrataError.invalidHeader(path: path, field: "nb_snapshots", value: UInt64(nbSnapshots),
                                            reason: "more than \(Limits.maxSnapshots) snapshots in the snapshot table")
        }
        if nbSnapshots > 0 {
            try Self.checkTable(snapshotsOffset, 40 * UInt64(nbSnapshots), "snapshots_offset (the snapshot table)", clusterSize, fileSize, path)
        }
    }

    private static func checkTable(_ offset: UInt64, _ bytes: UInt64, _ field: String, _ cs: UInt64, _ fileSize: UInt64, _ path: String) throws {
        guard offset % cs == 0, offset != 0 else {
            throw StrataError.invalidHeader(path: path, field: field, value: offset, reason: "not aligned to a cluster, or zero")
        }
        let (end, overflow) = offset.addingReportingOverflow(bytes)
        guard !overflow, end <= fileSize, offset < Limits.maxHostOffset else {
            throw StrataError.invalidHeader(path: path, field: field, value: offset, reason: "table ends past the end of the file (\(fileSize) bytes)")
        }
    }

    /// Encodes the fixed header (v3 layout for version 3, 72 bytes for version 2).
    public func encode() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: version == 2 ? 72 : Int(headerLength))
        b.put32(Self.magic, 0)
        b.put32(version, 4)
        b.put64(backingFileOffset, 8)
        b.put32(backingFileSize, 16)
        b.put32(clusterBits, 20)
        b.put64(size, 24)
        b.put32(cryptMethod, 32)
        b.put32(l1Size, 36)
        b.put64(l1TableOffset, 40)
        b.put64(refcountTableOffset, 48)
        b.put32(refcountTableClusters, 56)
        b.put32(nbSnapshots, 60)
        b.put64(snapshotsOffset, 64)
        if version >= 3 {
            b.put64(incompatibleFeatures.rawValue, 72)
            b.put64(compatibleFeatures.rawValue, 80)
            b.put64(autoclearFeatures.rawValue, 88)
            b.put32(refcountOrder, 96)
            b.put32(headerLength, 100)
            if headerLength > Self.v3BaseLength { b[Int(Self.v3BaseLength)] = compressionType.rawValue }
            if !unknownTail.isEmpty, headerLength >= Self.v3BaseLength + 8 + UInt32(unknownTail.count) {
                b.replaceSubrange(Int(Self.v3BaseLength + 8)..<Int(Self.v3BaseLength + 8) + unknownTail.count, with: unknownTail)
            }
        }
        return b
    }
}

/// Incompatible feature bits (header bytes 72-79).
public struct IncompatibleFeatures: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let dirty = IncompatibleFeatures(rawValue: 1 << 0)
    public static let corrupt = IncompatibleFeatures(rawValue: 1 << 1)
    public static let externalDataFile = IncompatibleFeatures(rawValue: 1 << 2)
    public static let compressionType = IncompatibleFeatures(rawValue: 1 << 3)
    public static let extendedL2 = IncompatibleFeatures(rawValue: 1 << 4)
    /// Every bit we implement.
    public static let known: IncompatibleFeatures = [.dirty, .corrupt, .compressionType, .extendedL2]
}

/// Compatible feature bits (header bytes 80-87).
public struct CompatibleFeatures: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let lazyRefcounts = CompatibleFeatures(rawValue: 1 << 0)
}

/// Autoclear feature bits (header bytes 88-95): a writer that does not know a bit clears it,
/// which tells its owner the extension data went stale.
public struct AutoclearFeatures: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    /// The bitmaps extension is consistent.
    public static let bitmaps = AutoclearFeatures(rawValue: 1 << 0)
    /// The external data file is a valid raw image (needs an external data file).
    public static let rawExternalData = AutoclearFeatures(rawValue: 1 << 1)
    /// Strata's: the dedup index file beside the image describes it (every entry was true
    /// when recorded, and nothing but a Strata writer keeping that index wrote the image
    /// since). QEMU clears it when it opens the image for writing. See spec/format.md.
    public static let dedupIndex = AutoclearFeatures(rawValue: 1 << 63)
    /// Strata's: the image has not been opened for writing since it was made a template
    /// (set by ``Qcow2Image/markAsTemplate()``). Strata never opens a template for writing;
    /// QEMU clears the bit when it does, and `strata check` then says the template may have
    /// changed under its clones. See spec/format.md.
    public static let templateSealed = AutoclearFeatures(rawValue: 1 << 62)
}

/// Compression method for compressed clusters (header byte 104).
///
/// zlib and zstd are QEMU's. lz4 is Strata's extension (see spec/format.md): a value far
/// from the ones QEMU hands out in order (0, 1, ...), so QEMU refuses such an image with its
/// "unknown compression type" error instead of misreading it (and QEMU before 5.1 refuses it
/// by the compression type incompatible bit).
public enum CompressionType: UInt8, Sendable, CaseIterable {
    case zlib = 0
    case zstd = 1
    /// Strata's extension: an LZ4 frame per compressed cluster.
    case lz4 = 128
    public var name: String {
        switch self {
        case .zlib: return "zlib"
        case .zstd: return "zstd"
        case .lz4: return "lz4"
        }
    }
}
