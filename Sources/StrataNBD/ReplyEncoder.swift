import NIOCore

/// One reply to an option during the handshake, before encoding.
struct NBDOptionReply: Equatable, Sendable {
    enum Payload: Equatable, Sendable {
        case none
        /// `NBD_REP_SERVER`: an export name and optional human-readable details.
        case server(name: String, details: String?)
        /// `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
        case exportInfo(size: UInt64, flags: NBDTransmissionFlags)
        /// `NBD_REP_INFO` / `NBD_INFO_NAME`.
        case nameInfo(String)
        /// `NBD_REP_INFO` / `NBD_INFO_DESCRIPTION`.
        case descriptionInfo(String)
        /// `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
        case blockSizeInfo(minimum: UInt32, preferred: UInt32, maximum: UInt32)
        /// `NBD_REP_META_CONTEXT`.
        case metaContext(id: UInt32, name: String)
        /// A message for a human, carried by error replies.
        case message(String)
    }

    var option: NBDOptionCode
    var type: NBDOptionReplyType
    var payload: Payload = .none

    static func ack(_ option: NBDOptionCode) -> NBDOptionReply {
        NBDOptionReply(option: option, type: .ack)
    }

    static func error(_ option: NBDOptionCode, _ type: NBDOptionReplyType, _ message: String) -> NBDOptionReply {
        precondition(type.isError)
        return NBDOptionReply(option: option, type: type, payload: .message(message))
    }
}

/// Writes every server-to-client message of both phases. Pure functions over `ByteBuffer`;
/// integers are big-endian, as everywhere in NBD.
enum ReplyEncoder {
    /// Bytes of a simple reply header.
    static let simpleReplySize = 16
    /// Bytes of a structured reply chunk header.
    static let chunkHeaderSize = 20

    // MARK: Handshake

    /// The greeting: `NBDMAGIC`, `IHAVEOPT`, 16 bits of handshake flags.
    static func writeGreeting(flags: NBDHandshakeFlags, into buffer: inout ByteBuffer) {
        buffer.writeInteger(NBDMagic.initPassword)
        buffer.writeInteger(NBDMagic.option)
        buffer.writeInteger(flags.rawValue)
    }

    /// An option reply:
    /// ```
    /// 64 bits  magic 0x3e889045565a9
    /// 32 bits  option being answered
    /// 32 bits  reply type
    /// 32 bits  payload length
    /// ...      payload
    /// ```
    static func writeOptionReply(_ reply: NBDOptionReply, into buffer: inout ByteBuffer) {
        buffer.writeInteger(NBDMagic.optionReply)
        buffer.writeInteger(reply.option.rawValue)
        buffer.writeInteger(reply.type.rawValue)
        let lengthIndex = buffer.writerIndex
        buffer.writeInteger(UInt32(0))
        let start = buffer.writerIndex
        switch reply.payload {
        case .none:
            break
        case .server(let name, let details):
            buffer.writeInteger(UInt32(name.utf8.count))
            buffer.writeString(name)
            if let details { buffer.writeString(details) }
        case .exportInfo(let size, let flags):
            buffer.writeInteger(NBDInfoType.export.rawValue)
            buffer.writeInteger(size)
            buffer.writeInteger(flags.rawValue)
        case .nameInfo(let name):
            buffer.writeInteger(NBDInfoType.name.rawValue)
            buffer.writeString(name)
        case .descriptionInfo(let text):
            buffer.writeInteger(NBDInfoType.description.rawValue)
            buffer.writeString(text)
        case .blockSizeInfo(let minimum, let preferred, let maximum):
            buffer.writeInteger(NBDInfoType.blockSize.rawValue)
            buffer.writeInteger(minimum)
            buffer.writeInteger(preferred)
            buffer.writeInteger(maximum)
        case .metaContext(let id, let name):
            buffer.writeInteger(id)
            buffer.writeString(name)
        case .message(let text):
            buffer.writeString(text)
        }
        buffer.setInteger(UInt32(buffer.writerIndex - start), at: lengthIndex)
    }

    /// The answer to `NBD_OPT_EXPORT_NAME`: size, transmission flags, and 124 zero bytes
    /// unless the client negotiated `NBD_FLAG_C_NO_ZEROES`.
    static func writeExportNameReply(size: UInt64, flags: NBDTransmissionFlags, zeroes: Bool,
                                     into buffer: inout ByteBuffer) {
        buffer.writeInteger(size)
        buffer.writeInteger(flags.rawValue)
        if zeroes { buffer.writeRepeatingByte(0, count: 124) }
    }

    // MARK: Transmission

    /// A simple reply header: magic, error (0 for success), cookie. Read data follows it.
    static func writeSimpleReply(cookie: UInt64, error: NBDErrno?, into buffer: inout ByteBuffer) {
        buffer.writeInteger(NBDMagic.simpleReply)
        buffer.writeInteger(error?.rawValue ?? 0)
        buffer.writeInteger(cookie)
    }

    /// A structured reply chunk header:
    /// ```
    /// 32 bits  magic 0x668e33ef
    /// 16 bits  flags (bit 0: done)
    /// 16 bits  type
    /// 64 bits  cookie
    /// 32 bits  payload length
    /// ```
    static func writeChunkHeader(cookie: UInt64, type: NBDReplyType, flags: NBDReplyFlags, length: UInt32,
                                 into buffer: inout ByteBuffer) {
        buffer.writeInteger(NBDMagic.structuredReply)
        buffer.writeInteger(flags.rawValue)
        buffer.writeInteger(type.rawValue)
        buffer.writeInteger(cookie)
        buffer.writeInteger(length)
    }

