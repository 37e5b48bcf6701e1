/// A lookup that would have read from storage, refused because the caller may not wait.
struct WouldBlock: Error {}

/// The guest→host cluster map: the L1 table and the L2 tables it points to.
///
/// Lookups (``entry(_:)``, ``table(_:)``) load L2 tables into a bounded cache on a miss,
/// after checking each lies inside the file and clear of other metadata. Changes go through
/// ``writableTable(_:)``, which allocates a missing table or copies one shared with a
/// snapshot first, so a table is only ever modified where this image alone owns it.
///
/// Guarded by the metadata lock.
final class ClusterMap {
    unowned let file: ImageFile
    unowned let allocator: Allocator
    unowned let refcounts: Refcounts
    unowned let overlap: OverlapGuard
    var l1: [UInt64]
    var l1Dirty = false
    var cache: TableCache
    /// The L2 table last used for each L1 index: the hot path finds a table here without
    /// hashing (checked against the L1 entry and the cache's residency).
    private var slots: [Table?] = []
    let geometry: Geometry
    /// Set (lock held) while a lookup must not read from storage: a table not in the cache
    /// then throws ``WouldBlock`` instead of being loaded.
    var cachedOnly = false

    init(file: ImageFile, allocator: Allocator, refcounts: Refcounts, overlap: OverlapGuard, l1: [UInt64], cacheBytes: Int) {
        self.file = file
        self.allocator = allocator
        self.refcounts = refcounts
        self.overlap = overlap
        self.l1 = l1
        self.geometry = file.geometry
        self.cache = TableCache(capacity: cacheBytes / Int(file.clusterSize))
    }

    /// The L2 table at `offset`, read on a cache miss after checking that it lies inside the
    /// file and on no other kind of metadata.
    func load(_ offset: UInt64, what: @autoclosure () -> String) throws -> Table {
        if let t = cache.get(offset) { return t }
        if cachedOnly { throw WouldBlock() }
        try file.checkHost(offset, what())
        try overlap.checkTable(offset, as: .l2Table)
        let t = Table(offset: offset, size: Int(file.clusterSize))
        _ = try file.storage.read(into: t.buf, at: offset)
        cache.insert(t)
        return t
    }

    /// Switches to another L1 table (already written where the header will point).
    func replaceL1(_ new: [UInt64]) {
        l1 = new
        l1Dirty = false
        slots = []
    }

    /// The L2 table for L1 index `i`, or nil when unallocated.
    @inline(__always)
    func table(_ i: Int) throws -> Table? {
        if i < slots.count, let t = slots[i], t.resident, t.offset == l1[i] & L1Entry.offsetMask {
            cache.touch(t)
            return t
        }
        return try tableMiss(i)
    }

    private func tableMiss(_ i: Int) throws -> Table? {
        let e = L1Entry(raw: l1[i])
        if e.hasReservedBits {
            throw file.corrupt(.reservedBits, at: file.header.l1TableOffset + UInt64(i) * 8,
                               "L1 entry \(i) has reserved bits set (0x\(String(e.raw, radix: 16)))")
        }
        let off = e.l2Offset
        if off == 0 { return nil }
        let t = try load(off, what: "L1 entry \(i)")
        if slots.count < l1.count { slots += [Table?](repeating: nil, count: l1.count - slots.count) }
        slots[i] = t
        return t
    }

    /// The L2 table for L1 index `i`, allocated or copied so it may be modified
    /// (an L2 table shared with a snapshot is copied first).
    func writableTable(_ i: Int) throws -> Table {
        let e = L1Entry(raw: l1[i])
        let cs = file.clusterSize
        if let t = try table(i) {
            if e.isCopied { return t }
            // Shared: copy to a new cluster, keep the old one for the snapshot.
            let new = try allocator.allocate(1).host
            let copy = Table(offset: new, size: Int(cs))
            copy.buf.copyMemory(from: UnsafeRawBufferPointer(t.buf))
            // The clusters it maps were already counted once per L1 table that reaches them
            // (a snapshot raises them all), so their refcounts stay; they remain shared, so
            // the copy's COPIED bits are cleared.
            clearCopiedFlags(of: copy)
            install(copy, at: i)
            refcounts.deferDecrement(e.l2Offset, count: 1)
            return copy
        }
        let t = Table(offset: try allocator.allocate(1).host, size: Int(cs))
        install(t, at: i)
        return t
    }

    private func install(_ t: Table, at i: Int) {
        cache.insert(t)
        cache.markDirty(t)
        overlap.claim(t.offset, clusters: 1, as: .l2Table)
        l1[i] = L1Entry(l2Offset: t.offset, copied: true).raw
        l1Dirty = true
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
        guard i < l1.count, let t = try table(i) else { return (0, 0) }
        return Self.read(t, Int(g % perTable), extended: geometry.extendedL2)
    }

    /// Entry `j` of table `t`.
    @inline(__always)
    static func read(_ t: Table, _ j: Int, extended: Bool) -> (raw: UInt64, bitmap: UInt64) {
        extended ? (t.buf.be64(j * 2), t.buf.be64(j * 2 + 1)) : (t.buf.be64(j), 0)
    }

    /// Sets entry `j` of a writable table `t`.
    func set(_ t: Table, _ j: Int, raw: UInt64, bitmap: UInt64) {
        if geometry.extendedL2 {
            t.buf.put64(raw, j * 2)
            t.buf.put64(bitmap, j * 2 + 1)
        } else {
            t.buf.put64(raw, j)
        }
        cache.markDirty(t)
    }

    /// Sets the L2 entry of guest cluster `g` (allocating or un-sharing its table).
    func setEntry(_ g: UInt64, raw: UInt64, bitmap: UInt64) throws {
        let perTable = geometry.l2Entries
        set(try writableTable(Int(g / perTable)), Int(g % perTable), raw: raw, bitmap: bitmap)
    }

    /// Drops the reference an L2 entry holds on its host clusters (deferred).
    func release(raw: UInt64) {
        switch L2Entry(raw: raw).mapping(clusterBits: file.header.clusterBits, extended: geometry.extendedL2) {
        case .data(let host, _): refcounts.deferDecrement(host, count: 1)
        case .zero(let host) where host != 0: refcounts.deferDecrement(host, count: 1)
        case .compressed(let host, let sectors):
            for c in file.compressedClusters(host: host, sectors: sectors) { refcounts.pending[c, default: 0] += 1 }
        default: break
        }
    }
}
