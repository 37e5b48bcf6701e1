import ArgumentParser
import Strata

#if canImport(Glibc)
import Glibc
#endif

/// `strata rebase [-f FMT] [-t CACHE] [-T SRC_CACHE] [-p] [-q] [-U] [-u] -b BACKING [-F BACKING_FMT] FILE`
struct Rebase: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Change the backing file of an image.",
        discussion: """
            Safe mode (the default) keeps what FILE reads: wherever FILE holds nothing and the \
            old and new backing files differ, the old content is copied into FILE first; then \
            the header names the new backing file. Only ranges that one of the backing files \
            holds are compared, so the cost follows the data, not the virtual size. -b "" \
            flattens: everything FILE reads through its backing file is copied in and the \
            backing file is dropped. -u (unsafe) only rewrites the header, without opening \
            either backing file (to follow a moved or renamed backing file). A relative \
            BACKING is looked up in FILE's folder and recorded as given. -F is required with a \
            backing file, as in qemu-img.
            """)

    @OptionGroup var format: FormatOption

    @Option(name: .customShort("b"), help: ArgumentHelp("The new backing file (\"\" for none).", valueName: "backing_file"))
    var backingFile: String?

    @Option(name: .customShort("F"), help: ArgumentHelp("Format of the new backing file (qcow2 or raw).", valueName: "backing_fmt"))
    var backingFormat: ImageFormat?

    @Flag(name: .customShort("u"), help: "Unsafe: change the header only, leaving the content to the user.")
    var unsafe = false

    @Option(name: .customShort("t"), help: ArgumentHelp("Cache mode of FILE: \(CacheModeName.choices).", valueName: "cache"))
    var cache: String?

    @Option(name: .customShort("T"), help: ArgumentHelp("Cache mode of the backing files: \(CacheModeName.choices).", valueName: "src_cache"))
    var sourceCache: String?

    @Flag(name: .customShort("p"), help: "Show progress.")
    var progress = false

    @OptionGroup var quiet: QuietOption
    @OptionGroup var share: ForceShareOption

    @Argument(help: "The image whose backing file changes.")
    var file: String

    mutating func validate() throws {
        if let cache { _ = try CacheModeName.parse(cache, flag: "-t") }
        if let sourceCache { _ = try CacheModeName.parse(sourceCache, flag: "-T") }
        guard let backingFile else {
            throw ValidationError("give the new backing file with -b (-b \"\" drops the backing file)")
        }
        if !backingFile.isEmpty, backingFormat == nil {
            throw ValidationError("give the format of the new backing file with -F qcow2 or -F raw")
        }
    }

    /// The name recorded in the header: nil drops the backing file.
    var newName: String? { backingFile.flatMap { $0.isEmpty ? nil : $0 } }

    func run() throws {
        let mode = try cache.map { try CacheModeName.parse($0, flag: "-t") } ?? .writeback
        if unsafe { return try runUnsafe(mode) }
        let sourceMode = try sourceCache.map { try CacheModeName.parse($0, flag: "-T") } ?? .writeback

        // FILE with its old chain (the content to keep).
        var options = OpenOptions(writable: true, format: format.format, cache: mode)
        options.forceShare = false
        let device: any BlockDevice
        do {
            device = try openImage(path: file, options: options)
        } catch let e as StrataError {
            throw explainOpenFailure(e)
        }
        var closed = false
        defer { if !closed { try? device.close() } }
        guard let top = device as? Qcow2Image else {
            throw CLIError.refused(file: file, reason: "raw images have no backing file; only qcow2 images can be rebased")
        }
        if top.backingFileName == nil, newName == nil { return try finish(top, &closed) }

        // The new backing file, read-only.
        var newBase: (any BlockDevice)? = nil
        defer { try? newBase?.close() }
        var prefixDepth: UInt32? = nil
        if let name = newName {
            let path = BackingChain.resolve(name, relativeTo: file)
            guard Storage.exists(path) else { throw CLIError.newBackingMissing(file: file, name: name, path: path) }
            let real = BackingChain.realPath(path)
            try refuseLoop(name: name, path: path)
            newBase = try openImage(path: path, options: OpenOptions(format: backingFormat, cache: sourceMode, forceShare: share.forceShare))
            // Rebasing onto an image of the old chain: what lies at or below it is the same.
            var depth: UInt32 = 2
            var layer: Qcow2Image? = top
            while let q = layer, let p = q.backingFilePath, depth <= UInt32(Limits.maxBackingChainDepth) {
                if BackingChain.realPath(p) == real { prefixDepth = depth; break }
                layer = q.backing as? Qcow2Image
                depth += 1
            }
        }

        let size = top.size
        let bar = ProgressBar(enabled: progress && !quiet.quiet, total: size, minStep: 1)
        let copier = RebaseCopier(top: top, newBase: newBase, prefixDepth: prefixDepth)
        try copier.run(bar: bar)
        try top.flush()
        // Data first (durable), header last.
        try top.setBackingFile(name: newName, format: newName == nil ? nil : backingFormat)
        try finish(top, &closed)
        bar.complete()
        bar.end()
    }

    private func finish(_ top: Qcow2Image, _ closed: inout Bool) throws {
        closed = true
        try top.close()
    }

    /// `-u`: the header only; neither backing file is opened.
    private func runUnsafe(_ mode: CacheMode) throws {
        var options = OpenOptions(writable: true, format: format.format, cache: mode)
        options.noBacking = true
        let device = try openImage(path: file, options: options)
        var closed = false
        defer { if !closed { try? device.close() } }
        guard let top = device as? Qcow2Image else {
            throw CLIError.refused(file: file, reason: "raw images have no backing file; only qcow2 images can be rebased")
        }
        if let name = newName { try refuseLoop(name: name, path: BackingChain.resolve(name, relativeTo: file)) }
        try top.setBackingFile(name: newName, format: newName == nil ? nil : backingFormat)
        closed = true
        try top.close()
        if let name = newName, !quiet.quiet {
            let path = BackingChain.resolve(name, relativeTo: file)
            if !Storage.exists(path) {
                printError("strata: warning: \(file): the new backing file '\(name)' does not exist yet (looked for \(path)); the image cannot be read until it does")
            }
        }
    }

    /// Refuses a new backing file that is FILE itself or reads through it.
    private func refuseLoop(name: String, path: String) throws {
        let me = BackingChain.realPath(file)
        if BackingChain.realPath(path) == me {
            throw CLIError.refused(file: file, reason: "an image cannot be its own backing file")
        }
        if OpenChain.chainPaths(path, format: backingFormat ?? .qcow2).contains(me) {
            throw CLIError.refused(file: file, reason: "'\(name)' reads through \(file) itself: the backing chain would loop")
        }
    }

    /// A failed open of FILE's old chain, in words: a missing old backing file is the usual
    /// case.
    private func explainOpenFailure(_ e: StrataError) -> any Error {
        if case .openFailed(let p, let err) = e, err == ENOENT, BackingChain.realPath(p) != BackingChain.realPath(file) {
            return CLIError.refused(file: file, reason: "old backing file \(p) is missing; a safe rebase reads it to keep the content. If it was moved or renamed, use 'strata rebase -u -b NEWPATH -F FMT \(file)'")
        }
        return e
    }
}

