import ArgumentParser
import Strata

#if canImport(Glibc)
import Glibc
#endif

/// `strata snapshot`: internal snapshots, in qemu-img's spelling (`-l`, `-c`, `-a`, `-d`)
/// or in words (`list`, `create`, `revert`, `delete`), offline on a file or online through a
/// server's control socket (`--server`).
struct Snapshot: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List, create, revert to or delete internal snapshots.",
        discussion: """
            Forms:
              strata snapshot list [--output human|json] FILE      (also: -l FILE, or just FILE)
              strata snapshot create FILE NAME                     (also: -c NAME FILE)
              strata snapshot revert FILE NAME                     (also: -a NAME FILE, apply)
              strata snapshot delete FILE NAME                     (also: -d NAME FILE)
              strata snapshot create|list|delete --server SOCKET EXPORT [NAME]
              strata snapshot external --server SOCKET EXPORT OVERLAY

            external (live, through a server's control socket) puts a new qcow2 OVERLAY on \
            top of the served file and serves the overlay from then on; the old file stays \
            read-only and stable. Offline, that is 'strata create -f qcow2 -b FILE -F FMT OVERLAY'. \
            A snapshot copies the L1 table and adds a reference to every cluster the disk \
            uses: no guest data is copied, and later writes copy shared clusters on write. \
            NAME is looked up as an id first, then as a name. The list shows, per snapshot, \
            EXCLUSIVE: the bytes only that snapshot holds, which deleting it frees. \
            Snapshots are the qcow2 snapshot table, so qemu-img lists, applies and deletes \
            ours and we do theirs. A served image is locked: snapshot it through the \
            server's control socket (strata serve --control SOCKET) with --server.
            """)

    @OptionGroup var format: FormatOption
    @OptionGroup var forceShare: ForceShareOption
    @OptionGroup var output: OutputOption
    @OptionGroup var quiet: QuietOption

    @Flag(name: .customShort("l"), help: "List the snapshots (the default).")
    var list = false
    @Option(name: .customShort("c"), help: ArgumentHelp("Create a snapshot named NAME.", valueName: "name"))
    var create: [String] = []
    @Option(name: .customShort("a"), help: ArgumentHelp("Apply (revert to) the snapshot NAME.", valueName: "name"))
    var apply: [String] = []
    @Option(name: .customShort("d"), help: ArgumentHelp("Delete the snapshot NAME.", valueName: "name"))
    var delete: [String] = []
    @Option(name: .customLong("server"), help: ArgumentHelp("Act on a served image through this control socket.", valueName: "socket"))
    var server: String?

    @Argument(help: ArgumentHelp("[list|create|revert|delete] FILE [NAME] (EXPORT with --server).", valueName: "words"))
    var words: [String] = []

    enum Verb: String {
        case list, create, revert, delete, external
    }

    /// What was asked: the verb, the file (or export) and the snapshot name.
    func request() throws -> (verb: Verb, target: String, name: String?) {
        // Like qemu-img, one action flag, given once.
        let flagged: [(Verb, String?)] = (list ? [(.list, "")] : []) + create.map { (.create, $0) }
            + apply.map { (.revert, $0) } + delete.map { (.delete, $0) }
        guard flagged.count <= 1 else { throw ValidationError("give only one of -l, -c, -a and -d, once") }
        if let (verb, name) = flagged.first {
            guard !words.isEmpty else { throw ValidationError("missing the image file") }
            guard words.count == 1 else { throw ValidationError("unexpected arguments after the file: \(words.dropFirst().joined(separator: " "))") }
            return (verb, words[0], verb == .list ? nil : name)
        }
        var rest = words
        var verb = Verb.list
        if let first = rest.first, let v = Verb(rawValue: first) ?? (first == "apply" ? .revert : nil) {
            verb = v
            rest.removeFirst()
        }
        let what = server == nil ? "image file" : "export name"
        if verb == .list, words.count > 1, words.first.map({ Verb(rawValue: $0) == nil }) ?? false {
            throw ValidationError("'\(words[0])' is not an action: expected list, create, revert (or apply), delete or external")
        }
        switch (verb, rest.count) {
        case (.list, 1): return (verb, rest[0], nil)
        case (.list, 0): throw ValidationError("missing the \(what)")
        case (.list, _): throw ValidationError("'list' takes one \(what), got \(rest.count) arguments")
        case (_, 2): return (verb, rest[0], rest[1])
        case (_, 0): throw ValidationError("missing the \(what) and the snapshot name: strata snapshot \(verb.rawValue) FILE NAME")
        case (_, 1): throw ValidationError("missing the snapshot name: strata snapshot \(verb.rawValue) \(rest[0]) NAME")
        default: throw ValidationError("'\(verb.rawValue)' takes the \(what) and the snapshot name, got \(rest.count) arguments")
        }
    }

    mutating func validate() throws {
        let r = try request()
        if server == nil && r.verb == .external {
            throw ValidationError("external snapshots are taken live through a server (--server SOCKET); offline, create the overlay: strata create -f qcow2 -b \(r.target) -F qcow2 OVERLAY")
        }
        if server != nil && r.verb == .revert {
            throw ValidationError("revert is offline only (the disk under a running guest would change); stop the server, or take an external snapshot")
        }
        if server != nil && format.format != nil { throw ValidationError("-f does not apply with --server") }
        if forceShare.forceShare && r.verb != .list { throw ValidationError("-U (--force-share) only applies to list") }
        if let name = r.name, name.isEmpty { throw ValidationError("the snapshot name is empty") }
    }

    func run() throws {
        let r = try request()
        if let server {
            print(try ControlClient.snapshot(server: server, verb: r.verb.rawValue, export: r.target, name: r.name,
                                             json: output.output == .json), terminator: "")
            return
        }
        let device = try ImageChain.open(r.target, format: format.format, writable: r.verb != .list,
                                         forceShare: forceShare.forceShare)
        defer { try? device.close() }
        guard let q = device as? Qcow2Image else {
            throw CLIError.refused(file: r.target, reason: "raw images have no internal snapshots (convert to qcow2 first)")
        }
        switch r.verb {
        case .list:
            if let e = q.snapshotTableError { throw e }
            let listing = SnapshotListing(q.snapshots, exclusive: try q.snapshotUsage())
            // Like qemu-img, nothing at all for an image without snapshots.
            if output.output == .json { print(listing.json.pretty) } else if !q.snapshots.isEmpty { print(listing.human, terminator: "") }
        case .create: try q.createSnapshot(name: r.name!)
        case .revert: try q.revertToSnapshot(r.name!)
        case .delete: try q.deleteSnapshot(r.name!)
        case .external: break  // refused in validate()
        }
        try q.close()
    }
}

