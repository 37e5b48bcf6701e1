/// The write pipeline: every write, write-zeroes and discard goes through ``perform(_:at:length:)``,
/// one ``WritePlan`` at a time: planned under the metadata lock, performed (data I/O)
/// without it, committed under it again.
extension Qcow2Image {
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
        if let compressors {
            try writeCompressing(buffer, at: offset, pool: compressors)
        } else if let dedup {
            try writeDeduplicating(buffer, at: offset, index: dedup)
        } else {
            try perform(.data(buffer), at: offset, length: UInt64(buffer.count))
        }
        if fua || cache == .writethrough { try flushNow() }
    }

    /// The write of ``write(_:at:fua:)`` when it changes no metadata and waits for no one:
    /// every byte overwrites data this image alone owns, whose L2 table is cached, in whole
    /// pages of the host file (so the kernel reads nothing first), and the metadata lock is
    /// free. Plain images in writeback (or unsafe) mode only: compression and dedup plan
    /// every write. Like any buffered write it can still be slowed by the page cache's
    /// writeback; it never waits for metadata I/O or for another request. Returns false,
    /// having written nothing, when any of that does not hold; true once written.
    public func writeInPlaceIfCached(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) -> Bool {
        guard let (host, token) = inPlace(buffer.count, at: offset) else { return false }
        defer { endIO(token) }
        // A failure is reported by the blocking write, which the caller makes next.
        return storage.writeIfCached(buffer, at: host)
    }

    /// The overwrite of ``writeInPlaceIfCached(_:at:)`` on a store that writes asynchronously
    /// (RBD): the write is started, its I/O token held until it ends in `io`.
    public func startWrite(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, io: AsyncIO) -> Bool {
        guard let (host, token) = inPlace(buffer.count, at: offset) else { return false }
        io.hold { self.endIO(token) }
        return storage.writeAsync(buffer, at: host, io: io)
    }

    /// Where an overwrite of `count` bytes at `offset` lands when it changes no metadata and
    /// waits for no one (see ``writeInPlaceIfCached(_:at:)``), with the I/O token taken; nil
    /// otherwise.
    private func inPlace(_ count: Int, at offset: UInt64) -> (host: UInt64, token: Int)? {
        let page: UInt64 = 4096
        guard compressors == nil, dedup == nil, cache == .writeback || cache == .unsafe, count > 0,
              offset % page == 0, UInt64(count) % page == 0, prepared.load(ordering: .acquiring),
              lock.tryLock() else { return nil }
        let run = markedCorrupt || md.map.cache.needsWriteback || md.refcounts.cache.needsWriteback ? nil
            : lookupWithoutWaiting(offset, UInt64(count), write: true) { try inPlaceRun(offset, limit: UInt64(count)) } ?? nil
        guard let (host, n) = run, n == UInt64(count), host % page == 0 else {
            lock.unlock()
            return nil
        }
        let token = beginIO()
        lock.unlock()
        return (host, token)
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, fua: Bool) throws {
        try perform(.zeroes(mayUnmap: mayUnmap), at: offset, length: length)
        if fua || cache == .writethrough { try flushNow() }
    }

    public func discard(at offset: UInt64, length: UInt64) throws {
        try perform(.discard, at: offset, length: length)
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

    /// Runs a write-like request as registered guest I/O, plan by plan.
    func perform(_ request: WriteRequest, at offset: UInt64, length: UInt64) throws {
        try asGuestWrite(at: offset, length: length) { try steps(request, at: offset, length: length) }
    }

    /// Runs `body` as one guest write of `[offset, offset+length)`: the image prepared for its
    /// first change, caches written back if full, the range checked, the I/O registered in
    /// the current epoch (see ``beginIO()``), corruption marked if `body` finds some.
    func asGuestWrite(at offset: UInt64, length: UInt64, _ body: () throws -> Void) throws {
        try guarded {
            try prepareFirstWrite()
            try writebackIfNeeded()
            lock.lock()
            do {
                if markedCorrupt { throw StrataError.imageIsCorruptBit(path: path) }
                try checkRange(offset, length, write: true)
            } catch { lock.unlock(); throw error }
            let token = beginIO()
            lock.unlock()
            defer { endIO(token) }
            try body()
        }
    }

    /// The plan/perform/commit loop over `[offset, offset+length)`.
    func steps(_ request: WriteRequest, at offset: UInt64, length: UInt64) throws {
        var pos: UInt64 = 0
        while pos < length {
            let guest = offset + pos
            let (plan, cachesFull) = try lock.withLock {
                let plan = try self.plan(request, guest: guest, remaining: length - pos)
                // A change of entries alone is committed in the same hold of the lock, so
                // nothing can change the entry between its plan and its commit.
                switch plan {
                case .zero(let change), .discard(let change): try commit(change)
                default: break
                }
                return (plan, md.map.cache.needsWriteback || md.refcounts.cache.needsWriteback)
            }
            pos += try execute(plan, request, dataOffset: Int(pos), guest: guest)
            // A long request (zeroing a whole disk over a backing file) must not hold more
            // dirty tables than the caches: they are written back as it goes.
            if cachesFull { try writeBackTables() }
        }
    }

    /// When more tables are dirty than the caches hold, writes them out (in crash-safe order)
    /// before taking on more.
    func writebackIfNeeded() throws {
        if lock.withLock({ md.map.cache.needsWriteback || md.refcounts.cache.needsWriteback }) { try flushNow() }
    }

    // MARK: Planning (lock held)

    /// The next step of `request` at `guest`, with `remaining` bytes left. Lock held; may wait
    /// (releasing it) for a cluster another request is writing.
    private func plan(_ request: WriteRequest, guest: UInt64, remaining: UInt64) throws -> WritePlan {
        switch request {
        case .data:
            if let (host, n) = try inPlaceRun(guest, limit: remaining) {
                if dedup != nil { beginInPlace(host, n) }
                return .inPlace(host: host, length: n)
            }
            let g = guest >> clusterBits
            if guest & (clusterSize - 1) == 0, remaining >= clusterSize,
               let run = try planFullClusters(g, count: remaining / clusterSize) {
                return .allocate(run)
            }
            return .copyOnWrite(try planCluster(g, data: (guest & (clusterSize - 1))..<min(clusterSize, (guest & (clusterSize - 1)) + remaining)))
        case .zeroes(let mayUnmap):
            if backing == nil && mayUnmap, let skip = unmappedTables(guest, remaining) { return .unchanged(length: skip) }
            let (g, range, whole) = piece(guest, remaining)
            guard let change = try planZero(g, range: range, whole: whole, mayUnmap: mayUnmap) else {
                return .zeroData(length: UInt64(range.count))
            }
            return change.map { .zero($0) } ?? .unchanged(length: UInt64(range.count))
        case .compressed(let bytes):
            return .compressed(try planCompressed(guest >> clusterBits, bytes: UInt64(bytes.count), length: remaining))
        case .discard, .unallocate:
            let toBacking = request.isUnallocate
            if backing == nil || md.header.version < 3 || toBacking, let skip = unmappedTables(guest, remaining) { return .unchanged(length: skip) }
            let (g, range, whole) = piece(guest, remaining)
            // Partial-cluster discards are ignored, like QEMU.
            guard whole, let change = try planDiscard(g, length: UInt64(range.count), toBacking: toBacking) else {
                return .unchanged(length: UInt64(range.count))
            }
            return .discard(change)
        }
    }

    /// The part of cluster `guest` falls in that a request of `remaining` bytes covers: (guest
    /// cluster, byte range in it, whether it is the whole cluster or the disk's partial last one).
    private func piece(_ guest: UInt64, _ remaining: UInt64) -> (UInt64, Range<UInt64>, Bool) {
        let g = guest >> clusterBits
        let cStart = g << clusterBits
        let cEnd = min(cStart + clusterSize, guest + remaining)
        let whole = guest == cStart && (cEnd == cStart + clusterSize || cEnd == md.header.size)
        return (g, (guest - cStart)..<(cEnd - cStart), whole)
    }

    /// At a cluster boundary inside an unallocated L2 table: the bytes up to the next
    /// allocated table (or the end of the request), which a zero write or discard leaves as
    /// they are. Nil elsewhere.
    private func unmappedTables(_ guest: UInt64, _ remaining: UInt64) -> UInt64? {
        guard guest & (clusterSize - 1) == 0 else { return nil }
        let map = md.map
        let i = Int(guest / geometry.l2Coverage)
        guard i >= map.l1.count || map.l1[i] & L1Entry.offsetMask == 0 else { return nil }
        let next = UInt64(map.nextAllocated(in: map.l1, from: i + 1)) * geometry.l2Coverage
        return min(remaining, next - guest)
    }

    /// Bytes from `guest` that can be written in place with no padding, and their host offset.
    private func inPlaceRun(_ guest: UInt64, limit: UInt64) throws -> (UInt64, UInt64)? {
        var length: UInt64 = 0
        var start: UInt64 = 0
        while length < limit {
            let gOff = guest + length
            let g = gOff >> clusterBits
            let inCluster = gOff & (clusterSize - 1)
            let n = min(clusterSize - inCluster, limit - length)
            guard let host = try inPlaceHost(g, inCluster..<(inCluster + n)) else { break }
            // A cluster a dedup writer is comparing is not written in place now (planCluster waits).
            if dedup != nil && dedupHolds[host >> clusterBits] != nil { break }
            if length == 0 { start = host + inCluster } else if host + inCluster != start + length { break }
            length += n
        }
        guard length > 0 else { return nil }
        try md.overlap.checkData(start, length)
        return (start, length)
    }

    /// The host cluster of `g` when `range` of it can be overwritten in place (see
    /// ``L2Entry/ownedHost``; the covered bytes must also already be data).
    private func inPlaceHost(_ g: UInt64, _ range: Range<UInt64>) throws -> UInt64? {
        let (raw, bitmap) = try md.map.entry(g)
        let e = L2Entry(raw: raw)
        guard let host = e.ownedHost else { return nil }
        if geometry.extendedL2 {
            let sc = geometry.subclusterSize
            let mask = subclusterMask(Int(range.lowerBound / sc), Int((range.upperBound - 1) / sc))
            guard SubclusterBitmap(raw: bitmap).allocated & mask == mask else { return nil }
        } else if raw & L2Entry.zeroFlag != 0 {
            return nil
        }
        try md.file.checkHost(host, "L2 entry for guest offset \(g << clusterBits)")
        return host
    }

    /// Plans a run of whole clusters starting at `g` that all need fresh host clusters
    /// (not owned by this image: unallocated, zero, compressed or shared), marks them busy and
    /// allocates their host clusters contiguously. Nil when `g` itself does not qualify.
    private func planFullClusters(_ g: UInt64, count: UInt64) throws -> ClusterRun? {
        while busy.contains(g) { lock.wait() }
        let perTable = geometry.l2Entries
        let table = try md.map.writableTable(Int(g / perTable))
        let first = Int(g % perTable)
        var clusters: [UInt64] = []
        var old: [UInt64] = []
        while UInt64(clusters.count) < count {
            let gc = g + UInt64(clusters.count)
            let j = first + clusters.count
            guard j < Int(perTable), !busy.contains(gc) else { break }  // a batch stays in one L2 table
            let raw = ClusterMap.read(table, j, extended: geometry.extendedL2).raw
            if L2Entry(raw: raw).ownedHost != nil { break }  // written in place instead
            clusters.append(gc)
            old.append(raw)
        }
        guard !clusters.isEmpty else { return nil }
        let (host, n) = try md.allocator.allocate(UInt64(clusters.count))
        clusters.removeLast(clusters.count - Int(n))
        old.removeLast(old.count - Int(n))
        for gc in clusters { busy.insert(gc) }
        md.map.cache.pin(table)
        return ClusterRun(table: table, firstIndex: first, clusters: clusters, old: old, host: host)
    }

    /// Plans a write of `data` (byte range inside cluster `g`): chooses the host cluster and
    /// the padding, and marks the cluster busy.
    private func planCluster(_ g: UInt64, data: Range<UInt64>) throws -> ClusterWrite {
        while try busy.contains(g) || ownedHostIsHeld(g) { lock.wait() }
        let perTable = geometry.l2Entries
        let table = try md.map.writableTable(Int(g / perTable))
        let j = Int(g % perTable)
        let (raw, bitmap) = ClusterMap.read(table, j, extended: geometry.extendedL2)
        let e = L2Entry(raw: raw)
        if e.hasReservedBits(extended: geometry.extendedL2) {
            throw md.file.corrupt(.reservedBits, at: table.offset + UInt64(j) * geometry.l2EntryBytes,
                                  "L2 entry for guest offset \(g << clusterBits) has reserved bits set")
        }
        let ext = geometry.extendedL2
        let sc = geometry.subclusterSize
        let owned = e.ownedHost
        var region: Range<UInt64>
        if ext {
            let first = data.lowerBound / sc * sc
            let last = alignUp(data.upperBound, sc)
            if owned != nil {
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
            // A zero cluster that keeps its host cluster is reused, zero-filled around the data.
            region = owned != nil && raw & L2Entry.zeroFlag == 0 ? data : 0..<clusterSize
        }
        let host: UInt64
        if let owned {
            try md.file.checkHost(owned, "L2 entry for guest offset \(g << clusterBits)")
            try md.overlap.checkData(owned, clusterSize)
            host = owned
        } else {
            host = try md.allocator.allocate(1).host
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
        busy.insert(g)
        if owned != nil && dedup != nil { beginInPlace(host, clusterSize) }
        md.map.cache.pin(table)
        return ClusterWrite(table: table, index: j, guestCluster: g, host: host, region: region, reuse: owned != nil,
                            padding: padding, oldRaw: raw, oldBitmap: bitmap)
    }

    /// How a cluster (or whole subclusters of it) comes to read as zero through its L2
    /// entry: the change (nil inside when it already does), or nil when the bytes must be
    /// written as zero data instead.
    private func planZero(_ g: UInt64, range: Range<UInt64>, whole: Bool, mayUnmap: Bool) throws -> EntryChange?? {
        let v3 = md.header.version >= 3
        let ext = geometry.extendedL2
        let sc = geometry.subclusterSize
        let length = UInt64(range.count)
        if !whole && !(ext && (range.lowerBound % sc == 0) && (range.upperBound % sc == 0 || (g << clusterBits) + range.upperBound == md.header.size)) {
            return nil
        }
        while busy.contains(g) { lock.wait() }
        let (raw, bitmap) = try md.map.entry(g)
        let e = L2Entry(raw: raw)
        let keepHost = !mayUnmap && e.ownedHost != nil
        func change(_ newRaw: UInt64, _ newBitmap: UInt64, releasing: Bool) -> EntryChange?? {
            if newRaw == raw && newBitmap == bitmap { return .some(nil) }
            return EntryChange(guestCluster: g, raw: newRaw, bitmap: newBitmap, released: releasing ? raw : 0, length: length)
        }
        if !v3 {
            guard backing == nil, whole else { return nil }
            return change(0, 0, releasing: true)
        }
        if ext {
            let mask = whole ? UInt32.max : subclusterMask(Int(range.lowerBound / sc), Int((alignUp(range.upperBound, sc) - 1) / sc))
            let old = SubclusterBitmap(raw: bitmap)
            if e.isCompressed || (!e.isCopied && e.hostOffset != 0) {
                guard whole else { return nil }  // shared/compressed: only whole clusters
            }
            if whole && !keepHost { return change(0, SubclusterBitmap.allZero.raw, releasing: true) }
            return change(raw, SubclusterBitmap(allocated: old.allocated & ~mask, zero: old.zero | mask).raw, releasing: false)
        }
        // Standard entries.
        if raw == 0 && backing == nil && mayUnmap { return .some(nil) }  // already reads as zero
        return change(keepHost ? (e.hostOffset | L2Entry.copied | L2Entry.zeroFlag) : L2Entry.zeroFlag, 0, releasing: !keepHost)
    }

    /// How a whole cluster is freed: unallocated, or a zero cluster over a backing file (v3),
    /// so the range reads as zeroes; with `toBacking`, always unallocated (it reads from the
    /// backing file again). Nil when it already is.
    private func planDiscard(_ g: UInt64, length: UInt64, toBacking: Bool) throws -> EntryChange? {
        while busy.contains(g) { lock.wait() }
        let (raw, bitmap) = try md.map.entry(g)
        var newRaw: UInt64 = 0
        var newBitmap: UInt64 = 0
        if backing != nil && md.header.version >= 3 && !toBacking {
            if geometry.extendedL2 { newBitmap = SubclusterBitmap.allZero.raw } else { newRaw = L2Entry.zeroFlag }
        }
        if raw == newRaw && bitmap == newBitmap { return nil }
        return EntryChange(guestCluster: g, raw: newRaw, bitmap: newBitmap, released: raw, length: length)
    }

    // MARK: Performing and committing

    /// Performs one plan and returns how many bytes of the request it covered.
    private func execute(_ plan: WritePlan, _ request: WriteRequest, dataOffset pos: Int, guest: UInt64) throws -> UInt64 {
        func data(_ count: Int) -> UnsafeRawBufferPointer {
            guard case .data(let buffer) = request else { preconditionFailure("data plan for a request without data") }
            return UnsafeRawBufferPointer(rebasing: buffer[pos..<pos + count])
        }
        switch plan {
        case .inPlace(let host, let n):
            defer { if dedup != nil { lock.withLock { endInPlace(host, n) } } }
            try storage.write(data(Int(n)), at: host)
            return n

        case .allocate(let run):
            let n = run.clusters.count * Int(clusterSize)
            do {
                try storage.write(data(n), at: run.host)
            } catch {
                lock.withLock { abandon(run.clusters, table: run.table, host: run.host) }
                throw error
            }
            lock.withLock {
                defer { finish(run.clusters, table: run.table) }
                for (k, _) in run.clusters.enumerated() {
                    let host = run.host + UInt64(k) * clusterSize
                    commit(run.table, run.firstIndex + k, host: host, region: 0..<clusterSize, reuse: false,
                           oldRaw: run.old[k], oldBitmap: 0)
                }
            }
            return UInt64(n)

        case .copyOnWrite(let cw):
            let inCluster = guest & (clusterSize - 1)
            guard case .data(let buffer) = request else { preconditionFailure("copy-on-write plan for a request without data") }
            let bytes = UnsafeRawBufferPointer(rebasing: buffer[pos..<min(buffer.count, pos + Int(clusterSize - inCluster))])
            do {
                try performCluster(cw, data: bytes, dataStart: inCluster)
            } catch {
                lock.withLock {
                    if cw.reuse && dedup != nil { endInPlace(cw.host, clusterSize) }
                    abandon([cw.guestCluster], table: cw.table, host: cw.reuse ? 0 : cw.host)
                }
                throw error
            }
            lock.withLock {
                if cw.reuse && dedup != nil { endInPlace(cw.host, clusterSize) }
                defer { finish([cw.guestCluster], table: cw.table) }
                commit(cw.table, cw.index, host: cw.host, region: cw.region, reuse: cw.reuse, oldRaw: cw.oldRaw, oldBitmap: cw.oldBitmap)
            }
            return UInt64(bytes.count)

        case .compressed(let cw):
            guard case .compressed(let bytes) = request else { preconditionFailure("compressed plan for another request") }
            try executeCompressed(cw, bytes: bytes)
            return cw.length

        case .zero(let change), .discard(let change):
            return change.length

        case .unchanged(let n):
            return n

        case .zeroData(let n):
            let zeroes = ZeroBuffer.shared
            var done: UInt64 = 0
            while done < n {
                let chunk = Int(min(UInt64(zeroes.count), n - done))
                try steps(.data(UnsafeRawBufferPointer(rebasing: zeroes.pointer[0..<chunk])), at: guest + done, length: UInt64(chunk))
                done += UInt64(chunk)
            }
            return n
        }
    }

    /// Writes a planned cluster: padding read from its sources, the caller's data, one pwrite.
    private func performCluster(_ plan: ClusterWrite, data: UnsafeRawBufferPointer, dataStart: UInt64) throws {
        if plan.padding.isEmpty {
            try storage.write(data, at: plan.host + dataStart)
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
        try storage.write(UnsafeRawBufferPointer(tmp), at: plan.host + plan.region.lowerBound)
    }

    /// Points entry `j` of `table` at its new data and drops the old reference. Lock held.
    private func commit(_ table: Table, _ j: Int, host: UInt64, region: Range<UInt64>, reuse: Bool,
                        oldRaw: UInt64, oldBitmap: UInt64) {
        var bitmap: UInt64 = 0
        if geometry.extendedL2 {
            let sc = geometry.subclusterSize
            let full = region == 0..<clusterSize
            let mask = full ? UInt32.max : subclusterMask(Int(region.lowerBound / sc), Int((region.upperBound - 1) / sc))
            let old = SubclusterBitmap(raw: oldBitmap)
            let oldHasHost = L2Entry(raw: oldRaw).hostOffset != 0 && !L2Entry(raw: oldRaw).isCompressed
            let alloc = (reuse ? old.allocated : 0) | mask
            let zero = (reuse || !oldHasHost ? old.zero : 0) & ~mask
            bitmap = SubclusterBitmap(allocated: alloc, zero: zero).raw
        }
        md.map.set(table, j, raw: host | L2Entry.copied, bitmap: bitmap)
        if !reuse { md.map.release(raw: oldRaw) }
    }

    /// Applies a change of one entry (zero, discard): the new entry, and the old one's
    /// reference dropped (deferred until the change is durable). Lock held.
    private func commit(_ change: EntryChange) throws {
        try md.map.setEntry(change.guestCluster, raw: change.raw, bitmap: change.bitmap)
        if change.released != 0 { md.map.release(raw: change.released) }
    }

    /// Ends a plan: its clusters are no longer busy and its table may be evicted. Lock held.
    func finish(_ clusters: [UInt64], table: Table) {
        for g in clusters { busy.remove(g) }
        md.map.cache.unpin(table)
        lock.broadcast()
    }

    /// Gives back what a write that failed before its commit took: fresh host clusters
    /// (decremented once the next flush is durable), the busy marks, the pin. Lock held.
    private func abandon(_ clusters: [UInt64], table: Table, host: UInt64) {
        if host != 0 { md.refcounts.deferDecrement(host, count: UInt64(clusters.count)) }
        finish(clusters, table: table)
    }
}

extension L2Entry {
    /// The host cluster when this image alone owns it (COPIED, not compressed, allocated):
    /// the one test of "ours, writable in place". Zero clusters that keep a preallocated
    /// host cluster count too (their writes fill the rest with zeroes).
    @inline(__always)
    var ownedHost: UInt64? {
        guard !isCompressed, isCopied, hostOffset != 0 else { return nil }
        return hostOffset
    }
}
