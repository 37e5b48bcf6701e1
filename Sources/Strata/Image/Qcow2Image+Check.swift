#if canImport(Glibc)
import Glibc
#endif

/// What `check -r` may repair (qemu-img's `-r leaks` and `-r all`).
public enum CheckRepair: String, Sendable {
    /// Lowers refcounts that are higher than the references (leaked clusters).
    case leaks
    /// Also raises refcounts that are too low (rebuilding the refcount structure when a
    /// used cluster has none), fixes COPIED flags, drops entries that point nowhere valid,
    /// discards an unreadable snapshot table, and clears the corrupt and dirty bits.
    case all
}

/// The outcome of a consistency check: QAPI's `ImageCheck`, the numbers `qemu-img check`
/// reports, plus the guest ranges a repair had to give up.
public struct CheckResult: Sendable, Equatable {
    public var corruptions = 0
    public var leaks = 0
    /// The check could not complete (an unreadable table).
    public var checkErrors = 0
    public var corruptionsFixed = 0
    public var leaksFixed = 0
    /// One past the highest host cluster in use or counted, in bytes.
    public var imageEndOffset: UInt64 = 0
    /// Guest clusters of the disk.
    public var totalClusters: UInt64 = 0
    /// Guest clusters the active L1 table maps to host clusters (data or preallocated zero).
    public var allocatedClusters: UInt64 = 0
    public var fragmentedClusters: UInt64 = 0
    public var compressedClusters: UInt64 = 0
    /// Guest byte ranges of the active disk that a repair turned into zeroes, because their
    /// entry pointed past the end of the file, was unaligned, or pointed into metadata.
    public var lostRanges: [Range<UInt64>] = []
    /// Snapshots a repair discarded (their table could not be read).
    public var discardedSnapshots = 0
    /// Strata's own marks (nil when the image has none): its dedup index file, its template
    /// seal. Informational: they never change ``exitCode``.
    public var dedupIndex: DedupIndexCheck?
    public var template: TemplateCheck?

    public init() {}

    /// qemu-img's exit code for this result: 1 not completed, 2 corrupt, 3 leaks, 0 clean.
    public var exitCode: Int32 {
        if checkErrors > 0 { return 1 }
        if corruptions > 0 { return 2 }
        if leaks > 0 { return 3 }
        return 0
    }
}

extension Qcow2Image {
    /// Checks the refcounts, COPIED flags and table entries of the qcow2 image at `path`,
    /// as `qemu-img check` does, and repairs what `repair` allows. The file is locked (shared
    /// for a read-only check unless `forceShare`, exclusive for a repair). Diagnostics go to
    /// `log`, one line each, in qemu-img's words.
    public static func check(path: String, repair: CheckRepair?, forceShare: Bool = false,
                             log: @escaping (String) -> Void) throws -> CheckResult {
        let file = try Storage.open(path, mode: OpenMode(writable: repair != nil))
        let lock = forceShare && repair == nil ? nil : try ImageLock(storage: file, writable: repair != nil)
        _ = consume lock
        defer { file.close() }
        return try check(storage: file, path: path, repair: repair, log: log)
    }

    /// Before an open for writing: an image whose dirty bit is set (a lazy-refcounts writer
    /// stopped without a clean close) has its refcounts repaired first, as QEMU does, instead
    /// of being refused. The caller holds the write lock. Still inconsistent afterwards: refused.
    static func repairIfDirty(_ storage: any BlockStorage, path: String) throws {
        let head = try storage.readBytes(at: 0, count: Int(min(try storage.length(), 80)))
        guard head.count >= 80, head.be32(0) == Qcow2Header.magic, head.be32(4) >= 3,
              head.be64(72) & IncompatibleFeatures.dirty.rawValue != 0,
              head.be64(72) & IncompatibleFeatures.corrupt.rawValue == 0 else { return }
        let r = try check(storage: storage, path: path, repair: .all) { _ in }
        if r.exitCode != 0 { throw StrataError.imageIsDirty(path: path) }
    }

    /// ``check(path:repair:forceShare:log:)`` on any storage (nobody else may use it meanwhile).
    public static func check(storage: any BlockStorage, path: String, repair: CheckRepair?,
                             log: @escaping (String) -> Void) throws -> CheckResult {
        var checker = try RefcountChecker(storage: storage, path: path)
        var result = try checker.run(repair: repair, log: log)
        try checker.checkMarks(&result, repair: repair, log: log)
        return result
    }
}

/// The metadata a check knows a host cluster holds.
enum CheckedKind: Equatable {
    case header, l1Table, l2Table, refcountTable, refcountBlock, snapshotTable, snapshotL1Table, bitmapDirectory, bitmapTable
}

