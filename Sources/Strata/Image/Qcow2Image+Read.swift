/// Where a run of guest bytes comes from.
enum Source: Equatable {
    /// Uncompressed data at this host offset.
    case data(UInt64)
    /// Zeroes; `preallocated` is the host offset (of this byte) when the entry keeps a host cluster, else 0.
    case zero(preallocated: UInt64)
    /// Not in this image: the backing file, or zeroes. `hint` is the host offset of this
    /// byte when its cluster is allocated but the subcluster is not (extended L2), else 0:
    /// qemu-img map shows it when no backing file answers.
    case backing(hint: UInt64)
    /// A compressed cluster (descriptor) covering the guest cluster at `guestCluster`.
    case compressed(host: UInt64, sectors: UInt64, guestCluster: UInt64)

    /// Reads as zeroes without any data I/O in this image.
    var isZero: Bool { if case .zero = self { return true } else { return false } }
}

/// Where a read puts each run: given a run's guest offset, length and whether it reads as
/// zeroes without data I/O, the buffer for its bytes (exactly `length` bytes), or nil for a
/// zero run the caller does not want filled. Runs arrive in order and cover the read.
public typealias ReadSink = (_ offset: UInt64, _ length: Int, _ zero: Bool) throws -> UnsafeMutableRawBufferPointer?

extension Qcow2Image {
    /// The source of the bytes at `guest` and how many bytes (up to `limit`) share it,
    /// stopping at a cluster (or subcluster run) boundary, or, where L2 tables are missing,
    /// at the next allocated table (an empty disk is one step per allocated table). Lock held.
    func segment(_ guest: UInt64, limit: UInt64) throws -> (Source, UInt64) {
        let g = guest >> clusterBits
        let perTable = geometry.l2Entries
        let i = Int(g / perTable)
        let map = md.map
        guard i < map.l1.count, let table = try map.table(i) else {
            let next = UInt64(map.nextAllocated(in: map.l1, from: i + 1))
            let (end, overflow) = (next * geometry.l2Coverage).subtractingReportingOverflow(guest)
            return (.backing(hint: 0), overflow ? limit : min(end, limit))
        }
        let inCluster = guest & (clusterSize - 1)
        let (raw, bitmap) = ClusterMap.read(table, Int(g % perTable), extended: geometry.extendedL2)
        let e = L2Entry(raw: raw)
        if e.hasReservedBits(extended: geometry.extendedL2) {
            throw md.file.corrupt(.reservedBits, at: table.offset + (g % perTable) * geometry.l2EntryBytes,
                                  "L2 entry for guest offset \(g << clusterBits) has reserved bits set (0x\(String(raw, radix: 16)))")
        }
        var length = clusterSize - inCluster
        let source: Source
        if geometry.extendedL2 && !e.isCompressed {
            let bm = SubclusterBitmap(raw: bitmap)
            guard bm.isValid else {
                throw md.file.corrupt(.invalidSubclusterBitmap, at: table.offset + (g % perTable) * 16 + 8,
                                      "extended L2 bitmap for guest offset \(g << clusterBits) marks subclusters both allocated and zero")
            }
            let sc = geometry.subclusterSize
            let j = Int(inCluster / sc)
            func state(_ k: Int) -> Int { bm.allocated & (1 << k) != 0 ? 1 : (bm.zero & (1 << k) != 0 ? 2 : 0) }
            let st = state(j)
            var k = j + 1
            while k < 32 && state(k) == st { k += 1 }
            length = UInt64(k) * sc - inCluster
            let host = e.hostOffset
            switch st {
            case 1:
                try md.file.checkHost(host, "L2 entry for guest offset \(g << clusterBits)")
                source = .data(host + inCluster)
            case 2: source = .zero(preallocated: host != 0 ? host + inCluster : 0)
            default: source = .backing(hint: host != 0 ? host + inCluster : 0)
            }
        } else {
            switch e.mapping(clusterBits: UInt32(clusterBits), extended: false) {
            case .unallocated: source = .backing(hint: 0)
            case .zero(let host): source = .zero(preallocated: host != 0 ? host + inCluster : 0)
            case .data(let host, _):
                try md.file.checkHost(host, "L2 entry for guest offset \(g << clusterBits)")
                source = .data(host + inCluster)
            case .compressed(let host, let sectors):
                source = .compressed(host: host, sectors: sectors, guestCluster: g)
            }
        }
        return (source, min(length, limit))
    }

