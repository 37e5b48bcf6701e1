import Strata

#if canImport(Glibc)
import Glibc
#endif

/// `template create --dedup`: ``FullCopy/make(from:to:mode:compress:finish:)`` with the new
/// image written through inline dedup, so each distinct cluster content is stored once.
///
/// The copy is opened with ``OpenOptions/dedupWrites``: a whole cluster whose content the copy
/// already holds is mapped to that host cluster (its refcount raised) instead of being
/// written, and one that reads as zeroes is never written (the new image reads as zeroes
/// there already). No duplicate is ever allocated, so there is nothing to free afterwards:
/// the file is as compact as a plain copy of the distinct clusters. The image does not keep
/// the dedup flag (a template is never written again). Same naming rules as `FullCopy`: made
/// as `path.partial-PID`, linked to `path` only when complete, removed when the copy fails.
enum DedupCopy {
    static func make(from src: any BlockDevice, to path: String, mode: mode_t,
                     finish: (Qcow2Image) throws -> Void) throws {
        var o = CreateOptions(size: src.size)
        if let q = src as? Qcow2Image {
            let h = q.header
            o.clusterSize = Int(h.clusterSize)
            o.extendedL2 = h.extendedL2
            o.compressionType = h.version >= 3 ? h.compressionType : .zlib
        }
        let partial = "\(path).partial-\(getpid())"
        try Qcow2Image.create(path: partial, options: o)
        do {
            var options = OpenOptions(writable: true, format: .qcow2)
            options.dedupWrites = true
            let dst = try Qcow2Image(path: partial, options: options)
            var closed = false
            defer { if !closed { try? dst.close() } }
            let bar = ProgressBar(enabled: false, total: src.size, minStep: 1)
            // One worker: clusters are indexed in the order they are written, so a later copy
            // always finds the first (two workers could both write one content before either
            // is indexed, and keep two copies).
            let copier = Copier(src: src, dst: dst, target: .blank, sparse: min(o.clusterSize, Int(Convert.maxSparseSize)), bar: bar)
            try copier.run(workers: 1)
            try dst.flush()
            try finish(dst)
            closed = true
            try dst.close()
            if chmod(partial, mode) != 0 {
                printError("strata: warning: \(path): could not set its file mode (\(String(cString: strerror(errno))))")
            }
            try publish(partial, as: path)
        } catch {
            unlink(partial)
            throw error
        }
    }

    /// Gives the finished image its name without replacing anything there (a hard link, which
    /// fails when `path` exists; where hard links are not supported, a rename after one more
    /// check). The same rule as `FullCopy`'s.
    private static func publish(_ partial: String, as path: String) throws {
        if link(partial, path) == 0 {
            unlink(partial)
            return
        }
        let e = errno
        if e == EEXIST { throw CLIError.refused(file: path, reason: "appeared while the copy was made; it was left alone") }
        var st = stat()
        guard e == EPERM || e == ENOTSUP || e == EOPNOTSUPP || e == EXDEV, lstat(path, &st) != 0 else {
            throw CLIError.refused(file: path, reason: "cannot name the finished copy: \(String(cString: strerror(e)))")
        }
        guard rename(partial, path) == 0 else {
            throw CLIError.refused(file: path, reason: "cannot name the finished copy: \(String(cString: strerror(errno)))")
        }
    }
}
