/// Which L1 table a walk reached an L2 table from.
enum L1Source: Equatable {
    case active
    /// The snapshot at this index of the snapshot table.
    case snapshot(Int)
}

/// One L2 table met by a ``TableWalker``.
struct L2Visit {
    var source: L1Source
    /// Index of the entry in its L1 table.
    var l1Index: Int
    var l1Entry: L1Entry
    /// The table, pinned in the cache for the duration of the visit.
    var table: Table
    var geometry: Geometry

    /// Entry `j` (0 ..< entries per table) and its extended bitmap.
    func entry(_ j: Int) -> (raw: UInt64, bitmap: UInt64) {
        ClusterMap.read(table, j, extended: geometry.extendedL2)
    }
}

/// Visits every L2 table reachable from the active L1 table and from each snapshot's L1
/// table: what refcount checks, snapshot deletion, space accounting and format conversions
/// that rewrite entries all walk. Runs with the metadata lock held.
struct TableWalker {
    let map: ClusterMap
    let snapshots: [SnapshotRecord]

    /// The L1 table of snapshot `index`, read from the file (its size was bounded when the
    /// snapshot table was decoded).
    func l1Table(ofSnapshot index: Int) throws -> [UInt64] {
        let s = snapshots[index]
        let file = map.file
        if s.l1Size == 0 { return [] }
        guard s.l1TableOffset % file.clusterSize == 0, s.l1TableOffset != 0,
              s.l1TableOffset / file.clusterSize + divUp(UInt64(s.l1Size) * 8, file.clusterSize) <= file.hostEnd else {
            throw file.corrupt(.pastEnd, at: s.l1TableOffset,
                               "the L1 table of snapshot '\(s.name)' at host offset \(s.l1TableOffset) is unaligned or past the end of the file")
        }
        let bytes = try file.storage.readBytes(at: s.l1TableOffset, count: Int(s.l1Size) * 8)
        return (0..<Int(s.l1Size)).map { bytes.be64($0 * 8) }
    }

    /// Calls `body` for each L2 table: the active L1 table's first, in index order, then
    /// each snapshot's. A table shared by several L1 tables is visited once per reference.
    func forEachL2(_ body: (L2Visit) throws -> Void) throws {
        try walk(map.l1, source: .active, body)
        for i in snapshots.indices {
            try walk(try l1Table(ofSnapshot: i), source: .snapshot(i), body)
        }
    }

    private func walk(_ l1: [UInt64], source: L1Source, _ body: (L2Visit) throws -> Void) throws {
        var i = map.nextAllocated(in: l1, from: 0)
        while i < l1.count {
            let e = L1Entry(raw: l1[i])
            if e.hasReservedBits {
                throw map.file.corrupt(.reservedBits, at: 0, "L1 entry \(i) (\(source)) has reserved bits set (0x\(String(e.raw, radix: 16)))")
            }
            let t = try map.load(e.l2Offset, what: "L1 entry \(i) (\(source))")
            map.cache.pin(t)
            defer { map.cache.unpin(t) }
            try body(L2Visit(source: source, l1Index: i, l1Entry: e, table: t, geometry: map.geometry))
            i = map.nextAllocated(in: l1, from: i + 1)
        }
    }
}

extension ClusterMap {
    /// The first index at or after `i` whose entry in `l1` points to an L2 table, or `l1.count`.
    func nextAllocated(in l1: [UInt64], from i: Int) -> Int {
        var k = i
        while k < l1.count && l1[k] & L1Entry.offsetMask == 0 { k += 1 }
        return k
    }
}
