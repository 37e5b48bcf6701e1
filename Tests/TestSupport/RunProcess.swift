import Foundation

/// What one run of an external program produced.
public struct ProcessResult: Sendable {
    public var status: Int32
    public var out: String
    public var err: String
}

/// Runs a program (looked up on PATH) to completion, draining stdout and stderr at once so
/// neither pipe can fill up and stall it.
public func runProcess(_ args: [String]) throws -> ProcessResult {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = args
    let o = Pipe(), e = Pipe()
    p.standardOutput = o
    p.standardError = e
    try p.run()
    final class Box: @unchecked Sendable { var data = Data() }  // written before g.wait() returns
    let errBox = Box()
    let g = DispatchGroup()
    g.enter()
    DispatchQueue.global().async { errBox.data = e.fileHandleForReading.readDataToEndOfFile(); g.leave() }
    let od = o.fileHandleForReading.readDataToEndOfFile()
    g.wait()
    p.waitUntilExit()
    return ProcessResult(status: p.terminationStatus, out: String(decoding: od, as: UTF8.self),
                         err: String(decoding: errBox.data, as: UTF8.self))
}
