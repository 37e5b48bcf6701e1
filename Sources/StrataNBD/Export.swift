#if canImport(Glibc)
import Glibc
#endif
import Logging
import NIOCore
import Strata

/// What `NBD_CMD_TRIM` does (qemu's `--discard`).
public enum DiscardMode: String, Sendable, CaseIterable {
    /// Pass trims to the image, which frees whole clusters.
    case unmap
    /// Accept trims and do nothing; write-zeroes never deallocates either.
    case ignore
}

/// One named export: an open image shared by every connection to it.
///
/// All connections to an export use the same ``BlockDevice``, so a flush on any of them covers
/// writes made on all of them; that is what makes `NBD_FLAG_CAN_MULTI_CONN` truthful.
///
/// This file is the middle room of the server: below the validator, above the image. It turns
/// one validated ``NBDCommand`` into blocking ``BlockDevice`` calls (on an I/O thread, never on
/// the event loop) and the calls' results into one complete reply, and it holds the single
/// mapping from engine errors to NBD error codes.
public final class Export: Sendable {
    /// The export name clients ask for.
    public let name: String
    /// Free text shown by `nbdinfo` (`NBD_INFO_DESCRIPTION`, and after the name in `NBD_OPT_LIST`).
    public let description: String?
    /// The image.
    public let device: any BlockDevice
    /// True when writes are refused (by `--read-only` or because the image is read-only).
    public let isReadOnly: Bool
    /// What trims do.
    public let discard: DiscardMode
    /// Virtual size, fixed for the life of the export.
    public let size: UInt64

    /// - Parameters:
    ///   - readOnly: refuse writes even when the device accepts them.
    public init(name: String, description: String? = nil, device: any BlockDevice,
                readOnly: Bool = false, discard: DiscardMode = .unmap) {
        self.name = name
        self.description = description
        self.device = device
        self.isReadOnly = readOnly || device.isReadOnly
        self.discard = discard
        self.size = device.size
    }

    /// Transmission flags for a client that did (or did not) negotiate structured replies.
    /// Every flag is a promise the command path keeps:
    /// FLUSH, FUA and CACHE always; TRIM, WRITE_ZEROES and FAST_ZERO when writable; DF with
    /// structured replies; MULTI_CONN because all connections share one device.
    public func transmissionFlags(structuredReplies: Bool) -> NBDTransmissionFlags {
        var flags: NBDTransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendCache, .canMultiConn]
        if isReadOnly {
            flags.insert(.readOnly)
        } else {
            flags.formUnion([.sendTrim, .sendWriteZeroes, .sendFastZero])
        }
        if structuredReplies { flags.insert(.sendDF) }
        return flags
    }

    /// The preferred block size we advertise: the device's natural I/O unit, made a power of
    /// two between 512 bytes and the maximum payload as the protocol requires.
    public var preferredBlockSize: UInt32 {
        let wanted = UInt32(clamping: max(device.preferredBlockSize, 512))
        var p: UInt32 = 512
        while p < wanted && p < NBDLimits.maxPayload { p <<= 1 }
        return p
    }
}

/// The exports of one server, in command-line order. The first one is also the default
/// export, reached with an empty name.
public struct ExportCatalog: Sendable {
    /// All exports, in the order `NBD_OPT_LIST` reports them.
    public let exports: [Export]

    public init(_ exports: [Export]) {
        self.exports = exports
    }

    /// The export a client means by `name`: an exact match, or the first export for "".
    public func lookup(_ name: String) -> Export? {
        if let e = exports.first(where: { $0.name == name }) { return e }
        return name.isEmpty ? exports.first : nil
    }
}

// MARK: - Errors

extension NBDErrno {
    /// The one mapping from engine (and system) errors to the error values the protocol
    /// allows. Anything without a closer match is `NBD_EIO`.
    public init(mapping error: any Error) {
        switch error {
        case let e as StrataError: self.init(errno: e.errnoValue)
        case let e as SystemCallError: self.init(errno: e.errno)
        default: self = .io
        }
    }

