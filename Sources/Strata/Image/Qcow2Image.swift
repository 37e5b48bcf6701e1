import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// An open qcow2 image (version 2 or 3) and its backing chain, as a ``BlockDevice``.
///
/// Concurrency: one metadata lock guards the L1/L2/refcount state; it is held only to look
/// up or change mappings (and to load a table on a cache miss). Guest data is read and
/// written with the lock released, so reads never wait for unrelated writes. A guest
/// cluster being allocated or copied-on-write is marked busy, so two writers never
/// allocate it twice; the second waits and then sees the first one's mapping.
public final class Qcow2Image: BlockDevice, @unchecked Sendable {
    let storage: any BlockStorage
    public let path: String
    /// Guarded by `lock`.
    let md: Metadata
    let lock = ConditionLock()
    /// Serializes full flushes (never held together with `lock` across I/O of guest data).
    let flushLock = PthreadLocked<Void>(())
    /// Serializes taking copies of dirty metadata and writing them (see Qcow2Image+Flush).
    let writeOutLock = PthreadLocked<Void>(())
    /// Guest I/O in flight per epoch parity (see ``epoch``).
    let inFlight0 = Atomic<Int>(0)
    let inFlight1 = Atomic<Int>(0)
    let clusterSize: UInt64
    let clusterBits: UInt64
    let geometry: Geometry
    let cache: CacheMode
    private let imageLock: ImageLock?
    private let closed = Atomic<Bool>(false)
    /// Set once the first change was prepared (see ``prepareFirstWrite()``).
    let prepared = Atomic<Bool>(false)

    // Guarded by `lock`:
    /// Guest clusters whose write is planned but not yet committed.
    var busy: Set<UInt64> = []
    /// Bumped by each flush; in-flight guest I/O registers against its parity (the grace
    /// period before a freed cluster may be reused).
    var epoch = 0
    /// The thread holding new requests back (``quiesce(_:)``), if any.
    var quiescer: pthread_t?
    /// A structural corruption was found while writable: the corrupt bit is set, and
    /// nothing more is written.
    var markedCorrupt = false
    /// Inline dedup only (empty otherwise): host clusters (index) with an in-place data write
    /// planned and not yet done, and how many. See ``Qcow2Image/shareIdentical(_:hash:guest:index:)``.
    var busyHosts: [UInt64: Int] = [:]
    /// Inline dedup only: host clusters (index) a dedup writer is comparing, and how many
    /// writers; an in-place write into one waits until the comparison is over.
    var dedupHolds: [UInt64: Int] = [:]
    /// Inline dedup only: host clusters (index) shared by inline dedup → the guest clusters
    /// whose entries took them, so the one left when the others are gone gets COPIED back.
    var dedupSharers: [UInt64: Set<UInt64>] = [:]
    /// Inline dedup only: host clusters back to one reference that no record says who holds
    /// (shared in an earlier session, or offline); close gives their entry COPIED back.
    var copiedRecheck: Set<UInt64> = []
    /// L2 tables (offsets) in which an entry lost COPIED because its cluster became shared by
    /// dedup, since the last write-out: written before the other tables.
    var copiedCleared: Set<UInt64> = []

    public let isReadOnly: Bool
    /// Whole-cluster guest writes are stored compressed (the open option, or the image's
    /// `compress` flag); nil when they are not. Compressors are taken from it per write.
    let compressors: CompressorPool?
    /// Whole-cluster guest writes are deduplicated inline (the open option, or the image's
    /// `dedup` flag): the in-memory index of stored clusters; nil when they are not.
    let dedup: DedupIndex?
    /// Whole-cluster guest writes are deduplicated inline by this open.
    public var deduplicatesWrites: Bool { dedup != nil }
    /// The image's dedup index file, as found at open.
    public let dedupIndexState: DedupIndexState
    public var preferredBlockSize: Int { Int(clusterSize) }
    public var supportsDiscard: Bool { !isReadOnly }
    /// The backing image, if any (already open, read-only).
    public let backing: (any BlockDevice)?
    /// For the top image of a read-only backing chain at least two layers deep: where the
    /// chain's units lie, remembered (see ``ChainResolution``).
    let chainResolution: ChainResolution?
    /// The backing file name as recorded in the image (changed by ``setBackingFile(name:format:)``;
    /// ``backing`` stays the file opened at open time).
    public var backingFileName: String? { lock.withLock { md.file.backingName } }
    /// The backing file name resolved against the image's folder.
    public let backingFilePath: String?
    /// The backing file's format (recorded or given).
    public let backingFormat: ImageFormat?
    /// Header extensions (unknown ones are preserved on rewrite).
    public var extensions: HeaderExtensions { lock.withLock { md.file.extensions } }
    /// The image is a template (see ``StrataExtension``).
    public var isTemplate: Bool { extensions.strata?.flags.contains(.template) ?? false }
    /// Why the snapshot table could not be read, if it could not (the active disk still
    /// reads; the snapshots are not listed).
    public let snapshotTableError: StrataError?

