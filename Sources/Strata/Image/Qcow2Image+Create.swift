#if canImport(Glibc)
import Glibc
#endif

/// Options for a new qcow2 image (qemu-img's `-o` names in comments).
public struct CreateOptions: Sendable, Equatable {
    /// Virtual size; nil takes the backing file's size.
    public var size: UInt64?
    /// `cluster_size`: a power of two from 512 B to 2 MiB.
    public var clusterSize: Int = 65536
    /// `refcount_bits`: a power of two from 1 to 64.
    public var refcountBits: Int = 16
    /// `compression_type`.
    public var compressionType: CompressionType = .zlib
    /// `lazy_refcounts` (recorded; Strata itself always keeps refcounts ordered).
    public var lazyRefcounts = false
    /// `extended_l2`: 32 subclusters per cluster (clusters of 16 KiB and up).
    public var extendedL2 = false
    /// `backing_file` (`-b`), stored as given.
    public var backingFile: String?
    /// `backing_fmt` (`-F`); nil probes the named file once and records what it is.
    public var backingFormat: ImageFormat?
    /// `compat`: 3 (`1.1`, the default) or 2 (`0.10`).
    public var version: UInt32 = 3
    /// Do not open the backing file (qemu-img's `-u`): the size must then be given, and the
    /// backing format too.
    public var unsafeBacking = false
    /// `compress` (Strata's own): whole-cluster guest writes are stored compressed, recorded
    /// in Strata's header extension (version 3 only).
    public var compressWrites = false
    /// `dedup` (Strata's own): whole-cluster guest writes are deduplicated inline, recorded
    /// in Strata's header extension (version 3 only).
    public var dedupWrites = false

    public init(size: UInt64? = nil) { self.size = size }

    /// Checks the format options alone (cluster size, refcount width, what compat=0.10
    /// cannot hold), as qemu-img does for create and measure.
    public func checkFormatOptions(for path: String) throws {
        func invalid(_ s: String) -> StrataError { .invalidOption(path: path, reason: s) }
        let cs = UInt64(clusterSize)
        guard cs >= 512, cs <= 2 << 20, cs & (cs - 1) == 0 else {
            throw invalid("cluster size must be a power of two between 512 and 2097152 bytes (got \(clusterSize))")
        }
        guard refcountBits >= 1, refcountBits <= 64, refcountBits & (refcountBits - 1) == 0 else {
            throw invalid("refcount_bits must be a power of two from 1 to 64 (got \(refcountBits))")
        }
        guard version == 2 || version == 3 else { throw invalid("compat must be 0.10 or 1.1") }
        if version == 2 {
            let v3 = "require compat=1.1 (they are not in the qcow2 version 2 format)"
            if refcountBits != 16 { throw invalid("refcount widths other than 16 bits " + v3) }
            if lazyRefcounts { throw invalid("lazy refcounts " + v3) }
            if compressionType != .zlib { throw invalid("compression types other than zlib " + v3) }
            if compressWrites { throw invalid("compressed guest writes (compress=on) " + v3) }
            if dedupWrites { throw invalid("inline dedup (dedup=on) " + v3) }
            if extendedL2 { throw invalid("extended L2 entries " + v3) }
        }
        if extendedL2 && cs < 16384 {
            throw invalid("extended L2 entries need a cluster size of at least 16384 bytes (cluster_size is \(clusterSize))")
        }
    }

    /// Checks the options for an image at `path` the way qemu-img does, without touching
    /// `path`: legal values, the combinations compat=0.10 cannot hold, the size limits
    /// (including the L1 table's), a backing file that is not the image itself. Opens the
    /// backing file (read-only, unlocked) to take its size when none is given and to record
    /// its format when none is given. Returns the options with size (rounded up to 512) and
    /// backing format filled in.
    public func resolved(for path: String) throws -> CreateOptions {
        func invalid(_ s: String) -> StrataError { .invalidOption(path: path, reason: s) }
        try checkFormatOptions(for: path)
        let cs = UInt64(clusterSize)
        if backingFormat != nil && backingFile == nil { throw invalid("a backing format needs a backing file") }

        var o = self
        if let b = backingFile {
            guard !b.isEmpty else { throw invalid("the backing file name is empty") }
            guard UInt64(b.utf8.count) <= Limits.maxBackingNameBytes else { throw invalid("backing file name is longer than 1023 bytes") }
            let resolvedBacking = BackingChain.resolve(b, relativeTo: path)
            if resolvedBacking == path || BackingChain.realPath(resolvedBacking) == BackingChain.realPath(path) {
                throw invalid("the backing file '\(b)' is the image itself")
            }
            if unsafeBacking {
                guard o.size != nil else { throw invalid("with an unsafe backing file (-u) the size must be given") }
                guard o.backingFormat != nil else { throw invalid("with an unsafe backing file (-u) its format must be given") }
            } else {
                if o.backingFormat == nil { o.backingFormat = try probeFormat(path: resolvedBacking) }
                let dev = try BackingChain.open(resolvedBacking, format: o.backingFormat!, chain: [path], options: OpenOptions(forceShare: true))
                if o.size == nil { o.size = dev.size }
                try dev.close()
            }
        }
        guard let size = o.size else { throw invalid("no size given and no backing file to take it from") }
        guard size <= Limits.maxVirtualSize else {
            throw invalid("size \(size) is above the largest virtual size, \(Limits.maxVirtualSize) bytes")
        }
        o.size = alignUp(size, 512)
        let l1 = Geometry(clusterBits: UInt32(cs.trailingZeroBitCount), extendedL2: extendedL2).l1Entries(forSize: o.size!)
        guard l1 * 8 <= Limits.maxL1Bytes else {
            throw invalid("size \(size) needs an L1 table above 32 MiB with \(clusterSize)-byte clusters; use a larger cluster size")
        }
        return o
    }
}

