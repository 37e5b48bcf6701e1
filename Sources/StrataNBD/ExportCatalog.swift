#if canImport(Glibc)
import Glibc
#endif
import Strata

/// The exports of one server, in command-line order. The first one is also the default
/// export, reached with an empty name.
public struct ExportCatalog: Sendable {
    /// All exports, in the order `NBD_OPT_LIST` reports them.
    public let exports: [Export]

    public init(_ exports: [Export]) {
        self.exports = exports
    }

    /// The export a client means by `name`: an exact match, or the first export for "".
    public func lookup(_ name: String) -> Export? {
        if let e = exports.first(where: { $0.name == name }) { return e }
        return name.isEmpty ? exports.first : nil
    }
}

// MARK: - Opening

extension ExportCatalog {
    /// What to export: a name and an image file.
    public struct Entry: Sendable, Equatable {
        public var name: String
        public var path: String
        public init(name: String, path: String) {
            self.name = name
            self.path = path
        }
    }

    /// Opens every image once and builds the catalog. Entries naming the same file (after
    /// resolving symlinks) share one open device, so the image is opened, locked and cached
    /// once per server. On failure, the images already opened are closed again.
    public static func open(_ entries: [Entry], options: OpenOptions, discard: DiscardMode,
                            description: String?) throws -> ExportCatalog {
        var devices: [String: any BlockDevice] = [:]
        var exports: [Export] = []
        do {
            for entry in entries {
                let key = realPath(entry.path)
                let device: any BlockDevice
                if let shared = devices[key] {
                    device = shared
                } else {
                    device = try openImage(path: entry.path, options: options)
                    devices[key] = device
                }
                exports.append(Export(name: entry.name, description: description, device: device,
                                      readOnly: !options.writable, discard: discard))
            }
        } catch {
            for device in devices.values { try? device.close() }
            throw error
        }
        return ExportCatalog(exports)
    }

    private static func realPath(_ path: String) -> String {
        guard let resolved = realpath(path, nil) else { return path }
        defer { free(resolved) }
        return String(cString: resolved)
    }
}
