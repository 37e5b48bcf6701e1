import ArgumentParser
import Strata

#if canImport(Glibc)
import Glibc
#endif

/// `strata template create|list`
struct Template: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Make templates (read-only bases for linked clones) and list them with their clones.",
        discussion: """
            A template is a qcow2 image marked with Strata's header extension (QEMU ignores \
            the mark and keeps it) and given file mode 0444. Strata never opens a template \
            for writing, so the linked clones that read through it ('strata clone') stay valid.
            """,
        subcommands: [TemplateCreate.self, TemplateList.self])

    /// `strata template` alone is a mistake, as `strata` alone is (the parser would print
    /// the help and exit 0).
    func run() throws {
        throw ValidationError("no template command given: expected create or list")
    }
}

/// `strata template create [-c | --dedup] [-q] SRC TEMPLATE`
struct TemplateCreate: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create",
        abstract: "Write a compact full copy of an image, marked as a template.",
        discussion: """
            SRC (qcow2 or raw, probed) is read with its whole backing chain flattened; only \
            its current state is copied (internal snapshots are not). Unallocated clusters \
            and clusters that read as zeroes are left out. TEMPLATE is a new qcow2 image \
            (version 3) with SRC's cluster size (64 KiB for raw), no backing file, marked as \
            a template, with file mode 0444. With -c, every cluster holding data is \
            compressed (clusters that do not shrink are stored as they are). With --dedup, each \
            distinct cluster content is stored once: clusters with the same bytes share one \
            host cluster (QEMU reads them as any image; a write to a clone of the template \
            never touches it). -c and --dedup cannot be combined yet. An existing \
            TEMPLATE is never replaced (a template may have clones standing on it). A \
            template of a template is allowed. The copy is made under the name TEMPLATE.partial-PID and renamed when complete, \
            so a template never appears half-written (an interrupted run leaves that file).
            """)

    @Flag(name: .customShort("c"), help: "Compress the template's clusters (with SRC's compression type; zlib for raw), on every core.")
    var compress = false

    @Flag(help: "Store each distinct cluster content once: clusters with the same bytes share one host cluster.")
    var dedup = false

    @OptionGroup var quiet: QuietOption

    @Argument(help: "The image to copy.")
    var source: String

    @Argument(help: "The template to create.")
    var template: String

    mutating func validate() throws {
        if compress && dedup {
            throw ValidationError("-c and --dedup cannot be combined yet: a template is either compressed or deduplicated; choose one")
        }
    }

    func run() throws {
        if Convert.sameFile(source, template) {
            throw CLIError.refused(file: template, reason: "is the source image itself; a template is a new copy")
        }
        try FullCopy.refuseExisting(template, what: "template create")
        let src = try ImageChain.open(source, format: nil)
        defer { try? src.close() }
        // Read-only for everyone (0444): a second guard, for tools that know nothing of the mark.
        try FullCopy.make(from: src, to: template, mode: 0o444, compress: compress, dedup: dedup) { try $0.markAsTemplate() }
        if !quiet.quiet { print("Template '\(template)' created from '\(source)'") }
    }
}

/// `strata template list [--output human|json] DIR`
struct TemplateList: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list",
        abstract: "List the templates in folders or Ceph pools, the linked clones standing on them and the space they share.",
        discussion: """
            Every regular file of each folder (not its subfolders), and every image of each \
            RBD pool named rbd:POOL[/NAMESPACE][:conf=PATH][:id=USER], that starts with the \
            qcow2 magic is looked at (other files are ignored; a file that cannot be read is skipped with a \
            note on stderr). For each template: its virtual size, its size on disk, its data \
            bytes (guest bytes it holds as data), and the qcow2 images of the places whose backing \
            chain reaches it (depth 1 is a direct clone, 2 an overlay on a clone, ...). For \
            each clone: its size on disk, its own bytes (guest bytes the clone and any image \
            between it and the template hold, data or zero clusters) and its shared bytes: \
            the guest bytes it reads from the template's data, which it would have to hold \
            itself as a full copy. The template's shared total is the sum over its clones: \
            the space saved by linking instead of copying. All sizes are in bytes in JSON \
            (keys: directory (the first place), places, templates[filename, virtual-size, disk-size, data-bytes, \
            shared-bytes-total, clones[filename, depth, disk-size, own-bytes, shared-bytes]], \
            skipped[filename, reason]).
            """)

    @OptionGroup var output: OutputOption

    @Argument(help: "The folders or RBD pools to scan (a template in one and its clones in another are found).")
    var places: [String]

    func validate() throws {
        if places.isEmpty { throw ValidationError("Missing expected argument '<places> ...': the folder or pool to scan") }
    }

    func run() throws {
        let scan = try TemplateScan(places: places)
        for s in scan.skipped { printError("strata: note: \(s.filename): skipped: \(s.reason)") }
        switch output.output {
        case .json: print(scan.json.pretty)
        case .human: print(scan.human, terminator: "")
        }
    }
}