    /// Like ``segment(_:limit:)``, but merges following segments that continue the same
    /// source (contiguous host data, zeroes, backing). Lock held.
    func run(_ guest: UInt64, limit: UInt64) throws -> (Source, UInt64) {
        var (source, length) = try segment(guest, limit: limit)
        if case .compressed = source { return (source, length) }
        while length < limit {
            let (next, n) = try segment(guest + length, limit: limit - length)
            switch (source, next) {
            case (.data(let a), .data(let b)) where b == a + length: break
            case (.zero(let a), .zero(let b)) where (a == 0 && b == 0) || (a != 0 && b == a + length): break
            case (.backing(let a), .backing(let b)) where (a == 0 && b == 0) || (a != 0 && b == a + length): break
            default: return (source, length)
            }
            length += n
        }
        return (source, length)
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try read(at: offset, length: buffer.count) { off, n, _ in
            let s = Int(off - offset)
            return UnsafeMutableRawBufferPointer(rebasing: buffer[s..<s + n])
        }
    }

    /// Reads `length` bytes at `offset` in one pass over the mapping, handing each run to
    /// `sink` (see ``ReadSink``): the data of a run is read straight into the buffer the sink
    /// gives, and runs that read as zeroes are reported as such (zero-filled only when the
    /// sink gives a buffer). The metadata lock is taken once per run of same-source bytes
    /// (once for a typical request) and never held during data I/O.
    public func read(at offset: UInt64, length: Int, runs sink: ReadSink) throws {
        try guarded {
            lock.lock()
            do { try checkRange(offset, UInt64(length), write: false) } catch { lock.unlock(); throw error }
            let token = beginIO()
            defer { endIO(token) }
            var pos = 0
            while pos < length {
                let guest = offset + UInt64(pos)
                let r: (Source, UInt64)
                do { r = try run(guest, limit: UInt64(length - pos)) } catch { lock.unlock(); throw error }
                lock.unlock()
                try deliver(r.0, guest: guest, length: Int(r.1), to: sink)
                pos += Int(r.1)
                if pos < length { lock.lock() }
            }
            if length == 0 { lock.unlock() }
        }
    }

    /// The read of ``read(at:length:runs:)`` when it needs no waiting: the lock is free,
    /// every L2 table it needs is cached, and the data is in the page cache. Backing files
    /// are asked the same way; compressed clusters and resolved chains are left to the
    /// blocking read (decompressing is work for the I/O threads, not the caller's loop).
    public func readIfCached(at offset: UInt64, length: Int, runs sink: ReadSink) -> Bool {
        readWithoutWaiting(at: offset, length: length, runs: sink, io: nil)
    }

    public var asynchronousIO: Bool { storage.asynchronousIO }

    /// The same walk as ``readIfCached(at:length:runs:)``, with the data reads started on the
    /// store and each run's I/O token held until they end (a quiesce waits for them).
    public func startRead(at offset: UInt64, length: Int, runs sink: ReadSink, io: AsyncIO) -> Bool {
        readWithoutWaiting(at: offset, length: length, runs: sink, io: io)
    }

    private func readWithoutWaiting(at offset: UInt64, length: Int, runs sink: ReadSink, io: AsyncIO?) -> Bool {
        var pos = 0
        while pos < length {
            guard lock.tryLock() else { return false }
            let guest = offset + UInt64(pos)
            let r = lookupWithoutWaiting(offset, UInt64(length), write: false) { try run(guest, limit: UInt64(length - pos)) }
            let token = r != nil ? beginIO() : 0
            lock.unlock()
            guard let r else { return false }
            let (source, n) = r
            if let io { io.hold { self.endIO(token) } }
            defer { if io == nil { endIO(token) } }
            guard deliverIfCached(source, guest: guest, length: Int(n), to: sink, io: io) else { return false }
            pos += Int(n)
        }
        return true
    }

