#if canImport(Glibc)
import Glibc
#endif

/// What an offline dedup pass did.
public struct DedupReport: Sendable, Equatable {
    /// Data clusters of the active disk looked at.
    public var scanned: UInt64 = 0
    /// Entries that now point at an identical cluster stored elsewhere in the image.
    public var shared: UInt64 = 0
    /// All-zero data clusters turned into zero entries.
    public var zeroed: UInt64 = 0
    /// Entries left alone because the identical cluster's refcount was at its width's maximum.
    public var refcountFull: UInt64 = 0
    public init() {}
}

/// Offline dedup (`strata dedup`): every data cluster of the active disk whose content is
/// already stored elsewhere in the image is mapped to that cluster (its refcount raised, the
/// COPIED flags of both entries cleared) and its own cluster released; an all-zero cluster
/// becomes a zero entry (version 3). The image stays ordinary qcow2: a later write into a
/// shared cluster copies it on write, in Strata and in QEMU.
///
/// A share is made only after the two clusters were compared byte for byte (the hash only
/// finds candidates), so a collision costs nothing but a comparison. Snapshots keep what
/// they hold: their tables are never changed, a table shared with one is copied before an
/// entry of the active disk changes, and a released cluster a snapshot still references
/// keeps its data. The index lives in memory for the pass (about 100 bytes per distinct
/// cluster).
///
/// Crash safety is the write path's: the new reference is counted before any table points
/// at it, the old one is dropped only after the tables are durable.
extension Qcow2Image {
    public func deduplicate() throws -> DedupReport {
        if isReadOnly { throw StrataError.readOnly(path: path) }
        try prepareFirstWrite()
        return try quiesce {
            try guarded {
                let (report, entries) = try dedupPass()
                // Marked a dedup image (version 3, not compress=on), so later opens write it
                // with inline dedup and give COPIED back to an entry whose cluster is
                // referenced once again; its index file is rebuilt from the pass.
                let flags = md.file.extensions.strata?.flags ?? []
                guard md.header.version >= 3, !flags.contains(.compress) else { return report }
                var id = md.file.extensions.strata?.indexID
                if id == nil || !flags.contains(.dedup) {
                    let newID = id ?? Self.newIndexID()
                    try rewriteFirstCluster { _, ext, _ in
                        var st = ext.strata ?? StrataExtension()
                        st.flags.insert(.dedup)
                        st.indexID = newID
                        ext.strata = st
                    }
                    id = newID
                }
                if let index = dedup, index.file != nil {
                    try index.replaceAll(entries)
                } else if storage is FileStorage, let id {
                    try dedup?.replaceAll(entries)
                    let file = try DedupIndexFile.open(imagePath: path, id: id, clusterBits: md.header.clusterBits)
                    defer { file.close() }
                    try file.rewrite(entries, complete: entries.count <= Limits.maxDedupIndexEntries)
                }
                try writeAutoclear(md.header.autoclearFeatures.union(.dedupIndex))
                return report
            }
        }
    }

    /// A candidate: guest cluster `guest`, entry `j` of the table of L1 index `i`, at `host`.
    private struct DedupCandidate {
        var i: Int
        var j: Int
        var raw: UInt64
        var host: UInt64
    }

    /// 16 random bytes naming an image in its dedup index file.
    static func newIndexID() -> [UInt8] {
        var g = SystemRandomNumberGenerator()
        return (0..<16).map { _ in UInt8.random(in: 0...255, using: &g) }
    }

    /// One pass over the active disk; returns the report and the index it built (content
    /// hash → the cluster kept for it and the guest cluster whose entry owns it).
    private func dedupPass() throws -> (DedupReport, [UInt64: DedupIndex.Entry]) {
        let cs = Int(clusterSize)
        var report = DedupReport()
        // Content hash → the first cluster seen with it, and where its entry is.
        var index: [UInt64: (host: UInt64, i: Int, j: Int)] = [:]
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: cs, alignment: 4096)
        let other = UnsafeMutableRawBufferPointer.allocate(byteCount: cs, alignment: 4096)
        defer { buf.deallocate(); other.deallocate() }
        let (l1Count, zeroEntries, extended) = lock.withLock { (md.map.l1.count, md.header.version >= 3, geometry.extendedL2) }
        let perTable = Int(geometry.l2Entries)

        func readCluster(_ host: UInt64, into b: UnsafeMutableRawBufferPointer) throws {
            let n = try storage.read(into: b, at: host)
            if n < cs { b.baseAddress!.advanced(by: n).initializeMemory(as: UInt8.self, repeating: 0, count: cs - n) }
        }