/// An entry a repair must clear: it points past the end of the file, is unaligned, has
/// reserved bits, or points into other metadata.
struct BadEntry {
    /// Host offset of the entry itself.
    var at: UInt64
    /// The guest range it maps, when it belongs to the active disk.
    var guest: Range<UInt64>?
    var isL1: Bool
    var why: String
}

/// One pass of the check: reference counts computed from the tables (2 bytes per host
/// cluster, saturating), the metadata map, and the entries a repair must clear. Memory
/// follows the file's cluster count and the metadata, never the data: for a 1 TiB file of
/// 64 KiB clusters, 16 Mi clusters, the counts take 32 MiB; tables are read one at a time.
struct RefcountChecker {
    let storage: any BlockStorage
    let path: String
    var header: Qcow2Header
    let extensions: HeaderExtensions
    let cs: UInt64
    let clusterBits: UInt32
    let extended: Bool
    var fileLength: UInt64

    // One pass:
    var refs: [UInt16] = []
    var metadata: [UInt64: CheckedKind] = [:]
    var bad: [BadEntry] = []
    var result = CheckResult()
    /// The refcount structure cannot be trusted: a repair writes a new one.
    var rebuild = false
    var snapshots: [SnapshotRecord] = []
    var snapshotTableError: String? = nil
    var quiet = false
    /// COPIED flags found wrong by the last check pass, and repaired by the last repair.
    var copiedErrors = 0
    var copiedFixed = 0
    var logLine: (String) -> Void = { _ in }

    init(storage: any BlockStorage, path: String) throws {
        self.storage = storage
        self.path = path
        fileLength = try storage.length()
        let first = try storage.readBytes(at: 0, count: Int(min(fileLength, 2 << 20)))
        header = try Qcow2Header.decode(first, path: path, fileSize: fileLength)
        cs = header.clusterSize
        clusterBits = header.clusterBits
        extended = header.extendedL2
        let extStart = Int(header.version == 2 ? Qcow2Header.v2Length : header.headerLength)
        let extLimit = Int(header.backingFileOffset != 0 ? min(header.backingFileOffset, cs) : cs)
        extensions = try HeaderExtensions.decode(first, start: extStart, limit: min(extLimit, first.count), path: path)
    }

    private func say(_ s: String) { if !quiet { logLine(s) } }

    // MARK: Stored refcounts

    /// Reads stored refcounts, one refcount block cached.
    struct StoredRefcounts {
        let table: [UInt64]
        let entries: UInt64
        let order: UInt32
        var cached: (offset: UInt64, bytes: [UInt8])?
    }

    func readRefcountTable() throws -> [UInt64] {
        let n = Int(UInt64(header.refcountTableClusters) * cs / 8)
        let bytes = try storage.readBytes(at: header.refcountTableOffset, count: n * 8)
        return (0..<n).map { bytes.be64($0 * 8) }
    }

    /// The stored refcount of host cluster `c` (0 where no valid block covers it).
    func stored(_ c: UInt64, _ s: inout StoredRefcounts) throws -> UInt64 {
        let ti = c / s.entries
        guard ti < UInt64(s.table.count) else { return 0 }
        let off = s.table[Int(ti)] & ~UInt64(511)
        // (A hostile entry may be near 2^64: compare without adding to it.)
        guard off != 0, off % cs == 0, inFile(off, cs) else { return 0 }
        if s.cached?.offset != off { s.cached = (off, try storage.readBytes(at: off, count: Int(cs))) }
        return s.cached!.bytes.withUnsafeBytes { RefcountCodec.get($0, index: Int(c % s.entries), order: s.order) }
    }

    func newStored() throws -> StoredRefcounts {
        StoredRefcounts(table: try readRefcountTable(), entries: cs * 8 / header.refcountBits, order: header.refcountOrder, cached: nil)
    }

    // MARK: Counting

    /// One more reference on every cluster `size` bytes from `offset` touch (QEMU counts the
    /// raw offset, so an unaligned entry touches two clusters).
    mutating func inc(_ offset: UInt64, _ size: UInt64) {
        guard size > 0 else { return }
        let first = offset / cs, last = (offset + size - 1) / cs
        if last >= UInt64(refs.count) {
            if offset + size > fileLength && offset + size - fileLength >= cs {
                say("ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x\(hex(offset)) size 0x\(hex(size))")
                result.corruptions += 1
                return
            }
            refs += [UInt16](repeating: 0, count: Int(last + 1) - refs.count)
        }
        for c in first...last where refs[Int(c)] < UInt16.max { refs[Int(c)] += 1 }
    }

