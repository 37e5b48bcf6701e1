import Foundation
import XCTest
import TestSupport

/// What one run of a program produced.
struct RunResult {
    var status: Int32
    var stdout: String
    var stderr: String

    var stdoutLines: [String] { stdout.split(separator: "\n", omittingEmptySubsequences: false).map(String.init).filter { !$0.isEmpty } }
    var stderrLines: [String] { stderr.split(separator: "\n").map(String.init) }
}

/// Runs the built `strata` binary and the real qemu-img/qemu-io side by side, in a scratch
/// directory that is removed after each test.
class ToolTestCase: XCTestCase {
    /// The scratch directory of the current test (commands run with it as working directory).
    var dir: URL!

    override func setUpWithError() throws {
        try super.setUpWithError()
        guard Self.qemuImg != nil, Self.qemuIO != nil else {
            XCTFail("qemu-img/qemu-io not found: install qemu-utils (apt-get install qemu-utils)")
            throw XCTSkip("no qemu-img")
        }
        guard Self.strataBinary != nil else {
            XCTFail("strata binary not found next to the test bundle or in .build*/debug: build it first (swift build --product strata)")
            throw XCTSkip("no strata")
        }
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("strata-cli-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    }

    /// Processes (servers, guests) the current test started and tracks: killed in tearDown
    /// if still running, so a test that ends early leaves none behind.
    var spawned: [Process] = []

    /// Starts a program in the scratch folder, output into files there, backtraces off.
    /// Tracked in ``spawned``; stdout goes to `stdout` when given, else to `log` with stderr.
    func spawn(_ program: String, _ args: [String], log: String, stdout: String? = nil) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: program)
        p.arguments = args
        p.currentDirectoryURL = dir
        p.environment = ProcessInfo.processInfo.environment.merging(["SWIFT_BACKTRACE": "enable=no"]) { $1 }
        _ = FileManager.default.createFile(atPath: path(log), contents: nil)
        let h = try FileHandle(forWritingTo: URL(fileURLWithPath: path(log)))
        var o = h
        if let stdout {
            _ = FileManager.default.createFile(atPath: path(stdout), contents: nil)
            o = try FileHandle(forWritingTo: URL(fileURLWithPath: path(stdout)))
        }
        p.standardOutput = o
        p.standardError = h
        p.standardInput = FileHandle.nullDevice
        try p.run()
        try h.close()
        if stdout != nil { try o.close() }
        spawned.append(p)
        return p
    }

    override func tearDownWithError() throws {
        for p in spawned where p.isRunning {
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
        }
        spawned = []
        if let dir { try? FileManager.default.removeItem(at: dir) }
        try super.tearDownWithError()
    }

    // MARK: Finding the programs

