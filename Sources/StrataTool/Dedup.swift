import ArgumentParser
import Strata

/// `strata dedup [-f qcow2] [-q] [--output human|json] FILE`
struct Dedup: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Share identical clusters of an existing qcow2 image, offline.",
        discussion: """
            Every data cluster of the active disk whose content is stored elsewhere in the \
            image is mapped to that cluster (its refcount raised) and its own cluster freed; \
            all-zero clusters become zero entries (compat 1.1). Two clusters are shared only \
            after a byte-for-byte comparison. The image stays ordinary qcow2: qemu-img \
            checks it clean, and a later write into a shared cluster (by Strata or QEMU) \
            copies it on write. Snapshots keep their data. The image is then marked for \
            inline dedup (compat 1.1, unless compress=on) and its dedup index file \
            (FILE.dedup-index) is rebuilt from what is stored. Dedup pays off with small \
            clusters (cluster_size=4096): with 64 KiB clusters, identical files rarely \
            line up. A served image is locked: stop the server first.
            """)

    @OptionGroup var format: FormatOption
    @OptionGroup var output: OutputOption
    @OptionGroup var quiet: QuietOption

    @Argument(help: "The image file (qcow2).")
    var file: String

    func run() throws {
        let device = try ImageChain.open(file, format: format.format, writable: true)
        defer { try? device.close() }
        guard let q = device as? Qcow2Image else {
            throw CLIError.refused(file: file, reason: "raw images cannot share clusters (convert to qcow2 first)")
        }
        let r = try q.deduplicate()
        try q.close()
        let cs = q.header.clusterSize
        switch output.output {
        case .json:
            print(JSONValue.object([
                ("scanned-clusters", .uint(r.scanned)), ("shared-clusters", .uint(r.shared)),
                ("zeroed-clusters", .uint(r.zeroed)), ("refcount-full", .uint(r.refcountFull)),
                ("cluster-size", .uint(cs)), ("bytes-released", .uint((r.shared + r.zeroed) * cs)),
            ]).pretty)
        case .human:
            guard !quiet.quiet else { return }
            print("\(file): \(r.scanned) data clusters scanned; \(r.shared) now share an identical cluster, "
                  + "\(r.zeroed) all-zero became zero clusters: \(HumanFormat.size((r.shared + r.zeroed) * cs)) released"
                  + (r.refcountFull > 0 ? " (\(r.refcountFull) left alone: refcount at its maximum)" : ""))
        }
    }
}
