import Logging
import NIOCore
import NIOPosix
import NIOSSL

/// The transmission phase of one connection.
///
/// The hot path, per request: ``RequestDecoder`` frames it, ``RequestValidator`` checks it,
/// then a read whose data is already in memory, or an overwrite that changes no metadata
/// (``Export/replyIfCached(_:cookie:session:allocator:)``), is answered right here on the
/// event loop, with no thread hop. Anything else takes exactly one hop to the I/O thread pool, which runs
/// ``Export/perform(_:cookie:session:logger:)`` (the blocking device call, which also builds
/// the complete reply), and the reply is written back on this connection's event loop.
/// Requests run concurrently and are answered in completion order; the channel serialises the
/// writes. Replies built on the event loop are flushed once per batch of decoded requests.
///
/// Backpressure: when ``NBDLimits/maxInFlightRequests`` requests or
/// ``NBDLimits/maxInFlightBytes`` bytes are outstanding, or the socket's send buffer is full,
/// the handler stops decoding and holds back `read()`, so the kernel's receive window
/// throttles the client. Reading resumes as replies go out.
///
/// The handler holds the connection's ``ExportLease``, which keeps the export's image open.
/// It lets go once the channel has closed and no request is in flight, so an image is never
/// closed under a request still running on the I/O pool.
final class TransmissionHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private enum State {
        /// Decoding and serving requests.
        case serving
        /// `NBD_CMD_DISC`, server shutdown or the export's removal: no new requests; close once
        /// in-flight ones are answered.
        case draining
        /// The channel is gone.
        case closed
    }

    private let session: NBDSession
    /// Keeps the export's device open; dropped when closed and idle (see ``releaseLeaseIfIdle()``).
    private var lease: ExportLease?
    private let pool: NIOThreadPool
    private let logger: Logger
    private let stats: ConnectionStats
    private var decoder = RequestDecoder()
    private var buffer: ByteBuffer
    private var state = State.serving
    private var inFlight = 0
    private var inFlightBytes = 0
    /// A `read()` from the channel that we are holding back for backpressure.
    private var readHeld = false
    /// Replies written on the event loop since the last flush.
    private var unflushed = false

    init(session: NBDSession, lease: consuming ExportLease, pool: NIOThreadPool, logger: Logger, stats: ConnectionStats,
         initialBytes: ByteBuffer) {
        self.session = session
        self.lease = .some(lease)
        self.pool = pool
        self.logger = logger
        self.stats = stats
        self.buffer = initialBytes
    }

    func handlerAdded(context: ChannelHandlerContext) {
        // The client may have sent requests right behind NBD_OPT_GO.
        if buffer.readableBytes > 0 { processBuffer(context: context) }
    }

    // MARK: Inbound

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let incoming = unwrapInboundIn(data)
        guard case .serving = state else { return }  // nothing after DISC or shutdown counts
        if buffer.readableBytes == 0 {
            buffer = incoming
        } else {
            var more = incoming
            buffer.writeBuffer(&more)
        }
        processBuffer(context: context)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { resume(context: context) }
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        state = .closed
        if decoder.isMidRequest || buffer.readableBytes > 0, stats.closeReason == nil {
            stats.closeReason = "client disconnected in the middle of a request"
        }
        releaseLeaseIfIdle()
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        switch event as? NBDServerEvent {
        case .shutdown?:
            stopServing(context: context, message: "server is shutting down", reason: "server shutting down")
        case .exportRemoved?:
            let name = session.export.name
            stopServing(context: context, message: "export '\(name)' was removed", reason: "export '\(name)' was removed")
        case nil:
            context.fireUserInboundEventTriggered(event)
        }
    }

    /// Answers every request already received in full with `ESHUTDOWN` (`message` tells the
    /// client why), then waits for the in-flight ones and closes.
    private func stopServing(context: ChannelHandlerContext, message: String, reason: String) {
        guard case .serving = state else { return }
        while let request = try? decoder.decode(buffer: &buffer) {
            if request.header.type == .disconnect { break }
            stats.requests += 1
            reject("\(request.header.type)", cookie: request.header.cookie,
                   NBDRejection(error: .shutdown, message: message), context: context)
        }
        beginDraining(context: context, reason: reason)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        stats.closeReason = "\(error)"
        if case .uncleanShutdown? = error as? NIOSSLError {
            // A TLS client that hung up without close_notify: an ordinary disconnect here,
            // since every NBD reply is framed and a truncated one is noticed by the client.
            logger.debug("connection \(stats.id): TLS client closed without close_notify")
            context.close(promise: nil)
            return
        }
        logger.warning("connection \(stats.id): \(error)")
        context.close(promise: nil)
    }

    // MARK: Outbound

    func read(context: ChannelHandlerContext) {
        if case .serving = state, !isSaturated(context) {
            context.read()
        } else {
            readHeld = true
        }
    }

    // MARK: Requests

    private func isSaturated(_ context: ChannelHandlerContext) -> Bool {
        inFlight >= NBDLimits.maxInFlightRequests || inFlightBytes >= NBDLimits.maxInFlightBytes
            || !context.channel.isWritable
    }

    /// Decodes and dispatches buffered requests until the buffer runs dry or the connection
    /// is saturated.
    private func processBuffer(context: ChannelHandlerContext) {
        while case .serving = state, !isSaturated(context) {
            let request: NBDRequest?
            do {
                request = try decoder.decode(buffer: &buffer)
            } catch {
                stats.closeReason = "\(error)"
                logger.warning("connection \(stats.id): \(error); closing")
                state = .closed
                context.close(promise: nil)
                return
            }
            guard let request else { break }
            handle(request, context: context)
        }
        if unflushed {
            unflushed = false
            context.flush()
        }
        if buffer.readableBytes == 0 {
            // Drop the storage so slices handed to the pool never force a copy on append.
            buffer = context.channel.allocator.buffer(capacity: 0)
        } else if decoder.bytesAwaited > buffer.readableBytes + buffer.writableBytes {
            // A request (a write's payload) is still arriving: give it a buffer of exactly
            // its size, so the payload handed to the I/O thread pins no more memory than it
            // is, and the bytes already here are copied once.
            var fresh = context.channel.allocator.buffer(capacity: decoder.bytesAwaited)
            fresh.writeBuffer(&buffer)
            buffer = fresh
        }
    }

    private func handle(_ request: NBDRequest, context: ChannelHandlerContext) {
        let h = request.header
        if h.type != .disconnect { stats.requests += 1 }
        logger.trace("request", metadata: [
            "cmd": "\(h.type)", "cookie": "\(h.cookie)", "offset": "\(h.offset)",
            "length": "\(h.length)", "flags": "0x\(String(h.flags.rawValue, radix: 16))",
        ])
        switch RequestValidator.validate(request, session: session) {
        case .failure(let rejection):
            reject("\(h.type)", cookie: h.cookie, rejection, context: context)
        case .success(.disconnect):
            beginDraining(context: context, reason: nil)
        case .success(let command):
            dispatch(command, cookie: h.cookie, context: context)
        }
    }

    private func reject(_ command: String, cookie: UInt64, _ rejection: NBDRejection, context: ChannelHandlerContext) {
        stats.rejected += 1
        logger.info("connection \(stats.id): refused \(command) (cookie \(cookie)) with \(rejection.error): \(rejection.message)")
        let reply = session.export.errorReply(rejection.error, rejection.message, cookie: cookie, session: session)
        context.writeAndFlush(wrapOutboundOut(reply.bytes), promise: nil)
    }

    /// A read of cached data or an in-place overwrite is answered here; everything else takes the one hop: run the
    /// command on the I/O pool, come back to this event loop with the finished reply.
    private func dispatch(_ command: NBDCommand, cookie: UInt64, context: ChannelHandlerContext) {
        // A store that works asynchronously (RBD) has no page cache to ask: its reads and
        // overwrites are started from here instead (librbd calls back when done, and the
        // reply goes out from this event loop, with no I/O thread waiting for it).
        let asynchronous = session.export.device.asynchronousIO
        if !asynchronous, let bytes = session.export.replyIfCached(command, cookie: cookie, session: session,
                                                                   allocator: context.channel.allocator) {
            record(command, reply: NBDReply(bytes: bytes))
            context.write(wrapOutboundOut(bytes), promise: nil)
            unflushed = true
            return
        }
        let bytes = command.payloadBytes
        inFlight += 1
        inFlightBytes += bytes
        if asynchronous, startAsynchronously(command, bytes: bytes, cookie: cookie, context: context) { return }
        runOnPool(command, bytes: bytes, cookie: cookie, context: context)
    }

    /// A read, or an overwrite without FUA, on a store that works asynchronously (RBD) is
    /// started from here: librbd calls back when it is done, and the reply goes out from this
    /// event loop, with no I/O thread waiting. What could not be done that way goes to the
    /// pool then. False for other commands (the caller sends them to the pool).
    private func startAsynchronously(_ command: NBDCommand, bytes: Int, cookie: UInt64, context: ChannelHandlerContext) -> Bool {
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        let eventLoop = context.eventLoop
        // `command` (and with it a write's payload) is held by this closure until it has run.
        let completion: @Sendable (ByteBuffer?) -> Void = { reply in
            eventLoop.execute {
                let (handler, context) = bound.value
                if let reply {
                    handler.finish(command, .success(NBDReply(bytes: reply)), bytes: bytes, cookie: cookie, context: context)
                } else {
                    handler.runOnPool(command, bytes: bytes, cookie: cookie, context: context)
                }
            }
        }
        switch command {
        case .read(let offset, let length, let dontFragment):
            session.export.startReadReply(offset: offset, length: length, dontFragment: dontFragment, cookie: cookie,
                                          session: session, allocator: context.channel.allocator, completion: completion)
        case .write(let offset, let data, let fua) where !fua:
            session.export.startWriteReply(offset: offset, data: data, cookie: cookie,
                                           allocator: context.channel.allocator, completion: completion)
        default:
            return false
        }
        return true
    }

    /// The one hop: the command runs on the I/O pool, and its reply is written back here.
    private func runOnPool(_ command: NBDCommand, bytes: Int, cookie: UInt64, context: ChannelHandlerContext) {
        let session = self.session
        let logger = self.logger
        pool.runIfActive(eventLoop: context.eventLoop) {
            session.export.perform(command, cookie: cookie, session: session, logger: logger)
        }.assumeIsolated().whenComplete { result in
            self.finish(command, result, bytes: bytes, cookie: cookie, context: context)
        }
    }

    /// A request counted in flight is answered (or refused because the pool has stopped).
    private func finish(_ command: NBDCommand, _ result: Result<NBDReply, Error>, bytes: Int, cookie: UInt64,
                        context: ChannelHandlerContext) {
        inFlight -= 1
        inFlightBytes -= bytes
        switch result {
        case .success(let reply):
            record(command, reply: reply)
            if case .closed = state {} else {
                context.writeAndFlush(wrapOutboundOut(reply.bytes), promise: nil)
            }
        case .failure:
            // The pool stopped before running the request: only happens while shutting down.
            reject(command.name, cookie: cookie,
                   NBDRejection(error: .shutdown, message: "server is shutting down"), context: context)
        }
        completed(context: context)
        releaseLeaseIfIdle()
    }

    /// Lets go of the export once the channel has closed and nothing is in flight: the last
    /// use of the device by this connection is over.
    private func releaseLeaseIfIdle() {
        if case .closed = state, inFlight == 0 { lease = nil }
    }

    private func record(_ command: NBDCommand, reply: NBDReply) {
        if reply.error != nil {
            stats.failed += 1
            return
        }
        switch command {
        case .read(_, let length, _): stats.bytesRead += Int(length)
        case .write(_, let data, _): stats.bytesWritten += data.readableBytes
        default: break
        }
    }

    private func completed(context: ChannelHandlerContext) {
        switch state {
        case .serving:
            resume(context: context)
        case .draining:
            if inFlight == 0 {
                state = .closed
                context.close(promise: nil)
            }
        case .closed:
            break
        }
    }

    /// Picks up where backpressure stopped: decode what is buffered, then read more.
    private func resume(context: ChannelHandlerContext) {
        guard case .serving = state, !isSaturated(context) else { return }
        processBuffer(context: context)
        if readHeld, case .serving = state, !isSaturated(context) {
            readHeld = false
            context.read()
        }
    }

    private func beginDraining(context: ChannelHandlerContext, reason: String?) {
        if let reason, stats.closeReason == nil { stats.closeReason = reason }
        state = .draining
        if inFlight == 0 {
            state = .closed
            context.close(promise: nil)
        }
    }
}
