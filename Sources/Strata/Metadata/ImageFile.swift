/// What every metadata room shares: the file, its geometry, the header, and where the file's
/// used clusters end. Guarded by the image's metadata lock, like every room.
final class ImageFile {
    let storage: any BlockStorage
    let path: String
    let geometry: Geometry
    let clusterSize: UInt64
    let clusterBits: UInt64
    var header: Qcow2Header
    /// The header extensions and the backing file name: the rest of the first cluster.
    var extensions: HeaderExtensions
    var backingName: String?
    /// The header must be rewritten at the next flush (relocated tables, new size).
    var headerDirty = false
    /// One past the highest host cluster in use or in the file.
    var hostEnd: UInt64

    init(storage: any BlockStorage, path: String, header: Qcow2Header, extensions: HeaderExtensions, backingName: String?,
         fileLength: UInt64) {
        self.storage = storage
        self.path = path
        self.header = header
        self.extensions = extensions
        self.backingName = backingName
        self.geometry = Geometry(clusterBits: header.clusterBits, extendedL2: header.extendedL2)
        self.clusterSize = header.clusterSize
        self.clusterBits = UInt64(header.clusterBits)
        self.hostEnd = max(divUp(fileLength, header.clusterSize), 1)
    }

    /// A corruption of this image, as an error.
    func corrupt(_ kind: CorruptionKind, at offset: UInt64, _ detail: String) -> StrataError {
        .corrupt(Corruption(path: path, kind: kind, offset: offset, detail: detail))
    }

    /// A host cluster offset read from a table must be aligned and inside the file.
    @inline(__always)
    func checkHost(_ host: UInt64, _ what: @autoclosure () -> String) throws {
        guard host % clusterSize == 0, host != 0, host / clusterSize < hostEnd else {
            let unaligned = host % clusterSize != 0
            throw corrupt(unaligned ? .unaligned : .pastEnd, at: host,
                          "\(what()) points to host offset \(host), which is \(unaligned ? "not cluster aligned" : "past the end of the file")")
        }
    }

    /// Host clusters a compressed cluster's bytes touch (its sector span).
    func compressedClusters(host: UInt64, sectors: UInt64) -> ClosedRange<UInt64> {
        let start = host & ~511
        let end = start + sectors * 512 - 1
        return (start / clusterSize)...(end / clusterSize)
    }
}