    static func which(_ name: String) -> String? {
        let paths = (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin") + ":/usr/bin:/usr/local/bin"
        for p in paths.split(separator: ":") {
            let candidate = "\(p)/\(name)"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return nil
    }

    static let qemuImg = which("qemu-img")
    static let qemuIO = which("qemu-io")

    /// `strata` from `$STRATA_BIN`, else next to the running test bundle (same build
    /// directory), else the newest `.build*/debug/strata` of the package.
    static let strataBinary: String? = {
        let fm = FileManager.default
        if let env = ProcessInfo.processInfo.environment["STRATA_BIN"], fm.isExecutableFile(atPath: env) { return env }
        var dirs: [URL] = []
        let exe = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
        dirs.append(exe.deletingLastPathComponent())
        dirs.append(Bundle.main.bundleURL)
        dirs.append(Bundle.main.bundleURL.deletingLastPathComponent())
        for b in Bundle.allBundles where b.bundleURL.pathExtension == "xctest" { dirs.append(b.bundleURL.deletingLastPathComponent()) }
        for d in dirs {
            let candidate = d.appendingPathComponent("strata").path
            if fm.isExecutableFile(atPath: candidate) { return candidate }
        }
        // Package root from this file's path: Tests/StrataToolTests/ToolHarness.swift.
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let builds = ((try? fm.contentsOfDirectory(atPath: root.path)) ?? []).filter { $0.hasPrefix(".build") }
        let found = builds.map { root.appendingPathComponent($0).appendingPathComponent("debug/strata").path }
            .filter { fm.isExecutableFile(atPath: $0) }
        func mtime(_ p: String) -> Date { ((try? fm.attributesOfItem(atPath: p))?[.modificationDate] as? Date) ?? .distantPast }
        return found.max { mtime($0) < mtime($1) }
    }()

    // MARK: Running

    /// Runs a program in the scratch directory (the one runner of the test targets).
    @discardableResult
    func run(_ program: String, _ args: [String], file: StaticString = #filePath, line: UInt = #line) throws -> RunResult {
        let r = try runProcess([program] + args, cwd: dir.path)
        return RunResult(status: r.status, stdout: r.out, stderr: r.err)
    }

    @discardableResult
    func strata(_ args: String..., file: StaticString = #filePath, line: UInt = #line) throws -> RunResult {
        try run(Self.strataBinary!, args)
    }

    @discardableResult
    func strata(_ args: [String]) throws -> RunResult { try run(Self.strataBinary!, args) }

    @discardableResult
    func qemuImg(_ args: String...) throws -> RunResult { try run(Self.qemuImg!, args) }

    @discardableResult
    func qemuImg(_ args: [String]) throws -> RunResult { try run(Self.qemuImg!, args) }

    @discardableResult
    func qemuIO(_ args: String...) throws -> RunResult { try run(Self.qemuIO!, args) }

    /// Runs and insists on exit status 0.
    @discardableResult
    func ok(_ r: RunResult, _ what: String, file: StaticString = #filePath, line: UInt = #line) -> RunResult {
        XCTAssertEqual(r.status, 0, "\(what) failed: \(r.stderr)\(r.stdout)", file: file, line: line)
        return r
    }

    // MARK: Files and JSON

    func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

    func write(_ name: String, _ bytes: [UInt8], at offset: UInt64 = 0) throws {
        let url = dir.appendingPathComponent(name)
        if !FileManager.default.fileExists(atPath: url.path) { _ = FileManager.default.createFile(atPath: url.path, contents: nil) }
        let h = try FileHandle(forWritingTo: url)
        defer { try? h.close() }
        try h.seek(toOffset: offset)
        h.write(Data(bytes))
    }

    func truncate(_ name: String, to size: UInt64) throws {
        let url = dir.appendingPathComponent(name)
        if !FileManager.default.fileExists(atPath: url.path) { _ = FileManager.default.createFile(atPath: url.path, contents: nil) }
        let h = try FileHandle(forWritingTo: url)
        defer { try? h.close() }
        try h.truncate(atOffset: size)
    }

    func contents(_ name: String) throws -> Data { try Data(contentsOf: dir.appendingPathComponent(name)) }

    /// The virtual size qemu-img reports for an image.
    func virtualSize(_ image: String) throws -> Int? {
        (json(try qemuImg("info", "--output", "json", "-U", image).stdout) as? [String: Any])?["virtual-size"] as? Int
    }

    /// Parses JSON text into Foundation objects (dictionaries compare with `NSDictionary`).
    func json(_ text: String, file: StaticString = #filePath, line: UInt = #line) -> Any? {
        do {
            return try JSONSerialization.jsonObject(with: Data(text.utf8), options: [.fragmentsAllowed])
        } catch {
            XCTFail("not JSON: \(text)", file: file, line: line)
            return nil
        }
    }

    /// Bytes of a file's data extents (SEEK_DATA/SEEK_HOLE): what it stores, freed clusters
    /// being holes. Unlike st_blocks it leaves out the file system's own extent blocks,
    /// which punching holes adds and removes.
    func dataBytes(_ name: String) -> Int {
        let fd = open(path(name), O_RDONLY)
        guard fd >= 0 else { return -1 }
        defer { close(fd) }
        let seekData: Int32 = 3, seekHole: Int32 = 4  // Linux's SEEK_DATA, SEEK_HOLE
        let end = lseek(fd, 0, SEEK_END)
        var total = 0
        var pos: off_t = 0
        while pos < end {
            let data = lseek(fd, pos, seekData)
            if data < 0 { break }
            let hole = lseek(fd, data, seekHole)
            total += Int(hole - data)
            pos = hole
        }
        return total
    }

    /// Deterministic pseudo-random bytes.
    func noise(_ count: Int, seed: UInt64) -> [UInt8] {
        var x = seed | 1
        return (0..<count).map { _ in
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            return UInt8(truncatingIfNeeded: x)
        }
    }

    /// Asserts the output of a user mistake: exit `status`, exactly one stderr line starting
    /// with `strata: ` that mentions `mentions`, nothing on stdout, no crash report.
    func assertUserError(_ r: RunResult, status: Int32 = 1, mentions: [String], file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(r.status, status, "exit status; stderr: \(r.stderr)", file: file, line: line)
        XCTAssertEqual(r.stderrLines.count, 1, "want exactly one error line, got: \(r.stderr)", file: file, line: line)
        XCTAssertTrue(r.stderr.hasPrefix("strata: "), "error line must start with 'strata: ': \(r.stderr)", file: file, line: line)
        for m in mentions {
            XCTAssertTrue(r.stderr.contains(m), "error should mention '\(m)': \(r.stderr)", file: file, line: line)
        }
        XCTAssertEqual(r.stdout, "", "nothing on stdout for an error", file: file, line: line)
        XCTAssertFalse(r.stderr.contains("Fatal error") || r.stderr.contains("Stack dump") || r.stderr.contains("backtrace"),
                       "no crash output: \(r.stderr)", file: file, line: line)
    }
}
