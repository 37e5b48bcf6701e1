import ArgumentParser
import Dispatch
import Strata
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// `strata convert [-f FMT] [-O FMT] [-o OPTIONS | -n] [-B BACKING -F BACKING_FMT] [-t CACHE] [-T SRC_CACHE] [-S SPARSE] [-m N] [-W] [-p] [-q] [-U] SRC DST`
struct Convert: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Copy an image into a new one, possibly in another format.",
        discussion: """
            The whole backing chain of SRC is flattened into DST. Ranges that read as zeroes are \
            not written, so DST stays sparse (-S 0 writes everything). The default output format \
            is raw, as in qemu-img. DST is created anew (an existing file is replaced) unless -n \
            is given: then DST must exist, keeps its format and size, and zero ranges of SRC are \
            written as zeroes over it. With -B, DST is a qcow2 image on the backing file \
            BACKING, and only what SRC's top image holds is copied (the rest is left to the \
            backing file). Without -W the writes stay in order, whatever -m says. With -c \
            (qcow2 only; with -n and -B too), every cluster holding data is compressed with DST's compression type \
            (-o compression_type=zlib, zstd or lz4) on up to -m workers, at most one per core; \
            the image is the same whatever their number, and clusters that do not shrink are \
            stored uncompressed.
            """)

    @Option(name: .customShort("f"), help: ArgumentHelp("Source format (qcow2 or raw); probed when omitted.", valueName: "fmt"))
    var sourceFormat: ImageFormat?

    @Option(name: .customShort("O"), help: ArgumentHelp("Output format (qcow2 or raw).", valueName: "output_fmt"))
    var outputFormat: ImageFormat = .raw

    @Option(name: .customShort("o"), help: ArgumentHelp("Options for the new image, as for create.", valueName: "options"))
    var options: [String] = []

    @Flag(name: .customShort("n"), help: "Write into the existing DST instead of creating it.")
    var skipCreate = false

    @Option(name: .customShort("B"), help: ArgumentHelp("Make DST a qcow2 image on this backing file.", valueName: "backing_file"))
    var backingFile: String?

    @Option(name: .customShort("F"), help: ArgumentHelp("Format of the backing file (qcow2 or raw).", valueName: "backing_fmt"))
    var backingFormat: ImageFormat?

    @Option(name: .customShort("t"), help: ArgumentHelp("Cache mode of the new image: \(CacheModeName.choices).", valueName: "cache"))
    var cache: String?

    @Option(name: .customShort("T"), help: ArgumentHelp("Cache mode of the source: \(CacheModeName.choices).", valueName: "src_cache"))
    var sourceCache: String?

    // `.unconditional`: a value such as `-1` must reach our checks, not look like a flag.
    @Option(name: .customShort("S"), parsing: .unconditional, help: ArgumentHelp("Zero runs at least this long (a multiple of 512, at most 16M) are left unwritten; 0 writes everything.", valueName: "sparse_size"))
    var sparseSize: String = "4k"

    @Option(name: .customShort("m"), parsing: .unconditional, help: ArgumentHelp("Parallel workers, 1 to 16 (without -W they read at once but write in turn).", valueName: "num"))
    var workers: Int = Self.defaultWorkers

    @Flag(name: .customShort("W"), help: "Allow out-of-order writes (each -m worker writes as soon as it has read).")
    var outOfOrder = false

    @Flag(name: .customShort("c"), help: "Compress the clusters of DST (qcow2 only).")
    var compress = false

    @Flag(name: .customShort("p"), help: "Show progress.")
    var progress = false

    @Option(name: .customShort("l"), help: ArgumentHelp("Convert the internal snapshot SNAPSHOT of the source (ID_OR_NAME, or snapshot.id=ID / snapshot.name=NAME).", valueName: "snapshot"))
    var snapshotParam: String?

    @OptionGroup var quiet: QuietOption
    @OptionGroup var share: ForceShareOption

    @Argument(help: "Source image.")
    var source: String

    @Argument(help: "Image to create.")
    var destination: String

    /// qemu-img's cap on `-S` (`MAX_BUF_SECTORS` sectors).
    static let maxSparseSize: UInt64 = 16 << 20
    /// qemu-img's range for `-m`.
    static let workerRange = 1...16
    /// qemu-img's default for `-m`.
    static let defaultWorkers = 8

    mutating func validate() throws {
        _ = try settings(size: 0)
        _ = try sparseBytes()
        guard Self.workerRange.contains(workers) else {
            throw ValidationError("invalid number of workers (-m) \(workers): it must be between 1 and 16")
        }
        _ = try cacheModes()
        if compress {
            guard outputFormat == .qcow2 else {
                throw CLIError.refused(file: destination, reason: "compression (-c) is not supported for the \(outputFormat) format; use -O qcow2")
            }
        }
    }

    /// `-S` in bytes: 0 (copy everything) or a multiple of 512 up to ``maxSparseSize``.
    func sparseBytes() throws -> Int {
        let n = try SizeParser.parse(sparseSize, what: "sparse size (-S)", file: nil)
        guard n % 512 == 0, n <= Self.maxSparseSize else {
            throw ValidationError("invalid sparse size (-S) '\(sparseSize)': it must be a multiple of 512 up to 16777216, or 0 to write everything")
        }
        return Int(n)
    }

    /// `-T` and `-t`: the source's and the new image's cache modes.
    func cacheModes() throws -> (source: CacheMode, destination: CacheMode) {
        (try sourceCache.map { try CacheModeName.parse($0, flag: "-T") } ?? .writeback,
         try cache.map { try CacheModeName.parse($0, flag: "-t") } ?? .writeback)
    }

    /// The new image's settings from `-O` and `-o`; its size is the source's.
    /// nil for `-o help`.
    func settings(size: UInt64) throws -> CreateSettings? {
        let list = try OptionList(parsing: options, file: destination)
        if list.wantsHelp { return nil }
        if skipCreate, !list.entries.isEmpty {
            throw CLIError.refused(file: destination, reason: "-o has no effect when the image is not created (-n)")
        }
        var s = try CreateSettings(format: outputFormat, options: list, file: destination)
        for key in ["size", "backing_file", "backing_fmt"] where list[key] != nil {
            throw CLIError.badOption(file: destination, entry: "\(key)=\(list[key]!)",
                                     reason: "convert takes the size and content from the source; '\(key)' cannot be set (use -B and -F for a backing file)")
        }
        if let b = backingFile {
            guard outputFormat == .qcow2 else { throw CLIError.refused(file: destination, reason: "raw images have no backing file (use -O qcow2 with -B)") }
            guard let f = backingFormat else {
                throw CLIError.refused(file: destination, reason: "backing file '\(b)' given without its format: add -F qcow2 or -F raw")
            }
            s.backingFile = b
            s.backingFormat = f
        } else if backingFormat != nil {
            throw CLIError.refused(file: destination, reason: "a backing format (-F) needs a backing file (-B)")
        }
        try s.check(file: destination)
        s.size = size
        return s
    }

    func run() throws {
        if try settings(size: 0) == nil {
            print(CreateSettings.helpText(for: outputFormat), terminator: "")
            return
        }
        let caches = try cacheModes()
        let src = try ImageChain.open(source, format: sourceFormat, forceShare: share.forceShare, cache: caches.source,
                                      snapshot: try snapshotParam.map(ImageChain.snapshotName))
        defer { try? src.close() }
        if Self.sameFile(source, destination) {
            throw CLIError.refused(file: destination, reason: "is the source image itself; convert into another file")
        }
        let settings = try settings(size: src.size)!
        if !skipCreate {
            if settings.backingFile != nil {
                var o = settings.qcow2Options
                o.size = src.size
                _ = try o.resolved(for: destination)  // the backing file opens, and is not DST itself
            }
            try settings.create(path: destination)
        }
        let dst = try ImageChain.open(destination, format: outputFormat, writable: true, cache: caches.destination)
        var closed = false
        defer { if !closed { try? dst.close() } }
        if dst.size < src.size {
            throw CLIError.refused(file: destination, reason: "is \(dst.size) bytes, smaller than the source (\(src.size) bytes)")
        }

        let bar = ProgressBar(enabled: progress && !quiet.quiet, total: src.size, minStep: 1)
        let target: Copier.Target = backingFile != nil ? .onBacking : skipCreate ? .existing : .blank
        if compress {
            guard let q = dst as? Qcow2Image else {
                throw CLIError.refused(file: destination, reason: "compression (-c) needs a qcow2 image, and this one is not")
            }
            // Deterministic whatever the workers, so -W is not needed for them to run at once.
            try CompressedCopier(src: src, dst: q, target: target, bar: bar).run(workers: workers)
        } else {
            // With the default cache mode the copy ends with a flush: the kernel may as well
            // write the data back while the copy goes on.
            let writeback = caches.destination == .writeback ? WritebackStarter(path: destination) : nil
            let copier = Copier(src: src, dst: dst, target: target, sparse: try sparseBytes(), bar: bar, writeback: writeback)
            try copier.run(workers: workers, inOrder: !outOfOrder)
        }
        try dst.flush()
        closed = true
        try dst.close()
        bar.complete()
        bar.end()
    }

    /// True when both names lead to the same existing file (or the same RBD image).
    static func sameFile(_ a: String, _ b: String) -> Bool {
        if !Storage.isFile(a) || !Storage.isFile(b) { return BackingChain.realPath(a) == BackingChain.realPath(b) }
        var sa = stat(), sb = stat()
        guard stat(a, &sa) == 0, stat(b, &sb) == 0 else { return false }
        return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino
    }
}

