import Strata

#if canImport(Glibc)
import Glibc
#endif

/// What a new image will look like: the format, the `-o` options parsed, the size and the
/// backing file. Shared by `create` and `convert`; knows qemu-img's option names, their
/// spelling and its `Formatting '…', fmt=…` line. What the values may be (legal cluster sizes,
/// refcount widths, what compat=0.10 cannot hold) is the engine's rule
/// (`CreateOptions.checkFormatOptions`), checked in one place.
struct CreateSettings {
    var format: ImageFormat
    /// Virtual size in bytes as the user gave it (rounded up to 512 when the image is made).
    var size: UInt64?
    /// `compat=` exactly as given (printed back that way), nil when not given.
    var compatText: String?
    var version: UInt32 = 3
    var clusterSize: Int = 65536
    var refcountBits: Int = 16
    var compressionType: CompressionType = .zlib
    var lazyRefcounts = false
    var extendedL2 = false
    /// `compress=on`: Strata stores whole-cluster guest writes compressed.
    var compressWrites = false
    /// `dedup=on`: Strata deduplicates whole-cluster guest writes inline.
    var dedupWrites = false
    var backingFile: String?
    var backingFormat: ImageFormat?

    /// Option names each format takes, with their `-o help` descriptions.
    static let qcow2Options: [(String, String)] = [
        ("backing_file=<str>", "File name of a base image"),
        ("backing_fmt=<str>", "Image format of the base image (qcow2 or raw)"),
        ("cluster_size=<size>", "qcow2 cluster size (512 to 2M, a power of two)"),
        ("compat=<str>", "Compatibility level (v2 [0.10] or v3 [1.1])"),
        ("compress=<bool (on/off)>", "Store whole-cluster guest writes compressed (Strata only; QEMU ignores it)"),
        ("dedup=<bool (on/off)>", "Store a whole-cluster guest write whose content the image already holds only once (Strata only; QEMU ignores it)"),
        ("compression_type=<str>", "Compression method used for image cluster compression (zlib, zstd, or lz4: Strata only, QEMU refuses it)"),
        ("extended_l2=<bool (on/off)>", "Extended L2 tables"),
        ("lazy_refcounts=<bool (on/off)>", "Postpone refcount updates"),
        ("preallocation=<str>", "Preallocation mode (allowed values: off)"),
        ("refcount_bits=<num>", "Width of a reference count entry in bits"),
        ("size=<size>", "Virtual disk size"),
    ]
    static let rawOptions: [(String, String)] = [
        ("preallocation=<str>", "Preallocation mode (allowed values: off)"),
        ("size=<size>", "Virtual disk size"),
    ]

    /// The text `-o help` prints.
    static func helpText(for format: ImageFormat) -> String {
        let options = format == .qcow2 ? qcow2Options : rawOptions
        var text = "Supported \(format.rawValue) options:\n"
        for (name, help) in options {
            let padded = name.count < 22 ? name + String(repeating: " ", count: 22 - name.count) : name
            text += "  \(padded) - \(help)\n"
        }
        return text
    }

