import NIOCore
import XCTest

@testable import StrataNBD

/// Every refusal the validator makes, with the error code the protocol asks for.
final class RequestValidatorTests: XCTestCase {
    private let writable = Export(name: "rw", device: FakeDevice(size: 1 << 20))
    private let readOnly = Export(name: "ro", device: FakeDevice(size: 1 << 20), readOnly: true)

    private func session(_ export: Export, structured: Bool = true, contexts: [NBDMetaContext] = [.baseAllocation]) -> NBDSession {
        NBDSession(export: export, structuredReplies: structured, metaContexts: contexts)
    }

    private func check(_ type: NBDCommandType, flags: NBDCommandFlags = [], offset: UInt64 = 0, length: UInt32 = 512,
                       payload: NBDRequest.Payload? = nil, in s: NBDSession) -> Result<NBDCommand, NBDRejection> {
        let p = payload ?? (type == .write ? .data(ByteBuffer(repeating: 1, count: Int(length))) : .none)
        return RequestValidator.validate(
            NBDRequest(header: NBDRequestHeader(flags: flags, type: type, cookie: 1, offset: offset, length: length), payload: p),
            session: s)
    }

    private func assertRejected(_ r: Result<NBDCommand, NBDRejection>, _ expected: NBDErrno,
                                file: StaticString = #filePath, line: UInt = #line) {
        switch r {
        case .success(let c): XCTFail("accepted \(c.name), expected \(expected)", file: file, line: line)
        case .failure(let e): XCTAssertEqual(e.error, expected, e.message, file: file, line: line)
        }
    }

    private func assertAccepted(_ r: Result<NBDCommand, NBDRejection>, file: StaticString = #filePath, line: UInt = #line) {
        if case .failure(let e) = r { XCTFail("refused: \(e.message)", file: file, line: line) }
    }

    func testUnknownCommandIsEINVAL() {
        assertRejected(check(NBDCommandType(rawValue: 8), in: session(writable)), .invalid)      // RESIZE: not offered
        assertRejected(check(NBDCommandType(rawValue: 0x1234), in: session(writable)), .invalid)
    }

    func testWritesToAReadOnlyExportAreEPERM() {
        assertRejected(check(.write, in: session(readOnly)), .perm)
        assertRejected(check(.writeZeroes, in: session(readOnly)), .perm)
        assertRejected(check(.trim, in: session(readOnly)), .perm)
        assertAccepted(check(.read, in: session(readOnly)))
        assertAccepted(check(.flush, length: 0, in: session(readOnly)))
        assertAccepted(check(.cache, in: session(readOnly)))
    }

    func testUnknownAndMisplacedFlagsAreEINVAL() {
        assertRejected(check(.read, flags: NBDCommandFlags(rawValue: 1 << 7), in: session(writable)), .invalid)
        assertRejected(check(.read, flags: .noHole, in: session(writable)), .invalid)
        assertRejected(check(.write, flags: .requestOne, in: session(writable)), .invalid)
        assertRejected(check(.blockStatus, flags: .fastZero, in: session(writable)), .invalid)
        assertRejected(check(.read, flags: .dontFragment, in: session(writable, structured: false)), .invalid)
        assertAccepted(check(.read, flags: [.dontFragment, .fua], in: session(writable)))
        assertAccepted(check(.writeZeroes, flags: [.noHole, .fastZero, .fua], in: session(writable)))
        assertAccepted(check(.blockStatus, flags: .requestOne, in: session(writable)))
        assertAccepted(check(.trim, flags: .fua, in: session(writable)))
    }

    func testZeroLengthIsEINVALAndFlushMustBeEmpty() {
        for type in [NBDCommandType.read, .write, .writeZeroes, .trim, .cache, .blockStatus] {
            assertRejected(check(type, length: 0, in: session(writable)), .invalid)
        }
        assertRejected(check(.flush, offset: 0, length: 1, in: session(writable)), .invalid)
        assertRejected(check(.flush, offset: 512, length: 0, in: session(writable)), .invalid)
    }

    func testPayloadsAboveTheCapAreEINVAL() {
        let big = NBDLimits.maxPayload + 1
        let export = Export(name: "big", device: FakeDevice(size: 64 << 20))
        assertRejected(check(.read, length: big, in: session(export)), .invalid)
        assertRejected(check(.write, length: big, payload: .discarded, in: session(export)), .invalid)
        // Commands without payload may cover more than the cap.
        assertAccepted(check(.writeZeroes, length: big, in: session(export)))
        assertAccepted(check(.trim, length: big, in: session(export)))
        assertAccepted(check(.blockStatus, length: big, in: session(export)))
    }

    func testOutOfRangeIsENOSPCForWritesAndEINVALOtherwise() {
        let end: UInt64 = 1 << 20
        assertRejected(check(.write, offset: end - 256, length: 512, in: session(writable)), .noSpace)
        assertRejected(check(.writeZeroes, offset: end, length: 1, in: session(writable)), .noSpace)
        assertRejected(check(.read, offset: end - 256, length: 512, in: session(writable)), .invalid)
        assertRejected(check(.trim, offset: end + 1, length: 1, in: session(writable)), .invalid)
        assertRejected(check(.cache, offset: UInt64.max, length: 2, in: session(writable)), .invalid)
        assertRejected(check(.blockStatus, offset: UInt64.max - 1, length: 4, in: session(writable)), .invalid)
        assertAccepted(check(.read, offset: end - 512, length: 512, in: session(writable)))
    }

    /// The range check uses the image's size now, not the size when the client connected.
    func testTheRangeCheckFollowsTheImageSize() {
        let device = FakeDevice(size: 1 << 20)
        let s = session(Export(name: "g", device: device))
        assertRejected(check(.write, offset: 1 << 20, length: 512, in: s), .noSpace)
        device.size = 2 << 20
        assertAccepted(check(.write, offset: 1 << 20, length: 512, in: s))
        device.size = 1 << 19
        assertRejected(check(.read, offset: 1 << 19, length: 512, in: s), .invalid)
    }

    func testBlockStatusNeedsANegotiatedContext() {
        assertRejected(check(.blockStatus, in: session(writable, contexts: [])), .invalid)
    }

    func testDisconnectIsObeyedWhateverItCarries() {
        guard case .success(.disconnect) = check(.disconnect, flags: NBDCommandFlags(rawValue: 0xff), offset: 9, length: 9,
                                                 in: session(readOnly)) else { return XCTFail() }
    }

    func testWireFlagsBecomeBackendFlags() {
        guard case .success(.writeZeroes(_, _, let noHole, let fua, let fast)) =
                check(.writeZeroes, flags: [.noHole, .fua], in: session(writable)) else { return XCTFail() }
        XCTAssertTrue(noHole)
        XCTAssertTrue(fua)
        XCTAssertFalse(fast)
        guard case .success(.read(_, _, let df)) = check(.read, flags: .dontFragment, in: session(writable)) else {
            return XCTFail()
        }
        XCTAssertTrue(df)
    }
}
