import ArgumentParser
import Strata

#if canImport(Glibc)
import Glibc
#endif

/// `strata`: create, inspect, convert, compare, resize and poke at qcow2 and raw images,
/// with qemu-img's and qemu-io's flags, output and exit codes.
///
/// The root only lists the subcommands and owns the one place where errors become messages
/// and exit codes (``report(_:failureCode:subcommand:)``).
@main
struct StrataCommand: ParsableCommand {
    /// The one place the version lives (`strata --version`, `strata -V`).
    static let version = "0.4.0"

    static let configuration = CommandConfiguration(
        commandName: "strata",
        abstract: "Copy-on-write virtual disk images (qcow2, raw): a qemu-img/qemu-io work-alike.",
        discussion: """
            Sizes take k, M, G, T, P, E suffixes (powers of 1024). Errors print one line \
            on stderr and exit 1 ('compare' exits 1 when the images differ and 2 on error).
            """,
        version: "strata version \(version)",
        subcommands: [Create.self, Info.self, Check.self, Map.self, Measure.self, Convert.self, Compare.self, Amend.self, Resize.self, Commit.self, Rebase.self, IO.self, Serve.self, Snapshot.self, Template.self, Clone.self, Dedup.self, ExportCommand.self, Bench.self]
    )

    /// Subcommands whose failure status is 2 rather than 1 (their 1 means something else).
    static let failureCodeTwo: Set<String> = ["compare"]

    /// The names a first argument may take: the subcommands and the parser's `help`.
    static var commandNames: Set<String> {
        Set(configuration.subcommands.map { $0._commandName } + ["help"])
    }

    static func main() {
        var arguments = Array(CommandLine.arguments.dropFirst())
        // qemu-img's short spelling of --version.
        if arguments == ["-V"] { arguments = ["--version"] }
        let sub = arguments.first ?? ""
        let failureCode: Int32 = failureCodeTwo.contains(sub) ? 2 : 1
        let status: Int32
        do {
            // Without these checks the parser prints the help and exits 0 for no arguments
            // and for help on an unknown command, and reads an unknown command as
            // "unexpected arguments".
            if arguments.isEmpty { throw ValidationError("no command given") }
            if !sub.hasPrefix("-"), !commandNames.contains(sub) { throw CLIError.unknownCommand(sub) }
            if sub == "help", arguments.count > 1, !arguments[1].hasPrefix("-"), !commandNames.contains(arguments[1]) {
                throw CLIError.unknownCommand(arguments[1])
            }
            var command = try parseAsRoot(arguments)
            try command.run()
            status = 0
        } catch {
            status = report(error, failureCode: failureCode, subcommand: sub)
        }
        flushStdout()
        Glibc.exit(status)
    }
}