    /// Lock held: `lookup` run with loads of L2 tables refused (``ClusterMap/cachedOnly``),
    /// after the checks every request makes (no quiesce in progress, the range inside the
    /// disk). Nil when a check or the lookup fails: the caller's attempt without waiting ends.
    func lookupWithoutWaiting<T>(_ offset: UInt64, _ length: UInt64, write: Bool, _ lookup: () throws -> T) -> T? {
        guard quiescer == nil, (try? checkRange(offset, length, write: write)) != nil else { return nil }
        md.map.cachedOnly = true
        defer { md.map.cachedOnly = false }
        return try? lookup()
    }

    private func deliverIfCached(_ source: Source, guest: UInt64, length: Int, to sink: ReadSink, io: AsyncIO?) -> Bool {
        do {
            switch source {
            case .zero:
                try sink(guest, length, true)?.zero()
                return true
            case .data(let host):
                guard let out = try sink(guest, length, false) else { return true }
                if let io { return storage.readAsync(into: out, at: host, io: io) }
                return storage.readIfCached(into: out, at: host)
            case .backing:
                guard chainResolution == nil else { return false }
                let bsize = backing?.size ?? 0
                let avail = guest < bsize ? Int(min(UInt64(length), bsize - guest)) : 0
                if avail > 0, let backing {
                    let started = io.map { backing.startRead(at: guest, length: avail, runs: sink, io: $0) }
                        ?? backing.readIfCached(at: guest, length: avail, runs: sink)
                    if !started { return false }
                }
                if avail < length { try sink(guest + UInt64(avail), length - avail, true)?.zero() }
                return true
            case .compressed:
                return false
            }
        } catch {
            return false
        }
    }

    /// Hands one run to the sink and reads its bytes. Lock not held.
    func deliver(_ source: Source, guest: UInt64, length: Int, to sink: ReadSink) throws {
        switch source {
        case .backing:
            try readBacking(at: guest, length: length, to: sink)
        case .zero:
            try sink(guest, length, true)?.zero()
        case .data, .compressed:
            guard let out = try sink(guest, length, false) else { return }
            try readSource(source, guest: guest, into: out)
        }
    }