    mutating func claim(_ offset: UInt64, bytes: UInt64, _ kind: CheckedKind) {
        guard bytes > 0, offset % cs == 0 else { return }
        for c in (offset / cs)...((offset + bytes - 1) / cs) where metadata[c] == nil { metadata[c] = kind }
    }

    func inFile(_ offset: UInt64, _ bytes: UInt64) -> Bool {
        offset % cs == 0 && offset != 0 && offset < fileLength && bytes <= fileLength - offset
    }

    func readTable(_ offset: UInt64, entries: Int) throws -> [UInt64] {
        let bytes = try storage.readBytes(at: offset, count: entries * 8)
        return (0..<entries).map { bytes.be64($0 * 8) }
    }

    mutating func readSnapshots() {
        snapshots = []
        snapshotTableError = nil
        guard header.nbSnapshots > 0 else { return }
        do {
            try header.checkSnapshotTable(fileSize: fileLength, path: path)
            let available = min(Limits.maxSnapshotTableBytes, fileLength - min(fileLength, header.snapshotsOffset))
            let bytes = try storage.readBytes(at: header.snapshotsOffset, count: Int(available))
            snapshots = try SnapshotRecord.decodeTable(bytes, count: Int(header.nbSnapshots), tableOffset: header.snapshotsOffset, path: path)
            for s in snapshots where s.l1Size > 0 && !inFile(s.l1TableOffset, UInt64(s.l1Size) * 8) {
                throw StrataError.corrupt(Corruption(path: path, kind: .pastEnd, offset: s.l1TableOffset,
                                                     detail: "the L1 table of snapshot '\(s.name)' is unaligned or past the end of the file"))
            }
            // A snapshot L1 table lying on the header, the refcount structure or the snapshot
            // table is not a table: reading its "entries" reads that metadata, and a repair
            // clearing them would write over it. The table cannot be read.
            let fixed = try fixedMetadataClusters()
            for s in snapshots where s.l1Size > 0 {
                let first = s.l1TableOffset / cs, end = divUp(s.l1TableOffset + UInt64(s.l1Size) * 8, cs)
                if let c = (first..<end).first(where: { fixed.contains($0) }) {
                    throw StrataError.corrupt(Corruption(path: path, kind: .malformedTable, offset: s.l1TableOffset,
                                                         detail: "the L1 table of snapshot '\(s.name)' overlaps other metadata at host offset \(c * cs)"))
                }
            }
        } catch {
            snapshots = []
            snapshotTableError = "\(error)"
        }
    }

    /// Host clusters holding the header, the refcount table, the refcount blocks (those in
    /// the file) and the snapshot table: what no table entry may be written into.
    func fixedMetadataClusters() throws -> Set<UInt64> {
        var out: Set<UInt64> = [0]
        func add(_ offset: UInt64, _ bytes: UInt64) {
            guard bytes > 0, inFile(offset, bytes) else { return }
            for c in (offset / cs)..<divUp(offset + bytes, cs) { out.insert(c) }
        }
        add(header.refcountTableOffset, UInt64(header.refcountTableClusters) * cs)
        for e in try readRefcountTable() { add(e & ~UInt64(511), cs) }
        if header.nbSnapshots > 0 {
            add(header.snapshotsOffset, max(UInt64(SnapshotRecord.tableLength(snapshots)), 40 * UInt64(header.nbSnapshots)))
        }
        return out
    }

