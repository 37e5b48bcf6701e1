import Foundation
import Strata
import XCTest

@testable import StrataNBD

/// Exports added, removed and resized on a running server, seen by real clients.
final class LiveExportTests: XCTestCase {
    private let M = 1 << 20

    private func listed(_ server: TestServer, file: StaticString = #filePath, line: UInt = #line) throws -> [String] {
        let r = try Peer.expectSuccess("nbdinfo", ["--list", "--json", server.uri("")], file: file, line: line)
        let top = try JSONSerialization.jsonObject(with: Data(r.out.utf8)) as? [String: Any]
        return (top?["exports"] as? [[String: Any]])?.compactMap { $0["export-name"] as? String } ?? []
    }

    /// Polls `condition` every 50 ms for up to `timeout` seconds.
    private func eventually(timeout: TimeInterval = 10, _ condition: () throws -> Bool) rethrows -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        repeat {
            if try condition() { return true }
            usleep(50_000)
        } while Date() < deadline
        return false
    }

    func testNbdinfoListFollowsAddAndRemove() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/a.qcow2", size: "8M")
        try makeRaw("\(dir)/b.raw", size: 2 * M)
        try makeQcow2("\(dir)/c.qcow2", size: "4M")
        let server = try TestServer(dir: dir, exports: [TestExport(name: "a", path: "\(dir)/a.qcow2"),
                                                        TestExport(name: "b", path: "\(dir)/b.raw")])
        XCTAssertEqual(try listed(server), ["a", "b"])

        try server.server.add(Export(name: "c", device: try openImage(path: "\(dir)/c.qcow2",
                                                                       options: OpenOptions(writable: true))))
        XCTAssertEqual(try listed(server), ["a", "b", "c"])
        XCTAssertEqual(try Peer.expectSuccess("nbdinfo", ["--size", server.uri("c")]).out, "\(4 * M)\n")

        try server.server.remove("b")
        XCTAssertEqual(try listed(server), ["a", "c"])
        let gone = try Peer.run(try Peer.path("nbdinfo"), ["--size", server.uri("b")])
        XCTAssertNotEqual(gone.status, 0, "a removed export is not found:\n\(gone.transcript)")
        XCTAssertTrue(gone.err.contains("no export named 'b'"), gone.err)
        for name in ["a", "c"] {
            try Peer.expectSuccess("qemu-io", ["-f", "raw", server.uri(name), "-c", "write -P 4 0 64k", "-c", "read -P 4 0 64k"])
        }
        XCTAssertEqual(server.server.uris, [server.uri("a"), server.uri("c")])
        try server.stop()
        for image in ["a", "c"] { try Peer.expectSuccess("qemu-img", ["check", "\(dir)/\(image).qcow2"]) }
    }

    /// A connected client loses its export: its next request fails, the server closes it, and
    /// the image is flushed, closed and unlocked while the server keeps serving the others.
    func testRemovingAnExportClosesItsConnectionsThenItsImage() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/gone.qcow2", size: "8M")
        try makeQcow2("\(dir)/stay.qcow2", size: "8M")
        let server = try TestServer(dir: dir, exports: [TestExport(name: "gone", path: "\(dir)/gone.qcow2"),
                                                        TestExport(name: "stay", path: "\(dir)/stay.qcow2")])
        let client = try Spawned(try Peer.path("python3"), Peer.scriptArguments("removed_export.py", ["idle", server.uri("gone")]),
                                 stderrPath: "\(dir)/client.log")
        XCTAssertEqual(client.waitForLines(1).first, "connected", client.stderr)
        let busy = try Peer.run(try Peer.path("qemu-img"), ["check", "\(dir)/gone.qcow2"])
        XCTAssertNotEqual(busy.status, 0, "the served image is locked:\n\(busy.transcript)")

        try server.server.remove("gone")
        client.send("go")
        XCTAssertEqual(client.waitForExit(), 0, "\(client.lines)\n\(client.stderr)")
        XCTAssertEqual(client.lines.dropLast().prefix(2), ["connected", "closed by the server"])
        XCTAssertTrue(client.lines.dropLast().last?.hasPrefix("refused: ") ?? false, "\(client.lines)")

        XCTAssertTrue(try eventually { try Peer.run(try Peer.path("qemu-img"), ["check", "\(dir)/gone.qcow2"]).status == 0 },
                      "the image is closed and unlocked while the server runs")
        try Peer.expectSuccess("qemu-img", ["check", "\(dir)/gone.qcow2"])
        let data = try Peer.expectSuccess("qemu-io", ["-f", "qcow2", "-r", "\(dir)/gone.qcow2", "-c", "read -P 0x5a 0 64k"])
        XCTAssertFalse(data.out.contains("failed"), "the client's flushed write is in the image:\n\(data.out)")

        XCTAssertEqual(try listed(server), ["stay"])
        try Peer.expectSuccess("qemu-io", ["-f", "raw", server.uri("stay"), "-c", "write -P 6 0 64k", "-c", "read -P 6 0 64k"])
        try server.stop()
        try Peer.expectSuccess("qemu-img", ["check", "\(dir)/stay.qcow2"])
    }

    /// The requests a connection had already received but not started are answered with
    /// ESHUTDOWN at once; the ones in flight finish; only then is the image closed.
    func testInFlightRequestsFinishAndTheRestGetESHUTDOWN() throws {
        let dir = try makeTempDir(self)
        let device = FakeDevice(size: 1 << 20)
        device.closeGate()
        let server = try TestServer(dir: dir, registry: ExportRegistry([Export(name: "gated", device: device)])) {
            $0.ioThreads = NBDLimits.maxInFlightRequests
        }
        let stalled = NBDLimits.maxInFlightRequests, extra = 3
        let client = try Spawned(try Peer.path("python3"),
                                 Peer.scriptArguments("removed_export.py", ["busy", server.socket, "gated", "\(stalled)", "\(extra)"]),
                                 stderrPath: "\(dir)/client.log")
        XCTAssertEqual(client.waitForLines(1).first, "sent", client.stderr)
        XCTAssertTrue(eventually { device.waitingWriters == stalled }, "\(device.waitingWriters) writes stalled")

        try server.server.remove("gated")
        XCTAssertEqual(client.waitForLines(2).last, "refused \(extra)", "\(client.lines)\n\(client.stderr)")
        server.server.registry.waitForPendingCloses()
        XCTAssertFalse(device.calls.contains("close"), "not closed under requests in flight")

        device.openGate()
        XCTAssertEqual(client.waitForExit(), 0, "\(client.lines)\n\(client.stderr)")
        XCTAssertEqual(client.lines.dropLast(), ["sent", "refused \(extra)", "acked \(stalled)", "closed"])
        XCTAssertTrue(eventually { device.calls.contains("close") }, "closed once the connection is over")
        XCTAssertEqual(device.calls.filter { $0.hasPrefix("write") }.count, stalled)
        XCTAssertEqual(device.calls.last, "close")
        try server.stop()
        XCTAssertEqual(device.calls.filter { $0 == "close" }.count, 1)
    }

    /// A client that hangs up with requests still running keeps the image open until they
    /// finish, even when its export is removed meanwhile.
    func testAnImageOutlivesTheRequestsOfAClientThatHungUp() throws {
        let dir = try makeTempDir(self)
        let device = FakeDevice(size: 1 << 20)
        device.closeGate()
        let server = try TestServer(dir: dir, registry: ExportRegistry([Export(name: "gated", device: device)]))
        let count = 8
        let client = try Spawned(try Peer.path("python3"),
                                 Peer.scriptArguments("removed_export.py", ["abandon", server.socket, "gated", "\(count)"]),
                                 stderrPath: "\(dir)/client.log")
        XCTAssertEqual(client.waitForExit(), 0, "\(client.lines)\n\(client.stderr)")
        XCTAssertTrue(eventually { device.waitingWriters == count }, "\(device.waitingWriters) writes stalled")

        try server.server.remove("gated")
        server.server.registry.waitForPendingCloses()
        XCTAssertFalse(device.calls.contains("close"), "not closed under requests in flight")
        device.openGate()
        XCTAssertTrue(eventually { device.calls.contains("close") }, "closed once the last request finished")
        XCTAssertEqual(device.calls.filter { $0.hasPrefix("write") }.count, count)
        XCTAssertEqual(device.calls.last, "close")
        try server.stop()
    }

    /// The export's size is the image's current size: a resize while serving is what new
    /// handshakes report, and what the range check allows.
    func testNewConnectionsSeeTheImageGrow() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/grow.qcow2", size: "8M")
        let server = try TestServer(dir: dir, exports: [TestExport(name: "grow", path: "\(dir)/grow.qcow2")])
        XCTAssertEqual(try Peer.expectSuccess("nbdinfo", ["--size", server.uri("grow")]).out, "\(8 * M)\n")
        let image = try XCTUnwrap(server.server.registry.lookup("grow")?.device as? Qcow2Image)
        try image.resize(to: UInt64(16 * M))
        XCTAssertEqual(try Peer.expectSuccess("nbdinfo", ["--size", server.uri("grow")]).out, "\(16 * M)\n")
        try Peer.expectSuccess("qemu-io", ["-f", "raw", server.uri("grow"), "-c", "write -P 7 12M 64k", "-c", "read -P 7 12M 64k"])
        try server.stop()
        try Peer.expectSuccess("qemu-img", ["check", "\(dir)/grow.qcow2"])
    }
}
