import ArgumentParser
import Strata

#if canImport(Glibc)
import Glibc
#endif

/// `strata commit [-f FMT] [-t CACHE] [-b BASE] [-d] [-p] [-q] FILE`
struct Commit: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write an overlay's changes into its backing file.",
        discussion: """
            What FILE holds (and, with -b, what every image between FILE and BASE holds) is \
            written into BASE, by default FILE's own backing file. BASE grows to FILE's size when \
            it is smaller (it never shrinks). FILE is then emptied, so it reads through to BASE \
            again, unless -d is given. With -b, the images between FILE and BASE no longer read \
            as before, and FILE is not emptied (-b implies -d), as in qemu-img. Only the ranges \
            the images hold are visited: the cost follows the data, not the virtual size. A \
            template cannot be committed into (its linked clones read through it). The data \
            reaches BASE and is made durable before FILE is emptied, so a crash at any point \
            leaves FILE reading as before.
            """)

    @OptionGroup var format: FormatOption

    @Option(name: .customShort("t"), help: ArgumentHelp("Cache mode: \(CacheModeName.choices).", valueName: "cache"))
    var cache: String?

    @Option(name: .customShort("b"), help: ArgumentHelp("The image of FILE's backing chain to commit into (default: FILE's backing file).", valueName: "base"))
    var base: String?

    @Flag(name: .customShort("d"), help: "Do not empty FILE after the commit.")
    var keepOverlay = false

    @Flag(name: .customShort("p"), help: "Show progress.")
    var progress = false

    @OptionGroup var quiet: QuietOption

    @Argument(help: "The overlay image.")
    var file: String

    mutating func validate() throws {
        if let cache { _ = try CacheModeName.parse(cache, flag: "-t") }
        if base == "" { throw ValidationError("-b needs the name of an image in the backing chain") }
    }

    func run() throws {
        let mode = try cache.map { try CacheModeName.parse($0, flag: "-t") } ?? .writeback
        let chain = try OpenChain.forCommit(file, format: format.format, base: base, cache: mode)
        defer { chain.closeQuietly() }
        let top = chain.top
        let size = top.size
        let bar = ProgressBar(enabled: progress && !quiet.quiet, total: size, minStep: 1)

        // BASE grows to FILE's size (qemu-img does the same); a larger BASE keeps its size.
        if chain.base.size < size { try chain.growBase(to: size) }
        let target = chain.base

        // Data first: everything the layers above BASE hold, as FILE reads it.
        let buffer = ChunkBuffer(count: Copier.chunkSize)
        var done: UInt64 = 0
        try BackingChain.forEachAllocated(in: chain.above, from: 0, to: size) { offset, length, layer, zero in
            bar.advance(by: offset - done)
            done = offset + length
            if zero {
                try target.writeZeroes(at: offset, length: length, mayUnmap: true, fua: false)
                bar.advance(by: length)
                return true
            }
            var o = offset
            while o < offset + length {
                let n = Int(min(UInt64(Copier.chunkSize), offset + length - o))
                let bytes = buffer.prefix(n)
                try chain.above[layer].read(into: bytes, at: o)
                let view = UnsafeRawBufferPointer(bytes)
                if ZeroBuffer.isZero(view) {
                    try target.writeZeroes(at: o, length: UInt64(n), mayUnmap: true, fua: false)
                } else {
                    try target.write(view, at: o, fua: false)
                }
                bar.advance(by: UInt64(n))
                o += UInt64(n)
            }
            return true
        }
        bar.advance(by: size - done)
        try target.flush()

        // Then, with the data durable in BASE, FILE may be emptied.
        if !keepOverlay && base == nil {
            try top.makeEmpty()
            try top.flush()
        }
        try chain.close()
        bar.complete()
        bar.end()
        if !quiet.quiet { print("Image committed.") }
    }
}
