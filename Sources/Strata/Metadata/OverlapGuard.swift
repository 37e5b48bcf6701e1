/// Knows which host clusters hold metadata, and refuses any write that would land on
/// metadata of another kind: a table written over another table, or guest data written over
/// any table (QEMU's metadata overlap check, for every kind of metadata it has).
///
/// Claimed at open: the header cluster, the L1 table, the refcount table, every refcount
/// block, every L2 table the active L1 table points to, the snapshot table and each
/// snapshot's L1 table, the bitmap directory and each bitmap table. Claimed as they are
/// made: new L2 tables, refcount blocks, moved tables. Released when a cluster's refcount
/// drops to zero. L2 tables reachable only from a snapshot are not claimed: they are never
/// written (their entries lost COPIED, so writes copy them first).
///
/// Lookups are one hash probe per cluster, so the check runs on every data write, in place
/// or not. Guarded by the metadata lock.
final class OverlapGuard {
    private var owners: [UInt64: MetadataKind] = [:]
    /// Clusters claimed twice, by different kinds: the image is corrupt there; any use of
    /// them as a table is refused.
    private(set) var conflicts: Set<UInt64> = []
    unowned let file: ImageFile

    init(file: ImageFile) { self.file = file }

    /// Claims `count` clusters from host offset `host` as `kind`.
    func claim(_ host: UInt64, clusters count: UInt64, as kind: MetadataKind) {
        let first = host / file.clusterSize
        for c in first..<(first + count) {
            if let old = owners[c], old != kind { conflicts.insert(c); continue }
            owners[c] = kind
        }
    }

    /// Claims the clusters that `length` bytes from `host` touch.
    func claim(_ host: UInt64, bytes length: UInt64, as kind: MetadataKind) {
        guard length > 0 else { return }
        let first = host / file.clusterSize
        let last = (host + length - 1) / file.clusterSize
        claim(first * file.clusterSize, clusters: last - first + 1, as: kind)
    }

    /// Forgets a cluster that no longer holds metadata (its refcount reached zero).
    func release(cluster c: UInt64) {
        owners.removeValue(forKey: c)
        conflicts.remove(c)
    }

    /// Refuses writing a table of `kind` at `host` (one cluster) when that cluster holds
    /// metadata of another kind, or was claimed by two kinds.
    func checkTable(_ host: UInt64, as kind: MetadataKind) throws {
        let c = host / file.clusterSize
        if let owner = owners[c], owner != kind || conflicts.contains(c) {
            throw file.corrupt(.overlap(owner), at: host,
                               "\(kind.rawValue) at host offset \(host) overlaps \(owner.rawValue)")
        }
    }

    /// Refuses guest data written to `length` bytes at `host` when any cluster of them
    /// holds metadata.
    @inline(__always)
    func checkData(_ host: UInt64, _ length: UInt64) throws {
        guard length > 0 else { return }
        var c = host >> file.clusterBits
        let last = (host + length - 1) >> file.clusterBits
        while c <= last {
            if let owner = owners[c] {
                throw file.corrupt(.overlap(owner), at: c << file.clusterBits,
                                   "refusing to write guest data at host offset \(c << file.clusterBits): it holds \(owner.rawValue)")
            }
            c += 1
        }
    }
}
