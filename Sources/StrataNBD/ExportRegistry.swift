#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Logging
import Strata
import Synchronization

/// Why the registry refused a change.
public enum ExportRegistryError: Error, Equatable, CustomStringConvertible {
    /// An export of that name is already served.
    case duplicateName(String)
    /// No export of that name is served.
    case noSuchExport(String)
    /// The name is longer than a client could ask for (``NBDLimits/maxStringLength`` bytes).
    case nameTooLong(name: String, bytes: Int)
    /// The server has stopped and closed its images.
    case closed

    public var description: String {
        switch self {
        case .duplicateName(let name): return "an export named '\(name)' is already served"
        case .noSuchExport(let name): return "no export named '\(name)'"
        case .nameTooLong(let name, let bytes):
            return "export name '\(name.prefix(32))…' is \(bytes) bytes, longer than \(NBDLimits.maxStringLength)"
        case .closed: return "the server has stopped"
        }
    }
}

/// The exports a server offers, which may change while it runs, and the owner of their images.
///
/// The handshake asks the registry on every option (`NBD_OPT_LIST`, `INFO`, `GO`,
/// `EXPORT_NAME`), so a client always sees the current set. The first export is the default
/// one, reached with an empty name. Requests never touch the registry: a connection in
/// transmission holds its ``Export`` directly.
///
/// Ownership of devices: a device handed to the registry (inside an export given to
/// ``init(_:logger:)`` or ``add(_:)``, or opened by ``open(_:options:discard:description:)``)
/// belongs to it from then on, and nobody else closes it. The registry counts each device's
/// users: the listed exports that serve it, and the connections in transmission on any of
/// them (each holds an ``ExportLease``). When the count falls to zero (the last export naming
/// it was removed and the last connection using it has finished its requests), the registry
/// flushes and closes the device on its own queue, never on the caller's thread (which may
/// be an event loop). ``closeAll()``, the server's teardown, closes whatever is left.
///
/// Thread-safe: one `Mutex` guards the state; closing happens outside it.
public final class ExportRegistry: Sendable {
    /// One open device and who uses it.
    private struct DeviceUse {
        let device: any BlockDevice
        /// How the device is named in logs: its file, or the first export that served it.
        let label: String
        /// The key it was opened under by ``ExportRegistry/open(_:options:discard:description:)``.
        var pathKey: String?
        /// What it was opened from, for `query-exports` (nil for a device handed in).
        var origin: Origin?
        /// Listed exports serving it.
        var exports = 0
        /// Connections in transmission on one of its exports.
        var leases = 0
    }

    /// A connection's lease: the export it serves and how to tell it the export is gone.
    private struct Holder {
        let export: Export
        let onRemoved: @Sendable () -> Void
    }

    private struct State {
        var exports: [Export]
        var devices: [ObjectIdentifier: DeviceUse] = [:]
        /// Device opened from each key (see `open`), so a file is opened once per server.
        var paths: [String: ObjectIdentifier] = [:]
        var leases: [Int: Holder] = [:]
        var nextLease = 1
        var closed = false
        /// The first failure of a close done on the closer queue, reported by `closeAll()`.
        var closeError: Error?
    }

    private let state: Mutex<State>
    /// Closes devices that fell out of use while the server runs, one at a time.
    private let closer = DispatchQueue(label: "strata.nbd.export-closer")
    private let logger: Logger
    /// Writable images opened by ``open(_:options:discard:description:)`` are served through
    /// a ``SwitchableDevice``, so a live external snapshot can swap their file (set when the
    /// server has a control socket).
    public let switchable: Bool

    /// A registry serving `exports` in this order; it takes ownership of their devices.
    /// Names must be unique.
    public init(_ exports: [Export] = [], switchable: Bool = false,
                logger: Logger = Logger(label: "strata.nbd.exports", factory: { _ in SwiftLogNoOpLogHandler() })) {
        self.switchable = switchable
        var s = State(exports: [])
        for export in exports {
            precondition(!s.exports.contains { $0.name == export.name }, "export name '\(export.name)' is used twice")
            s.exports.append(export)
            s.devices[ObjectIdentifier(export.device), default: DeviceUse(device: export.device, label: "export '\(export.name)'")]
                .exports += 1
        }
        self.state = Mutex(s)
        self.logger = logger
    }