/// Copies `src` into `dst`, `chunkSize` bytes at a time, writing only what the target needs:
/// into a blank target, zero ranges (and all-zero blocks of `sparse` bytes) are skipped; into
/// an existing target they are written as zeroes (deallocating where it can); onto a backing
/// file, what the source's top image does not hold is left to the backing file.
final class Copier: Sendable {
    /// What the target holds before the copy.
    enum Target {
        /// Freshly created: reads as zeroes everywhere.
        case blank
        /// An existing image (`-n`): anything.
        case existing
        /// Freshly created on a backing file (`-B`): the backing file's content.
        case onBacking
    }

    /// Bytes read or written at once (per worker).
    static let chunkSize = 2 << 20

    let src: any BlockDevice
    let dst: any BlockDevice
    let target: Target
    /// Zero runs at least this long are not written as data; 0 writes everything.
    let sparse: Int
    let bar: ProgressBar
    /// Told of every chunk written, to start writing the target back early; nil leaves it to
    /// the final flush.
    let writeback: WritebackStarter?

    init(src: any BlockDevice, dst: any BlockDevice, target: Target, sparse: Int, bar: ProgressBar, writeback: WritebackStarter? = nil) {
        self.src = src
        self.dst = dst
        self.target = target
        self.sparse = sparse
        self.bar = bar
        self.writeback = writeback
    }

