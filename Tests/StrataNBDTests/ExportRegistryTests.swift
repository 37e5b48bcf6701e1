import Foundation
import NIOCore
import Strata
import XCTest

@testable import StrataNBD

/// The registry on its own: the current set of exports, and who closes a device when.
final class ExportRegistryTests: XCTestCase {
    func testAddRemoveAndLookupSeeTheCurrentSet() throws {
        let registry = ExportRegistry([Export(name: "a", device: FakeDevice(size: 512)),
                                       Export(name: "b", device: FakeDevice(size: 512))])
        XCTAssertEqual(registry.lookup("")?.name, "a", "the first export is the default")
        try registry.add(Export(name: "c", device: FakeDevice(size: 512)))
        XCTAssertEqual(registry.exports.map(\.name), ["a", "b", "c"])
        try registry.remove("a")
        XCTAssertEqual(registry.exports.map(\.name), ["b", "c"])
        XCTAssertNil(registry.lookup("a"))
        XCTAssertEqual(registry.lookup("")?.name, "b", "the next export becomes the default")

        XCTAssertThrowsError(try registry.add(Export(name: "b", device: FakeDevice(size: 512)))) {
            XCTAssertEqual($0 as? ExportRegistryError, .duplicateName("b"))
        }
        XCTAssertThrowsError(try registry.remove("a")) { XCTAssertEqual($0 as? ExportRegistryError, .noSuchExport("a")) }
        let long = String(repeating: "n", count: NBDLimits.maxStringLength + 1)
        XCTAssertThrowsError(try registry.add(Export(name: long, device: FakeDevice(size: 512)))) {
            XCTAssertEqual($0 as? ExportRegistryError, .nameTooLong(name: long, bytes: NBDLimits.maxStringLength + 1))
        }
        try registry.closeAll()
        XCTAssertThrowsError(try registry.add(Export(name: "d", device: FakeDevice(size: 512)))) {
            XCTAssertEqual($0 as? ExportRegistryError, .closed)
        }
        XCTAssertEqual(registry.exports.map(\.name), [])
    }

    /// A device shared by two exports and used by a connection closes after all three let go,
    /// exactly once.
    func testADeviceClosesOnlyWhenNoExportOrConnectionUsesIt() throws {
        let shared = FakeDevice(size: 4096)
        let a = Export(name: "a", device: shared), b = Export(name: "b", device: shared)
        let registry = ExportRegistry([a, b])
        let told = Told()
        var lease = registry.lease(b) { told.count += 1 }
        XCTAssertTrue(lease != nil)

        try registry.remove("a")
        registry.waitForPendingCloses()
        XCTAssertFalse(shared.calls.contains("close"), "export b still serves the image")
        XCTAssertEqual(told.count, 0, "a's removal does not concern b's connections")

        try registry.remove("b")
        registry.waitForPendingCloses()
        XCTAssertEqual(told.count, 1, "the connection on b is told")
        XCTAssertFalse(shared.calls.contains("close"), "a connection still uses the image")
        XCTAssertTrue(registry.lease(b) { } == nil, "no new lease on a removed export")

        lease = nil
        registry.waitForPendingCloses()
        XCTAssertEqual(shared.calls.filter { $0 == "close" }.count, 1)
        try registry.closeAll()
        XCTAssertEqual(shared.calls.filter { $0 == "close" }.count, 1, "closeAll does not close it again")
    }

    func testCloseAllClosesEveryDeviceOnceAndReportsTheFirstFailure() throws {
        let one = FakeDevice(size: 512), two = FakeDevice(size: 512)
        let registry = ExportRegistry([Export(name: "a", device: one), Export(name: "b", device: one),
                                       Export(name: "c", device: two)])
        two.failure = .noSpace(path: "/two")
        XCTAssertThrowsError(try registry.closeAll()) { XCTAssertEqual("\($0)", "/two: no space left on device") }
        XCTAssertEqual(one.calls, ["close"])
        XCTAssertEqual(two.calls, ["close"])
    }

    /// A file opened for one export is shared by the next export of the same file, and opened
    /// afresh once it was closed.
    func testOpenSharesAFileAndReopensItAfterItWasClosed() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/f.qcow2", size: "1M")
        let registry = ExportRegistry(logger: testLogger())
        let options = OpenOptions(writable: true)
        let first = try registry.open(.init(name: "one", path: "\(dir)/f.qcow2"), options: options, discard: .unmap,
                                      description: nil)
        let second = try registry.open(.init(name: "two", path: "\(dir)/./f.qcow2"), options: options, discard: .unmap,
                                       description: nil)
        XCTAssertTrue(first.device === second.device)
        XCTAssertThrowsError(try registry.open(.init(name: "two", path: "\(dir)/f.qcow2"), options: options,
                                               discard: .unmap, description: nil)) {
            XCTAssertEqual($0 as? ExportRegistryError, .duplicateName("two"))
        }
        try registry.remove("one")
        try registry.remove("two")
        registry.waitForPendingCloses()
        // Closed and unlocked: a new open takes the write lock again.
        let third = try registry.open(.init(name: "three", path: "\(dir)/f.qcow2"), options: options, discard: .unmap,
                                      description: nil)
        XCTAssertFalse(third.device === first.device)
        try registry.closeAll()
        try Peer.expectSuccess("qemu-img", ["check", "\(dir)/f.qcow2"])
    }

    /// `--snapshot`: writes go to an overlay in $TMPDIR that is unlinked at once; the file
    /// never changes.
    func testSnapshotEntriesWriteToAnUnlinkedOverlay() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/base.qcow2", size: "1M")
        try Peer.expectSuccess("qemu-io", ["-f", "qcow2", "\(dir)/base.qcow2", "-c", "write -P 5 0 64k"])
        let before = try Data(contentsOf: URL(fileURLWithPath: "\(dir)/base.qcow2"))
        let tmp = "\(dir)/tmp"
        try FileManager.default.createDirectory(atPath: tmp, withIntermediateDirectories: true)
        setenv("TMPDIR", tmp, 1)
        defer { unsetenv("TMPDIR") }

        let registry = ExportRegistry(logger: testLogger())
        let export = try registry.open(.init(name: "s", path: "\(dir)/base.qcow2", snapshot: true),
                                       options: OpenOptions(writable: true), discard: .unmap, description: nil)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: tmp), [], "the overlay is unlinked once open")
        XCTAssertFalse(export.isReadOnly)
        try [UInt8](repeating: 9, count: 4096).withUnsafeBytes { try export.device.write($0, at: 0, fua: true) }
        var back = [UInt8](repeating: 0, count: 8192)
        try back.withUnsafeMutableBytes { try export.device.read(into: $0, at: 0) }
        XCTAssertEqual(back, [UInt8](repeating: 9, count: 4096) + [UInt8](repeating: 5, count: 4096),
                       "the overlay's writes over the backing file's data")
        try registry.closeAll()
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: "\(dir)/base.qcow2")), before, "the file never changed")
    }
}

/// A counter bumped from a `@Sendable` callback.
private final class Told: @unchecked Sendable {
    // Protected by `lock`.
    private let lock = NSLock()
    private var _count = 0
    var count: Int {
        get { lock.withLock { _count } }
        set { lock.withLock { _count = newValue } }
    }
}
