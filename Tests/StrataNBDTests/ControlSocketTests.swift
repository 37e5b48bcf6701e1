import Foundation
import Strata
import XCTest

@testable import StrataNBD

#if canImport(Glibc)
import Glibc
#endif

/// The control socket (`strata serve --control`, spec/control.md): its protocol, exports added
/// and removed while clients do I/O, and live snapshots (internal and external) taken while
/// fio writes with `--verify`.
final class ControlSocketTests: XCTestCase {
    // MARK: Helpers

    /// Sends `text` on a new connection to `path`, half-closes, and returns every reply line.
    private func exchange(_ path: String, _ text: String) throws -> [String] {
        let fd = try connectUnix(path)
        defer { close(fd) }
        let bytes = Array(text.utf8)
        var sent = 0
        while sent < bytes.count {
            let n = bytes[sent...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            guard n > 0 else { break }  // the server may close early (an over-long line)
            sent += n
        }
        shutdown(fd, Int32(SHUT_WR))
        return readLines(fd)
    }

    private func readLines(_ fd: Int32) -> [String] {
        var timeout = timeval(tv_sec: 20, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var data = [UInt8]()
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n <= 0 { break }
            data += chunk[0..<n]
        }
        return String(decoding: data, as: UTF8.self).split(separator: "\n").map(String.init)
    }

    private func connectUnix(_ path: String) throws -> Int32 {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in path.utf8.enumerated() { raw[i] = b }
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else {
            close(fd)
            throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO)
        }
        return fd
    }

    private func json(_ line: String) throws -> ControlJSON { try ControlJSON.parse(line) }

    /// An in-process server whose writable exports can switch files, with a control socket.
    private func startInProcess(_ dir: String, exports: [ExportRegistry.Entry]) throws -> (TestServer, ControlServer) {
        let options = OpenOptions(writable: true)
        let registry = try ExportRegistry.open(exports, options: options, discard: .unmap, description: nil,
                                               switchable: true, logger: testLogger())
        let server = try TestServer(dir: dir, registry: registry)
        let control = ControlServer(path: "\(dir)/ctl.sock",
                                    service: ControlService(registry: registry, defaults: .init(options: options, version: "test"),
                                                            logger: testLogger()),
                                    logger: testLogger())
        try control.start()
        addTeardownBlock { control.stop() }
        return (server, control)
    }

    /// The `strata` binary built next to this test bundle.
    private func strata() throws -> String {
        let exe = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")
        let path = URL(fileURLWithPath: exe).deletingLastPathComponent().appendingPathComponent("strata").path
        guard FileManager.default.isExecutableFile(atPath: path) else {
            XCTFail("the strata binary is not built at \(path): run 'swift build' first")
            throw Peer.PeerMissing(name: "strata")
        }
        return path
    }

    /// `strata serve --socket DIR/nbd.sock --control DIR/ctl.sock ARGS`, once it is listening.
    private func serve(_ dir: String, _ arguments: [String]) throws -> Spawned {
        let server = try Spawned(try strata(), ["serve", "--socket", "\(dir)/nbd.sock", "--control", "\(dir)/ctl.sock"] + arguments,
                                 stderrPath: "\(dir)/serve.log")
        XCTAssertFalse(server.waitForLines(1).isEmpty, "the server started:\n\(server.stderr)")
        return server
    }

    /// fio writing random 4 KiB blocks with `--verify=crc32c` to `[offset, offset+size)` of an
    /// export, in the background.
    private func fio(_ dir: String, export: String, offset: String = "8m", size: String = "56m") throws -> Spawned {
        try Spawned(try Peer.path("fio"), [
            "--name=live", "--ioengine=nbd", "--uri=nbd+unix:///\(export)?socket=\(dir)/nbd.sock",
            "--rw=randwrite", "--bs=4k", "--offset=\(offset)", "--size=\(size)", "--iodepth=8",
            "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", "--randseed=1234",
        ], stderrPath: "\(dir)/fio-\(export).log")
    }

