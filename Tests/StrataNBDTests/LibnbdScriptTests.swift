import Foundation
import XCTest

@testable import StrataNBD

/// The Python scripts in Tests/nbd, each against an in-process server: libnbd as the client
/// (structured reads, block status, errors, multi-conn, simple replies, option haggling) and a
/// raw-socket client for what libnbd will not send.
final class LibnbdScriptTests: XCTestCase {
    private let M = 1 << 20

    func testStructuredReadsBlockStatusAndWritesOnABackedQcow2() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/base.qcow2", size: "8M")
        try Peer.expectSuccess("qemu-io", ["-f", "qcow2", "\(dir)/base.qcow2", "-c", "write -P 1 0 64k"])
        try makeQcow2("\(dir)/top.qcow2", size: "8M", options: ["backing_file=\(dir)/base.qcow2", "backing_fmt=qcow2"])
        try Peer.expectSuccess("qemu-io", ["-f", "qcow2", "\(dir)/top.qcow2", "-c", "write -P 2 1M 64k"])
        let server = try TestServer(dir: dir, exports: [TestExport(name: "top", path: "\(dir)/top.qcow2")])
        try Peer.python("structured_reads.py", [server.uri("top")])
        try server.stop()
        try Peer.expectSuccess("qemu-img", ["check", "\(dir)/top.qcow2"])
    }

    func testEveryRefusedRequestGetsTheProtocolsErrorCode() throws {
        let dir = try makeTempDir(self)
        try makeRaw("\(dir)/rw.raw", size: 64 * M)
        try makeQcow2("\(dir)/ro.qcow2", size: "64M")
        let server = try TestServer(dir: dir, exports: [
            TestExport(name: "rw", path: "\(dir)/rw.raw"),
            TestExport(name: "ro", path: "\(dir)/ro.qcow2", readOnly: true),
        ])
        try Peer.python("errors.py", [server.uri("rw"), server.uri("ro"), "\(64 * M)"])
    }

    func testWritesOnOneConnectionAreVisibleOnAllAfterFlushOrFUA() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/mc.qcow2", size: "16M")
        let server = try TestServer(dir: dir, exports: [TestExport(name: "mc", path: "\(dir)/mc.qcow2")])
        try Peer.python("multiconn.py", [server.uri("mc"), "4"])
    }

    func testClientWithoutStructuredRepliesGetsSimpleReplies() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/s.qcow2", size: "8M")
        let server = try TestServer(dir: dir, exports: [TestExport(name: "s", path: "\(dir)/s.qcow2")])
        try Peer.python("simple_replies.py", [server.uri("s")])
    }

    func testOptionListInfoMetaContextsAndGo() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/a.qcow2", size: "8M")
        try makeRaw("\(dir)/b.raw", size: 3 * M)
        try makeQcow2("\(dir)/c.qcow2", size: "1G")
        let server = try TestServer(dir: dir, exports: [
            TestExport(name: "a", path: "\(dir)/a.qcow2", description: "test image"),
            TestExport(name: "b", path: "\(dir)/b.raw", readOnly: true, description: "test image"),
            TestExport(name: "c d", path: "\(dir)/c.qcow2", description: "test image"),
        ])
        try Peer.python("list_exports.py", [server.socket, "test image", "a=\(8 * M)", "b=\(3 * M)", "c d=\(1 << 30)"])
    }

    func testRawProtocolViolationsAndPipelining() throws {
        let dir = try makeTempDir(self)
        try makeRaw("\(dir)/raw.raw", size: 4 * M)
        let server = try TestServer(dir: dir, exports: [TestExport(name: "raw", path: "\(dir)/raw.raw")])
        try Peer.python("raw_protocol.py", [server.socket, "raw", "\(4 * M)"], timeout: 120)
    }
}

