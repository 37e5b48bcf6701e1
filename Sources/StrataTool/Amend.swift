import ArgumentParser
import Strata

/// `strata amend [-f FMT] [-t CACHE] [-p] [-q] -o OPTIONS FILE`
struct Amend: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Change format options of an existing image.",
        discussion: """
            qcow2 options (-o key=value,…): compat (1.1|0.10), lazy_refcounts (on|off), \
            refcount_bits (1 to 64, a power of two), size. Going to compat=0.10 rewrites zero \
            clusters (which version 2 cannot express) in the active disk and every snapshot; \
            changing refcount_bits writes a new refcount table. Everything is made durable \
            before the header points at it, so a crash leaves the old image or the new one. \
            Options fixed at creation (cluster_size, extended_l2, compression_type) cannot be \
            amended; for the backing file use rebase. -o help lists the options.
            """)

    @OptionGroup var format: FormatOption

    @Option(name: .customShort("o"), help: ArgumentHelp("Options to change, key=value[,key=value…].", valueName: "options"))
    var options: [String] = []

    @Option(name: .customShort("t"), help: ArgumentHelp("Cache mode: \(CacheModeName.choices).", valueName: "cache"))
    var cache: String?

    @Flag(name: .customShort("p"), help: "Show progress.")
    var progress = false

    @OptionGroup var quiet: QuietOption

    @Argument(help: "The image file.")
    var file: String

    /// What `-o help` lists.
    static let amendable: [(String, String)] = [
        ("compat=<str>", "Compatibility level (v2 [0.10] or v3 [1.1])"),
        ("lazy_refcounts=<bool (on/off)>", "Postpone refcount updates"),
        ("refcount_bits=<num>", "Width of a reference count entry in bits"),
        ("size=<size>", "Virtual disk size"),
    ]

    mutating func validate() throws {
        if options.isEmpty { throw ValidationError("give the options to change with -o (-o help lists them)") }
        _ = try changes()
        if let cache { _ = try CacheModeName.parse(cache, flag: "-t") }
    }

    /// The changes asked for; nil for `-o help`.
    func changes() throws -> AmendOptions? {
        let list = try OptionList(parsing: options, file: file)
        if list.wantsHelp { return nil }
        var o = AmendOptions()
        for entry in list.entries {
            let (key, value) = (entry.key, entry.value)
            func bad(_ reason: String) -> CLIError { .invalidValue(file: file, option: key, value: value, reason: reason) }
            switch key {
            case "compat":
                switch value {
                case "0.10", "v2": o.version = 2
                case "1.1", "v3": o.version = 3
                default: throw bad("expected 0.10 (v2) or 1.1 (v3)")
                }
            case "lazy_refcounts":
                guard let b = OptionList.parseBool(value) else { throw bad("expected on or off") }
                o.lazyRefcounts = b
            case "refcount_bits":
                guard let n = Int(value) else { throw bad("expected a number") }
                o.refcountBits = n
            case "size":
                o.size = try SizeParser.parse(value, what: "size", file: file)
            case "backing_file", "backing_fmt":
                throw CLIError.refused(file: file, reason: "the backing file cannot be amended; use 'strata rebase -b BACKING -F FMT' (or -u to rewrite the name only)")
            case "cluster_size", "extended_l2", "compression_type", "preallocation":
                throw CLIError.refused(file: file, reason: "'\(key)' can only be set when the image is created (use convert -o \(key)=… into a new image)")
            case "data_file", "data_file_raw":
                throw CLIError.refused(file: file, reason: "external data files are not supported by strata")
            default:
                if key.hasPrefix("encrypt.") { throw CLIError.refused(file: file, reason: "encrypted images are not supported by strata") }
                throw CLIError.badOption(file: file, entry: "\(key)=\(value)",
                    reason: "qcow2 has no amendable option '\(key)' (it takes \(Self.amendable.map { String($0.0.prefix { $0 != "=" }) }.joined(separator: ", ")))")
            }
        }
        return o
    }

    func run() throws {
        guard let o = try changes() else {
            var text = "Amend options for 'qcow2':\n"
            for (name, help) in Self.amendable {
                let padded = name.count < 22 ? name + String(repeating: " ", count: 22 - name.count) : name
                text += "  \(padded) - \(help)\n"
            }
            print(text, terminator: "")
            return
        }
        let mode = try cache.map { try CacheModeName.parse($0, flag: "-t") } ?? .writeback
        let device = try ImageChain.open(file, format: format.format, writable: true, cache: mode)
        var closed = false
        defer { if !closed { try? device.close() } }
        guard let q = device as? Qcow2Image else {
            throw CLIError.refused(file: file, reason: "raw images have no format options to amend")
        }
        let bar = ProgressBar(enabled: progress && !quiet.quiet, total: 1, minStep: 1)
        try q.amend(o)
        closed = true
        try q.close()
        bar.advance(by: 1)
        bar.end()
    }
}
