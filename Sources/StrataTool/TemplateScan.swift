import Strata

#if canImport(Glibc)
import Glibc
#endif

/// What `template list` finds in folders or RBD pools: their templates, the qcow2 images
/// whose backing chain reaches each of them, and how many guest bytes each clone holds or
/// reads from the template. Only images that start with the qcow2 magic are opened (nothing
/// is probed as raw).
struct TemplateScan {
    struct CloneEntry {
        var filename: String
        /// 1 for a direct clone, 2 for an overlay on a clone, ...
        var depth: Int
        /// Bytes the file occupies; nil where the store cannot say (RBD).
        var diskSize: UInt64?
        /// Guest bytes held by the clone or an image between it and the template (data or zero clusters).
        var ownBytes: UInt64
        /// Guest bytes the clone reads from the template's data clusters.
        var sharedBytes: UInt64
    }

    struct TemplateEntry {
        var filename: String
        var virtualSize: UInt64
        var diskSize: UInt64?
        /// Guest bytes the template holds as data (not zero clusters).
        var dataBytes: UInt64
        var clones: [CloneEntry] = []
        var sharedBytesTotal: UInt64 { clones.reduce(0) { $0 + $1.sharedBytes } }
    }

    struct Skipped {
        var filename: String
        var reason: String
    }

    let directory: String
    /// Every folder or pool scanned (`directory` is the first).
    let places: [String]
    private(set) var templates: [TemplateEntry] = []
    private(set) var skipped: [Skipped] = []

    /// One qcow2 file of the folder, as its header describes it.
    private struct Image {
        var path: String
        var real: String
        var isTemplate: Bool
        var backingReal: String?
    }

    /// The qcow2 magic, "QFI\xfb".
    static let magic: [UInt8] = [0x51, 0x46, 0x49, 0xfb]

    init(directory: String) throws { try self.init(places: [directory]) }

    /// Scans folders (their regular files) and RBD pools (`rbd:POOL[/NAMESPACE][:conf=…]`,
    /// their images): a template in one place and its clones in another are found.
    init(places: [String]) throws {
        self.directory = places.first ?? "."
        self.places = places
        var candidates: [String] = []
        for place in places {
            if RBDName.isRBD(place) {
                do { candidates += try Storage.listPool(place) } catch {
                    var why = "\(error)"
                    if case StrataError.storageUnavailable(_, let r) = error { why = r }
                    throw CLIError.refused(file: place, reason: "cannot list the pool: \(why)")
                }
                continue
            }
            for name in try Self.entries(of: place) {
                let path = place == "." ? name : place.hasSuffix("/") ? place + name : place + "/" + name
                var st = stat()
                guard stat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { continue }
                candidates.append(path)
            }
        }
        var images: [Image] = []
        for path in candidates {
            let head: [UInt8]
            do { head = try Self.firstBytes(path, count: 4) } catch {
                skipped.append(Skipped(filename: path, reason: "\(error)"))
                continue
            }
            guard head == Self.magic else { continue }
            do {
                let q = try FullCopy.openAlone(path, forceShare: true)
                defer { try? q.close() }
                images.append(Image(path: path, real: BackingChain.realPath(path), isTemplate: q.isTemplate,
                                    backingReal: q.backingFilePath.map(BackingChain.realPath)))
            } catch {
                skipped.append(Skipped(filename: path, reason: Self.reason(error, path: path)))
            }
        }
        // One entry per file: a symbolic link to an image of the folder is not a second image
        // (the file under its own name is kept over a link to it).
        func isLink(_ p: String) -> Bool {
            guard Storage.isFile(p) else { return false }
            var st = stat()
            return lstat(p, &st) == 0 && (st.st_mode & S_IFMT) == S_IFLNK
        }
        var kept: [String: Int] = [:]
        var unique: [Image] = []
        for image in images {
            if let i = kept[image.real] {
                if isLink(unique[i].path), !isLink(image.path) { unique[i] = image }
                continue
            }
            kept[image.real] = unique.count
            unique.append(image)
        }
        images = unique
        let byReal = Dictionary(images.map { ($0.real, $0) }, uniquingKeysWith: { a, _ in a })
        var index: [String: Int] = [:]
        for image in images where image.isTemplate {
            do {
                let q = try FullCopy.openAlone(image.path, forceShare: true)
                defer { try? q.close() }
                var data: UInt64 = 0
                try q.forEachExtent(at: 0, length: q.size) { e in
                    if e.depth == 1, !e.status.contains(.zero) { data += e.length }
                    return true
                }
                index[image.real] = templates.count
                templates.append(TemplateEntry(filename: image.path, virtualSize: q.size,
                                               diskSize: ImageChain.allocatedBytes(image.path), dataBytes: data))
            } catch {
                skipped.append(Skipped(filename: image.path, reason: Self.reason(error, path: image.path)))
            }
        }
        // Clones: follow each image's backing names through the folder to a template.
        for image in images where !image.isTemplate && image.backingReal != nil {
            var depth = 1
            var next = image.backingReal
            var seen: Set<String> = [image.real]
            while let n = next, index[n] == nil, let below = byReal[n], !below.isTemplate,
                  seen.insert(n).inserted, depth < Limits.maxBackingChainDepth {
                depth += 1
                next = below.backingReal
            }
            guard let n = next, let t = index[n] else { continue }
            do {
                let clone = try Self.measure(image.path, depth: depth)
                templates[t].clones.append(clone)
            } catch {
                skipped.append(Skipped(filename: image.path, reason: Self.reason(error, path: image.path)))
            }
        }
    }

