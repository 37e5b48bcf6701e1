/// An RBD image named the way QEMU names one: `rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=USER]`,
/// also `rbd:POOL/NAMESPACE/IMAGE`, with any other `key=value` given to librados as a
/// configuration option (`:mon_host=127.0.0.1:3300`), as QEMU does. `\:` and `\@` escape a
/// colon or an at sign inside a part.
public struct RBDName: Sendable, Hashable, CustomStringConvertible {
    public var pool: String
    public var namespace: String
    public var image: String
    /// The image snapshot to open (read-only), or nil for the image itself.
    public var snapshot: String?
    /// The ceph.conf to read; nil reads Ceph's default search path.
    public var conf: String?
    /// The Ceph user, without `client.` (nil: `admin`, or what `CEPH_ARGS` says).
    public var id: String?
    /// Other librados options, in the order given.
    public var options: [(String, String)]

    public static let prefix = "rbd:"

    /// True when `name` names an RBD image rather than a file.
    public static func isRBD(_ name: String) -> Bool { name.hasPrefix(prefix) }

    public init(pool: String, namespace: String = "", image: String, snapshot: String? = nil,
                conf: String? = nil, id: String? = nil, options: [(String, String)] = []) {
        self.pool = pool
        self.namespace = namespace
        self.image = image
        self.snapshot = snapshot
        self.conf = conf
        self.id = id
        self.options = options
    }

    /// Parses `rbd:…`; a malformed name is refused with what is wrong.
    public init(parsing name: String) throws {
        guard Self.isRBD(name) else { throw Self.bad(name, "does not start with 'rbd:'") }
        let parts = Self.split(String(name.dropFirst(Self.prefix.count)), on: ":")
        guard let spec = parts.first, !spec.isEmpty else { throw Self.bad(name, "names no pool and image (rbd:POOL/IMAGE)") }
        let at = Self.split(spec, on: "@")
        guard at.count <= 2 else { throw Self.bad(name, "has more than one '@'") }
        let path = Self.split(at[0], on: "/")
        guard path.count == 2 || path.count == 3, path.allSatisfy({ !$0.isEmpty }) else {
            throw Self.bad(name, "must name POOL/IMAGE or POOL/NAMESPACE/IMAGE")
        }
        pool = Self.unescape(path[0])
        namespace = path.count == 3 ? Self.unescape(path[1]) : ""
        image = Self.unescape(path[path.count - 1])
        snapshot = at.count == 2 ? Self.unescape(at[1]) : nil
        if snapshot == "" { throw Self.bad(name, "has an empty snapshot name after '@'") }
        conf = nil
        id = nil
        options = []
        for option in parts.dropFirst() {
            let kv = Self.split(option, on: "=")
            guard kv.count == 2, !kv[0].isEmpty else { throw Self.bad(name, "has an option '\(option)' that is not key=value") }
            let key = Self.unescape(kv[0]), value = Self.unescape(kv[1])
            switch key {
            case "conf": conf = value
            case "id": id = value
            default: options.append((key, value))
            }
        }
    }

    /// Parses a pool (`rbd:POOL[/NAMESPACE][:key=value…]`), for listing it: the result names
    /// no image (`image` is empty).
    public init(parsingPool name: String) throws {
        // The same grammar with a placeholder image, so options and escapes parse alike.
        let parts = Self.split(String(name.dropFirst(Self.prefix.count)), on: ":")
        guard Self.isRBD(name), let spec = parts.first, !spec.isEmpty, !spec.contains("@") else {
            throw Self.bad(name, "does not name a pool (rbd:POOL or rbd:POOL/NAMESPACE)")
        }
        let rest = parts.dropFirst().map { ":" + $0 }.joined()
        self = try RBDName(parsing: Self.prefix + spec + "/-" + rest)
        image = ""
    }

    /// The image `image` in this name's pool and namespace, with its settings.
    public func sibling(_ image: String) -> RBDName {
        var n = self
        n.image = image
        n.snapshot = nil
        return n
    }

    /// The name spelled back, options included (what a backing file name records).
    public var description: String {
        var s = Self.prefix + Self.escape(pool) + "/"
        if !namespace.isEmpty { s += Self.escape(namespace) + "/" }
        s += Self.escape(image)
        if let snapshot { s += "@" + Self.escape(snapshot) }
        if let conf { s += ":conf=" + Self.escape(conf) }
        if let id { s += ":id=" + Self.escape(id) }
        for (k, v) in options { s += ":" + Self.escape(k) + "=" + Self.escape(v) }
        return s
    }

    /// Pool, namespace, image and snapshot only: one image whatever the options that reach it.
    public var canonical: String {
        var n = self
        n.conf = nil
        n.id = nil
        n.options = []
        return n.description
    }

    /// Which cluster connection serves this name (the same conf, user and options share one).
    var clusterKey: String {
        ([conf ?? "", id ?? ""] + options.map { "\($0)=\($1)" }).joined(separator: "\u{1}")
    }

    /// Another image named relative to this one: an `rbd:` name as is, but taking this one's
    /// conf, user and options when it gives none; any other name is an image in the same pool
    /// and namespace.
    public func resolve(_ other: String) throws -> RBDName {
        var n: RBDName
        if Self.isRBD(other) {
            n = try RBDName(parsing: other)
        } else {
            n = self
            n.snapshot = nil
            let at = Self.split(other, on: "@")
            n.image = Self.unescape(at[0])
            n.snapshot = at.count > 1 ? Self.unescape(at[1]) : nil
            guard !n.image.isEmpty, !n.image.contains("/") else {
                throw Self.bad(other, "is not an image name in pool '\(pool)' (a backing file of an RBD image is an rbd: name or an image in the same pool)")
            }
            return n
        }
        if n.conf == nil && n.id == nil && n.options.isEmpty {
            n.conf = conf
            n.id = id
            n.options = options
        }
        return n
    }

    static func bad(_ name: String, _ why: String) -> StrataError {
        .invalidOption(path: name, reason: "not an RBD image name: it \(why)")
    }

    /// Splits on `separator` where it is not escaped by a backslash (escapes are kept).
    static func split(_ s: String, on separator: Character) -> [String] {
        var parts: [String] = []
        var current = ""
        var escaped = false
        for c in s {
            if escaped { current.append(c); escaped = false; continue }
            if c == "\\" { current.append(c); escaped = true; continue }
            if c == separator { parts.append(current); current = ""; continue }
            current.append(c)
        }
        parts.append(current)
        return parts
    }

    static func unescape(_ s: String) -> String {
        var out = ""
        var escaped = false
        for c in s {
            if !escaped && c == "\\" { escaped = true; continue }
            out.append(c)
            escaped = false
        }
        return out
    }

    static func escape(_ s: String) -> String {
        var out = ""
        for c in s {
            if c == ":" || c == "@" || c == "\\" { out.append("\\") }
            out.append(c)
        }
        return out
    }

    public static func == (a: RBDName, b: RBDName) -> Bool { a.description == b.description }
    public func hash(into h: inout Hasher) { h.combine(description) }
}