    /// The exports served now, in the order `NBD_OPT_LIST` reports them.
    public var exports: [Export] { state.withLock { $0.exports } }

    /// The export a client means by `name`: an exact match, or the first export for "".
    public func lookup(_ name: String) -> Export? {
        state.withLock { s in
            if let e = s.exports.first(where: { $0.name == name }) { return e }
            return name.isEmpty ? s.exports.first : nil
        }
    }

    /// Serves `export` from now on, after the ones already listed. The registry takes
    /// ownership of its device (which may be one another export already serves). On failure
    /// the caller keeps the device.
    public func add(_ export: Export) throws {
        let bytes = export.name.utf8.count
        guard bytes <= NBDLimits.maxStringLength else { throw ExportRegistryError.nameTooLong(name: export.name, bytes: bytes) }
        try state.withLock { s throws(ExportRegistryError) in
            guard !s.closed else { throw .closed }
            guard !s.exports.contains(where: { $0.name == export.name }) else { throw .duplicateName(export.name) }
            s.exports.append(export)
            s.devices[ObjectIdentifier(export.device), default: DeviceUse(device: export.device, label: "export '\(export.name)'")]
                .exports += 1
        }
        logger.debug("export '\(export.name)' added")
    }

    /// Stops serving the export `name`: new handshakes no longer find it; connections using it
    /// answer further requests with `NBD_ESHUTDOWN`, finish the ones in flight and close. Its
    /// image is flushed and closed once no export or connection uses it any more.
    public func remove(_ name: String) throws {
        let (holders, unused) = try state.withLock { s throws(ExportRegistryError) -> ([@Sendable () -> Void], DeviceUse?) in
            guard let i = s.exports.firstIndex(where: { $0.name == name }) else { throw .noSuchExport(name) }
            let export = s.exports.remove(at: i)
            let holders = s.leases.values.filter { $0.export === export }.map(\.onRemoved)
            let unused = Self.drop(ObjectIdentifier(export.device), in: &s) { $0.exports -= 1 }
            return (holders, unused)
        }
        logger.info("export '\(name)' removed; \(holders.count) connection(s) to finish")
        for tell in holders { tell() }
        if let unused { closeLater(unused) }
    }

    /// Flushes and closes every device still open and refuses any further change. Call it
    /// once no connection is left (the server does, in ``NBDServer/wait()``). Waits for closes
    /// already under way; throws the first close failure, here or earlier (each is logged).
    public func closeAll() throws {
        let left = state.withLock { s -> [DeviceUse] in
            s.closed = true
            s.exports = []
            s.leases = [:]
            s.paths = [:]
            defer { s.devices = [:] }
            return Array(s.devices.values)
        }
        waitForPendingCloses()
        for use in left { close(use) }
        if let error = state.withLock({ $0.closeError }) { throw error }
    }

    // MARK: Leases

    /// Holds `export`'s device open for a connection entering transmission; `onRemoved` runs
    /// (on the remover's thread) if the export is removed while the lease lives. Nil when the
    /// export is no longer listed: it was removed during the handshake.
    func lease(_ export: Export, onRemoved: @escaping @Sendable () -> Void) -> ExportLease? {
        let id: Int? = state.withLock { s in
            guard !s.closed, s.exports.contains(where: { $0 === export }) else { return nil }
            let id = s.nextLease
            s.nextLease += 1
            s.leases[id] = Holder(export: export, onRemoved: onRemoved)
            s.devices[ObjectIdentifier(export.device)]?.leases += 1
            return id
        }
        return id.map { ExportLease(export: export, id: $0, registry: self) }
    }

    /// Ends lease `id` (from ``ExportLease``'s deinit).
    fileprivate func release(_ id: Int) {
        let unused = state.withLock { s -> DeviceUse? in
            guard let holder = s.leases.removeValue(forKey: id) else { return nil }
            return Self.drop(ObjectIdentifier(holder.export.device), in: &s) { $0.leases -= 1 }
        }
        if let unused { closeLater(unused) }
    }

    // MARK: Closing

