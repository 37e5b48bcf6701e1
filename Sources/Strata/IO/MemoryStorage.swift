#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// Storage in memory, for tests and fuzzing (capped at ``Limits/maxMemoryStorage``).
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
    /// Memory never waits for a disk: whole reads inside the storage succeed.
    public func readIfCached(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool {
        guard let n = try? read(into: buffer, at: offset) else { return false }
        return n == buffer.count
    }
    /// Memory never waits for a disk.
    public func writeIfCached(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) -> Bool {
        (try? write(buffer, at: offset)) != nil
    }
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try bytes.withLock { b in
            guard offset <= UInt64(Int.max) - UInt64(buffer.count), offset + UInt64(buffer.count) <= Limits.maxMemoryStorage else {
                throw StrataError.noSpace(path: name)
            }
            let end = Int(offset) + buffer.count
            if end > b.count { b.append(contentsOf: [UInt8](repeating: 0, count: end - b.count)) }
            if buffer.count > 0 { b.withUnsafeMutableBytes { ($0.baseAddress! + Int(offset)).copyMemory(from: buffer.baseAddress!, byteCount: buffer.count) } }
        }
    }
    public func sync() throws {}
    public func length() throws -> UInt64 { bytes.withLock { UInt64($0.count) } }
    public func setLength(_ length: UInt64) throws {
        guard length <= Limits.maxMemoryStorage else { throw StrataError.noSpace(path: name) }
        bytes.withLock { b in
            if Int(length) < b.count { b.removeLast(b.count - Int(length)) } else { b.append(contentsOf: [UInt8](repeating: 0, count: Int(length) - b.count)) }
        }
    }
    public func punchHole(at offset: UInt64, length: UInt64) throws -> Bool {
        bytes.withLock { b in
            let s = Int(clamping: min(offset, UInt64(b.count)))
            let e = Int(clamping: min(offset &+ length, UInt64(b.count)))
            if s < e { b.withUnsafeMutableBytes { _ = memset($0.baseAddress! + s, 0, e - s) } }
        }
        return true
    }
    public func zeroRange(at offset: UInt64, length: UInt64) throws -> Bool {
        try punchHole(at: offset, length: length)
    }
}
