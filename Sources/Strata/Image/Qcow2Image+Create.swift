/// Options for a new qcow2 image (qemu-img's `-o` names in comments).
public struct CreateOptions: Sendable {
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

    public init(size: UInt64? = nil) { self.size = size }
}

extension Qcow2Image {
    /// Creates a new, empty qcow2 image file (replacing any file at `path`).
    public static func create(path: String, options: CreateOptions) throws {
        let storage = try FileStorage(creating: path)
        defer { storage.close() }
        // Never truncate an image another process (qemu-nbd, QEMU, strata serve) has open.
        let lock = try ImageLock(file: storage, writable: true)
        _ = consume lock
        do { try storage.setLength(0) } catch let e as SystemCallError { throw StrataError.io(path: path, e) }
        try create(storage: storage, path: path, options: options)
    }

    /// Creates a new image in `storage`, which must be empty.
    public static func create(storage: any BlockStorage, path: String, options o: CreateOptions) throws {
        func invalid(_ s: String) -> StrataError { .invalidArgument("\(path): \(s)") }
        let cs = UInt64(o.clusterSize)
        guard cs >= 512, cs <= 2 << 20, cs & (cs - 1) == 0 else {
            throw invalid("cluster size must be a power of two between 512 and 2097152 bytes (got \(o.clusterSize))")
        }
        guard o.refcountBits >= 1, o.refcountBits <= 64, o.refcountBits & (o.refcountBits - 1) == 0 else {
            throw invalid("refcount_bits must be a power of two from 1 to 64 (got \(o.refcountBits))")
        }
        guard o.version == 2 || o.version == 3 else { throw invalid("compat must be 0.10 or 1.1") }
        if o.version == 2 {
            if o.refcountBits != 16 { throw invalid("compat=0.10 supports only refcount_bits=16") }
            if o.extendedL2 || o.lazyRefcounts || o.compressionType != .zlib {
                throw invalid("extended_l2, lazy_refcounts and compression_type need compat=1.1")
            }
        }
        if o.extendedL2 && cs < 16384 { throw invalid("extended_l2 needs a cluster size of at least 16384 bytes") }

        // Backing file: its format and (by default) its size.
        var backingFormat = o.backingFormat
        var size = o.size
        if let b = o.backingFile {
            guard UInt64(b.utf8.count) <= Limits.maxBackingNameBytes else { throw invalid("backing file name is longer than 1023 bytes") }
            let resolved = BackingChain.resolve(b, relativeTo: path)
            if backingFormat == nil { backingFormat = try probeFormat(path: resolved) }
            if size == nil {
                let dev = try BackingChain.open(resolved, format: backingFormat!, chain: [path], options: OpenOptions(forceShare: true))
                size = dev.size
                try dev.close()
            }
        }
        guard var size else { throw invalid("no size given and no backing file to take it from") }
        size = alignUp(size, 512)
        guard size <= Limits.maxVirtualSize else { throw invalid("size \(size) is too large") }

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
        guard l1Entries * 8 <= Limits.maxL1Bytes else { throw invalid("size \(size) needs an L1 table above 32 MiB; use a larger cluster size") }
        h.l1Size = UInt32(l1Entries)

        // Layout: header | refcount table | refcount blocks | L1 table.
        let refBlockEntries = cs * 8 / UInt64(o.refcountBits)
        let l1Clusters = max(divUp(l1Entries * 8, cs), 1)
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
        if o.backingFile != nil { ext.backingFormat = backingFormat!.rawValue }
        var first = h.encode()
        var extBytes = h.version >= 3 || o.backingFile != nil ? ext.encode() : []
        let nameLen = o.backingFile?.utf8.count ?? 0
        if UInt64(first.count + extBytes.count + nameLen) > cs {
            // The feature table is optional; drop it when a small cluster has no room.
            ext.omitFeatureTable = true
            extBytes = ext.encode()
        }
        guard UInt64(first.count + extBytes.count + nameLen) <= cs else { throw invalid("the header does not fit in one \(cs)-byte cluster") }
        if let b = o.backingFile {
            h.backingFileOffset = UInt64(first.count + extBytes.count)
            h.backingFileSize = UInt32(nameLen)
            first = h.encode()
            first += extBytes + Array(b.utf8)
        } else {
            first += extBytes
        }

        let refTable = encodeTable((0..<rbClusters).map { (1 + rtClusters + $0) * cs }, size: Int(rtClusters * cs))
        var refBlocks = [UInt8](repeating: 0, count: Int(rbClusters * cs))
        refBlocks.withUnsafeMutableBytes { b in
            for c in 0..<Int(total) { RefcountCodec.set(b, index: c, order: h.refcountOrder, value: 1) }
        }
        do {
            try storage.writeBytes(first, at: 0)
            try storage.writeBytes(refTable, at: cs)
            try storage.writeBytes(refBlocks, at: (1 + rtClusters) * cs)
            try storage.setLength(total * cs)
            try storage.sync()
        } catch let e as SystemCallError {
            throw StrataError.io(path: path, e)
        }
    }

