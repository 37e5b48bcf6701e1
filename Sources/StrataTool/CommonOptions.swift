import ArgumentParser
import Strata

extension ImageFormat: ExpressibleByArgument {}

/// `-f FMT`: the image's format, probed from its first bytes when not given.
struct FormatOption: ParsableArguments {
    @Option(name: .customShort("f"), help: ArgumentHelp("Image format (qcow2 or raw); probed when omitted.", valueName: "fmt"))
    var format: ImageFormat?
}

/// `-U` / `--force-share`: open read-only without taking the image lock (qemu-img's `-U`).
struct ForceShareOption: ParsableArguments {
    @Flag(name: [.customShort("U"), .customLong("force-share")],
          help: "Open the image without locking it (read-only opens only).")
    var forceShare = false
}

/// `--output human|json`.
enum OutputFormat: String, ExpressibleByArgument, CaseIterable {
    case human, json
}

struct OutputOption: ParsableArguments {
    @Option(name: .customLong("output"), help: ArgumentHelp("Output format: human or json.", valueName: "ofmt"))
    var output: OutputFormat = .human
}

/// `-q`: print nothing but errors.
struct QuietOption: ParsableArguments {
    @Flag(name: .customShort("q"), help: "Quiet: print nothing but errors.")
    var quiet = false
}