    /// The current header (size, table locations and features change while open).
    public var header: Qcow2Header { lock.withLock { md.header } }
    public var size: UInt64 { lock.withLock { md.header.size } }
    /// The internal snapshots, as the snapshot table lists them.
    public var snapshots: [SnapshotRecord] { lock.withLock { md.snapshots } }
    /// The persistent bitmaps (which Strata keeps but does not maintain).
    public var bitmaps: [BitmapDirectoryEntry] { lock.withLock { md.bitmaps } }

    /// Opens an image file and its backing chain.
    public convenience init(path: String, options: OpenOptions) throws {
        try self.init(path: path, options: options, chain: [])
    }

    convenience init(path: String, options: OpenOptions, chain: [String]) throws {
        let file = try Storage.open(path, mode: OpenMode(writable: options.writable, direct: options.cache == .none))
        let lock = options.forceShare && !options.writable ? nil : try ImageLock(storage: file, writable: options.writable)
        try self.init(storage: file, path: path, options: options, chain: chain, imageLock: lock)
    }

    /// Opens an image held in any storage (memory, recording). Backing files are resolved
    /// against `path`'s folder on the real file system.
    public convenience init(storage: any BlockStorage, options: OpenOptions) throws {
        try self.init(storage: storage, path: storage.name, options: options, chain: [], imageLock: nil)
    }

