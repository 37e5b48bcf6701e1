/// What one extent of a disk is, as block status reports it.
public struct ExtentStatus: OptionSet, Sendable, Hashable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    /// The range is not allocated in the top image's data (a hole: NBD_STATE_HOLE).
    public static let hole = ExtentStatus(rawValue: 1)
    /// The range reads as zeroes (NBD_STATE_ZERO).
    public static let zero = ExtentStatus(rawValue: 2)
}

/// One run of same-status bytes of a disk.
public struct BlockExtent: Sendable, Hashable {
    /// Guest offset of the run.
    public var offset: UInt64
    /// Length in bytes.
    public var length: UInt64
    /// Hole/zero status of the data as a reader sees it (backing included).
    public var status: ExtentStatus
    /// Which image in the chain holds the data: 1 for the top image, 2 for its backing file,
    /// ..., 0 when no image in the chain allocates it (qemu's `qemu:allocation-depth`).
    public var depth: UInt32
    /// Host offset in the image that holds it, for uncompressed data (qemu-img map's `offset`).
    public var hostOffset: UInt64?
    /// True for a compressed cluster.
    public var compressed: Bool

    public init(offset: UInt64, length: UInt64, status: ExtentStatus, depth: UInt32, hostOffset: UInt64? = nil, compressed: Bool = false) {
        self.offset = offset
        self.length = length
        self.status = status
        self.depth = depth
        self.hostOffset = hostOffset
        self.compressed = compressed
    }
}

/// A virtual disk that serves reads and writes at any byte offset: an open qcow2 image or raw file.
///
/// All methods are safe to call from many threads at once. Methods block (they do file I/O);
/// callers on an event loop must hop to a thread pool first.
public protocol BlockDevice: AnyObject, Sendable {
    /// Virtual size in bytes.
    var size: UInt64 { get }
    /// Whether writes are refused.
    var isReadOnly: Bool { get }
    /// The natural I/O unit: the cluster size for qcow2, 4 KiB for raw.
    var preferredBlockSize: Int { get }
    /// True when discard really frees space (`false` for a read-only device).
    var supportsDiscard: Bool { get }

    /// Reads `buffer.count` bytes at `offset`.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws
    /// Writes `buffer` at `offset`; with `fua`, the data is durable on return.
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws
    /// Makes the range read as zeroes. With `mayUnmap`, whole clusters may be deallocated.
    func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool, fua: Bool) throws
    /// Discards the range: whole clusters are freed and then read as zeroes; partial clusters
    /// keep their data (discard is advisory).
    func discard(at offset: UInt64, length: UInt64) throws
    /// Makes every completed write durable.
    func flush() throws
    /// Describes `[offset, offset+length)` as a list of extents covering it in order (the last one
    /// may be cut at `offset+length`).
    func blockStatus(at offset: UInt64, length: UInt64) throws -> [BlockExtent]
    /// Describes `[offset, offset+length)` extent by extent, in order, until `body` returns
    /// false. Costs follow the allocated data, not the range's size.
    func forEachExtent(at offset: UInt64, length: UInt64, _ body: (BlockExtent) throws -> Bool) throws
    /// Reads `length` bytes at `offset` in one pass, run by run (see ``ReadSink``): data runs
    /// are read into the buffers the sink gives, and runs that read as zeroes without any
    /// data I/O are reported as zero runs.
    func read(at offset: UInt64, length: Int, runs sink: ReadSink) throws
    /// ``read(at:length:runs:)`` if it can be done without waiting: the metadata it needs is
    /// in memory, no lock is held by another thread, and the data is in the page cache. For
    /// an event loop, which must never block. Returns false when it would wait (or anything
    /// fails); the sink may have been given some of the runs by then, and the caller redoes
    /// the whole read with ``read(at:length:runs:)`` on a thread that may block.
    func readIfCached(at offset: UInt64, length: Int, runs sink: ReadSink) -> Bool
    /// True when the device's store works asynchronously (RBD): then
    /// ``startRead(at:length:runs:io:)`` is how a caller that must not block reads.
    var asynchronousIO: Bool { get }
    /// ``readIfCached(at:length:runs:)`` for a store that reads asynchronously: the metadata
    /// lookups are made without waiting (as there), and the data reads are started and end in
    /// `io` instead of being waited for. Returns false when it would wait for metadata or
    /// cannot read this way; reads already started still end in `io`, so the caller
    /// always calls ``AsyncIO/finishStarting(ok:)`` (with the return value) and acts in
    /// the completion: reply on true, redo the read on a thread that may block on false.
    func startRead(at offset: UInt64, length: Int, runs sink: ReadSink, io: AsyncIO) -> Bool
    /// ``writeInPlaceIfCached(_:at:)`` for a store that works asynchronously: the write is
    /// started and ends in `io`. The caller acts as for ``startRead(at:length:runs:io:)``.
    func startWrite(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, io: AsyncIO) -> Bool
    /// ``write(_:at:fua:)`` without FUA if it needs no metadata change and no waiting for
    /// another request (an overwrite of data the device already holds; see
    /// ``Qcow2Image/writeInPlaceIfCached(_:at:)``). For an event loop. Returns false, having
    /// written nothing, otherwise; the caller then writes from a thread that may block.
    func writeInPlaceIfCached(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) -> Bool
    /// Flushes and releases the device (dirty state written, locks dropped). Idempotent.
    func close() throws
    /// Whether ``writeZeroes(at:length:mayUnmap:fua:)`` on this range changes only metadata
    /// (no zero data is written): NBD's FAST_ZERO asks for exactly this.
    func zeroingIsCheap(at offset: UInt64, length: UInt64) -> Bool
}

