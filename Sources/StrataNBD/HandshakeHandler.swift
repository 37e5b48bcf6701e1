import Logging
import NIOCore
import NIOPosix
import NIOSSL

/// Drives one connection through the handshake: sends the greeting, frames client messages
/// with ``HandshakeDecoder``, performs what ``HandshakeStateMachine`` decides, and on
/// `NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME` takes a lease on the chosen export and replaces itself
/// with a ``TransmissionHandler``, handing over the lease and any bytes the client already sent.
///
/// On an acknowledged `NBD_OPT_STARTTLS` it puts a TLS server handler at the front of the
/// pipeline and keeps haggling over the decrypted stream; the TLS handler stays for the
/// transmission phase.
final class HandshakeHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private var machine: HandshakeStateMachine
    private var decoder = HandshakeDecoder()
    private var buffer: ByteBuffer?
    private let registry: ExportRegistry
    private let pool: NIOThreadPool
    private let logger: Logger
    private let stats: ConnectionStats
    private let timeLimit: TimeAmount
    private var timeout: Scheduled<Void>?
    private let tls: NBDTLSConfiguration?

    init(registry: ExportRegistry, pool: NIOThreadPool, logger: Logger, stats: ConnectionStats,
         timeout: TimeAmount = .seconds(NBDLimits.handshakeTimeoutSeconds), tls: NBDTLSConfiguration? = nil) {
        self.machine = HandshakeStateMachine(registry: registry, tls: tls?.mode)
        self.tls = tls
        self.registry = registry
        self.pool = pool
        self.logger = logger
        self.stats = stats
        self.timeLimit = timeout
    }

    func channelActive(context: ChannelHandlerContext) {
        var greeting = context.channel.allocator.buffer(capacity: 18)
        ReplyEncoder.writeGreeting(flags: HandshakeStateMachine.greetingFlags, into: &greeting)
        context.writeAndFlush(wrapOutboundOut(greeting), promise: nil)
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        timeout = context.eventLoop.scheduleTask(in: timeLimit) {
            let (handler, context) = loopBound.value
            handler.close(context: context, because: NBDProtocolError.handshakeTimeout)
        }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        timeout?.cancel()
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let incoming = unwrapInboundIn(data)
        if buffer == nil || buffer!.readableBytes == 0 {
            buffer = incoming
        } else {
            var more = incoming
            buffer!.writeBuffer(&more)
        }
        // `buffer` becomes nil when STARTTLS hands the bytes after it to the TLS handler.
        while !machine.isFinished, buffer != nil {
            let message: NBDHandshakeMessage?
            do {
                message = try decoder.decode(buffer: &buffer!)
            } catch {
                close(context: context, because: error)
                return
            }
            guard let message else { break }
            perform(machine.receive(message), context: context)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case .shutdown? = event as? NBDServerEvent {
            stats.closeReason = "server shutting down during the handshake"
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if let tlsError = error as? NIOSSLError {
            close(context: context, because: NBDProtocolError.tlsHandshakeFailed("\(tlsError)"))
            return
        }
        close(context: context, because: error)
    }

    private func perform(_ action: HandshakeStateMachine.Action, context: ChannelHandlerContext) {
        switch action {
        case .none:
            break
        case .send(let replies):
            send(replies, context: context)
        case .sendAndClose(let replies):
            send(replies, context: context)
            stats.closeReason = "client aborted the handshake"
            context.close(promise: nil)
        case .enterTransmission(let session, let replies):
            send(replies, context: context)
            startTransmission(session, context: context)
        case .enterTransmissionAfterExportName(let session, let zeroes):
            var reply = context.channel.allocator.buffer(capacity: 134)
            ReplyEncoder.writeExportNameReply(size: session.export.size, flags: session.flags, zeroes: zeroes, into: &reply)
            context.writeAndFlush(wrapOutboundOut(reply), promise: nil)
            startTransmission(session, context: context)
        case .startTLS(let ack):
            send([ack], context: context)
            startTLS(context: context)
        case .close(let error):
            close(context: context, because: error)
        }
    }

    /// Puts the TLS handler first, after the plain-text ACK has been written. Bytes the client
    /// sent after STARTTLS (its first TLS record, if it did not wait for the ACK) are fed to
    /// the TLS handler rather than read as options.
    private func startTLS(context: ChannelHandlerContext) {
        guard let tls else { preconditionFailure("the machine accepts STARTTLS only with TLS credentials") }
        let early = buffer
        buffer = nil
        do {
            try context.pipeline.syncOperations.addHandler(tls.makeHandler(), position: .first)
        } catch {
            close(context: context, because: error)
            return
        }
        stats.tls = true
        logger.debug("STARTTLS: TLS handshake begins")
        if let early, early.readableBytes > 0 {
            context.pipeline.syncOperations.fireChannelRead(NIOAny(early))
        }
    }

    private func send(_ replies: [NBDOptionReply], context: ChannelHandlerContext) {
        var out = context.channel.allocator.buffer(capacity: 64 * replies.count)
        for reply in replies {
            ReplyEncoder.writeOptionReply(reply, into: &out)
            if reply.type.isError {
                logger.debug("option \(reply.option) refused with \(reply.type): \(reply.payload)")
            }
        }
        context.writeAndFlush(wrapOutboundOut(out), promise: nil)
    }

    private func startTransmission(_ session: NBDSession, context: ChannelHandlerContext) {
        timeout?.cancel()
        let channel = context.channel
        guard let lease = registry.lease(session.export, onRemoved: {
            channel.pipeline.fireUserInboundEventTriggered(NBDServerEvent.exportRemoved)
        }) else {
            // Removed between the lookup and now: the reply already went out, so all that is
            // left is to hang up.
            close(context: context, because: NBDProtocolError.exportRemoved(session.export.name))
            return
        }
        stats.exportName = session.export.name
        stats.negotiated = true
        logger.debug("""
            transmission on export '\(session.export.name)': structured replies \(session.structuredReplies), \
            contexts [\(session.metaContexts.map(\.name).joined(separator: ", "))], flags 0x\(String(session.flags.rawValue, radix: 16))
            """)
        let leftover = buffer ?? context.channel.allocator.buffer(capacity: 0)
        buffer = nil
        let transmission = TransmissionHandler(session: session, lease: lease, pool: pool, logger: logger,
                                               stats: stats, initialBytes: leftover)
        do {
            try context.pipeline.syncOperations.addHandler(transmission, position: .after(self))
        } catch {
            close(context: context, because: error)
            return
        }
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }

    private func close(context: ChannelHandlerContext, because error: Error) {
        guard context.channel.isActive else { return }
        logger.notice("connection \(stats.id): handshake failed: \(error)")
        stats.closeReason = "\(error)"
        context.close(promise: nil)
    }
}
