import ArgumentParser
import Strata

/// `strata info [-f FMT] [--output human|json] [--backing-chain] [-U] FILE`
struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show an image's format, sizes, backing file and qcow2 features.",
        discussion: "The JSON output has qemu-img's field names (an array with --backing-chain).")

    @OptionGroup var format: FormatOption
    @OptionGroup var output: OutputOption

    @Flag(name: .customLong("backing-chain"), help: "Show every image of the backing chain, top first.")
    var backingChain = false

    @OptionGroup var share: ForceShareOption

    @Flag(name: .customLong("space"), help: "Also count how the data is stored: clusters referenced, stored, compressed, bytes saved (walks the L2 tables). Shown by default for images with compress=on or dedup in use.")
    var space = false

    @Argument(help: "The image file.")
    var file: String

    func run() throws {
        let infos = try describe()
        switch output.output {
        case .json:
            let value: JSONValue = backingChain ? .array(infos.map(\.json)) : infos[0].json
            print(value.pretty)
        case .human:
            print(infos.map(\.human).joined(separator: "\n"), terminator: "")
        }
    }

    /// Opens each image of the chain on its own (without its backing file, as qemu-img
    /// does), so the top image is described even when its backing file is missing or loops;
    /// with --backing-chain, follows the chain one image at a time, refusing loops.
    func describe() throws -> [ImageInfo] {
        var infos: [ImageInfo] = []
        var seen: Set<String> = []
        var path = file, displayName = file
        var layerFormat = format.format
        while true {
            guard seen.insert(BackingChain.realPath(path)).inserted else {
                throw CLIError.refused(file: file, reason: "backing file '\(displayName)' makes the chain loop back to an image already in it")
            }
            guard infos.count <= Limits.maxBackingChainDepth else {
                throw StrataError.backingChainTooDeep(path: file, limit: Limits.maxBackingChainDepth)
            }
            var options = OpenOptions(format: layerFormat, forceShare: share.forceShare)
            options.noBacking = true
            let device = try openImage(path: path, options: options)
            defer { try? device.close() }
            let q = device as? Qcow2Image
            var info = ImageInfo(device: device, displayName: displayName)
            if let q, space || q.extensions.strata?.flags.contains(.compress) ?? false {
                info.space = try q.spaceUsage()
                if q.dedupIndexState != .none { info.dedupIndex = q.dedupIndexState }
            }
            infos.append(info)
            guard backingChain, let q, let name = q.backingFileName else { return infos }
            guard let next = q.backingFormat else { throw StrataError.backingFormatUnknown(path: displayName, backing: name) }
            path = q.backingFilePath ?? name
            displayName = BackingChain.resolve(name, relativeTo: displayName)
            layerFormat = next
        }
    }
}

/// What `info` reports about one image: QAPI's `ImageInfo`, the fields qemu-img fills in for
/// qcow2 and raw.
struct ImageInfo {
    var filename: String
    var format: ImageFormat
    var virtualSize: UInt64
    var actualSize: UInt64?
    var clusterSize: UInt64?
    var dirty = false
    var backingFilename: String?
    var fullBackingFilename: String?
    var backingFormat: ImageFormat?
    var qcow2: Qcow2Header?
    var bitmaps: [BitmapDirectoryEntry] = []
    /// Strata's template mark (not one of QEMU's fields: shown only when set).
    var isTemplate = false
    var snapshots: [SnapshotRecord] = []
    /// How the data is stored (Strata's, with `--space`; nil when not counted).
    var space: SpaceUsage?
    /// The dedup index file's state (with `--space`, for images that keep one).
    var dedupIndex: DedupIndexState?

    /// Describes one open image, named as the user (or the chain) spelled it.
    init(device: any BlockDevice, displayName: String) {
        filename = displayName
        virtualSize = device.size
        actualSize = ImageChain.allocatedBytes(displayName)
        guard let q = device as? Qcow2Image else {
            format = .raw
            return
        }
        format = .qcow2
        let h = q.header
        qcow2 = h
        bitmaps = q.bitmaps
        isTemplate = q.isTemplate
        snapshots = q.snapshots
        clusterSize = h.clusterSize
        dirty = h.incompatibleFeatures.contains(.dirty)
        backingFilename = q.backingFileName
        fullBackingFilename = q.backingFileName.map { BackingChain.resolve($0, relativeTo: displayName) }
        backingFormat = q.backingFormat
    }

    /// QEMU's key order (it comes from its hash table; kept so outputs diff cleanly).
    var json: JSONValue {
        var fields: [(String, JSONValue)] = []
        if let f = backingFormat { fields.append(("backing-filename-format", .string(f.rawValue))) }
        if !snapshots.isEmpty { fields.append(("snapshots", SnapshotListing(snapshots, exclusive: nil).json)) }
        fields.append(("virtual-size", .uint(virtualSize)))
        fields.append(("filename", .string(filename)))
        if let c = clusterSize { fields.append(("cluster-size", .uint(c))) }
        fields.append(("format", .string(format.rawValue)))
        if let a = actualSize { fields.append(("actual-size", .uint(a))) }
        if let h = qcow2 {
            fields.append(("format-specific", .object([
                ("type", .string("qcow2")),
                ("data", .object(Self.qcow2Specific(h, bitmaps: bitmaps, template: isTemplate, space: space, dedupIndex: dedupIndex).map { ($0.key, $0.json) })),
            ])))
        }
        if let full = fullBackingFilename { fields.append(("full-backing-filename", .string(full))) }
        if let b = backingFilename { fields.append(("backing-filename", .string(b))) }
        fields.append(("dirty-flag", .bool(dirty)))
        return .object(fields)
    }

