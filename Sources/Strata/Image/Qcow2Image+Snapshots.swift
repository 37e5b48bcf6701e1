#if canImport(Glibc)
import Glibc
#endif

/// Internal snapshots: the qcow2 snapshot table, interchangeable with QEMU's.
///
/// A snapshot is a copy of the active L1 table plus one more reference on every L2 table and
/// every cluster that L1 table reaches (qcow2 counts a cluster once per L1 table that reaches
/// it). Creating one copies no guest data: it costs a walk over the mapping tables and a
/// write of the refcount blocks. Writes afterwards copy the shared clusters on write, because
/// the COPIED flags of the active tables are cleared (COPIED means "refcount is 1").
///
/// Each operation runs with the image quiesced (in-flight requests drained, new ones held
/// back) and in crash-safe steps: references are added and made durable before anything
/// points at them, and removed only after nothing durable does. A crash between steps
/// leaks clusters, never loses flushed data.
extension Qcow2Image {
    // MARK: Lookup

    /// The index of the snapshot with id `idOrName`, else the first named `idOrName`
    /// (QEMU looks up by id first, then by name).
    public static func snapshotIndex(_ idOrName: String, in records: [SnapshotRecord]) -> Int? {
        records.firstIndex { $0.id == idOrName } ?? records.firstIndex { $0.name == idOrName }
    }

    private func snapshotIndex(_ idOrName: String) throws -> Int {
        guard let i = Self.snapshotIndex(idOrName, in: md.snapshots) else {
            throw StrataError.noSuchSnapshot(path: path, name: idOrName)
        }
        return i
    }

    /// Refuses a change to the snapshot table of a read-only image or of one whose table
    /// could not be read.
    private func checkSnapshotTableWritable() throws {
        if isReadOnly { throw StrataError.readOnly(path: path) }
        if let e = snapshotTableError {
            throw StrataError.invalidOption(path: path, reason: "the snapshot table cannot be changed because it cannot be read (\(e))")
        }
        if lock.withLock({ markedCorrupt }) { throw StrataError.imageIsCorruptBit(path: path) }
    }

    // MARK: Create

    /// Takes an internal snapshot of the active disk named `name`, with the next free
    /// numeric id. Consistent while the image is served: it holds every write completed
    /// before the call and none started after (requests wait meanwhile).
    @discardableResult
    public func createSnapshot(name: String) throws -> SnapshotRecord {
        try checkSnapshotTableWritable()
        guard !name.isEmpty, UInt64(name.utf8.count) <= Limits.maxSnapshotNameBytes else {
            throw StrataError.invalidOption(path: path, reason: "a snapshot name must be 1 to \(Limits.maxSnapshotNameBytes) bytes")
        }
        try prepareFirstWrite()
        return try quiesce {
            try guarded {
                // 1. One more reference on everything the active L1 table reaches, the COPIED
                //    flags cleared, and the snapshot's L1 table written to new clusters.
                let (record, records) = try lock.withLock { () throws -> (SnapshotRecord, [SnapshotRecord]) in
                    var records = md.snapshots
                    if records.contains(where: { $0.name == name }) { throw StrataError.snapshotExists(path: path, name: name) }
                    guard UInt64(records.count) < Limits.maxSnapshots else {
                        throw StrataError.invalidOption(path: path, reason: "the image has \(records.count) snapshots, the most qcow2 allows")
                    }
                    let l1 = md.map.l1
                    try addReferences(of: l1)
                    try clearCopiedFlags(of: l1)
                    for k in md.map.l1.indices where md.map.l1[k] & L1Entry.copied != 0 {
                        md.map.l1[k] &= ~L1Entry.copied
                        md.map.l1Dirty = true
                    }
                    let l1Offset = try writeL1Copy(l1, as: .snapshotL1Table)
                    let nextID = (records.compactMap { Int($0.id) }.max() ?? 0) + 1
                    var now = timeval()
                    gettimeofday(&now, nil)
                    let r = SnapshotRecord.new(id: String(nextID), name: name, l1TableOffset: l1Offset, l1Size: UInt32(l1.count),
                                               diskSize: md.header.size, dateSeconds: UInt32(truncatingIfNeeded: now.tv_sec),
                                               dateNanoseconds: UInt32(now.tv_usec) * 1000)
                    records.append(r)
                    return (r, records)
                }
                // 2. Those references and tables durable (a crash now leaks them).
                try flushNow()
                // 3. The table that lists the snapshot, then the header that points at it.
                try lock.withLock { try writeSnapshotTable(records) }
                try flushNow()
                return record
            }
        }
    }