    private init(storage: any BlockStorage, path: String, options: OpenOptions, chain: [String], imageLock: consuming ImageLock?) throws {
        if options.writable { try Self.repairIfDirty(storage, path: path) }
        let fileLength = try storage.length()
        let first = try storage.readBytes(at: 0, count: Int(min(fileLength, 2 << 20)))
        var header = try Qcow2Header.decode(first, path: path, fileSize: fileLength)
        let cs = header.clusterSize
        let extStart = Int(header.version == 2 ? Qcow2Header.v2Length : header.headerLength)
        let extLimit = Int(header.backingFileOffset != 0 ? min(header.backingFileOffset, cs) : cs)
        let ext = try HeaderExtensions.decode(first, start: extStart, limit: min(extLimit, first.count), path: path)
        let unknown = header.incompatibleFeatures.rawValue & ~IncompatibleFeatures.known.rawValue
        if unknown != 0 {
            throw StrataError.unknownIncompatibleFeatures(path: path, names: ext.names(ofUnknownIncompatible: unknown))
        }
        if options.writable {
            if header.incompatibleFeatures.contains(.corrupt) { throw StrataError.imageIsCorruptBit(path: path) }
            if header.incompatibleFeatures.contains(.dirty) { throw StrataError.imageIsDirty(path: path) }
            if ext.strata?.flags.contains(.template) ?? false { throw StrataError.imageIsTemplate(path: path) }
        }

        // Backing chain.
        var backingName: String? = nil
        var backingPath: String? = nil
        var backingFormat: ImageFormat? = nil
        var backing: (any BlockDevice)? = nil
        if header.backingFileOffset != 0 {
            guard Int(header.backingFileOffset) + Int(header.backingFileSize) <= first.count else {
                throw StrataError.corrupt(Corruption(path: path, kind: .truncated, offset: header.backingFileOffset,
                                                     detail: "backing file name lies past the end of the file"))
            }
            let nameBytes = first[Int(header.backingFileOffset)..<Int(header.backingFileOffset) + Int(header.backingFileSize)]
            let name = String(decoding: nameBytes, as: UTF8.self)
            backingName = name
            let resolved = BackingChain.resolve(name, relativeTo: path)
            backingPath = resolved
            if let f = ext.backingFormat {
                guard let fmt = ImageFormat(rawValue: f) else {
                    throw StrataError.unsupportedFeature(path: path, feature: "backing file format '\(f)'")
                }
                backingFormat = fmt
            } else if let f = options.backingFormat {
                backingFormat = f
            } else if !options.noBacking {
                throw StrataError.backingFormatUnknown(path: path, backing: name)
            }
            if !options.noBacking {
                backing = try BackingChain.open(resolved, format: backingFormat!, chain: chain + [path], options: options)
            }
        }

        // L1 and refcount tables (sizes were bounded by the header decoder).
        let l1Bytes = try storage.readBytes(at: header.l1TableOffset, count: Int(header.l1Size) * 8)
        var l1 = (0..<Int(header.l1Size)).map { l1Bytes.be64($0 * 8) }
        let rtCount = Int(UInt64(header.refcountTableClusters) * cs / 8)
        let rtBytes = try storage.readBytes(at: header.refcountTableOffset, count: rtCount * 8)
        let refTable = (0..<rtCount).map { rtBytes.be64($0 * 8) }

        // Snapshot table: a bad one is reported, and does not stop the active disk.
        var snapshots: [SnapshotRecord] = []
        var snapshotError: StrataError? = nil
        do {
            snapshots = try Self.readSnapshotTable(storage, header: header, fileLength: fileLength, path: path)
        } catch let e as StrataError {
            snapshotError = e
        }
        // A snapshot's state instead of the active disk: its L1 table and size, read-only.
        if let want = options.snapshot {
            guard !options.writable else {
                throw StrataError.invalidOption(path: path, reason: "a snapshot can only be opened read-only")
            }
            if let snapshotError { throw snapshotError }
            guard let i = Self.snapshotIndex(want, in: snapshots) else { throw StrataError.noSuchSnapshot(path: path, name: want) }
            let s = snapshots[i]
            let bytes = UInt64(s.l1Size) * 8
            guard s.l1TableOffset % cs == 0, s.l1Size == 0 || s.l1TableOffset != 0,
                  s.l1TableOffset <= fileLength, bytes <= fileLength - s.l1TableOffset else {
                throw StrataError.corrupt(Corruption(path: path, kind: .pastEnd, offset: s.l1TableOffset,
                                                     detail: "the L1 table of snapshot '\(s.name)' at host offset \(s.l1TableOffset) is unaligned or past the end of the file"))
            }
            let sl1 = try storage.readBytes(at: s.l1TableOffset, count: Int(bytes))
            l1 = (0..<Int(s.l1Size)).map { sl1.be64($0 * 8) }
            header.size = min(s.diskSize ?? header.size, Limits.maxVirtualSize)
            header.l1TableOffset = s.l1TableOffset
            header.l1Size = s.l1Size
            let needed = Geometry(clusterBits: header.clusterBits, extendedL2: header.extendedL2).l1Entries(forSize: header.size)
            if UInt64(l1.count) < needed {
                guard needed * 8 <= Limits.maxL1Bytes else {
                    throw StrataError.invalidOption(path: path, reason: "snapshot '\(s.name)' records a disk size too large for its L1 table")
                }
                l1 += [UInt64](repeating: 0, count: Int(needed) - l1.count)
            }
        }

        // Bitmaps: valid only while the autoclear bit says so.
        var bitmaps: [BitmapDirectoryEntry] = []
        if let b = ext.bitmaps, header.autoclearFeatures.contains(.bitmaps) {
            guard b.directoryOffset % cs == 0, b.directoryOffset != 0, b.directoryOffset + b.directorySize <= fileLength else {
                throw StrataError.invalidHeader(path: path, field: "bitmaps extension bitmap_directory_offset", value: b.directoryOffset,
                                                reason: "not cluster aligned, or past the end of the file")
            }
            let dir = try storage.readBytes(at: b.directoryOffset, count: Int(b.directorySize))
            bitmaps = try BitmapDirectoryEntry.decodeDirectory(dir, count: Int(b.count), offset: b.directoryOffset, path: path)
        }

        // Caches: every L2 table of the disk up to 32 MiB (QEMU's cap; 256 GiB of disk at 64 KiB
        // clusters, 16 GiB at 4 KiB), refcount blocks a quarter of that. Inline dedup, made for
        // 4 KiB clusters, touches two L2 tables per share (the new entry, the owner's COPIED)
        // and a refcount block per share: 64 MiB (32 GiB of a 4 KiB-cluster disk), refcounts
        // half. Memory is only taken as tables load.
        let dedupWriter = options.writable && (options.dedupWrites || (ext.strata?.flags.contains(.dedup) ?? false))
        let l2Cap: UInt64 = dedupWriter ? 64 << 20 : 32 << 20
        // One table more than the disk has: a cache that holds the whole map never has all
        // of its tables dirty, so it never asks for a write-back between flushes.
        let l2Default = Int(min((max(Geometry(clusterBits: header.clusterBits, extendedL2: header.extendedL2).l1Entries(forSize: header.size), 4) + 1) * cs,
                                l2Cap))
        let l2Bytes = options.l2CacheBytes ?? max(l2Default, Int(4 * cs))
        let refBytes = options.refcountCacheBytes ?? max(l2Bytes / (dedupWriter ? 2 : 4), Int(4 * cs))

        self.storage = storage
        self.path = path
        self.md = Metadata(storage: storage, path: path, header: header, extensions: ext, backingName: backingName,
                           fileLength: fileLength, l1: l1, refTable: refTable,
                           snapshots: snapshots, bitmaps: bitmaps,
                           bitmapsExtension: header.autoclearFeatures.contains(.bitmaps) ? ext.bitmaps : nil,
                           l2CacheBytes: l2Bytes, refCacheBytes: refBytes)
        self.clusterSize = cs
        self.clusterBits = UInt64(header.clusterBits)
        self.geometry = md.file.geometry
        self.cache = options.cache
        self.isReadOnly = !options.writable
        let compress = options.compressWrites || (ext.strata?.flags.contains(.compress) ?? false)
        self.compressors = compress && options.writable
            ? CompressorPool(type: header.compressionType, clusterSize: Int(cs)) : nil
        let dedupOn = options.dedupWrites || (ext.strata?.flags.contains(.dedup) ?? false)
        if dedupOn && compress && options.writable {
            throw StrataError.invalidOption(path: path, reason: "online compression and inline dedup cannot be combined yet; use one of them")
        }
        (self.dedup, self.dedupIndexState) = Self.openDedupIndex(storage: storage, path: path, header: header, extensions: ext,
                                                                 fileLength: fileLength, keep: dedupOn && options.writable)
        self.backing = backing
        // Only the top image resolves its chain: the layers below are reached through it.
        self.chainResolution = chain.isEmpty ? ChainResolution.make(backing: backing) : nil
        self.backingFilePath = backingPath
        self.backingFormat = backingFormat
        self.snapshotTableError = snapshotError
        self.imageLock = imageLock
    }