    /// Narrows a host errno to an NBD error value.
    public init(errno value: Int32) {
        switch value {
        case EPERM, EROFS, EACCES: self = .perm
        case EIO: self = .io
        case ENOMEM: self = .noMemory
        case EINVAL: self = .invalid
        case ENOSPC, EDQUOT, EFBIG: self = .noSpace
        case EOVERFLOW: self = .overflow
        case ENOTSUP: self = .notSupported
        case ESHUTDOWN: self = .shutdown
        default: self = .io
        }
    }
}

// MARK: - Executing commands

extension Export {
    /// Runs one validated command against the device and returns the complete reply, ready
    /// to write. Blocking: call it on an I/O thread.
    ///
    /// Errors from the device are logged with their cause here, then narrowed to an NBD error
    /// code for the wire.
    func perform(_ command: NBDCommand, cookie: UInt64, session: NBDSession, logger: Logger) -> NBDReply {
        let allocator = ByteBufferAllocator()
        do {
            switch command {
            case .read(let offset, let length, let dontFragment):
                if session.structuredReplies {
                    return NBDReply(bytes: try structuredRead(offset: offset, length: length, dontFragment: dontFragment,
                                                              cookie: cookie, allocator: allocator))
                }
                var reply = allocator.buffer(capacity: ReplyEncoder.simpleReplySize + Int(length))
                ReplyEncoder.writeSimpleReply(cookie: cookie, error: nil, into: &reply)
                try readData(offset: offset, count: Int(length), into: &reply)
                return NBDReply(bytes: reply)

            case .write(let offset, let data, let fua):
                try data.withUnsafeReadableBytes { try device.write($0, at: offset, fua: fua) }

            case .writeZeroes(let offset, let length, let noHole, let fua, let fast):
                if fast && !device.zeroingIsCheap(at: offset, length: UInt64(length)) {
                    // Fast only when nothing has to be written: the engine can zero the range
                    // through metadata alone, or it already reads as zeroes (and is allocated,
                    // if the client wants no holes).
                    guard try alreadyZero(offset: offset, length: UInt64(length), needAllocated: noHole) else {
                        return errorReply(.notSupported, "fast zeroing is not possible for this range",
                                          cookie: cookie, session: session)
                    }
                } else {
                    try device.writeZeroes(at: offset, length: UInt64(length), mayUnmap: !noHole && discard == .unmap,
                                           fua: fua)
                }

            case .trim(let offset, let length, let fua):
                if discard == .unmap && device.supportsDiscard {
                    try device.discard(at: offset, length: UInt64(length))
                    if fua { try device.flush() }
                }

            case .flush:
                try device.flush()

            case .cache:
                // A hint. Our images are local files whose pages the host already caches, so
                // there is nothing useful to prefetch; the range was validated, which is all
                // the protocol asks for.
                break

            case .blockStatus(let offset, let length, let requestOne):
                return NBDReply(bytes: try blockStatusReply(offset: offset, length: length, requestOne: requestOne,
                                                            cookie: cookie, session: session, allocator: allocator))

            case .disconnect:
                preconditionFailure("NBD_CMD_DISC has no reply and never reaches the export")
            }
            var reply = allocator.buffer(capacity: ReplyEncoder.simpleReplySize)
            ReplyEncoder.writeSimpleReply(cookie: cookie, error: nil, into: &reply)
            return NBDReply(bytes: reply)
        } catch {
            let code = NBDErrno(mapping: error)
            logger.error("\(command.name) failed on export '\(name)': \(error) (sent \(code))",
                         metadata: ["cookie": "\(cookie)"])
            let what = command.rangeDescription.isEmpty ? command.name : "\(command.name) \(command.rangeDescription)"
            return errorReply(code, "\(what) failed: \(code)", cookie: cookie, session: session)
        }
    }

    /// A reply carrying only an error: a structured error chunk (with a message) when the
    /// client negotiated structured replies, a simple reply otherwise.
    func errorReply(_ code: NBDErrno, _ message: String, cookie: UInt64, session: NBDSession) -> NBDReply {
        var reply = ByteBufferAllocator().buffer(capacity: 64 + message.utf8.count)
        if session.structuredReplies {
            ReplyEncoder.writeErrorChunk(cookie: cookie, error: code, message: message, into: &reply)
        } else {
            ReplyEncoder.writeSimpleReply(cookie: cookie, error: code, into: &reply)
        }
        return NBDReply(bytes: reply, error: code)
    }