    /// Fills `out` with the bytes a read at `guest` returns, given their source.
    func readSource(_ source: Source, guest: UInt64, into out: UnsafeMutableRawBufferPointer) throws {
        switch source {
        case .data(let host):
            _ = try storage.read(into: out, at: host)
        case .zero:
            out.zero()
        case .backing:
            try readBacking(at: guest, length: out.count) { off, n, _ in
                let s = Int(off - guest)
                return UnsafeMutableRawBufferPointer(rebasing: out[s..<s + n])
            }
        case .compressed(let host, let sectors, let g):
            let cluster = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(clusterSize), alignment: 16)
            defer { cluster.deallocate() }
            try decompress(host: host, sectors: sectors, into: cluster)
            let start = Int(guest - (g << clusterBits))
            out.copyMemory(from: UnsafeRawBufferPointer(rebasing: cluster[start..<start + out.count]))
        }
    }

    /// Reads from the backing file, whose own runs (and zero runs) go to the sink; past its
    /// end (or with none), one zero run.
    func readBacking(at guest: UInt64, length: Int, to sink: ReadSink) throws {
        if let chain = chainResolution, try chain.read(at: guest, length: length, to: sink) { return }
        let bsize = backing?.size ?? 0
        let avail = guest < bsize ? Int(min(UInt64(length), bsize - guest)) : 0
        if avail > 0, let backing { try backing.read(at: guest, length: avail, runs: sink) }
        if avail < length { try sink(guest + UInt64(avail), length - avail, true)?.zero() }
    }

    /// Reads and decompresses one compressed cluster.
    func decompress(host: UInt64, sectors: UInt64, into cluster: UnsafeMutableRawBufferPointer) throws {
        let bytes = sectors * 512 - (host & 511)
        // A compressed cluster never needs more than the cluster plus its sector slack.
        let cap = clusterSize + 1024
        let n = Int(min(bytes, cap))
        guard host + UInt64(n) <= lock.withLock({ md.file.hostEnd }) * clusterSize + clusterSize else {
            throw md.file.corrupt(.compressedData, at: host, "compressed cluster at host offset \(host) lies past the end of the file")
        }
        let input = UnsafeMutableRawBufferPointer.allocate(byteCount: n, alignment: 16)
        defer { input.deallocate() }
        _ = try storage.read(into: input, at: host)
        guard Codec.decompress(md.file.header.compressionType, UnsafeRawBufferPointer(input), into: cluster) else {
            throw md.file.corrupt(.compressedData, at: host, "compressed cluster at host offset \(host) does not decompress")
        }
    }

    /// Describes `[offset, offset+length)` extent by extent, in order, merging neighbours
    /// that agree; stops early when `body` returns false. Unallocated L2 tables (and backing
    /// ranges) are stepped over whole, so an empty disk of any size takes a few steps.
    public func forEachExtent(at offset: UInt64, length: UInt64, _ body: (BlockExtent) throws -> Bool) throws {
        try guarded {
            try lock.withLock { try checkRange(offset, length, write: false) }
            try withoutActuallyEscaping(body) { body in
            var merger = ExtentMerger(body)
            var pos: UInt64 = 0
            while pos < length, !merger.stopped {
                let guest = offset + pos
                let (source, n) = try lock.withLock { try run(guest, limit: length - pos) }
                switch source {
                case .data(let host):
                    try merger.add(BlockExtent(offset: guest, length: n, status: [], depth: 1, hostOffset: host))
                case .zero(let pre):
                    try merger.add(BlockExtent(offset: guest, length: n, status: pre != 0 ? [.zero] : [.hole, .zero], depth: 1,
                                               hostOffset: pre != 0 ? pre : nil))
                case .compressed:
                    try merger.add(BlockExtent(offset: guest, length: n, status: [], depth: 1, compressed: true))
                case .backing(let hint):
                    let bsize = backing?.size ?? 0
                    var p = guest
                    if let backing, guest < bsize {
                        try backing.forEachExtent(at: guest, length: min(n, bsize - guest)) { e in
                            var e = e
                            if e.depth != 0 { e.depth += 1 }
                            try merger.add(e)
                            p = e.offset + e.length
                            return !merger.stopped
                        }
                    }
                    if p < guest + n, !merger.stopped {
                        try merger.add(BlockExtent(offset: p, length: guest + n - p, status: [.hole, .zero], depth: 0,
                                                   hostOffset: hint != 0 ? hint + (p - guest) : nil))
                    }
                }
                pos += n
            }
            try merger.finish()
            }
        }
    }

    public func blockStatus(at offset: UInt64, length: UInt64) throws -> [BlockExtent] {
        var out: [BlockExtent] = []
        try forEachExtent(at: offset, length: length) { out.append($0); return true }
        return out
    }
}

/// Merges consecutive extents that agree (status, depth, contiguous host offsets; never
/// compressed ones) before handing them on.
struct ExtentMerger {
    private var pending: BlockExtent?
    private let body: (BlockExtent) throws -> Bool
    private(set) var stopped = false

    init(_ body: @escaping (BlockExtent) throws -> Bool) { self.body = body }

    mutating func add(_ e: BlockExtent) throws {
        guard !stopped, e.length > 0 else { return }
        if var last = pending, last.offset + last.length == e.offset, last.status == e.status,
           last.depth == e.depth, last.compressed == e.compressed, !e.compressed,
           (last.hostOffset == nil && e.hostOffset == nil) || (last.hostOffset.map { $0 + last.length } == e.hostOffset) {
            last.length += e.length
            pending = last
            return
        }
        if let last = pending, try !body(last) { stopped = true; pending = nil; return }
        pending = e
    }

    mutating func finish() throws {
        if let last = pending, !stopped { _ = try body(last) }
        pending = nil
    }
}