    /// Applies `change` to a device's counts; when nobody uses it any more, forgets it and
    /// returns it for closing.
    private static func drop(_ id: ObjectIdentifier, in s: inout State, _ change: (inout DeviceUse) -> Void) -> DeviceUse? {
        guard var use = s.devices[id] else { return nil }
        change(&use)
        guard use.exports == 0 && use.leases == 0 else {
            s.devices[id] = use
            return nil
        }
        s.devices[id] = nil
        if let key = use.pathKey { s.paths[key] = nil }
        return use
    }

    /// Returns once every device that fell out of use so far has been closed.
    func waitForPendingCloses() {
        closer.sync {}
    }

    private func closeLater(_ use: DeviceUse) {
        closer.async { [self] in close(use) }
    }

    private func close(_ use: DeviceUse) {
        do {
            try use.device.close()
            logger.debug("closed \(use.label)")
        } catch {
            logger.error("closing \(use.label) failed: \(error)")
            state.withLock { if $0.closeError == nil { $0.closeError = error } }
        }
    }
}

/// A connection's hold on the export it serves: while it lives, the export's device stays
/// open. Non-copyable, and released exactly once, when it is dropped: the transmission handler
/// drops it when the connection has closed and its last request has finished.
struct ExportLease: ~Copyable, Sendable {
    /// The export held.
    let export: Export
    fileprivate let id: Int
    fileprivate let registry: ExportRegistry

    deinit { registry.release(id) }
}

// MARK: - Opening images

extension ExportRegistry {
    /// What to export: a name, an image file, and whether writes go to a throwaway overlay.
    public struct Entry: Sendable, Equatable {
        /// The export name.
        public var name: String
        /// The image file.
        public var path: String
        /// Serve the file through a temporary qcow2 overlay (`qemu-nbd --snapshot`): writes
        /// land in the overlay, which is deleted when the server closes it; the file never
        /// changes. Ignored for read-only opens, which cannot change the file anyway.
        public var snapshot: Bool

        public init(name: String, path: String, snapshot: Bool = false) {
            self.name = name
            self.path = path
            self.snapshot = snapshot
        }
    }

    /// A registry serving `entries` in order (see ``open(_:options:discard:description:)``).
    /// On failure, the images already opened are closed again.
    public static func open(_ entries: [Entry], options: OpenOptions, discard: DiscardMode, description: String?,
                            switchable: Bool = false, logger: Logger) throws -> ExportRegistry {
        let registry = ExportRegistry(switchable: switchable, logger: logger)
        do {
            for entry in entries {
                _ = try registry.open(entry, options: options, discard: discard, description: description)
            }
        } catch {
            try? registry.closeAll()
            throw error
        }
        return registry
    }

    /// Opens `entry`'s image and adds it as an export. A file already open in this registry
    /// (symlinks resolved; the same `snapshot` choice) is not opened again: the new export
    /// shares its device, options included, so the image is opened, locked and cached once
    /// per server.
    @discardableResult
    public func open(_ entry: Entry, options: OpenOptions, discard: DiscardMode, description: String?) throws -> Export {
        let snapshot = entry.snapshot && options.writable
        let key = Self.key(path: entry.path, overlay: snapshot, internalSnapshot: options.snapshot)
        let origin = Origin(file: Self.realPath(entry.path), snapshot: options.snapshot, temporaryOverlay: snapshot)
        func export(_ device: any BlockDevice) -> Export {
            Export(name: entry.name, description: description, device: device, readOnly: !options.writable,
                   discard: discard)
        }
        func insert(_ s: inout State, _ device: any BlockDevice) throws(ExportRegistryError) -> Export {
            guard !s.closed else { throw .closed }
            guard !s.exports.contains(where: { $0.name == entry.name }) else { throw .duplicateName(entry.name) }
            let e = export(device)
            s.exports.append(e)
            s.devices[ObjectIdentifier(device), default: DeviceUse(device: device, label: key, pathKey: key, origin: origin)]
                .exports += 1
            s.paths[key] = ObjectIdentifier(device)
            return e
        }
        let bytes = entry.name.utf8.count
        guard bytes <= NBDLimits.maxStringLength else { throw ExportRegistryError.nameTooLong(name: entry.name, bytes: bytes) }

        // Already open: share it. Checked and counted under one lock, so it cannot be closed
        // in between.
        let shared = try state.withLock { s throws(ExportRegistryError) -> Export? in
            guard let id = s.paths[key], let use = s.devices[id] else {
                guard !s.closed else { throw .closed }
                guard !s.exports.contains(where: { $0.name == entry.name }) else { throw .duplicateName(entry.name) }
                return nil
            }
            return try insert(&s, use.device)
        }
        if let shared {
            logger.debug("export '\(entry.name)' added (\(key), already open)")
            return shared
        }

        // Open outside the lock (it reads the image), then add, unless the world changed meanwhile.
        let device: any BlockDevice
        if snapshot {
            device = try SnapshotOverlay.open(over: entry.path, options: options)
        } else if switchable && options.writable {
            device = try SwitchableDevice(path: entry.path, options: options)
        } else {
            device = try openImage(path: entry.path, options: options)
        }
        do {
            let added = try state.withLock { s throws(ExportRegistryError) -> Export in
                if let id = s.paths[key], let use = s.devices[id] {
                    // Another caller opened the same file first: use theirs (ours is closed below).
                    return try insert(&s, use.device)
                }
                return try insert(&s, device)
            }
            if added.device !== device { try? device.close() }
            logger.debug("export '\(entry.name)' added (\(key))")
            return added
        } catch {
            try? device.close()
            throw error
        }
    }

