#if canImport(Glibc)
import Glibc
#endif

/// `strata serve --fork`, without `fork()`: the server runs in a new process started from this
/// same binary, and the command returns once that server is listening.
///
/// A process that may already have threads (the Swift runtime's, SwiftNIO's) must not fork,
/// so the launcher spawns a fresh `strata serve` with the same arguments minus `--fork`, plus
/// `--ready-fd N`: the write end of a pipe, the only descriptor above stderr it inherits.
/// The server starts a new session (no controlling terminal, so a closing terminal or Ctrl-C
/// does not reach it), reads nothing from stdin and writes nothing to stdout (both are
/// /dev/null), and keeps the launcher's stderr until it is ready, so errors before that point
/// reach the user. Once listening (pid file written), it writes its URIs and a last line
/// `ready` into the pipe, closes it, and sends stderr to /dev/null. The launcher prints the
/// URIs and exits 0, or, when the pipe closes without `ready`, exits with the server's own
/// status.
enum ServeDaemon {
    /// The last line of the server's message: it is listening.
    static let readyLine = "ready"
    /// The most the launcher reads from the pipe: far more than the URIs of the exports a
    /// command line can name.
    static let maxReadyMessageBytes = 16 << 20

    /// Starts the server in the background and waits until it is listening. Returns this
    /// process's exit status: 0 once the server is ready (its URIs printed on stdout), or the
    /// server's status if it ended before (having printed its error on our shared stderr).
    static func launch(arguments: [String]) -> Int32 {
        guard arguments.count >= 2, arguments[1] == "serve" else {
            printError("strata: --fork: cannot find the serve command in the arguments")
            return 1
        }
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else {
            printError("strata: --fork: cannot create a pipe: \(String(cString: strerror(errno)))")
            return 1
        }
        let (readEnd, writeEnd) = (fds[0], fds[1])
        keepFromChild(except: writeEnd)

        // The same command without --fork (options end at "--"), told where to say ready.
        var childArguments = [arguments[0], "serve", "--ready-fd", "\(writeEnd)"]
        var optionsEnded = false
        for argument in arguments.dropFirst(2) {
            if argument == "--" { optionsEnded = true }
            if argument == "--fork" && !optionsEnded { continue }
            childArguments.append(argument)
        }

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        let argv = childArguments.map { strdup($0) } + [nil]
        defer { for p in argv { free(p) } }
        var pid: pid_t = 0
        let spawned = posix_spawn(&pid, "/proc/self/exe", &actions, nil, argv, environ)
        close(writeEnd)
        guard spawned == 0 else {
            close(readEnd)
            printError("strata: --fork: cannot start the server: \(String(cString: strerror(spawned)))")
            return 1
        }

        var message: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while message.count <= maxReadyMessageBytes {
            let n = read(readEnd, &chunk, chunk.count)
            if n > 0 {
                message += chunk[0..<n]
            } else if n < 0 && errno == EINTR {
                continue
            } else {
                break
            }
        }
        close(readEnd)
        let text = String(decoding: message, as: UTF8.self)
        if text.hasSuffix(readyLine + "\n") {
            print(text.dropLast(readyLine.utf8.count + 1), terminator: "")
            return 0
        }

        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        let signal = status & 0x7f
        if signal != 0 { return 128 + signal }
        let code = (status >> 8) & 0xff
        return code == 0 ? 1 : code  // ended "successfully" without ever listening: still a failure
    }

    /// Marks every open descriptor above stderr close-on-exec, except `kept`: the server must
    /// not hold on to descriptors it inherited from whoever started the launcher (a caller
    /// waiting for a pipe to close would wait as long as the server runs).
    private static func keepFromChild(except kept: Int32) {
        guard let dir = opendir("/proc/self/fd") else { return }
        defer { closedir(dir) }
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard let fd = Int32(name), fd > STDERR_FILENO, fd != kept else { continue }
            let flags = fcntl(fd, F_GETFD)
            if flags >= 0 { _ = fcntl(fd, F_SETFD, flags | FD_CLOEXEC) }
        }
    }

    /// The server's end of the launcher's pipe.
    struct ReadyChannel {
        let fd: Int32

        /// Takes over `fd` (from `--ready-fd`) and leaves the launcher's session.
        init(fd: Int32) throws {
            guard fd > 2, fcntl(fd, F_GETFD) >= 0 else {
                throw CLIError.message("--ready-fd \(fd) is not an open file descriptor")
            }
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            self.fd = fd
            _ = setsid()
        }

        /// Tells the launcher the server is listening, with its URIs, then stops writing to
        /// the launcher's stderr.
        func announce(uris: [String]) {
            let text = (uris + [ServeDaemon.readyLine]).map { $0 + "\n" }.joined()
            let previous = signal(SIGPIPE, SIG_IGN)  // a launcher killed meanwhile must not kill us
            var bytes = Array(text.utf8)[...]
            while !bytes.isEmpty {
                let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { break }
                bytes = bytes.dropFirst(n)
            }
            signal(SIGPIPE, previous)
            close(fd)
            let null = open("/dev/null", O_WRONLY)
            if null >= 0 {
                dup2(null, STDERR_FILENO)
                close(null)
            }
        }
    }
}
