/// What a write-like request asks of the disk.
enum WriteRequest {
    /// The caller's bytes.
    case data(UnsafeRawBufferPointer)
    /// Make the range read as zeroes; whole clusters may be deallocated with `mayUnmap`.
    case zeroes(mayUnmap: Bool)
    /// Free whole clusters (advisory: partial clusters keep their data).
    case discard
    /// Free whole clusters so they read from the backing file again (unallocated, never a
    /// zero cluster): emptying an overlay after a commit.
    case unallocate
    /// One whole guest cluster stored compressed: these are its compressed bytes (already
    /// known to be smaller than a cluster).
    case compressed(UnsafeRawBufferPointer)
}

/// One step of a write-like request, planned under the metadata lock (each L2 entry decoded
/// once, overlap checked there), performed without it (data I/O), then committed under it.
///
/// A compressed write is one more case here, not a new path. An inline dedup hit is not a
/// plan: it changes one entry in a single hold of the lock (`Qcow2Image+InlineDedup.swift`),
/// and its misses go through these plans.
enum WritePlan {
    /// Overwrite `length` bytes of host data this image alone owns, at `host`: no metadata
    /// changes.
    case inPlace(host: UInt64, length: UInt64)
    /// Whole clusters that get fresh host clusters (one contiguous run): data first, then
    /// their entries point at it.
    case allocate(ClusterRun)
    /// One cluster written with copy-on-write fill around the new bytes.
    case copyOnWrite(ClusterWrite)
    /// One whole cluster stored as compressed bytes in shared host clusters: data first, then
    /// its entry points at it.
    case compressed(CompressedWrite)
    /// A cluster (or whole subclusters) made to read as zeroes through its entry.
    case zero(EntryChange)
    /// A whole cluster freed through its entry.
    case discard(EntryChange)
    /// Bytes already as asked (zeroes over nothing, a partial-cluster discard, unallocated L2
    /// tables stepped over): nothing to do.
    case unchanged(length: UInt64)
    /// Bytes of a zero request that must be written as zero data (part of a cluster).
    case zeroData(length: UInt64)
}

/// A change of one L2 entry with no data I/O (zero, discard).
struct EntryChange {
    var guestCluster: UInt64
    /// The new entry and extended bitmap.
    var raw: UInt64
    var bitmap: UInt64
    /// The old entry whose references are dropped, or 0 when the host cluster is kept.
    var released: UInt64
    /// Guest bytes the change covers.
    var length: UInt64
}

/// A run of whole guest clusters in one L2 table, all pointed at a fresh contiguous host run.
struct ClusterRun {
    /// The L2 table (writable, pinned until commit or abandon).
    var table: Table
    /// Index of the first cluster's entry in the table.
    var firstIndex: Int
    /// The guest clusters, consecutive (marked busy).
    var clusters: [UInt64]
    /// Their entries before the write (the references they drop).
    var old: [UInt64]
    /// Host offset of the first cluster of the run.
    var host: UInt64
}

/// A planned write into one guest cluster: where it goes and which bytes must be filled in
/// around the caller's data (copy-on-write padding).
struct ClusterWrite {
    /// The L2 table (writable, pinned until commit or abandon) and the entry's index in it.
    var table: Table
    var index: Int
    var guestCluster: UInt64
    /// Host cluster the data goes to.
    var host: UInt64
    /// Byte range inside the cluster that is written to `host` (caller's data plus padding).
    var region: Range<UInt64>
    /// Whether `host` is the cluster's existing host cluster, which this image alone owns.
    var reuse: Bool
    /// Where padding bytes come from: (range in cluster, source) in order.
    var padding: [(Range<UInt64>, Source)]
    var oldRaw: UInt64
    var oldBitmap: UInt64
}

/// A planned compressed cluster: its bytes go to `host` (a byte range inside host clusters
/// shared with other compressed clusters, one reference taken on each), then `entry` replaces
/// the old entry.
struct CompressedWrite {
    /// The L2 table (writable, pinned until commit or abandon) and the entry's index in it.
    var table: Table
    var index: Int
    var guestCluster: UInt64
    /// The new entry (a compressed cluster descriptor); its bitmap is 0 with extended L2.
    var entry: L2Entry
    var host: UInt64
    var oldRaw: UInt64
    /// Guest bytes covered (the cluster, or the disk's partial last cluster).
    var length: UInt64
}
