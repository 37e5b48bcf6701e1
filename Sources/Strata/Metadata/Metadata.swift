/// The in-memory metadata of an open qcow2 image: L1, the L2 and refcount caches, the
/// refcount table, the allocator and the frees waiting for a flush.
///
/// Every method here is called with the image's metadata lock held. Only metadata I/O
/// (loading a table on a cache miss) happens under the lock; guest data I/O never does.
final class Metadata {
    let storage: any BlockStorage
    let path: String
    let geometry: Geometry
    let clusterSize: UInt64
    let clusterBits: UInt64
    var header: Qcow2Header
    var l1: [UInt64]
    var l1Dirty = false
    var l2Cache: TableCache
    /// The L2 table last used for each L1 index: the hot path finds a table here without
    /// hashing (checked against the L1 entry and the cache's residency).
    var l2Slots: [Table?] = []
    var refTable: [UInt64]
    var refTableDirty = false
    var refCache: TableCache
    /// The header must be rewritten at the next flush (relocated tables, new size).
    var headerDirty = false
    let refOrder: UInt32
    let refMax: UInt64
    let refBlockEntries: UInt64
    /// Decrements waiting until the L2/L1 tables that dropped the references are on disk:
    /// host cluster index → count. Until then the cluster keeps its refcount, so it cannot be
    /// handed out again, and a crash can only leak it.
    var pendingFree: [UInt64: UInt64] = [:]
    /// Guest clusters whose write is being planned or copied-on-write right now.
    var busy: Set<UInt64> = []
    /// Lowest host cluster index that may be free.
    var freeCursor: UInt64 = 1
    /// One past the highest host cluster in use or in the file.
    var hostEnd: UInt64
    /// Bumped by each flush; in-flight guest I/O registers against it (grace period).
    var epoch: Int = 0

    init(storage: any BlockStorage, path: String, header: Qcow2Header, l1: [UInt64], refTable: [UInt64],
         fileLength: UInt64, l2CacheBytes: Int, refCacheBytes: Int) {
        self.storage = storage
        self.path = path
        self.header = header
        self.geometry = Geometry(clusterBits: header.clusterBits, extendedL2: header.extendedL2)
        self.clusterSize = header.clusterSize
        self.clusterBits = UInt64(header.clusterBits)
        self.l1 = l1
        self.refTable = refTable
        self.refOrder = header.refcountOrder
        self.refMax = RefcountCodec.maxValue(order: header.refcountOrder)
        self.refBlockEntries = header.clusterSize * 8 / header.refcountBits
        self.l2Cache = TableCache(capacity: l2CacheBytes / Int(header.clusterSize))
        self.refCache = TableCache(capacity: refCacheBytes / Int(header.clusterSize))
        self.hostEnd = max(divUp(fileLength, header.clusterSize), 1)
    }

    // MARK: Errors and I/O

    func corrupt(_ what: String) -> StrataError { .corruptImage(path: path, what: what) }

    func io<T>(_ body: () throws -> T) throws -> T {
        do { return try body() } catch let e as SystemCallError {
            throw e.errno == 28 /* ENOSPC */ ? StrataError.noSpace(path: path) : StrataError.io(path: path, e)
        }
    }

    /// A host cluster offset read from a table must be aligned and inside the file.
    @inline(__always)
    func checkHost(_ host: UInt64, _ what: @autoclosure () -> String) throws {
        guard host % clusterSize == 0, host != 0, host / clusterSize < hostEnd else {
            throw corrupt("\(what()) points to host offset \(host), which is \(host % clusterSize != 0 ? "not cluster aligned" : "past the end of the file")")
        }
    }

    /// Refuses to let a data or table write land on the header or the L1/refcount tables.
    func checkOverlap(_ host: UInt64, _ length: UInt64) throws {
        func overlaps(_ s: UInt64, _ l: UInt64) -> Bool { host < s + l && s < host + length }
        if host < clusterSize
            || overlaps(header.l1TableOffset, UInt64(l1.count) * 8)
            || overlaps(header.refcountTableOffset, UInt64(header.refcountTableClusters) * clusterSize) {
            throw corrupt("refusing to write \(length) bytes at host offset \(host): it overlaps the image's header or tables")
        }
    }

    // MARK: L2 tables

    /// A table from the cache, read on a miss after checking that it lies inside the file
    /// and clear of the header and the L1/refcount tables (which it will be written over).
    private func loadTable(_ offset: UInt64, into cache: inout TableCache, what: @autoclosure () -> String) throws -> Table {
        if let t = cache.get(offset) { return t }
        try checkHost(offset, what())
        try checkOverlap(offset, clusterSize)
        let t = Table(offset: offset, size: Int(clusterSize))
        _ = try io { try storage.read(into: t.buf, at: offset) }
        cache.insert(t)
        return t
    }

    /// The L2 table for L1 index `i`, or nil when unallocated.
    @inline(__always)
    func l2(_ i: Int) throws -> Table? {
        if i < l2Slots.count, let t = l2Slots[i], t.resident, t.offset == l1[i] & L1Entry.offsetMask {
            l2Cache.touch(t)
            return t
        }
        return try l2Miss(i)
    }

