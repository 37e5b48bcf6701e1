import ArgumentParser
import Strata

/// `strata measure [--output human|json] [-O FMT] [-o OPTIONS] [--size N | [-f FMT] [-U] FILE]`
struct Measure: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Say how much space a new image needs.",
        discussion: """
            For a new image of --size N, or for a conversion of FILE (its whole backing chain) \
            into format -O with -o options: the bytes it needs for that data, and the bytes \
            when fully allocated, as qemu-img measure computes them. The walk over FILE costs \
            what its allocated data costs.
            """)

    @OptionGroup var output: OutputOption

    @Option(name: .customShort("O"), help: ArgumentHelp("Format of the new image (qcow2 or raw).", valueName: "output_fmt"))
    var outputFormat: ImageFormat = .raw

    @Option(name: .customShort("o"), help: ArgumentHelp("Options of the new image, as for create.", valueName: "options"))
    var options: [String] = []

    @Option(name: .customLong("size"), parsing: .unconditional, help: ArgumentHelp("Virtual size of a new, empty image.", valueName: "size"))
    var size: String?

    @OptionGroup var format: FormatOption
    @OptionGroup var share: ForceShareOption

    @Argument(help: "The image to convert (instead of --size).")
    var file: String?

    /// What errors name: the image measured, or the new one.
    var subject: String { file ?? "the new image" }

    mutating func validate() throws {
        if size != nil, file != nil { throw ValidationError("--size cannot be used together with a file name") }
        if size == nil, file == nil, !(try optionList().wantsHelp) {
            throw ValidationError("give either --size N or one image file")
        }
        _ = try settings()
    }

    func optionList() throws -> OptionList { try OptionList(parsing: options, file: subject) }

    /// The new image's settings; nil for `-o help`.
    func settings() throws -> CreateSettings? {
        let list = try optionList()
        if list.wantsHelp { return nil }
        var s = try CreateSettings(format: outputFormat, options: list, file: subject)
        if let size {
            s.size = try SizeParser.parse(size, what: "size", file: nil)
        }
        try s.check(file: subject)
        return s
    }

    func run() throws {
        guard let s = try settings() else {
            print(CreateSettings.helpText(for: outputFormat), terminator: "")
            return
        }
        let source = try file.map { try ImageChain.open($0, format: format.format, forceShare: share.forceShare) }
        defer { try? source?.close() }
        let m = try SizeMeasurement.of(format: outputFormat, options: s.qcow2Options, size: s.size, source: source, path: subject)
        switch output.output {
        case .json:
            var fields: [(String, JSONValue)] = []
            // QEMU's key order (its hash table's).
            if let b = m.bitmaps { fields.append(("bitmaps", .uint(b))) }
            fields.append(("required", .uint(m.required)))
            fields.append(("fully-allocated", .uint(m.fullyAllocated)))
            print(JSONValue.object(fields).pretty)
        case .human:
            print("required size: \(m.required)")
            print("fully allocated size: \(m.fullyAllocated)")
            if let b = m.bitmaps { print("bitmaps size: \(b)") }
        }
    }
}