/// A snapshot table as qemu-img prints it (`snapshot -l`, `info`), with the bytes each
/// snapshot holds alone when known.
struct SnapshotListing {
    let records: [SnapshotRecord]
    /// Bytes only that snapshot holds, in the records' order (nil: not computed).
    let exclusive: [UInt64]?

    init(_ records: [SnapshotRecord], exclusive: [UInt64]?) {
        self.records = records
        self.exclusive = exclusive
    }

    /// Pads `s` to `w` bytes, as C's `%-Ns` (left) and `%Ns` do.
    private static func pad(_ s: String, _ w: Int, left: Bool = false) -> String {
        let fill = String(repeating: " ", count: max(0, w - s.utf8.count))
        return left ? s + fill : fill + s
    }

    /// QEMU's `bdrv_snapshot_dump` columns, then EXCLUSIVE when known.
    var human: String {
        // QEMU's bdrv_snapshot_dump: "%-10s%-17s%8s%20s%13s%11s" for the header,
        // "%-9s %-16s %8s%20s%13s%11s" for each row.
        var s = "Snapshot list:\n" + Self.pad("ID", 10, left: true) + Self.pad("TAG", 17, left: true) + Self.pad("VM SIZE", 8)
            + Self.pad("DATE", 20) + Self.pad("VM CLOCK", 13) + Self.pad("ICOUNT", 11)
            + (exclusive == nil ? "" : Self.pad("EXCLUSIVE", 11)) + "\n"
        for (i, r) in records.enumerated() {
            var t = time_t(r.dateSeconds)
            var tm = tm()
            localtime_r(&t, &tm)
            var date = [CChar](repeating: 0, count: 32)
            _ = strftime(&date, date.count, "%Y-%m-%d %H:%M:%S", &tm)
            let secs = r.vmClockNanoseconds / 1_000_000_000
            let clock = HumanFormat.c("%02d:%02d:%02d.%03d", Int32(secs / 3600), Int32((secs / 60) % 60), Int32(secs % 60),
                                      Int32((r.vmClockNanoseconds / 1_000_000) % 1000))
            let icount = r.icount.map { String($0) } ?? ""
            s += Self.pad(r.id, 9, left: true) + " " + Self.pad(r.name, 16, left: true) + " " + Self.pad(HumanFormat.size(r.vmStateSize), 8)
                + Self.pad(String(cString: date), 20) + Self.pad(clock, 13) + Self.pad(icount, 11)
                + (exclusive.map { Self.pad(HumanFormat.size($0[i]), 11) } ?? "") + "\n"
        }
        return s
    }

    /// One entry as QEMU's `SnapshotInfo`, plus `exclusive-bytes` when known.
    func json(_ i: Int) -> JSONValue {
        let r = records[i]
        var fields: [(String, JSONValue)] = []
        if let icount = r.icount { fields.append(("icount", .uint(icount))) }
        fields += [
            ("vm-clock-nsec", .uint(r.vmClockNanoseconds % 1_000_000_000)),
            ("name", .string(r.name)),
            ("date-sec", .uint(UInt64(r.dateSeconds))),
            ("date-nsec", .uint(UInt64(r.dateNanoseconds))),
            ("vm-clock-sec", .uint(r.vmClockNanoseconds / 1_000_000_000)),
            ("id", .string(r.id)),
            ("vm-state-size", .uint(r.vmStateSize)),
        ]
        if let exclusive { fields.append(("exclusive-bytes", .uint(exclusive[i]))) }
        return .object(fields)
    }

    var json: JSONValue { .array(records.indices.map(json)) }
}
