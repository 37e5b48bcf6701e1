import Synchronization
#if canImport(Glibc)
import Glibc
#endif

extension Qcow2Image {
    /// The dedup index of an image being opened, and what its index file says. `keep`: this
    /// open writes with inline dedup (it loads the file when the image's autoclear bit
    /// trusts it, and keeps it up to date); otherwise only the file's header is read, for
    /// `strata info`. Only a file beside a regular image file, for a version 3 image whose
    /// Strata extension names an index id. Problems with the file never fail the open.
    static func openDedupIndex(storage: any BlockStorage, path: String, header: Qcow2Header, extensions ext: HeaderExtensions,
                               fileLength: UInt64, keep: Bool) -> (DedupIndex?, DedupIndexState) {
        let capacity = Limits.maxDedupIndexEntries
        guard let id = ext.strata?.indexID, header.version >= 3, storage is FileStorage else {
            return (keep ? DedupIndex(capacity: capacity) : nil, .none)
        }
        let trusted = header.autoclearFeatures.contains(.dedupIndex)
        let notTrusted = "the image was written by a program that does not keep the index (QEMU, or Strata without dedup)"
        let sidecar = DedupIndexFile.path(forImage: path)
        guard keep else {
            guard trusted else { return (nil, .stale(reason: notTrusted)) }
            guard let file = try? FileStorage(path: sidecar, mode: .readOnly) else {
                return (nil, .stale(reason: "\(sidecar) is missing"))
            }
            defer { file.close() }
            switch try? DedupIndexFile.readHeader(file) {
            case .success(let h)?:
                guard h.id == id, h.clusterBits == header.clusterBits else { return (nil, .stale(reason: "\(sidecar) belongs to another image")) }
                return (nil, .valid(records: h.records, complete: h.complete))
            case .failure(.unusable(let why))?: return (nil, .stale(reason: "\(sidecar): \(why)"))
            case nil: return (nil, .stale(reason: "\(sidecar) cannot be read"))
            }
        }
        guard let file = try? DedupIndexFile.open(imagePath: path, id: id, clusterBits: header.clusterBits) else {
            return (DedupIndex(capacity: capacity), .stale(reason: "\(sidecar) cannot be opened for writing"))
        }
        guard trusted else { return (DedupIndex(capacity: capacity, file: file), .stale(reason: notTrusted)) }
        let hostClusters = fileLength >> UInt64(header.clusterBits)
        let guestClusters = (header.size + header.clusterSize - 1) >> UInt64(header.clusterBits)
        switch (try? file.load(capacity: capacity, hostClusters: hostClusters, guestClusters: guestClusters)) {
        case .success(let entries)?:
            return (DedupIndex(capacity: capacity, file: file, loaded: entries), .valid(records: file.records, complete: file.complete))
        case .failure(.unusable(let why))?:
            return (DedupIndex(capacity: capacity, file: file), .stale(reason: "\(sidecar): \(why)"))
        case nil:
            return (DedupIndex(capacity: capacity, file: file), .stale(reason: "\(sidecar) cannot be read"))
        }
    }
}

