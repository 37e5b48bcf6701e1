#if canImport(Glibc)
import Glibc
#endif
import Strata

/// `qemu-nbd --snapshot`: an image served through a temporary qcow2 overlay whose backing file
/// is the image. Writes land in the overlay; the image itself is only ever opened read-only.
///
/// The overlay is created in `$TMPDIR`, or `/var/tmp` when that is unset (as QEMU does: an
/// overlay can grow as large as the disk, which is no place for a RAM-backed `/tmp`), and its
/// name is unlinked as soon as it is open, so nothing is left behind however the server ends.
/// The open device is the overlay's only reference; closing it frees the space.
enum SnapshotOverlay {
    /// The directory overlays are created in.
    static var directory: String {
        if let dir = getenv("TMPDIR").map({ String(cString: $0) }), !dir.isEmpty { return dir }
        return "/var/tmp"
    }

    /// Opens `path` through a new overlay, with `options` (format: of `path`, probed when nil).
    static func open(over path: String, options: OpenOptions) throws -> any BlockDevice {
        let format = try options.format ?? probeFormat(path: path)
        var template = Array("\(directory)/strata-snapshot-XXXXXX.qcow2".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemps($0.baseAddress!, 6) }
        guard fd >= 0 else { throw StrataError.openFailed(path: "\(directory)/strata-snapshot-XXXXXX.qcow2", errno: errno) }
        Glibc.close(fd)
        let overlay = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        defer { unlink(overlay) }

        var create = CreateOptions()
        create.backingFile = ExportRegistry.realPath(path)
        create.backingFormat = format
        try Qcow2Image.create(path: overlay, options: create)
        var open = options
        open.format = .qcow2
        return try openImage(path: overlay, options: open)
    }
}
