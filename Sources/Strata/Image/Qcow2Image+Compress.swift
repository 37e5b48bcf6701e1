import Synchronization

/// Compressed writes: one whole guest cluster compressed (by the caller's
/// ``ClusterCompressor``, outside any lock) and stored QEMU's way, as a byte range packed
/// into host clusters shared with other compressed clusters.
///
/// Crash order is the write pipeline's: the compressed bytes are written before the entry
/// changes, and a flush makes data durable before the L2 table that points at it. A later
/// write into the cluster copies it on write to a normal cluster (compressed entries are
/// never "owned", see ``L2Entry/ownedHost``).
extension Qcow2Image {
    /// A compressor for this image's compression type and cluster size (one per thread).
    public func makeCompressor() -> ClusterCompressor {
        ClusterCompressor(type: header.compressionType, clusterSize: Int(clusterSize))
    }

    /// Writes the guest cluster at `offset` (cluster-aligned) compressed. `cluster` holds the
    /// whole cluster, or only the bytes up to the end of the disk for its partial last
    /// cluster (padded with zeroes for the compression). A cluster that does not shrink is
    /// written uncompressed; returns whether it was stored compressed.
    @discardableResult
    public func writeCompressed(_ cluster: UnsafeRawBufferPointer, at offset: UInt64, compressor: ClusterCompressor) throws -> Bool {
        precondition(compressor.clusterSize == Int(clusterSize), "compressor made for another cluster size")
        let compressed = compressor.compress(cluster)
        try writeCompressed(precompressed: compressed, cluster: cluster, at: offset)
        return compressed != nil
    }

    /// Writes the guest cluster at `offset` from bytes a ``ClusterCompressor`` of this image
    /// made earlier (on another thread, say): `compressed` (smaller than a cluster), or nil
    /// when the cluster did not shrink and `cluster` is written uncompressed.
    public func writeCompressed(precompressed compressed: UnsafeRawBufferPointer?, cluster: UnsafeRawBufferPointer, at offset: UInt64) throws {
        let size = self.size
        guard offset % clusterSize == 0, offset < size,
              UInt64(cluster.count) == min(clusterSize, size - offset) else {
            throw StrataError.invalidOption(path: path, reason: "a compressed write covers exactly one whole cluster (offset \(offset), \(cluster.count) bytes)")
        }
        guard let compressed else {
            try perform(.data(cluster), at: offset, length: UInt64(cluster.count))
            return
        }
        precondition(!compressed.isEmpty && UInt64(compressed.count) < clusterSize, "compressed bytes must be smaller than a cluster")
        try perform(.compressed(compressed), at: offset, length: UInt64(cluster.count))
    }

    /// Plans the compressed write of guest cluster `g` (`bytes` compressed bytes, `length`
    /// guest bytes): waits until the cluster is not busy, takes the byte range, marks the
    /// cluster busy and pins its table. Lock held.
    func planCompressed(_ g: UInt64, bytes: UInt64, length: UInt64) throws -> CompressedWrite {
        while busy.contains(g) { lock.wait() }
        let perTable = geometry.l2Entries
        let table = try md.map.writableTable(Int(g / perTable))
        let j = Int(g % perTable)
        let raw = ClusterMap.read(table, j, extended: geometry.extendedL2).raw
        if L2Entry(raw: raw).hasReservedBits(extended: geometry.extendedL2) {
            throw md.file.corrupt(.reservedBits, at: table.offset + UInt64(j) * geometry.l2EntryBytes,
                                  "L2 entry for guest offset \(g << clusterBits) has reserved bits set")
        }
        let host = try md.allocator.allocateBytes(bytes)
        try md.overlap.checkData(host, bytes)
        // The descriptor counts the sectors after the first one the bytes touch.
        let sectors = ((host + bytes - 1) >> 9) - (host >> 9)
        let entry = L2Entry.compressed(host: host, sectors: sectors, clusterBits: UInt32(clusterBits))
        busy.insert(g)
        md.map.cache.pin(table)
        return CompressedWrite(table: table, index: j, guestCluster: g, entry: entry, host: host, oldRaw: raw, length: length)
    }

    /// Writes the compressed bytes (no lock), then points the entry at them and drops the old
    /// entry's references (lock held). On failure the byte range's references are given back.
    func executeCompressed(_ cw: CompressedWrite, bytes: UnsafeRawBufferPointer) throws {
        do {
            try storage.write(bytes, at: cw.host)
        } catch {
            lock.withLock {
                md.map.release(raw: cw.entry.raw)
                finish([cw.guestCluster], table: cw.table)
            }
            throw error
        }
        lock.withLock {
            defer { finish([cw.guestCluster], table: cw.table) }
            md.map.set(cw.table, cw.index, raw: cw.entry.raw, bitmap: 0)
            md.map.release(raw: cw.oldRaw)
        }
    }
}

/// Online compression: with ``Qcow2Image/compressors`` set, every aligned whole cluster of a
/// guest write is stored compressed (the rest of the write as usual).
extension Qcow2Image {
    /// Writes `buffer` at `offset`, its whole clusters compressed with `pool`'s compressors.
    func writeCompressing(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, pool: CompressorPool) throws {
        let size = self.size
        let length = UInt64(buffer.count)
        guard offset <= size, length <= size - offset else {
            throw StrataError.outOfRange(offset: offset, length: length, size: size)
        }
        var pos: UInt64 = 0
        while pos < length {
            let guest = offset + pos
            let inCluster = guest & (clusterSize - 1)
            let clusterEnd = min(guest - inCluster + clusterSize, size)
            let n = min(clusterEnd - guest, length - pos)
            let piece = UnsafeRawBufferPointer(rebasing: buffer[Int(pos)..<Int(pos + n)])
            if inCluster == 0 && guest + n == clusterEnd {
                _ = try pool.with { try writeCompressed(piece, at: guest, compressor: $0) }
            } else {
                // Part of a cluster: an ordinary write (which copies a compressed cluster on write).
                try perform(.data(piece), at: guest, length: n)
            }
            pos += n
        }
    }
}

/// The compressors of one image for online compression: one per concurrent writer, made on
/// demand and reused.
final class CompressorPool: @unchecked Sendable {
    let type: CompressionType
    let clusterSize: Int
    /// Compressors not in use; guarded by `lock` (each is used by one thread at a time).
    private var idle: [ClusterCompressor] = []
    private let lock = PthreadLocked<Void>(())

    init(type: CompressionType, clusterSize: Int) {
        self.type = type
        self.clusterSize = clusterSize
    }

    /// Runs `body` with a compressor no other thread is using.
    func with<T>(_ body: (ClusterCompressor) throws -> T) rethrows -> T {
        let c = lock.withLock { _ in idle.popLast() } ?? ClusterCompressor(type: type, clusterSize: clusterSize)
        defer { lock.withLock { _ in idle.append(c) } }
        return try body(c)
    }
}