    // MARK: Delete

    /// Deletes the snapshot with id or name `idOrName` and frees what only it held.
    @discardableResult
    public func deleteSnapshot(_ idOrName: String) throws -> SnapshotRecord {
        try checkSnapshotTableWritable()
        try prepareFirstWrite()
        var record: SnapshotRecord? = nil
        try quiesce {
            try guarded {
                // 1. The table without it, then its references dropped: the flush writes the
                //    header before it applies the decrements. Its tables are walked before
                //    anything changes, so a damaged one refuses the deletion.
                try lock.withLock {
                    let i = try snapshotIndex(idOrName)
                    let r = md.snapshots[i]
                    var drop: [UInt64] = []
                    try forEachReference(of: try md.walker.l1Table(ofSnapshot: i)) { drop.append($0) }
                    var records = md.snapshots
                    records.remove(at: i)
                    try writeSnapshotTable(records)
                    for c in drop { md.refcounts.deferDecrement(c * clusterSize, count: 1) }
                    if r.l1TableOffset != 0 {
                        md.refcounts.deferDecrement(r.l1TableOffset, count: max(1, divUp(UInt64(r.l1Size) * 8, clusterSize)))
                    }
                    record = r
                }
                try flushNow()
                // 3. What the active disk now owns alone regains its COPIED flag (no copy on
                //    write for it any more).
                try lock.withLock { try restoreCopiedFlags() }
                try flushNow()
            }
        }
        return record!
    }

    // MARK: Revert

    /// Makes the active disk what snapshot `idOrName` holds (`qemu-img snapshot -a`): its
    /// mapping and its size. The snapshot stays. Refused on a served image by the lock.
    public func revertToSnapshot(_ idOrName: String) throws {
        try checkSnapshotTableWritable()
        try prepareFirstWrite()
        try quiesce {
            try guarded {
                // 1. The snapshot's tables gain the active disk's reference; the new active
                //    L1 table is prepared in new clusters.
                let (newL1, newOffset, diskSize) = try lock.withLock { () throws -> ([UInt64], UInt64, UInt64) in
                    let i = try snapshotIndex(idOrName)
                    let s = md.snapshots[i]
                    var l1 = try md.walker.l1Table(ofSnapshot: i)
                    let diskSize = s.diskSize ?? md.header.size
                    guard diskSize <= Limits.maxVirtualSize else {
                        throw StrataError.invalidOption(path: path, reason: "snapshot '\(s.name)' records a disk size of \(diskSize) bytes, more than \(Limits.maxVirtualSize)")
                    }
                    let needed = Int(geometry.l1Entries(forSize: diskSize))
                    if l1.count < needed { l1 += [UInt64](repeating: 0, count: needed - l1.count) }
                    try addReferences(of: l1)
                    try clearCopiedFlags(of: l1)
                    for k in l1.indices { l1[k] &= ~L1Entry.copied }
                    return (l1, try writeL1Copy(l1, as: .l1Table), diskSize)
                }
                try flushNow()
                // 2. The header points at the new L1 table; the old one's references go once
                //    that is durable.
                try lock.withLock {
                    let old = md.map.l1
                    let oldOffset = md.header.l1TableOffset, oldSize = md.header.l1Size
                    for e in newL1 where e & L1Entry.offsetMask != 0 {
                        md.overlap.claim(e & L1Entry.offsetMask, clusters: 1, as: .l2Table)
                    }
                    md.map.replaceL1(newL1)
                    md.header.l1TableOffset = newOffset
                    md.header.l1Size = UInt32(newL1.count)
                    md.header.size = diskSize
                    md.file.headerDirty = true
                    try forEachReference(of: old) { c in md.refcounts.deferDecrement(c * clusterSize, count: 1) }
                    if oldOffset != 0 {
                        md.refcounts.deferDecrement(oldOffset, count: max(1, divUp(UInt64(oldSize) * 8, clusterSize)))
                    }
                }
                try flushNow()
                try lock.withLock { try restoreCopiedFlags() }
                try flushNow()
            }
        }
    }

