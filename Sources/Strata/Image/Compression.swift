import CLZ4
import CZlib
import CZstd

/// Stateless buffer→buffer codecs for compressed clusters.
///
/// The formats, per compression type (header byte 104):
/// - zlib (0): a raw deflate stream (no zlib header or trailer), as QEMU writes it:
///   `deflateInit2(Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY)`.
/// - zstd (1): one zstd frame (default parameters, level 3), as QEMU writes it.
/// - lz4 (128, Strata's extension): one LZ4 frame (the format of the `lz4` tool: magic,
///   frame descriptor with the content size, independent blocks, no checksums, end mark).
///
/// Whatever the type, the bytes after the compressed data up to the end of its last sector
/// are ignored when reading.
enum Codec {
    /// Inflates a raw deflate stream (qcow2's zlib type: no zlib header) until `output` is full.
    /// Returns false when the data is malformed or ends early.
    static func inflateRaw(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool {
        var s = z_stream()
        guard inflateInit2_(&s, -15, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK else { return false }
        defer { inflateEnd(&s) }
        s.next_in = UnsafeMutablePointer(mutating: input.baseAddress?.assumingMemoryBound(to: Bytef.self))
        s.avail_in = uInt(input.count)
        s.next_out = output.baseAddress?.assumingMemoryBound(to: Bytef.self)
        s.avail_out = uInt(output.count)
        let r = inflate(&s, Z_FINISH)
        // QEMU accepts Z_STREAM_END, or Z_BUF_ERROR with the output full (trailing sector bytes).
        return s.avail_out == 0 && (r == Z_STREAM_END || r == Z_BUF_ERROR || r == Z_OK)
    }

    /// Decompresses zstd frames until `output` is full.
    static func zstdDecompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool {
        guard let d = ZSTD_createDStream() else { return false }
        defer { ZSTD_freeDStream(d) }
        var inb = ZSTD_inBuffer(src: input.baseAddress, size: input.count, pos: 0)
        var outb = ZSTD_outBuffer(dst: output.baseAddress, size: output.count, pos: 0)
        while outb.pos < outb.size {
            let r = ZSTD_decompressStream(d, &outb, &inb)
            if ZSTD_isError(r) != 0 { return false }
            if inb.pos == inb.size && outb.pos < outb.size { return false }
        }
        return true
    }

    /// Decompresses one LZ4 frame until `output` is full (bytes after the frame are ignored).
    static func lz4Decompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool {
        var ctx: OpaquePointer?
        guard LZ4F_isError(LZ4F_createDecompressionContext(&ctx, UInt32(LZ4F_VERSION))) == 0, let ctx else { return false }
        defer { LZ4F_freeDecompressionContext(ctx) }
        var inPos = 0
        var outPos = 0
        while outPos < output.count {
            guard inPos < input.count else { return false }
            var inSize = input.count - inPos
            var outSize = output.count - outPos
            let r = LZ4F_decompress(ctx, output.baseAddress! + outPos, &outSize, input.baseAddress! + inPos, &inSize, nil)
            if LZ4F_isError(r) != 0 { return false }
            inPos += inSize
            outPos += outSize
            if r == 0 { break }  // end of the frame
            if inSize == 0 && outSize == 0 { return false }
        }
        return outPos == output.count
    }

    static func decompress(_ type: CompressionType, _ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool {
        switch type {
        case .zlib: return inflateRaw(input, into: output)
        case .zstd: return zstdDecompress(input, into: output)
        case .lz4: return lz4Decompress(input, into: output)
        }
    }
}

/// Compresses whole clusters of one image's compression type, reusing its codec state and
/// output buffer from one cluster to the next. One per thread: not thread-safe.
public final class ClusterCompressor {
    public let type: CompressionType
    public let clusterSize: Int
    private let output: UnsafeMutableRawBufferPointer
    private var zlib = z_stream()
    private var zlibReady = false
    private let zstd: OpaquePointer?
    /// The disk's partial last cluster, padded with zeroes (made on first use).
    private var padded: UnsafeMutableRawBufferPointer?

    /// A compressor for clusters of `clusterSize` bytes.
    public init(type: CompressionType, clusterSize: Int) {
        self.type = type
        self.clusterSize = clusterSize
        var cap = clusterSize
        if type == .lz4 {
            // LZ4F_compressFrame wants room for the worst case.
            cap = max(cap, LZ4F_compressFrameBound(clusterSize, nil) + 64)
        }
        output = UnsafeMutableRawBufferPointer.allocate(byteCount: cap, alignment: 16)
        zstd = type == .zstd ? ZSTD_createCCtx() : nil
        if type == .zlib {
            // QEMU's parameters: default level, raw deflate with a 4 KiB window, memLevel 9.
            zlibReady = deflateInit2_(&zlib, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY,
                                      ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK
        }
    }

    deinit {
        if zlibReady { deflateEnd(&zlib) }
        if let zstd { ZSTD_freeCCtx(zstd) }
        output.deallocate()
        padded?.deallocate()
    }

    /// Compresses one cluster (`input.count == clusterSize`; fewer bytes for the disk's
    /// partial last cluster, which is compressed padded with zeroes, as QEMU does). Returns
    /// the compressed bytes (valid until the next call), or nil when they would not be
    /// smaller than the cluster: such a cluster is stored uncompressed.
    public func compress(_ cluster: UnsafeRawBufferPointer) -> UnsafeRawBufferPointer? {
        precondition(cluster.count <= clusterSize, "compression works on whole clusters")
        var input = cluster
        if cluster.count < clusterSize {
            let p = padded ?? .allocate(byteCount: clusterSize, alignment: 16)
            padded = p
            p.copyMemory(from: cluster)
            UnsafeMutableRawBufferPointer(rebasing: p[cluster.count...]).initializeMemory(as: UInt8.self, repeating: 0)
            input = UnsafeRawBufferPointer(p)
        }
        let limit = clusterSize - 1  // as QEMU: at most one byte less than the cluster
        let n: Int
        switch type {
        case .zlib:
            guard zlibReady, deflateReset(&zlib) == Z_OK else { return nil }
            zlib.next_in = UnsafeMutablePointer(mutating: input.baseAddress?.assumingMemoryBound(to: Bytef.self))
            zlib.avail_in = uInt(input.count)
            zlib.next_out = output.baseAddress?.assumingMemoryBound(to: Bytef.self)
            zlib.avail_out = uInt(limit)
            guard deflate(&zlib, Z_FINISH) == Z_STREAM_END else { return nil }
            n = limit - Int(zlib.avail_out)
        case .zstd:
            guard let zstd else { return nil }
            let r = ZSTD_compress2(zstd, output.baseAddress, limit, input.baseAddress, input.count)
            guard ZSTD_isError(r) == 0 else { return nil }
            n = r
        case .lz4:
            var prefs = LZ4F_preferences_t()
            prefs.frameInfo.blockMode = LZ4F_blockIndependent
            prefs.frameInfo.contentSize = UInt64(clusterSize)
            let r = LZ4F_compressFrame(output.baseAddress, output.count, input.baseAddress, input.count, &prefs)
            guard LZ4F_isError(r) == 0 else { return nil }
            n = r
        }
        guard n > 0, n <= limit else { return nil }
        return UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(output)[0..<n])
    }
}