    /// The header of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk (64-bit offset included); the
    /// caller appends exactly `dataLength` bytes of data.
    static func writeDataChunkHeader(cookie: UInt64, offset: UInt64, dataLength: Int, flags: NBDReplyFlags,
                                     into buffer: inout ByteBuffer) {
        writeChunkHeader(cookie: cookie, type: .offsetData, flags: flags, length: UInt32(8 + dataLength), into: &buffer)
        buffer.writeInteger(offset)
    }

    /// An `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: 64-bit offset, 32-bit nonzero size.
    static func writeHoleChunk(cookie: UInt64, offset: UInt64, length: UInt32, flags: NBDReplyFlags,
                               into buffer: inout ByteBuffer) {
        precondition(length > 0)
        writeChunkHeader(cookie: cookie, type: .offsetHole, flags: flags, length: 12, into: &buffer)
        buffer.writeInteger(offset)
        buffer.writeInteger(length)
    }

    /// An `NBD_REPLY_TYPE_ERROR` chunk, always the last of its reply: 32-bit error, 16-bit
    /// message length, message (cut to the protocol's 4096-byte string limit).
    static func writeErrorChunk(cookie: UInt64, error: NBDErrno, message: String, into buffer: inout ByteBuffer) {
        var text = Array(message.utf8)
        if text.count > NBDLimits.maxStringLength {
            text.removeSubrange(NBDLimits.maxStringLength...)
            // Drop the last character rather than leave half a UTF-8 sequence.
            while let last = text.last, last & 0xC0 == 0x80 { text.removeLast() }
            if let last = text.last, last >= 0xC0 { text.removeLast() }
        }
        writeChunkHeader(cookie: cookie, type: .error, flags: .done, length: UInt32(6 + text.count), into: &buffer)
        buffer.writeInteger(error.rawValue)
        buffer.writeInteger(UInt16(text.count))
        buffer.writeBytes(text)
    }

    /// An `NBD_REPLY_TYPE_BLOCK_STATUS` chunk: 32-bit context id, then a 32-bit length and
    /// 32-bit flags per descriptor.
    static func writeBlockStatusChunk(cookie: UInt64, contextID: UInt32, descriptors: [BlockStatusDescriptor],
                                      flags: NBDReplyFlags, into buffer: inout ByteBuffer) {
        precondition(!descriptors.isEmpty)
        writeChunkHeader(cookie: cookie, type: .blockStatus, flags: flags,
                         length: UInt32(4 + 8 * descriptors.count), into: &buffer)
        buffer.writeInteger(contextID)
        for d in descriptors {
            buffer.writeInteger(d.length)
            buffer.writeInteger(d.flags)
        }
    }
}

/// Lays out a structured read reply in place, run by run, as the engine reads it: a chunk
/// header, then (for data) the bytes the engine reads straight behind it. A run of the same
/// kind as the previous one extends its chunk; the last chunk gets `NBD_REPLY_FLAG_DONE`.
/// Big-endian fields are stored here, in the reply codec, like the rest of the wire format.
struct StructuredReadWriter {
    private let space: UnsafeMutableRawBufferPointer
    private let cookie: UInt64
    private var written = 0
    /// Where the last chunk's header starts, and whether it is a data chunk.
    private var last: (at: Int, data: Bool)?

    /// Bytes of a data chunk before its payload (header + offset), of a whole hole chunk.
    static let dataOverhead = ReplyEncoder.chunkHeaderSize + 8
    static let holeSize = ReplyEncoder.chunkHeaderSize + 12

    /// Room for any structured read of `length` bytes: every run but the first and the last
    /// spans at least a sector (engine runs break at (sub)cluster or file-block boundaries), so
    /// there are at most `length / 512 + 2` chunks.
    static func capacity(forLength length: Int) -> Int {
        length + (length / 512 + 2) * max(dataOverhead, holeSize)
    }

    init(space: UnsafeMutableRawBufferPointer, cookie: UInt64) {
        self.space = space
        self.cookie = cookie
    }

    private func store<T: FixedWidthInteger>(_ v: T, at i: Int) {
        space.storeBytes(of: v.bigEndian, toByteOffset: i, as: T.self)
    }
    private func load32(at i: Int) -> UInt32 {
        UInt32(bigEndian: space.loadUnaligned(fromByteOffset: i, as: UInt32.self))
    }

    /// The destination of the next run's data (nil for a zero run).
    mutating func run(offset: UInt64, length: Int, zero: Bool) throws -> UnsafeMutableRawBufferPointer? {
        if let l = last, l.data == !zero {
            if zero {
                store(load32(at: l.at + 28) + UInt32(length), at: l.at + 28)   // hole size
            } else {
                store(load32(at: l.at + 16) + UInt32(length), at: l.at + 16)   // payload length
            }
        } else {
            precondition(written + (zero ? Self.holeSize : Self.dataOverhead + length) <= space.count,
                         "structured read reply outgrew its room")
            last = (written, !zero)
            store(NBDMagic.structuredReply, at: written)
            store(UInt16(0), at: written + 4)
            store((zero ? NBDReplyType.offsetHole : NBDReplyType.offsetData).rawValue, at: written + 6)
            store(cookie, at: written + 8)
            store(UInt32(zero ? 12 : 8 + length), at: written + 16)
            store(offset, at: written + 20)
            if zero { store(UInt32(length), at: written + 28) }
            written += zero ? Self.holeSize : Self.dataOverhead
        }
        guard !zero else { return nil }
        precondition(written + length <= space.count, "structured read reply outgrew its room")
        let out = UnsafeMutableRawBufferPointer(rebasing: space[written..<written + length])
        written += length
        return out
    }

    /// Marks the last chunk done; returns the bytes written.
    mutating func finish() -> Int {
        if let l = last { store(NBDReplyFlags.done.rawValue, at: l.at + 4) }
        return written
    }
}
