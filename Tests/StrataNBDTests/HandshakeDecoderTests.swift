import NIOCore
import XCTest
import TestSupport

@testable import StrataNBD

/// Framing of the client's handshake bytes, outside any pipeline.
final class HandshakeDecoderTests: XCTestCase {
    /// An option as the client sends it.
    private func option(_ code: UInt32, _ data: [UInt8], magic: UInt64 = 0x4948_4156_454f_5054) -> [UInt8] {
        var b = ByteBuffer()
        b.writeInteger(magic)                // "IHAVEOPT"
        b.writeInteger(code)                 // option code
        b.writeInteger(UInt32(data.count))   // data length
        b.writeBytes(data)                   // data
        return Array(b.readableBytesView)
    }

    func testClientFlagsThenOptionsByteByByte() throws {
        let bytes: [UInt8] = [0, 0, 0, 3] + option(7, [1, 2, 3]) + option(3, [])
        var decoder = HandshakeDecoder()
        var buffer = ByteBuffer()
        var messages: [NBDHandshakeMessage] = []
        for byte in bytes {
            buffer.writeInteger(byte)
            while let m = try decoder.decode(buffer: &buffer) { messages.append(m) }
        }
        XCTAssertEqual(messages, [.clientFlags(3), .option(.go, ByteBuffer(bytes: [1, 2, 3])), .option(.list, ByteBuffer())])
    }

    func testOptionDataIsNotReadBeforeItIsAllThere() throws {
        var decoder = HandshakeDecoder()
        var buffer = ByteBuffer(bytes: [0, 0, 0, 1] + option(9, [UInt8](repeating: 7, count: 100)).dropLast(1))
        XCTAssertEqual(try decoder.decode(buffer: &buffer), .clientFlags(1))
        XCTAssertNil(try decoder.decode(buffer: &buffer))
        XCTAssertEqual(buffer.readableBytes, 16 + 99, "nothing consumed")
        buffer.writeInteger(UInt8(7))
        XCTAssertEqual(try decoder.decode(buffer: &buffer), .option(.listMetaContext, ByteBuffer(repeating: 7, count: 100)))
    }

    func testOverlongOptionIsRefusedBeforeItsDataArrives() {
        var decoder = HandshakeDecoder()
        var buffer = ByteBuffer(bytes: [0, 0, 0, 1])
        _ = try? decoder.decode(buffer: &buffer)
        var header = ByteBuffer()
        header.writeInteger(UInt64(0x4948_4156_454f_5054))
        header.writeInteger(UInt32(1))
        header.writeInteger(NBDLimits.maxOptionLength + 1)  // length only; no data follows
        buffer.writeBuffer(&header)
        XCTAssertThrowsError(try decoder.decode(buffer: &buffer)) {
            XCTAssertEqual($0 as? NBDProtocolError, .optionTooLong(NBDLimits.maxOptionLength + 1))
        }
    }

    func testBadOptionMagic() {
        var decoder = HandshakeDecoder()
        var buffer = ByteBuffer(bytes: [0, 0, 0, 1] + option(3, [], magic: 0x4745_5420_2f20_4854))  // "GET / HT"
        _ = try? decoder.decode(buffer: &buffer)
        XCTAssertThrowsError(try decoder.decode(buffer: &buffer)) {
            XCTAssertEqual($0 as? NBDProtocolError, .badOptionMagic(0x4745_5420_2f20_4854))
        }
    }

    /// Random bytes fed through the decoder and the state machine never crash or loop.
    func testRandomHandshakesNeverCrash() {
        let registry = ExportRegistry([Export(name: "d", device: FakeDevice(size: 4096))])
        var rng = SeededRandom(seed: 7)
        for _ in 0..<2000 {
            var decoder = HandshakeDecoder()
            var machine = HandshakeStateMachine(registry: registry)
            var bytes: [UInt8] = [0, 0, 0, UInt8.random(in: 0...3, using: &rng)]
            for _ in 0..<Int.random(in: 0..<6, using: &rng) {
                let data = (0..<Int.random(in: 0..<24, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
                bytes += option(UInt32.random(in: 0...12, using: &rng), data,
                                magic: UInt8.random(in: 0..<10, using: &rng) == 0 ? 0 : 0x4948_4156_454f_5054)
            }
            var buffer = ByteBuffer(bytes: bytes)
            while !machine.isFinished, let m = try? decoder.decode(buffer: &buffer) {
                _ = machine.receive(m)
            }
        }
    }
}
