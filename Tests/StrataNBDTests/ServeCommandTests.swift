import Foundation
import XCTest

/// A program running in the background whose stdout is collected line by line.
final class Spawned {
    let process = Process()
    private let lock = NSLock()
    private var collected = Data()
    private let errPath: String
    private let input = Pipe()

    init(_ executable: String, _ arguments: [String], stderrPath: String, environment: [String: String] = [:]) throws {
        errPath = stderrPath
        FileManager.default.createFile(atPath: stderrPath, contents: nil)
        let out = Pipe()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        if !environment.isEmpty {
            process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        }
        process.standardOutput = out
        process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: stderrPath))
        process.standardInput = input
        out.fileHandleForReading.readabilityHandler = { [weak self] h in
            let d = h.availableData
            guard let self else { return }
            self.lock.withLock { self.collected.append(d) }
        }
        try process.run()
    }

    /// Everything printed on stdout so far, as lines.
    var lines: [String] {
        lock.withLock { String(decoding: collected, as: UTF8.self) }.split(separator: "\n").map(String.init)
    }

    var stderr: String { (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? "" }

    /// Writes a line to the program's stdin.
    func send(_ line: String) {
        input.fileHandleForWriting.write(Data((line + "\n").utf8))
    }

    /// Waits until stdout has at least `count` lines (or the program exits, or time runs out).
    func waitForLines(_ count: Int, timeout: TimeInterval = 20) -> [String] {
        let deadline = Date().addingTimeInterval(timeout)
        while lines.count < count && process.isRunning && Date() < deadline { usleep(5_000) }
        usleep(20_000)
        return lines
    }

    /// Waits for the program to exit on its own; nil if it is still running after `timeout`.
    func waitForExit(timeout: TimeInterval = 20) -> Int32? {
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline { usleep(5_000) }
        if process.isRunning { return nil }
        process.waitUntilExit()
        return process.terminationStatus
    }

    /// Sends `signal` and waits for the exit status.
    func stop(_ signal: Int32 = SIGTERM, timeout: TimeInterval = 20) -> Int32? {
        if process.isRunning { kill(process.processIdentifier, signal) }
        return waitForExit(timeout: timeout)
    }

    deinit {
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
    }
}

/// `strata serve` as a user runs it: the built binary, its output, signals and exit codes.
final class ServeCommandTests: XCTestCase {
    /// The `strata` binary built next to this test bundle.
    private func strata(file: StaticString = #filePath, line: UInt = #line) throws -> String {
        let exe = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")
        let path = URL(fileURLWithPath: exe).deletingLastPathComponent().appendingPathComponent("strata").path
        guard FileManager.default.isExecutableFile(atPath: path) else {
            XCTFail("the strata binary is not built at \(path): run 'swift build' first", file: file, line: line)
            throw Peer.PeerMissing(name: "strata")
        }
        let help = try Peer.run(path, ["serve", "--help"])
        guard help.status == 0 else {
            XCTFail("'strata serve' is not available (is Serve registered in StrataCommand?):\n\(help.transcript)", file: file, line: line)
            throw Peer.PeerMissing(name: "strata serve")
        }
        return path
    }

    private func serve(_ dir: String, _ arguments: [String], environment: [String: String] = [:]) throws -> Spawned {
        try Spawned(try strata(), ["serve"] + arguments, stderrPath: "\(dir)/serve-\(UUID().uuidString.prefix(6)).log",
                    environment: environment)
    }

    func testPrintsOneURIPerExportAndStopsCleanlyOnSIGTERMWithWritesInFlight() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/disk.qcow2", size: "64M")
        try makeRaw("\(dir)/extra.img", size: 1 << 20)
        let sock = "\(dir)/s.sock"
        let server = try serve(dir, ["--socket", sock, "\(dir)/disk.qcow2", "--export", "second=\(dir)/extra.img"])
        let uris = server.waitForLines(2)
        XCTAssertEqual(uris, ["nbd+unix:///disk?socket=\(sock)", "nbd+unix:///second?socket=\(sock)"], server.stderr)
        guard uris.count == 2 else { return }
        try Peer.expectSuccess("nbdinfo", ["--size", uris[1]])

