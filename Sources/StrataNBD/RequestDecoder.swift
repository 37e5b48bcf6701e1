import NIOCore

/// Turns the transmission-phase byte stream into ``NBDRequest`` values, one per call.
///
/// It knows only the wire format: a 28-byte header, followed by `length` bytes of data when
/// the command is `NBD_CMD_WRITE`. Whether a request is allowed is the validator's business;
/// the decoder's one job beyond framing is to keep the stream in step, so it reads the data
/// of *every* write, even one the validator will refuse. Data longer than
/// ``NBDLimits/maxPayload`` is read and thrown away in pieces instead of being buffered, and
/// the request comes out with ``NBDRequest/Payload-swift.enum/discarded``.
///
/// Like every `NIOSingleStepByteToMessageDecoder`, it peeks before consuming and returns nil
/// when it needs more bytes, so it can be driven (and fuzzed) on a plain `ByteBuffer`.
public struct RequestDecoder: NIOSingleStepByteToMessageDecoder {
    public typealias InboundOut = NBDRequest

    private enum State {
        /// Waiting for a 28-byte header.
        case header
        /// A write header was read; waiting for all of its data.
        case data(NBDRequestHeader)
        /// A write too large to buffer; `remaining` bytes of its data still to throw away.
        case discarding(NBDRequestHeader, remaining: Int)
    }

    private var state: State = .header
    private let maxPayload: UInt32

    /// - Parameter maxPayload: the largest write whose data is kept; longer writes are drained.
    public init(maxPayload: UInt32 = NBDLimits.maxPayload) {
        self.maxPayload = maxPayload
    }

    /// Bytes the decoder knows it still needs before it can produce the current request
    /// (0 when it has not seen a header yet). The handler uses it to reserve buffer space once
    /// instead of growing it read by read.
    public var bytesAwaited: Int {
        switch state {
        case .header: return 0
        case .data(let h): return Int(h.length)
        case .discarding: return 0
        }
    }

    /// True when a request has been partly received.
    public var isMidRequest: Bool {
        if case .header = state { return false }
        return true
    }

    public mutating func decode(buffer: inout ByteBuffer) throws -> NBDRequest? {
        switch state {
        case .header:
            guard buffer.readableBytes >= NBDRequestHeader.size else { return nil }
            let magic = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self)!
            guard magic == NBDMagic.request else { throw NBDProtocolError.badRequestMagic(magic) }
            buffer.moveReaderIndex(forwardBy: 4)
            let header = NBDRequestHeader(
                flags: NBDCommandFlags(rawValue: buffer.readInteger()!),
                type: NBDCommandType(rawValue: buffer.readInteger()!),
                cookie: buffer.readInteger()!,
                offset: buffer.readInteger()!,
                length: buffer.readInteger()!)
            guard header.type == .write else { return NBDRequest(header: header) }
            if header.length > maxPayload {
                state = .discarding(header, remaining: Int(header.length))
            } else {
                state = .data(header)
            }
            return try decode(buffer: &buffer)

        case .data(let header):
            guard let data = buffer.readSlice(length: Int(header.length)) else { return nil }
            state = .header
            return NBDRequest(header: header, payload: .data(data))

        case .discarding(let header, let remaining):
            let n = min(remaining, buffer.readableBytes)
            buffer.moveReaderIndex(forwardBy: n)
            guard n == remaining else {
                state = .discarding(header, remaining: remaining - n)
                return nil
            }
            state = .header
            return NBDRequest(header: header, payload: .discarded)
        }
    }

    public mutating func decodeLast(buffer: inout ByteBuffer, seenEOF: Bool) throws -> NBDRequest? {
        if let request = try decode(buffer: &buffer) { return request }
        if buffer.readableBytes > 0 || isMidRequest {
            throw NBDProtocolError.truncatedMessage(phase: "request", bytesLeft: buffer.readableBytes)
        }
        return nil
    }
}
