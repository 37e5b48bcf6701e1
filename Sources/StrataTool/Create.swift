import ArgumentParser
import Strata

/// `strata create [-f FMT] [-o OPTIONS] [-b BACKING [-F BACKING_FMT]] [-u] [-q] FILE [SIZE]`
struct Create: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create a new image.",
        discussion: """
            Options for qcow2 (-o key=value,…): cluster_size, refcount_bits, compression_type \
            (zlib|zstd), lazy_refcounts (on|off), extended_l2 (on|off), compat (1.1|0.10), \
            backing_file, backing_fmt, size. Use -o help to list them. SIZE defaults to the \
            backing file's size. A relative backing file name is relative to FILE's directory.
            """)

    @Option(name: .customShort("f"), help: ArgumentHelp("Format of the new image (qcow2 or raw).", valueName: "fmt"))
    var format: ImageFormat = .raw

    @Option(name: .customShort("o"), help: ArgumentHelp("Format options, key=value[,key=value…].", valueName: "options"))
    var options: [String] = []

    @Option(name: .customShort("b"), help: ArgumentHelp("Backing file (qcow2 only).", valueName: "backing_file"))
    var backingFile: String?

    @Option(name: .customShort("F"), help: ArgumentHelp("Format of the backing file (qcow2 or raw).", valueName: "backing_fmt"))
    var backingFormat: ImageFormat?

    @Flag(name: .customShort("u"), help: "Unsafe: do not open the backing file (SIZE must then be given).")
    var unsafe = false

    @OptionGroup var quiet: QuietOption

    @Argument(help: "The image file to create.")
    var file: String?

    @Argument(help: ArgumentHelp("Virtual size, e.g. 10G, 512M, 1.5T.", valueName: "size"))
    var size: String?

    mutating func validate() throws {
        _ = try settings()
    }

    /// The `-o` list plus SIZE, `-b` and `-F`, parsed and checked; nil for `-o help`.
    func settings() throws -> CreateSettings? {
        let list = try OptionList(parsing: options)
        if list.wantsHelp { return nil }
        guard let file else { throw ValidationError("missing expected argument '<file>'") }
        var s = try CreateSettings(format: format, options: list, file: file)
        if let size {
            guard let n = SizeParser.parse(size) else { throw CLIError.badSize(size, what: "size") }
            s.size = n
        }
        if let b = backingFile { s.backingFile = b }
        if let f = backingFormat { s.backingFormat = f }
        if format == .raw, s.backingFile != nil {
            throw CLIError.conflict(file: file, reason: "raw images have no backing file (use -f qcow2)")
        }
        try s.check(file: file)
        if s.size == nil, s.backingFile == nil {
            throw CLIError.missing(file: file, what: "image creation needs a size (give SIZE or -o size=…)")
        }
        if let size = s.size, size > Limits.maxVirtualSize {
            throw CLIError.invalidValue(file: file, option: "size", value: String(size),
                                        reason: "above the largest virtual size, \(Limits.maxVirtualSize) bytes")
        }
        return s
    }

    func run() throws {
        guard var s = try settings() else {
            print(CreateSettings.helpText(for: format), terminator: "")
            return
        }
        if let backing = s.backingFile {
            try checkBacking(backing, settings: &s)
        }
        let file = self.file ?? ""
        if !quiet.quiet { print(s.formattingLine(file: file)) }
        try s.create(path: file)
    }

    /// Opens the backing file the way the new image will (relative to FILE's directory) to
    /// check it, take the size from it when none was given, and demand its format.
    private func checkBacking(_ backing: String, settings s: inout CreateSettings) throws {
        let file = self.file ?? ""
        let path = ImageChain.combine(file, backing)
        guard let backingFormat = s.backingFormat else {
            // qemu-img 7.2 refuses to record a backing file without its format; say what it looks like.
            let detected = (try? probeFormat(path: path)).map { " (its content looks like \($0.rawValue))" } ?? ""
            throw CLIError.missing(file: file,
                what: "backing file '\(backing)' given without its format: add -F qcow2 or -F raw\(detected)")
        }
        if unsafe {
            if s.size == nil {
                throw CLIError.missing(file: file, what: "with -u the size must be given (the backing file is not opened)")
            }
            return
        }
        let device = try ImageChain.open(path, format: backingFormat, forceShare: true)
        defer { try? device.close() }
        if s.size == nil { s.size = device.size }
    }
}
