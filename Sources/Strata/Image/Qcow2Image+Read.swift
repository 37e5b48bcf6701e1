/// Where a run of guest bytes comes from.
enum Source: Equatable {
    /// Uncompressed data at this host offset.
    case data(UInt64)
    /// Zeroes; `preallocated` is the host offset (of this byte) when the entry keeps a host cluster, else 0.
    case zero(preallocated: UInt64)
    /// Not in this image: the backing file, or zeroes.
    case backing
    /// A compressed cluster (descriptor) covering the guest cluster at `guestCluster`.
    case compressed(host: UInt64, sectors: UInt64, guestCluster: UInt64)
}

extension Qcow2Image {
    /// The source of the bytes at `guest` and how many bytes (up to `limit`) share it,
    /// stopping at a cluster (or subcluster run) boundary. Lock held.
    func segment(_ guest: UInt64, limit: UInt64) throws -> (Source, UInt64) {
        let g = guest >> clusterBits
        let inCluster = guest & (clusterSize - 1)
        let (raw, bitmap) = try md.entry(g)
        let e = L2Entry(raw: raw)
        if e.hasReservedBits(extended: geometry.extendedL2) {
            throw md.corrupt("L2 entry for guest offset \(g << clusterBits) has reserved bits set (0x\(String(raw, radix: 16)))")
        }
        var length = clusterSize - inCluster
        let source: Source
        if geometry.extendedL2 && !e.isCompressed {
            let bm = SubclusterBitmap(raw: bitmap)
            guard bm.isValid else { throw md.corrupt("extended L2 bitmap for guest offset \(g << clusterBits) marks subclusters both allocated and zero") }
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
                try md.checkHost(host, "L2 entry for guest offset \(g << clusterBits)")
                source = .data(host + inCluster)
            case 2: source = .zero(preallocated: host != 0 ? host + inCluster : 0)
            default: source = .backing
            }
        } else {
            switch e.mapping(clusterBits: md.header.clusterBits, extended: false) {
            case .unallocated: source = .backing
            case .zero(let host): source = .zero(preallocated: host != 0 ? host + inCluster : 0)
            case .data(let host, _):
                try md.checkHost(host, "L2 entry for guest offset \(g << clusterBits)")
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
            case (.backing, .backing): break
            default: return (source, length)
            }
            length += n
        }
        return (source, length)
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        // One lock acquisition per run of same-source bytes (one for a typical request), and
        // none held during the data I/O.
        lock.lock()
        do { try checkRange(offset, UInt64(buffer.count), write: false) } catch { lock.unlock(); throw error }
        let token = beginIO()
        defer { endIO(token) }
        var pos = 0
        while pos < buffer.count {
            let guest = offset + UInt64(pos)
            let r: (Source, UInt64)
            do { r = try run(guest, limit: UInt64(buffer.count - pos)) } catch { lock.unlock(); throw error }
            lock.unlock()
            let (source, n) = r
            try readSource(source, guest: guest, into: UnsafeMutableRawBufferPointer(rebasing: buffer[pos..<pos + Int(n)]))
            pos += Int(n)
            if pos < buffer.count { lock.lock() }
        }
        if buffer.isEmpty { lock.unlock() }
    }

    /// Fills `out` with the bytes a read at `guest` returns, given their source.
    func readSource(_ source: Source, guest: UInt64, into out: UnsafeMutableRawBufferPointer) throws {
        switch source {
        case .data(let host):
            _ = try wrapIO { try storage.read(into: out, at: host) }
        case .zero:
            out.zero()
        case .backing:
            try readBacking(guest: guest, into: out)
        case .compressed(let host, let sectors, let g):
            let cluster = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(clusterSize), alignment: 16)
            defer { cluster.deallocate() }
            try decompress(host: host, sectors: sectors, into: cluster)
            let start = Int(guest - (g << clusterBits))
            out.copyMemory(from: UnsafeRawBufferPointer(rebasing: cluster[start..<start + out.count]))
        }
    }

    /// Reads from the backing file; past its end (or with none), zeroes.
    func readBacking(guest: UInt64, into out: UnsafeMutableRawBufferPointer) throws {
        guard let backing else {
            out.zero()
            return
        }
        let bsize = backing.size
        let avail = guest < bsize ? Int(min(UInt64(out.count), bsize - guest)) : 0
        if avail > 0 { try backing.read(into: UnsafeMutableRawBufferPointer(rebasing: out[0..<avail]), at: guest) }
        if avail < out.count {
            UnsafeMutableRawBufferPointer(rebasing: out[avail...]).zero()
        }
    }

    /// Reads and decompresses one compressed cluster.
    func decompress(host: UInt64, sectors: UInt64, into cluster: UnsafeMutableRawBufferPointer) throws {
        let bytes = sectors * 512 - (host & 511)
        // A compressed cluster never needs more than the cluster plus its sector slack.
        let cap = clusterSize + 1024
        let n = Int(min(bytes, cap))
        guard host + UInt64(n) <= lock.withLock({ md.hostEnd }) * clusterSize + clusterSize else {
            throw md.corrupt("compressed cluster at host offset \(host) lies past the end of the file")
        }
        let input = UnsafeMutableRawBufferPointer.allocate(byteCount: n, alignment: 16)
        defer { input.deallocate() }
        _ = try wrapIO { try storage.read(into: input, at: host) }
        guard Codec.decompress(md.header.compressionType, UnsafeRawBufferPointer(input), into: cluster) else {
            throw StrataError.decompressionFailed(path: path, offset: host)
        }
    }

    public func blockStatus(at offset: UInt64, length: UInt64) throws -> [BlockExtent] {
        lock.lock()
        do { try checkRange(offset, length, write: false) } catch { lock.unlock(); throw error }
        lock.unlock()
        var out: [BlockExtent] = []
        func add(_ e: BlockExtent) {
            if var last = out.last, last.offset + last.length == e.offset, last.status == e.status,
               last.depth == e.depth, last.compressed == e.compressed, !e.compressed,
               (last.hostOffset == nil && e.hostOffset == nil) || (last.hostOffset.map { $0 + last.length } == e.hostOffset) {
                last.length += e.length
                out[out.count - 1] = last
            } else {
                out.append(e)
            }
        }
        var pos: UInt64 = 0
        while pos < length {
            let guest = offset + pos
            let (source, n) = try lock.withLock { try run(guest, limit: length - pos) }
            switch source {
            case .data(let host):
                add(BlockExtent(offset: guest, length: n, status: [], depth: 1, hostOffset: host))
            case .zero(let pre):
                add(BlockExtent(offset: guest, length: n, status: pre != 0 ? [.zero] : [.hole, .zero], depth: 1,
                                hostOffset: pre != 0 ? pre : nil))
            case .compressed:
                add(BlockExtent(offset: guest, length: n, status: [], depth: 1, compressed: true))
            case .backing:
                let bsize = backing?.size ?? 0
                var p = guest
                if let backing, guest < bsize {
                    for var e in try backing.blockStatus(at: guest, length: min(n, bsize - guest)) {
                        if e.depth != 0 { e.depth += 1 }
                        add(e)
                        p = e.offset + e.length
                    }
                }
                if p < guest + n { add(BlockExtent(offset: p, length: guest + n - p, status: [.hole, .zero], depth: 0)) }
            }
            pos += n
        }
        return out
    }
}
