/// The refcount table and its blocks: how many references each host cluster has.
///
/// Increments take effect at once (a cluster gains its count before any table that points
/// at it is written). Decrements are deferred (``deferDecrement(_:count:)``) until the
/// tables that dropped the references are durable and the requests that might still read the
/// clusters have drained (``applyDecrements(_:)``, called by the flush); until then a freed
/// cluster keeps its count, so it cannot be handed out again, and a crash can only leak it.
///
/// Guarded by the metadata lock.
final class Refcounts {
    unowned let file: ImageFile
    unowned let overlap: OverlapGuard
    /// Refcount block offsets (entries of the refcount table), 0 for none.
    var table: [UInt64]
    var tableDirty = false
    var cache: TableCache
    private(set) var order: UInt32
    /// The largest count an entry can hold.
    private(set) var maxValue: UInt64
    /// Entries per refcount block.
    private(set) var blockEntries: UInt64
    /// Decrements waiting for a flush: host cluster index → how many references it loses.
    var pending: [UInt64: UInt64] = [:]
    /// Clusters that reached zero and whose space the flush is still punching out: not handed
    /// out until the punch is done (a new owner's data would be punched away).
    var punching: Set<UInt64> = []
    /// How many times a refcount was set to 0 (wrapping): inline dedup compares it before and
    /// after reading a candidate to know that no cluster was freed (and so reused) meanwhile.
    private(set) var frees: UInt64 = 0

    init(file: ImageFile, overlap: OverlapGuard, table: [UInt64], cacheBytes: Int) {
        self.file = file
        self.overlap = overlap
        self.table = table
        self.order = file.header.refcountOrder
        self.maxValue = RefcountCodec.maxValue(order: file.header.refcountOrder)
        self.blockEntries = file.clusterSize * 8 / file.header.refcountBits
        self.cache = TableCache(capacity: cacheBytes / Int(file.clusterSize))
    }

    /// The block last returned by ``block(covering:)`` and its table index: walks touch one
    /// block thousands of times in a row (checked against the table and the cache's residency).
    private var last: (index: UInt64, table: Table)?

    /// The refcount block covering cluster `c`, or nil when the table has none for it.
    @inline(__always)
    func block(covering c: UInt64) throws -> Table? {
        let ti = c / blockEntries
        guard ti < UInt64(table.count) else { return nil }
        let off = table[Int(ti)] & ~UInt64(511)
        if off == 0 { return nil }
        if let last, last.index == ti, last.table.resident, last.table.offset == off {
            cache.touch(last.table)
            return last.table
        }
        if let t = cache.get(off) {
            last = (ti, t)
            return t
        }
        try file.checkHost(off, "refcount table entry \(ti)")
        try overlap.checkTable(off, as: .refcountBlock)
        let t = Table(offset: off, size: Int(file.clusterSize))
        _ = try file.storage.read(into: t.buf, at: off)
        cache.insert(t)
        last = (ti, t)
        return t
    }

    /// The refcount of host cluster `c` (0 where no block covers it).
    func get(_ c: UInt64) throws -> UInt64 {
        guard let b = try block(covering: c) else { return 0 }
        return RefcountCodec.get(UnsafeRawBufferPointer(b.buf), index: Int(c % blockEntries), order: order)
    }

    /// Sets the refcount of a cluster whose refcount block already exists.
    func set(_ c: UInt64, _ v: UInt64) throws {
        guard let b = try block(covering: c) else {
            throw file.corrupt(.refcount, at: c * file.clusterSize, "no refcount block covers host cluster \(c * file.clusterSize)")
        }
        RefcountCodec.set(b.buf, index: Int(c % blockEntries), order: order, value: v)
        cache.markDirty(b)
        if v == 0 { frees &+= 1 }
    }

    /// Adds one reference to an allocated cluster (a snapshot or a shared cluster taking
    /// it too). Returns false, changing nothing, when the count is already at the width's
    /// maximum: the caller must then not share the cluster.
    func increment(_ c: UInt64) throws -> Bool {
        let v = try get(c)
        guard v > 0 else {
            throw file.corrupt(.refcount, at: c * file.clusterSize, "a new reference to host cluster \(c * file.clusterSize), which has a refcount of 0")
        }
        guard v < maxValue else { return false }
        try set(c, v + 1)
        return true
    }