extension Qcow2Image {
    /// Creates a new, empty qcow2 image file, replacing any file at `path` (as qemu-img
    /// does). The options are checked before the file is touched. An existing file is
    /// locked first (so one another process uses is refused, not clobbered), then
    /// truncated, so none of its old bytes survive. A file this call made is removed again
    /// if creating fails.
    public static func create(path: String, options: CreateOptions) throws {
        let o = try options.resolved(for: path)
        try Storage.replacing(path) { try create(storage: $0, path: path, resolved: o) }
    }

    /// Creates a new image in `storage`, which must be empty.
    public static func create(storage: any BlockStorage, path: String, options: CreateOptions) throws {
        try create(storage: storage, path: path, resolved: try options.resolved(for: path))
    }

    /// Writes the image: header | refcount table | refcount blocks | L1 table, the file
    /// ending where the L1 table ends, as qemu-img lays it out.
    private static func create(storage: any BlockStorage, path: String, resolved o: CreateOptions) throws {
        let size = o.size!
        let cs = UInt64(o.clusterSize)
        var h = Qcow2Header()
        h.version = o.version
        h.clusterBits = UInt32(cs.trailingZeroBitCount)
        h.size = size
        h.refcountOrder = UInt32(o.refcountBits.trailingZeroBitCount)
        if o.version == 2 { h.headerLength = Qcow2Header.v2Length }
        if o.extendedL2 { h.incompatibleFeatures.insert(.extendedL2) }
        if o.compressionType != .zlib {
            h.incompatibleFeatures.insert(.compressionType)
            h.compressionType = o.compressionType
        }
        if o.lazyRefcounts { h.compatibleFeatures.insert(.lazyRefcounts) }
        let geometry = Geometry(clusterBits: h.clusterBits, extendedL2: o.extendedL2)
        let l1Entries = geometry.l1Entries(forSize: size)
        h.l1Size = UInt32(l1Entries)

        let refBlockEntries = cs * 8 / UInt64(o.refcountBits)
        let l1Clusters = divUp(l1Entries * 8, cs)
        var rtClusters: UInt64 = 1
        var rbClusters: UInt64 = 1
        while true {
            let total = 1 + rtClusters + rbClusters + l1Clusters
            let rb = divUp(total, refBlockEntries)
            let rt = max(divUp(rb * 8, cs), 1)
            if rb == rbClusters && rt == rtClusters { break }
            rbClusters = rb
            rtClusters = rt
        }
        let total = 1 + rtClusters + rbClusters + l1Clusters
        h.refcountTableOffset = cs
        h.refcountTableClusters = UInt32(rtClusters)
        h.l1TableOffset = (1 + rtClusters + rbClusters) * cs

        // First cluster: header, extensions, backing name.
        var ext = HeaderExtensions()
        if o.backingFile != nil { ext.backingFormat = o.backingFormat!.rawValue }
        var flags: StrataExtension.Flags = []
        if o.compressWrites { flags.insert(.compress) }
        if o.dedupWrites { flags.insert(.dedup) }
        // A dedup image names its index file, which starts empty and complete (below).
        let indexID = o.dedupWrites && storage is FileStorage ? Qcow2Image.newIndexID() : nil
        if !flags.isEmpty { ext.strata = StrataExtension(flags: flags, indexID: indexID) }
        guard let first = FirstCluster.encode(header: &h, extensions: ext, backingName: o.backingFile) else {
            throw StrataError.invalidOption(path: path, reason: "the header does not fit in one \(cs)-byte cluster")
        }

        let refTable = encodeTable((0..<rbClusters).map { (1 + rtClusters + $0) * cs }, size: Int(rtClusters * cs))
        var refBlocks = [UInt8](repeating: 0, count: Int(rbClusters * cs))
        refBlocks.withUnsafeMutableBytes { b in
            for c in 0..<Int(total) { RefcountCodec.set(b, index: c, order: h.refcountOrder, value: 1) }
        }
        try storage.writeBytes(first, at: 0)
        try storage.writeBytes(refTable, at: cs)
        try storage.writeBytes(refBlocks, at: (1 + rtClusters) * cs)
        try storage.setLength(h.l1TableOffset + l1Entries * 8)
        try storage.sync()
        // The index file, then the autoclear bit that trusts it. Without them (a file that
        // cannot be written) the first writer with dedup starts the file.
        if indexID == nil, storage is FileStorage {
            unlink(DedupIndexFile.path(forImage: path))  // the index of the image this one replaces
        }
        if let indexID {
            let file = try DedupIndexFile.open(imagePath: path, id: indexID, clusterBits: h.clusterBits)
            defer { file.close() }
            try file.reset(complete: true)
            var field = [UInt8](repeating: 0, count: 8)
            field.put64(h.autoclearFeatures.union(.dedupIndex).rawValue, 0)
            try storage.writeBytes(field, at: 88)
            try storage.sync()
        }
    }
}
