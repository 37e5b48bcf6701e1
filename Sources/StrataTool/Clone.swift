import ArgumentParser
import Strata

#if canImport(Glibc)
import Glibc
#endif

/// `strata clone [--full [--snapshot NAME]] [-q] SRC DST`
struct Clone: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Make a linked clone of a template, or an independent copy of any image.",
        discussion: """
            A linked clone is a new qcow2 image whose backing file is the template SRC: it \
            starts out reading exactly as SRC, holds only what is written to it afterwards, \
            and is made in constant time whatever SRC's size (SRC's data is never read). It \
            gets SRC's virtual size and cluster size, and records SRC's format (qcow2). SRC \
            must be a template (see 'strata template create'): a template is never opened for \
            writing, and writing to any other base under its clones would corrupt them. \
            The backing file name is stored relative (SRC's file name alone) when SRC and DST \
            are in the same folder, after symbolic links are resolved, so a folder of \
            templates and clones can be moved or copied as a whole; otherwise it is SRC's \
            absolute path with symbolic links resolved (a clone never follows a link that \
            may later point at another image).

            With --full, DST is an independent qcow2 image with no backing file: SRC (any \
            image, qcow2 or raw, its backing chain flattened) is copied, of its current state \
            or, with --snapshot, of an internal snapshot. Whole zero clusters are not written, \
            so DST is as thin as SRC or thinner. DST is not a template.

            DST must not exist: clone never replaces a file (one may have clones standing on it).
            """)

    @Flag(name: .customLong("full"), help: "Make an independent copy with no backing file instead of a linked clone.")
    var full = false

    @Option(name: .customLong("snapshot"), help: ArgumentHelp("With --full: copy the state of this internal snapshot (id or name).", valueName: "name"))
    var snapshot: String?

    @OptionGroup var quiet: QuietOption

    @Argument(help: "The template (or, with --full, any image) to clone.")
    var source: String

    @Argument(help: "The image to create.")
    var destination: String

    mutating func validate() throws {
        if snapshot != nil, !full {
            throw ValidationError("--snapshot needs --full: a linked clone stands on the template's current state")
        }
    }

    func run() throws {
        if Convert.sameFile(source, destination) {
            throw CLIError.refused(file: destination, reason: "is the source image itself; clone into another file")
        }
        try FullCopy.refuseExisting(destination, what: "clone")
        if full {
            try runFull()
        } else {
            try Self.linkedClone(source: source, destination: destination)
        }
        if !quiet.quiet { print("Cloned '\(source)' to '\(destination)'\(full ? " (full copy)" : "")") }
    }

    /// `--full`: the shared copy into a new image.
    func runFull() throws {
        var options = OpenOptions()
        options.snapshot = snapshot
        let src = try openImage(path: source, options: options)
        defer { try? src.close() }
        try FullCopy.make(from: src, to: destination)
    }

    /// Makes the linked clone: SRC's first cluster and tables are read (to check it is a
    /// template and take its geometry), nothing else.
    static func linkedClone(source: String, destination: String) throws {
        let format = try probeFormat(path: source)
        let suggestion = "make a template first with 'strata template create \(source) TEMPLATE' and clone that, or make an independent copy with 'strata clone --full \(source) \(destination)'"
        guard format == .qcow2 else {
            throw CLIError.refused(file: source, reason: "is a raw image, not a template: linked clones stand only on templates; \(suggestion)")
        }
        let template = try FullCopy.openAlone(source)
        defer { try? template.close() }
        guard template.isTemplate else {
            throw CLIError.refused(file: source, reason: "is not a template: a linked clone reads through its base, so writing to the base later would corrupt the clone; \(suggestion)")
        }
        let h = template.header
        var o = CreateOptions(size: h.size)
        o.clusterSize = Int(h.clusterSize)
        o.extendedL2 = h.extendedL2
        o.compressionType = h.compressionType
        o.backingFile = backingName(for: source, clone: destination)
        o.backingFormat = .qcow2
        o.unsafeBacking = true  // already opened and checked above; not opened twice
        try Qcow2Image.create(path: destination, options: o)
    }

    /// The backing file name a clone at `clone` records for `template`: the template's file
    /// name alone when both are in one folder (symbolic links resolved), else its absolute,
    /// resolved path. A template in a Ceph pool is recorded by its whole `rbd:` name, conf
    /// and user included, which QEMU needs (it resolves no relative name under an RBD image).
    static func backingName(for template: String, clone: String) -> String {
        if !Storage.isFile(template) { return (try? RBDName(parsing: template))?.description ?? template }
        let real = BackingChain.realPath(template)
        let cloneReal = BackingChain.realPath(clone)
        func folder(_ p: String) -> String { p.lastIndex(of: "/").map { String(p[..<$0]) } ?? "." }
        func name(_ p: String) -> String { p.lastIndex(of: "/").map { String(p[p.index(after: $0)...]) } ?? p }
        if folder(real) == folder(cloneReal) { return name(real) }
        return real
    }
}
