/// A planned write into one guest cluster: where it goes and which bytes must be filled in
/// around the caller's data (copy-on-write padding).
struct ClusterWrite {
    var guestCluster: UInt64
    /// Host cluster the data goes to.
    var host: UInt64
    /// Byte range inside the cluster that is written to `host` (caller's data plus padding).
    var region: Range<UInt64>
    /// Whether `host` is the cluster's existing, unshared host cluster.
    var reuse: Bool
    /// Where padding bytes come from: (range in cluster, source) in order.
    var padding: [(Range<UInt64>, Source)]
    var oldRaw: UInt64
    var oldBitmap: UInt64
}

extension Qcow2Image {
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
        try writebackIfNeeded()
        try withIO(offset, UInt64(buffer.count), write: true) {
            var pos = 0
            while pos < buffer.count {
                pos += try writeStep(buffer, pos: pos, guest: offset + UInt64(pos))
            }
        }
        if fua || cache == .writethrough { try flushNow() }
    }

    /// Runs `body` as registered guest I/O after checking the range.
    func withIO(_ offset: UInt64, _ length: UInt64, write: Bool, _ body: () throws -> Void) throws {
        lock.lock()
        do { try checkRange(offset, length, write: write) } catch { lock.unlock(); throw error }
        let token = beginIO()
        lock.unlock()
        defer { endIO(token) }
        try body()
    }

    /// When more tables are dirty than the caches hold, writes them out (in crash-safe order)
    /// before taking on more.
    func writebackIfNeeded() throws {
        if lock.withLock({ md.l2Cache.needsWriteback || md.refCache.needsWriteback }) { try flushNow() }
    }

    /// Writes as much as possible from `buffer[pos...]` at `guest` and returns the byte count.
    private func writeStep(_ buffer: UnsafeRawBufferPointer, pos: Int, guest: UInt64) throws -> Int {
        let remaining = UInt64(buffer.count - pos)
        lock.lock()
        // Fast path: overwrite data that is already ours, with no padding.
        let inPlace: (UInt64, UInt64)?
        do { inPlace = try inPlaceRun(guest, limit: remaining) } catch { lock.unlock(); throw error }
        if let (host, n) = inPlace {
            lock.unlock()
            try wrapIO { try storage.write(UnsafeRawBufferPointer(rebasing: buffer[pos..<pos + Int(n)]), at: host) }
            return Int(n)
        }
        // Full clusters that need a new host cluster: allocate a contiguous run at once.
        let g = guest >> clusterBits
        let inCluster = guest & (clusterSize - 1)
        if inCluster == 0, remaining >= clusterSize {
            let batch: (host: UInt64, clusters: [UInt64], old: [UInt64])?
            do { batch = try planFullClusters(g, count: remaining / clusterSize) } catch { lock.unlock(); throw error }
            if let batch {
                lock.unlock()
                let n = batch.clusters.count * Int(clusterSize)
                do {
                    try md.checkOverlap(batch.host, UInt64(n))
                    try wrapIO { try storage.write(UnsafeRawBufferPointer(rebasing: buffer[pos..<pos + n]), at: batch.host) }
                } catch {
                    lock.withLock { abandon(batch.clusters, host: batch.host, count: UInt64(batch.clusters.count)) }
                    throw error
                }
                try lock.withLock {
                    defer { unbusy(batch.clusters) }
                    for (k, gc) in batch.clusters.enumerated() {
                        try commit(gc, host: batch.host + UInt64(k) * clusterSize, fullCluster: true,
                                   region: 0..<clusterSize, reuse: false, oldRaw: batch.old[k], oldBitmap: 0)
                    }
                }
                return n
            }
        }
        // One cluster, with copy-on-write padding.
        let end = min(clusterSize, inCluster + remaining)
        let plan: ClusterWrite
        do { plan = try planCluster(g, data: inCluster..<end) } catch { lock.unlock(); throw error }
        lock.unlock()
        do {
            try performCluster(plan, data: UnsafeRawBufferPointer(rebasing: buffer[pos..<pos + Int(end - inCluster)]), dataStart: inCluster)
        } catch {
            lock.withLock { abandon([g], host: plan.reuse ? 0 : plan.host, count: 1) }
            throw error
        }
        try lock.withLock {
            defer { unbusy([g]) }
            try commit(g, host: plan.host, fullCluster: plan.region == 0..<clusterSize, region: plan.region,
                       reuse: plan.reuse, oldRaw: plan.oldRaw, oldBitmap: plan.oldBitmap)
        }
        return Int(end - inCluster)
    }

    /// Bytes from `guest` that can be written in place with no padding, and their host offset.
    /// Lock held.
    private func inPlaceRun(_ guest: UInt64, limit: UInt64) throws -> (UInt64, UInt64)? {
        var length: UInt64 = 0
        var start: UInt64 = 0
        while length < limit {
            let gOff = guest + length
            let g = gOff >> clusterBits
            let inCluster = gOff & (clusterSize - 1)
            let n = min(clusterSize - inCluster, limit - length)
            guard let host = try inPlaceHost(g, inCluster..<(inCluster + n)) else { break }
            if length == 0 { start = host + inCluster } else if host + inCluster != start + length { break }
            length += n
        }
        return length == 0 ? nil : (start, length)
    }

    /// The host cluster of `g` when `range` can be overwritten in place. Lock held.
    private func inPlaceHost(_ g: UInt64, _ range: Range<UInt64>) throws -> UInt64? {
        let (raw, bitmap) = try md.entry(g)
        let e = L2Entry(raw: raw)
        guard !e.isCompressed, e.isCopied, e.hostOffset != 0, !e.hasReservedBits(extended: geometry.extendedL2) else { return nil }
        if geometry.extendedL2 {
            let sc = geometry.subclusterSize
            let mask = subclusterMask(Int(range.lowerBound / sc), Int((range.upperBound - 1) / sc))
            guard SubclusterBitmap(raw: bitmap).allocated & mask == mask else { return nil }
        } else if raw & L2Entry.zeroFlag != 0 {
            return nil
        }
        try md.checkHost(e.hostOffset, "L2 entry for guest offset \(g << clusterBits)")
        return e.hostOffset
    }

    /// Plans a run of whole clusters starting at `g` that all need fresh host clusters
    /// (unallocated, zero, compressed or shared), marks them busy and allocates their host
    /// clusters contiguously. Nil when `g` itself does not qualify. Lock held.
    private func planFullClusters(_ g: UInt64, count: UInt64) throws -> (host: UInt64, clusters: [UInt64], old: [UInt64])? {
        var clusters: [UInt64] = []
        var old: [UInt64] = []
        let perTable = geometry.l2Entries
        while UInt64(clusters.count) < count {
            let gc = g + UInt64(clusters.count)
            if md.busy.contains(gc) { break }
            if gc / perTable != g / perTable { break }  // keep a batch inside one L2 table
            let (raw, _) = try md.entry(gc)
            let e = L2Entry(raw: raw)
            if !e.isCompressed && e.isCopied && e.hostOffset != 0 { break }  // in place is better
            if geometry.extendedL2 && !e.isCompressed && e.hostOffset != 0 { break }
            clusters.append(gc)
            old.append(raw)
        }
        guard !clusters.isEmpty else {
            if md.busy.contains(g) { return try waitBusy(g) { try planFullClusters(g, count: count) } }
            return nil
        }
        let (host, n) = try md.allocate(UInt64(clusters.count))
        clusters.removeLast(clusters.count - Int(n))
        old.removeLast(old.count - Int(n))
        for gc in clusters { md.busy.insert(gc) }
        return (host, clusters, old)
    }

    /// Waits until `g` is no longer busy, then retries. Lock held.
    private func waitBusy<T>(_ g: UInt64, _ retry: () throws -> T) rethrows -> T {
        while md.busy.contains(g) { lock.wait() }
        return try retry()
    }

    /// Plans a write of `data` (byte range inside cluster `g`): chooses the host cluster and
    /// the padding, and marks the cluster busy. Lock held.
    func planCluster(_ g: UInt64, data: Range<UInt64>) throws -> ClusterWrite {
        while md.busy.contains(g) { lock.wait() }
        let (raw, bitmap) = try md.entry(g)
        let e = L2Entry(raw: raw)
        if e.hasReservedBits(extended: geometry.extendedL2) {
            throw md.corrupt("L2 entry for guest offset \(g << clusterBits) has reserved bits set")
        }
        let ext = geometry.extendedL2
        let sc = geometry.subclusterSize
        let reuse = !e.isCompressed && e.isCopied && e.hostOffset != 0 && (ext || raw & L2Entry.zeroFlag == 0)
        var region: Range<UInt64>
        if ext {
            let first = data.lowerBound / sc * sc
            let last = alignUp(data.upperBound, sc)
            if reuse {
                // Pad only edge subclusters that are not allocated.
                let alloc = SubclusterBitmap(raw: bitmap).allocated
                let lo = alloc & (1 << UInt32(first / sc)) != 0 ? data.lowerBound : first
                let hi = alloc & (1 << UInt32((last - 1) / sc)) != 0 ? data.upperBound : last
                region = lo..<hi
            } else if e.hostOffset != 0 || e.isCompressed {
                region = 0..<clusterSize  // shared or compressed: copy the whole cluster
            } else {
                region = first..<last
            }
        } else {
            region = reuse ? data : 0..<clusterSize
        }
        // The last cluster of a disk whose size is not cluster aligned: don't pad past the end.
        let host: UInt64
        if reuse {
            try md.checkHost(e.hostOffset, "L2 entry for guest offset \(g << clusterBits)")
            host = e.hostOffset
        } else {
            host = try md.allocate(1).host
        }
        var padding: [(Range<UInt64>, Source)] = []
        let base = g << clusterBits
        for piece in [region.lowerBound..<data.lowerBound, data.upperBound..<region.upperBound] where !piece.isEmpty {
            var p = piece.lowerBound
            while p < piece.upperBound {
                let (src, n) = try run(base + p, limit: piece.upperBound - p)
                padding.append((p..<(p + n), src))
                p += n
            }
        }
        md.busy.insert(g)
        return ClusterWrite(guestCluster: g, host: host, region: region, reuse: reuse, padding: padding,
                            oldRaw: raw, oldBitmap: bitmap)
    }

    /// Writes a planned cluster: padding read from its sources, the caller's data, one pwrite.
    func performCluster(_ plan: ClusterWrite, data: UnsafeRawBufferPointer, dataStart: UInt64) throws {
        try md.checkOverlap(plan.host, clusterSize)
        if plan.padding.isEmpty {
            try wrapIO { try storage.write(data, at: plan.host + dataStart) }
            return
        }
        let len = Int(plan.region.count)
        let tmp = UnsafeMutableRawBufferPointer.allocate(byteCount: len, alignment: 4096)
        defer { tmp.deallocate() }
        let base = plan.guestCluster << clusterBits
        for (range, source) in plan.padding {
            let s = Int(range.lowerBound - plan.region.lowerBound)
            try readSource(source, guest: base + range.lowerBound,
                           into: UnsafeMutableRawBufferPointer(rebasing: tmp[s..<s + range.count]))
        }
        let d = Int(dataStart - plan.region.lowerBound)
        UnsafeMutableRawBufferPointer(rebasing: tmp[d..<d + data.count]).copyMemory(from: data)
        try wrapIO { try storage.write(UnsafeRawBufferPointer(tmp), at: plan.host + plan.region.lowerBound) }
    }

    /// Points guest cluster `g` at its new data and drops the old reference. Lock held.
    func commit(_ g: UInt64, host: UInt64, fullCluster: Bool, region: Range<UInt64>, reuse: Bool,
                oldRaw: UInt64, oldBitmap: UInt64) throws {
        let raw = host | L2Entry.copied
        var bitmap: UInt64 = 0
        if geometry.extendedL2 {
            let sc = geometry.subclusterSize
            let mask = fullCluster ? UInt32.max : subclusterMask(Int(region.lowerBound / sc), Int((region.upperBound - 1) / sc))
            let old = SubclusterBitmap(raw: oldBitmap)
            let oldHasHost = L2Entry(raw: oldRaw).hostOffset != 0 && !L2Entry(raw: oldRaw).isCompressed
            let alloc = (reuse ? old.allocated : 0) | mask
            let zero = (reuse || !oldHasHost ? old.zero : 0) & ~mask
            bitmap = SubclusterBitmap(allocated: alloc, zero: zero).raw
        }
        try md.setEntry(g, raw: raw, bitmap: bitmap)
        if !reuse { md.release(raw: oldRaw) }
    }

    func unbusy(_ clusters: [UInt64]) {
        for g in clusters { md.busy.remove(g) }
        lock.broadcast()
    }

    /// Gives back clusters of a write that failed before it was committed. Lock held.
    func abandon(_ clusters: [UInt64], host: UInt64, count: UInt64) {
        if host != 0 { md.deferFree(host, count: count) }
        unbusy(clusters)
    }

    // MARK: Zeroes and discard

    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, fua: Bool) throws {
        try writebackIfNeeded()
        try withIO(offset, length, write: true) {
            try forEachPiece(offset, length, skipUnmapped: backing == nil && mayUnmap && !geometry.extendedL2) { g, range, whole in
                if try zeroCluster(g, range: range, whole: whole, mayUnmap: mayUnmap) { return }
                try writeZeroBytes(at: (g << clusterBits) + range.lowerBound, length: UInt64(range.count))
            }
        }
        if fua || cache == .writethrough { try flushNow() }
    }

    public func discard(at offset: UInt64, length: UInt64) throws {
        try writebackIfNeeded()
        let v2 = lock.withLock { md.header.version < 3 }
        try withIO(offset, length, write: true) {
            try forEachPiece(offset, length, skipUnmapped: backing == nil || v2) { g, _, whole in
                guard whole else { return }  // partial-cluster discards are ignored, like QEMU
                try lock.withLock {
                    while md.busy.contains(g) { lock.wait() }
                    let (raw, bitmap) = try md.entry(g)
                    let hasBacking = backing != nil
                    let v3 = md.header.version >= 3
                    var newRaw: UInt64 = 0
                    var newBitmap: UInt64 = 0
                    if hasBacking && v3 {
                        if geometry.extendedL2 { newBitmap = SubclusterBitmap.allZero.raw } else { newRaw = L2Entry.zeroFlag }
                    }
                    if raw == newRaw && bitmap == newBitmap { return }
                    try md.setEntry(g, raw: newRaw, bitmap: newBitmap)
                    md.release(raw: raw)
                }
            }
        }
        if cache == .writethrough { try flushNow() }
    }

    /// Zeroing is metadata-only on v3 images for whole clusters (whole subclusters with
    /// extended L2), the disk's partial last cluster included.
    public func zeroingIsCheap(at offset: UInt64, length: UInt64) -> Bool {
        let (v3, size) = lock.withLock { (md.header.version >= 3, md.header.size) }
        let unit = geometry.subclusterSize
        let end = offset + length
        return v3 && !isReadOnly && offset % unit == 0 && (end % unit == 0 || end == size)
    }

    /// Calls `body` for each cluster piece of a range: (guest cluster, byte range in it,
    /// whether it covers the whole cluster or the disk's partial last cluster).
    /// With `skipUnmapped`, whole L2 tables that are not allocated are stepped over (for
    /// operations that leave unallocated clusters as they are: a discard or unmapping zero
    /// write without a backing file, so discarding a whole disk takes one step per L2 table).
    func forEachPiece(_ offset: UInt64, _ length: UInt64, skipUnmapped: Bool = false,
                      _ body: (UInt64, Range<UInt64>, Bool) throws -> Void) throws {
        let size = lock.withLock { md.header.size }
        var pos = offset
        let end = offset + length
        let coverage = geometry.l2Coverage
        while pos < end {
            if skipUnmapped, pos % clusterSize == 0 {
                let i = Int(pos / coverage)
                let unmapped = lock.withLock { i >= md.l1.count || L1Entry(raw: md.l1[i]).l2Offset == 0 }
                let next = (pos / coverage + 1) * coverage
                if unmapped && next <= end {
                    pos = next
                    continue
                }
            }
            let g = pos >> clusterBits
            let cStart = g << clusterBits
            let cEnd = min(cStart + clusterSize, end)
            let whole = pos == cStart && (cEnd == cStart + clusterSize || cEnd == size)
            try body(g, (pos - cStart)..<(cEnd - cStart), whole)
            pos = cEnd
        }
    }

    /// Makes a cluster (or whole subclusters of it) read as zero through its L2 entry.
    /// Returns false when the bytes must be written as zero data instead.
    private func zeroCluster(_ g: UInt64, range: Range<UInt64>, whole: Bool, mayUnmap: Bool) throws -> Bool {
        let v3 = lock.withLock { md.header.version >= 3 }
        let ext = geometry.extendedL2
        let sc = geometry.subclusterSize
        if !whole && !(ext && (range.lowerBound % sc == 0) && (range.upperBound % sc == 0 || (g << clusterBits) + range.upperBound == size)) {
            return false
        }
        return try lock.withLock {
            while md.busy.contains(g) { lock.wait() }
            let (raw, bitmap) = try md.entry(g)
            let e = L2Entry(raw: raw)
            let keepHost = !mayUnmap && !e.isCompressed && e.isCopied && e.hostOffset != 0
            if !v3 {
                guard backing == nil, whole else { return false }
                if raw == 0 { return true }
                try md.setEntry(g, raw: 0, bitmap: 0)
                md.release(raw: raw)
                return true
            }
            if ext {
                let mask = whole ? UInt32.max : subclusterMask(Int(range.lowerBound / sc), Int((alignUp(range.upperBound, sc) - 1) / sc))
                let old = SubclusterBitmap(raw: bitmap)
                if e.isCompressed || (!e.isCopied && e.hostOffset != 0) {
                    guard whole else { return false }  // shared/compressed: only whole clusters
                }
                if whole && !keepHost {
                    if raw == 0 && old == .allZero { return true }
                    try md.setEntry(g, raw: 0, bitmap: SubclusterBitmap.allZero.raw)
                    md.release(raw: raw)
                    return true
                }
                let newBitmap = SubclusterBitmap(allocated: old.allocated & ~mask, zero: old.zero | mask)
                if newBitmap == old { return true }
                try md.setEntry(g, raw: raw, bitmap: newBitmap.raw)
                return true
            }
            // Standard entries.
            if raw == 0 && backing == nil && mayUnmap { return true }  // already reads as zero
            let newRaw = keepHost ? (e.hostOffset | L2Entry.copied | L2Entry.zeroFlag) : L2Entry.zeroFlag
            if newRaw == raw { return true }
            try md.setEntry(g, raw: newRaw, bitmap: 0)
            if !keepHost { md.release(raw: raw) }
            return true
        }
    }

    private func writeZeroBytes(at guest: UInt64, length: UInt64) throws {
        var done: UInt64 = 0
        let zeroes = ZeroBuffer.shared
        while done < length {
            let n = Int(min(UInt64(zeroes.count), length - done))
            let chunk = UnsafeRawBufferPointer(rebasing: zeroes.pointer[0..<n])
            var pos = 0
            while pos < n { pos += try writeStep(chunk, pos: pos, guest: guest + done + UInt64(pos)) }
            done += UInt64(n)
        }
    }
}
