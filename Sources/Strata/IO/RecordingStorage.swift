import Synchronization

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
    public func readIfCached(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool {
        inner.readIfCached(into: buffer, at: offset)
    }
    public func writeIfCached(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) -> Bool {
        guard inner.writeIfCached(buffer, at: offset) else { return false }
        log.withLock { $0.append(.write(offset: offset, bytes: Array(buffer))) }
        return true
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
    public func punchHole(at offset: UInt64, length: UInt64) throws -> Bool {
        let done = try inner.punchHole(at: offset, length: length)
        if done { log.withLock { $0.append(.punchHole(offset: offset, length: length)) } }
        return done
    }
    public func zeroRange(at offset: UInt64, length: UInt64) throws -> Bool {
        // Recorded as the hole it reads as: replay only needs the bytes.
        let done = try inner.zeroRange(at: offset, length: length)
        if done { log.withLock { $0.append(.punchHole(offset: offset, length: length)) } }
        return done
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
