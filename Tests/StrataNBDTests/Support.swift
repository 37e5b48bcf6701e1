import Foundation
import Logging
import Strata
import XCTest
import TestSupport

@testable import StrataNBD

/// The result of running a peer program (TestSupport's one runner).
typealias ToolResult = ProcessResult

/// Peer programs the tests drive, and the Debian package that provides each. A missing peer
/// fails the test with the package to install; nothing is skipped.
enum Peer {
    static let packages: [String: String] = [
        "nbdinfo": "libnbd-bin", "nbdcopy": "libnbd-bin", "nbdsh": "libnbd-bin",
        "qemu-img": "qemu-utils", "qemu-io": "qemu-utils", "qemu-nbd": "qemu-utils",
        "fio": "fio", "python3": "python3-libnbd",
    ]

    /// The absolute path of `name` on PATH (or /usr/bin/python3 for python3, the only
    /// interpreter that has the `nbd` module), or a test failure naming the package.
    static func path(_ name: String, file: StaticString = #filePath, line: UInt = #line) throws -> String {
        if name == "python3" {
            let py = "/usr/bin/python3"
            let probe = try run(py, ["-c", "import nbd"])
            guard probe.status == 0 else {
                XCTFail("/usr/bin/python3 cannot import nbd: install the Debian package python3-libnbd", file: file, line: line)
                throw PeerMissing(name: name)
            }
            return py
        }
        let dirs = (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") + ["/usr/sbin", "/usr/bin"]
        for dir in dirs where FileManager.default.isExecutableFile(atPath: "\(dir)/\(name)") {
            return "\(dir)/\(name)"
        }
        XCTFail("\(name) is not installed: install the Debian package \(packages[name] ?? name)", file: file, line: line)
        throw PeerMissing(name: name)
    }

    struct PeerMissing: Error { var name: String }

    /// Runs a program to completion with stdout and stderr captured through files (no pipe
    /// deadlocks), failing the test if it runs longer than `timeout` seconds.
    @discardableResult
    static func run(_ executable: String, _ arguments: [String], timeout: TimeInterval = 120,
                    environment: [String: String]? = nil) throws -> ToolResult {
        let r = try runProcess([executable] + arguments, environment: environment ?? [:], timeout: timeout)
        if r.timedOut { XCTFail("\(executable) \(arguments.joined(separator: " ")) ran longer than \(timeout) s") }
        return r
    }

    /// Runs a peer by name and asserts it succeeded.
    @discardableResult
    static func expectSuccess(_ name: String, _ arguments: [String], timeout: TimeInterval = 120,
                              file: StaticString = #filePath, line: UInt = #line) throws -> ToolResult {
        let r = try run(try path(name, file: file, line: line), arguments, timeout: timeout)
        XCTAssertEqual(r.status, 0, "\(name) \(arguments.joined(separator: " ")) failed:\n\(r.transcript)", file: file, line: line)
        return r
    }

    /// Runs one of the Python helpers in Tests/nbd with /usr/bin/python3 and asserts it
    /// exited 0 (each helper exits 1 with a message at its first failed check).
    @discardableResult
    static func python(_ script: String, _ arguments: [String], timeout: TimeInterval = 120,
                       file: StaticString = #filePath, line: UInt = #line) throws -> ToolResult {
        let py = try path("python3", file: file, line: line)
        let r = try run(py, scriptArguments(script, arguments), timeout: timeout)
        XCTAssertEqual(r.status, 0, "\(script) failed:\n\(r.transcript)", file: file, line: line)
        return r
    }

    /// The interpreter arguments that run one of the Tests/nbd helpers (`-B`: leave no
    /// `__pycache__` in the source tree).
    static func scriptArguments(_ script: String, _ arguments: [String]) -> [String] {
        ["-B", helpersDirectory + "/" + script] + arguments
    }

    /// Tests/nbd, next to this test target.
    static var helpersDirectory: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("nbd").path
    }
}

