#if canImport(Glibc)
import Glibc
#endif

/// Crash-safe write-out of metadata.
///
/// Metadata changes live in memory until a flush, which writes them in this order, each
/// step made durable before the next starts:
///
/// 1. guest data (fdatasync);
/// 2. refcount blocks and the refcount table (only increments: a cluster gains its count
///    before any table points at it), then the header if the refcount table moved;
/// 3. L2 tables in which an entry lost COPIED because its cluster became shared (inline or
///    offline dedup), then the other L2 tables and the L1 table: an entry that shares a
///    cluster is never durable while the entry that owned it still says COPIED (which would
///    let QEMU or Strata write the shared cluster in place after a crash);
/// 4. after in-flight I/O that might still use a freed cluster has drained, the deferred
///    decrements (a cluster loses its count only after no durable table points at it);
///    freed clusters are punched out of the file.
///
/// A crash between any two writes leaves at worst clusters with a refcount but no reference
/// (leaks), never a reference to a cluster whose refcount is zero or whose data was not
/// written. Tables are copied under the lock and written outside it, so guest I/O goes on
/// during a flush.
///
/// Two locks: ``flushLock`` makes full flushes one at a time; ``writeOutLock`` makes taking
/// the copies and writing them one step (so an older copy of a table never lands after a
/// newer one), and is not held while a full flush waits for the old epoch's requests. A
/// request that writes tables back in its middle (``writeBackTables()``) takes only the
/// latter, so it never waits for a flush that waits for it.
extension Qcow2Image {
    public func flush() throws {
        if isReadOnly || cache == .unsafe { return }
        try guarded { try flushNow() }
    }

    func flushNow() throws {
        try flushLock.withLock { _ in try flushLocked() }
        dedup?.persist()
    }

    /// Steps 1 to 3 only: makes the dirty tables durable so the caches may drop them, and
    /// leaves the deferred decrements (and the epoch) for the next full flush. Safe in the
    /// middle of a request: it waits for no request, its own included.
    func writeBackTables() throws {
        try writeOutLock.withLock { _ in _ = try writeOut(decrements: false) }
    }

    /// What one flush writes: copies of the dirty metadata, taken under the lock.
    private struct FlushBatch {
        var refBlocks: [(Table, [UInt8])] = []
        var refTable: [UInt8]? = nil
        var header: [UInt8]? = nil
        /// L2 tables where an entry lost COPIED (written and synced before ``l2``).
        var l2First: [(Table, [UInt8])] = []
        var l2: [(Table, [UInt8])] = []
        var l1: [UInt8]? = nil
        var l1Offset: UInt64 = 0
        var refTableOffset: UInt64 = 0
        var decrements: [UInt64: UInt64] = [:]
        var oldEpoch = 0
    }

    /// The overlap guard's last word before tables reach the file: each lands where that
    /// kind of table lives (or where no metadata is claimed, for a snapshot's L2 table).
    private func checkBatch(_ s: FlushBatch) throws {
        for (t, _) in s.refBlocks { try md.overlap.checkTable(t.offset, as: .refcountBlock) }
        for (t, _) in s.l2First + s.l2 { try md.overlap.checkTable(t.offset, as: .l2Table) }
        if s.refTable != nil { try md.overlap.checkTable(s.refTableOffset, as: .refcountTable) }
        if s.l1 != nil { try md.overlap.checkTable(s.l1Offset, as: .l1Table) }
    }

    /// Copies of the dirty metadata; with `decrements`, also the deferred decrements, and a
    /// new epoch begins (the requests of the old one are waited for before they apply).
    private func takeBatch(decrements: Bool) -> FlushBatch {
        var s = FlushBatch()
        let refcounts = md.refcounts, map = md.map
        s.refBlocks = refcounts.cache.takeDirty()
        if refcounts.tableDirty {
            s.refTable = encodeTable(refcounts.table)
            refcounts.tableDirty = false
        }
        s.refTableOffset = md.header.refcountTableOffset
        if md.file.headerDirty {
            s.header = md.header.encode()
            md.file.headerDirty = false
        }
        s.l2 = map.cache.takeDirty()
        if !copiedCleared.isEmpty {
            s.l2First = s.l2.filter { copiedCleared.contains($0.0.offset) }
            s.l2.removeAll { copiedCleared.contains($0.0.offset) }
            copiedCleared = []
        }
        if map.l1Dirty {
            s.l1 = encodeTable(map.l1)
            map.l1Dirty = false
        }
        s.l1Offset = md.header.l1TableOffset
        if decrements {
            s.decrements = refcounts.pending
            refcounts.pending = [:]
            s.oldEpoch = epoch & 1
            epoch += 1
        }
        return s
    }

