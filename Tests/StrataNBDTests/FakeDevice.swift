import Foundation
import Strata
import Synchronization

@testable import StrataNBD

/// A block device in memory with scripted extents and injectable failures, for driving the
/// export and the handlers without files.
final class FakeDevice: BlockDevice, @unchecked Sendable {
    // Protected by `lock`.
    private let lock = NSLock()
    private var bytes: [UInt8]
    private var _extents: [BlockExtent]?
    private var _failure: StrataError?
    private var _calls: [String] = []
    private var _size: UInt64
    /// Writes wait while the gate is closed (to hold requests in flight).
    private let gate = NSCondition()
    // Protected by `gate`.
    private var gateClosed = false
    private var _waitingWriters = 0

    let isReadOnly: Bool
    let preferredBlockSize: Int
    var supportsDiscard: Bool { !isReadOnly }

    init(size: Int, readOnly: Bool = false, preferredBlockSize: Int = 65536) {
        bytes = [UInt8](repeating: 0, count: size)
        self._size = UInt64(size)
        self.isReadOnly = readOnly
        self.preferredBlockSize = preferredBlockSize
    }

    /// The virtual size; setting it stands in for an online resize (the bytes are not resized,
    /// so only the size checks see it).
    var size: UInt64 {
        get { lock.withLock { _size } }
        set { lock.withLock { _size = newValue } }
    }

    /// What `blockStatus` answers (nil: the whole range as allocated data at depth 1).
    var extents: [BlockExtent]? {
        get { lock.withLock { _extents } }
        set { lock.withLock { _extents = newValue } }
    }
    /// When set, every call throws it.
    var failure: StrataError? {
        get { lock.withLock { _failure } }
        set { lock.withLock { _failure = newValue } }
    }
    /// The calls made, in order ("write 0 512 fua", ...).
    var calls: [String] { lock.withLock { _calls } }
    var contents: [UInt8] { lock.withLock { bytes } }

    private func record(_ call: String) throws {
        try lock.withLock {
            _calls.append(call)
            if let f = _failure { throw f }
        }
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try record("read \(offset) \(buffer.count)")
        lock.withLock { bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(offset)..<Int(offset) + buffer.count])) } }
    }
    /// Stalls every write until ``openGate()``.
    func closeGate() { gate.withLock { gateClosed = true } }
    /// Writes stalled at the closed gate right now.
    var waitingWriters: Int { gate.withLock { _waitingWriters } }
    func openGate() {
        gate.withLock {
            gateClosed = false
            gate.broadcast()
        }
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
        gate.withLock {
            _waitingWriters += 1
            while gateClosed { gate.wait() }
            _waitingWriters -= 1
        }
        try record("write \(offset) \(buffer.count)\(fua ? " fua" : "")")
        lock.withLock { bytes.replaceSubrange(Int(offset)..<Int(offset) + buffer.count, with: buffer) }
    }
    func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, fua: Bool) throws {
        try record("zero \(offset) \(length)\(mayUnmap ? " unmap" : "")\(fua ? " fua" : "")")
        lock.withLock { bytes.replaceSubrange(Int(offset)..<Int(offset + length), with: repeatElement(0, count: Int(length))) }
    }
    func discard(at offset: UInt64, length: UInt64) throws {
        try record("discard \(offset) \(length)")
    }
    func flush() throws { try record("flush") }
    func blockStatus(at offset: UInt64, length: UInt64) throws -> [BlockExtent] {
        try record("status \(offset) \(length)")
        return extents ?? [BlockExtent(offset: offset, length: length, status: [], depth: 1)]
    }
    func close() throws { try record("close") }
}
