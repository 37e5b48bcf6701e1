#if canImport(Glibc)
import Glibc
#endif

/// A raw disk file: guest offset = file offset. Used as a backing file and as a
/// `-f raw` image of its own.
public final class RawImage: BlockDevice {
    public let storage: any BlockStorage
    public let size: UInt64
    public let isReadOnly: Bool
    public var preferredBlockSize: Int { 4096 }
    public var supportsDiscard: Bool { !isReadOnly }
    private let lock: ImageLock?
    private let cache: CacheMode

    /// Opens a raw file. Writable opens take QEMU-compatible image locks.
    public init(path: String, writable: Bool, forceShare: Bool = false, cache: CacheMode = .writeback) throws {
        let file = try FileStorage(path: path, mode: OpenMode(writable: writable, direct: cache == .none))
        self.lock = forceShare && !writable ? nil : try ImageLock(file: file, writable: writable)
        self.storage = file
        self.size = try file.length()
        self.isReadOnly = !writable
        self.cache = cache
    }

    /// Wraps storage that is already open (tests, in-memory images).
    public init(storage: any BlockStorage, writable: Bool) throws {
        self.storage = storage
        self.size = try storage.length()
        self.isReadOnly = !writable
        self.lock = nil
        self.cache = .writeback
    }

    private func check(_ offset: UInt64, _ length: UInt64) throws {
        guard offset <= size, length <= size - offset else {
            throw StrataError.outOfRange(offset: offset, length: length, size: size)
        }
        if isReadOnly { throw StrataError.readOnly(path: storage.name) }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        guard offset <= size, UInt64(buffer.count) <= size - offset else {
            throw StrataError.outOfRange(offset: offset, length: UInt64(buffer.count), size: size)
        }
        try wrap { _ = try storage.read(into: buffer, at: offset) }
    }
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
        try check(offset, UInt64(buffer.count))
        try wrap {
            try storage.write(buffer, at: offset)
            if fua || cache == .writethrough { try storage.sync() }
        }
    }
    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, fua: Bool) throws {
        try check(offset, length)
        try wrap {
            try ZeroBuffer.shared.write(to: storage, at: offset, length: length)
            if fua || cache == .writethrough { try storage.sync() }
        }
    }
    public func discard(at offset: UInt64, length: UInt64) throws {
        try check(offset, length)
        try wrap { try storage.punchHole(at: offset, length: length) }
    }
    public func flush() throws {
        if !isReadOnly && cache != .unsafe { try wrap { try storage.sync() } }
    }
    public func blockStatus(at offset: UInt64, length: UInt64) throws -> [BlockExtent] {
        guard offset <= size, length <= size - offset else {
            throw StrataError.outOfRange(offset: offset, length: length, size: size)
        }
        return try wrap { try RawExtents.scan(storage, offset: offset, length: length) }
    }
    public func close() throws {
        if !isReadOnly { try wrap { try storage.sync() } }
        (storage as? FileStorage)?.close()
    }

    private func wrap<T>(_ body: () throws -> T) throws -> T {
        do { return try body() } catch let e as SystemCallError {
            throw e.errno == ENOSPC ? StrataError.noSpace(path: storage.name) : StrataError.io(path: storage.name, e)
        }
    }
}

/// Allocation status of a raw file via SEEK_DATA/SEEK_HOLE. Every byte of a raw file belongs
/// to it (depth 1, like QEMU's raw driver); file holes read as zero.
enum RawExtents {
    static func scan(_ storage: any BlockStorage, offset: UInt64, length: UInt64) throws -> [BlockExtent] {
        let end = offset + length
        guard let file = storage as? FileStorage else {
            return [BlockExtent(offset: offset, length: length, status: [], depth: 1, hostOffset: offset)]
        }
        var out: [BlockExtent] = []
        var pos = offset
        while pos < end {
            let data = lseek(file.fd, off_t(pos), SEEK_DATA_WHENCE)
            if data < 0 {
                // ENXIO: no data from here on; anything else: say "data" to be safe.
                if errno == ENXIO { out.append(BlockExtent(offset: pos, length: end - pos, status: [.hole, .zero], depth: 1, hostOffset: pos)); break }
                out.append(BlockExtent(offset: pos, length: end - pos, status: [], depth: 1, hostOffset: pos)); break
            }
            let dataStart = min(UInt64(data), end)
            if dataStart > pos {
                out.append(BlockExtent(offset: pos, length: dataStart - pos, status: [.hole, .zero], depth: 1, hostOffset: pos))
                pos = dataStart
                continue
            }
            let hole = lseek(file.fd, off_t(pos), SEEK_HOLE_WHENCE)
            let dataEnd = hole < 0 ? end : min(UInt64(hole), end)
            out.append(BlockExtent(offset: pos, length: max(dataEnd, pos + 1) - pos, status: [], depth: 1, hostOffset: pos))
            pos = max(dataEnd, pos + 1)
        }
        return out
    }
}

/// A shared, read-only buffer of zero bytes for writing zeroes without allocating.
final class ZeroBuffer: Sendable {
    static let shared = ZeroBuffer()
    let count = 1 << 20
    nonisolated(unsafe) let pointer: UnsafeRawBufferPointer
    private init() {
        let p = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 4096)
        p.zero()
        pointer = UnsafeRawBufferPointer(p)
    }
    func write(to storage: any BlockStorage, at offset: UInt64, length: UInt64) throws {
        var done: UInt64 = 0
        while done < length {
            let n = Int(min(UInt64(count), length - done))
            try storage.write(UnsafeRawBufferPointer(rebasing: pointer[0..<n]), at: offset + done)
            done += UInt64(n)
        }
    }
}
