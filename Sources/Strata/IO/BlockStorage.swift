#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// The one I/O layer every image read, write and flush goes through.
///
/// The engine never touches a file descriptor directly: it sees a `BlockStorage`. The server
/// and the CLI use ``FileStorage``; tests and fuzzers use ``MemoryStorage``; crash tests wrap
/// either in ``RecordingStorage`` to capture the exact sequence of writes and syncs and replay
/// any prefix of it.
public protocol BlockStorage: AnyObject, Sendable {
    /// Reads up to `buffer.count` bytes at `offset`; bytes past the end of the storage read
    /// as zero. Returns how many bytes came from the storage itself.
    @discardableResult
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int
    /// Writes all of `buffer` at `offset`, growing the storage if needed.
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws
    /// Makes every completed write durable.
    func sync() throws
    /// The current length in bytes.
    func length() throws -> UInt64
    /// Sets the length (grows with zeroes or truncates).
    func setLength(_ length: UInt64) throws
    /// Releases the space of a range, which then reads as zeroes. Best effort.
    func punchHole(at offset: UInt64, length: UInt64) throws
    /// A name for messages (the path for files).
    var name: String { get }
}

extension BlockStorage {
    /// Reads exactly `count` bytes into a new array (metadata only; never on the data path).
    func readBytes(at offset: UInt64, count: Int) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        try bytes.withUnsafeMutableBytes { _ = try read(into: $0, at: offset) }
        return bytes
    }
    func writeBytes(_ bytes: [UInt8], at offset: UInt64) throws {
        try bytes.withUnsafeBytes { try write($0, at: offset) }
    }
}

/// How a file is opened.
public struct OpenMode: Sendable, Equatable {
    public var writable: Bool
    /// Bypass the host page cache (O_DIRECT) for aligned transfers (see ``FileStorage``).
    public var direct: Bool = false
    public init(writable: Bool, direct: Bool = false) {
        self.writable = writable
        self.direct = direct
    }
    public static let readOnly = OpenMode(writable: false)
    public static let readWrite = OpenMode(writable: true)
}

/// A regular file, through pread/pwrite/fdatasync/fallocate.
///
/// With `OpenMode.direct`, a second descriptor opened with O_DIRECT carries every transfer
/// whose buffer, offset and length are 4 KiB aligned (cluster-aligned guest data); the rest
/// (metadata, partial clusters) goes through the page cache. Linux keeps the two coherent.
public final class FileStorage: BlockStorage {
    public let fd: Int32
    /// The O_DIRECT descriptor, or -1.
    let directFD: Int32
    public let name: String
    private let closed = Atomic<Bool>(false)
    static let directAlignment = 4096

    /// Opens an existing file.
    public init(path: String, mode: OpenMode) throws {
        let flags = (mode.writable ? O_RDWR : O_RDONLY) | O_CLOEXEC
        let fd = open(path, flags)
        if fd < 0 { throw StrataError.openFailed(path: path, errno: errno) }
        var dfd: Int32 = -1
        if mode.direct {
            dfd = open(path, flags | O_DIRECT_FLAG)
            if dfd < 0 {
                let e = errno
                Glibc.close(fd)
                throw StrataError.openFailed(path: path, errno: e)
            }
        }
        self.fd = fd
        self.directFD = dfd
        self.name = path
    }

    @inline(__always)
    private func descriptor(_ base: UnsafeRawPointer?, _ count: Int, _ offset: UInt64) -> Int32 {
        let a = Self.directAlignment
        if directFD >= 0, count > 0, count % a == 0, Int(offset) % a == 0, Int(bitPattern: base) % a == 0 { return directFD }
        return fd
    }

    /// Opens a file for writing, creating it if missing. An existing file keeps its contents:
    /// the caller truncates it once it holds the image lock.
    public init(creating path: String) throws {
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        if fd < 0 { throw StrataError.openFailed(path: path, errno: errno) }
        self.fd = fd
        self.directFD = -1
        self.name = path
    }

    deinit { close() }

    /// Closes the descriptors (which also drops their OFD locks). Idempotent.
    public func close() {
        if !closed.exchange(true, ordering: .acquiringAndReleasing) {
            _ = Glibc.close(fd)
            if directFD >= 0 { _ = Glibc.close(directFD) }
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        let n = try Syscalls.preadFully(descriptor(buffer.baseAddress, buffer.count, offset), buffer, offset)
        if n < buffer.count {
            (buffer.baseAddress! + n).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - n)
        }
        return n
    }
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try Syscalls.pwriteFully(descriptor(buffer.baseAddress, buffer.count, offset), buffer, offset)
    }
    public func sync() throws { try Syscalls.fdatasync(fd) }
    public func length() throws -> UInt64 { try Syscalls.size(fd) }
    public func setLength(_ length: UInt64) throws { try Syscalls.truncate(fd, length) }
    public func punchHole(at offset: UInt64, length: UInt64) throws {
        _ = Syscalls.punchHole(fd, offset, length)
    }
}