        // A client queues 512 writes of 64 KiB; SIGTERM arrives while they are in flight.
        let client = try Spawned(try Peer.path("python3"), Peer.scriptArguments("shutdown_client.py", [uris[0], "512"]),
                                 stderrPath: "\(dir)/client.log")
        XCTAssertEqual(client.waitForLines(1).first, "submitted", client.stderr)
        XCTAssertEqual(server.stop(SIGTERM), 0, "clean exit on SIGTERM:\n\(server.stderr)")
        XCTAssertEqual(client.waitForExit(), 0, client.stderr)
        let ackedLine = client.waitForLines(2).last ?? ""
        XCTAssertTrue(ackedLine.hasPrefix("acked:"), "client output: \(client.lines) \(client.stderr)")
        let acked = ackedLine.split(separator: " ").dropFirst().compactMap { Int($0) }
        print("shutdown test: \(acked.count) of 512 writes acknowledged before the server stopped")
        XCTAssertFalse(FileManager.default.fileExists(atPath: sock), "socket removed on exit")
        XCTAssertTrue(server.stderr.contains("received signal 15"), server.stderr)
        XCTAssertTrue(server.stderr.contains("server stopped"), server.stderr)

        // The image is clean (flushed, closed, unlocked) and holds every acknowledged write.
        try Peer.expectSuccess("qemu-img", ["check", "\(dir)/disk.qcow2"])
        let reads = acked.flatMap { ["-c", "read -P \($0 % 250 + 1) \($0 * 65536) 64k"] }
        if !reads.isEmpty {
            let r = try Peer.expectSuccess("qemu-io", ["-f", "qcow2", "\(dir)/disk.qcow2"] + reads)
            XCTAssertFalse(r.out.contains("Pattern verification failed"), "an acknowledged write was lost:\n\(r.out)")
        }
    }

    /// A full disk: the server runs under a file size limit (RLIMIT_FSIZE, so no mount is
    /// needed) that its image reaches after about 2 MiB. Writes then fail with ENOSPC, the
    /// server keeps serving; once the limit is lifted the same connection writes the rest
    /// (Tests/nbd/full_disk.py), and the image checks clean and holds every byte.
    func testFullDiskAnswersENOSPCAndTheImageStaysUsable() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/disk.qcow2", size: "16M")
        let sock = "\(dir)/s.sock"
        let server = try Spawned(try Peer.path("prlimit"), ["--fsize=\(2 << 20):unlimited", try strata(), "serve", "--socket", sock, "\(dir)/disk.qcow2"],
                                 stderrPath: "\(dir)/serve.log")
        guard let uri = server.waitForLines(1).first else { return XCTFail("no URI: \(server.stderr)") }
        try Peer.python("full_disk.py", [uri, "\(server.process.processIdentifier)", "\(16 << 20)"])
        XCTAssertEqual(server.stop(SIGTERM), 0, "the server kept running and stops cleanly:\n\(server.stderr)")
        try Peer.expectSuccess("qemu-img", ["check", "\(dir)/disk.qcow2"])
    }

    func testOnceExitsAfterTheFirstClientDisconnects() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/once.qcow2", size: "8M")
        let server = try serve(dir, ["--once", "--socket", "\(dir)/o.sock", "\(dir)/once.qcow2"])
        let uri = try XCTUnwrap(server.waitForLines(1).first, server.stderr)
        // Listing does not enter transmission, so it does not count as the client.
        try Peer.expectSuccess("nbdinfo", ["--list", uri])
        XCTAssertTrue(server.process.isRunning, "still serving after a list-only client")
        try Peer.expectSuccess("qemu-io", ["-f", "raw", uri, "-c", "write -P 3 0 64k"])
        XCTAssertEqual(server.waitForExit(), 0, "exits by itself after the client:\n\(server.stderr)")
        try Peer.expectSuccess("qemu-img", ["check", "\(dir)/once.qcow2"])
        let r = try Peer.expectSuccess("qemu-io", ["-f", "qcow2", "-r", "\(dir)/once.qcow2", "-c", "read -P 3 0 64k"])
        XCTAssertFalse(r.out.contains("failed"), r.out)
    }

    func testTCPWithAPickedPortAndSIGINT() throws {
        let dir = try makeTempDir(self)
        try makeRaw("\(dir)/tcp.raw", size: 2 << 20)
        let server = try serve(dir, ["--bind", "127.0.0.1", "--port", "0", "\(dir)/tcp.raw"])
        let uri = try XCTUnwrap(server.waitForLines(1).first, server.stderr)
        XCTAssertTrue(uri.hasPrefix("nbd://127.0.0.1:") && uri.hasSuffix("/tcp"), uri)
        XCTAssertFalse(uri.hasPrefix("nbd://127.0.0.1:0/"), "the real port is printed")
        try Peer.expectSuccess("qemu-io", ["-f", "raw", uri, "-c", "write -P 7 4k 8k", "-c", "read -P 7 4k 8k"])
        let info = try Peer.expectSuccess("nbdinfo", ["--size", uri])
        XCTAssertEqual(info.out.trimmingCharacters(in: .whitespacesAndNewlines), "\(2 << 20)")
        XCTAssertEqual(server.stop(SIGINT), 0, server.stderr)
    }

    /// Without --socket or --port the server listens on 127.0.0.1:10809. Checked without
    /// depending on that port being free: we hold it ourselves (or someone else already does),
    /// so the server must fail to listen there, and say so.
    func testDefaultAddressIsLocalhostOnTheNBDPort() throws {
        let dir = try makeTempDir(self)
        try makeRaw("\(dir)/default.raw", size: 1 << 20)
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(10809).bigEndian
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
        } }
        _ = listen(fd, 1)  // fails harmlessly if another program already listens on 10809
        let r = try Peer.run(try strata(), ["serve", "-f", "raw", "\(dir)/default.raw"], timeout: 20,
                             environment: ["SWIFT_BACKTRACE": "enable=no"])
        XCTAssertEqual(r.status, 1, r.transcript)
        XCTAssertEqual(r.err, "strata: cannot listen on 127.0.0.1:10809: address already in use\n")
        XCTAssertEqual(r.out, "", "no URI is printed when listening fails")
    }

    func testReadOnlyDescriptionPidFileAndVerboseTracing() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/ro.qcow2", size: "8M")
        let pidFile = "\(dir)/serve.pid"
        let server = try serve(dir, ["-r", "-D", "golden image", "--pid-file", pidFile, "--verbose",
                                     "--socket", "\(dir)/r.sock", "\(dir)/ro.qcow2"])
        let uri = try XCTUnwrap(server.waitForLines(1).first, server.stderr)
        let pid = try String(contentsOfFile: pidFile, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        XCTAssertEqual(pid, "\(server.process.processIdentifier)")
        let info = try Peer.expectSuccess("nbdinfo", ["--json", uri])
        XCTAssertTrue(info.out.contains("\"is_read_only\": true"), info.out)
        XCTAssertTrue(info.out.contains("\"description\": \"golden image\""), info.out)
        let write = try Peer.run(try Peer.path("qemu-io"), ["-f", "raw", uri, "-c", "write 0 512"])
        XCTAssertNotEqual(write.status, 0, "qemu-io refuses to write to a read-only export")
        // A read-only open takes only the shared lock: qemu-img can read the image meanwhile.
        try Peer.expectSuccess("qemu-img", ["info", "\(dir)/ro.qcow2"])
        XCTAssertEqual(server.stop(), 0, server.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: pidFile), "pid file removed on exit")
        XCTAssertTrue(server.stderr.contains("debug strata.serve: conn=1 [StrataNBD] connection 1 from the Unix socket closed"),
                      server.stderr)
        XCTAssertTrue(server.stderr.contains("request"), "--verbose traces requests:\n\(server.stderr)")
    }

    /// Connections are logged at debug level only, one summary line each (with the peer), so
    /// a busy server's default log holds no line per client; --verbose shows them.
    func testEachConnectionLogsOneDebugLine() throws {
        let dir = try makeTempDir(self)
        try makeRaw("\(dir)/log.raw", size: 1 << 20)
        for verbose in [false, true] {
            let server = try serve(dir, (verbose ? ["-v"] : []) + ["--port", "0", "\(dir)/log.raw"])
            let uri = try XCTUnwrap(server.waitForLines(1).first, server.stderr)
            try Peer.expectSuccess("nbdinfo", ["--size", uri])
            try Peer.expectSuccess("qemu-io", ["-f", "raw", uri, "-c", "read 0 4k"])
            XCTAssertEqual(server.stop(), 0, server.stderr)
            let lines = server.stderr.split(separator: "\n").filter { $0.contains("[StrataNBD] connection ") }
            if verbose {
                XCTAssertEqual(lines.count, 2, "one line per connection:\n\(server.stderr)")
                for (i, line) in lines.enumerated() {
                    XCTAssertTrue(line.contains("debug strata.serve: conn=\(i + 1) [StrataNBD] connection \(i + 1) from 127.0.0.1:"),
                                  String(line))
                }
                XCTAssertTrue(lines.last?.contains("closed (export 'log'): ") ?? false, "\(lines)")
                XCTAssertTrue(lines.last?.contains(" requests, 4096 bytes read, 0 bytes written") ?? false, "\(lines)")
            } else {
                XCTAssertEqual(lines, [], "no connection lines without --verbose:\n\(server.stderr)")
            }
        }
    }

    func testRefusesBadArgumentsAndUnopenableImages() throws {
        let dir = try makeTempDir(self)
        let strata = try strata()
        try makeQcow2("\(dir)/a.qcow2", size: "1M")
        let cases: [([String], String)] = [
            (["serve"], "nothing to serve"),
            (["serve", "--socket", "\(dir)/x.sock", "--port", "1", "\(dir)/a.qcow2"], "--socket cannot be combined"),
            (["serve", "--cache", "fast", "\(dir)/a.qcow2"], "unknown cache mode"),
            (["serve", "--discard", "maybe", "\(dir)/a.qcow2"], "unknown discard mode"),
            (["serve", "-f", "vmdk", "\(dir)/a.qcow2"], "unknown format"),
            (["serve", "--export", "noequals", "\(dir)/a.qcow2"], "NAME=FILE"),
            (["serve", "\(dir)/a.qcow2", "--export", "a=\(dir)/a.qcow2"], "used twice"),
            (["serve", "--socket", "\(dir)/y.sock", "\(dir)/missing.qcow2"], "missing.qcow2"),
        ]
        for (args, message) in cases {
            let r = try Peer.run(strata, args, timeout: 20)
            XCTAssertNotEqual(r.status, 0, "\(args) must fail")
            XCTAssertTrue(r.err.contains(message), "\(args): expected '\(message)' in:\n\(r.err)")
        }

        // A second server cannot take the write lock of an image already served.
        let first = try serve(dir, ["--socket", "\(dir)/1.sock", "\(dir)/a.qcow2"])
        XCTAssertEqual(first.waitForLines(1).count, 1, first.stderr)
        let second = try Peer.run(strata, ["serve", "--socket", "\(dir)/2.sock", "\(dir)/a.qcow2"], timeout: 20)
        XCTAssertNotEqual(second.status, 0)
        XCTAssertTrue(second.err.contains("lock"), second.err)
        XCTAssertEqual(first.stop(), 0, first.stderr)

        // A port already taken: a one-line error and status 1, and the image is released.
        try makeRaw("\(dir)/p.raw", size: 1 << 20)
        let holder = try serve(dir, ["--port", "0", "\(dir)/p.raw"])
        let uri = try XCTUnwrap(holder.waitForLines(1).first, holder.stderr)
        let port = try XCTUnwrap(uri.split(separator: ":").last?.split(separator: "/").first.map(String.init))
        let busy = try Peer.run(strata, ["serve", "--port", port, "\(dir)/a.qcow2"], timeout: 20,
                                environment: ["SWIFT_BACKTRACE": "enable=no"])
        XCTAssertEqual(busy.status, 1, busy.transcript)
        XCTAssertEqual(busy.err, "strata: cannot listen on 127.0.0.1:\(port): address already in use\n")
        XCTAssertEqual(holder.stop(), 0, holder.stderr)
        try Peer.expectSuccess("qemu-img", ["check", "\(dir)/a.qcow2"])
    }

    /// Every way listening can fail is one line in words, naming the address, and exit 1;
    /// the image is released and nothing that was at the socket path is touched.
    func testListenErrorsSayWhatIsWrongInOneLine() throws {
        let dir = try makeTempDir(self)
        let strata = try strata()
        try makeQcow2("\(dir)/l.qcow2", size: "1M")
        let image = "\(dir)/l.qcow2"
        func refused(_ arguments: [String], as user: UInt32? = nil, file: StaticString = #filePath,
                     line: UInt = #line) throws -> String {
            let command = user.map { ["/usr/bin/setpriv", "--reuid=\($0)", "--regid=\($0)", "--clear-groups", strata] } ?? [strata]
            let r = try Peer.run(command[0], Array(command.dropFirst()) + ["serve"] + arguments, timeout: 30,
                                 environment: ["SWIFT_BACKTRACE": "enable=no"])
            XCTAssertEqual(r.status, 1, r.transcript, file: file, line: line)
            XCTAssertEqual(r.out, "", "no URI is printed", file: file, line: line)
            XCTAssertEqual(r.err.filter { $0 == "\n" }.count, 1, "one line:\n\(r.err)", file: file, line: line)
            return r.err
        }

        let plain = "\(dir)/plain-file"
        XCTAssertTrue(FileManager.default.createFile(atPath: plain, contents: Data("keep me".utf8)))
        XCTAssertEqual(try refused(["-k", plain, image]),
                       "strata: cannot listen on \(plain): \(plain) exists and is not a socket\n")
        XCTAssertEqual(try String(contentsOfFile: plain, encoding: .utf8), "keep me", "the file is left alone")

        XCTAssertEqual(try refused(["-k", "\(dir)/no/such/dir/s.sock", image]),
                       "strata: cannot listen on \(dir)/no/such/dir/s.sock: directory \(dir)/no/such/dir does not exist\n")
        let long = dir + "/" + String(repeating: "s", count: 120)
        XCTAssertEqual(try refused(["-k", long, image]),
                       "strata: cannot listen on \(long): the path is \(long.utf8.count) bytes; a Unix socket path can have at most 107\n")
        XCTAssertEqual(try refused(["-b", "192.0.2.1", "-p", "10809", image]),
                       "strata: cannot listen on 192.0.2.1:10809: no interface of this machine has that address\n")
        XCTAssertEqual(try refused(["-b", "no-such-host.invalid", image]),
                       "strata: cannot listen on no-such-host.invalid:10809: unknown host 'no-such-host.invalid'\n")

        // Permission: as an unprivileged user (root may bind anything).
        let nobody: UInt32? = getuid() == 0 ? 65534 : nil
        XCTAssertEqual(try refused(["-r", "-p", "80", image], as: nobody),
                       "strata: cannot listen on 127.0.0.1:80: permission denied (ports below 1024 need root)\n")
        let locked = "\(dir)/locked"
        try FileManager.default.createDirectory(atPath: locked, withIntermediateDirectories: false,
                                                attributes: [.posixPermissions: 0o555])
        XCTAssertEqual(try refused(["-r", "-k", "\(locked)/s.sock", image], as: nobody),
                       "strata: cannot listen on \(locked)/s.sock: permission denied\n")

        // A live server's socket is not taken over; a stale socket file is replaced.
        let sock = "\(dir)/live.sock"
        let first = try serve(dir, ["-k", sock, image])
        XCTAssertEqual(first.waitForLines(1).count, 1, first.stderr)
        try makeRaw("\(dir)/other.raw", size: 1 << 20)
        XCTAssertEqual(try refused(["-k", sock, "-f", "raw", "\(dir)/other.raw"]),
                       "strata: cannot listen on \(sock): another server is listening on it\n")
        try Peer.expectSuccess("nbdinfo", ["--size", "nbd+unix:///l?socket=\(sock)"])
        XCTAssertEqual(first.stop(SIGKILL), SIGKILL)
        XCTAssertTrue(FileManager.default.fileExists(atPath: sock), "a killed server leaves its socket file")
        let second = try serve(dir, ["-k", sock, "\(dir)/other.raw"])
        XCTAssertEqual(second.waitForLines(1).count, 1, "a stale socket is replaced:\n\(second.stderr)")
        try Peer.expectSuccess("nbdinfo", ["--size", "nbd+unix:///other?socket=\(sock)"])
        XCTAssertEqual(second.stop(), 0, second.stderr)
    }

    /// Each qemu-nbd flag strata cannot honour: one line naming the flag and what to use
    /// instead, exit 1, and nothing served.
    func testRefusedQemuNbdFlagsSayWhatToUseInstead() throws {
        let dir = try makeTempDir(self)
        let strata = try strata()
        try makeQcow2("\(dir)/q.qcow2", size: "1M")
        let image = "\(dir)/q.qcow2"
        let cases: [([String], String)] = [
            (["-B", "bitmap0"], "-B/--bitmap: strata serve does not export persistent dirty bitmaps; use qemu-nbd -B"),
            (["--bitmap=b"], "-B/--bitmap:"),
            (["-c", "/dev/nbd0"], "-c/--connect: strata serve does not attach kernel NBD devices; use nbd-client"),
            (["-d"], "-d/--disconnect: strata serve attaches no kernel NBD device, so there is none to disconnect; use nbd-client -d DEVICE"),
            (["-L"], "-L/--list is a client's job: list a server's exports with 'nbdinfo --list URI'"),
            (["--tls-creds", "tls0"], "--tls-creds: strata has no QEMU objects; give the x509 files directly: --tls-cert"),
            (["--tls-authz", "auth0"], "--tls-authz: strata has no authorization lists"),
            (["--object", "secret,id=s0,data=x"], "--object: strata has no QEMU objects"),
            (["--image-opts"], "--image-opts: FILE is a plain file name here; give the format with -f"),
            (["--aio", "native"], "--aio: strata always does its I/O on a thread pool"),
            (["--detect-zeroes", "unmap"], "--detect-zeroes: strata does not scan written data for zeroes"),
            (["-o", "1M"], "-o/--offset: strata exports whole images; use qemu-nbd -o, or nbdkit's offset filter"),
            (["-x", "two", "\(dir)/other.raw"], "-x/--export-name names the export of a single FILE (2 given)"),
            (["--once", "-t"], "--once and -t/--persistent contradict each other"),
            (["-n", "--cache", "writeback"], "-n/--nocache means --cache=none"),
        ]
        for (flags, message) in cases {
            let r = try Peer.run(strata, ["serve", "-k", "\(dir)/r.sock"] + flags + [image], timeout: 20)
            XCTAssertEqual(r.status, 1, "\(flags): \(r.transcript)")
            XCTAssertTrue(r.err.hasPrefix("strata: \(message)"), "\(flags): expected 'strata: \(message)…', got:\n\(r.err)")
            XCTAssertEqual(r.err.filter { $0 == "\n" }.count, 1, "\(flags): one line:\n\(r.err)")
            XCTAssertEqual(r.out, "")
        }
        try Peer.expectSuccess("qemu-img", ["check", image])
    }

    /// -x names the export, -t and -A are accepted (strata's defaults), -n opens the image
    /// with O_DIRECT (--cache=none).
    func testQemuNbdFlagsStrataHonours() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/h.qcow2", size: "4M")
        func directFlags(_ pid: Int32) throws -> [Bool] {
            try FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").compactMap { fd in
                guard (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\(fd)")) == "\(dir)/h.qcow2"
                else { return nil }
                let info = try String(contentsOfFile: "/proc/\(pid)/fdinfo/\(fd)", encoding: .utf8)
                let octal = info.split(separator: "\n").first { $0.hasPrefix("flags:") }?.split(separator: "\t").last
                // O_DIRECT, which the Glibc module does not export.
                #if arch(arm64)
                let oDirect = 0o200000
                #else
                let oDirect = 0o40000
                #endif
                return (Int(octal.map(String.init) ?? "0", radix: 8) ?? 0) & oDirect != 0
            }
        }
        for nocache in [false, true] {
            let server = try serve(dir, ["-x", "named", "-t", "-A"] + (nocache ? ["-n"] : []) + ["-k", "\(dir)/h.sock", "\(dir)/h.qcow2"])
            XCTAssertEqual(server.waitForLines(1), ["nbd+unix:///named?socket=\(dir)/h.sock"], server.stderr)
            let info = try Peer.expectSuccess("nbdinfo", ["--json", "nbd+unix:///named?socket=\(dir)/h.sock"])
            XCTAssertTrue(info.out.contains("qemu:allocation-depth"), info.out)
            let direct = try directFlags(server.process.processIdentifier)
            XCTAssertFalse(direct.isEmpty, "the image is open")
            XCTAssertEqual(direct.contains(true), nocache, "O_DIRECT only with -n: \(direct)")
            try Peer.expectSuccess("qemu-io", ["-f", "raw", "nbd+unix:///named?socket=\(dir)/h.sock", "-c", "write -P 3 0 64k"])
            // -t: a client leaving does not stop the server.
            usleep(200_000)
            XCTAssertTrue(server.process.isRunning)
            XCTAssertEqual(server.stop(), 0, server.stderr)
        }
        try Peer.expectSuccess("qemu-img", ["check", "\(dir)/h.qcow2"])
    }

    /// -s: writes land in an overlay under $TMPDIR that is unlinked at once; the file is
    /// unchanged afterwards and locked against writers while served.
    func testSnapshotLeavesTheFileUnchanged() throws {
        let dir = try makeTempDir(self)
        let tmp = "\(dir)/tmp"
        try FileManager.default.createDirectory(atPath: tmp, withIntermediateDirectories: true)
        try makeQcow2("\(dir)/base.qcow2", size: "8M")
        try Peer.expectSuccess("qemu-io", ["-f", "qcow2", "\(dir)/base.qcow2", "-c", "write -P 1 0 1M"])
        let before = try Data(contentsOf: URL(fileURLWithPath: "\(dir)/base.qcow2"))

        let server = try serve(dir, ["-s", "-k", "\(dir)/s.sock", "\(dir)/base.qcow2"], environment: ["TMPDIR": tmp])
        let uri = try XCTUnwrap(server.waitForLines(1).first, server.stderr)
        let nbd = try Peer.expectSuccess("qemu-io", ["-f", "raw", uri, "-c", "read -P 1 0 1M", "-c", "write -P 9 64k 128k",
                                                     "-c", "read -P 9 64k 128k", "-c", "write -z 4M 1M"])
        XCTAssertFalse(nbd.out.contains("failed"), nbd.out)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: tmp), [], "the overlay has no name")
        let writer = try Peer.run(try Peer.path("qemu-io"), ["-f", "qcow2", "\(dir)/base.qcow2", "-c", "write 0 512"])
        XCTAssertNotEqual(writer.status, 0, "the file is locked against writers while served")
        XCTAssertEqual(server.stop(), 0, server.stderr)

        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: "\(dir)/base.qcow2")), before, "the file never changed")
        try Peer.expectSuccess("qemu-img", ["check", "\(dir)/base.qcow2"])
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: tmp), [])
    }

    /// -l NAME (qemu-nbd's --load-snapshot), and `--snapshot NAME FILE`: the snapshot's state,
    /// read-only, while the active disk holds other data; an unknown name fails at start.
    func testLoadSnapshotExportsItReadOnly() throws {
        let dir = try makeTempDir(self)
        let image = "\(dir)/vm.qcow2"
        try makeQcow2(image, size: "16M")
        try Peer.expectSuccess("qemu-io", ["-f", "qcow2", image, "-c", "write -P 4 0 2M"])
        try Peer.expectSuccess("qemu-img", ["snapshot", "-c", "before", image])
        try Peer.expectSuccess("qemu-io", ["-f", "qcow2", image, "-c", "write -P 5 0 1M", "-c", "write -P 6 8M 1M"])
        for flags in [["-l", "before"], ["--load-snapshot=1"], ["--snapshot", "before"]] {
            let server = try serve(dir, ["-k", "\(dir)/l.sock"] + flags + [image])
            let uri = try XCTUnwrap(server.waitForLines(1).first, "\(flags): \(server.stderr)")
            XCTAssertEqual(uri, "nbd+unix:///vm?socket=\(dir)/l.sock")
            let info = try Peer.expectSuccess("nbdinfo", ["--json", uri])
            XCTAssertTrue(info.out.contains("\"is_read_only\": true"), "\(flags): \(info.out)")
            let r = try Peer.expectSuccess("qemu-io", ["-r", "-f", "raw", uri, "-c", "read -P 4 0 2M", "-c", "read -P 0 8M 1M"])
            XCTAssertFalse(r.out.contains("failed"), "\(flags): \(r.out)")
            XCTAssertEqual(server.stop(), 0, server.stderr)
        }
        let bad = try Peer.run(try strata(), ["serve", "-k", "\(dir)/b.sock", "-l", "nope", image], timeout: 20)
        XCTAssertEqual(bad.status, 1, bad.transcript)
        XCTAssertTrue(bad.err.contains("no snapshot with id or name 'nope'"), bad.err)
        try Peer.expectSuccess("qemu-img", ["check", image])
        try Peer.expectSuccess("qemu-io", ["-f", "qcow2", image, "-c", "read -P 5 0 1M", "-c", "read -P 6 8M 1M"])
    }

    /// --compress: whole clusters written over NBD are stored compressed (qemu-img check
    /// counts them), partial ones as usual, and everything reads back through QEMU.
    func testCompressStoresWholeClustersCompressed() throws {
        let dir = try makeTempDir(self)
        let image = "\(dir)/c.qcow2"
        try makeQcow2(image, size: "16M")
        let server = try serve(dir, ["--compress", "-k", "\(dir)/c.sock", image])
        let uri = try XCTUnwrap(server.waitForLines(1).first, server.stderr)
        let w = try Peer.expectSuccess("qemu-io", ["-f", "raw", uri, "-c", "write -P 7 0 2M", "-c", "write -P 8 4M 4k",
                                                   "-c", "read -P 7 0 2M", "-c", "read -P 8 4M 4k"])
        XCTAssertFalse(w.out.contains("failed"), w.out)
        XCTAssertEqual(server.stop(), 0, server.stderr)
        let check = try Peer.expectSuccess("qemu-img", ["check", image])
        XCTAssertTrue(check.out.contains("No errors were found"), check.out)
        XCTAssertFalse(check.out.contains(" 0.00% compressed clusters"), "whole clusters were compressed: \(check.out)")
        let r = try Peer.expectSuccess("qemu-io", ["-f", "qcow2", image, "-c", "read -P 7 0 2M", "-c", "read -P 8 4M 4k",
                                                   "-c", "read -P 0 4100k 60k"])
        XCTAssertFalse(r.out.contains("failed"), r.out)
    }

    /// --fork: the command returns once the server listens, printing the URIs; the server runs
    /// on in its own session with stdio on /dev/null, and stops cleanly by its pid file.
    func testForkReturnsOnceListeningAndServesDetached() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/f.qcow2", size: "8M")
        let pidFile = "\(dir)/f.pid", sock = "\(dir)/f.sock"
        let launched = try Peer.run(try strata(), ["serve", "--fork", "--pid-file", pidFile, "-k", sock, "\(dir)/f.qcow2"],
                                    timeout: 30)
        XCTAssertEqual(launched.status, 0, launched.transcript)
        XCTAssertEqual(launched.out, "nbd+unix:///f?socket=\(sock)\n")
        let pid = try XCTUnwrap(Int32(try String(contentsOfFile: pidFile, encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)))
        defer { kill(pid, SIGKILL) }
        // /proc/PID/stat: pid (comm) state ppid pgrp session ...
        let stat = try String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)
        let fields = stat[stat.range(of: ") ")!.upperBound...].split(separator: " ")
        XCTAssertEqual(fields[3], "\(pid)", "the server leads its own session: \(stat)")
        for fd in 0...2 {
            XCTAssertEqual(try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\(fd)"), "/dev/null",
                           "fd \(fd)")
        }
        try Peer.expectSuccess("qemu-io", ["-f", "raw", launched.out.trimmingCharacters(in: .newlines),
                                           "-c", "write -P 4 0 64k"])

        kill(pid, SIGTERM)
        let gone = { () -> Bool in
            // Gone, or a zombie waiting for a parent that is not us.
            guard let s = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8) else { return true }
            return s[s.range(of: ") ")!.upperBound...].hasPrefix("Z")
        }
        let deadline = Date().addingTimeInterval(20)
        while !gone() && Date() < deadline { usleep(20_000) }
        XCTAssertTrue(gone(), "the server stops on SIGTERM")
        XCTAssertFalse(FileManager.default.fileExists(atPath: sock), "socket removed")
        XCTAssertFalse(FileManager.default.fileExists(atPath: pidFile), "pid file removed")
        try Peer.expectSuccess("qemu-img", ["check", "\(dir)/f.qcow2"])
        let r = try Peer.expectSuccess("qemu-io", ["-f", "qcow2", "-r", "\(dir)/f.qcow2", "-c", "read -P 4 0 64k"])
        XCTAssertFalse(r.out.contains("failed"), r.out)
    }

    /// --fork when the server fails before listening: its error on stderr, its status.
    func testForkReportsAFailureBeforeTheServerIsReady() throws {
        let dir = try makeTempDir(self)
        let strata = try strata()
        let missing = try Peer.run(strata, ["serve", "--fork", "-k", "\(dir)/m.sock", "\(dir)/missing.qcow2"], timeout: 30)
        XCTAssertEqual(missing.status, 1, missing.transcript)
        XCTAssertEqual(missing.err, "strata: \(dir)/missing.qcow2: cannot open: No such file or directory\n")
        XCTAssertEqual(missing.out, "")

        try makeRaw("\(dir)/p.raw", size: 1 << 20)
        XCTAssertTrue(FileManager.default.createFile(atPath: "\(dir)/taken", contents: nil))
        let taken = try Peer.run(strata, ["serve", "--fork", "-k", "\(dir)/taken", "-f", "raw", "\(dir)/p.raw"], timeout: 30)
        XCTAssertEqual(taken.status, 1, taken.transcript)
        XCTAssertEqual(taken.err, "strata: cannot listen on \(dir)/taken: \(dir)/taken exists and is not a socket\n")
    }
}