    /// Computes references from every table. `target`: as a repair will leave them (bad
    /// entries dropped, the old refcount structure not counted when it is to be replaced).
    mutating func count(target: Bool, countRefcountStructure: Bool) throws {
        refs = [UInt16](repeating: 0, count: Int(divUp(fileLength, cs)))
        metadata = [:]
        bad = []
        rebuild = false
        let h = header
        let fileRefTable = try readRefcountTable()

        // Metadata known before any L2 table is read.
        claim(0, bytes: cs, .header)
        claim(h.l1TableOffset, bytes: UInt64(h.l1Size) * 8, .l1Table)
        claim(h.refcountTableOffset, bytes: UInt64(h.refcountTableClusters) * cs, .refcountTable)
        for e in fileRefTable {
            let off = e & ~UInt64(511)
            if off != 0 && inFile(off, cs) { claim(off, bytes: cs, .refcountBlock) }
        }
        if !snapshots.isEmpty { claim(h.snapshotsOffset, bytes: UInt64(SnapshotRecord.tableLength(snapshots)), .snapshotTable) }
        for s in snapshots { claim(s.l1TableOffset, bytes: UInt64(s.l1Size) * 8, .snapshotL1Table) }
        var bitmapTables: [(UInt64, UInt32)] = []
        if let b = extensions.bitmaps, h.autoclearFeatures.contains(.bitmaps), inFile(b.directoryOffset, b.directorySize) {
            claim(b.directoryOffset, bytes: b.directorySize, .bitmapDirectory)
            if let dir = try? storage.readBytes(at: b.directoryOffset, count: Int(b.directorySize)),
               let entries = try? BitmapDirectoryEntry.decodeDirectory(dir, count: Int(b.count), offset: b.directoryOffset, path: path) {
                for e in entries where inFile(e.tableOffset, UInt64(e.tableSize) * 8) {
                    claim(e.tableOffset, bytes: UInt64(e.tableSize) * 8, .bitmapTable)
                    bitmapTables.append((e.tableOffset, e.tableSize))
                }
            }
        }
        let activeL1 = try readTable(h.l1TableOffset, entries: Int(h.l1Size))
        var l1s: [(l1: [UInt64], offset: UInt64, active: Bool)] = [(activeL1, h.l1TableOffset, true)]
        for s in snapshots { l1s.append((try readTable(s.l1TableOffset, entries: Int(s.l1Size)), s.l1TableOffset, false)) }
        for (l1, _, _) in l1s {
            for e in l1 {
                let off = e & L1Entry.offsetMask
                if off != 0 && inFile(off, cs) && metadata[off / cs] == nil { metadata[off / cs] = .l2Table }
            }
        }

        // The header, then each L1 table and what it reaches.
        inc(0, cs)
        for (l1, l1Offset, active) in l1s {
            inc(l1Offset, UInt64(l1.count) * 8)
            try walk(l1, l1Offset: l1Offset, active: active, target: target, countRefcountStructure: countRefcountStructure)
        }
        if !snapshots.isEmpty { inc(h.snapshotsOffset, UInt64(SnapshotRecord.tableLength(snapshots))) }
        if let b = extensions.bitmaps, h.autoclearFeatures.contains(.bitmaps), inFile(b.directoryOffset, b.directorySize) {
            inc(b.directoryOffset, b.directorySize)
            for (off, size) in bitmapTables {
                inc(off, UInt64(size) * 8)
                for e in try readTable(off, entries: Int(size)) {
                    let host = BitmapTableEntry(raw: e).hostOffset
                    if host != 0 { inc(host, cs) }
                }
            }
        }

        // The refcount table and its blocks.
        if countRefcountStructure {
            inc(h.refcountTableOffset, UInt64(h.refcountTableClusters) * cs)
            var blocks: [(Int, UInt64)] = []
            for (i, e) in fileRefTable.enumerated() {
                let off = e & ~UInt64(511)
                if off == 0 { continue }
                if off % cs != 0 {
                    say("ERROR refcount block \(i) is not cluster aligned; refcount table entry corrupted")
                    result.corruptions += 1
                    rebuild = true
                    continue
                }
                if off / cs >= divUp(fileLength, cs) {
                    say("ERROR refcount block \(i) is outside image")
                    result.corruptions += 1
                    rebuild = true
                    continue
                }
                inc(off, cs)
                blocks.append((i, off))
            }
            for (i, off) in blocks where refs[Int(off / cs)] != 1 {
                say("ERROR refcount block \(i) refcount=\(refs[Int(off / cs)])")
                result.corruptions += 1
                rebuild = true
            }
        }
    }

