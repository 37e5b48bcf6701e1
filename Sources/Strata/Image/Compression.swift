import CZlib
import CZstd

/// Stateless buffer→buffer codecs for compressed clusters.
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

    static func decompress(_ type: CompressionType, _ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool {
        switch type {
        case .zlib: return inflateRaw(input, into: output)
        case .zstd: return zstdDecompress(input, into: output)
        }
    }
}
