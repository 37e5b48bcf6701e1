import ArgumentParser
import Strata

#if canImport(Glibc)
import Glibc
#endif

/// `strata`: create, inspect, convert, compare, resize and poke at qcow2 and raw images,
/// with qemu-img's and qemu-io's flags, output and exit codes.
///
/// The root only lists the subcommands and owns the one place where errors become messages
/// and exit codes (``report(_:failureCode:)``).
@main
struct StrataCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "strata",
        abstract: "Copy-on-write virtual disk images (qcow2, raw): a qemu-img/qemu-io work-alike.",
        discussion: """
            Sizes take k, M, G, T, P, E suffixes (powers of 1024). Errors print one line \
            on stderr and exit 1 ('compare' exits 1 when the images differ and 2 on error).
            """,
        subcommands: [Create.self, Info.self, Map.self, Convert.self, Compare.self, Resize.self, IO.self, Serve.self]
    )

    /// Subcommands whose failure status is 2 rather than 1 (their 1 means something else).
    static let failureCodeTwo: Set<String> = ["compare"]

    static func main() {
        let arguments = Array(CommandLine.arguments.dropFirst())
        let sub = arguments.first ?? ""
        let failureCode: Int32 = failureCodeTwo.contains(sub) ? 2 : 1
        let status: Int32
        do {
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