    /// The key a file is opened under: its real path, marked when it is served through a
    /// throwaway overlay (`--snapshot`) or as an internal snapshot's state.
    static func key(path: String, overlay: Bool = false, internalSnapshot: String? = nil) -> String {
        if let name = internalSnapshot { return "internal snapshot '\(name)' of " + realPath(path) }
        return (overlay ? "snapshot of " : "") + realPath(path)
    }

    static func realPath(_ path: String) -> String {
        if !Storage.isFile(path) { return BackingChain.realPath(path) }
        guard let resolved = realpath(path, nil) else { return path }
        defer { free(resolved) }
        return String(cString: resolved)
    }
}

// MARK: - For the control socket

extension ExportRegistry {
    /// What an image was opened from.
    public struct Origin: Sendable, Equatable {
        /// The file (symlinks resolved); for a switchable device, the file it served first.
        public var file: String
        /// The internal snapshot whose state it serves, if any.
        public var snapshot: String?
        /// Served through a throwaway overlay (`--snapshot`).
        public var temporaryOverlay: Bool
    }

    /// What `query-exports` reports about one export.
    public struct ExportInfo: Sendable {
        public var export: Export
        /// What its image was opened from, or nil for a device handed in ready-made.
        public var origin: Origin?
        /// Connections in transmission on this export.
        public var clients: Int
    }

    /// The exports served now, in order, with their image's key and their client count.
    public var exportInfo: [ExportInfo] {
        state.withLock { s in
            s.exports.map { e in
                ExportInfo(export: e, origin: s.devices[ObjectIdentifier(e.device)]?.origin,
                           clients: s.leases.values.filter { $0.export === e }.count)
            }
        }
    }

    /// The device opened for `path` (writable or not; not an overlay or snapshot view), if
    /// one is open.
    public func device(openedFrom path: String) -> (any BlockDevice)? {
        let key = Self.key(path: path)
        return state.withLock { s in s.paths[key].flatMap { s.devices[$0]?.device } }
    }

    /// True when an export serves the state of internal snapshot `name` of `path`.
    public func servesSnapshot(_ name: String, of path: String) -> Bool {
        let key = Self.key(path: path, internalSnapshot: name)
        return state.withLock { $0.paths[key] != nil }
    }

    /// Records that `device` now serves the file `newPath` (after a live external snapshot):
    /// opening the old file again opens it anew, and opening `newPath` shares `device`.
    public func deviceMoved(_ device: any BlockDevice, to newPath: String) {
        let id = ObjectIdentifier(device)
        let newKey = Self.key(path: newPath)
        state.withLock { s in
            guard var use = s.devices[id] else { return }
            if let old = use.pathKey, s.paths[old] == id { s.paths[old] = nil }
            use.pathKey = newKey
            s.devices[id] = use
            s.paths[newKey] = id
        }
    }
}
