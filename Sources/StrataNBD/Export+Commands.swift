#if canImport(Glibc)
import Glibc
#endif
import Logging
import NIOCore
import Strata

// The middle room of the server: below the validator, above the image. It turns one validated
// ``NBDCommand`` into blocking ``BlockDevice`` calls (on an I/O thread, never on the event
// loop) and the calls' results into one complete reply, and it holds the single mapping from
// engine errors to NBD error codes.

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
                let reply = try readReply(offset: offset, length: length, dontFragment: dontFragment, cookie: cookie,
                                          session: session, allocator: allocator,
                                          whole: { o, out in try device.read(into: out, at: o); return true },
                                          runs: { o, n, sink in try device.read(at: o, length: n, runs: sink); return true })
                return NBDReply(bytes: reply!)

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
        // No more extents than a reply may carry; the reply then ends where they end, and
        // the client asks again from there.
        let limit = requestOne ? 1 : NBDLimits.maxBlockStatusExtents
        var extents: [BlockExtent] = []
        try device.forEachExtent(at: offset, length: UInt64(length)) { e in
            extents.append(e)
            return extents.count < limit
        }
        var covered = UInt64(length)
        if extents.count == limit, let last = extents.last, last.offset + last.length > offset {
            covered = min(covered, last.offset + last.length - offset)
        }
        var reply = allocator.buffer(capacity: 256)
        for (i, context) in session.metaContexts.enumerated() {
            let descriptors = BlockStatusDescriptor.plan(extents, context: context, offset: offset,
                                                         length: covered, requestOne: requestOne)
            ReplyEncoder.writeBlockStatusChunk(cookie: cookie, contextID: context.rawValue, descriptors: descriptors,
                                               flags: i == session.metaContexts.count - 1 ? .done : [], into: &reply)
        }
        return reply
    }
}

// MARK: - Reads

/// How a read reply gets its bytes: all of them into one buffer, or run by run through a
/// ``ReadSink``; false means the read was given up (see
/// ``BlockDevice/readIfCached(at:length:runs:)``).
typealias ReadWhole = (_ offset: UInt64, _ into: UnsafeMutableRawBufferPointer) throws -> Bool
typealias ReadRuns = (_ offset: UInt64, _ length: Int, _ sink: ReadSink) throws -> Bool

extension Export {
    /// The reply to a command when it can be carried out on the calling thread without
    /// waiting: a read of cached metadata and page-cached data
    /// (``BlockDevice/readIfCached(at:length:runs:)``), or a write without FUA that overwrites
    /// data in place (``BlockDevice/writeInPlaceIfCached(_:at:)``). What lets the event loop
    /// answer them itself, with no hop to the I/O threads. Nil for anything else; the caller
    /// then runs ``perform(_:cookie:session:logger:)`` on an I/O thread.
    func replyIfCached(_ command: NBDCommand, cookie: UInt64, session: NBDSession,
                       allocator: ByteBufferAllocator) -> ByteBuffer? {
        switch command {
        case .read(let offset, let length, let dontFragment):
            return try? readReply(offset: offset, length: length, dontFragment: dontFragment, cookie: cookie,
                                  session: session, allocator: allocator,
                                  whole: { o, out in device.readIfCached(into: out, at: o) },
                                  runs: { o, n, sink in device.readIfCached(at: o, length: n, runs: sink) })
        case .write(let offset, let data, let fua) where !fua:
            guard data.withUnsafeReadableBytes({ device.writeInPlaceIfCached($0, at: offset) }) else { return nil }
            var reply = allocator.buffer(capacity: ReplyEncoder.simpleReplySize)
            ReplyEncoder.writeSimpleReply(cookie: cookie, error: nil, into: &reply)
            return reply
        default:
            return nil
        }
    }

    /// Starts a read on a device whose store reads asynchronously (RBD;
    /// ``BlockDevice/asynchronousIO``): the reply is built as ``readReply`` builds it,
    /// with the data reads started into it (``BlockDevice/startRead(at:length:runs:io:)``)
    /// instead of waited for. `completion` runs once, on a librbd thread (or this one), with
    /// the finished reply, or nil when the read could not be done this way (a table to load,
    /// a compressed cluster, a failed read): the caller then runs the read on an I/O thread.
    func startReadReply(offset: UInt64, length: UInt32, dontFragment: Bool, cookie: UInt64, session: NBDSession,
                        allocator: ByteBufferAllocator, completion: @escaping @Sendable (ByteBuffer?) -> Void) {
        let box = ReplyBox()
        let io = AsyncIO { ok in completion(ok ? box.reply : nil) }
        let reply = try? readReply(offset: offset, length: length, dontFragment: dontFragment, cookie: cookie,
                                   session: session, allocator: allocator,
                                   whole: { o, out in
                                       device.startRead(at: o, length: out.count, runs: { off, n, _ in
                                           let s = Int(off - o)
                                           return UnsafeMutableRawBufferPointer(rebasing: out[s..<s + n])
                                       }, io: io)
                                   },
                                   runs: { o, n, sink in device.startRead(at: o, length: n, runs: sink, io: io) })
        // The reply's storage stays where the reads write until `completion` has run: the box
        // holds it, and nothing writes to it meanwhile.
        box.reply = reply
        io.finishStarting(ok: reply != nil)
    }

