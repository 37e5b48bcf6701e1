import ArgumentParser
import Logging
import Strata
import StrataNBD

#if canImport(Glibc)
import Glibc
#endif

/// `strata serve`: export images over NBD, like `qemu-nbd`, but several images per server
/// (one named export each) and many clients at once.
///
/// qemu-nbd's flags are accepted where strata can honour them, and refused with a one-line
/// reason (and what to use instead) where it cannot: see ``refusal()``.
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
            then finishes in-flight requests, flushes and closes the images and exits 0. \
            Unlike qemu-nbd, strata keeps serving after a client disconnects (qemu-nbd's \
            --persistent); --once is qemu-nbd's default behaviour. \
            TLS: --tls-cert and --tls-key (PEM) enable NBD_OPT_STARTTLS; with --tls require \
            (the default) plain-text clients are refused, with --tls optional they may stay \
            in plain text; --tls-ca makes clients present a certificate signed by that CA. \
            qemu-nbd's -B, -c, -d, -L, --tls-creds, --tls-authz, --object, --image-opts, \
            --aio, --detect-zeroes and -o are refused with the reason and what to use instead.
            """)

    @Option(name: [.customShort("k"), .long], help: ArgumentHelp("Listen on a Unix socket.", valueName: "path"))
    var socket: String?

    @Option(name: [.customShort("b"), .long], help: ArgumentHelp("TCP address to listen on (default 127.0.0.1).", valueName: "addr"))
    var bind: String?

    @Option(name: [.customShort("p"), .long], help: ArgumentHelp("TCP port (default 10809; 0 picks a free one).", valueName: "port"))
    var port: Int?

    @Option(name: .customLong("export"), help: ArgumentHelp("Export FILE under NAME (repeatable).", valueName: "name=file"))
    var exports: [String] = []

    @Option(name: [.customShort("x"), .customLong("export-name")],
            help: ArgumentHelp("Export the single FILE under NAME (qemu-nbd's -x).", valueName: "name"))
    var exportName: String?

    @Argument(help: ArgumentHelp("Images to export under their base names.", valueName: "file"))
    var files: [String] = []

    @Flag(name: [.customShort("r"), .long], help: "Export read-only.")
    var readOnly = false

    @Flag(help: "Store every whole cluster a client writes compressed (qcow2; the image's compression type).")
    var compress = false

    @Flag(help: "Store a whole cluster a client writes only once when the image already holds its content (qcow2; inline dedup).")
    var dedup = false

    @Flag(name: [.customShort("s"), .long],
          help: "Write to a temporary overlay (in $TMPDIR, else /var/tmp) deleted at exit; FILE never changes.")
    var snapshot = false

    @Option(name: [.customShort("l"), .customLong("load-snapshot")],
            help: ArgumentHelp("Export the internal snapshot NAME (id or name) of each FILE, read-only. 'strata serve --snapshot NAME FILE' means the same when NAME is not a file.", valueName: "name"))
    var loadSnapshot: String?

    @Option(help: ArgumentHelp("Cache mode: writeback (default), writethrough, none or unsafe.", valueName: "mode"))
    var cache: String?

    @Flag(name: [.customShort("n"), .customLong("nocache")], help: "The same as --cache=none.")
    var nocache = false

    @Option(help: ArgumentHelp("What trims do: unmap (free clusters) or ignore.", valueName: "mode"))
    var discard = "unmap"

    @Option(name: [.customShort("e"), .long], help: ArgumentHelp("Connections served at once; more wait.", valueName: "n"))
    var maxConnections = 128

    @Flag(help: "Exit after the first client disconnects (qemu-nbd's default).")
    var once = false

    @Flag(name: [.customShort("t"), .long],
          help: "Keep serving after clients disconnect: strata always does, unless --once is given.")
    var persistent = false

    @Flag(name: [.customShort("A"), .customLong("allocation-depth")],
          help: "Offer qemu:allocation-depth: strata always does.")
    var allocationDepth = false

    @Option(help: ArgumentHelp("Also listen on this Unix socket for management commands (JSON lines; see spec/control.md).",
                               valueName: "path"))
    var control: String?

    @Option(name: .customLong("tls-cert"),
            help: ArgumentHelp("Serve TLS (NBD_OPT_STARTTLS) with this PEM certificate (chain).", valueName: "file"))
    var tlsCert: String?

    @Option(name: .customLong("tls-key"), help: ArgumentHelp("The PEM private key of --tls-cert.", valueName: "file"))
    var tlsKey: String?

    @Option(name: .customLong("tls-ca"),
            help: ArgumentHelp("Require client certificates signed by this PEM CA (mutual TLS).", valueName: "file"))
    var tlsCA: String?

    @Option(name: .customLong("tls"),
            help: ArgumentHelp("require (default with --tls-cert): refuse plain-text clients; optional: serve both.",
                               valueName: "mode"))
    var tlsMode: String?

    @Flag(help: "Run in the background: return once the server is listening, printing its URIs.")
    var fork = false

    @Option(help: ArgumentHelp("Write the server's process id to this file.", valueName: "path"))
    var pidFile: String?

    @Option(name: [.customShort("D"), .long], help: ArgumentHelp("Export description shown to clients.", valueName: "text"))
    var description: String?

    @Flag(name: [.customShort("v"), .long], help: "Log each connection and every request (debug and trace levels).")
    var verbose = false

    @Option(name: [.customShort("f"), .long], help: ArgumentHelp("Image format (qcow2 or raw); probed when omitted.", valueName: "fmt"))
    var format: String?

    // qemu-nbd flags strata refuses, each with its reason in `refusal()`.
    @Option(name: [.customShort("B"), .customLong("bitmap")], help: .hidden) var bitmap: String?
    @Option(name: [.customShort("c"), .customLong("connect")], help: .hidden) var connect: String?
    @Flag(name: [.customShort("d"), .customLong("disconnect")], help: .hidden) var disconnect = false
    @Flag(name: [.customShort("L"), .customLong("list")], help: .hidden) var list = false
    @Option(name: .customLong("tls-creds"), help: .hidden) var tlsCreds: String?
    @Option(name: .customLong("tls-authz"), help: .hidden) var tlsAuthz: String?
    @Option(name: .customLong("object"), help: .hidden) var object: [String] = []
    @Flag(name: .customLong("image-opts"), help: .hidden) var imageOpts = false
    @Option(name: .customLong("aio"), help: .hidden) var aio: String?
    @Option(name: .customLong("detect-zeroes"), help: .hidden) var detectZeroes: String?
    @Option(name: [.customShort("o"), .customLong("offset")], help: .hidden) var offset: String?

    /// Set by `--fork` on the server it launches: where to say "ready" (see ``ServeDaemon``).
    @Option(name: .customLong("ready-fd"), help: .private) var readyFD: Int32?

    /// The first qemu-nbd flag given that strata does not support, as the message to print:
    /// what it would do, and what to use instead.
    func refusal() -> String? {
        if bitmap != nil {
            return "-B/--bitmap: strata serve does not export persistent dirty bitmaps; use qemu-nbd -B"
        }
        if connect != nil {
            return "-c/--connect: strata serve does not attach kernel NBD devices; use nbd-client with the server's "
                + "address, or give clients the nbd:// or nbd+unix:// URI"
        }
        if disconnect {
            return "-d/--disconnect: strata serve attaches no kernel NBD device, so there is none to disconnect; "
                + "use nbd-client -d DEVICE"
        }
        if list { return "-L/--list is a client's job: list a server's exports with 'nbdinfo --list URI'" }
        if tlsCreds != nil {
            return "--tls-creds: strata has no QEMU objects; give the x509 files directly: "
                + "--tls-cert DIR/server-cert.pem --tls-key DIR/server-key.pem [--tls-ca DIR/ca-cert.pem]"
        }
        if tlsAuthz != nil {
            return "--tls-authz: strata has no authorization lists; --tls-ca admits every client whose certificate "
                + "that CA signed (use a CA for those clients only), or use qemu-nbd --tls-authz"
        }
        if !object.isEmpty {
            return "--object: strata has no QEMU objects; give TLS credentials with --tls-cert, --tls-key and --tls-ca, "
                + "serve plain images (no secrets), or use qemu-nbd"
        }
        if imageOpts {
            return "--image-opts: FILE is a plain file name here; give the format with -f, or use qemu-nbd --image-opts"
        }
        if aio != nil {
            return "--aio: strata always does its I/O on a thread pool (qemu's aio=threads); there is no other mode"
        }
        if detectZeroes != nil {
            return "--detect-zeroes: strata does not scan written data for zeroes; clients can send WRITE_ZEROES, "
                + "or use qemu-nbd --detect-zeroes"
        }
        if offset != nil {
            return "-o/--offset: strata exports whole images; use qemu-nbd -o, or nbdkit's offset filter"
        }
        return nil
    }

    /// The cache mode: `--cache`, `-n`, or writeback.
    var cacheMode: String { cache ?? (nocache ? "none" : "writeback") }

    func validate() throws {
        if let refusal = refusal() { throw CLIError.message(refusal) }
        if socket != nil && (bind != nil || port != nil) {
            throw ValidationError("--socket cannot be combined with --bind or --port")
        }
        if let control {
            if control == socket { throw ValidationError("--control needs its own socket path, not the NBD --socket") }
            if control.utf8.count > NBDServerError.maxUnixPathBytes {
                throw ValidationError("--control path is \(control.utf8.count) bytes, longer than \(NBDServerError.maxUnixPathBytes)")
            }
        }
        try validateTLS()
        if let port, !(0...65535).contains(port) { throw ValidationError("--port must be between 0 and 65535") }
        if maxConnections < 1 { throw ValidationError("--max-connections must be at least 1") }
        if once && persistent { throw ValidationError("--once and -t/--persistent contradict each other") }
        if fork && readyFD != nil { throw ValidationError("--fork and --ready-fd cannot be combined") }
        if let format, ImageFormat(rawValue: format) == nil {
            throw ValidationError("unknown format '\(format)' (expected qcow2 or raw)")
        }
        if let cache, CacheMode(rawValue: cache) == nil {
            throw ValidationError("unknown cache mode '\(cache)' (expected writeback, writethrough, none or unsafe)")
        }
        if nocache, let cache, cache != "none" {
            throw ValidationError("-n/--nocache means --cache=none; it cannot be combined with --cache=\(cache)")
        }
        if DiscardMode(rawValue: discard) == nil {
            throw ValidationError("unknown discard mode '\(discard)' (expected unmap or ignore)")
        }
        if exportName != nil && imageFiles.count != 1 {
            throw ValidationError("-x/--export-name names the export of a single FILE (\(imageFiles.count) given); "
                                  + "name several with --export NAME=FILE")
        }
        let entries = try exportEntries()
        if entries.isEmpty { throw ValidationError("nothing to serve: give at least one FILE or --export NAME=FILE") }
        var seen = Set<String>()
        for e in entries where !seen.insert(e.name).inserted {
            throw ValidationError("export name '\(e.name)' is used twice")
        }
    }

    /// The TLS flags fit together and their files can be read (the files are parsed in `run`).
    func validateTLS() throws {
        if let tlsMode, NBDTLSMode(rawValue: tlsMode) == nil {
            throw ValidationError("unknown --tls mode '\(tlsMode)' (expected require or optional)")
        }
        guard let tlsCert else {
            for (flag, given) in [("--tls-key", tlsKey != nil), ("--tls-ca", tlsCA != nil), ("--tls", tlsMode != nil)] where given {
                throw ValidationError("\(flag) needs --tls-cert and --tls-key to enable TLS")
            }
            return
        }
        guard let tlsKey else { throw ValidationError("--tls-cert needs --tls-key, the certificate's private key") }
        for (flag, path) in [("--tls-cert", tlsCert), ("--tls-key", tlsKey), ("--tls-ca", tlsCA)] {
            guard let path else { continue }
            if access(path, R_OK) != 0 {
                throw ValidationError("\(flag): cannot read '\(path)': \(String(cString: strerror(errno)))")
            }
        }
    }

    /// The server's TLS settings, or nil without --tls-cert. Throws with the flag and file that
    /// cannot be used.
    func tlsConfiguration() throws -> NBDTLSConfiguration? {
        guard let tlsCert, let tlsKey else { return nil }
        do {
            return try NBDTLSConfiguration(certificate: tlsCert, key: tlsKey, clientCA: tlsCA,
                                           mode: tlsMode.flatMap(NBDTLSMode.init(rawValue:)) ?? .require)
        } catch {
            throw CLIError.message("\(error)")
        }
    }

    /// The internal snapshot to export: `-l NAME`, or `--snapshot NAME FILE` where NAME is no
    /// file (`-s` alone is qemu-nbd's temporary overlay).
    var snapshotToLoad: String? {
        if let loadSnapshot { return loadSnapshot }
        guard snapshot, files.count == 2, !Storage.exists(files[0]), Storage.exists(files[1]) else { return nil }
        return files[0]
    }

    /// The image files named on the command line (without a snapshot name taken by `--snapshot`).
    var imageFiles: [String] { loadSnapshot == nil && snapshotToLoad != nil ? [files[1]] : files }

    /// Positional files under their base names (or `-x`), then `--export` entries, in order.
    func exportEntries() throws -> [ExportRegistry.Entry] {
        let overlay = snapshot && snapshotToLoad == nil
        var entries = imageFiles.map {
            ExportRegistry.Entry(name: exportName ?? Self.exportName(forFile: $0), path: $0, snapshot: overlay)
        }
        for spec in exports {
            guard let eq = spec.firstIndex(of: "="), eq != spec.startIndex, spec.index(after: eq) != spec.endIndex else {
                throw ValidationError("--export expects NAME=FILE, got '\(spec)'")
            }
            entries.append(ExportRegistry.Entry(name: String(spec[..<eq]), path: String(spec[spec.index(after: eq)...]),
                                                snapshot: overlay))
        }
        for e in entries where e.name.utf8.count > NBDLimits.maxStringLength {
            throw ValidationError("export name '\(e.name.prefix(32))…' is longer than \(NBDLimits.maxStringLength) bytes")
        }
        return entries
    }

    /// `dir/disk.qcow2` -> `disk`; a leading dot is part of the name (`.hidden` stays);
    /// `rbd:pool/vm1.qcow2:conf=…` -> `vm1`.
    static func exportName(forFile path: String) -> String {
        if let rbd = try? RBDName(parsing: path) { return exportName(forFile: rbd.image) }
        let base = path.split(separator: "/", omittingEmptySubsequences: true).last.map(String.init) ?? path
        guard let dot = base.lastIndex(of: "."), dot != base.startIndex else { return base }
        return String(base[..<dot])
    }

    func run() throws {
        // --fork: this process only launches the server and relays its readiness. It opens no
        // image and starts no thread, so the server can take the image locks.
        if fork { throw ExitCode(ServeDaemon.launch(arguments: Array(CommandLine.arguments))) }
        let ready = try readyFD.map { try ServeDaemon.ReadyChannel(fd: $0) }
        // Before the first thread starts: at most two malloc arenas. By default glibc gives
        // each of the I/O threads and event loops its own (up to 8 per core), and each keeps
        // the 1 MiB request and reply buffers it freed: 80-100 MB held after 1 MiB reads at
        // depth 8, against 22 MB with two (Benchmarks/nbd-bench.sh, peak RSS).
        _ = c_mallopt(-8 /* M_ARENA_MAX */, 2)

        var logger = Logger(label: "strata.serve", factory: { StreamLogHandler.standardError(label: $0) })
        logger.logLevel = verbose ? .trace : .info
        // Before any image is opened, so bad credentials leave nothing to close.
        let tls = try tlsConfiguration()

        var options = OpenOptions(writable: !readOnly && snapshotToLoad == nil, format: format.flatMap(ImageFormat.init(rawValue:)),
                                  cache: CacheMode(rawValue: cacheMode)!)
        options.snapshot = snapshotToLoad
        options.compressWrites = compress
        options.dedupWrites = dedup
        let registry = try ExportRegistry.open(try exportEntries(), options: options,
                                               discard: DiscardMode(rawValue: discard)!, description: description,
                                               switchable: control != nil, logger: logger)
        for export in registry.exports {
            let device = (export.device as? SwitchableDevice)?.withCurrent { $0 } ?? export.device
            ImageChain.warnIfProbedRaw(device, name: (device as? RawImage)?.storage.name ?? export.name)
            ImageChain.warnIfDedupIndexStale(device, name: (device as? Qcow2Image)?.path ?? export.name)
        }

        var config = NBDServer.Configuration()
        if let socket {
            config.address = .unix(path: socket)
        } else {
            config.address = .tcp(host: bind ?? "127.0.0.1", port: port ?? 10809)
        }
        config.maxConnections = maxConnections
        config.once = once
        config.tls = tls

        let server = NBDServer(registry: registry, configuration: config, logger: logger)
        do {
            try server.start()
        } catch {
            try? registry.closeAll()
            throw CLIError.message("\(error)")
        }
        var controlServer: ControlServer?
        if let control {
            let service = ControlService(registry: registry,
                                         defaults: .init(options: options, discard: DiscardMode(rawValue: discard)!,
                                                         description: description, version: StrataCommand.version,
                                                         temporaryOverlay: snapshot),
                                         logger: logger)
            let c = ControlServer(path: control, service: service, logger: logger)
            do {
                try c.start()
            } catch {
                server.shutdown()
                try? server.wait()
                throw CLIError.message("\(error)")
            }
            controlServer = c
        }
        defer { controlServer?.stop() }
        server.installSignalHandlers()

        if let pidFile {
            let text = "\(getpid())\n"
            let fd = open(pidFile, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            if fd < 0 || text.withCString({ write(fd, $0, strlen($0)) }) < 0 {
                logger.error("cannot write pid file \(pidFile): \(String(cString: strerror(errno)))")
            }
            if fd >= 0 { close(fd) }
        }
        defer { if let pidFile { unlink(pidFile) } }

        // Scripts wait for these lines: print them only once the socket accepts connections
        // (and the pid file is written).
        if let ready {
            ready.announce(uris: server.uris)
        } else {
            for uri in server.uris { print(uri) }
            fflush(stdout)
        }

        try server.wait()
    }
}

/// glibc's `mallopt` (malloc.h is not in the Glibc module).
@_silgen_name("mallopt") private func c_mallopt(_ parameter: Int32, _ value: Int32) -> Int32