    /// Reads and decodes the snapshot table, in growing chunks (its length is only known
    /// once its entries are decoded), bounded by ``Limits/maxSnapshotTableBytes``.
    private static func readSnapshotTable(_ storage: any BlockStorage, header h: Qcow2Header, fileLength: UInt64,
                                          path: String) throws -> [SnapshotRecord] {
        guard h.nbSnapshots > 0 else { return [] }
        try h.checkSnapshotTable(fileSize: fileLength, path: path)
        let available = min(Limits.maxSnapshotTableBytes, fileLength - min(fileLength, h.snapshotsOffset))
        var want = min(available, 64 << 10)
        while true {
            let bytes = try storage.readBytes(at: h.snapshotsOffset, count: Int(want))
            do {
                return try SnapshotRecord.decodeTable(bytes, count: Int(h.nbSnapshots), tableOffset: h.snapshotsOffset, path: path)
            } catch {
                guard want < available else {
                    // Cut at the cap, not at the end of the file: say so.
                    if available == Limits.maxSnapshotTableBytes, case .corrupt(let c) = error as? StrataError, c.detail.hasSuffix("runs past the end of the table") {
                        throw StrataError.corrupt(Corruption(path: path, kind: .malformedTable, offset: h.snapshotsOffset,
                                                             detail: "the snapshot table of \(h.nbSnapshots) entries is larger than \(Limits.maxSnapshotTableBytes) bytes (the most QEMU and Strata read)"))
                    }
                    throw error
                }
                want = min(available, want * 4)
            }
        }
    }