    /// Counts the references of one L1 table's L2 tables and data clusters.
    private mutating func walk(_ l1: [UInt64], l1Offset: UInt64, active: Bool, target: Bool, countRefcountStructure: Bool) throws {
        let entriesPerL2 = Int(cs / (extended ? 16 : 8))
        let guestPerL2 = UInt64(entriesPerL2) * cs
        let size = header.size
        for (i, e) in l1.enumerated() {
            let off = e & L1Entry.offsetMask
            if off == 0 { continue }
            let guest: Range<UInt64>? = active ? min(UInt64(i) * guestPerL2, size)..<min(UInt64(i + 1) * guestPerL2, size) : nil
            let at = l1Offset + UInt64(i) * 8
            if L1Entry(raw: e).hasReservedBits {
                say("ERROR found L1 entry with reserved bits set: \(hex(e))")
                result.corruptions += 1
                bad.append(BadEntry(at: at, guest: guest, isL1: true, why: "L1 entry with reserved bits set"))
                continue
            }
            if off % cs != 0 {
                say("ERROR l2_offset=\(hex(off)): Table is not cluster aligned; L1 entry corrupted")
                result.corruptions += 1
                bad.append(BadEntry(at: at, guest: guest, isL1: true, why: "L2 table offset not cluster aligned"))
                continue
            }
            if let kind = metadata[off / cs], kind != .l2Table {
                bad.append(BadEntry(at: at, guest: guest, isL1: true, why: "L2 table overlaps \(kind)"))
                if target { continue }
            }
            if !target || inFile(off, cs) { inc(off, cs) }
            guard inFile(off, cs) else {
                bad.append(BadEntry(at: at, guest: guest, isL1: true, why: "L2 table past the end of the file"))
                continue
            }
            let l2 = try storage.readBytes(at: off, count: Int(cs))
            var nextContiguous: UInt64 = 0
            for j in 0..<entriesPerL2 {
                let raw = l2.be64(j * (extended ? 16 : 8))
                let entry = L2Entry(raw: raw)
                let g: Range<UInt64>? = guest.map { r in
                    let s = min(r.lowerBound + UInt64(j) * cs, size)
                    return s..<min(s + cs, size)
                }
                let eat = off + UInt64(j * (extended ? 16 : 8))
                switch entry.mapping(clusterBits: clusterBits, extended: extended) {
                case .unallocated:
                    continue
                case .compressed(let host, let sectors):
                    let start = host & ~UInt64(511)
                    let bytes = sectors * 512
                    if target && (start + bytes > fileLength + cs || start == 0) {
                        bad.append(BadEntry(at: eat, guest: g, isL1: false, why: "compressed data past the end of the file"))
                        continue
                    }
                    inc(start, bytes)
                    if active {
                        result.allocatedClusters += 1
                        result.compressedClusters += 1
                        result.fragmentedClusters += 1
                    }
                case .zero(let host) where host == 0:
                    continue
                case .zero(let host), .data(let host, _):
                    if entry.hasReservedBits(extended: extended) {
                        say("ERROR found l2 entry with reserved bits set: \(hex(raw))")
                        result.corruptions += 1
                        bad.append(BadEntry(at: eat, guest: g, isL1: false, why: "L2 entry with reserved bits set"))
                        if target { continue }
                    }
                    var isBad = false
                    if host % cs != 0 {
                        say("ERROR offset=\(hex(host)): Data cluster is not properly aligned; L2 entry corrupted.")
                        result.corruptions += 1
                        bad.append(BadEntry(at: eat, guest: g, isL1: false, why: "data cluster offset not cluster aligned"))
                        isBad = true
                    } else if !inFile(host, cs) {
                        bad.append(BadEntry(at: eat, guest: g, isL1: false, why: "data cluster past the end of the file"))
                        isBad = true
                    } else if let kind = metadata[host / cs],
                              countRefcountStructure || (kind != .refcountBlock && kind != .refcountTable) {
                        // (When the refcount structure is being replaced, the data keeps its
                        // cluster: which of the two was there first cannot be told, and
                        // the old blocks are abandoned.)
                        bad.append(BadEntry(at: eat, guest: g, isL1: false, why: "data cluster overlaps \(kind)"))
                        isBad = true
                    }
                    if active {
                        result.allocatedClusters += 1
                        if nextContiguous != 0 && host != nextContiguous { result.fragmentedClusters += 1 }
                        nextContiguous = host + cs
                    }
                    if !(target && isBad) { inc(host, cs) }
                }
            }
        }
    }

    // MARK: Comparing

    /// Compares computed and stored refcounts; with `fix`, lowers leaked counts (`.leaks`) and
    /// raises low ones (`.all`) in place. Returns the highest cluster in use.
    mutating func compare(fix: CheckRepair?) throws -> UInt64 {
        var s = try newStored()
        var highest: UInt64 = 0
        let n = UInt64(refs.count)
        var lowered: [(UInt64, UInt64)] = [], raised: [(UInt64, UInt64)] = []
        for c in 0..<n {
            let have = try stored(c, &s), want = UInt64(refs[Int(c)])
            if have > 0 || want > 0 { highest = c }
            guard have != want else { continue }
            if have == 0 { rebuild = true }
            let fixing = have != 0 && ((have > want && fix != nil) || (have < want && fix == .all))
            say("\(fixing ? "Repairing" : have < want ? "ERROR" : "Leaked") cluster \(c) refcount=\(have) reference=\(want)")
            if fixing {
                if have > want { lowered.append((c, want)) } else { raised.append((c, want)) }
            } else if have < want {
                result.corruptions += 1
            } else {
                result.leaks += 1
            }
        }
        // Raised first and durable, lowered after (never a durable count below the references).
        try setStored(raised, &s)
        try setStored(lowered, &s)
        return highest
    }

