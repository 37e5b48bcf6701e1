#if canImport(Glibc)
import Glibc
#endif

/// What `strata check` says about an image's dedup index file (for images that name one).
public struct DedupIndexCheck: Sendable, Equatable {
    /// The index file's path.
    public var path: String
    /// Why the file is not used (not trusted, missing, foreign, unreadable); nil when it is.
    public var unusable: String?
    /// Records in the file.
    public var records = 0
    /// Whether every data cluster was offered to the index when it was written.
    public var complete = false
    /// Whether the records were compared with the tables (not on an image still corrupt).
    public var checked = false
    /// Records whose guest cluster no longer maps their host cluster as data, or that repeat
    /// the hash of a live record. They are hints
    /// that cost dedup ratio only: a share is made after a byte comparison, never on a record.
    public var staleRecords = 0
    /// Stale records a repair removed (the file rewritten with the live ones).
    public var staleRecordsDropped = 0

    public init(path: String) { self.path = path }
}

/// What `strata check` says about a template (an image with Strata's template mark).
public struct TemplateCheck: Sendable, Equatable {
    /// Not opened for writing since it was made a template (``AutoclearFeatures/templateSealed``).
    /// When false, another program (QEMU) wrote it: linked clones made before then may read
    /// changed data.
    public var sealed: Bool
    /// The file mode lets its owner or others write it (a template's is 0444).
    public var writableMode: Bool
    /// A repair took the write bits away.
    public var modeFixed = false
}

extension RefcountChecker {
    /// Checks what is Strata's own, after the qcow2 check: the dedup index file's records
    /// against the active tables, and the template mark's seal and file mode. A repair
    /// (either mode) rewrites the index without its stale records and makes a writable
    /// template read-only. Never changes the exit code: none of this is a qcow2 error.
    mutating func checkMarks(_ result: inout CheckResult, repair: CheckRepair?, log: (String) -> Void) throws {
        guard header.version >= 3, let strata = extensions.strata else { return }
        // The seal is in the header, on any store; the file mode and the index file beside the
        // image exist only for files.
        let isFile = storage is FileStorage
        if strata.flags.contains(.template) {
            var t = TemplateCheck(sealed: header.autoclearFeatures.contains(.templateSealed), writableMode: false)
            var st = stat()
            if isFile, stat(path, &st) == 0, st.st_mode & 0o222 != 0 {
                t.writableMode = true
                if repair != nil, chmod(path, st.st_mode & 0o7555) == 0 { t.modeFixed = true }
            }
            if !t.sealed {
                log("WARNING template was opened for writing after it was made a template (by a program that does not keep its seal): linked clones made before then may read changed data")
            }
            result.template = t
        }
        if let id = strata.indexID, isFile {
            result.dedupIndex = try checkDedupIndex(id: id, clean: result.corruptions == 0 && result.checkErrors == 0,
                                                    repair: repair, log: log)
        }
    }

    /// The dedup index file beside the image: each record (hash, host cluster, guest cluster)
    /// is live when the active L2 entry of its guest cluster maps its host cluster as data.
    /// Memory: 24 bytes per record in range (the file is refused past
    /// 4 × ``Limits/maxDedupIndexEntries`` records plus a few batches); each L2 table is read once.
    private func checkDedupIndex(id: [UInt8], clean: Bool, repair: CheckRepair?, log: (String) -> Void) throws -> DedupIndexCheck {
        var out = DedupIndexCheck(path: DedupIndexFile.path(forImage: path))
        guard header.autoclearFeatures.contains(.dedupIndex) else {
            out.unusable = "not trusted: the image was written by a program that does not keep it (QEMU, or Strata without dedup)"
            return out
        }
        guard let file = try? FileStorage(path: out.path, mode: .readOnly) else {
            out.unusable = "missing"
            return out
        }
        defer { file.close() }
        let index = DedupIndexFile(storage: file, id: id, clusterBits: clusterBits)
        let hostClusters = fileLength / cs, guestClusters = divUp(header.size, cs)
        var live: [(guest: UInt64, host: UInt64, hash: UInt64)] = []
        var outOfRange = 0
        let maxRecords = 4 * Limits.maxDedupIndexEntries + 4 * DedupIndex.persistBatch
        let scanned: Result<DedupIndexFile.Header, DedupIndexProblem>
        do {
            scanned = try index.forEachRecord(maxRecords: maxRecords) { hash, host, guest in
                if host > 0, host < hostClusters, guest < guestClusters { live.append((guest, host, hash)) } else { outOfRange += 1 }
            }
        } catch {
            out.unusable = "unreadable: \(error)"
            return out
        }
        switch scanned {
        case .failure(.unusable(let why)):
            out.unusable = why
            return out
        case .success(let h):
            out.records = h.records
            out.complete = h.complete
        }
        guard clean else { return out }
        out.checked = true
        live.sort { $0.guest < $1.guest }
        let entriesPerL2 = cs / (extended ? 16 : 8)
        let l1 = try readTable(header.l1TableOffset, entries: Int(header.l1Size))
        var table: (index: UInt64, bytes: [UInt8]?) = (UInt64.max, nil)
        var keep: [UInt64: DedupIndex.Entry] = [:]
        for r in live {
            let li = r.guest / entriesPerL2
            if table.index != li {
                let off = li < UInt64(l1.count) ? l1[Int(li)] & L1Entry.offsetMask : 0
                table = (li, off != 0 && inFile(off, cs) ? try storage.readBytes(at: off, count: Int(cs)) : nil)
            }
            guard let l2 = table.bytes else { continue }
            let raw = l2.be64(Int(r.guest % entriesPerL2) * (extended ? 16 : 8))
            if case .data(let host, _) = L2Entry(raw: raw).mapping(clusterBits: clusterBits, extended: extended), host == r.host * cs {
                keep[r.hash] = DedupIndex.Entry(host: r.host, guest: r.guest)
            }
        }
        out.staleRecords = out.records - keep.count
        if out.staleRecords > 0 {
            log("Dedup index \(out.path): \(out.staleRecords) of \(out.records) records name clusters that no longer hold their data, or repeat a record (harmless: they only cost dedup ratio)")
        }
        if repair != nil, out.staleRecords > 0 {
            let writable = try FileStorage(path: out.path, mode: OpenMode(writable: true))
            defer { writable.close() }
            try DedupIndexFile(storage: writable, id: id, clusterBits: clusterBits).rewrite(keep, complete: out.complete)
            out.staleRecordsDropped = out.staleRecords
        }
        return out
    }
}

