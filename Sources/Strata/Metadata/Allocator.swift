/// Hands out host clusters (contiguous runs, refcount 1) and byte ranges inside shared host
/// clusters (for compressed clusters, which pack several to a host cluster, each holding one
/// reference on every host cluster its bytes touch).
///
/// Free means refcount 0 with no decrement pending. Every cluster handed out is checked
/// against the overlap guard first: a cluster whose refcount says free but which holds a
/// table is corruption, never a place for data. Guarded by the metadata lock.
final class Allocator {
    unowned let file: ImageFile
    unowned let refcounts: Refcounts
    unowned let overlap: OverlapGuard
    /// Lowest host cluster index that may be free.
    var freeCursor: UInt64 = 1
    /// Where the next byte-range allocation may continue (inside a partly used cluster), or 0.
    var byteCursor: UInt64 = 0

    init(file: ImageFile, refcounts: Refcounts, overlap: OverlapGuard) {
        self.file = file
        self.refcounts = refcounts
        self.overlap = overlap
    }

    /// Allocates up to `want` contiguous free host clusters (at least one), sets their
    /// refcounts to 1 and returns the first offset and how many were given.
    func allocate(_ want: UInt64) throws -> (host: UInt64, count: UInt64) {
        let cs = file.clusterSize
        var c = freeCursor
        while true {
            if c >= file.hostEnd { c = file.hostEnd }
            let ti = c / refcounts.blockEntries
            if ti >= UInt64(refcounts.table.count) {
                try growRefcountTable(covering: c)
                c = file.hostEnd
                continue
            }
            if refcounts.table[Int(ti)] == 0 {
                // No refcount block covers this range yet: the block describes itself, placed
                // at the first cluster of the free stretch.
                try overlap.checkTable(c * cs, as: .refcountBlock)
                let b = Table(offset: c * cs, size: Int(cs))
                refcounts.cache.insert(b)
                refcounts.cache.markDirty(b)
                refcounts.table[Int(ti)] = c * cs
                refcounts.tableDirty = true
                overlap.claim(c * cs, clusters: 1, as: .refcountBlock)
                RefcountCodec.set(b.buf, index: Int(c % refcounts.blockEntries), order: refcounts.order, value: 1)
                file.hostEnd = max(file.hostEnd, c + 1)
                c += 1
                continue
            }
            if c < file.hostEnd, try !refcounts.isFree(c) {
                // Skip the used clusters of this block in one pass over its entries.
                c = try refcounts.nextFree(from: c + 1, to: min((ti + 1) * refcounts.blockEntries, file.hostEnd))
                if c == file.hostEnd { freeCursor = c }
                continue
            }
            // c is free; extend within this refcount block.
            var n: UInt64 = 1
            let blockEnd = (ti + 1) * refcounts.blockEntries
            while n < want, c + n < blockEnd {
                if c + n < file.hostEnd, try !refcounts.isFree(c + n) { break }
                n += 1
            }
            let host = c * cs
            guard host + n * cs <= Limits.maxHostOffset else { throw StrataError.noSpace(path: file.path) }
            try overlap.checkData(host, n * cs)
            for k in 0..<n { try refcounts.set(c + k, 1) }
            file.hostEnd = max(file.hostEnd, c + n)
            freeCursor = c + n
            return (host, n)
        }
    }

    /// Allocates exactly `n` contiguous clusters (for tables that must be contiguous),
    /// looking past partial runs.
    func allocateContiguous(_ n: UInt64) throws -> UInt64 {
        for _ in 0..<4 {
            let (host, got) = try allocate(n)
            if got == n { return host }
            // Give the partial run back (never referenced, never written) and try at the end.
            for k in 0..<got { try refcounts.set(host / file.clusterSize + k, 0) }
            freeCursor = file.hostEnd
        }
        throw StrataError.noSpace(path: file.path)
    }

