// NBD wire constants and message types: everything both phases of the protocol agree on.
//
// Numbers follow the NBD protocol document (doc/proto.md in NetworkBlockDevice/nbd). All
// integers on the wire are big-endian; byte order is handled only here, in the decoders and in
// ReplyEncoder.swift.
import NIOCore

/// Magic numbers of the NBD protocol.
public enum NBDMagic {
    /// `NBDMAGIC`: the first 8 bytes the server sends.
    public static let initPassword: UInt64 = 0x4e42_444d_4147_4943
    /// `IHAVEOPT`: sent by the server after `NBDMAGIC`, and by the client before every option.
    public static let option: UInt64 = 0x4948_4156_454f_5054
    /// Starts every fixed-newstyle option reply.
    public static let optionReply: UInt64 = 0x0003_e889_0455_65a9
    /// Starts every transmission request (`NBD_REQUEST_MAGIC`).
    public static let request: UInt32 = 0x2560_9513
    /// Starts a simple reply (`NBD_SIMPLE_REPLY_MAGIC`).
    public static let simpleReply: UInt32 = 0x6744_6698
    /// Starts a structured reply chunk (`NBD_STRUCTURED_REPLY_MAGIC`).
    public static let structuredReply: UInt32 = 0x668e_33ef
}

/// Named caps on every number a client controls. Each is checked before anything is
/// allocated or looped on.
public enum NBDLimits {
    /// Largest option payload we read during the handshake. The longest legitimate option is a
    /// meta-context request: a 4 KiB export name plus a few 4 KiB queries.
    public static let maxOptionLength: UInt32 = 64 << 10
    /// Options one connection may send before entering transmission. `nbdinfo --list` needs
    /// about four per export; past this the client is looping and is disconnected.
    public static let maxOptionsPerHandshake = 256
    /// The protocol caps every string (export names, queries, messages) at 4096 bytes.
    public static let maxStringLength = 4096
    /// Queries accepted in one `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`;
    /// more is answered with `NBD_REP_ERR_TOO_BIG`.
    public static let maxMetaContextQueries: UInt32 = 128
    /// Largest read or write payload (the protocol's interoperable maximum, 32 MiB); also the
    /// maximum we advertise in `NBD_INFO_BLOCK_SIZE`.
    public static let maxPayload: UInt32 = 32 << 20
    /// Requests one connection may have decoded but not yet answered. At the cap the server
    /// stops reading from that connection until a reply goes out (backpressure).
    public static let maxInFlightRequests = 64
    /// Payload bytes (write data received plus read data owed) one connection may have in
    /// flight before the server stops reading from it. A single request may exceed it alone.
    public static let maxInFlightBytes = 128 << 20
    /// Extents per block status chunk. The protocol says servers should not send more than
    /// 2^20; we stop earlier and let the client ask again from where the reply ended.
    public static let maxBlockStatusExtents = 1 << 16
    /// Seconds a connection may spend in the handshake before it is dropped (the default of
    /// ``NBDServer/Configuration/handshakeTimeout``).
    public static let handshakeTimeoutSeconds: Int64 = 30
}

/// Flags the server sends right after the greeting.
public struct NBDHandshakeFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    /// `NBD_FLAG_FIXED_NEWSTYLE`.
    public static let fixedNewstyle = NBDHandshakeFlags(rawValue: 1 << 0)
    /// `NBD_FLAG_NO_ZEROES`: the client may skip the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    public static let noZeroes = NBDHandshakeFlags(rawValue: 1 << 1)
}

/// Flags the client answers the greeting with.
public struct NBDClientFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
    public static let fixedNewstyle = NBDClientFlags(rawValue: 1 << 0)
    /// `NBD_FLAG_C_NO_ZEROES`.
    public static let noZeroes = NBDClientFlags(rawValue: 1 << 1)
    /// Every flag this server understands; anything else closes the connection.
    public static let known: NBDClientFlags = [.fixedNewstyle, .noZeroes]
}