    private func expectFioClean(_ fio: Spawned, file: StaticString = #filePath, line: UInt = #line) {
        let status = fio.waitForExit(timeout: 60)
        let out = fio.lines.joined(separator: "\n")
        XCTAssertEqual(status, 0, "fio succeeded:\n\(out)\n\(fio.stderr)", file: file, line: line)
        XCTAssertFalse(out.contains("verify:") || fio.stderr.contains("verify:"), "fio found no bad block:\n\(out)\n\(fio.stderr)",
                       file: file, line: line)
        XCTAssertTrue(out.contains("err= 0"), "fio reported no error:\n\(out)", file: file, line: line)
    }

    /// Runs `strata ARGS` and asserts it succeeded.
    @discardableResult
    private func expectCLI(_ arguments: [String], file: StaticString = #filePath, line: UInt = #line) throws -> ToolResult {
        let r = try Peer.run(try strata(), arguments)
        XCTAssertEqual(r.status, 0, "strata \(arguments.joined(separator: " ")):\n\(r.transcript)", file: file, line: line)
        return r
    }

    // MARK: Protocol

    func testEveryRequestGetsOneReplyAndBadInputNeverClosesTheConnection() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/a.qcow2", size: "8M")
        let (server, control) = try startInProcess(dir, exports: [.init(name: "a", path: "\(dir)/a.qcow2")])
        let mode = try FileManager.default.attributesOfItem(atPath: control.path)[.posixPermissions] as? Int
        XCTAssertEqual(mode, 0o600, "only the owner may manage the server")