    // MARK: Space

    /// Bytes each snapshot holds alone, in the order of ``snapshots``: the clusters that
    /// deleting it would free (those whose every reference comes through its L1 table, the
    /// L1 table itself, and what the snapshot table shrinks by). Walks each snapshot's tables; cost follows the metadata.
    public func snapshotUsage() throws -> [UInt64] {
        try lock.withLock {
            if let e = snapshotTableError { throw e }
            var out: [UInt64] = []
            for i in md.snapshots.indices {
                var refs: [UInt64: UInt64] = [:]
                try forEachReference(of: try md.walker.l1Table(ofSnapshot: i)) { c in refs[c, default: 0] += 1 }
                var clusters: UInt64 = 0
                for (c, n) in refs where try md.refcounts.get(c) == n { clusters += 1 }
                let s = md.snapshots[i]
                if s.l1TableOffset != 0 { clusters += max(1, divUp(UInt64(s.l1Size) * 8, clusterSize)) }
                // The snapshot table is rewritten without the entry, maybe in fewer clusters.
                var rest = md.snapshots
                rest.remove(at: i)
                clusters += divUp(UInt64(SnapshotRecord.tableLength(md.snapshots)), clusterSize)
                    - divUp(UInt64(SnapshotRecord.tableLength(rest)), clusterSize)
                out.append(clusters * clusterSize)
            }
            return out
        }
    }

    // MARK: Steps (lock held)

    /// Calls `body` with each host cluster an L1 table references, once per reference: each
    /// L2 table, then each cluster its entries map (data, preallocated zero, and every host
    /// cluster a compressed entry's bytes touch). Lock held.
    func forEachReference(of l1: [UInt64], _ body: (UInt64) throws -> Void) throws {
        try forEachReferenceBatch(of: l1) { batch in
            for c in batch { try body(c) }
        }
    }

    /// The references of ``forEachReference(of:_:)``, one batch per L2 table (the table
    /// itself first, then what its entries map), in the same order. The batch is only valid
    /// during the call. Lock held.
    func forEachReferenceBatch(of l1: [UInt64], _ body: ([UInt64]) throws -> Void) throws {
        let map = md.map
        let cs = clusterSize
        let bits = md.header.clusterBits
        let extended = geometry.extendedL2
        let entries = Int(geometry.l2Entries)
        var batch: [UInt64] = []
        batch.reserveCapacity(entries + 1)
        var i = map.nextAllocated(in: l1, from: 0)
        while i < l1.count {
            let e = L1Entry(raw: l1[i])
            if e.hasReservedBits {
                throw md.file.corrupt(.reservedBits, at: 0, "L1 entry \(i) has reserved bits set (0x\(String(e.raw, radix: 16)))")
            }
            try md.file.checkHost(e.l2Offset, "L1 entry \(i)")
            batch.removeAll(keepingCapacity: true)
            batch.append(e.l2Offset / cs)
            let t = try map.load(e.l2Offset, what: "L1 entry \(i)")
            map.cache.pin(t)
            defer { map.cache.unpin(t) }
            let hostEnd = md.file.hostEnd
            for j in 0..<entries {
                let raw = ClusterMap.read(t, j, extended: extended).raw
                if raw == 0 { continue }
                var host: UInt64 = 0
                switch L2Entry(raw: raw).mapping(clusterBits: bits, extended: extended) {
                case .data(let h, _): host = h
                case .zero(let h): host = h
                case .compressed(let host, let sectors):
                    for c in md.file.compressedClusters(host: host, sectors: sectors) { batch.append(c) }
                case .unallocated: break
                }
                if host != 0 {
                    if host % cs != 0 || host / cs >= hostEnd {
                        try md.file.checkHost(host, "L2 entry \(j) of the table at host offset \(t.offset)")
                    }
                    batch.append(host / cs)
                }
            }
            try body(batch)
            i = map.nextAllocated(in: l1, from: i + 1)
        }
    }