    /// Allocates `n` bytes (1 to one cluster) inside a host cluster shared with earlier
    /// byte allocations, QEMU's way: continue in the cluster of the previous allocation when
    /// it has room (or when the next free cluster directly follows it, spanning both);
    /// otherwise start a fresh cluster. Every host cluster the bytes touch gains one reference.
    func allocateBytes(_ n: UInt64) throws -> UInt64 {
        let cs = file.clusterSize
        precondition(n > 0 && n <= cs, "byte allocations are 1 byte to one cluster")
        var offset = byteCursor
        if offset != 0, try refcounts.get(offset / cs) >= refcounts.maxValue { offset = 0 }
        var room = offset == 0 ? 0 : cs - offset % cs
        var fresh: [UInt64] = []
        if offset == 0 || room < n {
            let (host, _) = try allocate(1)
            fresh.append(host / cs)
            if offset == 0 || alignUp(offset, cs) != host {
                offset = host
                room = cs
            } else {
                room += cs
            }
        }
        // One reference per host cluster touched; a fresh cluster already holds its first.
        for c in (offset / cs)...((offset + n - 1) / cs) where !fresh.contains(c) {
            guard try refcounts.increment(c) else { throw StrataError.noSpace(path: file.path) }
        }
        byteCursor = (offset + n) % cs == 0 ? 0 : offset + n
        return offset
    }

    /// Takes note of clusters whose refcount dropped to zero: they may be handed out again,
    /// and byte allocations must not continue in one of them.
    func released(_ clusters: [UInt64]) {
        for c in clusters {
            freeCursor = min(freeCursor, c)
            if byteCursor != 0 && byteCursor / file.clusterSize == c { byteCursor = 0 }
        }
    }

    /// Moves the refcount table to the end of the file with room for cluster `c` and beyond,
    /// creating the refcount blocks that describe the new table itself.
    private func growRefcountTable(covering c: UInt64) throws {
        let cs = file.clusterSize
        let perBlock = refcounts.blockEntries
        let start = file.hostEnd
        var entries = max(UInt64(refcounts.table.count) * 2, c / perBlock + 2)
        var newBlocks: UInt64 = 0
        var tableClusters: UInt64 = 0
        for _ in 0..<16 {
            tableClusters = divUp(entries * 8, cs)
            let end = start + tableClusters + newBlocks
            if (end - 1) / perBlock + 1 > entries { entries = (end - 1) / perBlock + 2; continue }
            var need: UInt64 = 0
            for ti in (start / perBlock)...((end - 1) / perBlock) where ti >= UInt64(refcounts.table.count) || refcounts.table[Int(ti)] == 0 {
                need += 1
            }
            if need == newBlocks { break }
            newBlocks = need
        }
        guard tableClusters * cs <= Limits.maxRefcountTableBytes else { throw StrataError.noSpace(path: file.path) }
        let oldOffset = file.header.refcountTableOffset
        let oldClusters = UInt64(file.header.refcountTableClusters)
        refcounts.table += [UInt64](repeating: 0, count: Int(tableClusters * cs / 8) - refcounts.table.count)
        let end = start + tableClusters + newBlocks
        try overlap.checkData(start * cs, (end - start) * cs)
        var blockAt = start + tableClusters
        for ti in (start / perBlock)...((end - 1) / perBlock) where refcounts.table[Int(ti)] == 0 {
            let b = Table(offset: blockAt * cs, size: Int(cs))
            refcounts.cache.insert(b)
            refcounts.cache.markDirty(b)
            refcounts.table[Int(ti)] = blockAt * cs
            overlap.claim(blockAt * cs, clusters: 1, as: .refcountBlock)
            blockAt += 1
        }
        overlap.claim(start * cs, clusters: tableClusters, as: .refcountTable)
        file.hostEnd = end
        for k in start..<end { try refcounts.set(k, 1) }
        file.header.refcountTableOffset = start * cs
        file.header.refcountTableClusters = UInt32(tableClusters)
        refcounts.tableDirty = true
        file.headerDirty = true
        refcounts.deferDecrement(oldOffset, count: oldClusters)
    }
}