    /// Reads `count` bytes straight into the reply buffer.
    private func readData(offset: UInt64, count: Int, into reply: inout ByteBuffer) throws {
        guard count > 0 else { return }
        try reply.writeWithUnsafeMutableBytes(minimumWritableBytes: count) { space in
            try device.read(into: UnsafeMutableRawBufferPointer(rebasing: space[0..<count]), at: offset)
            return count
        }
    }

    /// A structured read: holes (ranges the image says read as zeroes) become
    /// `NBD_REPLY_TYPE_OFFSET_HOLE` chunks, everything else `OFFSET_DATA`. With DF the whole
    /// range is one data chunk. The last chunk carries `NBD_REPLY_FLAG_DONE`, which is safe
    /// because the reply is sent only after every read has succeeded.
    private func structuredRead(offset: UInt64, length: UInt32, dontFragment: Bool, cookie: UInt64,
                                allocator: ByteBufferAllocator) throws -> ByteBuffer {
        let runs: [ContentRun]
        if dontFragment {
            runs = [ContentRun(offset: offset, length: UInt64(length), isZero: false)]
        } else {
            runs = ContentRun.plan(try device.blockStatus(at: offset, length: UInt64(length)),
                                   offset: offset, length: UInt64(length))
        }
        var capacity = 0
        for run in runs {
            capacity += ReplyEncoder.chunkHeaderSize + (run.isZero ? 12 : 8 + Int(run.length))
        }
        var reply = allocator.buffer(capacity: capacity)
        for (i, run) in runs.enumerated() {
            let flags: NBDReplyFlags = i == runs.count - 1 ? .done : []
            if run.isZero {
                ReplyEncoder.writeHoleChunk(cookie: cookie, offset: run.offset, length: UInt32(run.length),
                                            flags: flags, into: &reply)
            } else {
                ReplyEncoder.writeDataChunkHeader(cookie: cookie, offset: run.offset, dataLength: Int(run.length),
                                                  flags: flags, into: &reply)
                try readData(offset: run.offset, count: Int(run.length), into: &reply)
            }
        }
        return reply
    }

    /// True when every byte of the range reads as zero (and, with `needAllocated`, none of it
    /// is a hole).
    private func alreadyZero(offset: UInt64, length: UInt64, needAllocated: Bool) throws -> Bool {
        var zero = true
        forEachPiece(of: try device.blockStatus(at: offset, length: length), offset: offset, length: length) { _, e in
            // A gap is unknown content, so not zero.
            guard let e, e.status.contains(.zero), !(needAllocated && e.status.contains(.hole)) else {
                zero = false
                return false
            }
            return true
        }
        return zero
    }

    /// One `NBD_REPLY_TYPE_BLOCK_STATUS` chunk per negotiated context, the last one marked done.
    private func blockStatusReply(offset: UInt64, length: UInt32, requestOne: Bool, cookie: UInt64,
                                  session: NBDSession, allocator: ByteBufferAllocator) throws -> ByteBuffer {
        let extents = try device.blockStatus(at: offset, length: UInt64(length))
        var reply = allocator.buffer(capacity: 256)
        for (i, context) in session.metaContexts.enumerated() {
            let descriptors = BlockStatusDescriptor.plan(extents, context: context, offset: offset,
                                                         length: UInt64(length), requestOne: requestOne)
            ReplyEncoder.writeBlockStatusChunk(cookie: cookie, contextID: context.rawValue, descriptors: descriptors,
                                               flags: i == session.metaContexts.count - 1 ? .done : [], into: &reply)
        }
        return reply
    }
}

/// A complete reply to one request, ready to write.
struct NBDReply: Sendable {
    /// Every byte of the reply: a simple reply (with read data), or all chunks of a structured one.
    var bytes: ByteBuffer
    /// The error it reports, if any.
    var error: NBDErrno? = nil
}

/// Lays the engine's extents over the range `[offset, offset+length)`, calling `body` for
/// each consecutive piece in order: the extent covering it, or nil for a gap the engine did not
/// describe (including any tail). Pieces never fall outside the range and are never empty.
/// `body` returns false to stop early.
func forEachPiece(of extents: [BlockExtent], offset: UInt64, length: UInt64,
                  _ body: (_ length: UInt64, _ extent: BlockExtent?) -> Bool) {
    let end = offset + length
    var cursor = offset
    for e in extents where cursor < end {
        let eEnd = e.offset &+ e.length
        guard eEnd > cursor, e.length > 0 else { continue }
        if e.offset > cursor {
            let gap = min(e.offset, end) - cursor
            guard body(gap, nil) else { return }
            cursor += gap
            if cursor == end { return }
        }
        let piece = min(eEnd, end) - cursor
        guard body(piece, e) else { return }
        cursor += piece
    }
    if cursor < end { _ = body(end - cursor, nil) }
}

