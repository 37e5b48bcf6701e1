/// How an open image treats flushes (qemu's `cache=` modes).
public enum CacheMode: String, Sendable, CaseIterable {
    /// Writes complete into the host page cache; flush makes them durable. The default.
    case writeback
    /// Every write is durable before it completes.
    case writethrough
    /// Like writeback, but data bypasses the host page cache (O_DIRECT).
    case none
    /// Flush requests are ignored (the image is still flushed on close).
    case unsafe
}

/// Options for opening an image.
public struct OpenOptions: Sendable {
    /// Open for writing (takes the write lock).
    public var writable: Bool
    /// The top image's format; nil probes for the qcow2 magic (backing files are never probed).
    public var format: ImageFormat?
    /// Flush behaviour.
    public var cache: CacheMode
    /// Skip image locking for read-only opens (qemu-img's `-U`).
    public var forceShare: Bool
    /// Backing format to use when the image records none.
    public var backingFormat: ImageFormat?
    /// Bytes of L2 tables kept in memory; nil = enough for 256 GiB of disk at 64 KiB clusters
    /// (32 MiB), or the whole disk if smaller.
    public var l2CacheBytes: Int?
    /// Bytes of refcount blocks kept in memory; nil = a quarter of the L2 cache, at least 4 clusters.
    public var refcountCacheBytes: Int?

    /// Open the image alone, without its backing chain (reads of unallocated ranges then
    /// return zeroes); for inspecting an image whose backing file is missing.
    public var noBacking: Bool = false

    /// Open the state an internal snapshot holds (its id or name) instead of the active
    /// disk: read-only, with the snapshot's size (`qemu-nbd -l`, `qemu-img convert -l`).
    public var snapshot: String? = nil

    /// Store whole-cluster guest writes compressed (`serve --compress`), whether or not the
    /// image asks for it (``StrataExtension/Flags/compress``).
    public var compressWrites: Bool = false

    /// Deduplicate whole-cluster guest writes inline (`serve --dedup`), whether or not the
    /// image asks for it (``StrataExtension/Flags/dedup``).
    public var dedupWrites: Bool = false

    public init(writable: Bool = false, format: ImageFormat? = nil, cache: CacheMode = .writeback,
                forceShare: Bool = false, backingFormat: ImageFormat? = nil,
                l2CacheBytes: Int? = nil, refcountCacheBytes: Int? = nil, snapshot: String? = nil) {
        self.writable = writable
        self.format = format
        self.cache = cache
        self.forceShare = forceShare
        self.backingFormat = backingFormat
        self.l2CacheBytes = l2CacheBytes
        self.refcountCacheBytes = refcountCacheBytes
        self.snapshot = snapshot
    }
}

/// Opens an image file as a ``BlockDevice``: qcow2 (with its whole backing chain) or raw.
/// Without a format the file is probed (``probeFormat(path:)``); a probed raw image refuses
/// writes that would make it probe as another format.
public func openImage(path: String, options: OpenOptions = OpenOptions()) throws -> any BlockDevice {
    let format = try options.format ?? probeFormat(path: path)
    switch format {
    case .raw:
        if let name = options.snapshot { throw StrataError.noSuchSnapshot(path: path, name: name) }
        return try RawImage(path: path, writable: options.writable, forceShare: options.forceShare, cache: options.cache,
                            probed: options.format == nil)
    case .qcow2:
        return try Qcow2Image(path: path, options: options)
    }
}

/// Looks at the first sector of a file the user named: qcow2 or raw.
/// Only top images are probed; backing files must have a recorded or given format.
public func probeFormat(path: String) throws -> ImageFormat {
    let f = try Storage.open(path, mode: .readOnly)
    defer { f.close() }
    let sector = try f.readBytes(at: 0, count: FormatProbe.sectorSize)
    return sector.withUnsafeBytes { FormatProbe.format(of: $0) }
}
