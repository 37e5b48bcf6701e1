/// The metadata of an open qcow2 image, one room per job, all guarded by the image's
/// metadata lock (only metadata I/O, loading a table on a cache miss, happens under it):
///
/// - ``ImageFile``: the file, header and geometry every room shares;
/// - ``OverlapGuard``: which clusters hold metadata, checked before every table and data write;
/// - ``Refcounts``: the refcount table and blocks, increments now and decrements deferred;
/// - ``Allocator``: free host clusters and byte ranges inside shared clusters;
/// - ``ClusterMap``: the L1 and L2 tables (guest → host);
/// - the snapshot table and the bitmap directory, as read (``walker`` reaches every L2 table
///   through them).
final class Metadata {
    let file: ImageFile
    let overlap: OverlapGuard
    let refcounts: Refcounts
    let allocator: Allocator
    let map: ClusterMap
    /// The internal snapshots, as the snapshot table lists them.
    var snapshots: [SnapshotRecord]
    /// The persistent bitmaps (empty when the image has none or they are not valid).
    var bitmaps: [BitmapDirectoryEntry]

    init(storage: any BlockStorage, path: String, header: Qcow2Header, extensions: HeaderExtensions, backingName: String?,
         fileLength: UInt64,
         l1: [UInt64], refTable: [UInt64], snapshots: [SnapshotRecord], bitmaps: [BitmapDirectoryEntry],
         bitmapsExtension: BitmapsExtension?, l2CacheBytes: Int, refCacheBytes: Int) {
        file = ImageFile(storage: storage, path: path, header: header, extensions: extensions, backingName: backingName,
                         fileLength: fileLength)
        overlap = OverlapGuard(file: file)
        refcounts = Refcounts(file: file, overlap: overlap, table: refTable, cacheBytes: refCacheBytes)
        allocator = Allocator(file: file, refcounts: refcounts, overlap: overlap)
        map = ClusterMap(file: file, allocator: allocator, refcounts: refcounts, overlap: overlap, l1: l1, cacheBytes: l2CacheBytes)
        self.snapshots = snapshots
        self.bitmaps = bitmaps
        claimMetadata(bitmapsExtension: bitmapsExtension)
    }

    var header: Qcow2Header {
        get { file.header }
        set { file.header = newValue }
    }

    /// Every L2 table reachable from the active and the snapshots' L1 tables.
    var walker: TableWalker { TableWalker(map: map, snapshots: snapshots) }

    /// Tells the overlap guard where the metadata is (first claim wins; a second kind on the
    /// same cluster is recorded as a conflict and refused when used).
    private func claimMetadata(bitmapsExtension: BitmapsExtension?) {
        let h = file.header
        let cs = file.clusterSize
        overlap.claim(0, clusters: 1, as: .header)
        overlap.claim(h.l1TableOffset, bytes: UInt64(h.l1Size) * 8, as: .l1Table)
        overlap.claim(h.refcountTableOffset, clusters: UInt64(h.refcountTableClusters), as: .refcountTable)
        for off in refcounts.table where off & ~UInt64(511) != 0 && off % cs == 0 {
            overlap.claim(off & ~UInt64(511), clusters: 1, as: .refcountBlock)
        }
        if h.nbSnapshots > 0 && !snapshots.isEmpty {
            overlap.claim(h.snapshotsOffset, bytes: UInt64(max(SnapshotRecord.tableLength(snapshots), 40)), as: .snapshotTable)
        }
        // Snapshot L1 tables and bitmap tables, up to a budget: 65536 hostile snapshots of
        // 32 MiB each must not make opening loop for minutes (past it, their refcounts alone
        // protect them).
        var budget = Limits.maxClaimedTableClusters
        for s in snapshots where s.l1TableOffset % cs == 0 && s.l1TableOffset != 0 {
            let clusters = divUp(UInt64(s.l1Size) * 8, cs)
            guard clusters <= budget else { break }
            budget -= clusters
            overlap.claim(s.l1TableOffset, clusters: clusters, as: .snapshotL1Table)
        }
        if let b = bitmapsExtension, b.directoryOffset % cs == 0, b.directoryOffset != 0 {
            overlap.claim(b.directoryOffset, bytes: b.directorySize, as: .bitmapDirectory)
        }
        for b in bitmaps where b.tableOffset % cs == 0 && b.tableOffset != 0 {
            let clusters = divUp(UInt64(b.tableSize) * 8, cs)
            guard clusters <= budget else { break }
            budget -= clusters
            overlap.claim(b.tableOffset, clusters: clusters, as: .bitmapTable)
        }
        for e in map.l1 where e & L1Entry.offsetMask != 0 && e & L1Entry.offsetMask % cs == 0 {
            overlap.claim(e & L1Entry.offsetMask, clusters: 1, as: .l2Table)
        }
    }

    /// Applies decrements that have become safe (see ``Refcounts``): clusters that reached
    /// zero stop being metadata, leave the caches and may be handed out again.
    func applyDecrements(_ decrements: [UInt64: UInt64]) throws -> [UInt64] {
        let zeroed = try refcounts.applyDecrements(decrements)
        for c in zeroed {
            map.cache.remove(c * file.clusterSize)
            refcounts.cache.remove(c * file.clusterSize)
        }
        // Reusable only once the flush has punched them (see ``Refcounts/punching``).
        refcounts.punching.formUnion(zeroed)
        allocator.released(zeroed)
        return zeroed
    }
}
