/// Changing the virtual size, while the image may be in use: requests are held back for the
/// moment it takes (``Qcow2Image/quiesce(_:)``).
extension Qcow2Image {
    /// Changes the virtual size. Growing may move the L1 table. Shrinking is refused while
    /// anything is allocated past the new end, unless `droppingData` (qemu-img's
    /// `resize --shrink`): then the clusters past the end are discarded first.
    public func resize(to newSize: UInt64, droppingData: Bool = false) throws {
        if isReadOnly { throw StrataError.readOnly(path: path) }
        guard newSize % 512 == 0 else { throw StrataError.invalidOption(path: path, reason: "the new size must be a multiple of 512") }
        guard newSize <= Limits.maxVirtualSize else {
            throw StrataError.invalidOption(path: path, reason: "size \(newSize) is above the largest virtual size, \(Limits.maxVirtualSize) bytes")
        }
        try prepareFirstWrite()
        try quiesce {
            try guarded {
                let oldSize = size
                if newSize < oldSize {
                    if droppingData {
                        let start = alignUp(newSize, clusterSize)
                        if start < oldSize { try discard(at: start, length: oldSize - start) }
                        try flushNow()
                    }
                    try shrink(to: newSize)
                } else if newSize > oldSize {
                    try grow(to: newSize)
                    // The new area reads as zeroes, like QEMU's: bytes of the old last cluster past the
                    // old end may hold stale data, and a longer backing file must not show through
                    // (then, as QEMU does, the whole new area is marked zero).
                    var zeroEnd = min(alignUp(oldSize, clusterSize), newSize)
                    if let backing, backing.size > oldSize { zeroEnd = newSize }
                    if zeroEnd > oldSize { try writeZeroes(at: oldSize, length: zeroEnd - oldSize, mayUnmap: false, fua: false) }
                }
                try flushNow()
            }
        }
    }

    private func grow(to newSize: UInt64) throws {
        let needed = geometry.l1Entries(forSize: newSize)
        guard needed * 8 <= Limits.maxL1Bytes else {
            throw StrataError.invalidOption(path: path, reason: "size \(newSize) needs an L1 table above 32 MiB; use a larger cluster size")
        }
        try lock.withLock {
            let map = md.map
            let current = UInt64(map.l1.count)
            let roomInPlace = alignUp(current * 8, clusterSize) / 8
            if needed <= roomInPlace || needed <= current {
                map.l1 += [UInt64](repeating: 0, count: Int(max(needed, current) - current))
                md.header.l1Size = UInt32(map.l1.count)
                md.header.size = newSize
                map.l1Dirty = true
                md.file.headerDirty = true
                // The new entries must read as zero on disk before the header counts them.
                try storage.writeBytes(encodeTable(map.l1), at: md.header.l1TableOffset)
                return
            }
            // Move the L1 table to new contiguous clusters at the end of the file.
            let clusters = divUp(needed * 8, clusterSize)
            let host = try md.allocator.allocateContiguous(clusters)
            try md.overlap.checkTable(host, as: .l1Table)
            let oldOffset = md.header.l1TableOffset
            let oldClusters = divUp(current * 8, clusterSize)
            map.l1 += [UInt64](repeating: 0, count: Int(needed - current))
            let bytes = encodeTable(map.l1, size: Int(clusters * clusterSize))
            // The new table must be durable before the header points at it, its refcounts
            // before both: the table is written here, the flush then writes the refcounts,
            // syncs, writes the header, syncs, and releases the old table.
            md.header.l1TableOffset = host
            md.header.l1Size = UInt32(needed)
            md.header.size = newSize
            map.l1Dirty = true
            md.file.headerDirty = true
            md.overlap.claim(host, clusters: clusters, as: .l1Table)
            if oldClusters > 0 && oldOffset != 0 { md.refcounts.deferDecrement(oldOffset, count: oldClusters) }
            try storage.writeBytes(bytes, at: host)
        }
    }

    private func shrink(to newSize: UInt64) throws {
        try lock.withLock {
            let firstGone = divUp(newSize, clusterSize)
            let end = divUp(md.header.size, clusterSize)
            var toClear: [UInt64] = []
            var g = firstGone
            let perTable = geometry.l2Entries
            let map = md.map
            while g < end {
                // Unallocated L2 tables hold nothing to check: step over them whole.
                let i = Int(g / perTable)
                let k = map.nextAllocated(in: map.l1, from: i)
                if k > i { g = max(g, UInt64(k) * perTable); continue }
                let (raw, bitmap) = try map.entry(g)
                let e = L2Entry(raw: raw)
                if e.hostOffset != 0 || e.isCompressed {
                    throw StrataError.cannotShrink(path: path, size: newSize, reason: "guest offset \(g << clusterBits) is allocated")
                }
                if raw != 0 || bitmap != 0 { toClear.append(g) }
                g += 1
            }
            for g in toClear { try md.map.setEntry(g, raw: 0, bitmap: 0) }
            md.header.size = newSize
            md.file.headerDirty = true
        }
    }
}
