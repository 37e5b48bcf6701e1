#if canImport(Glibc)
import Glibc
#endif
import Strata
import Synchronization

/// Why a live switch to an external snapshot overlay was refused or failed.
public enum SwitchError: Error, Equatable, CustomStringConvertible {
    /// The overlay's path is taken: an overlay is always a new file.
    case overlayExists(String)
    /// The device was closed (its export is gone).
    case closed

    public var description: String {
        switch self {
        case .overlayExists(let p): return "\(p) already exists: an external snapshot overlay must be a new file"
        case .closed: return "the image is closed"
        }
    }
}

/// A writable image whose file can be swapped while it is served: a live external snapshot
/// (what libvirt does by default) puts a new qcow2 overlay on top of the current file and
/// serves the overlay from then on, leaving the old file read-only and stable.
///
/// Every ``BlockDevice`` call takes a reader/writer lock shared, then calls the current
/// image; ``switchToOverlay(_:)`` takes it exclusive, so it waits for the requests in flight
/// and holds new ones until the new image is installed. The lock prefers writers, so a steady
/// stream of requests cannot starve a switch. The hot path is one uncontended
/// `pthread_rwlock_rdlock`/`unlock` pair: no allocation, no actor hop.
///
/// ``size`` and ``preferredBlockSize`` never wait (the event loop asks for them): during a
/// switch they answer what the image had when the switch began.
///
/// Thread-safety (`@unchecked Sendable`): `current`, `path`, `format` and `closed` are written
/// only with `rwlock` held exclusive and read only with it held (shared or exclusive).
public final class SwitchableDevice: BlockDevice, @unchecked Sendable {
    private let rwlock: UnsafeMutablePointer<pthread_rwlock_t>
    private var current: any BlockDevice
    private var path: String
    private var format: ImageFormat
    private var closed = false
    /// How images are opened (writable, cache mode); the format is per file.
    private let options: OpenOptions
    /// The size and block size as they were when a switch began: what ``size`` and
    /// ``preferredBlockSize`` answer while the switch holds the lock, so the event loop
    /// (the request validator and the handshake ask for the size) never waits for a switch.
    /// A switch keeps the size.
    private let sizeDuringSwitch = Atomic<UInt64>(0)
    private let blockSizeDuringSwitch = Atomic<Int>(512)

    /// Opens `path` writable (format from `options`, probed when nil) behind a switch.
    public convenience init(path: String, options: OpenOptions) throws {
        let format = try options.format ?? probeFormat(path: path)
        var o = options
        o.format = format
        let device = try openImage(path: path, options: o)
        self.init(device: device, path: path, format: format, options: options)
    }

    /// Serves `device`, opened from `path` in `format` with `options`; the switch owns it.
    public init(device: any BlockDevice, path: String, format: ImageFormat, options: OpenOptions) {
        self.current = device
        self.asynchronous = Atomic(device.asynchronousIO)
        self.path = ExportRegistry.realPath(path)
        self.format = format
        self.options = options
        rwlock = .allocate(capacity: 1)
        var attr = pthread_rwlockattr_t()
        pthread_rwlockattr_init(&attr)
        pthread_rwlockattr_setkind_np(&attr, Int32(PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP))
        pthread_rwlock_init(rwlock, &attr)
        pthread_rwlockattr_destroy(&attr)
    }

    deinit {
        pthread_rwlock_destroy(rwlock)
        rwlock.deallocate()
    }

    @inline(__always)
    private func shared<T>(_ body: (any BlockDevice) throws -> T) rethrows -> T {
        pthread_rwlock_rdlock(rwlock)
        defer { pthread_rwlock_unlock(rwlock) }
        return try body(current)
    }

    private func exclusive<T>(_ body: () throws -> T) rethrows -> T {
        pthread_rwlock_wrlock(rwlock)
        defer { pthread_rwlock_unlock(rwlock) }
        // Requests started asynchronously hold no lock once started: wait for them to end (a
        // network round trip) before the image is flushed, closed or replaced.
        while asyncIO.load(ordering: .acquiring) > 0 { usleep(100) }
        return try body()
    }

    /// Requests started by ``startRead(at:length:runs:io:)`` or ``startWrite(_:at:io:)`` and not yet ended.
    private let asyncIO = Atomic<Int>(0)

    /// The file served now and its format.
    public var file: (path: String, format: ImageFormat) { shared { _ in (path, format) } }

    /// Runs `body` with the image served now; a switch waits until it returns. Control
    /// operations on the image itself (internal snapshots) go through here.
    public func withCurrent<T>(_ body: (any BlockDevice) throws -> T) rethrows -> T {
        try shared(body)
    }