/// Per-export flags sent with the export size (16 bits on the wire).
public struct NBDTransmissionFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    /// `NBD_FLAG_HAS_FLAGS`: always set.
    public static let hasFlags = NBDTransmissionFlags(rawValue: 1 << 0)
    /// `NBD_FLAG_READ_ONLY`.
    public static let readOnly = NBDTransmissionFlags(rawValue: 1 << 1)
    /// `NBD_FLAG_SEND_FLUSH`.
    public static let sendFlush = NBDTransmissionFlags(rawValue: 1 << 2)
    /// `NBD_FLAG_SEND_FUA`.
    public static let sendFUA = NBDTransmissionFlags(rawValue: 1 << 3)
    /// `NBD_FLAG_ROTATIONAL` (never set by us).
    public static let rotational = NBDTransmissionFlags(rawValue: 1 << 4)
    /// `NBD_FLAG_SEND_TRIM`.
    public static let sendTrim = NBDTransmissionFlags(rawValue: 1 << 5)
    /// `NBD_FLAG_SEND_WRITE_ZEROES`.
    public static let sendWriteZeroes = NBDTransmissionFlags(rawValue: 1 << 6)
    /// `NBD_FLAG_SEND_DF`: only with structured replies.
    public static let sendDF = NBDTransmissionFlags(rawValue: 1 << 7)
    /// `NBD_FLAG_CAN_MULTI_CONN`: flush on one connection covers writes made on all of them.
    public static let canMultiConn = NBDTransmissionFlags(rawValue: 1 << 8)
    /// `NBD_FLAG_SEND_CACHE`.
    public static let sendCache = NBDTransmissionFlags(rawValue: 1 << 10)
    /// `NBD_FLAG_SEND_FAST_ZERO`.
    public static let sendFastZero = NBDTransmissionFlags(rawValue: 1 << 11)
}

/// An option code (`NBD_OPT_*`). A struct rather than an enum: unknown codes must survive
/// decoding so they can be answered with `NBD_REP_ERR_UNSUP`.
public struct NBDOptionCode: RawRepresentable, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let exportName = NBDOptionCode(rawValue: 1)
    public static let abort = NBDOptionCode(rawValue: 2)
    public static let list = NBDOptionCode(rawValue: 3)
    public static let startTLS = NBDOptionCode(rawValue: 5)
    public static let info = NBDOptionCode(rawValue: 6)
    public static let go = NBDOptionCode(rawValue: 7)
    public static let structuredReply = NBDOptionCode(rawValue: 8)
    public static let listMetaContext = NBDOptionCode(rawValue: 9)
    public static let setMetaContext = NBDOptionCode(rawValue: 10)

    public var description: String {
        switch self {
        case .exportName: return "EXPORT_NAME"
        case .abort: return "ABORT"
        case .list: return "LIST"
        case .startTLS: return "STARTTLS"
        case .info: return "INFO"
        case .go: return "GO"
        case .structuredReply: return "STRUCTURED_REPLY"
        case .listMetaContext: return "LIST_META_CONTEXT"
        case .setMetaContext: return "SET_META_CONTEXT"
        default: return "option \(rawValue)"
        }
    }
}

/// An option reply type (`NBD_REP_*`); errors have bit 31 set.
public struct NBDOptionReplyType: RawRepresentable, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let ack = NBDOptionReplyType(rawValue: 1)
    public static let server = NBDOptionReplyType(rawValue: 2)
    public static let info = NBDOptionReplyType(rawValue: 3)
    public static let metaContext = NBDOptionReplyType(rawValue: 4)
    public static let errUnsupported = NBDOptionReplyType(rawValue: 1 << 31 | 1)
    public static let errPolicy = NBDOptionReplyType(rawValue: 1 << 31 | 2)
    public static let errInvalid = NBDOptionReplyType(rawValue: 1 << 31 | 3)
    public static let errPlatform = NBDOptionReplyType(rawValue: 1 << 31 | 4)
    public static let errTLSRequired = NBDOptionReplyType(rawValue: 1 << 31 | 5)
    public static let errUnknown = NBDOptionReplyType(rawValue: 1 << 31 | 6)
    public static let errShutdown = NBDOptionReplyType(rawValue: 1 << 31 | 7)
    public static let errBlockSizeRequired = NBDOptionReplyType(rawValue: 1 << 31 | 8)
    public static let errTooBig = NBDOptionReplyType(rawValue: 1 << 31 | 9)

    /// True for the error replies.
    public var isError: Bool { rawValue & (1 << 31) != 0 }

    public var description: String {
        switch self {
        case .ack: return "ACK"
        case .server: return "SERVER"
        case .info: return "INFO"
        case .metaContext: return "META_CONTEXT"
        case .errUnsupported: return "ERR_UNSUP"
        case .errPolicy: return "ERR_POLICY"
        case .errInvalid: return "ERR_INVALID"
        case .errPlatform: return "ERR_PLATFORM"
        case .errTLSRequired: return "ERR_TLS_REQD"
        case .errUnknown: return "ERR_UNKNOWN"
        case .errShutdown: return "ERR_SHUTDOWN"
        case .errBlockSizeRequired: return "ERR_BLOCK_SIZE_REQD"
        case .errTooBig: return "ERR_TOO_BIG"
        default: return "reply \(rawValue)"
        }
    }
}

