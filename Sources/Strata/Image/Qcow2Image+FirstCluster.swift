/// The first cluster beyond the tables: the header fields amend changes, the header
/// extensions and the backing file name. Rewritten whole, in one write of one cluster, after
/// the metadata it points at is durable.
extension Qcow2Image {
    /// Rewrites the first cluster after `change` (header fields, extensions, backing name),
    /// and makes it durable. Metadata must be flushed (the caller quiesced or flushed).
    func rewriteFirstCluster(_ change: (inout Qcow2Header, inout HeaderExtensions, inout String?) -> Void) throws {
        try lock.withLock {
            var h = md.header
            var ext = md.file.extensions
            var name = md.file.backingName
            change(&h, &ext, &name)
            guard let first = FirstCluster.encode(header: &h, extensions: ext, backingName: name) else {
                throw StrataError.invalidOption(path: path, reason: "the header, its extensions and the backing file name do not fit in one \(clusterSize)-byte cluster")
            }
            try storage.writeBytes(first, at: 0)
            try storage.sync()
            md.header = h
            md.file.extensions = ext
            md.file.backingName = name
        }
    }

    /// Header fields only (amend's changes).
    func rewriteFirstCluster(_ change: (inout Qcow2Header) -> Void) throws {
        try rewriteFirstCluster { h, _, _ in change(&h) }
    }

    /// Records a new backing file (`qemu-img rebase -u`): `name` as it will be stored (resolved
    /// against this image's folder when relative), `format` as the backing format extension;
    /// nil for both drops the backing file. Only the header changes: the caller copies
    /// whatever data the new backing file does not provide first. The backing device this
    /// image has open stays the one it opened; the new one is used from the next open.
    public func setBackingFile(name: String?, format: ImageFormat?) throws {
        if isReadOnly { throw StrataError.readOnly(path: path) }
        if let name, name.isEmpty || UInt64(name.utf8.count) > Limits.maxBackingNameBytes {
            throw StrataError.invalidOption(path: path, reason: "a backing file name must be 1 to \(Limits.maxBackingNameBytes) bytes")
        }
        try prepareFirstWrite()
        try quiesce {
            try guarded {
                try rewriteFirstCluster { _, ext, backing in
                    backing = name
                    ext.backingFormat = name == nil ? nil : format?.rawValue
                }
            }
        }
    }

    /// Marks the image a template: Strata never opens it for writing again (QEMU ignores the
    /// mark), and seals it (``AutoclearFeatures/templateSealed``). The last step of `strata template create`; this open handle stays writable
    /// until closed.
    public func markAsTemplate() throws {
        if isReadOnly { throw StrataError.readOnly(path: path) }
        guard header.version >= 3 else {
            throw StrataError.invalidOption(path: path, reason: "a template must be a version 3 image (compat=1.1)")
        }
        try prepareFirstWrite()
        try quiesce {
            try guarded {
                try rewriteFirstCluster { _, ext, _ in
                    var st = ext.strata ?? StrataExtension()
                    st.flags.insert(.template)
                    ext.strata = st
                }
            }
        }
        // The seal last: a crash before it leaves a template reported as unsealed, never the
        // other way round.
        try writeAutoclear(lock.withLock { md.header.autoclearFeatures }.union(.templateSealed))
    }
}
