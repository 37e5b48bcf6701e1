import ArgumentParser
import Strata

#if canImport(Glibc)
import Glibc
#endif

/// `strata io [-f FMT] [-r] [-U] [-t CACHE | -n] -c CMD [-c CMD …] FILE`: qemu-io's one-shot mode.
///
/// Opens the image once, runs the commands in order (each prints as qemu-io prints), closes
/// it. As in qemu-io, a command that fails (I/O error, `read -P` mismatch), does not parse, or
/// writes to an image opened with `-r` does not stop the next one; each of the last two is
/// reported on stderr (`strata: FILE: -c 'CMD': …`), and the exit status is then 1.
struct IO: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "io",
        abstract: "Run qemu-io style commands on an image.",
        discussion: """
            Commands: read [-qv] [-P pattern [-s off] [-l len]] off len; \
            write [-fqz] [-u] [-P pattern] off len (-z writes zeroes, -u lets them unmap, \
            the default pattern is 0xcd); discard [-q] off len; flush; length.
            """)

    @OptionGroup var format: FormatOption

    @Option(name: .customShort("c"), help: ArgumentHelp("A command to run (repeatable).", valueName: "cmd"))
    var commands: [String] = []

    @Flag(name: [.customShort("r"), .customLong("read-only")], help: "Open the image read-only.")
    var readOnly = false

    @Option(name: [.customShort("t"), .customLong("cache")], help: ArgumentHelp("Cache mode: \(CacheModeName.choices).", valueName: "cache"))
    var cache: String?

    @Flag(name: [.customShort("n"), .customLong("nocache")], help: "Bypass the host page cache (short for -t none).")
    var noCache = false

    @OptionGroup var share: ForceShareOption

    @Argument(help: "The image file.")
    var file: String

    mutating func validate() throws {
        guard !commands.isEmpty else { throw ValidationError("give at least one command with -c (e.g. -c 'read 0 64k')") }
        if share.forceShare, !readOnly { throw ValidationError("-U (force share) needs -r (read-only)") }
        _ = try cacheMode()
    }

    /// `-t` (or `-n`), onto the engine's cache mode; writeback when neither is given.
    func cacheMode() throws -> CacheMode {
        if noCache {
            if cache != nil { throw ValidationError("-n is short for -t none; give only one of them") }
            return .none
        }
        return try cache.map { try CacheModeName.parse($0, flag: "-t") } ?? .writeback
    }

    func run() throws {
        let device = try ImageChain.open(file, format: format.format, writable: !readOnly,
                                         forceShare: share.forceShare, cache: try cacheMode())
        ImageChain.warnIfProbedRaw(device, name: file)
        var runner = IORunner(device: device)
        var refused = false
        for text in commands {
            let command: IOCommandLine
            do {
                guard let c = try IOCommandLine.parse(text) else { continue }
                command = c
            } catch {
                printError("strata: \(CLIError.refused(file: file, reason: "-c '\(text)': \(error)"))")
                refused = true
                continue
            }
            if readOnly, command.writes {
                printError("strata: \(CLIError.refused(file: file, reason: "-c '\(text)': the image is open read-only (-r)"))")
                refused = true
                continue
            }
            runner.execute(command)
        }
        flushStdout()
        try withFile(file) { try device.close() }
        if runner.failed || refused { throw ExitCode(1) }
    }
}

/// Runs parsed commands on an open device and prints what qemu-io prints.
struct IORunner {
    let device: any BlockDevice
    /// Set when any command failed.
    private(set) var failed = false

    init(device: any BlockDevice) { self.device = device }

    mutating func execute(_ command: IOCommandLine) {
        switch command {
        case let .read(offset, length, pattern, pOff, pLen, verbose, quiet):
            let buffer = ChunkBuffer(count: max(length, 1))
            let bytes = buffer.prefix(length)
            let t = timed { try device.read(into: bytes, at: offset) }
            guard let elapsed = t.success(op: "read", &failed) else { return }
            let view = UnsafeRawBufferPointer(bytes)
            if let pattern {
                let count = pLen ?? (length - pOff)
                if view[pOff..<(pOff + count)].contains(where: { $0 != pattern }) {
                    print("Pattern verification failed at offset \(offset + UInt64(pOff)), \(count) bytes")
                    failed = true
                }
            }
            if quiet { return }
            if verbose { print(HumanFormat.hexdump(view, offset: offset), terminator: "") }
            report("read", offset: offset, count: UInt64(length), elapsed: elapsed)
        case let .write(offset, length, pattern, zeroes, unmap, fua, quiet):
            let t: Timed
            if zeroes {
                t = timed { try device.writeZeroes(at: offset, length: UInt64(length), mayUnmap: unmap, fua: fua) }
            } else {
                let buffer = ChunkBuffer(count: max(length, 1))
                let bytes = buffer.prefix(length)
                bytes.initializeMemory(as: UInt8.self, repeating: pattern)
                t = timed { try device.write(UnsafeRawBufferPointer(bytes), at: offset, fua: fua) }
            }
            guard let elapsed = t.success(op: "write", &failed), !quiet else { return }
            report("wrote", offset: offset, count: UInt64(length), elapsed: elapsed)
        case let .discard(offset, length, quiet):
            let t = timed { try device.discard(at: offset, length: length) }
            guard let elapsed = t.success(op: "discard", &failed), !quiet else { return }
            report("discard", offset: offset, count: length, elapsed: elapsed)
        case .flush:
            _ = timed { try device.flush() }.success(op: "flush", &failed)
        case .length:
            print(HumanFormat.size(device.size))
        }
    }

    /// `wrote 65536/65536 bytes at offset 0` and
    /// `64 KiB, 1 ops; 00.00 sec (2.222 GiB/sec and 36402.0240 ops/sec)`.
    private func report(_ op: String, offset: UInt64, count: UInt64, elapsed: Double) {
        let t = max(elapsed, 1e-9)
        print("\(op) \(count)/\(count) bytes at offset \(offset)")
        print("\(HumanFormat.ioSize(Double(count))), 1 ops; \(HumanFormat.ioTime(elapsed)) (\(HumanFormat.ioSize(Double(count) / t))/sec and \(HumanFormat.c("%.4f", 1 / t)) ops/sec)")
    }

    /// How one engine call went, and how long it took.
    struct Timed {
        var seconds: Double
        var error: Error?

        /// The elapsed time, or prints `<op> failed: <reason>` (as qemu-io) and marks failure.
        func success(op: String, _ failed: inout Bool) -> Double? {
            guard let error else { return seconds }
            let reason = (error as? StrataError)?.description ?? "\(error)"
            print("\(op) failed: \(reason)")
            failed = true
            return nil
        }
    }

    private func timed(_ body: () throws -> Void) -> Timed {
        var t0 = timespec(), t1 = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t0)
        var error: Error?
        do { try body() } catch let e { error = e }
        clock_gettime(CLOCK_MONOTONIC, &t1)
        let seconds = Double(t1.tv_sec - t0.tv_sec) + Double(t1.tv_nsec - t0.tv_nsec) / 1e9
        return Timed(seconds: seconds, error: error)
    }
}