    /// What to do with one chunk of the source.
    enum Action {
        /// Read it and write what the target needs.
        case copy
        /// It reads as zeroes: make the target read as zeroes there.
        case zero
    }

    /// One chunk of the copy.
    struct Chunk {
        var offset: UInt64
        var length: Int
        var action: Action
    }

    /// Chunks handed to the workers at once: the source's extents are walked this far ahead
    /// of the copy (256 chunks of 2 MiB: 512 MiB of guest data, 6 KiB of list).
    static let batchSize = 256

    /// Walks the source's extents and copies their chunks with `workers` threads, each with
    /// its own buffer (so at most `workers` chunks are in memory). With `inOrder`, the workers
    /// read (and scan for zeroes) at once, but write one after another in guest order, as
    /// qemu-img does without -W; otherwise each writes as soon as it has read.
    func run(workers: Int, inOrder: Bool) throws {
        var pending: [Chunk] = []
        pending.reserveCapacity(Self.batchSize)
        func drain() throws {
            try perform(pending, workers: workers, inOrder: inOrder)
            pending.removeAll(keepingCapacity: true)
        }
        try src.forEachRun(from: 0, to: src.size) { offset, length, extent in
            let zero = extent?.status.contains(.zero) ?? false
            let action: Action
            if target == .onBacking, let extent, extent.depth != 1 {
                bar.advance(by: length)  // not in the source's top image: the backing file has it
                return true
            } else if zero && sparse > 0 {
                if target == .blank {
                    bar.advance(by: length)
                    return true
                }
                action = .zero
            } else {
                action = .copy
            }
            var o = offset
            let end = offset + length
            while o < end {
                // Chunks end on chunk-size boundaries so chunks of neighbouring extents line up.
                let boundary = (o / UInt64(Self.chunkSize) + 1) * UInt64(Self.chunkSize)
                let n = Int(min(end, boundary) - o)
                pending.append(Chunk(offset: o, length: n, action: action))
                o += UInt64(n)
                if pending.count >= Self.batchSize { try drain() }
            }
            return true
        }
        try drain()
    }