/// Backpressure, observed from outside: with the image stalled, the bytes a client manages to
/// push into the server stay bounded by the in-flight caps (plus socket buffers) instead of
/// the server swallowing everything it is sent.
final class BackpressureTests: XCTestCase {
    private func run(count: Int, size: Int, maxAccepted: Int) throws {
        let dir = try makeTempDir(self)
        let device = FakeDevice(size: 8 << 20)
        device.closeGate()
        let server = try TestServer(dir: dir, registry: ExportRegistry([Export(name: "gated", device: device)]))
        let client = try Spawned(try Peer.path("python3"),
                                 Peer.scriptArguments("backpressure.py", [server.socket, "gated", "\(count)", "\(size)"]),
                                 stderrPath: "\(dir)/client.log")
        let accepted = client.waitForLines(1).first.flatMap { Int($0.split(separator: " ").last ?? "") }
        device.openGate()
        client.send("go")
        XCTAssertEqual(client.waitForExit(timeout: 60), 0, "\(client.lines)\n\(client.stderr)")
        let total = count * (size + 28)
        let got = try XCTUnwrap(accepted, "no 'accepted' line: \(client.lines) \(client.stderr)")
        XCTAssertLessThan(got, maxAccepted, "the server kept reading while \(count) writes were stalled (\(got) of \(total) bytes taken)")
        XCTAssertTrue(client.lines.contains("replied \(count)"), "\(client.lines)")
        print("backpressure: \(got) of \(total) bytes taken while stalled")
        try server.stop()
    }

    /// 1000 writes of 16 KiB: the request cap (64 in flight) stops reading long before 16 MiB.
    func testInFlightRequestCapStopsReading() throws {
        try run(count: 1000, size: 16 << 10, maxAccepted: 6 << 20)
    }

    /// 60 writes of 4 MiB (under the request cap): the byte cap (128 MiB in flight) stops
    /// reading well before 240 MiB.
    func testInFlightByteCapStopsReading() throws {
        try run(count: 60, size: 4 << 20, maxAccepted: NBDLimits.maxInFlightBytes + (12 << 20))
    }
}

/// Concurrency inside a connection and limits across connections.
final class ConnectionLimitTests: XCTestCase {
    /// A read sent after a stalled write is answered before it: requests run concurrently and
    /// replies go out as they complete.
    func testRepliesComeInCompletionOrder() throws {
        let dir = try makeTempDir(self)
        let device = FakeDevice(size: 1 << 20)
        device.closeGate()
        let server = try TestServer(dir: dir, registry: ExportRegistry([Export(name: "gated", device: device)]))
        let client = try Spawned(try Peer.path("python3"),
                                 Peer.scriptArguments("connection_limits.py", ["out-of-order", server.socket, "gated"]),
                                 stderrPath: "\(dir)/client.log")
        let first = client.waitForLines(1, timeout: 10).first
        device.openGate()
        client.send("go")
        XCTAssertEqual(client.waitForExit(), 0, "\(client.lines)\n\(client.stderr)")
        XCTAssertEqual(first, "read answered first")
        XCTAssertEqual(Array(device.contents[0..<4096]), [UInt8](repeating: 0x77, count: 4096))
        try server.stop()
    }

    func testConnectionsPastTheLimitWaitForAFreeSlot() throws {
        let dir = try makeTempDir(self)
        try makeRaw("\(dir)/one.raw", size: 1 << 20)
        let server = try TestServer(dir: dir, exports: [TestExport(name: "one", path: "\(dir)/one.raw")]) {
            $0.maxConnections = 1
        }
        try Peer.python("connection_limits.py", ["max-connections", server.socket])
        try Peer.expectSuccess("nbdinfo", ["--size", server.uri("one")])
    }

    func testSilentClientsAreDroppedAfterTheHandshakeTimeout() throws {
        let dir = try makeTempDir(self)
        try makeRaw("\(dir)/t.raw", size: 1 << 20)
        let server = try TestServer(dir: dir, exports: [TestExport(name: "t", path: "\(dir)/t.raw")]) {
            $0.handshakeTimeout = .seconds(1)
        }
        try Peer.python("connection_limits.py", ["handshake-timeout", server.socket, "1"])
        try Peer.expectSuccess("nbdinfo", ["--size", server.uri("t")])
    }
}
