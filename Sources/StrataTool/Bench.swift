import ArgumentParser
import Histogram
import Strata
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// `strata bench [-w] [-c COUNT] [-d DEPTH] [-s BUFSIZE] [-o OFFSET] [-S STEP] FILE`: qemu-img's
/// `bench`, on the image directly, with latency percentiles.
///
/// DEPTH worker threads keep DEPTH requests in flight against the engine's thread-safe
/// ``BlockDevice`` API; each worker reuses one buffer and one histogram, so a request
/// allocates nothing. Request `i` goes to ``BenchPlan/offset(of:)``: qemu-img's sequential walk,
/// or a seeded uniform pick.
struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Measure an image's I/O throughput and latency (qemu-img bench).",
        discussion: """
            COUNT requests of BUFSIZE bytes, DEPTH in flight at once. Sequential (the default): \
            the first at OFFSET, each next one STEP (default BUFSIZE) further, wrapping as \
            qemu-img wraps (modulo image size - BUFSIZE). Random (--access random, or \
            --pattern random): uniform offsets OFFSET + k*STEP from a generator seeded by --seed. \
            A write test (-w, or -t write) writes buffers filled with the --pattern byte \
            (default 0); with --flush-interval N a flush is issued whenever the requests not \
            yet started are a multiple of N, after draining those in flight unless --no-drain. \
            -t takes a cache mode (\(CacheModeName.choices)), or read/write. \
            JSON fields: operation, access, count, depth, buffer-size, offset, step, seed, \
            flush-interval, drain, pattern, image-size, flushes, elapsed-ns, ops-per-sec, \
            bytes-per-sec, latency-ns {min, mean, p50, p99, p99.9, max}.
            """)

    /// The most requests in flight: each is a thread with its own buffer and histogram.
    static let maxDepth = 1024
    /// The largest count, buffer, step or flush interval (qemu-img's INT_MAX).
    static let maxValue = Int(Int32.max)

    @Option(name: .customShort("c"), parsing: .unconditional, help: ArgumentHelp("Number of requests (default 75000).", valueName: "count"))
    var count: String = "75000"

    @Option(name: .customShort("d"), parsing: .unconditional, help: ArgumentHelp("Requests in flight at once (default 64, at most \(maxDepth)).", valueName: "depth"))
    var depth: String = "64"

    @OptionGroup var format: FormatOption

    @Option(name: .customLong("flush-interval"), parsing: .unconditional, help: ArgumentHelp("Write tests: flush every N requests.", valueName: "n"))
    var flushInterval: String?

    @Flag(name: .customLong("no-drain"), help: "With --flush-interval: flush without draining the requests in flight.")
    var noDrain = false

    @Option(name: .customShort("o"), parsing: .unconditional, help: ArgumentHelp("Offset of the first request (default 0).", valueName: "offset"))
    var offset: String = "0"

    @Option(name: .customLong("pattern"), help: ArgumentHelp("Byte written by a write test (default 0); or random/sequential, as --access.", valueName: "pattern"))
    var pattern: String?

    @Option(name: .customLong("access"), help: ArgumentHelp("Offsets: sequential (default) or random.", valueName: "access"))
    var access: BenchAccess?

    @Option(name: .customLong("seed"), help: ArgumentHelp("Seed of the random offsets (default 1).", valueName: "seed"))
    var seed: UInt64 = 1

    @OptionGroup var quietOption: QuietOption

    @Option(name: .customShort("s"), parsing: .unconditional, help: ArgumentHelp("Bytes per request (default 4K).", valueName: "buffer_size"))
    var bufferSize: String = "4K"

    @Option(name: .customShort("S"), parsing: .unconditional, help: ArgumentHelp("Bytes between requests (default: the buffer size).", valueName: "step_size"))
    var stepSize: String?

    @Option(name: .customShort("t"), help: ArgumentHelp("Cache mode (\(CacheModeName.choices)), or read/write for the test.", valueName: "cache"))
    var cacheOrTest: String?

    @Flag(name: [.customShort("w"), .customLong("write")], help: "Write test (default: read).")
    var write = false

    @OptionGroup var share: ForceShareOption

    @OptionGroup var output: OutputOption

    @Argument(help: "The image file.")
    var file: String

    mutating func validate() throws {
        _ = try settings()
    }

    /// What the flags ask for, before the image is opened (its size is checked in ``run()``).
    struct Settings {
        var write: Bool
        var cache: CacheMode
        var count: Int
        var depth: Int
        var bufferSize: Int
        var offset: UInt64
        var step: UInt64
        var random: Bool
        var flushInterval: Int
        var fill: UInt8
    }

    func settings() throws -> Settings {
        var write = self.write
        var cache = CacheMode.writeback
        if let t = cacheOrTest {
            switch t {
            case "read", "write":
                if write, t == "read" { throw ValidationError("-w asks for a write test and -t read for a read test; give one of them") }
                write = t == "write"
            default:
                cache = try CacheModeName.parse(t, flag: "-t")
            }
        }
        var random = access == .random
        var fill: UInt8 = 0
        var fillGiven = false
        if let p = pattern {
            if let a = BenchAccess(rawValue: p) {
                if let access, access != a { throw ValidationError("--pattern \(p) and --access \(access.rawValue) disagree; give one of them") }
                random = a == .random
            } else {
                guard let byte = Self.parseByte(p) else {
                    throw ValidationError("invalid --pattern '\(p)': expected a byte from 0 to 255 (decimal, 0x hex or 0 octal), or random or sequential")
                }
                fill = byte
                fillGiven = true
            }
        }
        let count = try Self.whole(self.count, what: "request count", flag: "-c", max: Self.maxValue)
        let depth = try Self.whole(self.depth, what: "queue depth", flag: "-d", max: Self.maxDepth)
        let size = try SizeParser.parse(bufferSize, what: "buffer size (-s)", file: nil)
        guard size >= 1, size <= UInt64(Self.maxValue) else {
            throw ValidationError("invalid buffer size '\(bufferSize)' (-s): expected 1 to \(Self.maxValue) bytes")
        }
        let start = try SizeParser.parse(offset, what: "offset (-o)", file: nil)
        var step = size
        if let s = stepSize {
            step = try SizeParser.parse(s, what: "step size (-S)", file: nil)
            guard step <= UInt64(Self.maxValue) else {
                throw ValidationError("invalid step size '\(s)' (-S): expected 0 to \(Self.maxValue) bytes")
            }
            if step == 0 { step = size }  // qemu-img: 0 means the buffer size
        }
        var interval = 0
        if let f = flushInterval {
            interval = try Self.whole(f, what: "flush interval", flag: "--flush-interval", max: Self.maxValue)
            guard write else { throw ValidationError("--flush-interval is only available in write tests (-w)") }
            guard interval >= depth else {
                throw ValidationError("--flush-interval \(interval) is smaller than the queue depth (\(depth), -d): as in qemu-img, give at least the depth")
            }
        }
        if noDrain, interval == 0 { throw ValidationError("--no-drain requires --flush-interval") }
        if fillGiven, !write {
            throw ValidationError("--pattern \(pattern ?? "") is the byte a write test writes: give -w too")
        }
        if share.forceShare, write { throw ValidationError("-U (force share) opens read-only: it cannot run a write test") }
        return Settings(write: write, cache: cache, count: count, depth: depth, bufferSize: Int(size), offset: start,
                        step: step, random: random, flushInterval: interval, fill: fill)
    }

    /// A whole number from 1 to `max`, or an error naming the flag.
    static func whole(_ text: String, what: String, flag: String, max: Int) throws -> Int {
        guard let n = Int(text), n >= 1, n <= max else {
            throw ValidationError("invalid \(what) '\(text)' (\(flag)): expected a whole number from 1 to \(max)")
        }
        return n
    }

    /// A byte as C's strtol with base 0 reads it: decimal, `0x` hex or `0` octal.
    static func parseByte(_ text: String) -> UInt8? {
        let value: Int?
        if text.hasPrefix("0x") || text.hasPrefix("0X") { value = Int(text.dropFirst(2), radix: 16) }
        else if text.count > 1, text.hasPrefix("0") { value = Int(text.dropFirst(), radix: 8) }
        else { value = Int(text) }
        guard let value, (0...255).contains(value) else { return nil }
        return UInt8(value)
    }

    func run() throws {
        let s = try settings()
        let device = try ImageChain.open(file, format: format.format, writable: s.write,
                                         forceShare: share.forceShare, cache: s.cache)
        var closed = false
        defer { if !closed { try? device.close() } }
        if s.write { ImageChain.warnIfProbedRaw(device, name: file) }
        let size = device.size
        guard UInt64(s.bufferSize) <= size else {
            throw CLIError.refused(file: file, reason: "the buffer size (\(s.bufferSize) bytes, -s) is larger than the image (\(size) bytes)")
        }
        guard s.offset <= size - UInt64(s.bufferSize) else {
            throw CLIError.refused(file: file, reason: "offset \(s.offset) (-o) leaves no room for a \(s.bufferSize)-byte request in the image (\(size) bytes)")
        }
        let plan = BenchPlan(write: s.write, count: s.count, depth: s.depth, bufferSize: s.bufferSize,
                             offset: s.offset, step: s.step, random: s.random, seed: seed,
                             flushInterval: s.flushInterval, drain: !noDrain, fill: s.fill, imageSize: size)
        let human = output.output == .human && !quietOption.quiet
        if human {
            print(plan.headline)
            if plan.flushInterval > 0 { print("Sending flush every \(plan.flushInterval) requests") }
            flushStdout()
        }
        let progress = output.output == .human && !quietOption.quiet && isatty(2) == 1
        let result = try withFile(file) { try BenchRunner(plan: plan, device: device).run(progress: progress) }
        closed = true
        try withFile(file) { try device.close() }
        switch output.output {
        case .json: print(result.json(plan).pretty)
        case .human: if human { print(result.human(plan), terminator: "") }
        }
    }
}