/// Information types of `NBD_OPT_INFO` / `NBD_OPT_GO` (`NBD_INFO_*`).
public struct NBDInfoType: RawRepresentable, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let export = NBDInfoType(rawValue: 0)
    public static let name = NBDInfoType(rawValue: 1)
    public static let description = NBDInfoType(rawValue: 2)
    public static let blockSize = NBDInfoType(rawValue: 3)
}

/// Transmission command types (`NBD_CMD_*`). Unknown values survive decoding so the validator
/// can answer them with `NBD_EINVAL`.
public struct NBDCommandType: RawRepresentable, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let read = NBDCommandType(rawValue: 0)
    public static let write = NBDCommandType(rawValue: 1)
    public static let disconnect = NBDCommandType(rawValue: 2)
    public static let flush = NBDCommandType(rawValue: 3)
    public static let trim = NBDCommandType(rawValue: 4)
    public static let cache = NBDCommandType(rawValue: 5)
    public static let writeZeroes = NBDCommandType(rawValue: 6)
    public static let blockStatus = NBDCommandType(rawValue: 7)

    public var description: String {
        switch self {
        case .read: return "READ"
        case .write: return "WRITE"
        case .disconnect: return "DISC"
        case .flush: return "FLUSH"
        case .trim: return "TRIM"
        case .cache: return "CACHE"
        case .writeZeroes: return "WRITE_ZEROES"
        case .blockStatus: return "BLOCK_STATUS"
        default: return "command \(rawValue)"
        }
    }
}

/// Command flags (`NBD_CMD_FLAG_*`).
public struct NBDCommandFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    /// `NBD_CMD_FLAG_FUA`: the reply waits until the data is durable.
    public static let fua = NBDCommandFlags(rawValue: 1 << 0)
    /// `NBD_CMD_FLAG_NO_HOLE`: write zeroes must leave the range allocated.
    public static let noHole = NBDCommandFlags(rawValue: 1 << 1)
    /// `NBD_CMD_FLAG_DF`: a read answered with at most one content chunk.
    public static let dontFragment = NBDCommandFlags(rawValue: 1 << 2)
    /// `NBD_CMD_FLAG_REQ_ONE`: block status answered with one extent per context.
    public static let requestOne = NBDCommandFlags(rawValue: 1 << 3)
    /// `NBD_CMD_FLAG_FAST_ZERO`: fail write zeroes with `NBD_ENOTSUP` unless it is cheap.
    public static let fastZero = NBDCommandFlags(rawValue: 1 << 4)
}

/// Structured reply chunk flags.
public struct NBDReplyFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    /// `NBD_REPLY_FLAG_DONE`: the last chunk of a reply.
    public static let done = NBDReplyFlags(rawValue: 1 << 0)
}

/// Structured reply chunk types (`NBD_REPLY_TYPE_*`).
public struct NBDReplyType: RawRepresentable, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let none = NBDReplyType(rawValue: 0)
    public static let offsetData = NBDReplyType(rawValue: 1)
    public static let offsetHole = NBDReplyType(rawValue: 2)
    public static let blockStatus = NBDReplyType(rawValue: 5)
    public static let error = NBDReplyType(rawValue: 1 << 15 | 1)
    public static let errorOffset = NBDReplyType(rawValue: 1 << 15 | 2)
}

/// The error values the protocol allows on the wire (`NBD_E*`). Engine errors are narrowed to
/// these by ``NBDErrno/init(mapping:)`` in Export.swift, the one place that does it.
public struct NBDErrno: RawRepresentable, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let perm = NBDErrno(rawValue: 1)
    public static let io = NBDErrno(rawValue: 5)
    public static let noMemory = NBDErrno(rawValue: 12)
    public static let invalid = NBDErrno(rawValue: 22)
    public static let noSpace = NBDErrno(rawValue: 28)
    public static let overflow = NBDErrno(rawValue: 75)
    public static let notSupported = NBDErrno(rawValue: 95)
    public static let shutdown = NBDErrno(rawValue: 108)

    public var description: String {
        switch self {
        case .perm: return "EPERM"
        case .io: return "EIO"
        case .noMemory: return "ENOMEM"
        case .invalid: return "EINVAL"
        case .noSpace: return "ENOSPC"
        case .overflow: return "EOVERFLOW"
        case .notSupported: return "ENOTSUP"
        case .shutdown: return "ESHUTDOWN"
        default: return "errno \(rawValue)"
        }
    }
}

