import ArgumentParser
import Strata

/// `strata resize [-f FMT] [--shrink] [-q] FILE [+|-]SIZE`
struct Resize: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Grow or shrink an image's virtual size.",
        discussion: """
            SIZE is absolute, or relative with + or - (a leading '-' may need '--' before it, \
            as in qemu-img: 'strata resize --shrink disk.qcow2 -- -1G'). Shrinking needs \
            --shrink and deletes everything past the new end.
            """)

    @OptionGroup var format: FormatOption

    @Flag(name: .customLong("shrink"), help: "Allow the image to get smaller (data past the new end is lost).")
    var shrink = false

    @OptionGroup var quiet: QuietOption

    @Argument(help: "The image file.")
    var file: String

    @Argument(parsing: .allUnrecognized, help: ArgumentHelp("New size, or +SIZE / -SIZE relative to the current one.", valueName: "size"))
    var sizeArguments: [String] = []

    /// The one size argument, parsed.
    func change() throws -> SizeParser.Change {
        let args = sizeArguments.filter { $0 != "--" }
        try SizeParser.refuseOptions(args)
        guard args.count == 1 else {
            throw ValidationError(args.isEmpty ? "missing expected argument '<size>'" : "unexpected arguments: \(args.dropFirst().joined(separator: " "))")
        }
        do {
            return try SizeParser.parseChange(args[0])
        } catch {
            throw CLIError.badSize(file: file, what: "size", text: args[0], problem: error)
        }
    }

    mutating func validate() throws { _ = try change() }

    func run() throws {
        let device = try ImageChain.open(file, format: format.format, writable: true)
        var closed = false
        defer { if !closed { try? device.close() } }
        let current = device.size
        guard let newSize = try change().apply(to: current), newSize > 0 else {
            throw CLIError.refused(file: file, reason: "the new size must be positive (the image is \(current) bytes)")
        }
        if newSize < current, !shrink {
            throw CLIError.refused(file: file, reason: "shrinking from \(current) to \(newSize) bytes deletes the data past the new end; use --shrink to do it")
        }
        guard newSize <= Limits.maxVirtualSize else {
            throw CLIError.refused(file: file, reason: "\(newSize) bytes is above the largest virtual size, \(Limits.maxVirtualSize) bytes")
        }
        switch device {
        case let q as Qcow2Image:
            guard newSize % 512 == 0 else {
                throw CLIError.refused(file: file, reason: "the new size must be a multiple of 512 (got \(newSize))")
            }
            // --shrink: the engine drops the clusters past the new end, as qemu-img does.
            // Growing zero-fills the new area, so a longer backing file never shows through.
            try q.resize(to: newSize, droppingData: true)
        case let r as RawImage:
            try withFile(file) { try r.storage.setLength(newSize) }
        default:
            throw CLIError.refused(file: file, reason: "this kind of image cannot be resized")
        }
        closed = true
        try device.close()
        if !quiet.quiet { print("Image resized.") }
    }
}
