import NIOCore

/// Frames the client's side of the fixed-newstyle handshake: first the 32-bit client flags,
/// then options.
///
/// ```
/// option:  64 bits  magic "IHAVEOPT"
///          32 bits  option code
///          32 bits  length N (<= NBDLimits.maxOptionLength)
///          N bytes  option data
/// ```
///
/// A single-step decoder: it peeks before consuming and returns nil until a whole message is
/// buffered, so it can be fuzzed outside a pipeline.
public struct HandshakeDecoder: NIOSingleStepByteToMessageDecoder {
    public typealias InboundOut = NBDHandshakeMessage

    private var sawClientFlags = false

    public init() {}

    public mutating func decode(buffer: inout ByteBuffer) throws -> NBDHandshakeMessage? {
        guard sawClientFlags else {
            guard let flags = buffer.readInteger(as: UInt32.self) else { return nil }
            sawClientFlags = true
            return .clientFlags(flags)
        }
        let start = buffer.readerIndex
        guard buffer.readableBytes >= 16 else { return nil }
        let magic = buffer.getInteger(at: start, as: UInt64.self)!
        guard magic == NBDMagic.option else { throw NBDProtocolError.badOptionMagic(magic) }
        let code = buffer.getInteger(at: start + 8, as: UInt32.self)!
        let length = buffer.getInteger(at: start + 12, as: UInt32.self)!
        guard length <= NBDLimits.maxOptionLength else { throw NBDProtocolError.optionTooLong(length) }
        guard buffer.readableBytes >= 16 + Int(length) else { return nil }
        buffer.moveReaderIndex(forwardBy: 16)
        let data = buffer.readSlice(length: Int(length))!
        return .option(NBDOptionCode(rawValue: code), data)
    }

    public mutating func decodeLast(buffer: inout ByteBuffer, seenEOF: Bool) throws -> NBDHandshakeMessage? {
        try decode(buffer: &buffer)
    }
}
