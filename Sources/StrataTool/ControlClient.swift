import Strata
import StrataNBD

#if canImport(Glibc)
import Glibc
#endif

/// The client side of a server's control socket (`strata serve --control PATH`): connects,
/// sends one request line, reads one reply line. Used by `strata export` and by
/// `strata snapshot … --server PATH`.
///
/// Failures are ``CLIError/message(_:)`` lines that say what to do: no socket, nothing
/// listening, not a Strata server, or the server's own error text.
enum ControlClient {
    /// Longest reply accepted (a list of many exports or snapshots stays far below it).
    static let maxReplyBytes = 16 << 20
    /// How long to wait for a reply: a snapshot of a busy image drains its requests first.
    static let replyTimeoutSeconds = 300

    /// Runs `command` with `arguments` on the server at `server`; returns the reply's `return`.
    static func execute(server: String, _ command: String, _ arguments: [(String, ControlJSON)] = []) throws -> ControlJSON {
        let fd = try connect(server)
        defer { close(fd) }
        let request = ControlJSON.object([("execute", .string(command)), ("arguments", .object(arguments))]).text + "\n"
        try send(fd, request, server: server)
        let line = try receiveLine(fd, server: server)
        let notStrata = CLIError.message("\(server): the reply is not from a Strata control socket")
        guard let reply = try? ControlJSON.parse(line), case .object = reply else { throw notStrata }
        if let value = reply["return"] { return value }
        if let error = reply["error"], let desc = error["desc"]?.stringValue {
            throw CLIError.message("\(server): \(desc)")
        }
        throw notStrata
    }

    private static func connect(_ path: String) throws -> Int32 {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else {
            throw CLIError.message("\(path): socket path is longer than \(NBDServerError.maxUnixPathBytes) bytes")
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw CLIError.message("\(path): cannot create a socket: \(String(cString: strerror(errno)))") }
        var timeout = timeval(tv_sec: replyTimeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else {
            let e = errno
            close(fd)
            switch e {
            case ENOENT:
                throw CLIError.message("\(path): no such control socket (start the server with 'strata serve --control \(path)')")
            case ECONNREFUSED:
                throw CLIError.message("\(path): nothing is listening (a server that has stopped left it?)")
            case ENOTSOCK:
                throw CLIError.message("\(path): not a socket")
            default:
                throw CLIError.message("\(path): cannot connect: \(String(cString: strerror(e)))")
            }
        }
        return fd
    }

    private static func send(_ fd: Int32, _ text: String, server: String) throws {
        var bytes = Array(text.utf8)[...]
        while !bytes.isEmpty {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw CLIError.message("\(server): cannot send: \(String(cString: strerror(errno)))") }
            bytes = bytes.dropFirst(n)
        }
    }

    private static func receiveLine(_ fd: Int32, server: String) throws -> [UInt8] {
        var data: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n < 0 && errno == EINTR { continue }
            if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) {
                throw CLIError.message("\(server): no reply within \(replyTimeoutSeconds) s")
            }
            guard n > 0 else {
                throw CLIError.message("\(server): the server closed the connection without a reply (not a Strata control socket?)")
            }
            if data.isEmpty, chunk[0..<n].starts(with: Array("NBDMAGIC".utf8)) {
                throw CLIError.message("\(server): this is an NBD socket; give the server's --control socket")
            }
            if let nl = chunk[0..<n].firstIndex(of: UInt8(ascii: "\n")) {
                data += chunk[0..<nl]
                return data
            }
            data += chunk[0..<n]
            guard data.count <= maxReplyBytes else { throw CLIError.message("\(server): reply longer than \(maxReplyBytes) bytes") }
        }
    }

    /// `path` made absolute against this process's working directory: the server resolves
    /// relative names against its own.
    static func absolute(_ path: String) -> String {
        if path.hasPrefix("/") { return path }
        guard let cwd = getcwd(nil, 0) else { return path }
        defer { free(cwd) }
        return String(cString: cwd) + "/" + path
    }

    // MARK: Snapshots

    /// `strata snapshot VERB --server PATH EXPORT [NAME]`, for the `snapshot` command to call:
    /// `verb` is `create` (NAME required), `delete` (NAME: id or name), `list`, or `external`
    /// (NAME: the new overlay file, made absolute here). Returns what to print (may be empty;
    /// ends with a newline when not empty). With `json`, the server's reply as one JSON line.
    static func snapshot(server: String, verb: String, export: String, name: String?, json: Bool) throws -> String {
        func needName(_ what: String) throws -> String {
            guard let name, !name.isEmpty else { throw CLIError.message("snapshot \(verb) --server needs EXPORT and \(what)") }
            return name
        }
        let reply: ControlJSON
        switch verb {
        case "create":
            reply = try execute(server: server, "snapshot-create", [("export", .string(export)), ("name", .string(try needName("NAME")))])
        case "delete":
            reply = try execute(server: server, "snapshot-delete", [("export", .string(export)), ("name", .string(try needName("NAME")))])
        case "list":
            reply = try execute(server: server, "snapshot-list", [("export", .string(export))])
            let listing = snapshotListing(reply.arrayValue ?? [])
            // As offline (and qemu-img): nothing at all when there are no snapshots.
            return json ? listing.json.pretty + "\n" : (listing.records.isEmpty ? "" : listing.human)
        case "external":
            reply = try execute(server: server, "snapshot-external",
                                [("export", .string(export)), ("overlay", .string(absolute(try needName("OVERLAY"))))])
        default:
            throw CLIError.message("unknown snapshot action '\(verb)' (expected create, list, delete or external)")
        }
        // Like qemu-img snapshot -c/-d: nothing on success, unless JSON was asked for.
        return json ? reply.text + "\n" : ""
    }

    /// The server's snapshot list as the offline `strata snapshot list` shows it (the same
    /// columns and JSON fields, exclusive bytes included).
    static func snapshotListing(_ records: [ControlJSON]) -> SnapshotListing {
        var out: [SnapshotRecord] = []
        var exclusive: [UInt64] = []
        for r in records {
            func u(_ key: String) -> UInt64 { UInt64(clamping: r[key]?.intValue ?? 0) }
            var record = SnapshotRecord.new(id: r["id"]?.stringValue ?? "", name: r["name"]?.stringValue ?? "",
                                            l1TableOffset: 0, l1Size: 0, diskSize: u("disk-size"),
                                            dateSeconds: UInt32(clamping: u("date-sec")),
                                            dateNanoseconds: UInt32(clamping: u("date-nsec")))
            record.vmStateSize = u("vm-state-size")
            record.vmClockNanoseconds = u("vm-clock-sec") &* 1_000_000_000 &+ u("vm-clock-nsec")
            // icount lives in the extra data, bytes 16..<24, big-endian; all ones when absent.
            let icount = r["icount"]?.intValue.map { UInt64(clamping: $0) } ?? .max
            if record.extraData.count >= 24 {
                for i in 0..<8 { record.extraData[16 + i] = UInt8(truncatingIfNeeded: icount >> (56 - 8 * UInt64(i))) }
            }
            out.append(record)
            exclusive.append(u("exclusive-bytes"))
        }
        return SnapshotListing(out, exclusive: records.allSatisfy { $0["exclusive-bytes"] != nil } ? exclusive : nil)
    }
}
