/// The snapshot table as a whole: written anew (never in place), so a crash leaves the old
/// table or the new one, never half of each.
extension Qcow2Image {
    /// Writes a table holding `records` to newly allocated clusters and points the header
    /// at it from the next flush on (which makes the table and its refcounts durable before
    /// the header); the old table is freed after that. Lock held.
    func writeSnapshotTable(_ records: [SnapshotRecord]) throws {
        let cs = clusterSize
        var bytes: [UInt8] = []
        for r in records { bytes += r.encode() }
        guard UInt64(bytes.count) <= Limits.maxSnapshotTableBytes, UInt64(records.count) <= Limits.maxSnapshots else {
            throw StrataError.invalidOption(path: path, reason: "the snapshot table would exceed \(Limits.maxSnapshotTableBytes) bytes or \(Limits.maxSnapshots) entries")
        }
        let old = (offset: md.header.snapshotsOffset, clusters: divUp(UInt64(SnapshotRecord.tableLength(md.snapshots)), cs))
        var offset: UInt64 = 0
        if !bytes.isEmpty {
            let clusters = divUp(UInt64(bytes.count), cs)
            offset = try md.allocator.allocateContiguous(clusters)
            try md.overlap.checkData(offset, clusters * cs)
            try storage.writeBytes(bytes, at: offset)
            md.overlap.claim(offset, clusters: clusters, as: .snapshotTable)
        }
        md.header.snapshotsOffset = offset
        md.header.nbSnapshots = UInt32(records.count)
        md.file.headerDirty = true
        md.snapshots = records
        if old.offset != 0 && old.clusters > 0 { md.refcounts.deferDecrement(old.offset, count: old.clusters) }
    }
}