/// The metadata contexts this server offers for `NBD_CMD_BLOCK_STATUS`. The raw value is the
/// context id we hand out in `NBD_OPT_SET_META_CONTEXT`.
public enum NBDMetaContext: UInt32, Sendable, CaseIterable {
    /// `base:allocation`: bit 0 hole, bit 1 reads as zeroes.
    case baseAllocation = 1
    /// `qemu:allocation-depth`: 0 unallocated in the whole chain, 1 the top image, 2 its
    /// backing file, and so on (as `qemu-nbd -A`).
    case allocationDepth = 2

    /// The context's name on the wire.
    public var name: String {
        switch self {
        case .baseAllocation: return "base:allocation"
        case .allocationDepth: return "qemu:allocation-depth"
        }
    }

    /// The namespace part of ``name`` including the colon.
    var namespace: String {
        switch self {
        case .baseAllocation: return "base:"
        case .allocationDepth: return "qemu:"
        }
    }
}

/// The fixed 28-byte header of a transmission request.
///
/// ```
/// 32 bits  magic 0x25609513
/// 16 bits  command flags
/// 16 bits  type
/// 64 bits  cookie
/// 64 bits  offset
/// 32 bits  length
/// ```
public struct NBDRequestHeader: Sendable, Hashable {
    /// Bytes of the header on the wire.
    public static let size = 28
    public var flags: NBDCommandFlags
    public var type: NBDCommandType
    public var cookie: UInt64
    public var offset: UInt64
    public var length: UInt32

    public init(flags: NBDCommandFlags = [], type: NBDCommandType, cookie: UInt64, offset: UInt64, length: UInt32) {
        self.flags = flags
        self.type = type
        self.cookie = cookie
        self.offset = offset
        self.length = length
    }
}

/// One decoded transmission request.
public struct NBDRequest: Sendable {
    /// What became of the data that follows a write header.
    public enum Payload: Sendable {
        /// The command carries no data.
        case none
        /// The write data, exactly `header.length` bytes.
        case data(ByteBuffer)
        /// The write was longer than ``NBDLimits/maxPayload``: its data was read and thrown
        /// away to keep the stream in step, and the request must be refused.
        case discarded
    }

    public var header: NBDRequestHeader
    public var payload: Payload

    public init(header: NBDRequestHeader, payload: Payload = .none) {
        self.header = header
        self.payload = payload
    }
}

/// Messages a client sends during the handshake.
public enum NBDHandshakeMessage: Sendable, Equatable {
    /// The 32-bit client flags that answer the greeting.
    case clientFlags(UInt32)
    /// One option: code and its whole payload.
    case option(NBDOptionCode, ByteBuffer)
}

/// Protocol violations that end a connection (a hard disconnect, as the protocol allows).
public enum NBDProtocolError: Error, Equatable, CustomStringConvertible {
    /// The client's flags had bits we do not know or did not offer.
    case unknownClientFlags(UInt32)
    /// The client did not set `NBD_FLAG_C_FIXED_NEWSTYLE`; this server speaks fixed newstyle only.
    case notFixedNewstyle
    /// An option did not start with `IHAVEOPT`.
    case badOptionMagic(UInt64)
    /// An option payload was longer than ``NBDLimits/maxOptionLength``.
    case optionTooLong(UInt32)
    /// More than ``NBDLimits/maxOptionsPerHandshake`` options.
    case tooManyOptions
    /// `NBD_OPT_EXPORT_NAME` named an export we do not have (it cannot be answered with an error).
    case unknownExport(String)
    /// A request did not start with `NBD_REQUEST_MAGIC`.
    case badRequestMagic(UInt32)
    /// The connection ended in the middle of a message.
    case truncatedMessage(phase: String, bytesLeft: Int)
    /// The handshake took longer than the server allows.
    case handshakeTimeout
    /// The export chosen by `NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME` was removed before
    /// transmission began.
    case exportRemoved(String)
    /// `NBD_OPT_EXPORT_NAME` before `NBD_OPT_STARTTLS` on a server that requires TLS (it
    /// cannot be answered with an error).
    case tlsRequired
    /// The TLS handshake after `NBD_OPT_STARTTLS` failed (a missing or untrusted client
    /// certificate, a client that does not trust ours); the TLS library's reason.
    case tlsHandshakeFailed(String)