    /// A chunk read and scanned, waiting for its turn to be written.
    private struct Prepared {
        /// The data runs of the buffer (the rest is zero blocks of `sparse` bytes).
        var runs: [Range<Int>] = []
    }

    private func perform(_ chunks: [Chunk], workers: Int, inOrder: Bool) throws {
        guard !chunks.isEmpty else { return }
        let n = min(workers, chunks.count)
        if n <= 1 {
            let buffer = ChunkBuffer(count: Self.chunkSize)
            for c in chunks {
                try write(c, buffer, try prepare(c, buffer))
                writeback?.wrote(c.length)
            }
            return
        }
        // Chunk i is written once turns[i % n] is signalled, by the writer of chunk i - 1. A
        // worker takes chunk i + n only after writing its own, so no two waiting chunks share
        // a semaphore.
        let turns = inOrder ? (0..<n).map { _ in DispatchSemaphore(value: 0) } : []
        turns.first?.signal()
        let next = Atomic<Int>(0)
        let failure = Mutex<(any Error)?>(nil)
        WorkerThreads.run(count: n) { _ in
            let buffer = ChunkBuffer(count: Self.chunkSize)
            while true {
                let i = next.add(1, ordering: .relaxed).oldValue
                guard i < chunks.count else { return }
                var ok = failure.withLock { $0 == nil }
                var prepared = Prepared()
                if ok {
                    do { prepared = try prepare(chunks[i], buffer) } catch {
                        failure.withLock { if $0 == nil { $0 = error } }
                        ok = false
                    }
                }
                if inOrder { turns[i % n].wait() }
                if ok && failure.withLock({ $0 == nil }) {
                    do { try write(chunks[i], buffer, prepared) } catch {
                        failure.withLock { if $0 == nil { $0 = error } }
                    }
                }
                if inOrder { turns[(i + 1) % n].signal() }
                if ok { writeback?.wrote(chunks[i].length) }
            }
        }
        if let error = failure.withLock({ $0 }) { throw error }
    }

    /// Reads a chunk to copy into `buffer` and finds its data runs; nothing for a zero chunk.
    private func prepare(_ c: Chunk, _ buffer: ChunkBuffer) throws -> Prepared {
        guard c.action == .copy else { return Prepared() }
        let bytes = buffer.prefix(c.length)
        try src.read(into: bytes, at: c.offset)
        let view = UnsafeRawBufferPointer(bytes)
        return Prepared(runs: sparse > 0 ? ZeroBuffer.dataRuns(view, granularity: sparse) : [0..<c.length])
    }