    /// Writes refcounts in place (each block once), then syncs.
    func setStored(_ values: [(UInt64, UInt64)], _ s: inout StoredRefcounts) throws {
        guard !values.isEmpty else { return }
        var blocks: [UInt64: [UInt8]] = [:]
        let maxValue = RefcountCodec.maxValue(order: s.order)
        for (c, v) in values {
            let off = s.table[Int(c / s.entries)] & ~UInt64(511)
            var b = try blocks[off] ?? storage.readBytes(at: off, count: Int(cs))
            b.withUnsafeMutableBytes { RefcountCodec.set($0, index: Int(c % s.entries), order: s.order, value: min(v, maxValue)) }
            blocks[off] = b
        }
        for (off, b) in blocks.sorted(by: { $0.key < $1.key }) { try storage.writeBytes(b, at: off) }
        try storage.sync()
        s.cached = nil
    }

    /// Checks the COPIED flags of the active L1 and L2 tables against the stored refcounts;
    /// with `fix`, sets them right (clearing is written and synced before any setting).
    mutating func checkCopied(fix: Bool) throws {
        var s = try newStored()
        let l1 = try readTable(header.l1TableOffset, entries: Int(header.l1Size))
        var newL1 = l1
        var clears: [(UInt64, [UInt8])] = [], sets: [(UInt64, [UInt8])] = []
        var l1Clears = false
        for (i, e) in l1.enumerated() {
            let off = e & L1Entry.offsetMask
            guard off != 0, !L1Entry(raw: e).hasReservedBits, inFile(off, cs) else { continue }
            let rc = try stored(off / cs, &s)
            if (rc == 1) != L1Entry(raw: e).isCopied {
                say("\(fix ? "Repairing" : "ERROR") OFLAG_COPIED L2 cluster: l1_index=\(i) l1_entry=\(hex(e)) refcount=\(rc)")
                if fix { copiedFixed += 1 } else { copiedErrors += 1 }
                if fix {
                    newL1[i] = rc == 1 ? e | L1Entry.copied : e & ~L1Entry.copied
                    if rc != 1 { l1Clears = true }
                } else {
                    result.corruptions += 1
                }
            }
            let step = extended ? 16 : 8
            let table = try storage.readBytes(at: off, count: Int(cs))
            var cleared = table, setOnes = table
            var anyClear = false, anySet = false
            for j in 0..<Int(cs) / step {
                let raw = table.be64(j * step)
                let entry = L2Entry(raw: raw)
                if entry.isCompressed || entry.hasReservedBits(extended: extended) { continue }
                let host = entry.hostOffset
                guard host != 0 else { continue }
                let rc = try stored(host / cs, &s)
                guard (rc == 1) != entry.isCopied else { continue }
                say("\(fix ? "Repairing" : "ERROR") OFLAG_COPIED data cluster: l2_entry=\(hex(raw)) refcount=\(rc)")
                if !fix { result.corruptions += 1; copiedErrors += 1; continue }
                copiedFixed += 1
                if rc == 1 {
                    setOnes.put64(raw | L2Entry.copied, j * step); anySet = true
                } else {
                    cleared.put64(raw & ~L2Entry.copied, j * step); setOnes.put64(raw & ~L2Entry.copied, j * step); anyClear = true
                }
            }
            if anyClear { clears.append((off, cleared)) }
            if anySet || anyClear { sets.append((off, setOnes)) }
        }
        guard fix else { return }
        // Clearing first: a COPIED flag wrongly set may let a write land in a shared cluster.
        for (off, t) in clears { try storage.writeBytes(t, at: off) }
        if l1Clears {
            var bytes = [UInt8](repeating: 0, count: l1.count * 8)
            for (i, e) in l1.enumerated() { bytes.put64(e & (newL1[i] | ~L1Entry.copied), i * 8) }
            try storage.writeBytes(bytes, at: header.l1TableOffset)
        }
        if !clears.isEmpty || l1Clears { try storage.sync() }
        for (off, t) in sets { try storage.writeBytes(t, at: off) }
        if newL1 != l1 {
            var bytes = [UInt8](repeating: 0, count: l1.count * 8)
            for (i, e) in newL1.enumerated() { bytes.put64(e, i * 8) }
            try storage.writeBytes(bytes, at: header.l1TableOffset)
        }
        try storage.sync()
    }

    // MARK: Whole check

    /// One check pass without changes: the numbers qemu-img reports.
    mutating func pass(quiet: Bool) throws -> CheckResult {
        self.quiet = quiet
        result = CheckResult()
        copiedErrors = 0
        fileLength = try storage.length()
        readSnapshots()
        if let e = snapshotTableError {
            say("ERROR failed to read the snapshot table: \(e)")
            result.checkErrors += 1
            return result
        }
        try count(target: false, countRefcountStructure: true)
        let highest = try compare(fix: nil)
        try checkCopied(fix: false)
        result.imageEndOffset = (highest + 1) * cs
        result.totalClusters = divUp(header.size, cs)
        return result
    }