    /// Starts a write without `FUA` that overwrites data in place
    /// (``BlockDevice/startWrite(_:at:io:)``) on a device whose store works asynchronously.
    /// `completion` runs once, with the reply, or nil when the write must be done (again) on an
    /// I/O thread. `data` is kept alive by the caller until then.
    func startWriteReply(offset: UInt64, data: ByteBuffer, cookie: UInt64, allocator: ByteBufferAllocator,
                         completion: @escaping @Sendable (ByteBuffer?) -> Void) {
        var reply = allocator.buffer(capacity: ReplyEncoder.simpleReplySize)
        ReplyEncoder.writeSimpleReply(cookie: cookie, error: nil, into: &reply)
        let box = ReplyBox()
        box.reply = reply
        let io = AsyncIO { ok in completion(ok ? box.reply : nil) }
        // The payload's storage stays where librbd reads it: the caller holds `data` until
        // `completion` has run, and nothing writes to it.
        let ok = data.withUnsafeReadableBytes { device.startWrite($0, at: offset, io: io) }
        io.finishStarting(ok: ok)
    }

    /// A read's complete reply, its data read straight into it by `whole` or `runs` (nil
    /// when they gave up).
    ///
    /// Without structured replies, or with DF, the data is one run of bytes after one header
    /// (zero runs are filled). Otherwise holes (ranges the image says read as zeroes) become
    /// `NBD_REPLY_TYPE_OFFSET_HOLE` chunks and everything else `OFFSET_DATA`, in one pass over
    /// the mapping: each run's chunk header goes into the reply, then its data straight behind
    /// it; neighbouring runs of one kind share a chunk. The last chunk carries
    /// `NBD_REPLY_FLAG_DONE`, which is safe because the reply is sent only after every read
    /// has succeeded.
    func readReply(offset: UInt64, length: UInt32, dontFragment: Bool, cookie: UInt64, session: NBDSession,
                   allocator: ByteBufferAllocator, whole: ReadWhole, runs: ReadRuns) throws -> ByteBuffer? {
        let count = Int(length)
        if !session.structuredReplies || dontFragment {
            let header = session.structuredReplies ? ReplyEncoder.chunkHeaderSize + 8 : ReplyEncoder.simpleReplySize
            var reply = allocator.buffer(capacity: header + count)
            if session.structuredReplies {
                ReplyEncoder.writeDataChunkHeader(cookie: cookie, offset: offset, dataLength: count, flags: .done, into: &reply)
            } else {
                ReplyEncoder.writeSimpleReply(cookie: cookie, error: nil, into: &reply)
            }
            guard count > 0 else { return reply }
            var done = false
            try reply.writeWithUnsafeMutableBytes(minimumWritableBytes: count) { space in
                done = try whole(offset, UnsafeMutableRawBufferPointer(rebasing: space[0..<count]))
                return count
            }
            return done ? reply : nil
        }
        let room = StructuredReadWriter.capacity(forLength: count)
        var reply = allocator.buffer(capacity: room)
        var done = false
        try reply.writeWithUnsafeMutableBytes(minimumWritableBytes: room) { space in
            var writer = StructuredReadWriter(space: space, cookie: cookie)
            done = try runs(offset, count) { off, n, zero in
                try writer.run(offset: off, length: n, zero: zero)
            }
            return writer.finish()
        }
        return done ? reply : nil
    }
}

/// A complete reply to one request, ready to write.
struct NBDReply: Sendable {
    /// Every byte of the reply: a simple reply (with read data), or all chunks of a structured one.
    var bytes: ByteBuffer
    /// The error it reports, if any.
    var error: NBDErrno? = nil
}

/// A started read's reply, kept alive (and handed over) until its reads end. Written once by
/// the starter before ``AsyncIO/finishStarting(ok:)``, read once by the completion after.
private final class ReplyBox: @unchecked Sendable {
    var reply: ByteBuffer?
}
