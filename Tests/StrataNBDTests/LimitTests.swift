import Foundation
import NIOCore
import Strata
import XCTest

@testable import StrataNBD

/// The server's named caps on what a client sends (``NBDLimits``, ``ControlLimits``,
/// ``NBDTLSLimits``) that no other test names, each at its edge: the cap is accepted, one past
/// it is refused. (`maxOptionLength`, `maxOptionsPerHandshake`, `maxStringLength`, `maxPayload`,
/// `maxInFlightRequests`, `maxInFlightBytes`, the NBD server's `maxConnections` setting,
/// `ControlLimits.maxLineBytes`, `ControlLimits.maxConnections` and
/// `ControlConnectionHandler.maxPending` have tests in the files for their rooms.)
final class LimitTests: XCTestCase {
    // MARK: NBD

    /// An `NBD_OPT_SET_META_CONTEXT` payload: export name, query count, queries.
    func metaContextPayload(queries: Int) -> ByteBuffer {
        var b = ByteBuffer()
        b.writeInteger(UInt32(0))                 // export name length ("")
        b.writeInteger(UInt32(queries))           // number of queries
        for _ in 0..<queries {
            b.writeInteger(UInt32(15))            // query length
            b.writeString("base:allocation")
        }
        return b
    }

    func testMetaContextQueriesAreCappedAtMaxMetaContextQueries() {
        let cap = Int(NBDLimits.maxMetaContextQueries)
        guard case .success(let ok) = NBDMetaContextRequest.parse(metaContextPayload(queries: cap)) else {
            return XCTFail("\(cap) queries should parse")
        }
        XCTAssertEqual(ok.queries.count, cap)
        XCTAssertEqual(NBDMetaContextRequest.parse(metaContextPayload(queries: cap + 1)), .failure(.tooManyQueries))
    }

    func testBlockStatusRepliesStopAtMaxBlockStatusExtents() {
        // Alternating data and holes, each 512 bytes, more of them than one reply may carry.
        let n = NBDLimits.maxBlockStatusExtents + 10
        let extents = (0..<n).map { i in
            BlockExtent(offset: UInt64(i) * 512, length: 512, status: i % 2 == 0 ? [] : [.hole, .zero], depth: 1)
        }
        let plan = BlockStatusDescriptor.plan(extents, context: .baseAllocation, offset: 0, length: UInt64(n) * 512, requestOne: false)
        XCTAssertEqual(plan.count, NBDLimits.maxBlockStatusExtents)
        let one = BlockStatusDescriptor.plan(extents, context: .baseAllocation, offset: 0, length: UInt64(n) * 512, requestOne: true)
        XCTAssertEqual(one.count, 1)
    }

    // MARK: Control socket

    func testJSONNestingIsCappedAtMaxDepth() throws {
        func nested(_ depth: Int) -> String { String(repeating: "[", count: depth) + String(repeating: "]", count: depth) }
        XCTAssertNoThrow(try ControlJSON.parse(nested(ControlLimits.maxDepth)))
        XCTAssertThrowsError(try ControlJSON.parse(nested(ControlLimits.maxDepth + 1))) {
            XCTAssertTrue("\($0)".contains("nested deeper than \(ControlLimits.maxDepth)"), "\($0)")
        }
    }

    /// A control service over one writable qcow2 export in memory, `disk`.
    func service() throws -> (ControlService, ExportRegistry) {
        let storage = MemoryStorage(name: "disk.qcow2")
        var options = CreateOptions(size: 1 << 20)
        options.clusterSize = 4096
        try Qcow2Image.create(storage: storage, path: "disk.qcow2", options: options)
        let disk = try Qcow2Image(storage: storage, options: OpenOptions(writable: true, format: .qcow2))
        let registry = ExportRegistry([Export(name: "disk", device: disk)], logger: testLogger())
        addTeardownBlock { try? registry.closeAll() }
        return (ControlService(registry: registry, defaults: .init(options: OpenOptions(writable: true)), logger: testLogger()), registry)
    }

    func testStringArgumentsAreCappedAtMaxStringBytes() throws {
        let (control, _) = try service()
        let long = String(repeating: "f", count: ControlLimits.maxStringBytes + 1)
        let reply = control.handle(line: Array(#"{"execute": "block-export-add", "arguments": {"name": "x", "file": "\#(long)"}}"#.utf8))
        XCTAssertTrue(reply.contains("argument 'file' is longer than \(ControlLimits.maxStringBytes) bytes"), reply)
        // At the cap, the argument is taken: the open fails for want of the file, not its length.
        let atCap = String(repeating: "f", count: ControlLimits.maxStringBytes)
        let reply2 = control.handle(line: Array(#"{"execute": "block-export-add", "arguments": {"name": "x", "file": "\#(atCap)"}}"#.utf8))
        XCTAssertTrue(reply2.contains("\"error\""), reply2)
        XCTAssertFalse(reply2.contains("longer than"), reply2)
    }

    func testSnapshotNamesAreCappedAtMaxSnapshotNameBytes() throws {
        let (control, _) = try service()
        func create(_ name: String) -> String {
            control.handle(line: Array(#"{"execute": "snapshot-create", "arguments": {"export": "disk", "name": "\#(name)"}}"#.utf8))
        }
        let tooLong = create(String(repeating: "s", count: ControlLimits.maxSnapshotNameBytes + 1))
        XCTAssertTrue(tooLong.contains("argument 'name' is longer than \(ControlLimits.maxSnapshotNameBytes) bytes"), tooLong)
        let atCap = create(String(repeating: "s", count: ControlLimits.maxSnapshotNameBytes))
        XCTAssertTrue(atCap.hasPrefix("{\"return\""), atCap)
    }

    // MARK: TLS

    func testPEMFilesAreCappedAtMaxPEMBytes() throws {
        let dir = try makeTempDir(self)
        let big = "\(dir)/big.pem"
        XCTAssertTrue(FileManager.default.createFile(atPath: big, contents: Data(repeating: 0x41, count: NBDTLSLimits.maxPEMBytes + 1)))
        XCTAssertThrowsError(try NBDTLSConfiguration(certificate: big, key: big)) {
            XCTAssertTrue("\($0)".contains("larger than \(NBDTLSLimits.maxPEMBytes) bytes"), "\($0)")
        }
    }

    // MARK: Listening

    func testUnixSocketPathsAreCappedAtMaxUnixPathBytes() throws {
        let dir = try makeTempDir(self) + "/"
        let path = dir + String(repeating: "s", count: NBDServerError.maxUnixPathBytes + 1 - dir.utf8.count)
        XCTAssertEqual(path.utf8.count, NBDServerError.maxUnixPathBytes + 1)
        let server = NBDServer(registry: ExportRegistry(logger: testLogger()),
                               configuration: NBDServer.Configuration(address: .unix(path: path)), logger: testLogger())
        defer { server.shutdown() }
        XCTAssertThrowsError(try server.start()) {
            XCTAssertTrue("\($0)".contains("at most \(NBDServerError.maxUnixPathBytes)"), "\($0)")
        }
    }
}