extension RefcountChecker {
    /// `-r all`, before the counts are repaired: a data cluster referenced more often than the
    /// refcount width can count (two entries claiming one cluster of a 1-bit image) cannot
    /// be given a true count. Each reference past the maximum that comes from an active L2
    /// table of its own (refcount 1, so no snapshot shares the table) gets a copy of the data
    /// in a new cluster at the end of the file, and its entry is pointed at the copy: the
    /// copies are durable before any entry changes, so a crash leaves every entry reading
    /// the same bytes. qemu-img 7.2 cannot repair this ("overflow cluster"). Needs the target
    /// counts (``count(target:countRefcountStructure:)``); copies at most `maxBytes`
    /// (``Limits/maxRepairCopyBytes``); returns the entries moved.
    mutating func breakOverflowingShares(maxBytes: UInt64 = Limits.maxRepairCopyBytes, log: (String) -> Void) throws -> Int {
        let maxValue = RefcountCodec.maxValue(order: header.refcountOrder)
        guard maxValue < UInt64(UInt16.max) else { return 0 }
        var excess: [UInt64: UInt64] = [:]
        for (c, n) in refs.enumerated() where UInt64(n) > maxValue { excess[UInt64(c)] = UInt64(n) - maxValue }
        guard !excess.isEmpty else { return 0 }
        let stride = extended ? 16 : 8
        var end = divUp(fileLength, cs) * cs
        var moves: [(at: UInt64, raw: UInt64)] = []
        let l1 = try readTable(header.l1TableOffset, entries: Int(header.l1Size))
        tables: for e in l1 {
            let off = e & L1Entry.offsetMask
            guard off != 0, inFile(off, cs), metadata[off / cs] == .l2Table, refs[Int(off / cs)] == 1 else { continue }
            let l2 = try storage.readBytes(at: off, count: Int(cs))
            for j in 0..<Int(cs) / stride {
                let raw = l2.be64(j * stride)
                guard case .data(let host, _) = L2Entry(raw: raw).mapping(clusterBits: clusterBits, extended: extended),
                      host % cs == 0, let left = excess[host / cs], left > 0 else { continue }
                guard UInt64(moves.count + 1) * cs <= maxBytes else {
                    log("Not copying more than \(maxBytes) bytes: the other references past the refcount width stay corrupt")
                    break tables
                }
                excess[host / cs] = left - 1
                try storage.writeBytes(try storage.readBytes(at: host, count: Int(cs)), at: end)
                moves.append((off + UInt64(j * stride), (raw & ~L2Entry.offsetMask) | end | L2Entry.copied))
                log("Copying cluster \(host / cs) to cluster \(end / cs) for the entry at host offset \(off + UInt64(j * stride)): a \(header.refcountBits)-bit refcount cannot count its references")
                end += cs
            }
        }
        guard !moves.isEmpty else { return 0 }
        try storage.sync()
        for m in moves {
            var field = [UInt8](repeating: 0, count: 8)
            field.put64(m.raw, 0)
            try storage.writeBytes(field, at: m.at)
        }
        try storage.sync()
        fileLength = try storage.length()
        return moves.count
    }
}