/// Inline dedup (`-o dedup=on`, `serve --dedup`): each aligned whole cluster of a guest write
/// that is all zeroes becomes a zero entry (the write-zeroes path); one whose content the
/// image already stores is mapped to that host cluster (its refcount raised, COPIED cleared
/// on both entries); the rest is written as usual and indexed once its entry is committed.
/// The image stays ordinary qcow2: a later write into a shared cluster copies it on write, in
/// Strata and in QEMU. Crash order is the write path's: the new reference is counted before
/// any table points at it, the old one dropped only after the tables are durable.
///
/// ## Why a wrong share cannot happen
/// The hash only finds a candidate host cluster C; the share is made only if C's bytes equal
/// the new cluster's bytes *and* nothing can have changed C between that comparison and the
/// share. The only ways C's bytes change while C stays referenced are in-place writes (an
/// entry that owns C, COPIED, planned before the share clears COPIED); the only other way is
/// C being freed and reused. So:
/// 1. Under the metadata lock, C is checked (the indexed guest entry still maps C as data,
///    refcount > 0, no decrement pending) and must have no in-place write in flight
///    (``Qcow2Image/busyHosts``, filled when an in-place plan is made, emptied when its data
///    write is done). C is then *held* (``Qcow2Image/dedupHolds``): while held, in-place
///    planners skip or wait for it, so no in-place write into C starts.
/// 2. Without the lock, C is read and compared byte for byte. Its bytes cannot change now:
///    no in-place write was in flight at step 1, none can start, and C is referenced.
/// 3. Under the metadata lock, the hold is dropped, and the checks of step 1 are made again,
///    plus: no refcount reached 0 since step 1 (``Refcounts/frees`` unchanged, so C was not
///    freed and reused between the steps). In the same hold of the lock the entry is set to C
///    without COPIED and C's owner entry loses COPIED, so no later plan writes C in place.
/// Any check failing means no share (the cluster is written normally) and, if the index
/// entry is stale, it is dropped.
extension Qcow2Image {
    /// Writes `buffer` at `offset`, deduplicating its aligned whole clusters against `index`.
    func writeDeduplicating(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, index: DedupIndex) throws {
        try asGuestWrite(at: offset, length: UInt64(buffer.count)) {
            let cs = Int(clusterSize)
            let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: cs, alignment: 4096)
            defer { scratch.deallocate() }
            // Bytes [runStart, pos) are written the ordinary way when the run is flushed; its
            // whole clusters (guest cluster, hash) are indexed after their entries commit.
            var runStart = 0
            var runClusters: [(g: UInt64, hash: UInt64)] = []
            var runHashes: Set<UInt64> = []
            func flushRun(to end: Int) throws {
                if end > runStart {
                    let piece = UnsafeRawBufferPointer(rebasing: buffer[runStart..<end])
                    try steps(.data(piece), at: offset + UInt64(runStart), length: UInt64(piece.count))
                    try indexWritten(runClusters, index: index)
                }
                runStart = end
                runClusters.removeAll(keepingCapacity: true)
                runHashes.removeAll(keepingCapacity: true)
            }

            var pos = 0
            while pos < buffer.count {
                let guest = offset + UInt64(pos)
                let inCluster = Int(guest & (clusterSize - 1))
                guard inCluster == 0, buffer.count - pos >= cs else {
                    pos += min(cs - inCluster, buffer.count - pos)  // part of a cluster: the normal path
                    continue
                }
                let cluster = UnsafeRawBufferPointer(rebasing: buffer[pos..<pos + cs])
                let g = guest >> clusterBits
                if ZeroBuffer.isZero(cluster) {
                    try flushRun(to: pos)
                    try steps(.zeroes(mayUnmap: true), at: guest, length: clusterSize)
                    pos += cs
                    runStart = pos
                    continue
                }
                let h = ContentHash.of(cluster)
                // A copy of a cluster earlier in this run: write the run first, so it is indexed.
                if runHashes.contains(h) { try flushRun(to: pos) }
                if try shareIdentical(cluster, hash: h, guest: g, index: index, scratch: scratch) {
                    try flushRun(to: pos)
                    pos += cs
                    runStart = pos
                } else {
                    runClusters.append((g, h))
                    runHashes.insert(h)
                    pos += cs
                }
            }
            try flushRun(to: buffer.count)
        }
    }

    /// Indexes guest clusters just written: each whose entry owns a data cluster (COPIED,
    /// fully allocated) is recorded under its content hash.
    private func indexWritten(_ clusters: [(g: UInt64, hash: UInt64)], index: DedupIndex) throws {
        guard !clusters.isEmpty else { return }
        let found: [(UInt64, DedupIndex.Entry)] = try lock.withLock {
            var out: [(UInt64, DedupIndex.Entry)] = []
            for (g, h) in clusters {
                let (raw, bitmap) = try md.map.entry(g)
                guard let host = L2Entry(raw: raw).ownedHost, raw & L2Entry.zeroFlag == 0 else { continue }
                if geometry.extendedL2 && SubclusterBitmap(raw: bitmap) != .allAllocated { continue }
                out.append((h, DedupIndex.Entry(host: host >> clusterBits, guest: g)))
            }
            return out
        }
        var due = false
        for (h, e) in found { due = index.insert(h, e) || due }
        if due { index.persist() }
    }

    /// Whether the indexed entry `e` is still usable: its guest entry maps its host cluster as
    /// fully allocated data, which has references and no decrement pending. Lock held.
    private func candidateIsLive(_ e: DedupIndex.Entry) throws -> Bool {
        let (raw, bitmap) = try md.map.entry(e.guest)
        let entry = L2Entry(raw: raw)
        guard case .data(let host, _) = entry.mapping(clusterBits: md.header.clusterBits, extended: geometry.extendedL2),
              host == e.host << clusterBits else { return false }
        if geometry.extendedL2 && SubclusterBitmap(raw: bitmap) != .allAllocated { return false }
        guard md.refcounts.pending[e.host] == nil, try md.refcounts.get(e.host) > 0 else { return false }
        try md.file.checkHost(host, "L2 entry for guest offset \(e.guest << clusterBits)")
        return true
    }

    /// Maps guest cluster `guest` to a host cluster already holding `cluster`'s bytes (found
    /// through `hash` in `index`), if one is and sharing it is provably safe (see the
    /// extension's comment). Returns false when the cluster must be written normally.
    func shareIdentical(_ cluster: UnsafeRawBufferPointer, hash h: UInt64, guest g: UInt64, index: DedupIndex,
                        scratch: UnsafeMutableRawBufferPointer) throws -> Bool {
        guard let cand = index.lookup(h) else { return false }
        let c = cand.host
        // Step 1: check and hold.
        enum Hold { case held(frees: UInt64), busy, stale }
        let hold: Hold = try lock.withLock {
            guard try candidateIsLive(cand) else { return .stale }
            guard busyHosts[c] == nil else { return .busy }
            dedupHolds[c, default: 0] += 1
            return .held(frees: md.refcounts.frees)
        }
        guard case .held(let frees) = hold else {
            if case .stale = hold { index.drop(h, ifStill: cand) }
            return false
        }
        // Step 2: compare, no lock (C cannot change while held; see above).
        let same: Bool
        do {
            let n = try storage.read(into: scratch, at: c << clusterBits)
            same = n == cluster.count && memcmp(scratch.baseAddress!, cluster.baseAddress!, cluster.count) == 0
        } catch {
            lock.withLock { releaseHold(c) }
            throw error
        }
        // Step 3: recheck and share, in one hold of the lock.
        enum Outcome { case shared, differs, refused, stale }
        let outcome: Outcome = try lock.withLock {
            // Waiting for the guest cluster keeps the hold: whoever has it busy never waits for holds.
            while busy.contains(g) { lock.wait() }
            releaseHold(c)
            guard same else { return .differs }
            guard try candidateIsLive(cand), md.refcounts.frees == frees else { return .stale }
            guard busyHosts[c] == nil else { return .refused }  // cannot happen while held; kept as a guard
            let (oldRaw, _) = try md.map.entry(g)
            if case .data(let host, _) = L2Entry(raw: oldRaw).mapping(clusterBits: md.header.clusterBits, extended: geometry.extendedL2),
               host == c << clusterBits {
                return .shared  // already maps these very bytes
            }
            // Without a record of who shares it, COPIED could not be given back later.
            guard dedupSharers[c] != nil || dedupSharers.count < index.capacity else { return .refused }
            guard try md.refcounts.increment(c) else { return .refused }  // refcount at its maximum
            dedupSharers[c, default: []].formUnion([g, cand.guest])
            try md.map.setEntry(g, raw: c << clusterBits, bitmap: geometry.extendedL2 ? SubclusterBitmap.allAllocated.raw : 0)
            md.map.release(raw: oldRaw)
            try clearCopied(guest: cand.guest)
            return .shared
        }
        switch outcome {
        case .shared: return true
        case .stale: index.drop(h, ifStill: cand); return false
        case .differs:
            // A collision keeps the entry; content rewritten since it was indexed drops it.
            if ContentHash.of(UnsafeRawBufferPointer(scratch)) != h { index.drop(h, ifStill: cand) }
            return false
        case .refused: return false
        }
    }

    /// Clears COPIED on guest cluster `g`'s entry (its host cluster is shared now), where its
    /// table is the active disk's own (a table shared with a snapshot has no COPIED entries).
    /// Lock held.
    private func clearCopied(guest g: UInt64) throws {
        let perTable = geometry.l2Entries
        let i = Int(g / perTable)
        guard i < md.map.l1.count, md.map.l1[i] & L1Entry.copied != 0, let t = try md.map.table(i) else { return }
        let j = Int(g % perTable)
        let (raw, bitmap) = ClusterMap.read(t, j, extended: geometry.extendedL2)
        if raw & L2Entry.copied != 0 {
            md.map.set(t, j, raw: raw & ~L2Entry.copied, bitmap: bitmap)
            copiedCleared.insert(t.offset)
        }
    }

    /// After decrements of host clusters `clusters` were applied: a cluster inline dedup
    /// shared that is referenced once again gives COPIED back to the entry left (qcow2 wants
    /// COPIED exactly when the refcount is 1). Returns whether an entry changed. Lock held.
    func restoreCopied<S: Sequence>(_ clusters: S) throws -> Bool where S.Element == UInt64 {
        var changed = false
        for c in clusters {
            guard let guests = dedupSharers[c] else {
                if md.refcounts.pending[c] == nil, try md.refcounts.get(c) == 1 { copiedRecheck.insert(c) }
                continue
            }
            let count = try md.refcounts.get(c)
            if md.refcounts.pending[c] != nil || count > 1 {
                // Still shared: forget guests that no longer map it.
                let left = try guests.filter { try entryMaps($0, host: c) }
                dedupSharers[c] = left.isEmpty ? nil : left
                continue
            }
            dedupSharers[c] = nil
            guard count == 1 else { continue }
            let holders = try guests.filter { try entryMaps($0, host: c) }
            guard holders.count == 1, let g = holders.first else { continue }
            let perTable = geometry.l2Entries
            let i = Int(g / perTable)
            guard md.map.l1[i] & L1Entry.copied != 0, let t = try md.map.table(i) else { continue }
            let j = Int(g % perTable)
            let (raw, bitmap) = ClusterMap.read(t, j, extended: geometry.extendedL2)
            if raw & L2Entry.copied == 0 {
                md.map.set(t, j, raw: raw | L2Entry.copied, bitmap: bitmap)
                changed = true
            }
        }
        return changed
    }

    /// At close: gives COPIED back to active entries whose host cluster is in
    /// ``copiedRecheck`` and referenced once, by walking the active disk's own L2 tables.
    /// Returns whether an entry changed. Lock held.
    func restoreCopiedByScan() throws -> Bool {
        guard !copiedRecheck.isEmpty else { return false }
        defer { copiedRecheck = [] }
        var changed = false
        let perTable = Int(geometry.l2Entries)
        for i in 0..<md.map.l1.count where md.map.l1[i] & L1Entry.copied != 0 && md.map.l1[i] & L1Entry.offsetMask != 0 {
            guard let t = try md.map.table(i) else { continue }
            for j in 0..<perTable {
                let (raw, bitmap) = ClusterMap.read(t, j, extended: geometry.extendedL2)
                guard raw & L2Entry.copied == 0,
                      case .data(let host, _) = L2Entry(raw: raw).mapping(clusterBits: md.header.clusterBits, extended: geometry.extendedL2) else { continue }
                let c = host >> clusterBits
                guard copiedRecheck.contains(c), md.refcounts.pending[c] == nil, try md.refcounts.get(c) == 1 else { continue }
                md.map.set(t, j, raw: raw | L2Entry.copied, bitmap: bitmap)
                copiedRecheck.remove(c)
                changed = true
            }
            if copiedRecheck.isEmpty { break }
        }
        return changed
    }

    /// Whether guest cluster `g`'s entry maps host cluster `c` as data. Lock held.
    private func entryMaps(_ g: UInt64, host c: UInt64) throws -> Bool {
        guard case .data(let host, _) = L2Entry(raw: try md.map.entry(g).raw)
            .mapping(clusterBits: md.header.clusterBits, extended: geometry.extendedL2) else { return false }
        return host == c << clusterBits
    }

    /// Drops one dedup hold on host cluster `c` and wakes planners waiting for it. Lock held.
    private func releaseHold(_ c: UInt64) {
        if let n = dedupHolds[c], n > 1 { dedupHolds[c] = n - 1 } else { dedupHolds[c] = nil }
        lock.broadcast()
    }

    // MARK: In-place write tracking (used by the write pipeline when dedup is on)

    /// Records an in-place write of `length` bytes at host offset `host` as in flight. Lock held.
    func beginInPlace(_ host: UInt64, _ length: UInt64) {
        var c = host >> clusterBits
        let last = (host + length - 1) >> clusterBits
        while c <= last { busyHosts[c, default: 0] += 1; c += 1 }
    }

    /// Ends what ``beginInPlace(_:_:)`` recorded. Lock held.
    func endInPlace(_ host: UInt64, _ length: UInt64) {
        var c = host >> clusterBits
        let last = (host + length - 1) >> clusterBits
        while c <= last {
            if let n = busyHosts[c], n > 1 { busyHosts[c] = n - 1 } else { busyHosts[c] = nil }
            c += 1
        }
    }

    /// Whether guest cluster `g` owns a host cluster a dedup writer holds (its in-place
    /// planner must wait). Lock held.
    func ownedHostIsHeld(_ g: UInt64) throws -> Bool {
        guard dedup != nil, !dedupHolds.isEmpty else { return false }
        guard let host = L2Entry(raw: try md.map.entry(g).raw).ownedHost else { return false }
        return dedupHolds[host >> clusterBits] != nil
    }
}
