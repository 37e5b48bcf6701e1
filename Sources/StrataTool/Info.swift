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

    @Argument(help: "The image file.")
    var file: String

    func run() throws {
        let infos: [ImageInfo]
        do {
            let device = try ImageChain.open(file, format: format.format, forceShare: share.forceShare)
            defer { try? device.close() }
            var layers = ImageChain.layers(of: device, name: file)
            if !backingChain { layers = Array(layers.prefix(1)) }
            infos = layers.map(ImageInfo.init(layer:))
        } catch {
            // Like qemu-img, describe the image even when its backing file cannot be opened.
            guard !backingChain, Self.isBackingFailure(error, top: file),
                  let info = try? ImageInfo(headerOf: file), info.backingFilename != nil else { throw error }
            infos = [info]
        }
        switch output.output {
        case .json:
            let value: JSONValue = backingChain ? .array(infos.map(\.json)) : infos[0].json
            print(value.pretty)
        case .human:
            print(infos.map(\.human).joined(separator: "\n"), terminator: "")
        }
    }
}

extension Info {
    /// True when opening failed because of the backing chain, not the image itself.
    static func isBackingFailure(_ error: Error, top: String) -> Bool {
        guard let e = error as? StrataError else { return false }
        if case .backingFormatUnknown = e { return true }
        return !e.description.hasPrefix(top + ":")
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

    init(layer: ChainLayer) {
        filename = layer.displayName
        format = layer.format
        virtualSize = layer.device.size
        actualSize = ImageChain.allocatedBytes(layer.displayName)
        if let q = layer.qcow2 {
            let h = q.header
            qcow2 = h
            clusterSize = h.clusterSize
            dirty = h.incompatibleFeatures.contains(.dirty)
            backingFilename = q.backingFileName
            fullBackingFilename = q.backingFileName.map { ImageChain.combine(layer.displayName, $0) }
            backingFormat = q.backingFormat
        }
    }

    /// Reads the header of a qcow2 image alone, without its backing chain (for an image whose
    /// backing file is missing). Read-only; no lock is taken, as with `-U`.
    init(headerOf path: String) throws {
        let file = try FileStorage(path: path, mode: .readOnly)
        defer { file.close() }
        let length = try withFile(path) { try file.length() }
        var first = [UInt8](repeating: 0, count: Int(min(length, 2 << 20)))
        try withFile(path) { _ = try first.withUnsafeMutableBytes { try file.read(into: $0, at: 0) } }
        let h = try Qcow2Header.decode(first, path: path, fileSize: length)
        let extStart = Int(h.version == 2 ? Qcow2Header.v2Length : h.headerLength)
        let extLimit = Int(h.backingFileOffset != 0 ? min(h.backingFileOffset, h.clusterSize) : h.clusterSize)
        let ext = try HeaderExtensions.decode(first, start: extStart, limit: min(extLimit, first.count), path: path)
        filename = path
        format = .qcow2
        virtualSize = h.size
        actualSize = ImageChain.allocatedBytes(path)
        qcow2 = h
        clusterSize = h.clusterSize
        dirty = h.incompatibleFeatures.contains(.dirty)
        let nameStart = Int(h.backingFileOffset), nameEnd = nameStart + Int(h.backingFileSize)
        if h.backingFileOffset != 0, nameEnd <= first.count {
            let name = String(decoding: first[nameStart..<nameEnd], as: UTF8.self)
            backingFilename = name
            fullBackingFilename = ImageChain.combine(path, name)
            backingFormat = ext.backingFormat.flatMap(ImageFormat.init(rawValue:))
        }
    }

    /// QEMU's key order (it comes from its hash table; kept so outputs diff cleanly).
    var json: JSONValue {
        var fields: [(String, JSONValue)] = []
        if let f = backingFormat { fields.append(("backing-filename-format", .string(f.rawValue))) }
        fields.append(("virtual-size", .uint(virtualSize)))
        fields.append(("filename", .string(filename)))
        if let c = clusterSize { fields.append(("cluster-size", .uint(c))) }
        fields.append(("format", .string(format.rawValue)))
        if let a = actualSize { fields.append(("actual-size", .uint(a))) }
        if let h = qcow2 {
            fields.append(("format-specific", .object([
                ("type", .string("qcow2")),
                ("data", .object(Self.qcow2Specific(h).map { ($0.key, $0.json) })),
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
        if let h = qcow2 {
            s += "Format specific information:\n"
            for field in Self.qcow2Specific(h) {
                s += "    \(String(field.key.map { $0 == "-" ? " " : $0 })): \(field.text)\n"
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
    static func qcow2Specific(_ h: Qcow2Header) -> [SpecificField] {
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
            SpecificField(key: "refcount-bits", json: .uint(h.refcountBits), text: String(h.refcountBits)),
            bool("corrupt", h.incompatibleFeatures.contains(.corrupt)),
            bool("extended-l2", h.extendedL2),
        ]
    }
}
