import ArgumentParser
import Strata

#if canImport(Glibc)
import Glibc
#endif

/// Everything the command line itself refuses (as opposed to what the engine refuses, which
/// arrives as a ``StrataError``). Each case names the file or argument it is about.
///
/// The one mapping from errors to what the user sees lives in ``report(_:)``: every error
/// becomes a single `strata: …` line on stderr and an exit status.
enum CLIError: Error, CustomStringConvertible {
    /// A size argument that does not parse (`SIZE`, `-o size=…`, `cluster_size=…`).
    case badSize(String, what: String)
    /// A `-o` list entry that is not `key=value`, or a key the format does not know.
    case badOption(String, reason: String)
    /// An option value outside what the format allows, with the reason.
    case invalidValue(file: String, option: String, value: String, reason: String)
    /// A combination of options that the format cannot honour.
    case conflict(file: String, reason: String)
    /// Something a command needs that the user did not give.
    case missing(file: String, what: String)
    /// A refusal with a full message (already names the file).
    case refused(String)

    var description: String {
        switch self {
        case .badSize(let s, let what):
            return "invalid \(what) '\(s)': expected a number with an optional k, M, G, T, P or E suffix"
        case .badOption(let s, let reason):
            return "invalid option '\(s)': \(reason)"
        case .invalidValue(let file, let option, let value, let reason):
            return "\(file): invalid value '\(value)' for \(option): \(reason)"
        case .conflict(let file, let reason):
            return "\(file): \(reason)"
        case .missing(let file, let what):
            return "\(file): \(what)"
        case .refused(let message):
            return message
        }
    }
}

/// Writes one line to stderr (unbuffered, so it interleaves correctly with stdout).
func printError(_ line: String) {
    flushStdout()
    var text = line
    if !text.hasSuffix("\n") { text += "\n" }
    _ = text.withCString { fputs($0, stderr) }
}

/// Flushes buffered stdout (before writing to stderr or exiting).
func flushStdout() { fflush(stdout) }

/// Turns any error from parsing or running a command into one line on stderr and an exit code.
///
/// - `ExitCode` passes through untouched (commands that already reported).
/// - Help and version requests print their text to stdout and exit 0.
/// - Argument errors and every other error print `strata: <message>`; the status is
///   `failureCode` (1, or 2 for `compare`, whose 1 means "images differ").
func report(_ error: Error, failureCode: Int32, subcommand: String = "") -> Int32 {
    if let code = error as? ExitCode { return code.rawValue }
    switch error {
    case let e as StrataError:
        printError("strata: \(e.description)")
        return failureCode
    case let e as CLIError:
        printError("strata: \(e.description)")
        return failureCode
    default:
        break
    }
    // Argument parser errors: help/version (exit 0) or a usage mistake.
    let code = StrataCommand.exitCode(for: error)
    if code == .success {
        print(StrataCommand.fullMessage(for: error))
        return 0
    }
    let message = StrataCommand.message(for: error)
        .split(separator: "\n", omittingEmptySubsequences: true)
        .first.map(String.init) ?? "\(error)"
    let trimmed = message.hasPrefix("Error: ") ? String(message.dropFirst(7)) : message
    // Usage mistakes (exit code 64 inside the parser) get a pointer to the help; our own
    // errors thrown from validate() (the parser's plain failure code) speak for themselves.
    guard code == .validationFailure else {
        printError("strata: \(trimmed)")
        return failureCode
    }
    let known = StrataCommand.configuration.subcommands.map { $0._commandName }
    let help = known.contains(subcommand) ? "strata \(subcommand) --help" : "strata --help"
    printError("strata: \(trimmed) (see '\(help)')")
    return failureCode
}

/// Runs a file operation, naming `path` in any error that does not already name its file.
func withFile<T>(_ path: String, _ body: () throws -> T) throws -> T {
    do {
        return try body()
    } catch let e as StrataError {
        throw e
    } catch {
        throw CLIError.refused("\(path): \(error)")
    }
}