    mutating func run(repair: CheckRepair?, log: @escaping (String) -> Void) throws -> CheckResult {
        logLine = log
        let before = try pass(quiet: false)
        guard let repair, before.exitCode != 0 || header.incompatibleFeatures.contains(.dirty)
                || header.incompatibleFeatures.contains(.corrupt) else { return before }
        var lost: [Range<UInt64>] = []
        var discarded = 0
        // Fixed counts as qemu-img counts them: what the refcount comparison finds before the
        // repair and no longer after it, plus each COPIED flag repaired (checked after the
        // refcounts are right), plus a discarded snapshot table.
        var corruptionsFixed = 0, refCorruptions = 0, refLeaks = before.leaks
        if repair == .all {
            if snapshotTableError != nil {
                // The snapshots cannot be found: drop the table (their clusters become leaks).
                discarded = Int(header.nbSnapshots)
                log("Discarding the snapshot table (\(discarded) snapshots): it cannot be read")
                var field = [UInt8](repeating: 0, count: 12)
                field.put32(0, 0)
                field.put64(0, 4)
                try storage.writeBytes(field, at: 60)
                try storage.sync()
                header.nbSnapshots = 0
                header.snapshotsOffset = 0
                corruptionsFixed += 1
            }
            quiet = true
            result = CheckResult()
            readSnapshots()
            try count(target: false, countRefcountStructure: true)
            _ = try compare(fix: nil)
            refCorruptions = result.corruptions
            refLeaks = result.leaks
            copiedFixed = 0
            lost = try repairAll(log: log)
            corruptionsFixed += copiedFixed
        } else if before.checkErrors == 0 {
            // A used cluster without a count or a broken refcount block needs a rebuild,
            // which only -r all does: qemu-img then fails the check and changes nothing.
            if rebuild {
                log("ERROR need to rebuild refcount structures")
                var failed = before
                failed.checkErrors += 1
                return failed
            }
            quiet = true
            result = CheckResult()
            readSnapshots()
            try count(target: false, countRefcountStructure: true)
            _ = try compare(fix: .leaks)
        }
        var after = try pass(quiet: true)
        if repair == .all {
            after.corruptionsFixed = corruptionsFixed + max(0, refCorruptions - (after.corruptions - copiedErrors))
        }
        after.leaksFixed = max(0, refLeaks - after.leaks)
        after.lostRanges = lost
        after.discardedSnapshots = discarded
        return after
    }