    /// Makes `overlay` (a new qcow2 file whose backing file is the current one) the image
    /// served, atomically for clients: requests in flight finish on the old image, which is
    /// then flushed and closed (releasing its write lock); the overlay is created and opened
    /// (it opens the old file read-only as its backing) and installed before any held request
    /// runs. On failure the old image is reopened writable and served again, and the error
    /// is thrown. Returns the old file's path.
    @discardableResult
    public func switchToOverlay(_ overlay: String) throws -> String {
        shared { d in
            sizeDuringSwitch.store(d.size, ordering: .releasing)
            blockSizeDuringSwitch.store(d.preferredBlockSize, ordering: .releasing)
        }
        return try exclusive {
            guard !closed else { throw SwitchError.closed }
            guard access(overlay, F_OK) != 0 else { throw SwitchError.overlayExists(overlay) }
            let oldPath = path, oldFormat = format, size = current.size
            try current.flush()
            try current.close()
            var created = false
            do {
                var create = CreateOptions(size: size)
                create.backingFile = ExportRegistry.realPath(oldPath)
                create.backingFormat = oldFormat
                try Qcow2Image.create(path: overlay, options: create)
                created = true
                var o = options
                o.format = .qcow2
                current = try openImage(path: overlay, options: o)
                asynchronous.store(current.asynchronousIO, ordering: .releasing)
                path = ExportRegistry.realPath(overlay)
                format = .qcow2
                return oldPath
            } catch {
                if created { unlink(overlay) }
                var o = options
                o.format = oldFormat
                // If even this fails the device stays closed: requests then fail with EIO
                // and the export should be removed.
                current = try openImage(path: oldPath, options: o)
                asynchronous.store(current.asynchronousIO, ordering: .releasing)
                throw error
            }
        }
    }

    // MARK: BlockDevice

    /// Never waits: during a switch, the size the image had when it began.
    public var size: UInt64 {
        guard pthread_rwlock_tryrdlock(rwlock) == 0 else { return sizeDuringSwitch.load(ordering: .acquiring) }
        defer { pthread_rwlock_unlock(rwlock) }
        return current.size
    }

    public var isReadOnly: Bool { shared { $0.isReadOnly } }

    /// Never waits: during a switch, the block size of the image it replaces.
    public var preferredBlockSize: Int {
        guard pthread_rwlock_tryrdlock(rwlock) == 0 else { return blockSizeDuringSwitch.load(ordering: .acquiring) }
        defer { pthread_rwlock_unlock(rwlock) }
        return current.preferredBlockSize
    }
    public var supportsDiscard: Bool { shared { $0.supportsDiscard } }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try shared { try $0.read(into: buffer, at: offset) }
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
        try shared { try $0.write(buffer, at: offset, fua: fua) }
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, fua: Bool) throws {
        try shared { try $0.writeZeroes(at: offset, length: length, mayUnmap: mayUnmap, fua: fua) }
    }

    public func discard(at offset: UInt64, length: UInt64) throws {
        try shared { try $0.discard(at: offset, length: length) }
    }

    public func flush() throws {
        try shared { try $0.flush() }
    }

    public func blockStatus(at offset: UInt64, length: UInt64) throws -> [BlockExtent] {
        try shared { try $0.blockStatus(at: offset, length: length) }
    }

    public func forEachExtent(at offset: UInt64, length: UInt64, _ body: (BlockExtent) throws -> Bool) throws {
        try shared { try $0.forEachExtent(at: offset, length: length, body) }
    }

    public func read(at offset: UInt64, length: Int, runs sink: ReadSink) throws {
        try shared { try $0.read(at: offset, length: length, runs: sink) }
    }

    /// Never waits: during a switch, the read is left to the blocking path.
    public func readIfCached(at offset: UInt64, length: Int, runs sink: ReadSink) -> Bool {
        guard pthread_rwlock_tryrdlock(rwlock) == 0 else { return false }
        defer { pthread_rwlock_unlock(rwlock) }
        return !closed && current.readIfCached(at: offset, length: length, runs: sink)
    }

    /// One atomic load (the event loop asks per request): the current image's answer, kept
    /// up to date by a switch.
    public var asynchronousIO: Bool { asynchronous.load(ordering: .relaxed) }
    private let asynchronous: Atomic<Bool>

    public func startRead(at offset: UInt64, length: Int, runs sink: ReadSink, io: AsyncIO) -> Bool {
        started(io) { $0.startRead(at: offset, length: length, runs: sink, io: io) }
    }

    public func startWrite(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, io: AsyncIO) -> Bool {
        started(io) { $0.startWrite(buffer, at: offset, io: io) }
    }

    /// Starts a request on the current image without waiting (false during a switch); the
    /// image stays the current one until the request ends in `io` (a switch waits for it).
    private func started(_ io: AsyncIO, _ start: (any BlockDevice) -> Bool) -> Bool {
        guard pthread_rwlock_tryrdlock(rwlock) == 0 else { return false }
        defer { pthread_rwlock_unlock(rwlock) }
        guard !closed else { return false }
        asyncIO.add(1, ordering: .relaxed)
        io.hold { self.asyncIO.subtract(1, ordering: .releasing) }
        return start(current)
    }

    public func writeInPlaceIfCached(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) -> Bool {
        guard pthread_rwlock_tryrdlock(rwlock) == 0 else { return false }
        defer { pthread_rwlock_unlock(rwlock) }
        return !closed && current.writeInPlaceIfCached(buffer, at: offset)
    }

    public func zeroingIsCheap(at offset: UInt64, length: UInt64) -> Bool {
        shared { $0.zeroingIsCheap(at: offset, length: length) }
    }

    public func close() throws {
        try exclusive {
            closed = true
            try current.close()
        }
    }
}
