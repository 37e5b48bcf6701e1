/// The bitmaps header extension (persistent dirty bitmaps). Pure values; no I/O.
///
/// ```
/// extension:  0 nb_bitmaps (4)  4 reserved (4)  8 bitmap_directory_size (8)  16 bitmap_directory_offset (8)
/// directory entry:  0 bitmap_table_offset (8)  8 bitmap_table_size (4)  12 flags (4)
///                  16 type (1)  17 granularity_bits (1)  18 name_size (2)  20 extra_data_size (4)
///                  extra data, name, padding to 8
/// flags: bit 0 in_use, bit 1 auto, bit 2 extra_data_compatible
/// ```
/// Strata does not maintain bitmaps. A writable open marks every bitmap in use (what QEMU
/// would find after a crash), so QEMU knows they are stale; their clusters stay referenced.
public struct BitmapsExtension: Sendable, Equatable {
    public var count: UInt32
    public var directorySize: UInt64
    public var directoryOffset: UInt64

    public static let length = 24

    public static func decode(_ data: [UInt8], path: String) throws -> BitmapsExtension {
        func bad(_ field: String, _ v: UInt64, _ reason: String) -> StrataError {
            .invalidHeader(path: path, field: "bitmaps extension \(field)", value: v, reason: reason)
        }
        guard data.count >= length else { throw bad("length", UInt64(data.count), "shorter than \(length) bytes") }
        let e = BitmapsExtension(count: data.be32(0), directorySize: data.be64(8), directoryOffset: data.be64(16))
        guard e.count >= 1, UInt64(e.count) <= Limits.maxBitmaps else { throw bad("nb_bitmaps", UInt64(e.count), "must be 1 to \(Limits.maxBitmaps)") }
        guard e.directorySize <= Limits.maxBitmapDirectoryBytes, e.directorySize >= 24 else {
            throw bad("bitmap_directory_size", e.directorySize, "must be 24 to \(Limits.maxBitmapDirectoryBytes) bytes")
        }
        return e
    }

    public func encode() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: Self.length)
        b.put32(count, 0)
        b.put64(directorySize, 8)
        b.put64(directoryOffset, 16)
        return b
    }
}

/// One bitmap directory entry.
public struct BitmapDirectoryEntry: Sendable, Equatable {
    public static let inUse: UInt32 = 1 << 0
    public static let auto: UInt32 = 1 << 1
    public static let extraDataCompatible: UInt32 = 1 << 2

    public var tableOffset: UInt64
    public var tableSize: UInt32
    public var flags: UInt32
    public var type: UInt8
    public var granularityBits: UInt8
    public var name: String
    /// Where the entry's flags field lies in the directory (to rewrite it in place).
    public var flagsPosition: Int

    /// Decodes the whole directory.
    public static func decodeDirectory(_ bytes: [UInt8], count: Int, offset: UInt64, path: String) throws -> [BitmapDirectoryEntry] {
        func bad(_ at: Int, _ what: String) -> StrataError {
            .corrupt(Corruption(path: path, kind: .malformedTable, offset: offset + UInt64(at),
                                detail: "bitmap directory entry at host offset \(offset + UInt64(at)) \(what)"))
        }
        var out: [BitmapDirectoryEntry] = []
        var pos = 0
        for _ in 0..<count {
            guard pos + 24 <= bytes.count else { throw bad(pos, "runs past the end of the directory") }
            let nameSize = Int(bytes.be16(pos + 18)), extra = Int(bytes.be32(pos + 20))
            guard nameSize > 0, UInt64(nameSize) <= Limits.maxBitmapNameBytes else { throw bad(pos, "has a name of \(nameSize) bytes") }
            let end = pos + 24 + extra + nameSize
            guard extra <= bytes.count, end <= bytes.count else { throw bad(pos, "runs past the end of the directory") }
            let e = BitmapDirectoryEntry(
                tableOffset: bytes.be64(pos), tableSize: bytes.be32(pos + 8), flags: bytes.be32(pos + 12),
                type: bytes[pos + 16], granularityBits: bytes[pos + 17],
                name: String(decoding: bytes[(pos + 24 + extra)..<end], as: UTF8.self), flagsPosition: pos + 12)
            guard UInt64(e.tableSize) <= Limits.maxBitmapTableEntries else { throw bad(pos, "has a bitmap table of \(e.tableSize) entries") }
            out.append(e)
            pos = Int(alignUp(UInt64(end), 8))
        }
        return out
    }
}

/// A bitmap table entry: bits 9-55 host cluster offset (0: not allocated; then bit 0 says
/// all zeroes or all ones).
public struct BitmapTableEntry: Sendable, Equatable {
    public static let offsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    public var raw: UInt64
    public init(raw: UInt64) { self.raw = raw }
    public var hostOffset: UInt64 { raw & Self.offsetMask }
}