    private func l2Miss(_ i: Int) throws -> Table? {
        let e = L1Entry(raw: l1[i])
        if e.hasReservedBits { throw corrupt("L1 entry \(i) has reserved bits set (0x\(String(e.raw, radix: 16)))") }
        let off = e.l2Offset
        if off == 0 { return nil }
        let t = try loadTable(off, into: &l2Cache, what: "L1 entry \(i)")
        if l2Slots.count < l1.count { l2Slots += [Table?](repeating: nil, count: l1.count - l2Slots.count) }
        l2Slots[i] = t
        return t
    }

    /// The L2 table for L1 index `i`, allocated or copied so it may be modified
    /// (an L2 table shared with a snapshot is copied first).
    func writableL2(_ i: Int) throws -> Table {
        let e = L1Entry(raw: l1[i])
        if let t = try l2(i) {
            if e.isCopied { return t }
            // Shared: copy to a new cluster, keep the old one for the snapshot.
            let new = try allocate(1).host
            let copy = Table(offset: new, size: Int(clusterSize))
            copy.buf.copyMemory(from: UnsafeRawBufferPointer(t.buf))
            // The clusters it maps were already counted once per L1 table that reaches them
            // (a snapshot raises them all), so their refcounts stay; they remain shared, so
            // the copy's COPIED bits are cleared.
            clearCopiedFlags(of: copy)
            l2Cache.insert(copy)
            l2Cache.markDirty(copy)
            l1[i] = L1Entry(l2Offset: new, copied: true).raw
            l1Dirty = true
            deferFree(e.l2Offset, count: 1)
            return copy
        }
        let new = try allocate(1).host
        let t = Table(offset: new, size: Int(clusterSize))
        l2Cache.insert(t)
        l2Cache.markDirty(t)
        l1[i] = L1Entry(l2Offset: new, copied: true).raw
        l1Dirty = true
        return t
    }

    /// Clears bit 63 of every standard entry of a table copied from a shared one.
    private func clearCopiedFlags(of t: Table) {
        let stride = Int(geometry.l2EntryBytes / 8)
        for j in 0..<Int(geometry.l2Entries) {
            let raw = t.buf.be64(j * stride)
            if raw & L2Entry.copied != 0 && !L2Entry(raw: raw).isCompressed { t.buf.put64(raw & ~L2Entry.copied, j * stride) }
        }
    }

    /// The L2 entry (and extended bitmap) of guest cluster `g`; (0, 0) when its table is missing.
    @inline(__always)
    func entry(_ g: UInt64) throws -> (raw: UInt64, bitmap: UInt64) {
        let perTable = geometry.l2Entries
        let i = Int(g / perTable)
        guard i < l1.count else { return (0, 0) }
        guard let t = try l2(i) else { return (0, 0) }
        let j = Int(g % perTable)
        if geometry.extendedL2 { return (t.buf.be64(j * 2), t.buf.be64(j * 2 + 1)) }
        return (t.buf.be64(j), 0)
    }

    /// Sets the L2 entry of guest cluster `g` (allocating or un-sharing its table).
    func setEntry(_ g: UInt64, raw: UInt64, bitmap: UInt64) throws {
        let perTable = geometry.l2Entries
        let t = try writableL2(Int(g / perTable))
        let j = Int(g % perTable)
        if geometry.extendedL2 {
            t.buf.put64(raw, j * 2)
            t.buf.put64(bitmap, j * 2 + 1)
        } else {
            t.buf.put64(raw, j)
        }
        l2Cache.markDirty(t)
    }

    /// Host clusters a compressed cluster's bytes touch.
    func compressedClusters(host: UInt64, sectors: UInt64) -> ClosedRange<UInt64> {
        let start = host & ~511
        let end = start + sectors * 512 - 1
        return (start / clusterSize)...(end / clusterSize)
    }

    // MARK: Refcounts

    func refcount(_ c: UInt64) throws -> UInt64 {
        let ti = c / refBlockEntries
        guard ti < UInt64(refTable.count) else { return 0 }
        let off = refTable[Int(ti)] & ~UInt64(511)
        if off == 0 { return 0 }
        let b = try loadTable(off, into: &refCache, what: "refcount table entry \(ti)")
        return RefcountCodec.get(UnsafeRawBufferPointer(b.buf), index: Int(c % refBlockEntries), order: refOrder)
    }

    /// Sets a refcount whose refcount block already exists.
    func setRefcount(_ c: UInt64, _ v: UInt64) throws {
        let ti = Int(c / refBlockEntries)
        guard ti < refTable.count, refTable[ti] != 0 else {
            throw corrupt("no refcount block covers host cluster \(c)")
        }
        let b = try loadTable(refTable[ti] & ~UInt64(511), into: &refCache, what: "refcount table entry \(ti)")
        RefcountCodec.set(b.buf, index: Int(c % refBlockEntries), order: refOrder, value: v)
        refCache.markDirty(b)
    }

    /// Records that `count` clusters starting at host offset `host` lose one reference, to be
    /// applied after the tables that dropped the reference are durable.
    func deferFree(_ host: UInt64, count: UInt64) {
        let c = host / clusterSize
        for k in 0..<count { pendingFree[c + k, default: 0] += 1 }
    }