        let replies = try exchange(control.path, """
            {"execute": "query-version", "id": 1}
            not json
            [1, 2]
            {"arguments": {}}
            {"execute": "no-such-command", "id": "x"}
            {"execute": "query-exports", "arguments": {"bogus": 1}, "id": {"n": [1]}}
            {"execute": "block-export-del", "arguments": {"name": 5}}
            {"execute": "block-export-del", "arguments": {"name": "missing"}}
            {"execute": "snapshot-external", "arguments": {"export": "a"}}
            {"execute": "query-exports"}\r
            {"execute": "block-export-add", "arguments": {"name": "b", "file": "\(dir)/none.qcow2"}}
            \(String(repeating: "[", count: 100))
            {"execute": "query-version"}
            """)
        XCTAssertEqual(replies.count, 13, replies.joined(separator: "\n"))
        guard replies.count == 13 else { return }
        let r = try replies.map(json)
        defer { withExtendedLifetime(server) {} }
        XCTAssertEqual(r[0]["return"]?["version"], .string("test"))
        XCTAssertEqual(r[0]["id"], .int(1), "the id comes back")
        XCTAssertEqual(r[1]["error"]?["class"], .string("GenericError"))
        XCTAssertTrue(r[1]["error"]?["desc"]?.stringValue?.contains("invalid JSON") ?? false, replies[1])
        XCTAssertEqual(r[2]["error"]?["desc"], .string("a request must be a JSON object"))
        XCTAssertNotNil(r[3]["error"], "no execute")
        XCTAssertEqual(r[4]["error"]?["class"], .string("CommandNotFound"))
        XCTAssertEqual(r[4]["id"], .string("x"))
        XCTAssertEqual(r[5]["error"]?["desc"], .string("unexpected argument 'bogus'"))
        XCTAssertEqual(r[5]["id"], .object([("n", .array([.int(1)]))]))
        XCTAssertEqual(r[6]["error"]?["desc"], .string("argument 'name' must be a string"))
        XCTAssertEqual(r[7]["error"]?["desc"], .string("no export named 'missing'"))
        XCTAssertEqual(r[8]["error"]?["desc"], .string("missing argument 'overlay'"))
        let exports = try XCTUnwrap(r[9]["return"]?.arrayValue)
        XCTAssertEqual(exports.count, 1)
        XCTAssertEqual(exports.first?["name"], .string("a"))
        XCTAssertEqual(exports.first?["file"], .string(ExportRegistry.realPath("\(dir)/a.qcow2")))
        XCTAssertEqual(exports.first?["format"], .string("qcow2"))
        XCTAssertEqual(exports.first?["size"], .int(8 << 20))
        XCTAssertEqual(exports.first?["read-only"], .bool(false))
        XCTAssertTrue(r[10]["error"]?["desc"]?.stringValue?.contains("none.qcow2") ?? false, replies[10])
        XCTAssertTrue(r[11]["error"]?["desc"]?.stringValue?.contains("nested deeper") ?? false, replies[11])
        XCTAssertNotNil(r[12]["return"], "the connection still answers after all that")
    }

    func testAnOverlongLineIsRefusedAndTheConnectionClosed() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/a.qcow2", size: "8M")
        let (server, control) = try startInProcess(dir, exports: [.init(name: "a", path: "\(dir)/a.qcow2")])
        let long = "{\"execute\": \"query-version\", \"id\": \"" + String(repeating: "x", count: ControlLimits.maxLineBytes) + "\"}\n"
        let replies = try exchange(control.path, long + "{\"execute\": \"query-version\"}\n")
        XCTAssertEqual(replies.count, 1, "one error, then the connection is closed: \(replies.map { $0.prefix(200) })")
        XCTAssertTrue(replies.first?.contains("longer than \(ControlLimits.maxLineBytes) bytes") ?? false)
        // The server is fine.
        XCTAssertEqual(try exchange(control.path, "{\"execute\": \"query-version\"}\n").count, 1)
        try server.stop()
    }

    /// Sends `text` on `fd` and reads `count` reply lines (nil when the server closes first).
    private func request(_ fd: Int32, _ text: String, replies count: Int) -> [String]? {
        let bytes = Array(text.utf8)
        guard bytes.withUnsafeBytes({ Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }) == bytes.count else { return nil }
        var timeout = timeval(tv_sec: 20, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var data = [UInt8]()
        var byte: UInt8 = 0
        var lines: [String] = []
        while lines.count < count {
            guard recv(fd, &byte, 1, 0) == 1 else { return nil }
            if byte == 0x0A { lines.append(String(decoding: data, as: UTF8.self)); data = [] } else { data.append(byte) }
        }
        return lines
    }

    func testAtMostMaxConnectionsControlClientsAreServedAtOnce() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/a.qcow2", size: "8M")
        let (server, control) = try startInProcess(dir, exports: [.init(name: "a", path: "\(dir)/a.qcow2")])
        let query = "{\"execute\": \"query-version\"}\n"
        var open: [Int32] = []
        defer { open.forEach { close($0) } }
        for i in 0..<ControlLimits.maxConnections {
            let fd = try connectUnix(control.path)
            open.append(fd)
            XCTAssertEqual(request(fd, query, replies: 1)?.count, 1, "connection \(i + 1) of \(ControlLimits.maxConnections) is served")
        }
        // One more is accepted by the kernel, then closed by the server without a reply.
        let extra = try connectUnix(control.path)
        XCTAssertNil(request(extra, query, replies: 1), "connection \(ControlLimits.maxConnections + 1) is closed")
        close(extra)
        // A freed slot serves a new client (the count drops once the server sees the close).
        close(open.removeLast())
        var served = false
        for _ in 0..<50 where !served {
            let fd = try connectUnix(control.path)
            served = request(fd, query, replies: 1)?.count == 1
            close(fd)
            if !served { usleep(100_000) }
        }
        XCTAssertTrue(served, "a slot freed by a closed connection is reused")
        try server.stop()
    }

    func testAClientQueueingMoreThanMaxPendingRequestsIsClosed() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/a.qcow2", size: "8M")
        let (server, control) = try startInProcess(dir, exports: [.init(name: "a", path: "\(dir)/a.qcow2")])
        let query = "{\"execute\": \"query-version\"}\n"
        // At the cap, sent in one write before reading anything: every request is answered.
        let atCap = try exchange(control.path, String(repeating: query, count: ControlConnectionHandler.maxPending))
        XCTAssertEqual(atCap.count, ControlConnectionHandler.maxPending)
        // Well past it: the connection is closed before every request is answered.
        let past = try exchange(control.path, String(repeating: query, count: 4 * ControlConnectionHandler.maxPending))
        XCTAssertLessThanOrEqual(past.count, ControlConnectionHandler.maxPending, "closed once more than \(ControlConnectionHandler.maxPending) were queued")
        // The server is fine.
        XCTAssertEqual(try exchange(control.path, query).count, 1)
        try server.stop()
    }

    func testTheSocketFileIsRefusedWhenLiveReplacedWhenStaleRemovedAtStop() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/a.qcow2", size: "8M")
        let (server, control) = try startInProcess(dir, exports: [.init(name: "a", path: "\(dir)/a.qcow2")])
        let registry = ExportRegistry()
        let second = ControlServer(path: control.path,
                                   service: ControlService(registry: registry, defaults: .init(options: OpenOptions()), logger: testLogger()),
                                   logger: testLogger())
        XCTAssertThrowsError(try second.start()) { error in
            XCTAssertEqual(error as? NBDServerError, .cannotListen(.unix(path: control.path), .socketInUse))
        }
        XCTAssertEqual(try exchange(control.path, "{\"execute\": \"query-version\"}\n").count, 1, "the live socket is untouched")
        control.stop()
        XCTAssertFalse(FileManager.default.fileExists(atPath: control.path), "removed at stop")

        // A stale socket (its server is gone) is replaced.
        let stale = "\(dir)/stale.sock"
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in for (i, b) in stale.utf8.enumerated() { raw[i] = b } }
        _ = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        close(fd)
        XCTAssertTrue(FileManager.default.fileExists(atPath: stale))
        let third = ControlServer(path: stale,
                                  service: ControlService(registry: registry, defaults: .init(options: OpenOptions()), logger: testLogger()),
                                  logger: testLogger())
        try third.start()
        XCTAssertEqual(try exchange(stale, "{\"execute\": \"query-exports\"}\n"), ["{\"return\": []}"])
        third.stop()
        try server.stop()
    }

    func testServeRefusesAControlPathItCannotUse() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/a.qcow2", size: "8M")
        let same = try Peer.run(try strata(), ["serve", "--socket", "\(dir)/s.sock", "--control", "\(dir)/s.sock", "\(dir)/a.qcow2"])
        XCTAssertEqual(same.status, 1)
        XCTAssertTrue(same.err.contains("--control needs its own socket path"), same.err)
        let long = "\(dir)/" + String(repeating: "c", count: 120)
        let tooLong = try Peer.run(try strata(), ["serve", "--socket", "\(dir)/s.sock", "--control", long, "\(dir)/a.qcow2"])
        XCTAssertEqual(tooLong.status, 1)
        XCTAssertTrue(tooLong.err.contains("--control path is"), tooLong.err)
        FileManager.default.createFile(atPath: "\(dir)/plain", contents: Data("x".utf8))
        let notSocket = try Peer.run(try strata(), ["serve", "--socket", "\(dir)/s.sock", "--control", "\(dir)/plain", "\(dir)/a.qcow2"],
                                     timeout: 20)
        XCTAssertEqual(notSocket.status, 1, notSocket.transcript)
        XCTAssertTrue(notSocket.err.contains("exists and is not a socket"), notSocket.err)
        XCTAssertEqual(try String(contentsOfFile: "\(dir)/plain", encoding: .utf8), "x", "a file that is not a socket is left alone")
        XCTAssertFalse(FileManager.default.fileExists(atPath: "\(dir)/s.sock"), "the NBD socket is removed again")
        try Peer.expectSuccess("qemu-img", ["check", "\(dir)/a.qcow2"])
    }

    // MARK: External snapshot

    func testAFailedSwitchKeepsServingTheOldFile() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/a.qcow2", size: "8M")
        try makeRaw("\(dir)/taken.qcow2", size: 4096)
        let (server, control) = try startInProcess(dir, exports: [.init(name: "a", path: "\(dir)/a.qcow2")])
        let uri = server.uri("a")
        try Peer.expectSuccess("qemu-io", ["-f", "raw", uri, "-c", "write -P 3 0 64k"])
        for overlay in ["\(dir)/taken.qcow2", "\(dir)/no/such/dir/o.qcow2"] {
            let reply = try json(try exchange(control.path, """
                {"execute": "snapshot-external", "arguments": {"export": "a", "overlay": "\(overlay)"}}\n
                """).first ?? "")
            XCTAssertNotNil(reply["error"], "switching to \(overlay) fails: \(reply.text)")
            try Peer.expectSuccess("qemu-io", ["-f", "raw", uri, "-c", "read -P 3 0 64k", "-c", "write -P 4 64k 64k"])
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: "\(dir)/no/such/dir/o.qcow2"))
        try server.stop()
        try Peer.expectSuccess("qemu-img", ["check", "\(dir)/a.qcow2"])
        let r = try Peer.expectSuccess("qemu-io", ["-f", "qcow2", "\(dir)/a.qcow2", "-c", "read -P 3 0 64k", "-c", "read -P 4 64k 64k"])
        XCTAssertFalse(r.out.contains("Pattern verification failed"), r.out)
    }

    /// libvirt's default snapshot, while fio writes and verifies on the same export: the old
    /// file holds exactly a consistent state (live_snapshot.py), stays unchanged, checks
    /// clean, and is the new overlay's backing file.
    func testExternalSnapshotWhileFioVerifies() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/base.qcow2", size: "64M")
        let server = try serve(dir, ["--export", "disk=\(dir)/base.qcow2"])
        let load = try fio(dir, export: "disk")
        usleep(300_000)
        let script = try Peer.python("live_snapshot.py", ["\(dir)/ctl.sock", "\(dir)/nbd.sock", "disk", "external",
                                                          "\(dir)/overlay.qcow2"], timeout: 60)
        print(script.out)
        XCTAssertTrue(load.process.isRunning, "fio was still writing when the snapshot was taken and checked")
        expectFioClean(load)
        let list = try Peer.run(try strata(), ["export", "list", "--server", "\(dir)/ctl.sock"])
        XCTAssertTrue(list.out.contains("disk\t\(ExportRegistry.realPath("\(dir)/overlay.qcow2"))\tqcow2"), list.transcript)
        XCTAssertEqual(server.stop(), 0, server.stderr)

        for image in ["base", "overlay"] { try Peer.expectSuccess("qemu-img", ["check", "\(dir)/\(image).qcow2"]) }
        let info = try Peer.expectSuccess("qemu-img", ["info", "--output=json", "\(dir)/overlay.qcow2"])
        let top = try JSONSerialization.jsonObject(with: Data(info.out.utf8)) as? [String: Any]
        XCTAssertEqual(top?["backing-filename"] as? String, ExportRegistry.realPath("\(dir)/base.qcow2"))
        XCTAssertEqual(top?["backing-filename-format"] as? String, "qcow2")
        XCTAssertEqual(top?["virtual-size"] as? Int, 64 << 20)
    }

    // MARK: Internal snapshot

    func testInternalSnapshotWhileFioVerifies() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/disk.qcow2", size: "64M")
        let server = try serve(dir, ["\(dir)/disk.qcow2"])
        let load = try fio(dir, export: "disk")
        usleep(300_000)
        let script = try Peer.python("live_snapshot.py", ["\(dir)/ctl.sock", "\(dir)/nbd.sock", "disk", "internal", "live1"],
                                     timeout: 60)
        print(script.out)
        XCTAssertTrue(load.process.isRunning, "fio was still writing when the snapshot was taken and checked")
        expectFioClean(load)

        // A snapshot served as an export cannot be deleted; once unexported it can.
        let ctl = "\(dir)/ctl.sock"
        let file = ExportRegistry.realPath("\(dir)/disk.qcow2")
        let replies = try exchange(ctl, """
            {"execute": "snapshot-create", "arguments": {"export": "disk", "name": "second"}}
            {"execute": "block-export-add", "arguments": {"name": "s2", "file": "\(file)", "snapshot": "second"}}
            {"execute": "snapshot-delete", "arguments": {"export": "disk", "name": "second"}}
            {"execute": "block-export-del", "arguments": {"name": "s2"}}
            {"execute": "snapshot-delete", "arguments": {"export": "disk", "name": "second"}}
            {"execute": "snapshot-list", "arguments": {"export": "disk"}}\n
            """).map(json)
        XCTAssertEqual(replies.count, 6)
        guard replies.count == 6 else { return }
        XCTAssertEqual(replies[0]["return"]?["name"], .string("second"), replies[0].text)
        XCTAssertNotNil(replies[1]["return"], replies[1].text)
        XCTAssertEqual(replies[2]["error"]?["desc"], .string("snapshot 'second' is exported: remove that export first"))
        XCTAssertNotNil(replies[3]["return"], replies[3].text)
        XCTAssertEqual(replies[4]["return"]?["name"], .string("second"), replies[4].text)
        let names = replies[5]["return"]?.arrayValue?.compactMap { $0["name"]?.stringValue }
        XCTAssertEqual(names, ["live1"])
        XCTAssertNotNil(replies[5]["return"]?.arrayValue?.first?["exclusive-bytes"]?.intValue, replies[5].text)
        XCTAssertEqual(server.stop(), 0, server.stderr)
        try Peer.expectSuccess("qemu-img", ["check", "\(dir)/disk.qcow2"])
        let snapshots = try Peer.expectSuccess("qemu-img", ["snapshot", "-l", "\(dir)/disk.qcow2"])
        XCTAssertTrue(snapshots.out.contains("live1"), snapshots.out)
    }

    // MARK: Exports

    /// Exports come and go through `strata export` while fio writes and verifies on another.
    func testExportsAddedAndRemovedWhileAnotherClientWrites() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/busy.qcow2", size: "64M")
        try makeQcow2("\(dir)/new.qcow2", size: "16M")
        try makeRaw("\(dir)/ro.img", size: 1 << 20)
        let server = try serve(dir, ["\(dir)/busy.qcow2"])
        let cli = try strata(), ctl = "\(dir)/ctl.sock"
        let load = try fio(dir, export: "busy")
        usleep(200_000)

        try expectCLI(["export", "add", "--server", ctl, "new", "\(dir)/new.qcow2"])
        try expectCLI(["export", "add", "--server", ctl, "-r", "-f", "raw", "ro", "\(dir)/ro.img"])
        let dup = try Peer.run(cli, ["export", "add", "--server", ctl, "new", "\(dir)/ro.img"])
        XCTAssertEqual(dup.status, 1)
        XCTAssertTrue(dup.err.contains("an export named 'new' is already served"), dup.err)
        try Peer.expectSuccess("qemu-io", ["-f", "raw", "nbd+unix:///new?socket=\(dir)/nbd.sock",
                                           "-c", "write -P 9 0 1M", "-c", "read -P 9 0 1M"])
        let ro = try Peer.run(try Peer.path("qemu-io"), ["-f", "raw", "nbd+unix:///ro?socket=\(dir)/nbd.sock", "-c", "write 0 4k"])
        XCTAssertNotEqual(ro.status, 0, "the read-only export refuses writes:\n\(ro.transcript)")
        let list = try expectCLI(["export", "list", "--server", ctl, "--output", "json"])
        let names = try json(list.out).arrayValue?.compactMap { $0["name"]?.stringValue }
        XCTAssertEqual(names, ["busy", "new", "ro"])
        XCTAssertTrue(load.process.isRunning, "fio was writing all along")

        try expectCLI(["export", "remove", "--server", ctl, "new"])
        try expectCLI(["export", "remove", "--server", ctl, "ro"])
        let gone = try Peer.run(try Peer.path("nbdinfo"), ["--size", "nbd+unix:///new?socket=\(dir)/nbd.sock"])
        XCTAssertNotEqual(gone.status, 0)
        // Its image is closed and unlocked while the server runs: qemu can check it.
        var checked = false
        for _ in 0..<50 where !checked {
            checked = try Peer.run(try Peer.path("qemu-img"), ["check", "\(dir)/new.qcow2"]).status == 0
            if !checked { usleep(100_000) }
        }
        XCTAssertTrue(checked, "the removed export's image is closed and clean")
        let nbd = try Peer.run(cli, ["export", "list", "--server", "\(dir)/nbd.sock"])
        XCTAssertEqual(nbd.status, 1)
        XCTAssertTrue(nbd.err.contains("this is an NBD socket; give the server's --control socket"), nbd.err)
        let missing = try Peer.run(cli, ["export", "list", "--server", "\(dir)/none.sock"])
        XCTAssertEqual(missing.status, 1)
        XCTAssertTrue(missing.err.contains("no such control socket"), missing.err)

        expectFioClean(load)
        XCTAssertEqual(server.stop(), 0, server.stderr)
        try Peer.expectSuccess("qemu-img", ["check", "\(dir)/busy.qcow2"])
        XCTAssertFalse(FileManager.default.fileExists(atPath: ctl), "the control socket is removed at exit")
    }
}