    /// One more reference on everything `l1` reaches. When a count would pass the refcount
    /// width's maximum, the increments made so far are undone and the operation refused (the
    /// image is unchanged). Lock held.
    private func addReferences(of l1: [UInt64]) throws {
        var done = 0
        var full: UInt64? = nil
        do {
            try forEachReferenceBatch(of: l1) { batch in
                let n = try md.refcounts.incrementAll(batch)
                done += n
                if n < batch.count {
                    full = batch[n]
                    throw StrataError.noSpace(path: path)
                }
            }
        } catch {
            var undone = 0
            struct Stop: Error {}
            do {
                try forEachReference(of: l1) { c in
                    guard undone < done else { throw Stop() }
                    try md.refcounts.set(c, try md.refcounts.get(c) - 1)
                    undone += 1
                }
            } catch is Stop {}
            if let full {
                throw StrataError.invalidOption(path: path, reason: "host cluster \(full * clusterSize) already has a refcount of \(try md.refcounts.get(full)), the most \(md.header.refcountBits)-bit refcounts hold, so it cannot be shared once more; widen them with 'strata amend -o refcount_bits=16'")
            }
            throw error
        }
    }

    /// Clears the COPIED flags of the entries of the L2 tables `l1` reaches (everything
    /// there is shared now). Lock held.
    private func clearCopiedFlags(of l1: [UInt64]) throws {
        try rewriteEntries(of: l1) { raw, _ in raw & ~L2Entry.copied }
    }

    /// Sets the COPIED flags of the active L1 and L2 entries whose cluster has a refcount of
    /// 1, and clears the others (QEMU's rule, which its check verifies). Tables still shared
    /// are left as they are: everything they map is shared too. Lock held.
    private func restoreCopiedFlags() throws {
        let map = md.map
        let cs = clusterSize
        var owned: [UInt64] = []
        for k in map.l1.indices where map.l1[k] & L1Entry.offsetMask != 0 {
            let e = L1Entry(raw: map.l1[k])
            let alone = try md.refcounts.get(e.l2Offset / cs) == 1
            if alone != e.isCopied {
                map.l1[k] = L1Entry(l2Offset: e.l2Offset, copied: alone).raw
                map.l1Dirty = true
            }
            owned.append(alone ? map.l1[k] : 0)
        }
        try rewriteEntries(of: owned) { raw, host in
            guard host != 0 else { return raw }
            return try md.refcounts.get(host / cs) == 1 ? raw | L2Entry.copied : raw & ~L2Entry.copied
        }
    }

    /// Rewrites the standard (uncompressed) entries of each L2 table `l1` reaches with
    /// `change(raw, host)`, marking a table dirty only when an entry changed. Lock held.
    private func rewriteEntries(of l1: [UInt64], _ change: (UInt64, UInt64) throws -> UInt64) throws {
        let map = md.map
        let stride = Int(geometry.l2EntryBytes / 8)
        var i = map.nextAllocated(in: l1, from: 0)
        while i < l1.count {
            let t = try map.load(l1[i] & L1Entry.offsetMask, what: "L1 entry \(i)")
            map.cache.pin(t)
            defer { map.cache.unpin(t) }
            var changed = false
            for j in 0..<Int(geometry.l2Entries) {
                let raw = t.buf.be64(j * stride)
                let e = L2Entry(raw: raw)
                if raw == 0 || e.isCompressed { continue }
                let new = try change(raw, e.hostOffset)
                if new != raw {
                    t.buf.put64(new, j * stride)
                    changed = true
                }
            }
            if changed { map.cache.markDirty(t) }
            i = map.nextAllocated(in: l1, from: i + 1)
        }
    }

    /// Writes `l1` (COPIED flags cleared) to new clusters (at least one) claimed as `kind`.
    /// Lock held.
    private func writeL1Copy(_ l1: [UInt64], as kind: MetadataKind) throws -> UInt64 {
        let clusters = max(1, divUp(UInt64(l1.count) * 8, clusterSize))
        let offset = try md.allocator.allocateContiguous(clusters)
        try md.overlap.checkData(offset, clusters * clusterSize)
        var bytes = encodeTable(l1.map { $0 & ~L1Entry.copied })
        bytes += [UInt8](repeating: 0, count: Int(clusters * clusterSize) - bytes.count)
        try storage.writeBytes(bytes, at: offset)
        md.overlap.claim(offset, clusters: clusters, as: kind)
        return offset
    }

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
            // Whole clusters, so the file never ends inside one.
            bytes += [UInt8](repeating: 0, count: Int(clusters * cs) - bytes.count)
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