/// `--access`: the order of the offsets.
enum BenchAccess: String, ExpressibleByArgument, CaseIterable {
    case sequential, random
}

/// One validated benchmark: which requests go where.
struct BenchPlan: Sendable {
    var write: Bool
    var count: Int
    var depth: Int
    var bufferSize: Int
    var offset: UInt64
    var step: UInt64
    var random: Bool
    var seed: UInt64
    /// 0: no flushes.
    var flushInterval: Int
    var drain: Bool
    var fill: UInt8
    var imageSize: UInt64

    /// qemu-img's first line, and the seed of a random run.
    var headline: String {
        let op = write ? "write" : "read"
        let place = random ? "random offsets from \(offset), step size \(step), seed \(seed)"
                           : "starting at offset \(offset), step size \(step)"
        return "Sending \(count) \(op) requests, \(bufferSize) bytes each, \(depth) in parallel (\(place))"
    }

    /// Where request `i` goes. Sequential as qemu-img: the first at `offset`, then each
    /// `step` further modulo `imageSize - bufferSize` (0 when the buffer fills the image):
    /// qemu's rule since its commit ff2ab634; before it (qemu 7.2 and Debian 12's qemu-img)
    /// the walk wrapped modulo the image size, so a request could overrun the end.
    /// Random: `offset + k*step` for a uniform `k` that keeps the request inside the image,
    /// from a hash of the seed and `i` (the same offsets whatever the threads' timing).
    @inline(__always)
    func offset(of i: Int) -> UInt64 {
        let buffer = UInt64(bufferSize)
        if random {
            let slots = (imageSize - buffer - offset) / step + 1
            return offset + Self.mix(seed &+ UInt64(i) &* 0x9E37_79B9_7F4A_7C15) % slots * step
        }
        guard i > 0 else { return offset }
        guard imageSize > buffer else { return 0 }
        let m = imageSize - buffer
        // offset + i*step stays below 2^64: offset < 2^63, i and step below 2^31.
        return (offset + UInt64(i) * step) % m
    }

