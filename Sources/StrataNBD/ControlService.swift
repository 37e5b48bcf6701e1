#if canImport(Glibc)
import Glibc
#endif
import Logging
import Synchronization
import Strata

/// Bounds on what a control client may send (see spec/control.md).
public enum ControlLimits {
    /// Longest request line, newline excluded; a longer one is answered with an error and the
    /// connection is closed (the rest of the line cannot be framed).
    public static let maxLineBytes = 64 << 10
    /// Deepest nesting of arrays and objects in a request.
    public static let maxDepth = 16
    /// Longest string argument (a file path or a name), in bytes: PATH_MAX.
    public static let maxStringBytes = 4096
    /// Longest internal snapshot name, in bytes (qcow2 stores it with a 16-bit length; QEMU
    /// users know names far shorter).
    public static let maxSnapshotNameBytes = 1024
    /// Control connections open at once; more are closed at once.
    public static let maxConnections = 16
}

/// A failed control command, as the reply's `error` carries it (QMP's error classes).
public struct ControlError: Error, Equatable, CustomStringConvertible {
    /// QMP's error class: `GenericError`, or `CommandNotFound` for an unknown command.
    public var errorClass: String
    /// One line for a human.
    public var desc: String

    public init(_ desc: String, class errorClass: String = "GenericError") {
        self.errorClass = errorClass
        self.desc = desc
    }

    public var description: String { desc }
}

/// The control socket's commands: one request line in, one reply line out. Knows nothing of
/// sockets (``ControlServer`` frames lines and calls ``handle(line:)`` on a thread that may
/// block); it changes the server's ``ExportRegistry`` and calls the engine.
///
/// Commands that change something run one at a time (`serial`): an internal snapshot, an
/// external switch and an export being added never overlap.
public final class ControlService: Sendable {
    /// How exports added through the socket are opened, unless a request says otherwise.
    public struct Defaults: Sendable {
        public var options: OpenOptions
        public var discard: DiscardMode
        public var description: String?
        /// What `query-version` reports.
        public var version: String
        /// Serve added files through a throwaway overlay, as the server's `--snapshot` does.
        public var temporaryOverlay: Bool

        public init(options: OpenOptions, discard: DiscardMode = .unmap, description: String? = nil,
                    version: String = "unknown", temporaryOverlay: Bool = false) {
            self.options = options
            self.temporaryOverlay = temporaryOverlay
            self.discard = discard
            self.description = description
            self.version = version
        }
    }

    /// The commands, as `execute` names them.
    public static let commands = ["query-version", "query-commands", "query-exports", "block-export-add",
                                  "block-export-del", "snapshot-create", "snapshot-delete", "snapshot-list",
                                  "snapshot-external"]

    let registry: ExportRegistry
    let defaults: Defaults
    let logger: Logger
    /// Held while a command that changes something runs (blocking work, never on an event loop).
    private let serial = Mutex<Void>(())

    public init(registry: ExportRegistry, defaults: Defaults, logger: Logger) {
        self.registry = registry
        self.defaults = defaults
        self.logger = logger
    }

    /// Answers one request line (without its newline) with one reply line (without its
    /// newline). Never throws: every failure is an error reply.
    public func handle(line: some Collection<UInt8>) -> String {
        var id: ControlJSON?
        let result: Result<ControlJSON, ControlError>
        do {
            let request: ControlJSON
            do { request = try ControlJSON.parse(line) } catch { throw ControlError("\(error)") }
            guard case .object = request else { throw ControlError("a request must be a JSON object") }
            id = request["id"]
            guard let command = request["execute"]?.stringValue else {
                throw ControlError("a request needs \"execute\": \"COMMAND\"")
            }
            let arguments = request["arguments"] ?? .object([])
            guard case .object = arguments else { throw ControlError("\"arguments\" must be an object") }
            result = .success(try run(command, Arguments(arguments)))
        } catch let e as ControlError {
            result = .failure(e)
        } catch {
            result = .failure(ControlError("\(error)"))
        }
        var reply: [(String, ControlJSON)]
        switch result {
        case .success(let value): reply = [("return", value)]
        case .failure(let e):
            reply = [("error", .object([("class", .string(e.errorClass)), ("desc", .string(e.desc))]))]
        }
        if let id { reply.append(("id", id)) }
        return ControlJSON.object(reply).text
    }

    private func run(_ command: String, _ a: Arguments) throws -> ControlJSON {
        switch command {
        case "query-version":
            try a.only([])
            return .object([("package", .string("strata")), ("version", .string(defaults.version))])
        case "query-commands":
            try a.only([])
            return .array(Self.commands.map { .object([("name", .string($0))]) })
        case "query-exports":
            try a.only([])
            return .array(registry.exportInfo.map(describe))
        case "block-export-add":
            try a.only(["name", "file", "format", "read-only", "snapshot"])
            return try serial.withLock { _ in try addExport(a) }
        case "block-export-del":
            try a.only(["name"])
            let name = try a.string("name")
            try registry.remove(name)
            logger.info("control: export '\(name)' removed")
            return .object([])
        case "snapshot-create", "snapshot-delete", "snapshot-list":
            try a.only(command == "snapshot-list" ? ["export"] : ["export", "name"])
            return try serial.withLock { _ in try internalSnapshot(command, a) }
        case "snapshot-external":
            try a.only(["export", "overlay"])
            return try serial.withLock { _ in try externalSnapshot(a) }
        default:
            throw ControlError("the command \(command.prefix(64)) has not been found", class: "CommandNotFound")
        }
    }

