import NIOCore

/// A request that passed validation, with wire flags already translated into what the
/// export must do. Everything behind the validator may assume the range lies inside the
/// export, lengths are nonzero and within limits, and writes target a writable export.
enum NBDCommand: Sendable {
    case read(offset: UInt64, length: UInt32, dontFragment: Bool)
    case write(offset: UInt64, data: ByteBuffer, fua: Bool)
    case writeZeroes(offset: UInt64, length: UInt32, noHole: Bool, fua: Bool, fast: Bool)
    case trim(offset: UInt64, length: UInt32, fua: Bool)
    case flush
    case cache(offset: UInt64, length: UInt32)
    case blockStatus(offset: UInt64, length: UInt32, requestOne: Bool)
    case disconnect

    /// The wire name, for logs and error messages.
    var name: String {
        switch self {
        case .read: return "READ"
        case .write: return "WRITE"
        case .writeZeroes: return "WRITE_ZEROES"
        case .trim: return "TRIM"
        case .flush: return "FLUSH"
        case .cache: return "CACHE"
        case .blockStatus: return "BLOCK_STATUS"
        case .disconnect: return "DISC"
        }
    }

    /// "at offset X length Y", for messages.
    var rangeDescription: String {
        switch self {
        case .read(let o, let l, _), .writeZeroes(let o, let l, _, _, _), .trim(let o, let l, _),
             .cache(let o, let l), .blockStatus(let o, let l, _):
            return "at offset \(o) length \(l)"
        case .write(let o, let d, _):
            return "at offset \(o) length \(d.readableBytes)"
        case .flush, .disconnect:
            return ""
        }
    }

    /// Bytes of data this request holds or will produce, for backpressure accounting.
    var payloadBytes: Int {
        switch self {
        case .read(_, let l, _): return Int(l)
        case .write(_, let d, _): return d.readableBytes
        default: return 0
        }
    }
}

/// Why a request was refused: the error code for the wire and a message for the client and
/// the log.
struct NBDRejection: Error, Equatable {
    var error: NBDErrno
    var message: String
}

/// Validate once, at the edge: everything a request can get wrong is checked here, in one
/// place and in a fixed order, before any I/O is scheduled.
///
/// 0. `DISC` is obeyed as it stands (no reply is possible).
/// 1. Unknown command: `EINVAL`.
/// 2. Command the export does not offer: writes, write-zeroes and trims on a read-only export
///    are `EPERM`; block status without a negotiated meta context is `EINVAL`.
/// 3. Flags: a flag not defined for the command, not advertised (`DF` without structured
///    replies), or unknown is `EINVAL`.
/// 4. Shape: `FLUSH` must have zero offset and length; every other command needs a
///    nonzero length (`EINVAL`); read and write payloads above ``NBDLimits/maxPayload`` are
///    `EINVAL` (a write's data was already drained by the decoder).
/// 5. Range: past the end of the export is `ENOSPC` for `WRITE` and `WRITE_ZEROES`, `EINVAL`
///    for everything else.
enum RequestValidator {
    /// Flags each command accepts. `FUA` is accepted on every command, as the protocol
    /// requires once `NBD_FLAG_SEND_FUA` is advertised (it is ignored where nothing is written).
    static func allowedFlags(for type: NBDCommandType, session: NBDSession) -> NBDCommandFlags {
        switch type {
        case .read: return session.structuredReplies ? [.fua, .dontFragment] : [.fua]
        case .writeZeroes: return [.fua, .noHole, .fastZero]
        case .blockStatus: return [.fua, .requestOne]
        default: return [.fua]
        }
    }

    static func validate(_ request: NBDRequest, session: NBDSession) -> Result<NBDCommand, NBDRejection> {
        let h = request.header
        let export = session.export
        func reject(_ e: NBDErrno, _ message: String) -> Result<NBDCommand, NBDRejection> {
            .failure(NBDRejection(error: e, message: "\(h.type): \(message)"))
        }

        // 0. A disconnect is obeyed whatever else it says: the client sends nothing after it
        //    and would never read an error reply.
        if h.type == .disconnect { return .success(.disconnect) }

        // 1. Known command.
        switch h.type {
        case .read, .write, .flush, .trim, .cache, .writeZeroes, .blockStatus: break
        default: return reject(.invalid, "unknown command")
        }

        // 2. Offered by this export and this session.
        if export.isReadOnly && (h.type == .write || h.type == .writeZeroes || h.type == .trim) {
            return reject(.perm, "export is read-only")
        }
        if h.type == .blockStatus && session.metaContexts.isEmpty {
            return reject(.invalid, "no metadata context was negotiated")
        }

        // 3. Flags.
        let unexpected = h.flags.subtracting(allowedFlags(for: h.type, session: session))
        guard unexpected.isEmpty else {
            return reject(.invalid, "flags 0x\(String(unexpected.rawValue, radix: 16)) are not valid here")
        }

        // 4. Shape.
        switch h.type {
        case .flush:
            guard h.offset == 0, h.length == 0 else { return reject(.invalid, "offset and length must be zero") }
        default:
            guard h.length > 0 else { return reject(.invalid, "zero length") }
        }
        if h.type == .read || h.type == .write {
            guard h.length <= NBDLimits.maxPayload else {
                return reject(.invalid, "length \(h.length) exceeds the maximum payload of \(NBDLimits.maxPayload) bytes")
            }
        }

        // 5. Range.
        let size = export.size
        guard h.offset <= size, UInt64(h.length) <= size - h.offset else {
            let e: NBDErrno = (h.type == .write || h.type == .writeZeroes) ? .noSpace : .invalid
            return reject(e, "offset \(h.offset) length \(h.length) is beyond the end of the export (size \(size))")
        }

        let fua = h.flags.contains(.fua)
        switch h.type {
        case .read:
            return .success(.read(offset: h.offset, length: h.length, dontFragment: h.flags.contains(.dontFragment)))
        case .write:
            guard case .data(let data) = request.payload else {
                preconditionFailure("the decoder drains only writes above the payload limit, refused above")
            }
            return .success(.write(offset: h.offset, data: data, fua: fua))
        case .writeZeroes:
            return .success(.writeZeroes(offset: h.offset, length: h.length, noHole: h.flags.contains(.noHole),
                                         fua: fua, fast: h.flags.contains(.fastZero)))
        case .trim:
            return .success(.trim(offset: h.offset, length: h.length, fua: fua))
        case .flush:
            return .success(.flush)
        case .cache:
            return .success(.cache(offset: h.offset, length: h.length))
        case .blockStatus:
            return .success(.blockStatus(offset: h.offset, length: h.length, requestOne: h.flags.contains(.requestOne)))
        default:
            preconditionFailure("DISC returned in step 0, unknown commands were refused in step 1")
        }
    }
}
