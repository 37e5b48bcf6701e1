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

/// qemu's cache mode names (`-t`, `-T`, qemu-io's `--cache`) onto the engine's ``CacheMode``.
enum CacheModeName {
    /// The names the flags take, for their help.
    static let choices = "writeback (default), writethrough, none (or off) or unsafe"

    /// The mode named `text`; `flag` is named in the error. qemu's `directsync` (no host page
    /// cache and every write durable) has no engine mode, so it is refused rather than
    /// silently weakened.
    static func parse(_ text: String, flag: String) throws -> CacheMode {
        switch text {
        case "off": return .none
        case "directsync":
            throw ValidationError("cache mode 'directsync' (\(flag)) is not supported: use none (no host page cache) or writethrough (every write durable)")
        default:
            guard let mode = CacheMode(rawValue: text) else {
                throw ValidationError("invalid cache mode '\(text)' for \(flag): expected writeback, writethrough, none, off or unsafe")
            }
            return mode
        }
    }
}
