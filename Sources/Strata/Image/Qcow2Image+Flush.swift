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
/// 3. L2 tables, then the L1 table;
/// 4. after in-flight I/O that might still use a freed cluster has drained, the deferred
///    decrements (a cluster loses its count only after no durable table points at it);
///    freed clusters are punched out of the file.
///
/// A crash between any two writes leaves at worst clusters with a refcount but no reference
/// (leaks), never a reference to a cluster whose refcount is zero or whose data was not
/// written. Tables are copied under the lock and written outside it, so guest I/O goes on
/// during a flush.
extension Qcow2Image {
    public func flush() throws {
        if isReadOnly || cache == .unsafe { return }
        try guarded { try flushNow() }
    }

    func flushNow() throws {
        try flushLock.withLock { _ in try flushLocked() }
    }

    /// Steps 1 to 3 only: makes the dirty tables durable so the caches may drop them, and
    /// leaves the deferred decrements (and the epoch) for the next full flush. Safe in the
    /// middle of a request: it waits for no request, its own included.
    func writeBackTables() throws {
        try flushLock.withLock { _ in try flushLocked(applyingDecrements: false) }
    }

    /// What one flush writes: copies of the dirty metadata, taken under the lock.
    private struct FlushBatch {
        var refBlocks: [(Table, [UInt8])] = []
        var refTable: [UInt8]? = nil
        var header: [UInt8]? = nil
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
        for (t, _) in s.l2 { try md.overlap.checkTable(t.offset, as: .l2Table) }
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
        for (t, _) in s.l2 { md.map.cache.markDirty(t) }
        if s.refTable != nil { md.refcounts.tableDirty = true }
        if s.header != nil { md.file.headerDirty = true }
        if s.l1 != nil { md.map.l1Dirty = true }
        for (c, n) in s.decrements { md.refcounts.pending[c, default: 0] += n }
    }

    private func flushLocked(applyingDecrements: Bool = true) throws {
        // After a corruption was found, nothing more is written (QEMU stops the same way).
        if lock.withLock({ markedCorrupt }) { return }
        let s = lock.withLock { takeBatch(decrements: applyingDecrements) }
        do {
            try lock.withLock { try checkBatch(s) }
            try storage.sync()
            // 2. refcounts
            var wrote = false
            for (t, bytes) in s.refBlocks { try storage.writeBytes(bytes, at: t.offset); wrote = true }
            if let rt = s.refTable { try storage.writeBytes(rt, at: s.refTableOffset); wrote = true }
            if wrote { try storage.sync() }
            if let h = s.header { try storage.writeBytes(h, at: 0); try storage.sync() }
            // 3. mapping tables
            wrote = false
            for (t, bytes) in s.l2 { try storage.writeBytes(bytes, at: t.offset); wrote = true }
            if let l1 = s.l1 { try storage.writeBytes(l1, at: s.l1Offset); wrote = true }
            if wrote { try storage.sync() }
        } catch {
            lock.withLock { restore(s) }
            throw error
        }
        if !s.decrements.isEmpty, try applyDecrements(s.decrements, oldEpoch: s.oldEpoch) {
            // Inline dedup gave COPIED back to entries that own their cluster alone again:
            // their tables are written now, not left dirty past a close.
            try flushLocked(applyingDecrements: false)
        }
    }

    /// Step 4: waits out guest I/O that looked up mappings before the frees, then decrements.
    /// Returns whether L2 entries changed (COPIED restored, see ``Qcow2Image/restoreCopied(_:)``).
    private func applyDecrements(_ decrements: [UInt64: UInt64], oldEpoch: Int) throws -> Bool {
        waitForIO(epochParity: oldEpoch)
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
