import ArgumentParser
import Strata

#if canImport(Glibc)
import Glibc
#endif

/// One image of an open backing chain, top first, as `info --backing-chain` and `map` see it.
struct ChainLayer {
    /// The open image (the top one is the device the user opened).
    let device: any BlockDevice
    let format: ImageFormat
    /// The name qemu-img would print: the top as given, a backing file as its recorded name
    /// joined to the directory of the image that names it (``BackingChain/resolve(_:relativeTo:)``).
    let displayName: String
    /// The layer as a qcow2 image (nil for raw).
    var qcow2: Qcow2Image? { device as? Qcow2Image }
}

/// Opening images for the commands, and walking their backing chains.
enum ImageChain {
    /// Opens a user-named image read-only (`-U` skips locking) or writable, with `cache`'s
    /// flush behaviour.
    static func open(_ path: String, format: ImageFormat?, writable: Bool = false,
                     forceShare: Bool = false, cache: CacheMode = .writeback, snapshot: String? = nil) throws -> any BlockDevice {
        try openImage(path: path, options: OpenOptions(writable: writable, format: format, cache: cache,
                                                       forceShare: forceShare && !writable, snapshot: snapshot))
    }

    /// qemu-img's SNAPSHOT_PARAM: `snapshot.id=ID`, `snapshot.name=NAME` (either, or both
    /// naming one snapshot) or a bare ID_OR_NAME; the id or name to look up.
    static func snapshotName(_ param: String) throws -> String {
        guard param.hasPrefix("snapshot.") else {
            guard !param.isEmpty else { throw ValidationError("-l: the snapshot name is empty") }
            return param
        }
        var found: String? = nil
        for part in param.split(separator: ",", omittingEmptySubsequences: false) {
            guard let eq = part.firstIndex(of: "="),
                  ["snapshot.id", "snapshot.name"].contains(String(part[..<eq])), part.index(after: eq) != part.endIndex else {
                throw ValidationError("-l: expected snapshot.id=ID, snapshot.name=NAME or ID_OR_NAME, got '\(param)'")
            }
            found = found ?? String(part[part.index(after: eq)...])
        }
        return found!
    }

    /// The chain below `top` (included), following `Qcow2Image.backing`.
    static func layers(of top: any BlockDevice, name: String) -> [ChainLayer] {
        var out: [ChainLayer] = []
        var device: (any BlockDevice)? = top
        var displayName = name
        while let d = device, out.count <= Limits.maxBackingChainDepth {
            let q = d as? Qcow2Image
            out.append(ChainLayer(device: d, format: q == nil ? .raw : .qcow2, displayName: displayName))
            guard let q, let backing = q.backing else { break }
            displayName = BackingChain.resolve(q.backingFileName ?? q.backingFilePath ?? "", relativeTo: displayName)
            device = backing
        }
        return out
    }

    /// Says, once on stderr, that a writable raw image was probed rather than named: probing
    /// raw images is dangerous (a guest could write another format's header), so writes
    /// that would change what the first sector probes as are refused. As QEMU warns.
    static func warnIfProbedRaw(_ device: any BlockDevice, name: String) {
        guard let raw = device as? RawImage, raw.probed, !raw.isReadOnly else { return }
        printError("strata: warning: \(name): no format given, and it probed as raw; writes that would make its first sector look like another image format are refused. Give -f raw to lift the restriction.")
    }

    /// Says on stderr that a writable dedup image's index file is not used, and why: the
    /// clusters it stored before are not found until `strata dedup` rebuilds the index.
    static func warnIfDedupIndexStale(_ device: any BlockDevice, name: String) {
        guard let q = device as? Qcow2Image, q.deduplicatesWrites, case .stale(let reason) = q.dedupIndexState else { return }
        printError("strata: warning: \(name): its dedup index is not used (\(reason)); new writes are indexed, but clusters stored before are found again only after `strata dedup \(name)` rebuilds it")
    }

    /// Bytes the file occupies on its file system (`st_blocks * 512`), qemu's "actual-size".
    static func allocatedBytes(_ path: String) -> UInt64? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return UInt64(st.st_blocks) * 512
    }
}