    /// Puts back what a failed flush did not write, so the next flush tries again.
    private func restore(_ s: FlushBatch) {
        for (t, _) in s.refBlocks { md.refcounts.cache.markDirty(t) }
        for (t, _) in s.l2First + s.l2 { md.map.cache.markDirty(t) }
        for (t, _) in s.l2First { copiedCleared.insert(t.offset) }
        if s.refTable != nil { md.refcounts.tableDirty = true }
        if s.header != nil { md.file.headerDirty = true }
        if s.l1 != nil { md.map.l1Dirty = true }
        for (c, n) in s.decrements { md.refcounts.pending[c, default: 0] += n }
    }

    /// A full flush: steps 1 to 3, then the deferred decrements (step 4). `flushLock` held.
    private func flushLocked() throws {
        guard let (decrements, oldEpoch) = try writeOutLock.withLock({ _ in try writeOut(decrements: true) }),
              !decrements.isEmpty else { return }
        waitForIO(epochParity: oldEpoch)
        try writeOutLock.withLock { _ in
            if try applyDecrements(decrements) {
                // Inline dedup gave COPIED back to entries that own their cluster alone again:
                // their tables are written now, not left dirty past a close.
                _ = try writeOut(decrements: false)
            }
        }
    }

    /// Steps 1 to 3: takes copies of the dirty metadata (with `decrements`, also the deferred
    /// decrements, and a new epoch begins) and writes them in order. Returns the decrements
    /// and the old epoch's parity; nil after a corruption was found (nothing more is
    /// written, as QEMU stops). `writeOutLock` held.
    private func writeOut(decrements: Bool) throws -> (decrements: [UInt64: UInt64], oldEpoch: Int)? {
        if lock.withLock({ markedCorrupt }) { return nil }
        let s = lock.withLock { takeBatch(decrements: decrements) }
        do {
            try lock.withLock { try checkBatch(s) }
            try storage.sync()
            // 2. refcounts
            var wrote = false
            for (t, bytes) in s.refBlocks { try storage.writeBytes(bytes, at: t.offset); wrote = true }
            if let rt = s.refTable { try storage.writeBytes(rt, at: s.refTableOffset); wrote = true }
            if wrote { try storage.sync() }
            if let h = s.header { try storage.writeBytes(h, at: 0); try storage.sync() }
            // 3. mapping tables: first those where an owner lost COPIED
            for (t, bytes) in s.l2First { try storage.writeBytes(bytes, at: t.offset) }
            if !s.l2First.isEmpty { try storage.sync() }
            wrote = false
            for (t, bytes) in s.l2 { try storage.writeBytes(bytes, at: t.offset); wrote = true }
            if let l1 = s.l1 { try storage.writeBytes(l1, at: s.l1Offset); wrote = true }
            if wrote { try storage.sync() }
        } catch {
            lock.withLock { restore(s) }
            throw error
        }
        return (s.decrements, s.oldEpoch)
    }

    /// Step 4, once guest I/O that looked up mappings before the frees is over: the
    /// decrements. Returns whether L2 entries changed (COPIED restored, see
    /// ``Qcow2Image/restoreCopied(_:)``). `writeOutLock` held.
    private func applyDecrements(_ decrements: [UInt64: UInt64]) throws -> Bool {
        var blocks: [(Table, [UInt8])] = []
        var copiedRestored = false
        let zeroed: [UInt64] = try lock.withLock {
            let z: [UInt64]
            do { z = try md.applyDecrements(decrements) } catch {
                for (c, n) in decrements { md.refcounts.pending[c, default: 0] += n }
                throw error
            }
            blocks = md.refcounts.cache.takeDirty()
            if dedup != nil { copiedRestored = try restoreCopied(decrements.keys) }
            return z
        }
        defer {
            if !zeroed.isEmpty { lock.withLock { md.refcounts.punching.subtract(zeroed) } }
        }
        do {
            for (t, bytes) in blocks { try storage.writeBytes(bytes, at: t.offset) }
            if !blocks.isEmpty { try storage.sync() }
            // Punch freed clusters, merging neighbours into one call.
            var runStart: UInt64 = 0
            var runLen: UInt64 = 0
            for c in zeroed.sorted() {
                if runLen > 0 && c == runStart + runLen { runLen += 1; continue }
                if runLen > 0 { try storage.punchHole(at: runStart * clusterSize, length: runLen * clusterSize) }
                runStart = c
                runLen = 1
            }
            if runLen > 0 { try storage.punchHole(at: runStart * clusterSize, length: runLen * clusterSize) }
        } catch {
            lock.withLock { for (t, _) in blocks { md.refcounts.cache.markDirty(t) } }
            throw error
        }
        return copiedRestored
    }

    /// Waits until guest I/O registered in the epoch of parity `parity` has finished.
    func waitForIO(epochParity parity: Int) {
        while (parity == 0 ? inFlight0.load(ordering: .acquiring) : inFlight1.load(ordering: .acquiring)) != 0 {
            usleep(50)
        }
    }
}