    deinit { try? close() }

    public func close() throws {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        defer {
            storage.close()
            dedup?.file?.close()
            try? backing?.close()
        }
        if !isReadOnly {
            try guarded {
                try flushNow()
                if dedup != nil, try lock.withLock({ try restoreCopiedByScan() }) { try flushNow() }
            }
        }
    }

    // MARK: Range checks, I/O registration, quiescing

    @inline(__always)
    func checkRange(_ offset: UInt64, _ length: UInt64, write: Bool) throws {
        if write && isReadOnly { throw StrataError.readOnly(path: path) }
        let size = md.header.size
        guard offset <= size, length <= size - offset else {
            throw StrataError.outOfRange(offset: offset, length: length, size: size)
        }
    }

    /// Registers guest I/O in the current epoch, after waiting out a ``quiesce(_:)`` held by
    /// another thread. Lock held.
    @inline(__always) func beginIO() -> Int {
        if let q = quiescer, pthread_equal(q, pthread_self()) == 0 {
            while quiescer != nil { lock.wait() }
        }
        let e = epoch & 1
        if e == 0 { inFlight0.add(1, ordering: .relaxed) } else { inFlight1.add(1, ordering: .relaxed) }
        return e
    }
    @inline(__always) func endIO(_ e: Int) {
        if e == 0 { inFlight0.subtract(1, ordering: .releasing) } else { inFlight1.subtract(1, ordering: .releasing) }
    }

    /// Holds new guest requests back, waits for those in flight, flushes, runs `body`, then
    /// lets requests go on: the moment a live operation (a snapshot, a resize of a served
    /// disk) needs the image still. `body` runs on the calling thread, which may use the
    /// image itself; requests from other threads wait.
    /// A nested call from the same thread just runs `body`.
    public func quiesce<T>(_ body: () throws -> T) throws -> T {
        let nested: Bool = lock.withLock {
            if let q = quiescer, pthread_equal(q, pthread_self()) != 0 { return true }
            while quiescer != nil { lock.wait() }
            quiescer = pthread_self()
            return false
        }
        if nested { return try body() }
        defer {
            lock.withLock {
                quiescer = nil
                lock.broadcast()
            }
        }
        waitForIO(epochParity: 0)
        waitForIO(epochParity: 1)
        if !isReadOnly { try flushNow() }
        return try body()
    }

    // MARK: Corruption

    /// Runs an engine operation; when it finds a structural corruption in a writable image,
    /// the image is marked corrupt first (QEMU's corrupt bit: it then opens read-only until
    /// repaired) and nothing more is written.
    @inline(__always)
    func guarded<T>(_ body: () throws -> T) throws -> T {
        do { return try body() } catch StrataError.corrupt(let c) {
            if c.kind.isStructural && !isReadOnly { markCorrupt() }
            throw StrataError.corrupt(c)
        }
    }

    /// Sets the corrupt bit on disk (only that field: the in-memory header may point at
    /// tables not yet written) and stops all further writes. Best effort.
    func markCorrupt() {
        let features: IncompatibleFeatures? = lock.withLock {
            guard !markedCorrupt else { return nil }
            markedCorrupt = true
            guard md.header.version >= 3 else { return nil }
            md.header.incompatibleFeatures.insert(.corrupt)
            return md.header.incompatibleFeatures
        }
        guard let features else { return }
        var field = [UInt8](repeating: 0, count: 8)
        field.put64(features.rawValue, 0)
        try? storage.writeBytes(field, at: 72)
        try? storage.sync()
    }

    // MARK: First write