    /// splitmix64's finaliser: a well-mixed 64-bit value from a counter.
    @inline(__always)
    static func mix(_ x: UInt64) -> UInt64 {
        var z = x
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// What a run measured.
struct BenchResult {
    var elapsedNs: UInt64
    var flushes: Int
    /// Request latencies in nanoseconds (every worker's, merged).
    var latency: Histogram<UInt32>
    /// The exact slowest request (the histogram clamps at its highest trackable value).
    var maxNs: UInt64

    var seconds: Double { Double(max(elapsedNs, 1)) / 1e9 }

    func opsPerSecond(_ plan: BenchPlan) -> Double { Double(plan.count) / seconds }
    func bytesPerSecond(_ plan: BenchPlan) -> Double { Double(plan.count) * Double(plan.bufferSize) / seconds }

    func percentile(_ p: Double) -> UInt64 { min(latency.valueAtPercentile(p), maxNs) }

    /// qemu-img's closing line, then the figures.
    func human(_ plan: BenchPlan) -> String {
        func us(_ ns: UInt64) -> String { HumanFormat.c("%.1f", Double(ns) / 1000) }
        var out = HumanFormat.c("Run completed in %3.3f seconds.\n", seconds)
        out += HumanFormat.c("%ld ops in %.3f s: %.0f ops/s, %.2f MiB/s", plan.count, seconds,
                             opsPerSecond(plan), bytesPerSecond(plan) / 1048576)
        out += plan.flushInterval > 0 ? ", \(flushes) flushes\n" : "\n"
        out += "latency (us): min \(us(latency.min)), mean \(HumanFormat.c("%.1f", latency.mean / 1000)), "
        out += "p50 \(us(percentile(50))), p99 \(us(percentile(99))), p99.9 \(us(percentile(99.9))), max \(us(maxNs))\n"
        return out
    }

    /// The `--output json` object; its field names are stable (listed in the command's help).
    func json(_ plan: BenchPlan) -> JSONValue {
        .object([
            ("operation", .string(plan.write ? "write" : "read")),
            ("access", .string(plan.random ? "random" : "sequential")),
            ("count", .int(Int64(plan.count))),
            ("depth", .int(Int64(plan.depth))),
            ("buffer-size", .int(Int64(plan.bufferSize))),
            ("offset", .uint(plan.offset)),
            ("step", .uint(plan.step)),
            ("seed", .uint(plan.seed)),
            ("flush-interval", .int(Int64(plan.flushInterval))),
            ("drain", .bool(plan.drain)),
            ("pattern", .int(Int64(plan.fill))),
            ("image-size", .uint(plan.imageSize)),
            ("flushes", .int(Int64(flushes))),
            ("elapsed-ns", .uint(elapsedNs)),
            ("ops-per-sec", .uint(UInt64(opsPerSecond(plan).rounded()))),
            ("bytes-per-sec", .uint(UInt64(bytesPerSecond(plan).rounded()))),
            ("latency-ns", .object([
                ("min", .uint(latency.min)),
                ("mean", .uint(UInt64(latency.mean.rounded()))),
                ("p50", .uint(percentile(50))),
                ("p99", .uint(percentile(99))),
                ("p99.9", .uint(percentile(99.9))),
                ("max", .uint(maxNs)),
            ])),
        ])
    }
}

/// Nanoseconds on the monotonic clock.
@inline(__always)
func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// Runs a ``BenchPlan`` on DEPTH threads.
///
/// Without a flush interval, workers claim request numbers from one atomic counter. With one,
/// they claim them under `lock` (a pthread mutex, with `cond` for draining), which also
/// decides when to flush: before request `i` when `count - i` is a multiple of the interval
/// (qemu-img's rule), after the requests in flight complete unless `--no-drain`; and once more
/// at the end. `@unchecked Sendable`: the fields below `lock` are only touched with it held.
final class BenchRunner: @unchecked Sendable {
    /// Highest latency the histograms track (60 s); slower requests count as 60 s there
    /// (the exact maximum is kept apart).
    static let highestTrackableNs: UInt64 = 60_000_000_000

    let plan: BenchPlan
    let device: any BlockDevice
    /// The next request number (no flush interval).
    private let next = Atomic<Int>(0)
    /// Requests completed (for the progress line).
    private let completed = Atomic<Int>(0)
    /// Set on the first error: workers stop claiming requests.
    private let stop = Atomic<Bool>(false)

    private let lock: UnsafeMutablePointer<pthread_mutex_t>
    private let cond: UnsafeMutablePointer<pthread_cond_t>
    // Guarded by `lock`:
    private var nextIndex = 0
    private var inFlight = 0
    private var flushing = false
    private var flushedBefore = -1
    private var flushes = 0
    private var firstError: Error?

    init(plan: BenchPlan, device: any BlockDevice) {
        self.plan = plan
        self.device = device
        lock = .allocate(capacity: 1)
        cond = .allocate(capacity: 1)
        pthread_mutex_init(lock, nil)
        pthread_cond_init(cond, nil)
    }

    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(lock)
        lock.deallocate()
        cond.deallocate()
    }

    /// One thread's buffer, histogram and slowest request.
    final class Worker {
        let runner: BenchRunner
        let buffer: UnsafeMutableRawBufferPointer
        var histogram = Histogram<UInt32>(lowestDiscernibleValue: 1, highestTrackableValue: BenchRunner.highestTrackableNs,
                                          numberOfSignificantValueDigits: .three)
        var maxNs: UInt64 = 0

        init(runner: BenchRunner) {
            self.runner = runner
            buffer = .allocate(byteCount: runner.plan.bufferSize, alignment: 4096)
            buffer.initializeMemory(as: UInt8.self, repeating: runner.plan.fill)
        }
        deinit { buffer.deallocate() }

        func run() { runner.work(self) }
    }

    /// Runs every request; the elapsed time covers the first request to the last completion
    /// (and the final flush).
    func run(progress: Bool) throws -> BenchResult {
        let workers = (0..<plan.depth).map { _ in Worker(runner: self) }
        let start = monotonicNanos()
        var threads: [pthread_t] = []
        threads.reserveCapacity(workers.count)
        for w in workers {
            var tid = pthread_t()
            let context = Unmanaged.passRetained(w).toOpaque()
            let rc = pthread_create(&tid, nil, { ctx in
                Unmanaged<Worker>.fromOpaque(ctx!).takeRetainedValue().run()
                return nil
            }, context)
            if rc != 0 {
                Unmanaged<Worker>.fromOpaque(context).release()
                fail(CLIError.message("cannot start a worker thread: \(String(cString: strerror(rc)))"))
                break
            }
            threads.append(tid)
        }
        let reporter = progress ? ProgressLine(total: plan.count, start: start) : nil
        if let reporter {
            while completed.load(ordering: .relaxed) < plan.count, !stop.load(ordering: .relaxed) {
                usleep(250_000)
                reporter.show(completed.load(ordering: .relaxed))
            }
        }
        for t in threads { pthread_join(t, nil) }
        reporter?.end()
        if plan.flushInterval > 0, firstError == nil {
            do {
                try device.flush()
                flushes += 1
            } catch { fail(error) }
        }
        let end = monotonicNanos()
        if let firstError { throw firstError }
        var merged = workers[0].histogram
        var maxNs = workers[0].maxNs
        for w in workers.dropFirst() {
            merged.add(w.histogram)
            maxNs = max(maxNs, w.maxNs)
        }
        return BenchResult(elapsedNs: end - start, flushes: flushes, latency: merged, maxNs: maxNs)
    }

    /// A worker's loop: claim, run, time, until none is left.
    fileprivate func work(_ w: Worker) {
        let plan = self.plan
        let device = self.device
        let read = w.buffer
        let written = UnsafeRawBufferPointer(w.buffer)
        while let i = claim() {
            let offset = plan.offset(of: i)
            let t0 = monotonicNanos()
            do {
                if plan.write { try device.write(written, at: offset, fua: false) }
                else { try device.read(into: read, at: offset) }
            } catch {
                fail(error)
                release()
                return
            }
            let ns = monotonicNanos() - t0
            w.histogram.record(min(max(ns, 1), Self.highestTrackableNs))
            if ns > w.maxNs { w.maxNs = ns }
            completed.add(1, ordering: .relaxed)
            release()
        }
    }

    /// The next request number, or nil when all are claimed or a request failed.
    private func claim() -> Int? {
        if stop.load(ordering: .relaxed) { return nil }
        guard plan.flushInterval > 0 else {
            let i = next.wrappingAdd(1, ordering: .relaxed).oldValue
            return i < plan.count ? i : nil
        }
        pthread_mutex_lock(lock)
        defer { pthread_mutex_unlock(lock) }
        while true {
            if firstError != nil || nextIndex >= plan.count { return nil }
            if flushing { pthread_cond_wait(cond, lock); continue }
            let i = nextIndex
            if i > 0, (plan.count - i) % plan.flushInterval == 0, flushedBefore != i {
                if plan.drain, inFlight > 0 { pthread_cond_wait(cond, lock); continue }
                flushedBefore = i
                flushing = plan.drain
                pthread_mutex_unlock(lock)
                var error: Error?
                do { try device.flush() } catch let e { error = e }
                pthread_mutex_lock(lock)
                flushes += 1
                if plan.drain {
                    flushing = false
                    pthread_cond_broadcast(cond)
                }
                if let error {
                    if firstError == nil { firstError = error }
                    stop.store(true, ordering: .relaxed)
                    pthread_cond_broadcast(cond)
                    return nil
                }
                continue
            }
            nextIndex += 1
            inFlight += 1
            return i
        }
    }

    /// Marks a claimed request done (flush-interval runs count what is in flight).
    private func release() {
        guard plan.flushInterval > 0 else { return }
        pthread_mutex_lock(lock)
        inFlight -= 1
        if inFlight == 0 { pthread_cond_broadcast(cond) }
        pthread_mutex_unlock(lock)
    }

    /// Records the first error and stops the run.
    private func fail(_ error: Error) {
        pthread_mutex_lock(lock)
        if firstError == nil { firstError = error }
        pthread_cond_broadcast(cond)
        pthread_mutex_unlock(lock)
        stop.store(true, ordering: .relaxed)
    }
}

/// The progress line on a terminal's stderr: `    (12.34/100%) 123456 ops/s`, rewritten in
/// place four times a second from the first second on, cleared at the end.
struct ProgressLine {
    let total: Int
    let start: UInt64

    init(total: Int, start: UInt64) {
        self.total = total
        self.start = start
    }

    func show(_ done: Int) {
        let elapsed = Double(monotonicNanos() - start) / 1e9
        guard elapsed >= 1 else { return }
        let line = HumanFormat.c("\r    (%3.2f/100%%) %.0f ops/s   ", Double(done) * 100 / Double(max(total, 1)), Double(done) / elapsed)
        fputs(line, stderr)
    }

    func end() {
        let elapsed = Double(monotonicNanos() - start) / 1e9
        guard elapsed >= 1 else { return }
        fputs("\r" + String(repeating: " ", count: 48) + "\r", stderr)
    }
}