/// The copy of a safe rebase: wherever the top image holds nothing, the old backing content
/// (what the top reads) is compared with the new backing file's, and the differing sectors
/// are written into the top. Both backing files are walked by block status first; ranges
/// that read as zeroes in both are never read.
final class RebaseCopier {
    let top: Qcow2Image
    let newBase: (any BlockDevice)?
    /// Depth of the new backing file in the old chain (2 = the old backing file), if it is in it.
    let prefixDepth: UInt32?
    /// qemu-img compares sectors.
    static let sector = 512
    /// Ranges handled per batch (the walk of the top is paused while they are written).
    static let batch = 4096

    init(top: Qcow2Image, newBase: (any BlockDevice)?, prefixDepth: UInt32?) {
        self.top = top
        self.newBase = newBase
        self.prefixDepth = prefixDepth
    }

    func run(bar: ProgressBar) throws {
        let size = top.size
        var pos: UInt64 = 0
        let old = ChunkBuffer(count: Copier.chunkSize)
        let new = ChunkBuffer(count: Copier.chunkSize)
        while pos < size {
            // The next ranges where the top holds nothing, and whether the old content is zero.
            var ranges: [(offset: UInt64, length: UInt64, zero: Bool)] = []
            var end = size
            try top.forEachExtent(at: pos, length: size - pos) { e in
                if ranges.count >= Self.batch { end = e.offset; return false }
                let reachesOldPrefix = prefixDepth.map { e.depth != 0 && e.depth >= $0 } ?? false
                if e.depth != 1, !reachesOldPrefix {
                    ranges.append((e.offset, e.length, e.status.contains(.zero)))
                }
                return true
            }
            for r in ranges {
                bar.advance(by: r.offset > pos ? r.offset - pos : 0)
                try compare(r.offset, r.length, oldZero: r.zero, old: old, new: new)
                bar.advance(by: r.length)
                pos = r.offset + r.length
            }
            if end > pos { bar.advance(by: end - pos) }
            pos = end
        }
    }

