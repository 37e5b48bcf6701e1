import Foundation

/// What one run of an external program produced.
public struct ProcessResult: Sendable {
    public var status: Int32
    /// Standard output as bytes (for programs that print binary data).
    public var outData: Data
    public var err: String
    /// True when the run was stopped for taking longer than its timeout.
    public var timedOut = false
    /// Standard output as text.
    public var out: String { String(decoding: outData, as: UTF8.self) }
    /// Everything the program printed, for failure messages.
    public var transcript: String { "exit \(status)\(timedOut ? " (timed out)" : "")\n--- stdout\n\(out)\n--- stderr\n\(err)" }
}

/// The one way the test targets run a program: looked up on PATH unless `args[0]` is a
/// path; stdout and stderr captured through files (a full pipe cannot stall it, and a
/// server it leaves running cannot hold the capture open); stdin empty; backtraces off;
/// optionally in a folder, with extra environment variables, and stopped after `timeout`
/// seconds (then `timedOut` is set).
public func runProcess(_ args: [String], cwd: String? = nil, environment: [String: String] = [:],
                       timeout: TimeInterval? = nil) throws -> ProcessResult {
    let capture = FileManager.default.temporaryDirectory.appendingPathComponent("strata-run-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: capture, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: capture) }
    let outURL = capture.appendingPathComponent("out"), errURL = capture.appendingPathComponent("err")
    FileManager.default.createFile(atPath: outURL.path, contents: nil)
    FileManager.default.createFile(atPath: errURL.path, contents: nil)

    let p = Process()
    if args[0].hasPrefix("/") {
        p.executableURL = URL(fileURLWithPath: args[0])
        p.arguments = Array(args.dropFirst())
    } else {
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = args
    }
    if let cwd { p.currentDirectoryURL = URL(fileURLWithPath: cwd) }
    var env = ProcessInfo.processInfo.environment
    env["SWIFT_BACKTRACE"] = "enable=no"
    for (k, v) in environment { env[k] = v }
    p.environment = env
    let outHandle = try FileHandle(forWritingTo: outURL), errHandle = try FileHandle(forWritingTo: errURL)
    defer { try? outHandle.close(); try? errHandle.close() }
    p.standardOutput = outHandle
    p.standardError = errHandle
    p.standardInput = FileHandle.nullDevice
    try p.run()
    var timedOut = false
    if let timeout {
        let deadline = Date().addingTimeInterval(timeout)
        while p.isRunning && Date() < deadline { usleep(10_000) }
        if p.isRunning {
            timedOut = true
            p.terminate()
        }
    }
    p.waitUntilExit()
    return ProcessResult(status: p.terminationStatus, outData: (try? Data(contentsOf: outURL)) ?? Data(),
                         err: (try? String(contentsOf: errURL, encoding: .utf8)) ?? "", timedOut: timedOut)
}