    /// Writes a prepared chunk: its data runs, and on a target that is not blank, zeroes
    /// between them.
    private func write(_ c: Chunk, _ buffer: ChunkBuffer, _ prepared: Prepared) throws {
        defer { bar.advance(by: UInt64(c.length)) }
        if c.action == .zero {
            try dst.writeZeroes(at: c.offset, length: UInt64(c.length), mayUnmap: true, fua: false)
            return
        }
        let view = UnsafeRawBufferPointer(buffer.prefix(c.length))
        var pos = 0
        for r in prepared.runs + [c.length..<c.length] {
            // All-zero blocks between data runs: nothing to write on a blank target.
            if r.lowerBound > pos, target != .blank {
                try dst.writeZeroes(at: c.offset + UInt64(pos), length: UInt64(r.lowerBound - pos), mayUnmap: true, fua: false)
            }
            if !r.isEmpty { try dst.write(UnsafeRawBufferPointer(rebasing: view[r]), at: c.offset + UInt64(r.lowerBound), fua: false) }
            pos = r.upperBound
        }
    }
}

/// Starts the kernel writing a file's dirty pages back every ``step`` bytes written, without
/// waiting for it: a copy that ends with a flush then overlaps the disk writes with the
/// copying, instead of leaving them all to the flush. Uses its own descriptor of the file
/// (writeback is per file, whichever descriptor asks), so it works whatever the image format.
final class WritebackStarter: Sendable {
    /// Bytes written between two requests.
    static let step = 32 << 20

    private let fd: Int32
    private let sinceLast = Mutex<Int>(0)

    /// nil when `path` cannot be opened (the copy then does without).
    init?(path: String) {
        fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 { return nil }
    }

    deinit { close(fd) }

    /// Counts `bytes` more written; every ``step`` bytes, asks for the whole file's dirty
    /// pages to be written back. POSIX_FADV_DONTNEED starts that writeback (it does not wait
    /// for it) and drops the pages already clean, which the copy does not read again.
    func wrote(_ bytes: Int) {
        let due = sinceLast.withLock { n -> Bool in
            n += bytes
            guard n >= Self.step else { return false }
            n = 0
            return true
        }
        if due { _ = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) }
    }
}

/// Threads of our own for blocking I/O: Dispatch runs only as many at once as there are
/// cores, which would cap the reads in flight on a small machine.
enum WorkerThreads {
    /// Runs `body(k)` for k in 0..<count, each on a new thread, and returns when all are
    /// done. A thread that cannot be started runs its share on the caller's thread.
    static func run(count: Int, _ body: @Sendable (Int) -> Void) {
        // `body` does not outlive this call: every thread is joined before it returns.
        withoutActuallyEscaping(body) { body in
            var threads: [pthread_t] = []
            var leftover: [Int] = []
            for k in 0..<count {
                var tid = pthread_t()
                let context = Unmanaged.passRetained(Task(body: body, index: k)).toOpaque()
                let rc = pthread_create(&tid, nil, { ctx in
                    let task = Unmanaged<Task>.fromOpaque(ctx!).takeRetainedValue()
                    task.body(task.index)
                    return nil
                }, context)
                if rc == 0 {
                    threads.append(tid)
                } else {
                    Unmanaged<Task>.fromOpaque(context).release()
                    leftover.append(k)
                }
            }
            for k in leftover { body(k) }
            for t in threads { pthread_join(t, nil) }
        }
    }

    /// What one thread runs.
    private final class Task: Sendable {
        let body: @Sendable (Int) -> Void
        let index: Int
        init(body: @escaping @Sendable (Int) -> Void, index: Int) {
            self.body = body
            self.index = index
        }
    }
}