    /// qemu-img's human layout, one block per image.
    var human: String {
        var s = """
            image: \(filename)
            file format: \(format.rawValue)
            virtual size: \(HumanFormat.size(virtualSize)) (\(virtualSize) bytes)
            disk size: \(actualSize.map(HumanFormat.size) ?? "unavailable")

            """
        if let c = clusterSize { s += "cluster_size: \(c)\n" }
        if dirty { s += "cleanly shut down: no\n" }
        if let b = backingFilename {
            s += "backing file: \(b)"
            if let full = fullBackingFilename, full != b { s += " (actual path: \(full))" }
            s += "\n"
        }
        if let f = backingFormat { s += "backing file format: \(f.rawValue)\n" }
        if !snapshots.isEmpty { s += SnapshotListing(snapshots, exclusive: nil).human }
        if let h = qcow2 {
            s += "Format specific information:\n"
            for field in Self.qcow2Specific(h, bitmaps: bitmaps, template: isTemplate, space: space, dedupIndex: dedupIndex) {
                // A nested field (its text starts a new line) has no space after the colon.
                let gap = field.text.hasPrefix("\n") ? "" : " "
                s += "    \(String(field.key.map { $0 == "-" ? " " : $0 })):\(gap)\(field.text)\n"
            }
        }
        return s
    }

    /// One field of `ImageInfoSpecificQCow2`.
    struct SpecificField {
        var key: String
        var json: JSONValue
        var text: String
    }

    /// `ImageInfoSpecificQCow2` in QEMU's order; version 2 images have only the first three.
    /// `template` adds Strata's own `template: true` last (absent otherwise, as in qemu-img).
    static func qcow2Specific(_ h: Qcow2Header, bitmaps: [BitmapDirectoryEntry], template: Bool = false,
                              space: SpaceUsage? = nil, dedupIndex: DedupIndexState? = nil) -> [SpecificField] {
        func bool(_ k: String, _ b: Bool) -> SpecificField { SpecificField(key: k, json: .bool(b), text: b ? "true" : "false") }
        if h.version < 3 {
            return [
                SpecificField(key: "compat", json: .string("0.10"), text: "0.10"),
                SpecificField(key: "compression-type", json: .string(h.compressionType.name), text: h.compressionType.name),
                SpecificField(key: "refcount-bits", json: .uint(h.refcountBits), text: String(h.refcountBits)),
            ]
        }
        return [
            SpecificField(key: "compat", json: .string("1.1"), text: "1.1"),
            SpecificField(key: "compression-type", json: .string(h.compressionType.name), text: h.compressionType.name),
            bool("lazy-refcounts", h.compatibleFeatures.contains(.lazyRefcounts)),
        ] + (bitmaps.isEmpty ? [] : [bitmapsField(bitmaps)]) + [
            SpecificField(key: "refcount-bits", json: .uint(h.refcountBits), text: String(h.refcountBits)),
            bool("corrupt", h.incompatibleFeatures.contains(.corrupt)),
            bool("extended-l2", h.extendedL2),
        ] + (template ? [bool("template", true)] : []) + (space.map { spaceFields($0, clusterSize: h.clusterSize) } ?? [])
            + (dedupIndex.map { [dedupIndexField($0)] } ?? [])
    }

    /// `dedup-index`: whether the index file beside the image is used, and what it holds.
    static func dedupIndexField(_ state: DedupIndexState) -> SpecificField {
        var fields: [(String, JSONValue, String)]
        switch state {
        case .none: fields = [("state", .string("none"), "none")]
        case .valid(let records, let complete):
            fields = [("state", .string("valid"), "valid"), ("records", .uint(UInt64(records)), String(records)),
                      ("complete", .bool(complete), complete ? "true" : "false")]
        case .stale(let reason): fields = [("state", .string("stale"), "stale"), ("reason", .string(reason), reason)]
        }
        return SpecificField(key: "dedup-index", json: .object(fields.map { ($0.0, $0.1) }),
                             text: fields.map { "\n        \($0.0): \($0.2)" }.joined())
    }

    /// Strata's storage figures (`--space`): clusters referenced by the active disk, host
    /// clusters storing them, compressed ones, and the bytes that sharing and compression save.
    static func spaceFields(_ u: SpaceUsage, clusterSize cs: UInt64) -> [SpecificField] {
        func n(_ k: String, _ v: UInt64) -> SpecificField { SpecificField(key: k, json: .uint(v), text: String(v)) }
        let saved = Int64(u.referenced * cs) - Int64(u.stored * cs)
        return [n("referenced-clusters", u.referenced), n("stored-clusters", u.stored), n("compressed-clusters", u.compressed),
                SpecificField(key: "bytes-saved", json: .int(saved), text: String(saved))]
    }

    /// The `bitmaps` list: flags (in-use, auto), name and granularity of each, JSON and the
    /// nested text qemu-img prints.
    static func bitmapsField(_ bitmaps: [BitmapDirectoryEntry]) -> SpecificField {
        var items: [JSONValue] = []
        var text = ""
        for (i, b) in bitmaps.enumerated() {
            var flags: [String] = []
            if b.flags & BitmapDirectoryEntry.inUse != 0 { flags.append("in-use") }
            if b.flags & BitmapDirectoryEntry.auto != 0 { flags.append("auto") }
            let granularity = UInt64(1) << UInt64(min(b.granularityBits, 63))
            items.append(.object([("flags", .array(flags.map(JSONValue.string))), ("name", .string(b.name)),
                                  ("granularity", .uint(granularity))]))
            text += "\n        [\(i)]:\n            flags:"
            for (k, f) in flags.enumerated() { text += "\n                [\(k)]: \(f)" }
            text += "\n            name: \(b.name)\n            granularity: \(granularity)"
        }
        return SpecificField(key: "bitmaps", json: .array(items), text: text)
    }
}
