/// Header extensions between the header and the end of the first cluster.
/// ```
/// 0-3 type | 4-7 length | data | padding to 8
/// ```
public struct HeaderExtensions: Sendable, Equatable {
    public static let end: UInt32 = 0
    public static let backingFormatType: UInt32 = 0xe279_2aca
    public static let featureTableType: UInt32 = 0x6803_f857
    public static let bitmapsType: UInt32 = 0x2385_2875
    public static let encryptionType: UInt32 = 0x0537_be77
    public static let dataFileType: UInt32 = 0x4441_5441
    /// Strata's own extension ("STRA"; see ``StrataExtension``). QEMU skips extensions it does
    /// not know and keeps them when it rewrites the header.
    public static let strataType: UInt32 = 0x5354_5241

    public var backingFormat: String?
    /// The persistent bitmaps extension (its data is valid only while the header's
    /// autoclear bitmaps bit is set).
    public var bitmaps: BitmapsExtension?
    /// Strata's own extension, when the image has one.
    public var strata: StrataExtension?
    /// Leave the feature name table out when encoding (clusters too small to hold it).
    public var omitFeatureTable = false
    /// (type, bit, name) triples from the feature name table.
    public var featureNames: [FeatureName] = []
    /// Extensions we do not interpret, kept verbatim (type, data) for rewrites.
    public var unknown: [(type: UInt32, data: [UInt8])] = []

    public struct FeatureName: Sendable, Equatable {
        public var kind: UInt8  // 0 incompatible, 1 compatible, 2 autoclear
        public var bit: UInt8
        public var name: String
    }

    public init() {}

    public static func == (a: HeaderExtensions, b: HeaderExtensions) -> Bool {
        a.backingFormat == b.backingFormat && a.bitmaps == b.bitmaps && a.strata == b.strata && a.featureNames == b.featureNames
            && a.unknown.map(\.type) == b.unknown.map(\.type) && a.unknown.map(\.data) == b.unknown.map(\.data)
    }

    /// Decodes extensions from `bytes` (the first cluster) starting at `start`, stopping at the
    /// end marker, at `limit` (the backing file name, if any), or at the end of the cluster.
    public static func decode(_ bytes: [UInt8], start: Int, limit: Int, path: String) throws -> HeaderExtensions {
        var e = HeaderExtensions()
        var pos = start
        var seen = Set<UInt32>()
        while pos + 8 <= limit {
            let type = bytes.be32(pos)
            let len = UInt64(bytes.be32(pos + 4))
            if type == end { break }
            guard len <= Limits.maxHeaderExtensionBytes, UInt64(pos + 8) + len <= UInt64(limit) else {
                throw StrataError.invalidHeader(path: path, field: extensionName(type), value: len, reason: "header extension runs past the header area")
            }
            let data = Array(bytes[(pos + 8)..<(pos + 8 + Int(len))])
            guard seen.insert(type).inserted || type == featureTableType else {
                throw StrataError.invalidHeader(path: path, field: extensionName(type), value: len, reason: "header extension appears twice")
            }
            switch type {
            case backingFormatType:
                e.backingFormat = String(decoding: data, as: UTF8.self)
            case featureTableType:
                var i = 0
                while i + 48 <= data.count {
                    let nameBytes = data[(i + 2)..<(i + 48)].prefix { $0 != 0 }
                    e.featureNames.append(FeatureName(kind: data[i], bit: data[i + 1], name: String(decoding: nameBytes, as: UTF8.self)))
                    i += 48
                }
            case bitmapsType:
                e.bitmaps = try BitmapsExtension.decode(data, path: path)
            case strataType:
                e.strata = try StrataExtension.decode(data, path: path)
            case encryptionType:
                throw StrataError.unsupportedFeature(path: path, feature: "encryption")
            case dataFileType:
                throw StrataError.unsupportedFeature(path: path, feature: "external data file")
            default:
                e.unknown.append((type, data))
            }
            pos += 8 + Int(alignUp(len, 8))
        }
        return e
    }

    /// Encodes the extensions (with our feature table) and the end marker.
    public func encode() -> [UInt8] {
        var out: [UInt8] = []
        func put(_ type: UInt32, _ data: [UInt8]) {
            var h = [UInt8](repeating: 0, count: 8)
            h.put32(type, 0)
            h.put32(UInt32(data.count), 4)
            out += h + data
            out += [UInt8](repeating: 0, count: Int(alignUp(UInt64(data.count), 8)) - data.count)
        }
        if let f = backingFormat { put(Self.backingFormatType, Array(f.utf8)) }
        var table: [UInt8] = []
        for f in omitFeatureTable ? [] : Self.ourFeatureNames {
            var entry = [UInt8](repeating: 0, count: 48)
            entry[0] = f.kind
            entry[1] = f.bit
            for (i, c) in f.name.utf8.prefix(46).enumerated() { entry[2 + i] = c }
            table += entry
        }
        if !table.isEmpty { put(Self.featureTableType, table) }
        if let b = bitmaps { put(Self.bitmapsType, b.encode()) }
        if let st = strata { put(Self.strataType, st.encode()) }
        for u in unknown { put(u.type, u.data) }
        out += [UInt8](repeating: 0, count: 8)
        return out
    }

