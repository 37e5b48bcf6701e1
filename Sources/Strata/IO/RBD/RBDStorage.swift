#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// An RBD image in a Ceph pool, through librbd: the byte store under a qcow2 or raw image,
/// as QEMU layers `qcow2` over `rbd`. Ceph stripes, replicates and caches; this class maps
/// the ``BlockStorage`` calls onto librbd's: read, write, flush, write-zeroes, size, resize.
///
/// librbd's image handle is thread-safe: the server's I/O threads each have a call in flight
/// at once (librbd runs them as asynchronous requests and waits for each).
///
/// An RBD image has a fixed size, where a file grows on write: a write past the end resizes
/// the image first, in steps of an eighth of its size (4 MiB to 256 MiB, whole 4 MiB objects)
/// so that a qcow2 image filling up resizes rarely; the space past the last cluster is thin
/// (RBD allocates objects on write) and free by the image's refcounts.
public final class RBDStorage: BlockStorage, @unchecked Sendable {
    public let name: String
    public let rbdName: RBDName
    private let lib: LibRBD
    private let image: LibRBD.Handle
    private let writable: Bool
    private let uncached: Bool
    /// The image's size as last set or read.
    private let size: Atomic<UInt64>
    /// Serialises resizes.
    private let growing = Mutex<Void>(())
    private let closed = Atomic<Bool>(false)

    static let growMinimum: UInt64 = 4 << 20
    static let growMaximum: UInt64 = 256 << 20

    /// Opens an existing RBD image (a snapshot, `@SNAP`, only read-only). `uncached` bypasses
    /// librbd's cache (`cache=none`).
    public init(name rbdName: RBDName, writable: Bool, uncached: Bool = false) throws {
        let lib = try LibRBD.shared(for: rbdName)
        if writable, rbdName.snapshot != nil {
            throw StrataError.invalidOption(path: rbdName.description, reason: "an RBD snapshot (@\(rbdName.snapshot!)) can only be opened read-only")
        }
        let io = try lib.ioContext(for: rbdName, uncached: uncached)
        var image: LibRBD.Handle? = nil
        let r = (writable ? lib.open : lib.openReadOnly)(io, rbdName.image, &image, rbdName.snapshot)
        guard r == 0, let image else { throw StrataError.openFailed(path: rbdName.description, errno: -r) }
        var bytes: UInt64 = 0
        let s = lib.getSize(image, &bytes)
        if s != 0 {
            _ = lib.close(image)
            throw StrataError.io(path: rbdName.description, SystemCallError(op: "rbd_get_size", errno: -s, offset: 0))
        }
        self.lib = lib
        self.image = image
        self.rbdName = rbdName
        self.name = rbdName.description
        self.writable = writable
        self.uncached = uncached
        self.size = Atomic(bytes)
        lib.openImages.add(1, ordering: .relaxed)
    }

    deinit { close() }

    /// Closes the image (which releases its exclusive lock). Idempotent.
    public func close() {
        if !closed.exchange(true, ordering: .acquiringAndReleasing) {
            _ = lib.close(image)
            lib.openImages.subtract(1, ordering: .releasing)
        }
    }

    /// Creates an empty RBD image (size 0; writes grow it) with the cluster's default
    /// features, or opens the one that exists (``created`` says which, so that a failed create
    /// removes only what it made).
    static func creating(_ rbdName: RBDName) throws -> (storage: RBDStorage, created: Bool) {
        let lib = try LibRBD.shared(for: rbdName)
        guard rbdName.snapshot == nil else {
            throw StrataError.invalidOption(path: rbdName.description, reason: "an image cannot be created at an RBD snapshot (@\(rbdName.snapshot!))")
        }
        let io = try lib.ioContext(for: rbdName)
        var order: Int32 = 0
        let r = lib.create(io, rbdName.image, 0, &order)
        guard r == 0 || r == -EEXIST else { throw StrataError.openFailed(path: rbdName.description, errno: -r) }
        return (try RBDStorage(name: rbdName, writable: true), r == 0)
    }

    /// Removes an RBD image (after a failed create).
    static func remove(_ rbdName: RBDName) {
        guard let lib = try? LibRBD.shared(), let io = try? lib.ioContext(for: rbdName) else { return }
        _ = lib.remove(io, rbdName.image)
    }

