#if canImport(Glibc)
import Glibc
#endif
import Synchronization

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
        self.created = false
    }

    /// Opens a file for writing, creating it when missing (`created` then says so, so a
    /// failed create can remove what it made). An existing file keeps its contents: the
    /// caller truncates it once it holds the image lock.
    public init(creating path: String) throws {
        var fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        var created = true
        if fd < 0 && errno == EEXIST {
            fd = open(path, O_RDWR | O_CLOEXEC)
            created = false
        }
        if fd < 0 { throw StrataError.openFailed(path: path, errno: errno) }
        self.fd = fd
        self.directFD = -1
        self.name = path
        self.created = created
    }

    /// Makes `path` a new, empty file for an image and lets `body` write it: the file is
    /// opened (created when missing), locked like a writable image (so a file another process
    /// uses is refused, not clobbered), truncated (nothing of its former life survives), then
    /// handed to `body`; closed afterwards. A file this call made is removed when it fails.
    public static func replacing(_ path: String, _ body: (FileStorage) throws -> Void) throws {
        let file = try FileStorage(creating: path)
        do {
            defer { file.close() }
            let lock = try ImageLock(storage: file, writable: true)
            _ = consume lock
            try file.setLength(0)
            try body(file)
        } catch {
            if file.created { unlink(path) }
            throw error
        }
    }

    /// True when ``init(creating:)`` made the file.
    public let created: Bool

    @inline(__always)
    private func descriptor(_ base: UnsafeRawPointer?, _ count: Int, _ offset: UInt64) -> Int32 {
        let a = Self.directAlignment
        if directFD >= 0, count > 0, count % a == 0, Int(offset) % a == 0, Int(bitPattern: base) % a == 0 { return directFD }
        return fd
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
        let n = try onFile(name) { try Syscalls.preadFully(descriptor(buffer.baseAddress, buffer.count, offset), buffer, offset) }
        if n < buffer.count {
            (buffer.baseAddress! + n).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - n)
        }
        return n
    }
    /// The page-cached descriptor only: with O_DIRECT asked for, every read goes to the disk.
    public func readIfCached(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool {
        directFD < 0 && Syscalls.preadIfCached(fd, buffer, offset)
    }
    /// A write into the page cache (the O_DIRECT descriptor unused): a plain pwrite, since ext4
    /// refuses RWF_NOWAIT for buffered writes (EOPNOTSUPP, Linux 6.18); it waits only when
    /// the kernel throttles dirty pages.
    public func writeIfCached(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) -> Bool {
        directFD < 0 && (try? Syscalls.pwriteFully(fd, buffer, offset)) != nil
    }
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try onFile(name) { try Syscalls.pwriteFully(descriptor(buffer.baseAddress, buffer.count, offset), buffer, offset) }
    }
    public func sync() throws { try onFile(name) { try Syscalls.fdatasync(fd) } }
    public func length() throws -> UInt64 { try onFile(name) { try Syscalls.size(fd) } }
    public func setLength(_ length: UInt64) throws { try onFile(name) { try Syscalls.truncate(fd, length) } }
    public func punchHole(at offset: UInt64, length: UInt64) throws -> Bool {
        Syscalls.fallocate(fd, mode: Syscalls.punchHoleMode, offset, length)
    }
    public func zeroRange(at offset: UInt64, length: UInt64) throws -> Bool {
        Syscalls.fallocate(fd, mode: Syscalls.zeroRangeMode, offset, length)
    }
}
