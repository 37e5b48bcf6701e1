import ArgumentParser
import Strata

#if canImport(Glibc)
import Glibc
#endif

/// Everything the command line itself refuses (as opposed to what the engine refuses, which
/// arrives as a ``StrataError`` and already names its file).
///
/// Each case renders as `FILE: message` when the mistake is about a file (the image being made,
/// opened or worked on), and as a bare `message` for a pure argument mistake. Messages start in
/// lower case. The one mapping from errors to what the user sees is ``report(_:failureCode:subcommand:)``:
/// every error becomes a single `strata: …` line on stderr and an exit status.
enum CLIError: Error, CustomStringConvertible {
    /// A size argument or size option that is not a size (`SIZE`, `-o size=…`, `-S`, offsets).
    case badSize(file: String?, what: String, text: String, problem: SizeParser.Problem)
    /// A `-o` argument that is no option list at all (empty, a leading comma, a dangling comma).
    case badOptionList(String)
    /// A `-o` entry that is not `key=value`, or whose key the format does not take.
    case badOption(file: String, entry: String, reason: String)
    /// An option value outside what the format allows, with the reason.
    case invalidValue(file: String, option: String, value: String, reason: String)
    /// The same setting given twice, by a flag or argument and by `-o` (`ways` names both).
    case givenTwice(file: String, what: String, ways: String)
    /// Any other refusal about `file`: a conflict, something missing, an impossible request.
    case refused(file: String, reason: String)
    /// A chain operation on an image without a backing file (`action`: what it would do).
    case noBackingFile(file: String, action: String)
    /// `file` names a backing file that is not there.
    case backingMissing(file: String, name: String, path: String)
    /// A commit into an image that is a template.
    case backingIsTemplate(file: String)
    /// `commit -b NAME`: NAME is not in `file`'s backing chain.
    case notInChain(file: String, name: String)
    /// A rebase onto a backing file that is not there.
    case newBackingMissing(file: String, name: String, path: String)
    /// A first argument that is no subcommand.
    case unknownCommand(String)
    /// A refusal about no one file, its whole message (a flag that cannot be honoured, a
    /// server that cannot start).
    case message(String)

    var description: String {
        switch self {
        case .badSize(let file, let what, let text, let problem):
            let reason: String
            switch problem {
            case .notANumber: reason = "expected a number with an optional k, M, G, T, P or E suffix"
            case .negative: reason = "it cannot be negative"
            case .tooLarge: reason = "too large (the limit is \(SizeParser.maxSize) bytes)"
            }
            return (file.map { "\($0): " } ?? "") + "invalid \(what) '\(text)': \(reason)"
        case .badOptionList(let text):
            return "invalid option list '\(text)': expected key=value[,key=value...] (',,' for a comma in a value)"
        case .badOption(let file, let entry, let reason):
            return "\(file): invalid option '\(entry)': \(reason)"
        case .invalidValue(let file, let option, let value, let reason):
            return "\(file): invalid value '\(value)' for \(option): \(reason)"
        case .givenTwice(let file, let what, let ways):
            return "\(file): the \(what) must be given only once (\(ways))"
        case .refused(let file, let reason):
            return "\(file): \(reason)"
        case .noBackingFile(let file, let action):
            return "\(file): has no backing file to \(action)"
        case .backingMissing(let file, let name, let path):
            return "\(file): backing file '\(name)' is missing (looked for \(path)); if it was moved, point at it with 'strata rebase -u -b NEWPATH -F FMT \(file)'"
        case .backingIsTemplate(let file):
            return "\(file): is a template; its linked clones read through it, so nothing is committed into it (copy it with 'strata convert', or commit into a clone)"
        case .notInChain(let file, let name):
            return "\(file): '\(name)' is not in the backing chain (see 'strata info --backing-chain \(file)')"
        case .newBackingMissing(let file, let name, let path):
            return "\(file): new backing file '\(name)' does not exist (looked for \(path); a relative name is looked up in the image's folder)"
        case .unknownCommand(let name):
            return "unknown command '\(name)' (see 'strata --help')"
        case .message(let text):
            return text
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
    let trimmed = lowerFirst(message.hasPrefix("Error: ") ? String(message.dropFirst(7)) : message)
        .replacing(". Please provide one of ", with: ": expected one of ")
    let sentence = trimmed.hasSuffix(".") ? String(trimmed.dropLast()) : trimmed
    // Usage mistakes (exit code 64 inside the parser) get a pointer to the help; our own
    // errors thrown from validate() (the parser's plain failure code) speak for themselves.
    guard code == .validationFailure else {
        printError("strata: \(sentence)")
        return failureCode
    }
    let known = StrataCommand.configuration.subcommands.map { $0._commandName }
    let help = known.contains(subcommand) ? "strata \(subcommand) --help" : "strata --help"
    printError("strata: \(sentence) (see '\(help)')")
    return failureCode
}

/// The parser's messages start with a capital ("Unknown option '-x'"); ours do not.
/// An initialism ("NBD …") keeps its capitals.
private func lowerFirst(_ message: String) -> String {
    guard let first = message.first, first.isUppercase else { return message }
    let second = message.dropFirst().first
    if let second, second.isUppercase { return message }
    return first.lowercased() + message.dropFirst()
}

/// Runs a file operation, naming `path` in any error that does not already name its file.
func withFile<T>(_ path: String, _ body: () throws -> T) throws -> T {
    do {
        return try body()
    } catch let e as StrataError {
        throw e
    } catch {
        throw CLIError.refused(file: path, reason: "\(error)")
    }
}