    /// The image names in a pool (and namespace).
    static func list(_ pool: RBDName) throws -> [String] {
        let lib = try LibRBD.shared(for: pool)
        let io = try lib.ioContext(for: pool)
        var size = 4096
        while true {
            var buffer = [CChar](repeating: 0, count: size)
            let r = lib.list(io, &buffer, &size)
            if r == -ERANGE, size > buffer.count, size <= Limits.maxPoolListing { continue }
            guard r >= 0 else { throw StrataError.openFailed(path: pool.description, errno: -r) }
            let bytes = buffer.prefix(min(size, buffer.count)).map { UInt8(bitPattern: $0) }
            return bytes.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
        }
    }

    /// Renames an image within its pool; EEXIST when `newName` is taken.
    static func rename(_ rbdName: RBDName, to newName: String) throws {
        let lib = try LibRBD.shared(for: rbdName)
        let io = try lib.ioContext(for: rbdName)
        let r = lib.rename(io, rbdName.image, newName)
        guard r == 0 else { throw StrataError.openFailed(path: rbdName.description, errno: -r) }
    }

    /// Whether the image (or its snapshot) exists; false also when the cluster is unreachable.
    static func exists(_ rbdName: RBDName) -> Bool {
        (try? RBDStorage(name: rbdName, writable: false)) != nil
    }

    /// Takes the image's exclusive lock for this process, and keeps it until ``close()``:
    /// librbd hands an explicitly taken lock to no one else, so another host's writes are
    /// refused while this one writes. An image without the `exclusive-lock` feature is refused
    /// for writing, since nothing would keep two writers apart.
    func lockForWriting() throws {
        var features: UInt64 = 0
        var r = lib.getFeatures(image, &features)
        if r != 0 { throw StrataError.io(path: name, SystemCallError(op: "rbd_get_features", errno: -r, offset: 0)) }
        guard features & LibRBD.exclusiveLockFeature != 0 else {
            throw StrataError.invalidOption(path: name, reason: "the RBD image lacks the exclusive-lock feature, which keeps two writers apart; enable it with 'rbd feature enable \(rbdName.pool)/\(rbdName.image) exclusive-lock'")
        }
        r = lib.lockAcquire(image, LibRBD.lockModeExclusive)
        guard r == 0 else { throw StrataError.rbdLocked(path: name, owners: lockOwners(), errno: -r) }
        // librbd keeps its cache in writethrough mode until it sees a first flush
        // (`rbd_cache_writethrough_until_flush`, for guests that never flush); the engine
        // flushes whenever its cache mode says so, as for a file's page cache, so it starts
        // in writeback (librbd's `rbd_cache_policy`) at once.
        if !uncached { try sync() }
    }

