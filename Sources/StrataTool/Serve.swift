import ArgumentParser
import Logging
import Strata
import StrataNBD

#if canImport(Glibc)
import Glibc
#endif

/// `strata serve`: export images over NBD, like `qemu-nbd`, but several images per server
/// (one named export each) and many clients at once.
struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Serve images over the NBD protocol.",
        discussion: """
            Each FILE is exported under its file name without the extension (disk.qcow2 -> \
            'disk'); --export NAME=FILE picks the name. Positional FILEs come first, then the \
            --export entries in order; the first export is also the default export (empty \
            name). Without --socket or --port the server listens on TCP 127.0.0.1:10809. \
            It prints one NBD URI per export on stdout once it is listening, and runs until \
            SIGINT or SIGTERM (or, with --once, until the first client has disconnected), \
            then finishes in-flight requests, flushes and closes the images and exits 0.
            """)

    @Option(name: [.customShort("k"), .long], help: ArgumentHelp("Listen on a Unix socket.", valueName: "path"))
    var socket: String?

    @Option(name: [.customShort("b"), .long], help: ArgumentHelp("TCP address to listen on (default 127.0.0.1).", valueName: "addr"))
    var bind: String?

    @Option(name: [.customShort("p"), .long], help: ArgumentHelp("TCP port (default 10809; 0 picks a free one).", valueName: "port"))
    var port: Int?

    @Option(name: .customLong("export"), help: ArgumentHelp("Export FILE under NAME (repeatable).", valueName: "name=file"))
    var exports: [String] = []

    @Argument(help: ArgumentHelp("Images to export under their base names.", valueName: "file"))
    var files: [String] = []

    @Flag(name: [.customShort("r"), .long], help: "Export read-only.")
    var readOnly = false

    @Option(help: ArgumentHelp("Cache mode: writeback, writethrough, none or unsafe.", valueName: "mode"))
    var cache = "writeback"

    @Option(help: ArgumentHelp("What trims do: unmap (free clusters) or ignore.", valueName: "mode"))
    var discard = "unmap"

    @Option(name: [.customShort("e"), .long], help: ArgumentHelp("Connections served at once; more wait.", valueName: "n"))
    var maxConnections = 128

    @Flag(help: "Exit after the first client disconnects.")
    var once = false

    @Option(help: ArgumentHelp("Write the server's process id to this file.", valueName: "path"))
    var pidFile: String?

    @Option(name: [.customShort("D"), .long], help: ArgumentHelp("Export description shown to clients.", valueName: "text"))
    var description: String?

    @Flag(name: [.customShort("v"), .long], help: "Log each connection and every request (debug and trace levels).")
    var verbose = false

    @Option(name: [.customShort("f"), .long], help: ArgumentHelp("Image format (qcow2 or raw); probed when omitted.", valueName: "fmt"))
    var format: String?

    func validate() throws {
        if socket != nil && (bind != nil || port != nil) {
            throw ValidationError("--socket cannot be combined with --bind or --port")
        }
        if let port, !(0...65535).contains(port) { throw ValidationError("--port must be between 0 and 65535") }
        if maxConnections < 1 { throw ValidationError("--max-connections must be at least 1") }
        if let format, ImageFormat(rawValue: format) == nil {
            throw ValidationError("unknown format '\(format)' (expected qcow2 or raw)")
        }
        if CacheMode(rawValue: cache) == nil {
            throw ValidationError("unknown cache mode '\(cache)' (expected writeback, writethrough, none or unsafe)")
        }
        if DiscardMode(rawValue: discard) == nil {
            throw ValidationError("unknown discard mode '\(discard)' (expected unmap or ignore)")
        }
        let entries = try exportEntries()
        if entries.isEmpty { throw ValidationError("nothing to serve: give at least one FILE or --export NAME=FILE") }
        var seen = Set<String>()
        for e in entries where !seen.insert(e.name).inserted {
            throw ValidationError("export name '\(e.name)' is used twice")
        }
    }

    /// Positional files under their base names, then `--export` entries, in order.
    func exportEntries() throws -> [ExportRegistry.Entry] {
        var entries = files.map { ExportRegistry.Entry(name: Self.exportName(forFile: $0), path: $0) }
        for spec in exports {
            guard let eq = spec.firstIndex(of: "="), eq != spec.startIndex, spec.index(after: eq) != spec.endIndex else {
                throw ValidationError("--export expects NAME=FILE, got '\(spec)'")
            }
            entries.append(ExportRegistry.Entry(name: String(spec[..<eq]), path: String(spec[spec.index(after: eq)...])))
        }
        for e in entries where e.name.utf8.count > NBDLimits.maxStringLength {
            throw ValidationError("export name '\(e.name.prefix(32))…' is longer than \(NBDLimits.maxStringLength) bytes")
        }
        return entries
    }

    /// `dir/disk.qcow2` -> `disk`; a leading dot is part of the name (`.hidden` stays).
    static func exportName(forFile path: String) -> String {
        let base = path.split(separator: "/", omittingEmptySubsequences: true).last.map(String.init) ?? path
        guard let dot = base.lastIndex(of: "."), dot != base.startIndex else { return base }
        return String(base[..<dot])
    }

    func run() throws {
        var logger = Logger(label: "strata.serve", factory: { StreamLogHandler.standardError(label: $0) })
        logger.logLevel = verbose ? .trace : .info

        let options = OpenOptions(writable: !readOnly, format: format.flatMap(ImageFormat.init(rawValue:)),
                                  cache: CacheMode(rawValue: cache)!)
        let registry = try ExportRegistry.open(try exportEntries(), options: options,
                                               discard: DiscardMode(rawValue: discard)!, description: description,
                                               logger: logger)

        var config = NBDServer.Configuration()
        if let socket {
            config.address = .unix(path: socket)
        } else {
            config.address = .tcp(host: bind ?? "127.0.0.1", port: port ?? 10809)
        }
        config.maxConnections = maxConnections
        config.once = once

        let server = NBDServer(registry: registry, configuration: config, logger: logger)
        do {
            try server.start()
        } catch {
            try? registry.closeAll()
            throw CLIError.refused("\(error)")
        }
        server.installSignalHandlers()

        // Scripts wait for these lines: print them only once the socket accepts connections.
        for uri in server.uris { print(uri) }
        fflush(stdout)

        if let pidFile {
            let text = "\(getpid())\n"
            let fd = open(pidFile, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            if fd < 0 || text.withCString({ write(fd, $0, strlen($0)) }) < 0 {
                logger.error("cannot write pid file \(pidFile): \(String(cString: strerror(errno)))")
            }
            if fd >= 0 { close(fd) }
        }
        defer { if let pidFile { unlink(pidFile) } }

        try server.wait()
    }
}
