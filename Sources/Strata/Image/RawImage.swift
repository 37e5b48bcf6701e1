#if canImport(Glibc)
import Glibc
#endif

/// A raw disk file: guest offset = file offset. Used as a backing file and as a
/// `-f raw` image of its own.
///
/// A raw image whose format was probed (the user named no format) refuses writes after which
/// its first sector would probe as another format (EPERM, as QEMU's raw driver does): a
/// guest must never turn its disk into, say, a qcow2 header naming a host file as backing.
public final class RawImage: BlockDevice {
    public let storage: any BlockStorage
    public let size: UInt64
    public let isReadOnly: Bool
    public var preferredBlockSize: Int { 4096 }
    public var supportsDiscard: Bool { !isReadOnly }
    /// The format was probed, not given: writes to the first sector are checked.
    public let probed: Bool
    private let lock: ImageLock?
    private let cache: CacheMode

    /// Opens a raw file. Writable opens take QEMU-compatible image locks.
    public init(path: String, writable: Bool, forceShare: Bool = false, cache: CacheMode = .writeback, probed: Bool = false) throws {
        let file = try Storage.open(path, mode: OpenMode(writable: writable, direct: cache == .none))
        self.lock = forceShare && !writable ? nil : try ImageLock(storage: file, writable: writable)
        self.storage = file
        self.size = try file.length()
        self.isReadOnly = !writable
        self.cache = cache
        self.probed = probed
    }

    /// Wraps storage that is already open (tests, in-memory images).
    public init(storage: any BlockStorage, writable: Bool, probed: Bool = false) throws {
        self.storage = storage
        self.size = try storage.length()
        self.isReadOnly = !writable
        self.lock = nil
        self.cache = .writeback
        self.probed = probed
    }

    /// Creates a raw image of `size` bytes (sparse), replacing any file at `path`: an
    /// existing file is locked (refused while another process uses it), then truncated, so
    /// none of its old bytes or format survive. A file this call made is removed if it fails.
    public static func create(path: String, size: UInt64) throws {
        try Storage.replacing(path) { file in
            try file.setLength(size)
            try file.sync()
        }
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
        _ = try storage.read(into: buffer, at: offset)
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
        try check(offset, UInt64(buffer.count))
        if probed, offset < UInt64(FormatProbe.sectorSize), buffer.count > 0 {
            try checkFirstSector(after: buffer, at: offset)
        }
        try storage.write(buffer, at: offset)
        if fua || cache == .writethrough { try storage.sync() }
    }

    /// Refuses a write after which the first sector would probe as another format.
    private func checkFirstSector(after buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        var sector = [UInt8](repeating: 0, count: FormatProbe.sectorSize)
        try sector.withUnsafeMutableBytes { s in
            _ = try storage.read(into: s, at: 0)
            let n = min(buffer.count, FormatProbe.sectorSize - Int(offset))
            (s.baseAddress! + Int(offset)).copyMemory(from: buffer.baseAddress!, byteCount: n)
        }
        if let format = sector.withUnsafeBytes({ FormatProbe.signature(of: $0) }) {
            throw StrataError.formatChangeRefused(path: storage.name, format: format)
        }
    }

    /// Zeroes by deallocating (with `mayUnmap`, the range becomes a hole) or by zeroing the
    /// range in place; writes zero bytes only where the file system can do neither.
    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, fua: Bool) throws {
        try check(offset, length)
        let done = mayUnmap ? try storage.punchHole(at: offset, length: length) : try storage.zeroRange(at: offset, length: length)
        if !done { try storage.writeZeroBytes(at: offset, length: length) }
        if fua || cache == .writethrough { try storage.sync() }
    }
    public func discard(at offset: UInt64, length: UInt64) throws {
        try check(offset, length)
        try storage.punchHole(at: offset, length: length)
    }
    public func flush() throws {
        if !isReadOnly && cache != .unsafe { try storage.sync() }
    }
    public func blockStatus(at offset: UInt64, length: UInt64) throws -> [BlockExtent] {
        guard offset <= size, length <= size - offset else {
            throw StrataError.outOfRange(offset: offset, length: length, size: size)
        }
        return RawExtents.scan(storage, offset: offset, length: length)
    }
    public func close() throws {
        if !isReadOnly { try storage.sync() }
        storage.close()
    }
}

/// Allocation status of a raw file via SEEK_DATA/SEEK_HOLE. Every byte of a raw file belongs
/// to it (depth 1, like QEMU's raw driver); file holes read as zero.
enum RawExtents {
    static func scan(_ storage: any BlockStorage, offset: UInt64, length: UInt64) -> [BlockExtent] {
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