    /// Drops the reference an L2 entry holds on its host clusters (deferred).
    func release(raw: UInt64) {
        let e = L2Entry(raw: raw)
        switch e.mapping(clusterBits: header.clusterBits, extended: geometry.extendedL2) {
        case .data(let host, _): deferFree(host, count: 1)
        case .zero(let host) where host != 0: deferFree(host, count: 1)
        case .compressed(let host, let sectors):
            for c in compressedClusters(host: host, sectors: sectors) { pendingFree[c, default: 0] += 1 }
        default: break
        }
    }

    // MARK: Allocation

    /// Allocates up to `want` contiguous free host clusters (at least one), sets their
    /// refcounts to 1 and returns the first offset and how many were given.
    func allocate(_ want: UInt64) throws -> (host: UInt64, count: UInt64) {
        var c = freeCursor
        while true {
            if c >= hostEnd { c = hostEnd }
            let ti = c / refBlockEntries
            if ti >= UInt64(refTable.count) {
                try growRefTable(covering: c)
                c = hostEnd
                continue
            }
            if refTable[Int(ti)] == 0 {
                // No refcount block covers this range yet: the block describes itself, placed
                // at the first cluster of the free stretch.
                let b = Table(offset: c * clusterSize, size: Int(clusterSize))
                refCache.insert(b)
                refCache.markDirty(b)
                refTable[Int(ti)] = c * clusterSize
                refTableDirty = true
                RefcountCodec.set(b.buf, index: Int(c % refBlockEntries), order: refOrder, value: 1)
                hostEnd = max(hostEnd, c + 1)
                c += 1
                continue
            }
            if c < hostEnd, try refcount(c) != 0 || pendingFree[c] != nil {
                c += 1
                if c == hostEnd { freeCursor = c }
                continue
            }
            // c is free; extend within this refcount block.
            var n: UInt64 = 1
            let blockEnd = (ti + 1) * refBlockEntries
            while n < want, c + n < blockEnd {
                if c + n < hostEnd, try refcount(c + n) != 0 || pendingFree[c + n] != nil { break }
                n += 1
            }
            let host = c * clusterSize
            guard host + n * clusterSize <= Limits.maxHostOffset else { throw StrataError.noSpace(path: path) }
            for k in 0..<n { try setRefcount(c + k, 1) }
            hostEnd = max(hostEnd, c + n)
            freeCursor = c + n
            return (host, n)
        }
    }

    /// Moves the refcount table to the end of the file with room for cluster `c` and beyond,
    /// creating the refcount blocks that describe the new table itself.
    private func growRefTable(covering c: UInt64) throws {
        let start = hostEnd
        var entries = max(UInt64(refTable.count) * 2, c / refBlockEntries + 2)
        var newBlocks: UInt64 = 0
        var tableClusters: UInt64 = 0
        for _ in 0..<16 {
            tableClusters = divUp(entries * 8, clusterSize)
            let end = start + tableClusters + newBlocks
            if (end - 1) / refBlockEntries + 1 > entries { entries = (end - 1) / refBlockEntries + 2; continue }
            var need: UInt64 = 0
            for ti in (start / refBlockEntries)...((end - 1) / refBlockEntries) where ti >= UInt64(refTable.count) || refTable[Int(ti)] == 0 {
                need += 1
            }
            if need == newBlocks { break }
            newBlocks = need
        }
        guard tableClusters * clusterSize <= Limits.maxRefcountTableBytes else {
            throw StrataError.noSpace(path: path)
        }
        let oldOffset = header.refcountTableOffset
        let oldClusters = UInt64(header.refcountTableClusters)
        refTable += [UInt64](repeating: 0, count: Int(tableClusters * clusterSize / 8) - refTable.count)
        let end = start + tableClusters + newBlocks
        var blockAt = start + tableClusters
        for ti in (start / refBlockEntries)...((end - 1) / refBlockEntries) where refTable[Int(ti)] == 0 {
            let b = Table(offset: blockAt * clusterSize, size: Int(clusterSize))
            refCache.insert(b)
            refCache.markDirty(b)
            refTable[Int(ti)] = blockAt * clusterSize
            blockAt += 1
        }
        hostEnd = end
        for k in start..<end { try setRefcount(k, 1) }
        header.refcountTableOffset = start * clusterSize
        header.refcountTableClusters = UInt32(tableClusters)
        refTableDirty = true
        headerDirty = true
        deferFree(oldOffset, count: oldClusters)
    }

    /// Frees that have become safe: decrement, and return clusters that reached zero.
    func applyFrees(_ frees: [UInt64: UInt64]) throws -> [UInt64] {
        var zeroed: [UInt64] = []
        for (c, n) in frees {
            let v = try refcount(c)
            guard v >= n else { throw corrupt("refcount of host cluster \(c * clusterSize) would drop below zero") }
            try setRefcount(c, v - n)
            if v == n { zeroed.append(c); freeCursor = min(freeCursor, c) }
        }
        return zeroed
    }
}
