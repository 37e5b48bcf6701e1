import Logging
import NIOCore
@testable import Strata
import XCTest

@testable import StrataNBD

/// A structured reply chunk, parsed back from bytes.
struct Chunk: Equatable {
    var flags: UInt16
    var type: UInt16
    var cookie: UInt64
    var payload: [UInt8]

    /// Splits a reply buffer into chunks, checking each header's magic.
    static func parse(_ buffer: ByteBuffer, file: StaticString = #filePath, line: UInt = #line) -> [Chunk] {
        var b = buffer
        var out: [Chunk] = []
        while b.readableBytes > 0 {
            guard let magic = b.readInteger(as: UInt32.self), magic == 0x668e_33ef,
                  let flags = b.readInteger(as: UInt16.self), let type = b.readInteger(as: UInt16.self),
                  let cookie = b.readInteger(as: UInt64.self), let length = b.readInteger(as: UInt32.self),
                  let payload = b.readBytes(length: Int(length))
            else {
                XCTFail("not a structured reply chunk", file: file, line: line)
                return out
            }
            out.append(Chunk(flags: flags, type: type, cookie: cookie, payload: payload))
        }
        return out
    }

    var isDone: Bool { flags & 1 != 0 }
    /// Big-endian integer at `offset` of the payload.
    func u64(_ offset: Int) -> UInt64 { payload[offset..<offset + 8].reduce(0) { $0 << 8 | UInt64($1) } }
    func u32(_ offset: Int) -> UInt32 { payload[offset..<offset + 4].reduce(0) { $0 << 8 | UInt32($1) } }
}

/// The export's side of each command: which device calls it makes and the exact reply bytes.
final class ExportTests: XCTestCase {
    private let logs = CapturedLogs()
    private lazy var logger = logs.logger()

    private func perform(_ command: NBDCommand, on export: Export, structured: Bool = true,
                         contexts: [NBDMetaContext] = []) -> NBDReply {
        export.perform(command, cookie: 0x42, session: NBDSession(export: export, structuredReplies: structured,
                                                                   metaContexts: contexts), logger: logger)
    }

    func testStructuredReadSendsHolesAsHoleChunks() throws {
        let device = FakeDevice(size: 16384)
        try [UInt8](repeating: 7, count: 4096).withUnsafeBytes { try device.write($0, at: 4096, fua: false) }
        device.extents = [
            BlockExtent(offset: 0, length: 4096, status: [.hole, .zero], depth: 0),
            BlockExtent(offset: 4096, length: 4096, status: [], depth: 1),
            BlockExtent(offset: 8192, length: 8192, status: [.zero], depth: 1),
        ]
        let reply = perform(.read(offset: 0, length: 16384, dontFragment: false), on: Export(name: "d", device: device))
        let chunks = Chunk.parse(reply.bytes)
        XCTAssertEqual(chunks.map(\.type), [2, 1, 2])  // hole, data, hole
        guard chunks.count == 3 else { return }
        XCTAssertEqual(chunks.map(\.isDone), [false, false, true])
        XCTAssertTrue(chunks.allSatisfy { $0.cookie == 0x42 })
        XCTAssertEqual(chunks[0].u64(0), 0)
        XCTAssertEqual(chunks[0].u32(8), 4096)
        XCTAssertEqual(chunks[1].u64(0), 4096)
        XCTAssertEqual(Array(chunks[1].payload[8...]), [UInt8](repeating: 7, count: 4096))
        XCTAssertEqual(chunks[2].u64(0), 8192)
        XCTAssertEqual(chunks[2].u32(8), 8192)
        XCTAssertEqual(device.calls.filter { $0.hasPrefix("read") }, ["read 4096 4096"], "holes are not read")
    }

    func testDontFragmentSendsOneDataChunk() {
        let device = FakeDevice(size: 8192)
        device.extents = [BlockExtent(offset: 0, length: 8192, status: [.hole, .zero], depth: 0)]
        let chunks = Chunk.parse(perform(.read(offset: 0, length: 8192, dontFragment: true), on: Export(name: "d", device: device)).bytes)
        XCTAssertEqual(chunks.map(\.type), [1])
        guard chunks.count == 1 else { return }
        XCTAssertEqual(chunks[0].payload.count, 8 + 8192)
        XCTAssertTrue(chunks[0].isDone)
    }

