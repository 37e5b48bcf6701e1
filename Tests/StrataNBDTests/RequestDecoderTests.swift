import NIOCore
import XCTest
import TestSupport

@testable import StrataNBD

/// The request decoder on hand-built bytes, outside any pipeline.
final class RequestDecoderTests: XCTestCase {
    /// A request header, field by field.
    private func header(flags: UInt16 = 0, type: UInt16, cookie: UInt64, offset: UInt64, length: UInt32) -> [UInt8] {
        var b = ByteBuffer()
        b.writeInteger(UInt32(0x2560_9513))  // NBD_REQUEST_MAGIC
        b.writeInteger(flags)                // command flags
        b.writeInteger(type)                 // command type
        b.writeInteger(cookie)               // cookie, echoed in the reply
        b.writeInteger(offset)               // offset
        b.writeInteger(length)               // length
        return Array(b.readableBytesView)
    }

    func testReadRequestDecodesEveryField() throws {
        var decoder = RequestDecoder()
        var buffer = ByteBuffer(bytes: header(flags: 0x0004, type: 0, cookie: 0xdead_beef_0102_0304, offset: 4096, length: 512))
        let request = try XCTUnwrap(try decoder.decode(buffer: &buffer))
        XCTAssertEqual(request.header, NBDRequestHeader(flags: .dontFragment, type: .read,
                                                        cookie: 0xdead_beef_0102_0304, offset: 4096, length: 512))
        guard case .none = request.payload else { return XCTFail("a read has no payload") }
        XCTAssertEqual(buffer.readableBytes, 0)
    }

    func testHeaderSplitAtEveryByteNeedsMoreData() throws {
        let bytes = header(type: 3, cookie: 7, offset: 0, length: 0)
        for cut in 0..<bytes.count {
            var decoder = RequestDecoder()
            var buffer = ByteBuffer(bytes: bytes[0..<cut])
            XCTAssertNil(try decoder.decode(buffer: &buffer), "cut at \(cut)")
            XCTAssertEqual(buffer.readableBytes, cut, "nothing is consumed before a whole header is there")
            buffer.writeBytes(bytes[cut...])
            XCTAssertEqual(try decoder.decode(buffer: &buffer)?.header.type, .flush)
        }
    }

    func testWriteWaitsForItsWholePayload() throws {
        var decoder = RequestDecoder()
        var buffer = ByteBuffer(bytes: header(type: 1, cookie: 1, offset: 0, length: 5))
        buffer.writeBytes([1, 2, 3])
        XCTAssertNil(try decoder.decode(buffer: &buffer))
        XCTAssertEqual(decoder.bytesAwaited, 5)
        buffer.writeBytes([4, 5])
        buffer.writeBytes(header(type: 3, cookie: 2, offset: 0, length: 0))  // the next request, pipelined
        let write = try XCTUnwrap(try decoder.decode(buffer: &buffer))
        guard case .data(let data) = write.payload else { return XCTFail("expected data") }
        XCTAssertEqual(Array(data.readableBytesView), [1, 2, 3, 4, 5])
        XCTAssertEqual(try decoder.decode(buffer: &buffer)?.header.cookie, 2)
    }

    /// Regression guard for stream sync: a write above the payload cap is drained in pieces,
    /// never buffered, and the request after it decodes normally.
    func testOversizedWriteIsDrainedAndTheStreamStaysInStep() throws {
        var decoder = RequestDecoder(maxPayload: 16)
        var buffer = ByteBuffer(bytes: header(type: 1, cookie: 9, offset: 0, length: 40))
        buffer.writeBytes([UInt8](repeating: 0xAA, count: 10))
        XCTAssertNil(try decoder.decode(buffer: &buffer))
        XCTAssertEqual(buffer.readableBytes, 0, "drained bytes are consumed as they arrive")
        buffer.writeBytes([UInt8](repeating: 0xAA, count: 30))
        buffer.writeBytes(header(type: 0, cookie: 10, offset: 0, length: 1))
        let drained = try XCTUnwrap(try decoder.decode(buffer: &buffer))
        XCTAssertEqual(drained.header.cookie, 9)
        guard case .discarded = drained.payload else { return XCTFail("expected a discarded payload") }
        XCTAssertEqual(try decoder.decode(buffer: &buffer)?.header.cookie, 10)
    }

    func testNonWriteCommandsNeverCarryData() throws {
        // A read of 1 MiB is followed directly by the next header, not by data.
        var decoder = RequestDecoder()
        var buffer = ByteBuffer(bytes: header(type: 0, cookie: 1, offset: 0, length: 1 << 20)
                                + header(type: 6, cookie: 2, offset: 0, length: 1 << 30))
        XCTAssertEqual(try decoder.decode(buffer: &buffer)?.header.cookie, 1)
        XCTAssertEqual(try decoder.decode(buffer: &buffer)?.header.type, .writeZeroes)
    }

    func testUnknownCommandTypesAndFlagsSurviveDecoding() throws {
        var decoder = RequestDecoder()
        var buffer = ByteBuffer(bytes: header(flags: 0x8000, type: 0x4242, cookie: 3, offset: 0, length: 0))
        let request = try XCTUnwrap(try decoder.decode(buffer: &buffer))
        XCTAssertEqual(request.header.type.rawValue, 0x4242)
        XCTAssertEqual(request.header.flags.rawValue, 0x8000)
    }

    func testBadMagicIsAProtocolError() {
        var decoder = RequestDecoder()
        var bytes = header(type: 0, cookie: 1, offset: 0, length: 1)
        bytes[0] = 0x21  // 0x21e41c71 would be the extended-header magic, which we never offer
        var buffer = ByteBuffer(bytes: bytes)
        XCTAssertThrowsError(try decoder.decode(buffer: &buffer)) { error in
            XCTAssertEqual(error as? NBDProtocolError, .badRequestMagic(0x2160_9513))
        }
    }

    func testEOFInTheMiddleOfARequestIsReported() {
        var decoder = RequestDecoder()
        var buffer = ByteBuffer(bytes: header(type: 1, cookie: 1, offset: 0, length: 8) + [1, 2])
        XCTAssertNil(try decoder.decode(buffer: &buffer))
        XCTAssertThrowsError(try decoder.decodeLast(buffer: &buffer, seenEOF: true))
    }

    /// Arbitrary bytes never crash the decoder or make it consume more than it was given.
    func testRandomBytesNeverCrash() {
        var rng = SeededRandom(seed: 0x5eed)
        for _ in 0..<2000 {
            var decoder = RequestDecoder(maxPayload: 64)
            let count = Int.random(in: 0..<200, using: &rng)
            var bytes = (0..<count).map { _ in UInt8.random(in: 0...255, using: &rng) }
            if count >= 4, Bool.random(using: &rng) { bytes.replaceSubrange(0..<4, with: [0x25, 0x60, 0x95, 0x13]) }
            var buffer = ByteBuffer(bytes: bytes)
            while let _ = try? decoder.decode(buffer: &buffer) {}
            XCTAssertLessThanOrEqual(buffer.readableBytes, count)
        }
    }
}