    /// `-r all`: the refcounts raised (or rebuilt), bad entries cleared, counts lowered,
    /// COPIED flags fixed, the corrupt and dirty bits cleared; each step durable before the
    /// next, so a crash leaves no count below its references.
    private mutating func repairAll(log: (String) -> Void) throws -> [Range<UInt64>] {
        quiet = true
        try count(target: true, countRefcountStructure: true)
        if try breakOverflowingShares(log: log) > 0 { try count(target: true, countRefcountStructure: true) }
        var s = try newStored()
        var needRebuild = rebuild
        for c in 0..<UInt64(refs.count) where refs[Int(c)] > 0 {
            if try stored(c, &s) == 0 { needRebuild = true; break }
        }
        var badEntries = bad
        if needRebuild {
            log("Rebuilding refcount structure")
            try count(target: true, countRefcountStructure: false)
            badEntries = bad
            try writeNewRefcountStructure()
        } else {
            // 1. Raise counts that are too low.
            var raised: [(UInt64, UInt64)] = []
            for c in 0..<UInt64(refs.count) {
                let have = try stored(c, &s), want = UInt64(refs[Int(c)])
                if have < want {
                    log("Repairing cluster \(c) refcount=\(have) reference=\(want)")
                    raised.append((c, want))
                }
            }
            try setStored(raised, &s)
        }
        // 2. Entries that point nowhere valid become unallocated (zero on v3, so a backing
        //    file does not show through).
        var lost: [Range<UInt64>] = []
        // Never write an entry that lies in the header or the refcount structure (an active
        // L1 table that overlaps them): that would destroy them. Such an entry stays, and the
        // image stays corrupt. (When the structure was just rebuilt, the old one is abandoned.)
        let fixed: Set<UInt64> = try needRebuild ? [0] : fixedMetadataClusters()
        for b in badEntries {
            if fixed.contains(b.at / cs) {
                log("Cannot clear the entry at host offset \(b.at) (\(b.why)): it lies in other metadata")
                continue
            }
            let replacement: UInt64 = b.isL1 || header.version < 3 || extended ? 0 : L2Entry.zeroFlag
            var field = [UInt8](repeating: 0, count: !b.isL1 && extended ? 16 : 8)
            field.put64(replacement, 0)
            // Extended L2: every subcluster reads as zeroes.
            if !b.isL1 && extended { field.put64(SubclusterBitmap.allZero.raw, 8) }
            try storage.writeBytes(field, at: b.at)
            if let g = b.guest, !g.isEmpty {
                lost.append(g)
                log("Lost guest bytes \(g.lowerBound)..<\(g.upperBound) (\(b.why)): they now read as zeroes")
            }
        }
        if !badEntries.isEmpty { try storage.sync() }
        // 3. Lower counts that are too high (now that nothing durable needs them).
        if !needRebuild {
            var s2 = try newStored()
            var lowered: [(UInt64, UInt64)] = []
            for c in 0..<UInt64(refs.count) {
                let have = try stored(c, &s2), want = UInt64(refs[Int(c)])
                if have > want {
                    log("Repairing cluster \(c) refcount=\(have) reference=\(want)")
                    lowered.append((c, want))
                }
            }
            try setStored(lowered, &s2)
            // Refcount blocks past the counted clusters: their counts too.
            let n = UInt64(refs.count)
            var tail: [(UInt64, UInt64)] = []
            for (ti, e) in s2.table.enumerated() {
                let off = e & ~UInt64(511)
                guard off != 0, inFile(off, cs) else { continue }
                let b = try storage.readBytes(at: off, count: Int(cs))
                for k in 0..<s2.entries {
                    let c = UInt64(ti) * s2.entries + k
                    if c < n { continue }
                    if b.withUnsafeBytes({ RefcountCodec.get($0, index: Int(k), order: s2.order) }) != 0 { tail.append((c, 0)) }
                }
            }
            try setStored(tail, &s2)
        }
        // 4. COPIED flags.
        quiet = false
        try checkCopied(fix: true)
        quiet = true
        // 5. The corrupt and dirty bits.
        if header.version >= 3 {
            var features = header.incompatibleFeatures
            features.remove(.dirty)
            features.remove(.corrupt)
            if features != header.incompatibleFeatures {
                var field = [UInt8](repeating: 0, count: 8)
                field.put64(features.rawValue, 0)
                try storage.writeBytes(field, at: 72)
                try storage.sync()
                header.incompatibleFeatures = features
            }
        }
        return lost
    }

    /// Writes a refcount table and blocks for `refs` (plus themselves) at the end of the
    /// file, makes them durable, then points the header at them (one write of the offset
    /// and size fields) and syncs.
    private mutating func writeNewRefcountStructure() throws {
        let entries = cs * 8 / header.refcountBits
        var used = UInt64(refs.count)
        while used > 0 && refs[Int(used - 1)] == 0 { used -= 1 }
        let start = max(divUp(fileLength, cs), used)
        var tableClusters: UInt64 = 1, blocks: UInt64 = 1
        for _ in 0..<32 {
            let end = start + tableClusters + blocks
            let nb = divUp(end, entries)
            let nt = divUp(nb * 8, cs)
            if nb == blocks && nt == tableClusters { break }
            blocks = nb
            tableClusters = nt
        }
        let end = start + tableClusters + blocks
        if UInt64(refs.count) < end { refs += [UInt16](repeating: 0, count: Int(end) - refs.count) }
        for c in start..<end { refs[Int(c)] = 1 }
        let maxValue = RefcountCodec.maxValue(order: header.refcountOrder)
        var table = [UInt8](repeating: 0, count: Int(tableClusters * cs))
        for b in 0..<blocks {
            var block = [UInt8](repeating: 0, count: Int(cs))
            block.withUnsafeMutableBytes { buf in
                for k in 0..<entries {
                    let c = b * entries + k
                    guard c < UInt64(refs.count) else { break }
                    let v = UInt64(refs[Int(c)])
                    if v != 0 { RefcountCodec.set(buf, index: Int(k), order: header.refcountOrder, value: min(v, maxValue)) }
                }
            }
            let at = (start + tableClusters + b) * cs
            try storage.writeBytes(block, at: at)
            table.put64(at, Int(b) * 8)
        }
        try storage.writeBytes(table, at: start * cs)
        try storage.sync()
        var field = [UInt8](repeating: 0, count: 12)
        field.put64(start * cs, 0)
        field.put32(UInt32(tableClusters), 8)
        try storage.writeBytes(field, at: 48)
        try storage.sync()
        header.refcountTableOffset = start * cs
        header.refcountTableClusters = UInt32(tableClusters)
        fileLength = try storage.length()
    }
}

private func hex(_ v: UInt64) -> String { String(v, radix: 16) }