    func testSimpleReadIsHeaderThenData() {
        let device = FakeDevice(size: 4096)
        var reply = perform(.read(offset: 1024, length: 1024, dontFragment: false), on: Export(name: "d", device: device),
                            structured: false).bytes
        XCTAssertEqual(reply.readInteger(as: UInt32.self), 0x6744_6698)  // simple reply magic
        XCTAssertEqual(reply.readInteger(as: UInt32.self), 0)            // no error
        XCTAssertEqual(reply.readInteger(as: UInt64.self), 0x42)         // cookie
        XCTAssertEqual(reply.readableBytes, 1024)                        // the data
    }

    func testDeviceErrorsAreLoggedAndMappedToTheWire() {
        let device = FakeDevice(size: 4096)
        device.failure = .io(path: "/img", SystemCallError(op: "pread", errno: EIO, offset: 0))
        let export = Export(name: "d", device: device)
        let structured = perform(.read(offset: 0, length: 512, dontFragment: false), on: export)
        XCTAssertEqual(structured.error, .io)
        let chunks = Chunk.parse(structured.bytes)
        XCTAssertEqual(chunks.map(\.type), [0x8001])  // NBD_REPLY_TYPE_ERROR, and nothing else
        guard chunks.count == 1 else { return }
        XCTAssertTrue(chunks[0].isDone)
        XCTAssertEqual(chunks[0].u32(0), 5)
        let message = String(decoding: chunks[0].payload[6...], as: UTF8.self)
        XCTAssertTrue(message.contains("READ"), message)
        XCTAssertFalse(message.contains("/img"), "host paths stay in the server log")
        XCTAssertEqual(logs.lines, ["error READ failed on export 'd': /img: pread failed at offset 0: Input/output error (sent EIO)"],
                       "the real cause is logged before the narrow code goes out")

        device.failure = .noSpace(path: "/img")
        var simple = perform(.write(offset: 0, data: ByteBuffer(bytes: [1]), fua: false), on: export, structured: false).bytes
        XCTAssertEqual(simple.readInteger(as: UInt32.self), 0x6744_6698)
        XCTAssertEqual(simple.readInteger(as: UInt32.self), 28)  // ENOSPC
    }

    func testErrnoMapping() {
        XCTAssertEqual(NBDErrno(mapping: StrataError.readOnly(path: "x")), .perm)
        XCTAssertEqual(NBDErrno(mapping: StrataError.outOfRange(offset: 1, length: 1, size: 1)), .invalid)
        XCTAssertEqual(NBDErrno(mapping: StrataError.noSpace(path: "x")), .noSpace)
        XCTAssertEqual(NBDErrno(mapping: StrataError.corrupt(Corruption(path: "x", kind: .pastEnd, offset: 0, detail: "y"))), .io)
        XCTAssertEqual(NBDErrno(mapping: SystemCallError(op: "pwrite", errno: EDQUOT, offset: 0)), .noSpace)
        XCTAssertEqual(NBDErrno(mapping: SystemCallError(op: "pwrite", errno: EFBIG, offset: 0)), .noSpace)
        XCTAssertEqual(NBDErrno(mapping: SystemCallError(op: "pwrite", errno: EROFS, offset: 0)), .perm)
        XCTAssertEqual(NBDErrno(mapping: SystemCallError(op: "x", errno: ENOTSUP, offset: 0)), .notSupported)
        XCTAssertEqual(NBDErrno(mapping: SystemCallError(op: "x", errno: EBADF, offset: 0)), .io)
        struct Other: Error {}
        XCTAssertEqual(NBDErrno(mapping: Other()), .io)
    }

