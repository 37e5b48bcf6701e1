import ArgumentParser
import Strata

/// `strata compare [-f FMT] [-F FMT] [-p] [-q] [-U] A B`
///
/// Exit status as qemu-img's: 0 identical, 1 different, 2 error.
struct Compare: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check whether two images have the same content.",
        discussion: """
            Images of different sizes are equal when the larger one reads as zeroes past the end \
            of the smaller. Exit status: 0 identical, 1 different, 2 error.
            """)

    @Option(name: .customShort("f"), help: ArgumentHelp("Format of the first image.", valueName: "fmt"))
    var firstFormat: ImageFormat?

    @Option(name: .customShort("F"), help: ArgumentHelp("Format of the second image.", valueName: "fmt"))
    var secondFormat: ImageFormat?

    @Flag(name: .customShort("p"), help: "Show progress on stderr.")
    var progress = false

    @OptionGroup var quiet: QuietOption
    @OptionGroup var share: ForceShareOption

    @Argument(help: "First image.")
    var first: String

    @Argument(help: "Second image.")
    var second: String

    /// Exit status for "the images differ".
    static let differ = ExitCode(1)

    func run() throws {
        let a = try ImageChain.open(first, format: firstFormat, forceShare: share.forceShare)
        defer { try? a.close() }
        let b = try ImageChain.open(second, format: secondFormat, forceShare: share.forceShare)
        defer { try? b.close() }

        let common = min(a.size, b.size)
        let bar = ProgressBar(enabled: progress && !quiet.quiet, total: max(a.size, b.size))
        if let offset = try firstMismatch(a, b, upTo: common, bar: bar) {
            try mismatch(at: offset, bar: bar)
        }
        if a.size != b.size {
            bar.finish()
            say("Warning: Image size mismatch!")
            let (longer, name) = a.size > b.size ? (a, first) : (b, second)
            if let offset = try firstNonZero(longer, name: name, from: common, bar: bar) {
                try mismatch(at: offset, bar: nil)
            }
        } else {
            bar.finish()
        }
        say("Images are identical.")
    }

    private func say(_ line: String) { if !quiet.quiet { print(line) } }

    /// qemu-img reports the 512-byte sector where the first difference is.
    private func mismatch(at offset: UInt64, bar: ProgressBar?) throws -> Never {
        bar?.stop()
        say("Content mismatch at offset \(offset & ~511)!")
        throw Self.differ
    }

    /// One run of block status: `[start, end)`, known to read as zeroes or not.
    private struct Run {
        var start: UInt64
        var end: UInt64
        var zero: Bool
    }

    private func runs(_ device: any BlockDevice, name: String, from start: UInt64, to end: UInt64) throws -> [Run] {
        var out: [Run] = []
        try DataScan.ranges(of: device, from: start, to: end, name: name) { o, l, z in
            out.append(Run(start: o, end: o + l, zero: z))
        }
        return out
    }

    /// First differing byte in `[0, end)`. Walks both images' block status side by side (a
    /// window of 1 GiB at a time) and reads only where at least one of them may hold data.
    private func firstMismatch(_ a: any BlockDevice, _ b: any BlockDevice, upTo end: UInt64, bar: ProgressBar) throws -> UInt64? {
        let chunk = UInt64(DataScan.chunkSize)
        let bufA = ChunkBuffer(count: DataScan.chunkSize), bufB = ChunkBuffer(count: DataScan.chunkSize)
        var pos: UInt64 = 0
        while pos < end {
            let windowEnd = min(end, pos + (1 << 30))
            let ra = try runs(a, name: first, from: pos, to: windowEnd)
            let rb = try runs(b, name: second, from: pos, to: windowEnd)
            var i = 0, j = 0
            var x = pos
            while x < windowEnd, i < ra.count, j < rb.count {
                if ra[i].end <= x { i += 1; continue }
                if rb[j].end <= x { j += 1; continue }
                let segmentEnd = min(ra[i].end, rb[j].end)
                if ra[i].zero && rb[j].zero {
                    bar.advance(by: segmentEnd - x)
                    x = segmentEnd
                    continue
                }
                while x < segmentEnd {
                    let n = Int(min(segmentEnd - x, chunk - x % chunk))
                    let pa = bufA.prefix(n), pb = bufB.prefix(n)
                    try a.read(into: pa, at: x)
                    try b.read(into: pb, at: x)
                    if let d = DataScan.firstDifference(UnsafeRawBufferPointer(pa), UnsafeRawBufferPointer(pb)) {
                        return x + UInt64(d)
                    }
                    bar.advance(by: UInt64(n))
                    x += UInt64(n)
                }
            }
            pos = windowEnd
        }
        return nil
    }

    /// First non-zero byte of `device` in `[start, size)`.
    private func firstNonZero(_ device: any BlockDevice, name: String, from start: UInt64, bar: ProgressBar) throws -> UInt64? {
        let buffer = ChunkBuffer(count: DataScan.chunkSize)
        var found: UInt64?
        try DataScan.ranges(of: device, from: start, to: device.size, name: name) { o, l, zero in
            guard found == nil, !zero else { return }
            var x = o
            while x < o + l {
                let n = min(o + l - x, UInt64(DataScan.chunkSize))
                let p = buffer.prefix(Int(n))
                try device.read(into: p, at: x)
                if let i = DataScan.firstNonZero(UnsafeRawBufferPointer(p)) {
                    found = x + UInt64(i)
                    return
                }
                x += n
            }
        }
        return found
    }
}
