/// What `amend` may change in an existing image (qemu-img amend's qcow2 options).
public struct AmendOptions: Sendable, Equatable {
    /// `compat`: 2 (0.10) or 3 (1.1).
    public var version: UInt32?
    /// `lazy_refcounts`.
    public var lazyRefcounts: Bool?
    /// `refcount_bits`: a power of two from 1 to 64.
    public var refcountBits: Int?
    /// `size`: the new virtual size (shrinking drops the data past the end).
    public var size: UInt64?
    public init() {}
    public var isEmpty: Bool { version == nil && lazyRefcounts == nil && refcountBits == nil && size == nil }
}

/// Changing an image's format options in place, with the image held still
/// (``Qcow2Image/quiesce(_:)``): version upgrade, refcount width, lazy refcounts, size,
/// version downgrade, in that order (QEMU's).
///
/// Each change is crash safe: new structures are written and made durable before the header
/// points at them, and what they replace is freed afterwards (a crash leaks, never corrupts).
extension Qcow2Image {
    public func amend(_ o: AmendOptions) throws {
        if isReadOnly { throw StrataError.readOnly(path: path) }
        let current = header
        let targetVersion = o.version ?? current.version
        let targetBits = o.refcountBits ?? Int(current.refcountBits)
        func refuse(_ reason: String) -> StrataError { .invalidOption(path: path, reason: reason) }
        guard targetVersion == 2 || targetVersion == 3 else { throw refuse("compat must be 0.10 or 1.1") }
        guard targetBits >= 1, targetBits <= 64, targetBits & (targetBits - 1) == 0 else {
            throw refuse("refcount_bits must be a power of two from 1 to 64 (got \(targetBits))")
        }
        if targetVersion == 2 {
            if targetBits != 16 { throw refuse("compat=0.10 requires refcount_bits=16") }
            if o.lazyRefcounts == true { throw refuse("lazy refcounts require compat=1.1") }
            if current.extendedL2 { throw refuse("cannot downgrade to compat=0.10: the image uses extended L2 entries") }
            if current.compressionType != .zlib { throw refuse("cannot downgrade to compat=0.10: the image uses compression type \(current.compressionType.name)") }
            if !bitmaps.isEmpty { throw refuse("cannot downgrade to compat=0.10: the image has persistent bitmaps") }
        } else if o.lazyRefcounts == true, targetVersion < 3 {
            throw refuse("lazy refcounts require compat=1.1")
        }
        if snapshotTableError != nil, targetVersion != current.version {
            throw refuse("cannot change compat: the snapshot table cannot be read (\(snapshotTableError!))")
        }
        try prepareFirstWrite()
        try quiesce {
            try guarded {
                if targetVersion > current.version { try upgrade() }
                if targetBits != Int(current.refcountBits) { try changeRefcountWidth(to: UInt32(targetBits.trailingZeroBitCount)) }
                if let lazy = o.lazyRefcounts, lazy != current.compatibleFeatures.contains(.lazyRefcounts) {
                    try rewriteFirstCluster { h in
                        if lazy { h.compatibleFeatures.insert(.lazyRefcounts) } else { h.compatibleFeatures.remove(.lazyRefcounts) }
                    }
                }
                if let size = o.size, size != self.size { try resize(to: size, droppingData: true) }
                if targetVersion < current.version { try downgrade() }
            }
        }
    }

    // MARK: Version

    /// 0.10 → 1.1: the version 3 header, and snapshot entries with the extra data version 3
    /// requires.
    private func upgrade() throws {
        let needsExtra = lock.withLock { md.snapshots.contains { $0.extraData.count < 16 } }
        if needsExtra {
            try lock.withLock {
                let size = md.header.size
                var records = md.snapshots
                for i in records.indices { records[i].completeExtraData(diskSize: size) }
                try writeSnapshotTable(records)
            }
            try flushNow()
        }
        try rewriteFirstCluster { h in
            h.version = 3
            h.headerLength = Qcow2Header.v3WriteLength
            h.refcountOrder = 4
            h.compressionType = .zlib
        }
    }

    /// 1.1 → 0.10: zero clusters (which version 2 cannot express) are expanded in every L2
    /// table, the active one and the snapshots', then the version 2 header is written.
    private func downgrade() throws {
        try lock.withLock { try expandZeroClusters() }
        try flushNow()
        try rewriteFirstCluster { h in
            h.version = 2
            h.headerLength = Qcow2Header.v2Length
            h.incompatibleFeatures = []
            h.compatibleFeatures = []
            h.autoclearFeatures = []
            h.refcountOrder = 4
            h.compressionType = .zlib
        }
    }