    /// Before the first change: marks persistent bitmaps in use (Strata does not update
    /// them, so they go stale, as after a crash of their owner; QEMU then knows not to trust
    /// them, and their clusters stay referenced), and clears autoclear bits we do not know.
    func prepareFirstWrite() throws {
        guard !prepared.load(ordering: .acquiring) else { return }
        try flushLock.withLock { _ in
            guard !prepared.load(ordering: .acquiring) else { return }
            let (header, bitmaps, ext) = lock.withLock { (md.header, md.bitmaps, md.file.extensions) }
            var keep: AutoclearFeatures = bitmaps.isEmpty ? [] : .bitmaps
            // A dedup index file stays trusted only while this writer keeps it: one not
            // loaded at open (stale, missing) starts afresh first.
            if let index = dedup, let file = index.file, header.version >= 3 {
                if index.loaded || (try? file.reset(complete: false)) != nil { keep.insert(.dedupIndex) } else { file.markBroken() }
            }
            if let dir = ext.bitmaps, !bitmaps.isEmpty {
                for b in bitmaps where b.flags & BitmapDirectoryEntry.inUse == 0 {
                    var flags = [UInt8](repeating: 0, count: 4)
                    flags.put32(b.flags | BitmapDirectoryEntry.inUse, 0)
                    try storage.writeBytes(flags, at: dir.directoryOffset + UInt64(b.flagsPosition))
                }
                try storage.sync()
                lock.withLock {
                    for i in md.bitmaps.indices { md.bitmaps[i].flags |= BitmapDirectoryEntry.inUse }
                }
            }
            if header.version >= 3, header.autoclearFeatures != keep { try writeAutoclear(keep) }
            prepared.store(true, ordering: .releasing)
        }
    }
}

extension Qcow2Image {
    /// Writes the autoclear feature bits (durable when it returns).
    func writeAutoclear(_ bits: AutoclearFeatures) throws {
        var field = [UInt8](repeating: 0, count: 8)
        field.put64(bits.rawValue, 0)
        try storage.writeBytes(field, at: 88)
        try storage.sync()
        lock.withLock { md.header.autoclearFeatures = bits }
    }
}

/// Opening and checking backing files.
public enum BackingChain {
    /// Resolves a backing name as QEMU does: absolute as is, relative against the folder of
    /// the image that names it (as that image's path was spelled). Under an RBD image, a
    /// name is an image in the same pool, and an `rbd:` name without conf or user takes the
    /// overlay's (``RBDName/resolve(_:)``); an `rbd:` name is never relative to a folder.
    public static func resolve(_ name: String, relativeTo overlay: String) -> String {
        if RBDName.isRBD(overlay), let parent = try? RBDName(parsing: overlay) {
            return (try? parent.resolve(name))?.description ?? name
        }
        if name.hasPrefix("/") || RBDName.isRBD(name) { return name }
        if let slash = overlay.lastIndex(of: "/") { return String(overlay[...slash]) + name }
        return name
    }

    static func open(_ path: String, format: ImageFormat, chain: [String], options: OpenOptions) throws -> any BlockDevice {
        guard chain.count < Limits.maxBackingChainDepth else {
            throw StrataError.backingChainTooDeep(path: chain.first ?? path, limit: Limits.maxBackingChainDepth)
        }
        let real = realPath(path)
        if chain.map(realPath).contains(real) { throw StrataError.backingChainLoop(path: path) }
        var o = options
        o.writable = false
        o.format = format
        o.backingFormat = nil
        switch format {
        case .raw: return try RawImage(path: path, writable: false, forceShare: options.forceShare)
        case .qcow2: return try Qcow2Image(path: path, options: o, chain: chain)
        }
    }

    /// The canonical path of a file (symbolic links, `.` and `..` resolved): of the file
    /// itself when it exists, else of its folder joined with its name, else `p` itself.
    public static func realPath(_ p: String) -> String {
        if RBDName.isRBD(p) { return (try? RBDName(parsing: p))?.canonical ?? p }
        func real(_ q: String) -> String? {
            guard let r = realpath(q, nil) else { return nil }
            defer { free(r) }
            return String(cString: r)
        }
        if let r = real(p) { return r }
        let slash = p.lastIndex(of: "/")
        let folder = slash.map { String(p[...$0]) } ?? "."
        let name = slash.map { String(p[p.index(after: $0)...]) } ?? p
        guard !name.isEmpty, name != ".", name != "..", let f = real(folder) else { return p }
        return f == "/" ? "/" + name : f + "/" + name
    }
}