    // MARK: Exports

    private func describe(_ info: ExportRegistry.ExportInfo) -> ControlJSON {
        let e = info.export
        var fields: [(String, ControlJSON)] = [("name", .string(e.name))]
        if let sw = e.device as? SwitchableDevice {
            let f = sw.file
            fields += [("file", .string(f.path)), ("format", .string(f.format.rawValue))]
        } else if let origin = info.origin {
            fields.append(("file", .string(origin.file)))
            if let snap = origin.snapshot { fields.append(("snapshot", .string(snap))) }
            if origin.temporaryOverlay { fields.append(("temporary-overlay", .bool(true))) }
            fields.append(("format", .string(Self.format(of: e.device))))
        } else {
            fields.append(("format", .string(Self.format(of: e.device))))
        }
        fields += [("size", .int(Int64(clamping: e.size))), ("read-only", .bool(e.isReadOnly)),
                   ("writable-file-switch", .bool(e.device is SwitchableDevice && !e.isReadOnly)),
                   ("clients", .int(Int64(info.clients)))]
        return .object(fields)
    }

    static func format(of device: any BlockDevice) -> String {
        if device is Qcow2Image { return "qcow2" }
        if device is RawImage { return "raw" }
        if let sw = device as? SwitchableDevice { return sw.file.format.rawValue }
        return "unknown"
    }

    private func addExport(_ a: Arguments) throws -> ControlJSON {
        let name = try a.string("name"), file = try a.string("file")
        var options = defaults.options
        if let f = try a.optionalString("format") {
            guard let format = ImageFormat(rawValue: f) else { throw ControlError("unknown format '\(f.prefix(64))' (expected qcow2 or raw)") }
            options.format = format
        }
        if try a.optionalBool("read-only") == true { options.writable = false }
        let snapshot = try a.optionalString("snapshot", limit: ControlLimits.maxSnapshotNameBytes)
        let entry = ExportRegistry.Entry(name: name, path: file, snapshot: defaults.temporaryOverlay && snapshot == nil)
        let export: Export
        if let snapshot {
            // An internal snapshot's state: read-only, and never rewritten while the image is
            // served (its clusters are shared, so writes copy them). When this server has the
            // image open, its own writer holds the write lock, hence force-share, and the view
            // is opened while that image is still, so its header and tables are read whole.
            // Any other file is opened read-only with the usual locks.
            options.writable = false
            options.snapshot = snapshot
            if let served = registry.device(openedFrom: file) {
                options.forceShare = true
                export = try withQcow2(served, file: file) { q in
                    try q.quiesce {
                        try registry.open(entry, options: options, discard: defaults.discard, description: defaults.description)
                    }
                }
            } else {
                export = try registry.open(entry, options: options, discard: defaults.discard, description: defaults.description)
            }
        } else {
            export = try registry.open(entry, options: options, discard: defaults.discard, description: defaults.description)
        }
        logger.info("control: export '\(name)' added (\(file)\(snapshot.map { ", snapshot '\($0)'" } ?? ""))")
        return .object([("name", .string(export.name)), ("size", .int(Int64(clamping: export.size))),
                        ("read-only", .bool(export.isReadOnly))])
    }

    private func export(_ a: Arguments) throws -> Export {
        let name = try a.string("export")
        guard let e = registry.exportInfo.first(where: { $0.export.name == name })?.export else {
            throw ControlError("\(ExportRegistryError.noSuchExport(name))")
        }
        return e
    }

    /// Runs `body` on the qcow2 image behind `device` (the current one, for a switchable
    /// device; a switch waits until `body` returns).
    private func withQcow2<T>(_ device: any BlockDevice, file: String, _ body: (Qcow2Image) throws -> T) throws -> T {
        func on(_ d: any BlockDevice) throws -> T {
            guard let q = d as? Qcow2Image else {
                throw ControlError("\(file) is not a qcow2 image: internal snapshots need qcow2")
            }
            return try body(q)
        }
        if let sw = device as? SwitchableDevice { return try sw.withCurrent(on) }
        return try on(device)
    }

    /// The file an export serves, for messages.
    private func fileName(_ e: Export) -> String {
        if let sw = e.device as? SwitchableDevice { return sw.file.path }
        return registry.exportInfo.first { $0.export === e }?.origin?.file ?? "export '\(e.name)'"
    }

    // MARK: Snapshots

