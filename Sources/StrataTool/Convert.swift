import ArgumentParser
import Dispatch
import Strata
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// `strata convert [-f FMT] [-O FMT] [-o OPTIONS] [-S SPARSE] [-m N [-W]] [-p] [-q] [-U] SRC DST`
struct Convert: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Copy an image into a new one, possibly in another format.",
        discussion: """
            The whole backing chain of SRC is flattened into DST. Ranges that read as zeroes are \
            not written, so DST stays sparse. The default output format is raw, as in qemu-img.
            """)

    @Option(name: .customShort("f"), help: ArgumentHelp("Source format (qcow2 or raw); probed when omitted.", valueName: "fmt"))
    var sourceFormat: ImageFormat?

    @Option(name: .customShort("O"), help: ArgumentHelp("Output format (qcow2 or raw).", valueName: "output_fmt"))
    var outputFormat: ImageFormat = .raw

    @Option(name: .customShort("o"), help: ArgumentHelp("Options for the new image, as for create.", valueName: "options"))
    var options: [String] = []

    @Option(name: .customShort("S"), help: ArgumentHelp("Zero runs at least this long (rounded down to 512) are left unwritten; 0 writes everything.", valueName: "sparse_size"))
    var sparseSize: String = "4k"

    @Option(name: .customShort("m"), help: ArgumentHelp("Worker threads (more than 1 needs -W).", valueName: "num"))
    var workers: Int = 1

    @Flag(name: .customShort("W"), help: "Allow out-of-order writes (lets several workers run).")
    var outOfOrder = false

    @Flag(name: .customShort("p"), help: "Show progress on stderr.")
    var progress = false

    @OptionGroup var quiet: QuietOption
    @OptionGroup var share: ForceShareOption

    @Argument(help: "Source image.")
    var source: String

    @Argument(help: "Image to create.")
    var destination: String

    mutating func validate() throws {
        _ = try settings(size: 0)
        guard let s = SizeParser.parse(sparseSize) else { throw CLIError.badSize(sparseSize, what: "sparse size (-S)") }
        guard s == 0 || s >= 512 else {
            throw ValidationError("-S must be 0 or at least 512 bytes (got \(s))")
        }
        guard workers >= 1, workers <= 64 else { throw ValidationError("-m must be between 1 and 64 (got \(workers))") }
        guard workers == 1 || outOfOrder else { throw ValidationError("-m \(workers) needs -W (writes would come out of order)") }
    }

    /// The new image's settings from `-O` and `-o`; its size is the source's.
    /// nil for `-o help`.
    func settings(size: UInt64) throws -> CreateSettings? {
        let list = try OptionList(parsing: options)
        if list.wantsHelp { return nil }
        var s = try CreateSettings(format: outputFormat, options: list, file: destination)
        for key in ["size", "backing_file", "backing_fmt"] where list[key] != nil {
            throw CLIError.badOption("\(key)=\(list[key]!)", reason: "convert takes the size and content from the source; '\(key)' cannot be set")
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
        let src = try ImageChain.open(source, format: sourceFormat, forceShare: share.forceShare)
        defer { try? src.close() }
        if Self.sameFile(source, destination) {
            throw CLIError.conflict(file: destination, reason: "is the source image itself; convert into another file")
        }
        let settings = try settings(size: src.size)!
        try settings.create(path: destination)
        let dst = try ImageChain.open(destination, format: outputFormat, writable: true)
        var closed = false
        defer { if !closed { try? dst.close() } }

        let sparse = Int(SizeParser.parse(sparseSize) ?? 4096) & ~511
        let bar = ProgressBar(enabled: progress && !quiet.quiet, total: src.size)
        let copier = Copier(src: src, dst: dst, sparse: sparse, bar: bar, srcName: source, dstName: destination)
        try copier.run(workers: workers)
        try dst.flush()
        closed = true
        try dst.close()
        bar.finish()
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
