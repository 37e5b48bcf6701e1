import ArgumentParser
import Strata

/// `strata compare [-f FMT] [-F FMT] [-T SRC_CACHE] [-p] [-q] [-s] [-U] A B`
///
/// Exit status as qemu-img's: 0 identical, 1 different, 2 error.
struct Compare: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check whether two images have the same content.",
        discussion: """
            Images of different sizes are equal when the larger one reads as zeroes past the end \
            of the smaller. With -s (strict), images of different sizes differ, and so does a \
            range whose block status differs (allocated in one image and not in the other, a \
            zero cluster against a hole, data against zeroes), even when both read the same. \
            Exit status: 0 identical, 1 different, 2 error.
            """)

    @Option(name: .customShort("f"), help: ArgumentHelp("Format of the first image.", valueName: "fmt"))
    var firstFormat: ImageFormat?

    @Option(name: .customShort("F"), help: ArgumentHelp("Format of the second image.", valueName: "fmt"))
    var secondFormat: ImageFormat?

    @Option(name: .customShort("T"), help: ArgumentHelp("Cache mode of both images: \(CacheModeName.choices).", valueName: "src_cache"))
    var sourceCache: String?

    @Flag(name: .customShort("p"), help: "Show progress.")
    var progress = false

    @OptionGroup var quiet: QuietOption

    @Flag(name: .customShort("s"), help: "Strict: different sizes or block status also make the images differ.")
    var strict = false

    @OptionGroup var share: ForceShareOption

    @Argument(help: "First image.")
    var first: String

    @Argument(help: "Second image.")
    var second: String

    /// Exit status for "the images differ".
    static let differ = ExitCode(1)

    mutating func validate() throws { _ = try cacheMode() }

    /// `-T`, onto the engine's cache mode.
    func cacheMode() throws -> CacheMode {
        try sourceCache.map { try CacheModeName.parse($0, flag: "-T") } ?? .writeback
    }

    func run() throws {
        let cache = try cacheMode()
        let a = try ImageChain.open(first, format: firstFormat, forceShare: share.forceShare, cache: cache)
        defer { try? a.close() }
        let b = try ImageChain.open(second, format: secondFormat, forceShare: share.forceShare, cache: cache)
        defer { try? b.close() }

        // Like qemu-img, the bar starts at 0%, shows 100% only when the walk got there, and its
        // line is ended after the result.
        let bar = ProgressBar(enabled: progress && !quiet.quiet, total: max(a.size, b.size), minStep: 2)
        if strict, a.size != b.size {
            try differ("Strict mode: Image size mismatch!", bar: bar)
        }
        let common = min(a.size, b.size)
        switch try firstDifference(a, b, upTo: common, bar: bar) {
        case .content(let offset)?: try differ(Self.contentMismatch(offset), bar: bar)
        case .status(let offset)?: try differ("Strict mode: Offset \(offset) block status mismatch!", bar: bar)
        case nil: break
        }
        if a.size != b.size {
            say("Warning: Image size mismatch!")
            let (longer, name) = a.size > b.size ? (a, first) : (b, second)
            if let offset = try firstNonZero(longer, name: name, from: common, bar: bar) {
                try differ(Self.contentMismatch(offset), bar: bar)
            }
        }
        say("Images are identical.")
        bar.end()
    }

    private func say(_ line: String) { if !quiet.quiet { print(line) } }

    /// qemu-img reports the 512-byte sector where the first different byte is.
    static func contentMismatch(_ offset: UInt64) -> String { "Content mismatch at offset \(offset & ~511)!" }

    /// Prints why the images differ and exits 1.
    private func differ(_ line: String, bar: ProgressBar) throws -> Never {
        say(line)
        bar.end()
        throw Self.differ
    }

    /// Where two images first differ.
    enum Difference: Equatable {
        /// The bytes differ; the offset of the first different byte.
        case content(UInt64)
        /// Strict mode: the block status differs from this offset on.
        case status(UInt64)
    }

    /// What strict mode compares at each offset: the flags of qemu's block status as
    /// `qemu-img map` shows them, and whether the run goes on to the end of the image (qemu's
    /// EOF flag, which qemu-img compare -s compares too; a run found in a backing file has none).
    struct StrictStatus: Equatable {
        var present: Bool
        var zero: Bool
        var data: Bool
        var hasOffset: Bool
        var endOfImage: Bool
    }

    /// One run of block status: `[start, end)`, known to read as zeroes or not, with its
    /// strict-mode status (nil when not strict).
    private struct Run {
        var start: UInt64
        var end: UInt64
        var zero: Bool
        var status: StrictStatus?
    }

    private func runs(_ device: any BlockDevice, name: String, from start: UInt64, to end: UInt64) throws -> [Run] {
        guard strict else {
            var out: [Run] = []
            try device.forEachRun(from: start, to: end) { o, l, ext in
                out.append(Run(start: o, end: o + l, zero: ext?.status.contains(.zero) ?? false))
                return true
            }
            return out
        }
        let entries = try MapEntry.collect(layers: ImageChain.layers(of: device, name: name), start: start, length: end - start)
        return entries.map { e in
            let status = StrictStatus(present: e.present, zero: e.zero, data: e.data, hasOffset: e.offset != nil,
                                      endOfImage: e.depth == 0 && e.end == device.size)
            return Run(start: e.start, end: e.end, zero: e.zero, status: status)
        }
    }

    /// First difference in `[0, end)`. Walks both images' block status side by side (a window
    /// of 1 GiB at a time) and reads only where at least one of them may hold data.
    private func firstDifference(_ a: any BlockDevice, _ b: any BlockDevice, upTo end: UInt64, bar: ProgressBar) throws -> Difference? {
        let chunk = UInt64(DataScan.chunkSize)
        let bufA = ChunkBuffer(count: DataScan.chunkSize), bufB = ChunkBuffer(count: DataScan.chunkSize)
        var pos: UInt64 = 0
        // Windows of block status grow while they find few runs, so an empty disk of any
        // size is walked in a few steps.
        var window: UInt64 = 1 << 30
        while pos < end {
            let windowEnd = min(end, pos + window)
            let ra = try runs(a, name: first, from: pos, to: windowEnd)
            let rb = try runs(b, name: second, from: pos, to: windowEnd)
            var i = 0, j = 0
            var x = pos
            while x < windowEnd, i < ra.count, j < rb.count {
                if ra[i].end <= x { i += 1; continue }
                if rb[j].end <= x { j += 1; continue }
                let segmentEnd = min(ra[i].end, rb[j].end)
                if ra[i].status != rb[j].status { return .status(x) }
                if ra[i].zero && rb[j].zero {
                    bar.advance(by: segmentEnd - x)
                    x = segmentEnd
                    continue
                }
                // Reads of up to one chunk from x, as qemu-img reads (its progress moves by them).
                while x < segmentEnd {
                    let n = Int(min(segmentEnd - x, chunk))
                    let pa = bufA.prefix(n), pb = bufB.prefix(n)
                    try a.read(into: pa, at: x)
                    try b.read(into: pb, at: x)
                    if let d = DataScan.firstDifference(UnsafeRawBufferPointer(pa), UnsafeRawBufferPointer(pb)) {
                        return .content(x + UInt64(d))
                    }
                    bar.advance(by: UInt64(n))
                    x += UInt64(n)
                }
            }
            pos = windowEnd
            if ra.count + rb.count <= 8 { window = min(window << 4, 1 << 56) }
        }
        return nil
    }

    /// First non-zero byte of `device` in `[start, size)`.
    private func firstNonZero(_ device: any BlockDevice, name: String, from start: UInt64, bar: ProgressBar) throws -> UInt64? {
        let buffer = ChunkBuffer(count: DataScan.chunkSize)
        var found: UInt64?
        try device.forEachRun(from: start, to: device.size) { o, l, ext in
            guard !(ext?.status.contains(.zero) ?? false) else { bar.advance(by: l); return true }
            var x = o
            while x < o + l {
                let n = min(o + l - x, UInt64(DataScan.chunkSize))
                let p = buffer.prefix(Int(n))
                try device.read(into: p, at: x)
                if let i = DataScan.firstNonZero(UnsafeRawBufferPointer(p)) {
                    found = x + UInt64(i)
                    return false
                }
                bar.advance(by: n)
                x += n
            }
            return true
        }
        return found
    }
}