    /// The feature names we write (the same names QEMU writes).
    public static let ourFeatureNames: [FeatureName] = [
        FeatureName(kind: 0, bit: 0, name: "dirty bit"),
        FeatureName(kind: 0, bit: 1, name: "corrupt bit"),
        FeatureName(kind: 0, bit: 2, name: "external data file"),
        FeatureName(kind: 0, bit: 3, name: "compression type"),
        FeatureName(kind: 0, bit: 4, name: "extended L2 entries"),
        FeatureName(kind: 1, bit: 0, name: "lazy refcounts"),
        FeatureName(kind: 2, bit: 0, name: "bitmaps"),
        FeatureName(kind: 2, bit: 1, name: "raw external data"),
        FeatureName(kind: 2, bit: 63, name: "strata dedup index"),
    ]

    /// Names of set-but-unknown incompatible bits, from the image's own table where it has one.
    public func names(ofUnknownIncompatible bits: UInt64) -> [String] {
        (0..<64).compactMap { bit -> String? in
            guard bits & (1 << UInt64(bit)) != 0 else { return nil }
            return featureNames.first { $0.kind == 0 && Int($0.bit) == bit }?.name ?? "unknown incompatible feature bit \(bit)"
        }
    }
}

/// Strata's header extension: what the image is for, in a form QEMU ignores and keeps.
/// ```
/// 0-7    flags (big endian): bit 0 template (a read-only base that linked clones stand on),
///        bit 1 compress (whole-cluster guest writes compressed), bit 2 dedup (inline dedup
///        of whole-cluster guest writes)
/// 8-23   dedup index id: 16 random bytes naming this image in its dedup index file; all
///        zero (or absent, an 8-byte extension) when it has none
/// 24-    more fields of later versions, kept verbatim
/// ```
public struct StrataExtension: Sendable, Equatable {
    /// The flags word.
    public struct Flags: OptionSet, Sendable {
        public let rawValue: UInt64
        public init(rawValue: UInt64) { self.rawValue = rawValue }
        /// A template: Strata refuses to open it for writing.
        public static let template = Flags(rawValue: 1 << 0)
        /// Compress whole-cluster guest writes (`-o compress=on`): Strata stores each
        /// aligned whole cluster a guest writes as a compressed cluster. QEMU ignores it.
        public static let compress = Flags(rawValue: 1 << 1)
        /// Deduplicate whole-cluster guest writes (`-o dedup=on`): a cluster whose content
        /// is already stored in the image shares that host cluster. QEMU ignores it.
        public static let dedup = Flags(rawValue: 1 << 2)
    }
    public var flags: Flags
    /// The id its dedup index file must carry (see ``DedupIndexFile``); nil when none.
    public var indexID: [UInt8]?
    /// Bytes past the fields we know (fields of later versions), kept on rewrite.
    public var rest: [UInt8]

    public init(flags: Flags = [], indexID: [UInt8]? = nil, rest: [UInt8] = []) {
        self.flags = flags
        self.indexID = indexID
        self.rest = rest
    }

    static func decode(_ data: [UInt8], path: String) throws -> StrataExtension {
        guard data.count >= 8 else {
            throw StrataError.invalidHeader(path: path, field: extensionName(HeaderExtensions.strataType), value: UInt64(data.count),
                                            reason: "the Strata extension is shorter than its 8-byte flags word")
        }
        let flags = Flags(rawValue: data.be64(0))
        guard data.count >= 24 else { return StrataExtension(flags: flags, rest: Array(data[8...])) }
        let id = Array(data[8..<24])
        return StrataExtension(flags: flags, indexID: id.allSatisfy { $0 == 0 } ? nil : id, rest: Array(data[24...]))
    }

    func encode() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 8)
        b.put64(flags.rawValue, 0)
        if indexID == nil && rest.isEmpty { return b }
        return b + (indexID ?? [UInt8](repeating: 0, count: 16)) + rest
    }
}

/// "header extension 0x6803f857", for messages.
func extensionName(_ v: UInt32) -> String {
    let hex = String(v, radix: 16)
    return "header extension 0x" + String(repeating: "0", count: max(0, 8 - hex.count)) + hex
}

/// The first cluster of an image as written: the fixed header, the header extensions (with
/// our feature name table on version 3 images, when it fits), then the backing file name.
public enum FirstCluster {
    /// Encodes it, setting `header`'s backing file offset and size. Nil when it does not fit
    /// in one cluster.
    public static func encode(header: inout Qcow2Header, extensions: HeaderExtensions, backingName: String?) -> [UInt8]? {
        var ext = extensions
        let cs = Int(header.clusterSize)
        let name = backingName.map { Array($0.utf8) } ?? []
        // Version 2 images carry no feature table (QEMU writes none); a small cluster may have
        // no room for it either, and it is optional.
        ext.omitFeatureTable = header.version < 3 || extensions.omitFeatureTable
        var extBytes = header.version >= 3 || backingName != nil || ext.bitmaps != nil || ext.strata != nil || !ext.unknown.isEmpty ? ext.encode() : []
        let fixed = header.version == 2 ? Int(Qcow2Header.v2Length) : Int(header.headerLength)
        if fixed + extBytes.count + name.count > cs, !ext.omitFeatureTable {
            ext.omitFeatureTable = true
            extBytes = ext.encode()
        }
        guard fixed + extBytes.count + name.count <= cs else { return nil }
        if backingName != nil {
            header.backingFileOffset = UInt64(fixed + extBytes.count)
            header.backingFileSize = UInt32(name.count)
        } else {
            header.backingFileOffset = 0
            header.backingFileSize = 0
        }
        return header.encode() + extBytes + name
    }
}