    /// Turns every zero cluster into one version 2 can read: unallocated where nothing
    /// shows through (no backing file and no preallocated cluster), else a cluster of
    /// zeroes: its preallocated one when only this table references it, otherwise a new one.
    /// A table shared by several L1 tables is changed once, its new clusters counted once per
    /// sharer. Lock held.
    private func expandZeroClusters() throws {
        var seen = Set<UInt64>()
        let perTable = Int(geometry.l2Entries)
        try md.walker.forEachL2 { v in
            guard seen.insert(v.table.offset).inserted else { return }
            let sharers = try md.refcounts.get(v.table.offset / clusterSize)
            for j in 0..<perTable {
                let raw = v.entry(j).raw
                let e = L2Entry(raw: raw)
                guard !e.isCompressed, raw & L2Entry.zeroFlag != 0 else { continue }
                let host = e.hostOffset
                if host == 0 && backing == nil {
                    md.map.set(v.table, j, raw: 0, bitmap: 0)
                    continue
                }
                var target = host
                let referencedElsewhere = host == 0 ? true : try md.refcounts.get(host / clusterSize) != sharers
                if referencedElsewhere {
                    target = try md.allocator.allocate(1).host
                    if sharers > 1 { try md.refcounts.set(target / clusterSize, sharers) }
                    if host != 0 { md.refcounts.pending[host / clusterSize, default: 0] += sharers }
                }
                try md.overlap.checkData(target, clusterSize)
                try storage.writeZeroBytes(at: target, length: clusterSize)
                md.map.set(v.table, j, raw: target | (sharers == 1 ? L2Entry.copied : 0), bitmap: 0)
            }
        }
    }

    // MARK: Refcount width

    /// Writes a new refcount table and blocks of the new width after the end of the file,
    /// holding every cluster's count (a count the new width cannot hold refuses the change),
    /// makes them durable, points the header at them, then frees the old ones.
    private func changeRefcountWidth(to newOrder: UInt32) throws {
        try lock.withLock {
            let refcounts = md.refcounts
            let cs = clusterSize
            let newEntries = cs * 8 / (1 << UInt64(newOrder))
            let newMax = RefcountCodec.maxValue(order: newOrder)
            let end0 = md.file.hostEnd
            // Fixed point: the new blocks count themselves and the new table.
            var blocks: UInt64 = 0, tableClusters: UInt64 = 0
            while true {
                let total = end0 + tableClusters + blocks
                let b = divUp(total, newEntries)
                let t = max(divUp(b * 8, cs), 1)
                if b == blocks && t == tableClusters { break }
                blocks = b
                tableClusters = t
            }
            guard tableClusters * cs <= Limits.maxRefcountTableBytes else { throw StrataError.noSpace(path: path) }
            let tableAt = end0, blocksAt = end0 + tableClusters, total = end0 + tableClusters + blocks
            try md.overlap.checkData(tableAt * cs, (total - tableAt) * cs)
            var newTable = [UInt64](repeating: 0, count: Int(tableClusters * cs / 8))
            let block = Table(offset: 0, size: Int(cs))
            for bi in 0..<blocks {
                block.buf.zero()
                let first = bi * newEntries
                for c in first..<min(first + newEntries, total) {
                    let v = c < end0 ? try refcounts.get(c) : 1
                    guard v <= newMax else {
                        throw StrataError.invalidOption(path: path, reason:
                            "cannot use \(1 << newOrder)-bit refcounts: the cluster at host offset \(c * cs) has a refcount of \(v)")
                    }
                    RefcountCodec.set(block.buf, index: Int(c - first), order: newOrder, value: v)
                }
                try storage.write(UnsafeRawBufferPointer(block.buf), at: (blocksAt + bi) * cs)
                newTable[Int(bi)] = (blocksAt + bi) * cs
            }
            try storage.writeBytes(encodeTable(newTable), at: tableAt * cs)
            try storage.sync()
            // Switch: the header names the new table and width.
            var h = md.header
            let oldTable = refcounts.table
            let oldTableOffset = h.refcountTableOffset, oldTableClusters = UInt64(h.refcountTableClusters)
            h.refcountOrder = newOrder
            h.refcountTableOffset = tableAt * cs
            h.refcountTableClusters = UInt32(tableClusters)
            try storage.writeBytes(h.encode(), at: 0)
            try storage.sync()
            md.header = h
            md.file.hostEnd = total
            for off in oldTable where off & ~UInt64(511) != 0 { md.overlap.release(cluster: (off & ~UInt64(511)) / cs) }
            for c in (oldTableOffset / cs)..<(oldTableOffset / cs + oldTableClusters) { md.overlap.release(cluster: c) }
            refcounts.adopt(table: newTable, order: newOrder)
            md.overlap.claim(tableAt * cs, clusters: tableClusters, as: .refcountTable)
            md.overlap.claim(blocksAt * cs, clusters: blocks, as: .refcountBlock)
            md.allocator.freeCursor = 1
            // The old structures are now plain clusters with a count of 1: free them.
            refcounts.deferDecrement(oldTableOffset, count: oldTableClusters)
            for off in oldTable where off & ~UInt64(511) != 0 { refcounts.deferDecrement(off & ~UInt64(511), count: 1) }
        }
        try flushNow()
    }
}
