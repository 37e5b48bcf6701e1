import ArgumentParser
import Strata

/// `strata create [-f FMT] [-o OPTIONS] [-b BACKING [-F BACKING_FMT]] [-u] [-q] FILE [SIZE]`
struct Create: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create a new image.",
        discussion: """
            Options for qcow2 (-o key=value,…): cluster_size, refcount_bits, compression_type \
            (zlib|zstd|lz4; lz4 is Strata's own, QEMU refuses such an image), compress \
            (on|off: Strata stores whole-cluster guest writes compressed), dedup (on|off: Strata \
            stores a whole cluster whose content the image already holds only once), lazy_refcounts \
            (on|off), extended_l2 (on|off), compat (1.1|0.10), backing_file, backing_fmt, size. Use -o help to list them. SIZE defaults to the \
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

    /// SIZE as typed. It is collected raw because a negative size such as `-1` looks like an
    /// option to the parser; it must reach the size parser to be refused as a size.
    @Argument(parsing: .allUnrecognized, help: ArgumentHelp("Virtual size, e.g. 10G, 512M, 1.5T.", valueName: "size"))
    var sizeArguments: [String] = []

    mutating func validate() throws {
        _ = try settings()
    }

    /// The SIZE argument, if given. Anything else the parser did not recognise is refused
    /// here as it would have been there.
    func sizeArgument() throws -> String? {
        let args = sizeArguments.filter { $0 != "--" }
        try SizeParser.refuseOptions(args)
        guard args.count <= 1 else { throw ValidationError("unexpected argument '\(args[1])'") }
        return args.first
    }

    /// The `-o` list plus SIZE, `-b` and `-F`, parsed and checked; nil for `-o help`.
    func settings() throws -> CreateSettings? {
        guard let file else {
            if (try? OptionList(parsing: options, file: ""))?.wantsHelp == true { return nil }
            throw ValidationError("missing expected argument '<file>'")
        }
        let list = try OptionList(parsing: options, file: file)
        if list.wantsHelp { return nil }
        let size = try sizeArgument().map { try SizeParser.parse($0, what: "size", file: file) }
        var s = try CreateSettings(format: format, options: list, file: file)
        if let size {
            if s.size != nil { throw CLIError.givenTwice(file: file, what: "image size", ways: "SIZE and -o size") }
            s.size = size
        }
        if let b = backingFile {
            if s.backingFile != nil { throw CLIError.givenTwice(file: file, what: "backing file", ways: "-b and -o backing_file") }
            s.backingFile = b
        }
        if let f = backingFormat {
            if s.backingFormat != nil { throw CLIError.givenTwice(file: file, what: "backing format", ways: "-F and -o backing_fmt") }
            s.backingFormat = f
        }
        if format == .raw, s.backingFile != nil {
            throw CLIError.refused(file: file, reason: "raw images have no backing file (use -f qcow2)")
        }
        try s.check(file: file)
        if s.size == nil, s.backingFile == nil {
            throw CLIError.refused(file: file, reason: "image creation needs a size (give SIZE or -o size=…)")
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
        let file = self.file ?? ""
        if let backing = s.backingFile {
            // qemu-img 7.2 refuses to record a backing file without its format; say what it looks like.
            guard s.backingFormat != nil else {
                let path = BackingChain.resolve(backing, relativeTo: file)
                let detected = (try? probeFormat(path: path)).map { " (its content looks like \($0.rawValue))" } ?? ""
                throw CLIError.refused(file: file,
                    reason: "backing file '\(backing)' given without its format: add -F qcow2 or -F raw\(detected)")
            }
            // The engine checks the backing file (not the image itself, openable) and takes
            // its size when none was given, before anything is written.
            var o = s.qcow2Options
            o.unsafeBacking = unsafe
            s.size = try o.resolved(for: file).size
        }
        if !quiet.quiet { print(s.formattingLine(file: file)) }
        try s.create(path: file, unsafeBacking: unsafe)
    }
}