    /// One range the top does not hold: walk the new backing file there, skip what reads as
    /// zeroes on both sides, compare the rest.
    private func compare(_ offset: UInt64, _ length: UInt64, oldZero: Bool, old: ChunkBuffer, new: ChunkBuffer) throws {
        let end = offset + length
        let newSize = newBase?.size ?? 0
        let inside = min(end, max(offset, newSize))
        var runs: [(UInt64, UInt64, Bool)] = []
        if let newBase, inside > offset {
            try newBase.forEachRun(from: offset, to: inside) { o, n, ext in
                runs.append((o, n, ext?.status.contains(.zero) ?? false))
                return true
            }
        }
        if end > inside { runs.append((inside, end - inside, true)) }
        for (o, n, newZero) in runs where !(oldZero && newZero) {
            var p = o
            while p < o + n {
                let count = Int(min(UInt64(Copier.chunkSize), o + n - p))
                let a = old.prefix(count), b = new.prefix(count)
                if oldZero { a.initializeMemory(as: UInt8.self, repeating: 0) } else { try top.read(into: a, at: p) }
                if newZero { b.initializeMemory(as: UInt8.self, repeating: 0) } else { try newBase!.read(into: b, at: p) }
                try writeDifferences(UnsafeRawBufferPointer(a), UnsafeRawBufferPointer(b), at: p, oldZero: oldZero)
                p += UInt64(count)
            }
        }
    }

    /// Writes the sectors where `a` (old) and `b` (new) differ, with the old bytes, as runs.
    private func writeDifferences(_ a: UnsafeRawBufferPointer, _ b: UnsafeRawBufferPointer, at offset: UInt64, oldZero: Bool) throws {
        let count = a.count
        var i = 0
        while i < count {
            func differs(_ j: Int) -> Bool {
                let n = min(Self.sector, count - j)
                return memcmp(a.baseAddress! + j, b.baseAddress! + j, n) != 0
            }
            guard differs(i) else { i += Self.sector; continue }
            var j = i + Self.sector
            while j < count, differs(j) { j += Self.sector }
            let stop = min(j, count)
            if oldZero {
                try top.writeZeroes(at: offset + UInt64(i), length: UInt64(stop - i), mayUnmap: false, fua: false)
            } else {
                try top.write(UnsafeRawBufferPointer(rebasing: a[i..<stop]), at: offset + UInt64(i), fua: false)
            }
            i = stop
        }
    }
}