    /// Changes the virtual size. Growing may move the L1 table; shrinking is refused while
    /// anything is allocated past the new end.
    public func resize(to newSize: UInt64) throws {
        if isReadOnly { throw StrataError.readOnly(path: path) }
        guard newSize % 512 == 0 else { throw StrataError.invalidArgument("\(path): the new size must be a multiple of 512") }
        guard newSize <= Limits.maxVirtualSize else { throw StrataError.invalidArgument("\(path): size \(newSize) is too large") }
        try flushNow()
        let oldSize = size
        if newSize < oldSize {
            try shrink(to: newSize)
        } else if newSize > oldSize {
            try grow(to: newSize)
            // The new area reads as zeroes, like QEMU's: bytes of the old last cluster past the
            // old end may hold stale data, and a longer backing file must not show through
            // (then, as QEMU does, the whole new area is marked zero).
            var zeroEnd = min(alignUp(oldSize, clusterSize), newSize)
            if let backing, backing.size > oldSize { zeroEnd = newSize }
            if zeroEnd > oldSize { try writeZeroes(at: oldSize, length: zeroEnd - oldSize, mayUnmap: false, fua: false) }
        }
        try flushNow()
    }

    private func grow(to newSize: UInt64) throws {
        let needed = geometry.l1Entries(forSize: newSize)
        guard needed * 8 <= Limits.maxL1Bytes else {
            throw StrataError.invalidArgument("\(path): size \(newSize) needs an L1 table above 32 MiB")
        }
        try lock.withLock {
            let current = UInt64(md.l1.count)
            let roomInPlace = alignUp(current * 8, clusterSize) / 8
            if needed <= roomInPlace || needed <= current {
                md.l1 += [UInt64](repeating: 0, count: Int(max(needed, current) - current))
                md.header.l1Size = UInt32(md.l1.count)
                md.header.size = newSize
                md.l1Dirty = true
                md.headerDirty = true
                // The new entries must read as zero on disk before the header counts them.
                try md.io { try storage.writeBytes(encodeTable(md.l1), at: md.header.l1TableOffset) }
                return
            }
            // Move the L1 table to new contiguous clusters at the end of the file.
            let clusters = divUp(needed * 8, clusterSize)
            let (host, n) = try allocateContiguous(clusters)
            let oldOffset = md.header.l1TableOffset
            let oldClusters = divUp(current * 8, clusterSize)
            md.l1 += [UInt64](repeating: 0, count: Int(needed - current))
            let bytes = encodeTable(md.l1, size: Int(n * clusterSize))
            // The new table must be durable before the header points at it; its refcounts
            // before both. Write refcounts via a normal flush first, then the table, then
            // the header.
            md.header.l1TableOffset = host
            md.header.l1Size = UInt32(needed)
            md.header.size = newSize
            md.l1Dirty = true
            md.headerDirty = true
            if oldClusters > 0 && oldOffset != 0 { md.deferFree(oldOffset, count: oldClusters) }
            try md.io { try storage.writeBytes(bytes, at: host) }
        }
        // The flush writes refcounts, syncs, writes the header (now pointing at the new
        // table, which was written above), syncs, and releases the old table.
    }

    private func allocateContiguous(_ n: UInt64) throws -> (UInt64, UInt64) {
        for _ in 0..<4 {
            let (host, got) = try md.allocate(n)
            if got == n { return (host, n) }
            // Give the partial run back (never referenced, never written) and try at the end.
            for k in 0..<got { try md.setRefcount(host / clusterSize + k, 0) }
            md.freeCursor = md.hostEnd
        }
        throw StrataError.invalidArgument("\(path): cannot find \(n) contiguous clusters for the L1 table")
    }

    private func shrink(to newSize: UInt64) throws {
        try lock.withLock {
            let firstGone = divUp(newSize, clusterSize)
            let end = divUp(md.header.size, clusterSize)
            var toClear: [UInt64] = []
            var g = firstGone
            while g < end {
                let (raw, bitmap) = try md.entry(g)
                let e = L2Entry(raw: raw)
                if e.hostOffset != 0 || e.isCompressed {
                    throw StrataError.cannotShrink(path: path, size: newSize, reason: "guest offset \(g << clusterBits) is allocated")
                }
                if raw != 0 || bitmap != 0 { toClear.append(g) }
                g += 1
            }
            for g in toClear { try md.setEntry(g, raw: 0, bitmap: 0) }
            md.header.size = newSize
            md.headerDirty = true
        }
    }
}