    func testWriteFlagsReachTheDevice() {
        let device = FakeDevice(size: 8192)
        let export = Export(name: "d", device: device)
        _ = perform(.write(offset: 512, data: ByteBuffer(bytes: [1, 2]), fua: true), on: export)
        _ = perform(.writeZeroes(offset: 0, length: 4096, noHole: true, fua: false, fast: false), on: export)
        _ = perform(.writeZeroes(offset: 0, length: 4096, noHole: false, fua: true, fast: false), on: export)
        _ = perform(.trim(offset: 0, length: 4096, fua: true), on: export)
        _ = perform(.flush, on: export)
        XCTAssertEqual(device.calls, ["write 512 2 fua", "zero 0 4096", "zero 0 4096 unmap fua", "discard 0 4096", "flush", "flush"])
    }

    func testDiscardIgnoreTouchesNothingAndNeverUnmaps() {
        let device = FakeDevice(size: 8192)
        let export = Export(name: "d", device: device, discard: .ignore)
        XCTAssertNil(perform(.trim(offset: 0, length: 4096, fua: true), on: export).error)
        _ = perform(.writeZeroes(offset: 0, length: 4096, noHole: false, fua: false, fast: false), on: export)
        XCTAssertEqual(device.calls, ["zero 0 4096"])
    }

    func testFastZeroSucceedsOnlyWhenNothingNeedsWriting() {
        let device = FakeDevice(size: 8192)
        let export = Export(name: "d", device: device)
        device.extents = [BlockExtent(offset: 0, length: 8192, status: [], depth: 1)]
        XCTAssertEqual(perform(.writeZeroes(offset: 0, length: 8192, noHole: false, fua: false, fast: true), on: export).error,
                       .notSupported)
        device.extents = [BlockExtent(offset: 0, length: 8192, status: [.hole, .zero], depth: 0)]
        XCTAssertNil(perform(.writeZeroes(offset: 0, length: 8192, noHole: false, fua: false, fast: true), on: export).error)
        XCTAssertEqual(perform(.writeZeroes(offset: 0, length: 8192, noHole: true, fua: false, fast: true), on: export).error,
                       .notSupported, "NO_HOLE over a hole must allocate, which is not fast")
        XCTAssertFalse(device.calls.contains { $0.hasPrefix("zero") }, "a refused fast zero changes nothing")
    }

    func testBlockStatusOneChunkPerContext() {
        let device = FakeDevice(size: 1 << 20)
        device.extents = [
            BlockExtent(offset: 0, length: 65536, status: [], depth: 1),
            BlockExtent(offset: 65536, length: 65536, status: [.zero], depth: 2),
            BlockExtent(offset: 131072, length: 917504, status: [.hole, .zero], depth: 0),
        ]
        let export = Export(name: "d", device: device)
        let chunks = Chunk.parse(perform(.blockStatus(offset: 0, length: 1 << 20, requestOne: false), on: export,
                                         contexts: [.baseAllocation, .allocationDepth]).bytes)
        XCTAssertEqual(chunks.map(\.type), [5, 5])
        guard chunks.count == 2, chunks[0].payload.count == 4 + 3 * 8, chunks[1].payload.count == 4 + 3 * 8 else {
            return XCTFail("expected two chunks of three descriptors")
        }
        XCTAssertEqual(chunks.map(\.isDone), [false, true])
        // base:allocation: id 1, then (length, flags) pairs.
        XCTAssertEqual(chunks[0].u32(0), 1)
        XCTAssertEqual((0..<3).map { chunks[0].u32(4 + 8 * $0) }, [65536, 65536, 917504])
        XCTAssertEqual((0..<3).map { chunks[0].u32(8 + 8 * $0) }, [0, 2, 3])
        // qemu:allocation-depth: id 2.
        XCTAssertEqual(chunks[1].u32(0), 2)
        XCTAssertEqual((0..<3).map { chunks[1].u32(8 + 8 * $0) }, [1, 2, 0])

        let one = Chunk.parse(perform(.blockStatus(offset: 0, length: 4096, requestOne: true), on: export,
                                      contexts: [.baseAllocation]).bytes)
        XCTAssertEqual(one.count, 1)
        guard one.count == 1 else { return }
        XCTAssertEqual(one[0].payload.count, 4 + 8, "REQ_ONE: exactly one descriptor")
        XCTAssertEqual(one[0].u32(4), 4096, "never longer than the request")
    }

