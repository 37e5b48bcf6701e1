/// The one I/O layer every image read, write and flush goes through.
///
/// The engine never touches a file descriptor directly: it sees a `BlockStorage`. The server
/// and the CLI use ``FileStorage``; tests and fuzzers use ``MemoryStorage``; crash tests wrap
/// either in ``RecordingStorage`` to capture the exact sequence of writes and syncs and replay
/// any prefix of it. A later backend (a network block store) is one more conformer.
///
/// Every method throws ``StrataError`` naming the storage: a failed system call is converted
/// where it happens, once, so the rooms above never see a raw errno.
public protocol BlockStorage: AnyObject, Sendable {
    /// Reads up to `buffer.count` bytes at `offset`; bytes past the end of the storage read
    /// as zero. Returns how many bytes came from the storage itself.
    @discardableResult
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int
    /// Reads exactly `buffer.count` bytes at `offset` if that needs no waiting (the bytes are
    /// in memory already), for callers that must not block, such as an event loop. Returns
    /// false when it would wait, fails or comes up short; the caller then uses
    /// ``read(into:at:)`` from a thread that may block.
    func readIfCached(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool
    /// True for a store whose reads and writes go out over a network and complete later
    /// (``readAsync(into:at:io:)``, ``writeAsync(_:at:io:)``).
    var asynchronousIO: Bool { get }
    /// Starts reading exactly `buffer.count` bytes at `offset` (bytes past the end read as
    /// zero), ending in `io` (see ``AsyncIO``). Returns false, having started nothing,
    /// when the store cannot. A store that reads synchronously reads without waiting
    /// (``readIfCached(into:at:)``), at once.
    func readAsync(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, io: AsyncIO) -> Bool
    /// Starts writing all of `buffer` at `offset` inside the store's current length, ending in
    /// `io`. Returns false, having started nothing, when the store cannot. A store that writes
    /// synchronously writes without waiting (``writeIfCached(_:at:)``), at once.
    func writeAsync(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, io: AsyncIO) -> Bool
    /// Writes all of `buffer` at `offset` if that needs no waiting (into memory), for callers
    /// that must not block; false when it would wait or fails (the caller then uses
    /// ``write(_:at:)`` from a thread that may block, which reports the failure).
    func writeIfCached(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) -> Bool
    /// Writes all of `buffer` at `offset`, growing the storage if needed.
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws
    /// Makes every completed write durable.
    func sync() throws
    /// The current length in bytes.
    func length() throws -> UInt64
    /// Sets the length (grows with zeroes or truncates).
    func setLength(_ length: UInt64) throws
    /// Releases the space of a range, which then reads as zeroes. Returns false when the
    /// storage cannot (the bytes are then unchanged).
    @discardableResult
    func punchHole(at offset: UInt64, length: UInt64) throws -> Bool
    /// Makes a range read as zeroes without writing them, keeping its space allocated.
    /// Returns false when the storage cannot (the bytes are then unchanged).
    @discardableResult
    func zeroRange(at offset: UInt64, length: UInt64) throws -> Bool
    /// A name for messages (the path for files).
    var name: String { get }
    /// Releases the store's handles (and with them its locks). Idempotent.
    func close()
}

extension BlockStorage {
    /// Storage that cannot tell never reads without waiting.
    public func readIfCached(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool { false }
    public var asynchronousIO: Bool { false }
    /// A store that reads synchronously reads without waiting, at once, or not at all.
    public func readAsync(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, io: AsyncIO) -> Bool {
        readIfCached(into: buffer, at: offset)
    }
    public func writeAsync(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, io: AsyncIO) -> Bool {
        writeIfCached(buffer, at: offset)
    }
    /// Storage that cannot tell never writes without waiting (a network store waits for it).
    public func writeIfCached(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) -> Bool { false }
    /// Storage without handles of its own (memory) has nothing to release.
    public func close() {}

    /// Reads exactly `count` bytes into a new array (metadata only; never on the data path).
    func readBytes(at offset: UInt64, count: Int) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        try bytes.withUnsafeMutableBytes { _ = try read(into: $0, at: offset) }
        return bytes
    }
    func writeBytes(_ bytes: [UInt8], at offset: UInt64) throws {
        try bytes.withUnsafeBytes { try write($0, at: offset) }
    }
    /// Writes `length` zero bytes at `offset` from the shared zero buffer.
    func writeZeroBytes(at offset: UInt64, length: UInt64) throws {
        var done: UInt64 = 0
        let zeroes = ZeroBuffer.shared
        while done < length {
            let n = Int(min(UInt64(zeroes.count), length - done))
            try write(UnsafeRawBufferPointer(rebasing: zeroes.pointer[0..<n]), at: offset + done)
            done += UInt64(n)
        }
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