extension BlockDevice {
    public func zeroingIsCheap(at offset: UInt64, length: UInt64) -> Bool { false }

    /// A device that cannot tell always answers "would wait".
    public func readIfCached(at offset: UInt64, length: Int, runs sink: ReadSink) -> Bool { false }

    public var asynchronousIO: Bool { false }
    public func startRead(at offset: UInt64, length: Int, runs sink: ReadSink, io: AsyncIO) -> Bool { false }

    public func startWrite(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, io: AsyncIO) -> Bool { false }

    /// A device that cannot tell never writes without a hop.
    public func writeInPlaceIfCached(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) -> Bool { false }

    /// ``read(into:at:)`` if it can be done without waiting; false otherwise (see
    /// ``readIfCached(at:length:runs:)``).
    public func readIfCached(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool {
        readIfCached(at: offset, length: buffer.count) { off, n, _ in
            let s = Int(off - offset)
            return UnsafeMutableRawBufferPointer(rebasing: buffer[s..<s + n])
        }
    }

    /// Block status as one list, for devices that only implement ``blockStatus(at:length:)``.
    public func forEachExtent(at offset: UInt64, length: UInt64, _ body: (BlockExtent) throws -> Bool) throws {
        for e in try blockStatus(at: offset, length: length) where try !body(e) { return }
    }

    /// Runs from the device's extents: ranges its block status says read as zeroes are zero
    /// runs, the rest is read (a raw file's holes, or any device that describes its extents).
    public func read(at offset: UInt64, length: Int, runs sink: ReadSink) throws {
        guard offset <= size, UInt64(length) <= size - offset else {
            throw StrataError.outOfRange(offset: offset, length: UInt64(length), size: size)
        }
        try forEachRun(from: offset, to: offset + UInt64(length)) { o, n, ext in
            let zero = ext?.status.contains(.zero) ?? false
            guard let out = try sink(o, Int(n), zero) else { return true }
            if zero { out.zero() } else { try read(into: out, at: o) }
            return true
        }
    }

    /// Walks `[start, end)` in the order of the device's extents, as runs known to read as
    /// zeroes or not; a gap the device leaves undescribed counts as data. The one extent
    /// walker of the commands (convert, compare, map) and the server.
    public func forEachRun(from start: UInt64, to end: UInt64, _ body: (_ offset: UInt64, _ length: UInt64, _ extent: BlockExtent?) throws -> Bool) throws {
        var pos = start
        var stopped = false
        guard end > start else { return }
        try forEachExtent(at: start, length: end - start) { ext in
            let s = max(ext.offset, pos), e = min(ext.offset + ext.length, end)
            guard e > s else { return true }
            if s > pos {
                guard try body(pos, s - pos, nil) else { stopped = true; return false }
            }
            guard try body(s, e - s, ext) else { stopped = true; return false }
            pos = e
            return pos < end
        }
        if pos < end, !stopped { _ = try body(pos, end - pos, nil) }
    }
}