/// A piece of a structured read: data to send, or a run that reads as zeroes.
struct ContentRun: Equatable {
    var offset: UInt64
    var length: UInt64
    var isZero: Bool

    /// The runs of a read: neighbours of the same kind merge, and gaps or anything not known
    /// to read as zeroes count as data.
    static func plan(_ extents: [BlockExtent], offset: UInt64, length: UInt64) -> [ContentRun] {
        var runs: [ContentRun] = []
        var cursor = offset
        forEachPiece(of: extents, offset: offset, length: length) { len, extent in
            let zero = extent?.status.contains(.zero) ?? false
            if let last = runs.last, last.isZero == zero {
                runs[runs.count - 1].length += len
            } else {
                runs.append(ContentRun(offset: cursor, length: len, isZero: zero))
            }
            cursor += len
            return true
        }
        return runs
    }
}

/// One descriptor of a block status chunk: 32-bit length and 32-bit flags.
struct BlockStatusDescriptor: Equatable {
    var length: UInt32
    var flags: UInt32

    /// The flags `context` defines for an extent; 0 ("allocated, contents unknown", always
    /// safe) where the engine said nothing.
    static func flags(of extent: BlockExtent?, in context: NBDMetaContext) -> UInt32 {
        guard let extent else { return 0 }
        switch context {
        case .baseAllocation: return UInt32(extent.status.intersection([.hole, .zero]).rawValue)
        case .allocationDepth: return extent.depth
        }
    }

    /// The descriptors for one context: contiguous from `offset`, neighbours with equal flags
    /// merged, cut at the end of the request, at most ``NBDLimits/maxBlockStatusExtents``
    /// (or one, with `NBD_CMD_FLAG_REQ_ONE`). Never empty.
    static func plan(_ extents: [BlockExtent], context: NBDMetaContext, offset: UInt64, length: UInt64,
                     requestOne: Bool) -> [BlockStatusDescriptor] {
        let limit = requestOne ? 1 : NBDLimits.maxBlockStatusExtents
        var out: [BlockStatusDescriptor] = []
        forEachPiece(of: extents, offset: offset, length: length) { len, extent in
            let flags = flags(of: extent, in: context)
            if let last = out.last, last.flags == flags {
                out[out.count - 1].length += UInt32(len)
            } else {
                guard out.count < limit else { return false }
                out.append(BlockStatusDescriptor(length: UInt32(len), flags: flags))
            }
            return true
        }
        return out
    }
}

// MARK: - Opening

extension ExportCatalog {
    /// What to export: a name and an image file.
    public struct Entry: Sendable, Equatable {
        public var name: String
        public var path: String
        public init(name: String, path: String) {
            self.name = name
            self.path = path
        }
    }

    /// Opens every image once and builds the catalog. Entries naming the same file (after
    /// resolving symlinks) share one open device, so the image is opened, locked and cached
    /// once per server. On failure, the images already opened are closed again.
    public static func open(_ entries: [Entry], options: OpenOptions, discard: DiscardMode,
                            description: String?) throws -> ExportCatalog {
        var devices: [String: any BlockDevice] = [:]
        var exports: [Export] = []
        do {
            for entry in entries {
                let key = realPath(entry.path)
                let device: any BlockDevice
                if let shared = devices[key] {
                    device = shared
                } else {
                    device = try openImage(path: entry.path, options: options)
                    devices[key] = device
                }
                exports.append(Export(name: entry.name, description: description, device: device,
                                      readOnly: !options.writable, discard: discard))
            }
        } catch {
            for device in devices.values { try? device.close() }
            throw error
        }
        return ExportCatalog(exports)
    }

    private static func realPath(_ path: String) -> String {
        guard let resolved = realpath(path, nil) else { return path }
        defer { free(resolved) }
        return String(cString: resolved)
    }
}
