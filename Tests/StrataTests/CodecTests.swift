import XCTest
@testable import Strata

/// The pure codecs, on hand-built bytes (one comment per field).
final class CodecTests: XCTestCase {
    /// A v3 header for a 1 GiB disk with 64 KiB clusters, built field by field.
    func v3Header() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 112)
        b.replaceSubrange(0..<4, with: [0x51, 0x46, 0x49, 0xfb])  // magic "QFI\xfb"
        b.put32(3, 4)                  // version
        b.put64(0, 8)                  // backing_file_offset: none
        b.put32(0, 16)                 // backing_file_size
        b.put32(16, 20)                // cluster_bits: 64 KiB
        b.put64(1 << 30, 24)           // size: 1 GiB
        b.put32(0, 32)                 // crypt_method: none
        b.put32(2, 36)                 // l1_size: 2 entries (512 MiB each)
        b.put64(0x30000, 40)           // l1_table_offset: cluster 3
        b.put64(0x10000, 48)           // refcount_table_offset: cluster 1
        b.put32(1, 56)                 // refcount_table_clusters
        b.put32(0, 60)                 // nb_snapshots
        b.put64(0, 64)                 // snapshots_offset
        b.put64(0, 72)                 // incompatible_features
        b.put64(1, 80)                 // compatible_features: lazy refcounts
        b.put64(0, 88)                 // autoclear_features
        b.put32(4, 96)                 // refcount_order: 16 bits
        b.put32(112, 100)              // header_length
        b[104] = 0                     // compression_type: zlib
        return b
    }

    func testHeaderDecodesEveryField() throws {
        let h = try Qcow2Header.decode(v3Header(), path: "t", fileSize: 4 << 16)
        XCTAssertEqual(h.version, 3)
        XCTAssertEqual(h.clusterSize, 65536)
        XCTAssertEqual(h.size, 1 << 30)
        XCTAssertEqual(h.l1Size, 2)
        XCTAssertEqual(h.l1TableOffset, 0x30000)
        XCTAssertEqual(h.refcountTableOffset, 0x10000)
        XCTAssertEqual(h.refcountTableClusters, 1)
        XCTAssertEqual(h.refcountBits, 16)
        XCTAssertEqual(h.compatibleFeatures, .lazyRefcounts)
        XCTAssertEqual(h.compressionType, .zlib)
        XCTAssertEqual(h.headerLength, 112)
        XCTAssertEqual(h.encode(), v3Header(), "encoding gives back the same bytes")
    }

    func testVersion2HeaderIs72Bytes() throws {
        var b = Array(v3Header().prefix(72))
        b.put32(2, 4)  // version 2: no fields past byte 72
        let h = try Qcow2Header.decode(b, path: "t", fileSize: 4 << 16)
        XCTAssertEqual(h.version, 2)
        XCTAssertEqual(h.refcountBits, 16)
        XCTAssertEqual(h.encode().count, 72)
    }

    func testHeaderRefusals() {
        func refuses(_ patch: (inout [UInt8]) -> Void, _ text: String, line: UInt = #line) {
            var b = v3Header()
            patch(&b)
            XCTAssertThrowsError(try Qcow2Header.decode(b, path: "t", fileSize: 4 << 16), line: line) { e in
                XCTAssertTrue("\(e)".contains(text), "\(e)", line: line)
            }
        }
        refuses({ $0[0] = 0 }, "not a qcow2 image")
        refuses({ $0.put32(4, 4) }, "version 4")
        refuses({ $0.put32(8, 20) }, "cluster_bits")
        refuses({ $0.put32(22, 20) }, "cluster_bits")
        refuses({ $0.put32(7, 96) }, "refcount_order")
        refuses({ $0.put32(1, 36) }, "l1_size")                       // too small for 1 GiB
        refuses({ $0.put32(1, 32) }, "encryption")
        refuses({ $0.put32(100, 100) }, "header_length")               // not a multiple of 8
        refuses({ $0[104] = 9 }, "compression_type")
        refuses({ $0[104] = 1 }, "compression_type")                   // zstd without the feature bit
        refuses({ $0.put64(IncompatibleFeatures.extendedL2.rawValue, 72); $0.put32(13, 20); $0.put32(64, 36) }, "extended L2")
    }

    func testL1Entry() {
        let e = L1Entry(raw: 0x8000_0000_0005_0000)  // COPIED | L2 table at 0x50000
        XCTAssertEqual(e.l2Offset, 0x50000)
        XCTAssertTrue(e.isCopied)
        XCTAssertFalse(e.hasReservedBits)
        XCTAssertTrue(L1Entry(raw: 0x0100_0000_0005_0000).hasReservedBits)  // bit 56
        XCTAssertTrue(L1Entry(raw: 0x0000_0000_0005_0001).hasReservedBits)  // bit 0
    }

    func testStandardL2Entries() {
        let cb: UInt32 = 16
        XCTAssertEqual(L2Entry(raw: 0).mapping(clusterBits: cb, extended: false), .unallocated)
        XCTAssertEqual(L2Entry(raw: 0x8000_0000_0007_0000).mapping(clusterBits: cb, extended: false), .data(host: 0x70000, copied: true))
        XCTAssertEqual(L2Entry(raw: 0x0000_0000_0007_0000).mapping(clusterBits: cb, extended: false), .data(host: 0x70000, copied: false))
        XCTAssertEqual(L2Entry(raw: 1).mapping(clusterBits: cb, extended: false), .zero(host: 0))          // zero, no host
        XCTAssertEqual(L2Entry(raw: 0x8000_0000_0007_0001).mapping(clusterBits: cb, extended: false), .zero(host: 0x70000))
        XCTAssertTrue(L2Entry(raw: 0x0000_0000_0007_0100).hasReservedBits(extended: false))  // bit 8
        XCTAssertTrue(L2Entry(raw: 1).hasReservedBits(extended: true))  // bit 0 is reserved with extended L2
    }

    func testCompressedDescriptor() {
        // 64 KiB clusters: x = 62 - (16 - 8) = 54; host offset in bits 0-53, sectors in 54-61.
        let raw: UInt64 = (1 << 62) | (3 << 54) | 0x12_3456
        let e = L2Entry(raw: raw)
        XCTAssertTrue(e.isCompressed)
        XCTAssertEqual(e.mapping(clusterBits: 16, extended: false), .compressed(host: 0x12_3456, sectors: 4))
        XCTAssertEqual(L2Entry.compressed(host: 0x12_3456, sectors: 3, clusterBits: 16).raw, raw)
        // 2 MiB clusters: x = 49.
        let big = L2Entry(raw: (1 << 62) | (5 << 49) | 0x200)
        XCTAssertEqual(big.mapping(clusterBits: 21, extended: false), .compressed(host: 0x200, sectors: 6))
    }

    func testSubclusterBitmap() {
        let b = SubclusterBitmap(raw: 0x0000_00f0_0000_000f)  // subclusters 0-3 allocated, 4-7 zero
        XCTAssertEqual(b.allocated, 0xf)
        XCTAssertEqual(b.zero, 0xf0)
        XCTAssertTrue(b.isValid)
        XCTAssertFalse(SubclusterBitmap(allocated: 1, zero: 1).isValid)
        XCTAssertEqual(subclusterMask(0, 31), 0xffff_ffff)
        XCTAssertEqual(subclusterMask(4, 7), 0xf0)
    }

    func testRefcountWidths() {
        // One byte holds 8 one-bit refcounts, bit 0 first.
        let b = UnsafeMutableRawBufferPointer.allocate(byteCount: 64, alignment: 8)
        defer { b.deallocate() }
        for order: UInt32 in 0...6 {
            b.initializeMemory(as: UInt8.self, repeating: 0)
            let max = RefcountCodec.maxValue(order: order)
            RefcountCodec.set(b, index: 3, order: order, value: max)
            RefcountCodec.set(b, index: 4, order: order, value: 1)
            XCTAssertEqual(RefcountCodec.get(UnsafeRawBufferPointer(b), index: 3, order: order), max, "order \(order)")
            XCTAssertEqual(RefcountCodec.get(UnsafeRawBufferPointer(b), index: 4, order: order), 1, "order \(order)")
            XCTAssertEqual(RefcountCodec.get(UnsafeRawBufferPointer(b), index: 2, order: order), 0, "order \(order)")
        }
        b.initializeMemory(as: UInt8.self, repeating: 0)
        RefcountCodec.set(b, index: 1, order: 0, value: 1)  // 1-bit: entry 1 is bit 1 of byte 0
        XCTAssertEqual(b[0], 0b10)
        RefcountCodec.set(b, index: 1, order: 2, value: 0xa)  // 4-bit: entry 1 is the high nibble
        XCTAssertEqual(b[0] & 0xf0, 0xa0)
        RefcountCodec.set(b, index: 1, order: 4, value: 0x1234)  // 16-bit big-endian at byte 2
        XCTAssertEqual([b[2], b[3]], [0x12, 0x34])
        XCTAssertEqual(RefcountCodec.maxValue(order: 6), .max)
    }

    func testHeaderExtensions() throws {
        var area = [UInt8]()
        func ext(_ type: UInt32, _ data: [UInt8]) {
            var h = [UInt8](repeating: 0, count: 8)
            h.put32(type, 0)                      // type
            h.put32(UInt32(data.count), 4)        // length
            area += h + data + [UInt8](repeating: 0, count: (8 - data.count % 8) % 8)  // padding
        }
        ext(0xe279_2aca, Array("raw".utf8))                      // backing format
        var feature = [UInt8](repeating: 0, count: 48)
        feature[0] = 0; feature[1] = 40                          // incompatible bit 40
        for (i, c) in "future thing".utf8.enumerated() { feature[2 + i] = c }
        ext(0x6803_f857, feature)                                // feature name table
        ext(0x1234_5678, [1, 2, 3])                              // unknown: kept
        area += [UInt8](repeating: 0, count: 8)                  // end
        let e = try HeaderExtensions.decode(area, start: 0, limit: area.count, path: "t")
        XCTAssertEqual(e.backingFormat, "raw")
        XCTAssertEqual(e.names(ofUnknownIncompatible: 1 << 40), ["future thing"])
        XCTAssertEqual(e.names(ofUnknownIncompatible: 1 << 41), ["unknown incompatible feature bit 41"])
        XCTAssertEqual(e.unknown.count, 1)
        XCTAssertEqual(e.unknown[0].data, [1, 2, 3])
        // Re-encoding keeps the unknown extension and writes our own feature table.
        let again = try HeaderExtensions.decode(e.encode(), start: 0, limit: 4096, path: "t")
        XCTAssertEqual(again.backingFormat, "raw")
        XCTAssertEqual(again.unknown[0].data, [1, 2, 3])
        XCTAssertEqual(again.featureNames, HeaderExtensions.ourFeatureNames)

        var overrun = area
        overrun.put32(5000, 4)  // first extension claims more bytes than the area holds
        XCTAssertThrowsError(try HeaderExtensions.decode(overrun, start: 0, limit: area.count, path: "t"))
    }

    func testZlibAndZstdCodecs() throws {
        // A raw deflate stream of 4096 bytes of 'A' as zlib -15 writes it, and a zstd frame.
        let src = [UInt8](repeating: 0x41, count: 4096)
        for tool in [["python3", "-c", "import zlib,sys; c=zlib.compressobj(6, zlib.DEFLATED, -12); sys.stdout.buffer.write(c.compress(b'A'*4096)+c.flush())"]] {
            let r = try runToolData(tool)
            var out = [UInt8](repeating: 0, count: 4096)
            let ok = r.withUnsafeBytes { i in out.withUnsafeMutableBytes { Codec.inflateRaw(i, into: $0) } }
            XCTAssertTrue(ok)
            XCTAssertEqual(out, src)
        }
        var garbage = [UInt8](repeating: 0xff, count: 64)
        var out = [UInt8](repeating: 0, count: 4096)
        XCTAssertFalse(garbage.withUnsafeMutableBytes { g in out.withUnsafeMutableBytes { Codec.inflateRaw(UnsafeRawBufferPointer(g), into: $0) } })
        XCTAssertFalse(garbage.withUnsafeMutableBytes { g in out.withUnsafeMutableBytes { Codec.zstdDecompress(UnsafeRawBufferPointer(g), into: $0) } })
    }
}
