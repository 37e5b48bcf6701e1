import Strata

#if canImport(Glibc)
import Glibc
#endif

/// A backing chain opened for a commit: the top image writable and alone, the images
/// between it and the base read-only and alone (``OpenOptions/noBacking``), the base
/// writable with its own backing chain. Each image is opened once, so the locks of one
/// image never meet (a read-only open of the base as part of the top's chain would forbid
/// opening it for writing).
final class OpenChain {
    /// The image the user named.
    let top: Qcow2Image
    /// The top and the images below it, down to the base (excluded).
    let above: [any BlockDevice]
    /// The image committed into.
    private(set) var base: any BlockDevice
    /// The base's path and format (to reopen it after growing a raw file).
    let basePath: String
    let baseFormat: ImageFormat
    let cache: CacheMode

    private init(top: Qcow2Image, above: [any BlockDevice], base: any BlockDevice, basePath: String, baseFormat: ImageFormat, cache: CacheMode) {
        self.top = top
        self.above = above
        self.base = base
        self.basePath = basePath
        self.baseFormat = baseFormat
        self.cache = cache
    }

    /// Opens `file`'s chain down to `base` (nil: `file`'s backing file). Fails, before
    /// anything is written, on a raw `file`, a missing backing file, a base not in the
    /// chain, a loop, or a base that is a template.
    static func forCommit(_ file: String, format: ImageFormat?, base: String?, cache: CacheMode) throws -> OpenChain {
        var options = OpenOptions(writable: true, format: format, cache: cache)
        options.noBacking = true
        let device = try openImage(path: file, options: options)
        guard let top = device as? Qcow2Image else {
            try? device.close()
            throw CLIError.noBackingFile(file: file, action: "commit into")
        }
        var above: [any BlockDevice] = [top]
        func closeAll() { for d in above { try? d.close() } }
        do {
            var current = top
            var currentPath = file
            var seen: Set<String> = [BackingChain.realPath(file)]
            while true {
                guard let name = current.backingFileName, let path = current.backingFilePath else {
                    if current === top { throw CLIError.noBackingFile(file: file, action: "commit into") }
                    throw CLIError.notInChain(file: file, name: base ?? "")
                }
                guard let fmt = current.backingFormat else {
                    throw StrataError.backingFormatUnknown(path: currentPath, backing: name)
                }
                guard Storage.exists(path) else { throw CLIError.backingMissing(file: currentPath, name: name, path: path) }
                guard seen.insert(BackingChain.realPath(path)).inserted, above.count < Limits.maxBackingChainDepth else {
                    throw StrataError.backingChainLoop(path: file)
                }
                if base == nil || matches(base!, name: name, path: path, overlay: currentPath) {
                    if chainPaths(path, format: fmt).contains(BackingChain.realPath(file)) {
                        throw StrataError.backingChainLoop(path: file)
                    }
                    let b: any BlockDevice
                    do {
                        b = try openImage(path: path, options: OpenOptions(writable: true, format: fmt, cache: cache))
                    } catch StrataError.imageIsTemplate {
                        throw CLIError.backingIsTemplate(file: path)
                    }
                    return OpenChain(top: top, above: above, base: b, basePath: path, baseFormat: fmt, cache: cache)
                }
                var o = OpenOptions(writable: false, format: fmt, cache: cache)
                o.noBacking = true
                let next = try openImage(path: path, options: o)
                above.append(next)
                guard let q = next as? Qcow2Image else { throw CLIError.notInChain(file: file, name: base ?? "") }
                current = q
                currentPath = path
            }
        } catch {
            closeAll()
            throw error
        }
    }

    /// The canonical paths of `path` and the images below it, read without locks, each
    /// image alone (best effort: the walk stops at the first image that does not open, at a
    /// repeat, or at the depth limit). For finding loops before opening anything for writing.
    static func chainPaths(_ path: String, format: ImageFormat) -> [String] {
        var out: [String] = []
        var next: (String, ImageFormat)? = (path, format)
        while let (p, f) = next, out.count <= Limits.maxBackingChainDepth {
            let real = BackingChain.realPath(p)
            if out.contains(real) { break }
            out.append(real)
            guard f == .qcow2 else { break }
            var o = OpenOptions(writable: false, format: .qcow2, forceShare: true)
            o.noBacking = true
            guard let q = try? Qcow2Image(path: p, options: o) else { break }
            next = q.backingFilePath.map { ($0, q.backingFormat ?? .qcow2) }
            try? q.close()
        }
        return out
    }

    /// Whether the user's `-b` names this backing file: its name as recorded, or the same
    /// file reached from the overlay's folder (as qemu-img resolves it) or from the
    /// working directory.
    static func matches(_ wanted: String, name: String, path: String, overlay: String) -> Bool {
        if wanted == name { return true }
        let real = BackingChain.realPath(path)
        return BackingChain.realPath(BackingChain.resolve(wanted, relativeTo: overlay)) == real
            || BackingChain.realPath(wanted) == real
    }

    /// Grows the base to `size` bytes (new space reads as zeroes).
    func growBase(to size: UInt64) throws {
        switch base {
        case let q as Qcow2Image:
            try q.resize(to: size)
        case let r as RawImage:
            try withFile(basePath) { try r.storage.setLength(size) }
            try r.close()
            base = try openImage(path: basePath, options: OpenOptions(writable: true, format: .raw, cache: cache))
        default:
            throw CLIError.refused(file: basePath, reason: "this kind of image cannot be resized")
        }
    }

    /// Closes the base first (its data made durable), then the images above it.
    func close() throws {
        try base.close()
        for d in above.reversed() { try d.close() }
    }

    func closeQuietly() {
        try? base.close()
        for d in above.reversed() { try? d.close() }
    }
}