    /// The clients that hold the image's lock (`client.4151` …), as librbd reports them.
    private func lockOwners() -> [String] {
        var mode: Int32 = 0
        var owners = [UnsafeMutablePointer<CChar>?](repeating: nil, count: 8)
        var count = owners.count
        guard lib.lockGetOwners(image, &mode, &owners, &count) == 0 else { return [] }
        defer { lib.lockGetOwnersCleanup(&owners, count) }
        return owners.prefix(count).compactMap { $0.map { String(cString: $0) } }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        let end = size.load(ordering: .acquiring)
        let n = offset >= end ? 0 : Int(min(UInt64(buffer.count), end - offset))
        if n > 0 {
            let r = lib.read(image, offset, n, buffer.baseAddress!.assumingMemoryBound(to: CChar.self))
            guard r == n else { throw failure("rbd_read", r < 0 ? Int32(-r) : EIO, offset) }
        }
        if n < buffer.count {
            (buffer.baseAddress! + n).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - n)
        }
        return n
    }

    public var asynchronousIO: Bool { true }

    /// `rbd_aio_read`: librbd calls back on one of its threads, which ends the read in `io`.
    /// Bytes past the image's end are zeroed here, before the read is submitted.
    public func readAsync(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, io: AsyncIO) -> Bool {
        let end = size.load(ordering: .acquiring)
        let n = offset >= end ? 0 : Int(min(UInt64(buffer.count), end - offset))
        if n < buffer.count {
            (buffer.baseAddress! + n).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - n)
        }
        guard n > 0 else { return true }
        return submit(io, expecting: n) { c in
            lib.aioRead(image, offset, n, buffer.baseAddress!.assumingMemoryBound(to: CChar.self), c)
        }
    }

    /// `rbd_aio_write` inside the image's current size (a write that would grow it waits for
    /// a resize: false). librbd acknowledges it once sent (its writearound cache) or done.
    public func writeAsync(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, io: AsyncIO) -> Bool {
        guard !buffer.isEmpty, offset + UInt64(buffer.count) <= size.load(ordering: .acquiring) else { return false }
        return submit(io, expecting: nil) { c in
            lib.aioWrite(image, offset, buffer.count, buffer.baseAddress!.assumingMemoryBound(to: CChar.self), c)
        }
    }

    /// Creates a completion, counts the request in `io` and submits it; an unsubmitted request
    /// ends as a failure at once. False when not even a completion could be made.
    private func submit(_ io: AsyncIO, expecting length: Int?, _ call: (UnsafeMutableRawPointer) -> Int32) -> Bool {
        let request = Unmanaged.passRetained(AsyncRequest(lib: lib, io: io, length: length))
        var completion: UnsafeMutableRawPointer? = nil
        guard lib.aioCreateCompletion(request.toOpaque(), { c, arg in AsyncRequest.finished(c, arg) }, &completion) == 0,
              let completion else {
            request.release()
            return false
        }
        io.begin()
        if call(completion) < 0 {
            // Not submitted: no callback will come.
            lib.aioRelease(completion)
            request.release()
            io.end(ok: false)
        }
        return true
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        guard buffer.count > 0 else { return }
        let end = offset + UInt64(buffer.count)
        if end > size.load(ordering: .acquiring) { try grow(to: end) }
        let r = lib.write(image, offset, buffer.count, buffer.baseAddress!.assumingMemoryBound(to: CChar.self))
        guard r == buffer.count else { throw failure("rbd_write", r < 0 ? Int32(-r) : EIO, offset) }
    }

    private func grow(to end: UInt64) throws {
        try growing.withLock { _ in
            let current = size.load(ordering: .acquiring)
            guard end > current else { return }
            let step = min(max(current / 8, Self.growMinimum), Self.growMaximum)
            let target = (max(end, current + step) + Self.growMinimum - 1) / Self.growMinimum * Self.growMinimum
            try resize(to: target)
        }
    }

    private func resize(to bytes: UInt64) throws {
        let r = lib.resize(image, bytes)
        guard r == 0 else { throw failure("rbd_resize", -r, bytes) }
        size.store(bytes, ordering: .releasing)
    }

    /// Waits for every acknowledged write, which Ceph then holds on its OSDs' journals.
    public func sync() throws {
        let r = lib.flush(image)
        guard r == 0 else { throw failure("rbd_flush", -r, 0) }
    }

    public func length() throws -> UInt64 { size.load(ordering: .acquiring) }

    public func setLength(_ length: UInt64) throws {
        try growing.withLock { _ in try resize(to: length) }
    }

    /// RBD's write-zeroes: the range reads as zeroes, and whole objects are deallocated.
    public func punchHole(at offset: UInt64, length: UInt64) throws -> Bool {
        let end = size.load(ordering: .acquiring)
        guard offset < end else { return true }
        var done: UInt64 = 0
        let total = min(length, end - offset)
        while done < total {
            let n = Int(min(total - done, 1 << 30))
            let r = lib.writeZeroes(image, offset + done, n, 0, 0)
            guard r >= 0 else { throw failure("rbd_write_zeroes", -r, offset + done) }
            done += UInt64(n)
        }
        return true
    }

    /// RBD cannot zero a range while keeping it allocated without writing it.
    public func zeroRange(at offset: UInt64, length: UInt64) throws -> Bool { false }

    private func failure(_ op: String, _ errno: Int32, _ offset: UInt64) -> StrataError {
        StrataError(SystemCallError(op: op, errno: errno, offset: offset), path: name)
    }
}

/// One `rbd_aio_read` or `rbd_aio_write` in flight: what its callback needs.
private final class AsyncRequest {
    let lib: LibRBD
    let io: AsyncIO
    /// Bytes a read must return; nil for a write (any non-negative result).
    let length: Int?
    init(lib: LibRBD, io: AsyncIO, length: Int?) {
        self.lib = lib
        self.io = io
        self.length = length
    }

    /// librbd's callback (on a librbd thread): a short or failed request ends as a failure,
    /// which the blocking call redoes and reports.
    static func finished(_ completion: UnsafeMutableRawPointer?, _ arg: UnsafeMutableRawPointer?) {
        guard let completion, let arg else { return }
        let request = Unmanaged<AsyncRequest>.fromOpaque(arg).takeRetainedValue()
        let r = request.lib.aioGetReturnValue(completion)
        request.lib.aioRelease(completion)
        request.io.end(ok: request.length.map { r == $0 } ?? (r >= 0))
    }
}