    func testDescriptorPlanningMergesCutsAndFillsGaps() {
        let extents = [
            BlockExtent(offset: 0, length: 100, status: [.zero], depth: 1),
            BlockExtent(offset: 100, length: 100, status: [.zero], depth: 2),
            BlockExtent(offset: 300, length: 1000, status: [.hole, .zero], depth: 0),
        ]
        XCTAssertEqual(BlockStatusDescriptor.plan(extents, context: .baseAllocation, offset: 0, length: 1000, requestOne: false),
                       [.init(length: 200, flags: 2), .init(length: 100, flags: 0), .init(length: 700, flags: 3)])
        XCTAssertEqual(BlockStatusDescriptor.plan(extents, context: .allocationDepth, offset: 50, length: 100, requestOne: false),
                       [.init(length: 50, flags: 1), .init(length: 50, flags: 2)])
        XCTAssertEqual(BlockStatusDescriptor.plan([], context: .baseAllocation, offset: 0, length: 10, requestOne: false),
                       [.init(length: 10, flags: 0)], "an empty answer still yields one descriptor")
    }

    func testTransmissionFlagsAreTruthful() {
        let rw = Export(name: "rw", device: FakeDevice(size: 512))
        XCTAssertEqual(rw.transmissionFlags(structuredReplies: true),
                       [.hasFlags, .sendFlush, .sendFUA, .sendCache, .canMultiConn, .sendTrim, .sendWriteZeroes,
                        .sendFastZero, .sendDF])
        let ro = Export(name: "ro", device: FakeDevice(size: 512, readOnly: true))
        XCTAssertEqual(ro.transmissionFlags(structuredReplies: false),
                       [.hasFlags, .readOnly, .sendFlush, .sendFUA, .sendCache, .canMultiConn])
    }

    func testPreferredBlockSizeIsAPowerOfTwoInRange() {
        XCTAssertEqual(Export(name: "a", device: FakeDevice(size: 512, preferredBlockSize: 65536)).preferredBlockSize, 65536)
        XCTAssertEqual(Export(name: "b", device: FakeDevice(size: 512, preferredBlockSize: 1)).preferredBlockSize, 512)
        XCTAssertEqual(Export(name: "c", device: FakeDevice(size: 512, preferredBlockSize: 3000)).preferredBlockSize, 4096)
    }

    func testOneImageNamedTwiceIsOpenedOnce() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/shared.qcow2", size: "1M")
        try FileManager.default.createSymbolicLink(atPath: "\(dir)/link.qcow2", withDestinationPath: "\(dir)/shared.qcow2")
        // A second writable open would fail on the image lock; a shared device does not.
        let registry = try ExportRegistry.open([.init(name: "a", path: "\(dir)/shared.qcow2"),
                                                .init(name: "b", path: "\(dir)/link.qcow2")],
                                               options: OpenOptions(writable: true), discard: .unmap, description: nil,
                                               logger: testLogger())
        XCTAssertTrue(registry.exports[0].device === registry.exports[1].device)
        XCTAssertTrue(registry.lookup("")?.name == "a", "the first export is the default")
        XCTAssertNil(registry.lookup("c"))
        try registry.closeAll()
    }

    func testAFailedOpenLeavesNoImageLocked() throws {
        let dir = try makeTempDir(self)
        try makeQcow2("\(dir)/ok.qcow2", size: "1M")
        XCTAssertThrowsError(try ExportRegistry.open([.init(name: "ok", path: "\(dir)/ok.qcow2"),
                                                      .init(name: "missing", path: "\(dir)/missing.qcow2")],
                                                     options: OpenOptions(writable: true), discard: .unmap, description: nil,
                                                     logger: testLogger()))
        // The first image's lock was released: it opens again for writing.
        let again = try openImage(path: "\(dir)/ok.qcow2", options: OpenOptions(writable: true))
        try again.close()
    }
}