    private func internalSnapshot(_ command: String, _ a: Arguments) throws -> ControlJSON {
        let e = try export(a)
        let file = fileName(e)
        switch command {
        case "snapshot-create":
            let name = try a.string("name", limit: ControlLimits.maxSnapshotNameBytes)
            guard !e.isReadOnly else { throw ControlError("export '\(e.name)' is read-only: cannot take a snapshot") }
            let record = try withQcow2(e.device, file: file) { try $0.createSnapshot(name: name) }
            logger.info("control: snapshot '\(name)' of export '\(e.name)' created (id \(record.id))")
            return Self.json(record, usage: nil)
        case "snapshot-delete":
            let name = try a.string("name", limit: ControlLimits.maxSnapshotNameBytes)
            guard !e.isReadOnly else { throw ControlError("export '\(e.name)' is read-only: cannot delete a snapshot") }
            let record = try withQcow2(e.device, file: file) { q -> SnapshotRecord in
                if let r = q.snapshots.first(where: { $0.id == name || $0.name == name }),
                   registry.servesSnapshot(r.name, of: file) || registry.servesSnapshot(r.id, of: file) {
                    throw ControlError("snapshot '\(name)' is exported: remove that export first")
                }
                return try q.deleteSnapshot(name)
            }
            logger.info("control: snapshot '\(record.name)' of export '\(e.name)' deleted")
            return Self.json(record, usage: nil)
        default:
            let (records, usage) = try withQcow2(e.device, file: file) { q in
                let records = q.snapshots
                return (records, try q.snapshotUsage())
            }
            return .array(records.enumerated().map { i, r in Self.json(r, usage: i < usage.count ? usage[i] : nil) })
        }
    }

    /// A snapshot as the socket reports it: the fields `qemu-img snapshot -l` and QMP's
    /// `SnapshotInfo` show, plus the bytes only this snapshot holds.
    static func json(_ r: SnapshotRecord, usage: UInt64?) -> ControlJSON {
        var fields: [(String, ControlJSON)] = [
            ("id", .string(r.id)), ("name", .string(r.name)),
            ("vm-state-size", .int(Int64(clamping: r.vmStateSize))),
            ("date-sec", .int(Int64(r.dateSeconds))), ("date-nsec", .int(Int64(r.dateNanoseconds))),
            ("vm-clock-sec", .int(Int64(clamping: r.vmClockNanoseconds / 1_000_000_000))),
            ("vm-clock-nsec", .int(Int64(r.vmClockNanoseconds % 1_000_000_000))),
        ]
        if let icount = r.icount { fields.append(("icount", .int(Int64(clamping: icount)))) }
        if let size = r.diskSize { fields.append(("disk-size", .int(Int64(clamping: size)))) }
        if let usage { fields.append(("exclusive-bytes", .int(Int64(clamping: usage)))) }
        return .object(fields)
    }

    private func externalSnapshot(_ a: Arguments) throws -> ControlJSON {
        let e = try export(a)
        let overlay = try a.string("overlay")
        guard !e.isReadOnly, let sw = e.device as? SwitchableDevice else {
            throw ControlError("export '\(e.name)' cannot switch files: it is read-only or served through a temporary overlay")
        }
        let old = try sw.switchToOverlay(overlay)
        registry.deviceMoved(sw, to: overlay)
        logger.info("control: export '\(e.name)' switched to overlay \(overlay); \(old) is now read-only")
        return .object([("export", .string(e.name)), ("overlay", .string(overlay)), ("backing", .string(old))])
    }
}

/// A request's `arguments`, with bounded, typed access.
struct Arguments {
    let fields: [(String, ControlJSON)]

    init(_ json: ControlJSON) { fields = json.objectValue ?? [] }

    /// Refuses arguments other than `allowed`.
    func only(_ allowed: Set<String>) throws {
        if let bad = fields.first(where: { !allowed.contains($0.0) }) {
            throw ControlError("unexpected argument '\(bad.0.prefix(64))'")
        }
    }

    func value(_ key: String) -> ControlJSON? { fields.first { $0.0 == key }?.1 }

    func string(_ key: String, limit: Int = ControlLimits.maxStringBytes) throws -> String {
        guard let s = try optionalString(key, limit: limit) else { throw ControlError("missing argument '\(key)'") }
        return s
    }

    func optionalString(_ key: String, limit: Int = ControlLimits.maxStringBytes) throws -> String? {
        guard let v = value(key) else { return nil }
        guard let s = v.stringValue else { throw ControlError("argument '\(key)' must be a string") }
        guard !s.isEmpty else { throw ControlError("argument '\(key)' is empty") }
        guard s.utf8.count <= limit else { throw ControlError("argument '\(key)' is longer than \(limit) bytes") }
        guard !s.utf8.contains(0) else { throw ControlError("argument '\(key)' contains a NUL byte") }
        return s
    }

    func optionalBool(_ key: String) throws -> Bool? {
        guard let v = value(key) else { return nil }
        guard let b = v.boolValue else { throw ControlError("argument '\(key)' must be true or false") }
        return b
    }
}