    /// ``increment(_:)`` for each cluster of `clusters` in order, each refcount block looked
    /// up once per run of clusters it covers. Returns how many were incremented: fewer than
    /// `clusters.count` when the next one is at the width's maximum (it and those after it
    /// are unchanged).
    func incrementAll(_ clusters: [UInt64]) throws -> Int {
        let entries = blockEntries, order = self.order, maxValue = self.maxValue
        var k = 0
        while k < clusters.count {
            let c = clusters[k]
            guard let b = try block(covering: c) else {
                throw file.corrupt(.refcount, at: c * file.clusterSize, "a new reference to host cluster \(c * file.clusterSize), which has a refcount of 0")
            }
            let first = c - c % entries
            var dirty = false
            defer { if dirty { cache.markDirty(b) } }
            while k < clusters.count, clusters[k] >= first, clusters[k] - first < entries {
                let i = Int(clusters[k] - first)
                let v = RefcountCodec.get(UnsafeRawBufferPointer(b.buf), index: i, order: order)
                guard v > 0 else {
                    throw file.corrupt(.refcount, at: clusters[k] * file.clusterSize,
                                       "a new reference to host cluster \(clusters[k] * file.clusterSize), which has a refcount of 0")
                }
                guard v < maxValue else { return k }
                RefcountCodec.set(b.buf, index: i, order: order, value: v + 1)
                dirty = true
                k += 1
            }
        }
        return k
    }

    /// Records that `count` clusters from host offset `host` lose one reference each, to be
    /// applied after the tables that dropped the references are durable.
    func deferDecrement(_ host: UInt64, count: UInt64) {
        let c = host / file.clusterSize
        for k in 0..<count { pending[c + k, default: 0] += 1 }
    }

    /// Whether cluster `c` may be handed out: count 0 and no decrement pending.
    @inline(__always)
    func isFree(_ c: UInt64) throws -> Bool {
        try get(c) == 0 && pending[c] == nil && !punching.contains(c)
    }

    /// The first cluster of `[c, end)` that is free (count 0, no decrement pending), or `end`.
    /// The range lies within the block covering `c`.
    func nextFree(from c: UInt64, to end: UInt64) throws -> UInt64 {
        guard c < end else { return end }
        guard let b = try block(covering: c) else { return c }
        let first = c - c % blockEntries
        let raw = UnsafeRawBufferPointer(b.buf), order = self.order
        var k = c
        while k < end {
            if RefcountCodec.get(raw, index: Int(k - first), order: order) == 0 && pending[k] == nil
                && (punching.isEmpty || !punching.contains(k)) { return k }
            k += 1
        }
        return end
    }

    /// Switches to another refcount table and width, once the header points at it. The
    /// cache must hold nothing dirty (the caller flushed).
    func adopt(table newTable: [UInt64], order newOrder: UInt32) {
        precondition(cache.dirtyCount == 0, "adopting a refcount table with dirty blocks cached")
        for off in cache.tables.keys { cache.remove(off) }
        last = nil
        table = newTable
        tableDirty = false
        order = newOrder
        maxValue = RefcountCodec.maxValue(order: newOrder)
        blockEntries = file.clusterSize * 8 / (1 << UInt64(newOrder))
    }

    /// Applies decrements that have become safe; returns the clusters that reached zero
    /// (no longer metadata, and ready for reuse).
    func applyDecrements(_ decrements: [UInt64: UInt64]) throws -> [UInt64] {
        var zeroed: [UInt64] = []
        for (c, n) in decrements {
            let v = try get(c)
            guard v >= n else {
                throw file.corrupt(.refcount, at: c * file.clusterSize,
                                   "refcount of host cluster \(c * file.clusterSize) would drop below zero")
            }
            try set(c, v - n)
            if v == n {
                zeroed.append(c)
                overlap.release(cluster: c)
            }
        }
        return zeroed
    }
}