        for i in 0..<l1Count {
            let candidates: [DedupCandidate] = try lock.withLock {
                guard let t = try md.map.table(i) else { return [] }
                var out: [DedupCandidate] = []
                for j in 0..<perTable {
                    let (raw, bitmap) = ClusterMap.read(t, j, extended: extended)
                    guard raw != 0 else { continue }
                    guard case .data(let host, _) = L2Entry(raw: raw).mapping(clusterBits: md.header.clusterBits, extended: extended) else { continue }
                    // With subclusters, only clusters whose every subcluster holds data.
                    if extended && SubclusterBitmap(raw: bitmap) != .allAllocated { continue }
                    try md.file.checkHost(host, "L2 entry \(j) of L1 entry \(i)")
                    out.append(DedupCandidate(i: i, j: j, raw: raw, host: host))
                }
                return out
            }
            for c in candidates {
                report.scanned += 1
                try readCluster(c.host, into: buf)
                let guest = UInt64(c.i * perTable + c.j)
                if zeroEntries && ZeroBuffer.isZero(UnsafeRawBufferPointer(buf)) {
                    try lock.withLock {
                        try md.map.setEntry(guest, raw: extended ? 0 : L2Entry.zeroFlag,
                                            bitmap: extended ? SubclusterBitmap.allZero.raw : 0)
                        md.map.release(raw: c.raw)
                    }
                    report.zeroed += 1
                    continue
                }
                let h = ContentHash.of(UnsafeRawBufferPointer(buf))
                guard let canon = index[h], canon.host != c.host else {
                    if index[h] == nil { index[h] = (c.host, c.i, c.j) }
                    continue
                }
                try readCluster(canon.host, into: other)
                guard memcmp(buf.baseAddress!, other.baseAddress!, cs) == 0 else { continue }
                let shared: Bool = try lock.withLock {
                    guard try md.refcounts.increment(canon.host / clusterSize) else { return false }
                    try md.map.setEntry(guest, raw: canon.host, bitmap: extended ? SubclusterBitmap.allAllocated.raw : 0)
                    md.map.release(raw: c.raw)
                    // The first copy is shared now: its entry loses COPIED (where its table
                    // is the active disk's own; a table shared with a snapshot has none).
                    if md.map.l1[canon.i] & L1Entry.copied != 0, let t = try md.map.table(canon.i) {
                        let (raw, bitmap) = ClusterMap.read(t, canon.j, extended: extended)
                        if raw & L2Entry.copied != 0 {
                            md.map.set(t, canon.j, raw: raw & ~L2Entry.copied, bitmap: bitmap)
                            copiedCleared.insert(t.offset)
                        }
                    }
                    return true
                }
                if shared { report.shared += 1 } else { report.refcountFull += 1 }
            }
            let full = lock.withLock { md.map.cache.needsWriteback || md.refcounts.cache.needsWriteback }
            if full { try writeBackTables() }
        }
        try flushNow()
        let entries = index.mapValues { DedupIndex.Entry(host: $0.host >> clusterBits, guest: UInt64($0.i * perTable + $0.j)) }
        return (report, entries)
    }
}

/// How the active disk's data is stored: what `strata info` shows for compressed and
/// deduplicated images.
public struct SpaceUsage: Sendable, Equatable {
    /// Guest clusters of the active disk that map to data (plain or compressed).
    public var referenced: UInt64 = 0
    /// Of those, compressed clusters.
    public var compressed: UInt64 = 0
    /// Distinct host clusters holding that data (a compressed cluster counts every host
    /// cluster its bytes touch; shared ones count once).
    public var stored: UInt64 = 0
    public init() {}
}

extension Qcow2Image {
    /// Walks the active disk's L2 tables (one at a time, the metadata lock held per table;
    /// unallocated tables cost nothing): guest clusters referenced against host clusters
    /// stored. Memory: 8 bytes per referenced cluster for the walk.
    public func spaceUsage() throws -> SpaceUsage {
        var u = SpaceUsage()
        var hosts: [UInt64] = []
        let (count, extended) = lock.withLock { (md.map.l1.count, geometry.extendedL2) }
        let perTable = Int(geometry.l2Entries)
        for i in 0..<count {
            try lock.withLock {
                guard i < md.map.l1.count, let t = try md.map.table(i) else { return }
                for j in 0..<perTable {
                    let raw = ClusterMap.read(t, j, extended: extended).raw
                    guard raw != 0 else { continue }
                    switch L2Entry(raw: raw).mapping(clusterBits: md.header.clusterBits, extended: extended) {
                    case .data(let host, _):
                        u.referenced += 1
                        hosts.append(host / clusterSize)
                    case .compressed(let host, let sectors):
                        u.referenced += 1
                        u.compressed += 1
                        hosts.append(contentsOf: md.file.compressedClusters(host: host, sectors: sectors))
                    case .zero, .unallocated: break
                    }
                }
            }
        }
        hosts.sort()
        var last: UInt64? = nil
        for h in hosts where h != last {
            u.stored += 1
            last = h
        }
        return u
    }
}