    public var description: String {
        switch self {
        case .unknownClientFlags(let f): return "client sent unknown flags 0x\(String(f, radix: 16))"
        case .notFixedNewstyle: return "client does not speak fixed newstyle negotiation"
        case .badOptionMagic(let m): return "bad option magic 0x\(String(m, radix: 16))"
        case .optionTooLong(let n): return "option of \(n) bytes exceeds the \(NBDLimits.maxOptionLength)-byte limit"
        case .tooManyOptions: return "more than \(NBDLimits.maxOptionsPerHandshake) options in one handshake"
        case .unknownExport(let n): return "NBD_OPT_EXPORT_NAME asked for unknown export '\(n)'"
        case .badRequestMagic(let m): return "bad request magic 0x\(String(m, radix: 16))"
        case .truncatedMessage(let p, let n): return "connection closed in the middle of a \(p) message (\(n) bytes buffered)"
        case .handshakeTimeout: return "handshake not finished in time"
        case .exportRemoved(let n): return "export '\(n)' was removed while the client was choosing it"
        case .tlsRequired: return "NBD_OPT_EXPORT_NAME without TLS, which this server requires"
        case .tlsHandshakeFailed(let why): return "TLS handshake failed: \(why)"
        }
    }
}

// MARK: - Option payloads

/// The payload of `NBD_OPT_INFO` and `NBD_OPT_GO`.
///
/// ```
/// 32 bits       length of name N (<= option length - 6)
/// N bytes       export name
/// 16 bits       number of information requests K
/// K x 16 bits   NBD_INFO_* types requested
/// ```
struct NBDInfoRequest: Equatable {
    var exportName: String
    var requests: [NBDInfoType]

    /// Parses the payload; nil when the lengths do not add up (answered with `NBD_REP_ERR_INVALID`).
    static func parse(_ data: ByteBuffer) -> NBDInfoRequest? {
        var data = data
        guard let nameLength = data.readInteger(as: UInt32.self),
              nameLength <= NBDLimits.maxStringLength,
              let name = data.readString(length: Int(nameLength)),
              let count = data.readInteger(as: UInt16.self),
              data.readableBytes == Int(count) * 2
        else { return nil }
        var requests: [NBDInfoType] = []
        requests.reserveCapacity(Int(count))
        for _ in 0..<count {
            requests.append(NBDInfoType(rawValue: data.readInteger(as: UInt16.self)!))
        }
        return NBDInfoRequest(exportName: name, requests: requests)
    }
}

/// The payload of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
///
/// ```
/// 32 bits       length of export name N
/// N bytes       export name
/// 32 bits       number of queries Q
/// Q times:      32 bits length L, L bytes query
/// ```
struct NBDMetaContextRequest: Equatable {
    enum ParseError: Error, Equatable {
        /// Lengths that run past the option, or trailing bytes.
        case malformed
        /// More queries than ``NBDLimits/maxMetaContextQueries``.
        case tooManyQueries
    }

    var exportName: String
    var queries: [String]

    static func parse(_ data: ByteBuffer) -> Result<NBDMetaContextRequest, ParseError> {
        var data = data
        guard let nameLength = data.readInteger(as: UInt32.self),
              nameLength <= NBDLimits.maxStringLength,
              let name = data.readString(length: Int(nameLength)),
              let count = data.readInteger(as: UInt32.self)
        else { return .failure(.malformed) }
        guard count <= NBDLimits.maxMetaContextQueries else { return .failure(.tooManyQueries) }
        var queries: [String] = []
        for _ in 0..<count {
            guard let length = data.readInteger(as: UInt32.self),
                  length <= NBDLimits.maxStringLength,
                  let query = data.readString(length: Int(length))
            else { return .failure(.malformed) }
            queries.append(query)
        }
        guard data.readableBytes == 0 else { return .failure(.malformed) }
        return .success(NBDMetaContextRequest(exportName: name, queries: queries))
    }
}
