import ArgumentParser
import Dispatch
import Strata
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// `strata convert [-f FMT] [-O FMT] [-o OPTIONS] [-t CACHE] [-T SRC_CACHE] [-S SPARSE] [-m N] [-W] [-p] [-q] [-U] SRC DST`
struct Convert: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Copy an image into a new one, possibly in another format.",
        discussion: """
            The whole backing chain of SRC is flattened into DST. Ranges that read as zeroes are \
            not written, so DST stays sparse (-S 0 writes everything). The default output format \
            is raw, as in qemu-img. Without -W the writes stay in order, whatever -m says.
            """)

    @Option(name: .customShort("f"), help: ArgumentHelp("Source format (qcow2 or raw); probed when omitted.", valueName: "fmt"))
    var sourceFormat: ImageFormat?

    @Option(name: .customShort("O"), help: ArgumentHelp("Output format (qcow2 or raw).", valueName: "output_fmt"))
    var outputFormat: ImageFormat = .raw

    @Option(name: .customShort("o"), help: ArgumentHelp("Options for the new image, as for create.", valueName: "options"))
    var options: [String] = []

    @Option(name: .customShort("t"), help: ArgumentHelp("Cache mode of the new image: \(CacheModeName.choices).", valueName: "cache"))
    var cache: String?

    @Option(name: .customShort("T"), help: ArgumentHelp("Cache mode of the source: \(CacheModeName.choices).", valueName: "src_cache"))
    var sourceCache: String?

    // `.unconditional`: a value such as `-1` must reach our checks, not look like a flag.
    @Option(name: .customShort("S"), parsing: .unconditional, help: ArgumentHelp("Zero runs at least this long (a multiple of 512, at most 16M) are left unwritten; 0 writes everything.", valueName: "sparse_size"))
    var sparseSize: String = "4k"

    @Option(name: .customShort("m"), parsing: .unconditional, help: ArgumentHelp("Parallel workers, 1 to 16 (they run in parallel only with -W).", valueName: "num"))
    var workers: Int = 8

    @Flag(name: .customShort("W"), help: "Allow out-of-order writes (lets the -m workers run at once).")
    var outOfOrder = false

    @Flag(name: .customShort("p"), help: "Show progress.")
    var progress = false

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

    mutating func validate() throws {
        _ = try settings(size: 0)
        _ = try sparseBytes()
        guard Self.workerRange.contains(workers) else {
            throw ValidationError("invalid number of workers (-m) \(workers): it must be between 1 and 16")
        }
        _ = try cacheModes()
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
        var s = try CreateSettings(format: outputFormat, options: list, file: destination)
        for key in ["size", "backing_file", "backing_fmt"] where list[key] != nil {
            throw CLIError.badOption(file: destination, entry: "\(key)=\(list[key]!)",
                                     reason: "convert takes the size and content from the source; '\(key)' cannot be set")
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
        let src = try ImageChain.open(source, format: sourceFormat, forceShare: share.forceShare, cache: caches.source)
        defer { try? src.close() }
        if Self.sameFile(source, destination) {
            throw CLIError.refused(file: destination, reason: "is the source image itself; convert into another file")
        }
        let settings = try settings(size: src.size)!
        try settings.create(path: destination)
        let dst = try ImageChain.open(destination, format: outputFormat, writable: true, cache: caches.destination)
        var closed = false
        defer { if !closed { try? dst.close() } }

        let bar = ProgressBar(enabled: progress && !quiet.quiet, total: src.size, minStep: 1)
        let copier = Copier(src: src, dst: dst, sparse: try sparseBytes(), bar: bar, srcName: source, dstName: destination)
        try copier.run(workers: outOfOrder ? workers : 1)
        try dst.flush()
        closed = true
        try dst.close()
        bar.complete()
        bar.end()
    }

    /// True when both names lead to the same existing file.
    static func sameFile(_ a: String, _ b: String) -> Bool {
        var sa = stat(), sb = stat()
        guard stat(a, &sa) == 0, stat(b, &sb) == 0 else { return false }
        return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino
    }
}

/// Copies every range of `src` that does not read as zeroes into a freshly created `dst`
/// (which reads as zeroes everywhere), `DataScan.chunkSize` bytes at a time.
final class Copier: Sendable {
    let src: any BlockDevice
    let dst: any BlockDevice
    /// Zero runs at least this long are skipped; 0 copies everything.
    let sparse: Int
    let bar: ProgressBar
    let srcName: String
    let dstName: String

    init(src: any BlockDevice, dst: any BlockDevice, sparse: Int, bar: ProgressBar, srcName: String, dstName: String) {
        self.src = src
        self.dst = dst
        self.sparse = sparse
        self.bar = bar
        self.srcName = srcName
        self.dstName = dstName
    }

    /// Plans a window of the source, then copies its chunks with `workers` threads
    /// (one thread copies in order).
    func run(workers: Int) throws {
        var pending: [(offset: UInt64, length: Int)] = []
        func drain() throws {
            try copy(pending, workers: workers)
            pending.removeAll(keepingCapacity: true)
        }
        try DataScan.ranges(of: src, from: 0, to: src.size, name: srcName) { offset, length, zero in
            if zero, sparse > 0 {
                bar.advance(by: length)
                return
            }
            var o = offset
            let end = offset + length
            while o < end {
                // Chunks end on chunk-size boundaries so chunks of neighbouring extents line up.
                let boundary = (o / UInt64(DataScan.chunkSize) + 1) * UInt64(DataScan.chunkSize)
                let n = Int(min(end, boundary) - o)
                pending.append((o, n))
                o += UInt64(n)
            }
            if pending.count >= 256 { try drain() }
        }
        try drain()
    }

    private func copy(_ chunks: [(offset: UInt64, length: Int)], workers: Int) throws {
        if workers <= 1 || chunks.count <= 1 {
            let buffer = ChunkBuffer(count: DataScan.chunkSize)
            for c in chunks { try copyChunk(c.offset, c.length, buffer) }
            return
        }
        let next = Atomic<Int>(0)
        let failure = Mutex<(any Error)?>(nil)
        DispatchQueue.concurrentPerform(iterations: min(workers, chunks.count)) { _ in
            let buffer = ChunkBuffer(count: DataScan.chunkSize)
            while failure.withLock({ $0 == nil }) {
                let i = next.add(1, ordering: .relaxed).oldValue
                guard i < chunks.count else { return }
                do {
                    try copyChunk(chunks[i].offset, chunks[i].length, buffer)
                } catch {
                    failure.withLock { if $0 == nil { $0 = error } }
                }
            }
        }
        if let error = failure.withLock({ $0 }) { throw error }
    }

    private func copyChunk(_ offset: UInt64, _ length: Int, _ buffer: ChunkBuffer) throws {
        let bytes = buffer.prefix(length)
        try src.read(into: bytes, at: offset)
        let view = UnsafeRawBufferPointer(bytes)
        let runs = sparse > 0 ? DataScan.dataRuns(view, granularity: sparse) : [0..<length]
        for r in runs {
            try dst.write(UnsafeRawBufferPointer(rebasing: view[r]), at: offset + UInt64(r.lowerBound), fua: false)
        }
        bar.advance(by: UInt64(length))
    }
}