/// Storage in memory, for tests and fuzzing.
public final class MemoryStorage: BlockStorage {
    private let bytes: Mutex<[UInt8]>
    public let name: String
    public init(name: String = "<memory>", bytes: [UInt8] = []) {
        self.bytes = Mutex(bytes)
        self.name = name
    }
    /// A copy of the current contents.
    public var contents: [UInt8] { bytes.withLock { $0 } }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        bytes.withLock { b in
            let start = Int(clamping: min(offset, UInt64(b.count)))
            let n = min(buffer.count, b.count - start)
            if n > 0 { b.withUnsafeBytes { buffer.baseAddress!.copyMemory(from: $0.baseAddress! + start, byteCount: n) } }
            if n < buffer.count { (buffer.baseAddress! + n).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - n) }
            return n
        }
    }
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try bytes.withLock { b in
            guard offset <= UInt64(Int.max) - UInt64(buffer.count), offset + UInt64(buffer.count) <= Limits.maxMemoryStorage else {
                throw SystemCallError(op: "pwrite", errno: EFBIG, offset: offset)
            }
            let end = Int(offset) + buffer.count
            if end > b.count { b.append(contentsOf: [UInt8](repeating: 0, count: end - b.count)) }
            if buffer.count > 0 { b.withUnsafeMutableBytes { ($0.baseAddress! + Int(offset)).copyMemory(from: buffer.baseAddress!, byteCount: buffer.count) } }
        }
    }
    public func sync() throws {}
    public func length() throws -> UInt64 { bytes.withLock { UInt64($0.count) } }
    public func setLength(_ length: UInt64) throws {
        guard length <= Limits.maxMemoryStorage else { throw SystemCallError(op: "ftruncate", errno: EFBIG, offset: length) }
        bytes.withLock { b in
            if Int(length) < b.count { b.removeLast(b.count - Int(length)) } else { b.append(contentsOf: [UInt8](repeating: 0, count: Int(length) - b.count)) }
        }
    }
    public func punchHole(at offset: UInt64, length: UInt64) throws {
        bytes.withLock { b in
            let s = Int(clamping: min(offset, UInt64(b.count)))
            let e = Int(clamping: min(offset &+ length, UInt64(b.count)))
            if s < e { b.withUnsafeMutableBytes { _ = memset($0.baseAddress! + s, 0, e - s) } }
        }
    }
}

/// One event seen by a ``RecordingStorage``.
public enum StorageEvent: Sendable, Equatable {
    case write(offset: UInt64, bytes: [UInt8])
    case sync
    case setLength(UInt64)
    case punchHole(offset: UInt64, length: UInt64)
}

/// Wraps another storage and records every mutation, so a crash test can rebuild the file as
/// it would be after a crash at any point: all events before the last sync are durable, and
/// any subset of those after it may or may not have reached the disk.
public final class RecordingStorage: BlockStorage {
    public let inner: any BlockStorage
    private let log = Mutex<[StorageEvent]>([])
    public var name: String { inner.name }
    public init(_ inner: any BlockStorage) { self.inner = inner }
    /// The events so far.
    public var events: [StorageEvent] { log.withLock { $0 } }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        try inner.read(into: buffer, at: offset)
    }
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try inner.write(buffer, at: offset)
        log.withLock { $0.append(.write(offset: offset, bytes: Array(buffer))) }
    }
    public func sync() throws {
        try inner.sync()
        log.withLock { $0.append(.sync) }
    }
    public func length() throws -> UInt64 { try inner.length() }
    public func setLength(_ length: UInt64) throws {
        try inner.setLength(length)
        log.withLock { $0.append(.setLength(length)) }
    }
    public func punchHole(at offset: UInt64, length: UInt64) throws {
        try inner.punchHole(at: offset, length: length)
        log.withLock { $0.append(.punchHole(offset: offset, length: length)) }
    }

    /// Replays `events` onto `base` (the file as it was when recording started).
    public static func replay(_ events: some Sequence<StorageEvent>, onto base: MemoryStorage) throws {
        for e in events {
            switch e {
            case .write(let o, let b): try base.writeBytes(b, at: o)
            case .sync: break
            case .setLength(let l): try base.setLength(l)
            case .punchHole(let o, let l): try base.punchHole(at: o, length: l)
            }
        }
    }
}
