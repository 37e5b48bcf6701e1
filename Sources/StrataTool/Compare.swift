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

    /// First differing byte in `[0, end)`, skipping ranges both images report as zeroes.
    private func firstMismatch(_ a: any BlockDevice, _ b: any BlockDevice, upTo end: UInt64, bar: ProgressBar) throws -> UInt64? {
        let bufA = ChunkBuffer(count: DataScan.chunkSize), bufB = ChunkBuffer(count: DataScan.chunkSize)
        var found: UInt64?
        var zeroInB: [(UInt64, UInt64)] = []   // B's known-zero runs for the current window
        var pos: UInt64 = 0
        while pos < end, found == nil {
            let windowEnd = min(end, pos + (1 << 30))
            zeroInB.removeAll(keepingCapacity: true)
            try DataScan.ranges(of: b, from: pos, to: windowEnd, name: second) { o, l, z in
                if z { zeroInB.append((o, o + l)) }
            }
            try DataScan.ranges(of: a, from: pos, to: windowEnd, name: first) { o, l, zeroA in
                guard found == nil else { return }
                var x = o
                let e = o + l
                while x < e, found == nil {
                    // How far B is known zero from x (0 when it is not).
                    let zb = zeroInB.first { $0.0 <= x && x < $0.1 }
                    if zeroA, let zb {
                        let skip = min(e, zb.1)
                        bar.advance(by: skip - x)
                        x = skip
                        continue
                    }
                    var n = min(e - x, UInt64(DataScan.chunkSize) - x % UInt64(DataScan.chunkSize))
                    if zeroA, let nextZero = zeroInB.first(where: { $0.0 > x })?.0 { n = min(n, nextZero - x) }
                    if !zeroA, let zb { n = min(n, zb.1 - x) }
                    let pa = bufA.prefix(Int(n)), pb = bufB.prefix(Int(n))
                    try a.read(into: pa, at: x)
                    try b.read(into: pb, at: x)
                    if let d = DataScan.firstDifference(UnsafeRawBufferPointer(pa), UnsafeRawBufferPointer(pb)) {
                        found = x + UInt64(d)
                        return
                    }
                    bar.advance(by: n)
                    x += n
                }
            }
            pos = windowEnd
        }
        return found
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
