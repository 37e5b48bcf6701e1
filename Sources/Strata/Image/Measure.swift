/// What a new image needs on disk, as `qemu-img measure` reports it.
public struct SizeMeasurement: Sendable, Equatable {
    /// Bytes the image needs for the data it will hold (all metadata of a fully allocated
    /// image counted, data only where the source has some).
    public var required: UInt64
    /// Bytes when every cluster is allocated.
    public var fullyAllocated: UInt64
    /// Bytes the source's persistent bitmaps would take: reported for a qcow2 version 3
    /// output from a source that can hold bitmaps (a qcow2 version 3 image), else nil.
    public var bitmaps: UInt64?

    public init(required: UInt64, fullyAllocated: UInt64, bitmaps: UInt64? = nil) {
        self.required = required
        self.fullyAllocated = fullyAllocated
        self.bitmaps = bitmaps
    }

    /// Measures an image of `format` with `options`, either new and empty of `size` bytes or
    /// holding a copy of `source` (its whole backing chain flattened). The walk over the
    /// source costs what its allocated data costs.
    public static func of(format: ImageFormat, options: CreateOptions, size: UInt64?, source: (any BlockDevice)?,
                          path: String) throws -> SizeMeasurement {
        guard let virtual = source?.size ?? size else {
            throw StrataError.invalidOption(path: path, reason: "give a size or a source image to measure")
        }
        guard virtual <= Limits.maxVirtualSize else {
            throw StrataError.invalidOption(path: path, reason: "size \(virtual) is above the largest virtual size, \(Limits.maxVirtualSize) bytes")
        }
        if format == .raw {
            let n = alignUp(virtual, 512)
            return SizeMeasurement(required: n, fullyAllocated: n)
        }
        try options.checkFormatOptions(for: path)
        let cs = UInt64(options.clusterSize)
        let aligned = alignUp(virtual, cs)
        var required: UInt64 = 0  // a new image holds no data
        if source != nil, options.backingFile != nil {
            // How much of the source the backing file already holds is unknown: count all of it.
            required = aligned
        } else if let source {
            // Whole clusters under data that is allocated somewhere in the chain; ranges that
            // read as zeroes need nothing.
            var pos: UInt64 = 0
            try source.forEachRun(from: 0, to: source.size) { offset, length, extent in
                let end = offset + length
                guard end > pos else { return true }
                let start = max(offset, pos)
                let zero = extent?.status.contains(.zero) ?? false
                let allocated = extent.map { $0.depth != 0 } ?? true
                if !zero && allocated {
                    let extended = alignUp(end, cs) - start
                    required += start % cs + extended
                    pos = start + extended
                } else {
                    pos = end
                }
                return true
            }
        }
        let fully = preallocatedSize(virtual: aligned, clusterSize: cs, refcountOrder: UInt32(options.refcountBits.trailingZeroBitCount),
                                     extendedL2: options.extendedL2)
        var m = SizeMeasurement(required: fully - aligned + required, fullyAllocated: fully)
        if options.version >= 3, let q = source as? Qcow2Image, q.header.version >= 3 {
            m.bitmaps = bitmapBytes(q.bitmaps, diskSize: q.size, clusterSize: cs)
        }
        return m
    }

    /// The size of a fully allocated image: header, L2 and L1 tables for every cluster,
    /// refcount metadata for all of it (itself included), and the data.
    static func preallocatedSize(virtual: UInt64, clusterSize cs: UInt64, refcountOrder: UInt32, extendedL2: Bool) -> UInt64 {
        let entryBytes: UInt64 = extendedL2 ? 16 : 8
        var meta = cs                                          // header
        let l2Entries = alignUp(virtual / cs, cs / entryBytes)
        meta += l2Entries * entryBytes                         // L2 tables
        let l1Entries = alignUp(l2Entries * entryBytes / cs, cs / 8)
        meta += l1Entries * 8                                  // L1 table
        meta += refcountMetadataSize(clusters: (meta + virtual) / cs, clusterSize: cs, refcountOrder: refcountOrder)
        return meta + virtual
    }

    /// Bytes of refcount blocks and table that count `clusters` clusters and themselves.
    static func refcountMetadataSize(clusters: UInt64, clusterSize cs: UInt64, refcountOrder: UInt32) -> UInt64 {
        let perBlock = cs * 8 / (1 << UInt64(refcountOrder))
        let perTableCluster = cs / 8
        var table: UInt64 = 0, blocks: UInt64 = 0, n: UInt64 = 0
        while true {
            let last = n
            blocks = divUp(clusters + table + blocks, perBlock)
            table = divUp(blocks, perTableCluster)
            n = clusters + blocks + table
            if n == last { break }
        }
        return (blocks + table) * cs
    }

    /// What bitmaps take in an image of `clusterSize` clusters: each bitmap's data and table
    /// as if fully allocated, and the directory.
    static func bitmapBytes(_ bitmaps: [BitmapDirectoryEntry], diskSize: UInt64, clusterSize cs: UInt64) -> UInt64 {
        var bytes: UInt64 = 0
        var directory: UInt64 = 0
        for b in bitmaps {
            let granularity: UInt64 = 1 << UInt64(min(b.granularityBits, 63))
            let bitmapBytes = divUp(divUp(diskSize, granularity), 8)
            let clusters = divUp(bitmapBytes, cs)
            bytes += clusters * cs
            bytes += alignUp(clusters * 8, cs)
            directory += alignUp(24 + UInt64(b.name.utf8.count), 8)
        }
        return bytes + alignUp(directory, cs)
    }
}