/// A fresh directory for one test, removed when the test ends. Short, so Unix socket paths
/// stay under the 108-byte limit.
func makeTempDir(_ test: XCTestCase) throws -> String {
    let dir = "/tmp/snbd-" + String(UUID().uuidString.prefix(13))
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    test.addTeardownBlock { try? FileManager.default.removeItem(atPath: dir) }
    return dir
}

/// A logger for in-process servers: warnings and errors only, so test output stays readable.
func testLogger() -> Logger {
    var logger = Logger(label: "strata.nbd.test", factory: { StreamLogHandler.standardError(label: $0) })
    logger.logLevel = .warning
    return logger
}

/// One export of a ``TestServer``: an image file opened with `openImage` (format probed).
struct TestExport {
    var name: String
    var path: String
    var readOnly = false
    var discard = DiscardMode.unmap
    var description: String? = nil
}

/// A log handler that keeps messages in memory, so tests can check what was logged.
final class CapturedLogs: @unchecked Sendable {
    private let lock = NSLock()
    private var _lines: [String] = []
    var lines: [String] { lock.withLock { _lines } }
    func append(_ line: String) { lock.withLock { _lines.append(line) } }

    /// A logger writing into this capture.
    func logger(level: Logger.Level = .trace) -> Logger {
        var logger = Logger(label: "strata.nbd.capture") { _ in Handler(sink: self) }
        logger.logLevel = level
        return logger
    }

    struct Handler: LogHandler {
        let sink: CapturedLogs
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(level: Logger.Level, message: Logger.Message, metadata: Logger.Metadata?, source: String,
                 file: String, function: String, line: UInt) {
            sink.append("\(level) \(message)")
        }
    }
}

/// An in-process NBD server on a Unix socket in its own directory, serving image files.
final class TestServer {
    let server: NBDServer
    let socket: String
    private var stopped = false

    convenience init(dir: String, exports: [TestExport], once: Bool = false,
                     configure: (inout NBDServer.Configuration) -> Void = { _ in }) throws {
        var opened: [Export] = []
        for e in exports {
            let device = try openImage(path: e.path, options: OpenOptions(writable: !e.readOnly))
            opened.append(Export(name: e.name, description: e.description, device: device, readOnly: e.readOnly,
                                 discard: e.discard))
        }
        try self.init(dir: dir, registry: ExportRegistry(opened, logger: testLogger()), once: once, configure: configure)
    }

    init(dir: String, registry: ExportRegistry, once: Bool = false,
         configure: (inout NBDServer.Configuration) -> Void = { _ in }) throws {
        socket = dir + "/nbd.sock"
        var config = NBDServer.Configuration(address: .unix(path: socket))
        config.once = once
        config.eventLoopThreads = 2
        config.ioThreads = 8
        configure(&config)
        server = NBDServer(registry: registry, configuration: config, logger: testLogger())
        try server.start()
    }

    /// The NBD URI of an export.
    func uri(_ export: String) -> String {
        NBDServer.uri(for: .unix(path: socket), bound: nil, export: export)
    }

    /// Graceful stop: in-flight requests finish, images are flushed and closed.
    func stop() throws {
        guard !stopped else { return }
        stopped = true
        server.shutdown()
        try server.wait()
    }

    deinit { try? stop() }
}

/// Makes a sparse raw file of `size` bytes.
func makeRaw(_ path: String, size: Int) throws {
    FileManager.default.createFile(atPath: path, contents: nil)
    let h = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
    try h.truncate(atOffset: UInt64(size))
    try h.close()
}

/// Makes a qcow2 image with qemu-img.
func makeQcow2(_ path: String, size: String, options: [String] = []) throws {
    var args = ["create", "-q", "-f", "qcow2"]
    if !options.isEmpty { args += ["-o", options.joined(separator: ",")] }
    try Peer.expectSuccess("qemu-img", args + [path, size])
}

/// Writes `bytes` at `offset` of a file.
func writeFile(_ path: String, at offset: UInt64, _ bytes: [UInt8]) throws {
    let h = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
    try h.seek(toOffset: offset)
    try h.write(contentsOf: Data(bytes))
    try h.close()
}