    /// Opens a clone with its chain and sorts its extents by the image that holds them.
    private static func measure(_ path: String, depth: Int) throws -> CloneEntry {
        let device = try openImage(path: path, options: OpenOptions(format: .qcow2, forceShare: true))
        defer { try? device.close() }
        var own: UInt64 = 0, shared: UInt64 = 0
        try device.forEachExtent(at: 0, length: device.size) { e in
            if e.depth >= 1 && Int(e.depth) <= depth { own += e.length }
            if Int(e.depth) == depth + 1, !e.status.contains(.zero) { shared += e.length }
            return true
        }
        return CloneEntry(filename: path, depth: depth, diskSize: ImageChain.allocatedBytes(path),
                          ownBytes: own, sharedBytes: shared)
    }

    /// The folder's entry names, sorted.
    private static func entries(of directory: String) throws -> [String] {
        guard let d = opendir(directory) else {
            throw CLIError.refused(file: directory, reason: "cannot list the folder: \(String(cString: strerror(errno)))")
        }
        defer { closedir(d) }
        var names: [String] = []
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != ".", name != ".." { names.append(name) }
        }
        return names.sorted()
    }

    private static func firstBytes(_ path: String, count: Int) throws -> [UInt8] {
        if !Storage.isFile(path) {
            let storage = try Storage.open(path, mode: .readOnly)
            defer { storage.close() }
            var bytes = [UInt8](repeating: 0, count: count)
            let n = try bytes.withUnsafeMutableBytes { try storage.read(into: $0, at: 0) }
            return Array(bytes.prefix(n))
        }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw CLIError.message("cannot open: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: count)
        let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, 0) }
        guard n >= 0 else { throw CLIError.message("cannot read: \(String(cString: strerror(errno)))") }
        return Array(bytes.prefix(n))
    }

    /// An error's text without the file name it may already start with.
    private static func reason(_ error: any Error, path: String) -> String {
        let text = "\(error)"
        return text.hasPrefix(path + ": ") ? String(text.dropFirst(path.count + 2)) : text
    }

    var json: JSONValue {
        func clone(_ c: CloneEntry) -> JSONValue {
            var fields: [(String, JSONValue)] = [("filename", .string(c.filename)), ("depth", .uint(UInt64(c.depth)))]
            if let d = c.diskSize { fields.append(("disk-size", .uint(d))) }
            fields += [("own-bytes", .uint(c.ownBytes)), ("shared-bytes", .uint(c.sharedBytes))]
            return .object(fields)
        }
        func template(_ t: TemplateEntry) -> JSONValue {
            var fields: [(String, JSONValue)] = [("filename", .string(t.filename)), ("virtual-size", .uint(t.virtualSize))]
            if let d = t.diskSize { fields.append(("disk-size", .uint(d))) }
            fields += [("data-bytes", .uint(t.dataBytes)), ("shared-bytes-total", .uint(t.sharedBytesTotal)),
                       ("clones", .array(t.clones.map(clone)))]
            return .object(fields)
        }
        let skippedJSON: [JSONValue] = skipped.map { .object([("filename", .string($0.filename)), ("reason", .string($0.reason))]) }
        return .object([
            ("directory", .string(directory)),
            ("places", .array(places.map { .string($0) })),
            ("templates", .array(templates.map(template))),
            ("skipped", .array(skippedJSON)),
        ])
    }

    private static func size(_ bytes: UInt64?) -> String { bytes.map(HumanFormat.size) ?? "unavailable" }

    var human: String {
        if templates.isEmpty { return "no templates in \(places.joined(separator: ", "))\n" }
        var s = ""
        for t in templates {
            s += "template: \(t.filename)\n"
            s += "    virtual size: \(HumanFormat.size(t.virtualSize)), disk size: \(Self.size(t.diskSize)), data: \(HumanFormat.size(t.dataBytes))\n"
            s += "    clones: \(t.clones.count), shared in total: \(HumanFormat.size(t.sharedBytesTotal))\n"
            for c in t.clones {
                let depth = c.depth == 1 ? "" : " (depth \(c.depth))"
                s += "    clone: \(c.filename)\(depth): disk size \(Self.size(c.diskSize)), own \(HumanFormat.size(c.ownBytes)), shared \(HumanFormat.size(c.sharedBytes))\n"
            }
        }
        return s
    }
}
