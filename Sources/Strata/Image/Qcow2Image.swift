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
    let path: String
    /// Guarded by `lock`.
    let md: Metadata
    let lock = ConditionLock()
    /// Serializes flushes (never held together with `lock` across I/O of guest data).
    let flushLock = Mutex<Void>(())
    /// Guest I/O in flight per epoch parity (see ``Metadata/epoch``).
    let inFlight0 = Atomic<Int>(0)
    let inFlight1 = Atomic<Int>(0)
    let clusterSize: UInt64
    let clusterBits: UInt64
    let geometry: Geometry
    let cache: CacheMode
    private let imageLock: ImageLock?
    private let closed = Atomic<Bool>(false)

    public let isReadOnly: Bool
    public var preferredBlockSize: Int { Int(clusterSize) }
    public var supportsDiscard: Bool { !isReadOnly }
    /// The backing image, if any (already open, read-only).
    public let backing: (any BlockDevice)?
    /// The backing file name as recorded in the image.
    public let backingFileName: String?
    /// The backing file name resolved against the image's folder.
    public let backingFilePath: String?
    /// The backing file's format (recorded or given).
    public let backingFormat: ImageFormat?
    /// Header extensions as read (unknown ones are preserved on rewrite).
    public let extensions: HeaderExtensions

    /// The current header (size, table locations and features change while open).
    public var header: Qcow2Header { lock.withLock { md.header } }
    public var size: UInt64 { lock.withLock { md.header.size } }

    /// Opens an image file and its backing chain.
    public convenience init(path: String, options: OpenOptions) throws {
        try self.init(path: path, options: options, chain: [])
    }

    convenience init(path: String, options: OpenOptions, chain: [String]) throws {
        let file = try FileStorage(path: path, mode: OpenMode(writable: options.writable, direct: options.cache == .none))
        let lock = options.forceShare && !options.writable ? nil : try ImageLock(file: file, writable: options.writable)
        try self.init(storage: file, path: path, options: options, chain: chain, imageLock: lock)
    }

    /// Opens an image held in any storage (memory, recording). Backing files are resolved
    /// against `path`'s folder on the real file system.
    public convenience init(storage: any BlockStorage, options: OpenOptions) throws {
        try self.init(storage: storage, path: storage.name, options: options, chain: [], imageLock: nil)
    }

    private init(storage: any BlockStorage, path: String, options: OpenOptions, chain: [String], imageLock: consuming ImageLock?) throws {
        func io<T>(_ body: () throws -> T) throws -> T {
            do { return try body() } catch let e as SystemCallError { throw StrataError.io(path: path, e) }
        }
        let fileLength = try io { try storage.length() }
        let first = try io { try storage.readBytes(at: 0, count: Int(min(fileLength, 2 << 20))) }
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
        }

        // Backing chain.
        var backingName: String? = nil
        var backingPath: String? = nil
        var backingFormat: ImageFormat? = nil
        var backing: (any BlockDevice)? = nil
        if header.backingFileOffset != 0 {
            guard Int(header.backingFileOffset) + Int(header.backingFileSize) <= first.count else {
                throw StrataError.corruptImage(path: path, what: "backing file name lies past the end of the file")
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
            } else if options.noBacking {
                backingFormat = nil
            } else {
                throw StrataError.backingFormatUnknown(path: path, backing: name)
            }
            if !options.noBacking {
                backing = try BackingChain.open(resolved, format: backingFormat!, chain: chain + [path], options: options)
            }
        }

        // L1 and refcount tables (sizes were bounded by the header decoder).
        let l1Bytes = try io { try storage.readBytes(at: header.l1TableOffset, count: Int(header.l1Size) * 8) }
        let l1 = (0..<Int(header.l1Size)).map { l1Bytes.be64($0 * 8) }
        let rtCount = Int(UInt64(header.refcountTableClusters) * cs / 8)
        let rtBytes = try io { try storage.readBytes(at: header.refcountTableOffset, count: rtCount * 8) }
        let refTable = (0..<rtCount).map { rtBytes.be64($0 * 8) }

        let l2Default = Int(min(max(Geometry(clusterBits: header.clusterBits, extendedL2: header.extendedL2).l1Entries(forSize: header.size), 4) * cs,
                                UInt64(32 << 20)))
        let l2Bytes = options.l2CacheBytes ?? max(l2Default, Int(4 * cs))
        let refBytes = options.refcountCacheBytes ?? max(l2Bytes / 4, Int(4 * cs))

        if options.writable {
            // Unknown autoclear bits (and the bitmaps bit: we do not keep bitmaps) are cleared
            // before the first write.
            if header.autoclearFeatures != 0 {
                header.autoclearFeatures = 0
                try io { try storage.writeBytes(header.encode(), at: 0); try storage.sync() }
            }
        }

        self.storage = storage
        self.path = path
        self.md = Metadata(storage: storage, path: path, header: header, l1: l1, refTable: refTable,
                           fileLength: fileLength, l2CacheBytes: l2Bytes, refCacheBytes: refBytes)
        self.clusterSize = cs
        self.clusterBits = UInt64(header.clusterBits)
        self.geometry = md.geometry
        self.cache = options.cache
        self.isReadOnly = !options.writable
        self.backing = backing
        self.backingFileName = backingName
        self.backingFilePath = backingPath
        self.backingFormat = backingFormat
        self.extensions = ext
        self.imageLock = imageLock
    }

    deinit { try? close() }

    public func close() throws {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        defer {
            (storage as? FileStorage)?.close()
            try? backing?.close()
        }
        if !isReadOnly { try flushNow() }
    }

    // MARK: Range checks and I/O registration

    @inline(__always)
    func checkRange(_ offset: UInt64, _ length: UInt64, write: Bool) throws {
        if write && isReadOnly { throw StrataError.readOnly(path: path) }
        let size = md.header.size
        guard offset <= size, length <= size - offset else {
            throw StrataError.outOfRange(offset: offset, length: length, size: size)
        }
    }

    /// Registers guest I/O in the current epoch; call with the lock held.
    @inline(__always) func beginIO() -> Int {
        let e = md.epoch & 1
        if e == 0 { inFlight0.add(1, ordering: .relaxed) } else { inFlight1.add(1, ordering: .relaxed) }
        return e
    }
    @inline(__always) func endIO(_ e: Int) {
        if e == 0 { inFlight0.subtract(1, ordering: .releasing) } else { inFlight1.subtract(1, ordering: .releasing) }
    }

    func wrapIO<T>(_ body: () throws -> T) throws -> T { try md.io(body) }
}

/// Opening and checking backing files.
enum BackingChain {
    /// Resolves a backing name: absolute as is, relative against the overlay's folder.
    static func resolve(_ name: String, relativeTo overlay: String) -> String {
        if name.hasPrefix("/") { return name }
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

    static func realPath(_ p: String) -> String {
        guard let r = realpath(p, nil) else { return p }
        defer { free(r) }
        return String(cString: r)
    }
}