    /// Reads `-o` options for `format`. Unknown keys and bad values throw, naming `file`.
    init(format: ImageFormat, options: OptionList, file: String) throws {
        self.format = format
        for entry in options.entries {
            let (key, value) = (entry.key, entry.value)
            func bad(_ reason: String) -> CLIError {
                .invalidValue(file: file, option: key, value: value, reason: reason)
            }
            switch (format, key) {
            case (_, "size"):
                size = try SizeParser.parse(value, what: "size", file: file)
            case (_, "preallocation"):
                guard value == "off" else { throw bad("only preallocation=off is supported") }
            case (.qcow2, "compat"):
                switch value {
                case "0.10", "v2": version = 2
                case "1.1", "v3": version = 3
                default: throw bad("expected 0.10 (v2) or 1.1 (v3)")
                }
                compatText = value
            case (.qcow2, "cluster_size"):
                let n = try SizeParser.parse(value, what: "cluster_size", file: file)
                guard n <= UInt64(Int32.max) else { throw bad("cluster size must be a power of two between 512 and 2097152 bytes") }
                clusterSize = Int(n)
            case (.qcow2, "refcount_bits"):
                guard let n = Int(value) else { throw bad("expected a number") }
                refcountBits = n
            case (.qcow2, "compression_type"):
                switch value {
                case "zlib": compressionType = .zlib
                case "zstd": compressionType = .zstd
                case "lz4": compressionType = .lz4
                default: throw bad("expected zlib, zstd or lz4")
                }
            case (.qcow2, "lazy_refcounts"):
                guard let b = OptionList.parseBool(value) else { throw bad("expected on or off") }
                lazyRefcounts = b
            case (.qcow2, "compress"):
                guard let b = OptionList.parseBool(value) else { throw bad("expected on or off") }
                compressWrites = b
            case (.qcow2, "dedup"):
                guard let b = OptionList.parseBool(value) else { throw bad("expected on or off") }
                dedupWrites = b
            case (.qcow2, "extended_l2"):
                guard let b = OptionList.parseBool(value) else { throw bad("expected on or off") }
                extendedL2 = b
            case (.qcow2, "backing_file"):
                backingFile = value
            case (.qcow2, "backing_fmt"):
                guard let f = ImageFormat(rawValue: value) else { throw bad("expected qcow2 or raw") }
                backingFormat = f
            default:
                let known = (format == .qcow2 ? Self.qcow2Options : Self.rawOptions)
                    .map { String($0.0.prefix { $0 != "=" }) }
                throw CLIError.badOption(file: file, entry: "\(key)=\(value)",
                    reason: "\(format.rawValue) has no option '\(key)' (it takes \(known.joined(separator: ", ")))")
            }
        }
    }

    /// Checks the values and their combinations (the engine's rules, which are qemu-img's).
    func check(file: String) throws {
        guard format == .qcow2 else { return }
        try qcow2Options.checkFormatOptions(for: file)
        if compressWrites && dedupWrites {
            throw CLIError.refused(file: file, reason: "compress=on and dedup=on cannot be combined yet; choose one")
        }
        if backingFormat != nil && backingFile == nil {
            throw CLIError.refused(file: file, reason: "a backing format (-F) needs a backing file (-b)")
        }
    }

    /// qemu-img's announcement, field for field:
    /// `Formatting 'a.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib
    /// size=1048576 [backing_file=… backing_fmt=…] [compat=…] lazy_refcounts=off refcount_bits=16`.
    func formattingLine(file: String) -> String {
        var parts = ["Formatting '\(file)',", "fmt=\(format.rawValue)"]
        switch format {
        case .raw:
            parts.append("size=\(size ?? 0)")
        case .qcow2:
            parts.append("cluster_size=\(clusterSize)")
            parts.append("extended_l2=\(extendedL2 ? "on" : "off")")
            parts.append("compression_type=\(compressionType.name)")
            parts.append("size=\(size ?? 0)")
            if let b = backingFile { parts.append("backing_file=\(b)") }
            if let f = backingFormat { parts.append("backing_fmt=\(f.rawValue)") }
            if let c = compatText { parts.append("compat=\(c)") }
            parts.append("lazy_refcounts=\(lazyRefcounts ? "on" : "off")")
            parts.append("refcount_bits=\(refcountBits)")
        }
        return parts.joined(separator: " ")
    }

    /// The virtual size the image gets: the given size rounded up to 512 bytes, as qemu does.
    var roundedSize: UInt64? { size.map { ($0 &+ 511) & ~511 } }

    /// Engine options for a qcow2 image.
    var qcow2Options: CreateOptions {
        var o = CreateOptions()
        o.size = roundedSize
        o.clusterSize = clusterSize
        o.refcountBits = refcountBits
        o.compressionType = compressionType
        o.lazyRefcounts = lazyRefcounts
        o.extendedL2 = extendedL2
        o.compressWrites = compressWrites
        o.dedupWrites = dedupWrites
        o.backingFile = backingFile
        o.backingFormat = backingFormat
        o.version = version
        return o
    }

    /// Makes the image file with the engine: a fresh, blank image even over an existing file
    /// (as qemu-img), refused while another process uses that file; nothing is left behind
    /// when it fails. `unsafeBacking` is qemu-img's `-u`.
    func create(path: String, unsafeBacking: Bool = false) throws {
        try FullCopy.refuseReplacingTemplate(path)
        switch format {
        case .qcow2:
            var o = qcow2Options
            o.unsafeBacking = unsafeBacking
            try Qcow2Image.create(path: path, options: o)
        case .raw:
            try RawImage.create(path: path, size: roundedSize ?? 0)
        }
    }
}
