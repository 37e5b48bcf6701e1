import Strata

#if canImport(Glibc)
import Glibc
#endif

/// The one way `template create` and `clone --full` make a new, independent qcow2 image:
/// `convert`'s ``Copier`` into a blank image with the source's geometry, whole zero clusters
/// left out. Nothing is left behind when it fails.
enum FullCopy {
    /// Refuses when anything (a file, a dangling link, a folder) is already at `path`: a
    /// template or clone there may have images standing on it.
    static func refuseExisting(_ path: String, what: String) throws {
        var st = stat()
        guard Storage.isFile(path) ? lstat(path, &st) == 0 : Storage.exists(path) else { return }
        try refuseReplacingTemplate(path)
        throw CLIError.refused(file: path, reason: "already exists; \(what) never replaces a file (remove it first, or choose another name)")
    }

    /// Refuses when `path` is a template (`create` and `convert` replace other files, as qemu-img does).
    static func refuseReplacingTemplate(_ path: String) throws {
        guard (try? probeFormat(path: path)) == .qcow2, let q = try? openAlone(path, forceShare: true) else { return }
        defer { try? q.close() }
        if q.isTemplate {
            throw CLIError.refused(file: path, reason: "already exists and is a template: linked clones may stand on it, so it is never replaced (remove it yourself once no clone uses it)")
        }
    }

    /// Opens a qcow2 image read-only without its backing chain (reads only its first
    /// cluster and tables: constant time whatever its size).
    static func openAlone(_ path: String, forceShare: Bool = false) throws -> Qcow2Image {
        var options = OpenOptions(format: .qcow2, forceShare: forceShare)
        options.noBacking = true
        return try Qcow2Image(path: path, options: options)
    }

    /// Creates `path` as a qcow2 image of `src`'s size, with the cluster size, extended L2
    /// setting and compression type of `src` when it is qcow2 (the defaults for raw), copies
    /// `src`'s content into it (every cluster compressed with `compress`, see
    /// ``CompressedCopier``), or, with `dedup`, through inline dedup (each distinct cluster
    /// content stored once: a copy maps to the host cluster already holding it, so no
    /// duplicate is ever allocated and the file stays compact; the image does not keep the
    /// dedup flag), then calls `finish` on the still-open image before it is flushed and
    /// closed. The source must have been opened by the caller.
    ///
    /// The image is made under a temporary name next to `path` (`path.partial-PID`), given
    /// `mode` if any, and only then linked to `path`, which must still not exist: a folder
    /// never shows a half-copied image under its final name (a killed copy leaves the
    /// `.partial-` file), and a file that appeared at `path` meanwhile is not replaced.
    static func make(from src: any BlockDevice, to path: String, mode: mode_t? = nil, compress: Bool = false, dedup: Bool = false,
                     finish: (Qcow2Image) throws -> Void = { _ in }) throws {
        var o = CreateOptions(size: src.size)
        if let q = src as? Qcow2Image {
            let h = q.header
            o.clusterSize = Int(h.clusterSize)
            o.extendedL2 = h.extendedL2
            o.compressionType = h.version >= 3 ? h.compressionType : .zlib
        }
        let partial = Storage.sibling(of: path, tag: "partial-\(getpid())")
        try Qcow2Image.create(path: partial, options: o)
        do {
            var options = OpenOptions(writable: true, format: .qcow2)
            options.dedupWrites = dedup
            let dst = try Qcow2Image(path: partial, options: options)
            var closed = false
            defer { if !closed { try? dst.close() } }
            let bar = ProgressBar(enabled: false, total: src.size, minStep: 1)
            if compress {
                try CompressedCopier(src: src, dst: dst, bar: bar).run(workers: Convert.workerRange.upperBound)
            } else {
                // Granularity = one cluster: a cluster is written only when some byte of it is not
                // zero. Writes in guest order (the workers only read ahead): with dedup, clusters
                // are indexed in the order they are written, so a later copy always finds the first.
                let copier = Copier(src: src, dst: dst, target: .blank, sparse: min(o.clusterSize, Int(Convert.maxSparseSize)), bar: bar)
                try copier.run(workers: Convert.defaultWorkers, inOrder: true)
            }
            try dst.flush()
            try finish(dst)
            closed = true
            try dst.close()
            if let mode, Storage.isFile(partial), chmod(partial, mode) != 0 {
                printError("strata: warning: \(path): could not set its file mode (\(String(cString: strerror(errno))))")
            }
            try publish(partial, as: path)
        } catch {
            Storage.remove(partial)
            throw error
        }
    }

    /// Gives the finished image its name without replacing anything there.
    private static func publish(_ partial: String, as path: String) throws {
        do {
            try Storage.rename(partial, to: path)
        } catch StrataError.openFailed(_, let e) where e == EEXIST {
            throw CLIError.refused(file: path, reason: "appeared while the copy was made; it was left alone")
        } catch StrataError.openFailed(_, let e) {
            throw CLIError.refused(file: path, reason: "cannot name the finished copy: \(String(cString: strerror(e)))")
        }
    }
}
