#if canImport(Glibc)
import Glibc
#endif
import Logging
import NIOCore
import NIOPosix
import Synchronization

/// The control socket (`strata serve --control PATH`): a Unix socket on which a manager sends
/// one JSON request per line and reads one JSON reply per line (spec/control.md).
///
/// The event loop only frames lines; each request runs on a small thread pool (commands call
/// the engine, which blocks), one at a time per connection, so replies come back in request
/// order. The socket file is created with mode 0600, refused when a live server listens on
/// it, replaced when stale, and removed by ``stop()``.
public final class ControlServer: Sendable {
    public let path: String
    private let service: ControlService
    private let logger: Logger
    private let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    private let pool = NIOThreadPool(numberOfThreads: 2)
    private let channel = Mutex<Channel?>(nil)
    private let connections = Mutex(0)

    public init(path: String, service: ControlService, logger: Logger) {
        self.path = path
        self.service = service
        self.logger = logger
    }

    /// Binds the socket and starts answering. Throws ``NBDServerError/cannotListen(_:_:)``.
    public func start() throws {
        let address = NBDServer.Address.unix(path: path)
        pool.start()
        do {
            if let probe = try? ClientBootstrap(group: group).connectTimeout(.seconds(1))
                .connect(unixDomainSocketPath: path).wait() {
                probe.close(promise: nil)
                throw NBDServerError.cannotListen(address, .socketInUse)
            }
            let bound = try ServerBootstrap(group: group)
                .serverChannelOption(ChannelOptions.backlog, value: 16)
                .childChannelOption(ChannelOptions.allowRemoteHalfClosure, value: true)
                .childChannelInitializer { [self] channel in
                    channel.eventLoop.makeCompletedFuture { try self.accepted(channel) }
                }
                .withBoundSocket(try Self.bindOwnerOnly(path: path)).wait()
            channel.withLock { $0 = bound }
            logger.info("control socket listening on \(path)")
        } catch {
            try? pool.syncShutdownGracefully()
            try? group.syncShutdownGracefully()
            if let e = error as? NBDServerError { throw e }
            throw NBDServerError.cannotListen(address, NBDServerError.listenFailure(error, address: address))
        }
    }

    /// A Unix stream socket bound at `path` whose file already has mode 0600 when it starts
    /// listening (`withBoundSocket` calls `listen`), so no other user can connect at any
    /// moment. `chmod` is used because `fchmod` on a socket does not change the file `bind`
    /// creates. A stale socket file is replaced; anything else at `path` is left alone.
    static func bindOwnerOnly(path: String) throws -> CInt {
        let address = try SocketAddress(unixDomainSocketPath: path)
        var st = stat()
        if lstat(path, &st) == 0 {
            guard st.st_mode & S_IFMT == S_IFSOCK else {
                throw NBDServerError.cannotListen(.unix(path: path), .notASocket)
            }
            unlink(path)
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw IOError(errnoCode: errno, reason: "socket") }
        let bound = address.withSockAddr { bind(fd, $0, socklen_t($1)) }
        guard bound == 0 else {
            let e = errno
            close(fd)
            throw IOError(errnoCode: e, reason: "bind")
        }
        guard chmod(path, 0o600) == 0 else {
            let e = errno
            close(fd)
            unlink(path)
            throw IOError(errnoCode: e, reason: "chmod")
        }
        return fd
    }

    /// Stops listening, closes control connections (a command already running finishes),
    /// removes the socket file. Idempotent.
    public func stop() {
        guard let ch = channel.withLock({ c -> Channel? in defer { c = nil }; return c }) else { return }
        try? ch.close().wait()
        try? pool.syncShutdownGracefully()
        try? group.syncShutdownGracefully()
        unlink(path)
    }

    private func accepted(_ channel: Channel) throws {
        let admitted = connections.withLock { n -> Bool in
            guard n < ControlLimits.maxConnections else { return false }
            n += 1
            return true
        }
        guard admitted else {
            logger.notice("control: refused a connection: \(ControlLimits.maxConnections) already open")
            channel.close(promise: nil)
            return
        }
        channel.closeFuture.whenComplete { [self] _ in connections.withLock { $0 -= 1 } }
        try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(ControlLineDecoder()))
        try channel.pipeline.syncOperations.addHandler(ControlConnectionHandler(service: service, pool: pool, logger: logger))
    }
}

/// One framed request: a line without its newline, or a line that ran past the limit.
enum ControlLine: Equatable {
    case line(ByteBuffer)
    case tooLong
}

/// Cuts the byte stream into lines at `\n` (a `\r` before it is dropped). A line longer than
/// ``ControlLimits/maxLineBytes`` yields `.tooLong` once, and nothing after it.
struct ControlLineDecoder: ByteToMessageDecoder {
    typealias InboundOut = ControlLine
    private var overflowed = false

    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard !overflowed else {
            buffer.moveReaderIndex(to: buffer.writerIndex)
            return .needMoreData
        }
        let view = buffer.readableBytesView
        guard let nl = view.firstIndex(of: UInt8(ascii: "\n")) else {
            if buffer.readableBytes > ControlLimits.maxLineBytes {
                overflowed = true
                buffer.moveReaderIndex(to: buffer.writerIndex)
                context.fireChannelRead(NIOAny(ControlLine.tooLong))
            }
            return .needMoreData
        }
        let length = nl - view.startIndex
        if length > ControlLimits.maxLineBytes {
            overflowed = true
            buffer.moveReaderIndex(to: buffer.writerIndex)
            context.fireChannelRead(NIOAny(ControlLine.tooLong))
            return .needMoreData
        }
        var line = buffer.readSlice(length: length)!
        buffer.moveReaderIndex(forwardBy: 1)
        if line.readableBytesView.last == UInt8(ascii: "\r") { line = line.getSlice(at: line.readerIndex, length: length - 1)! }
        context.fireChannelRead(NIOAny(ControlLine.line(line)))
        return .continue
    }

    mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        // A last request without its newline is still answered.
        if try decode(context: context, buffer: &buffer) == .continue { return .continue }
        if !overflowed && buffer.readableBytes > 0 {
            let line = buffer.readSlice(length: buffer.readableBytes)!
            context.fireChannelRead(NIOAny(ControlLine.line(line)))
        }
        return .needMoreData
    }
}

/// Runs a connection's requests on the pool, one after another, and writes each reply.
final class ControlConnectionHandler: ChannelInboundHandler {
    typealias InboundIn = ControlLine
    typealias OutboundOut = ByteBuffer

    /// Requests queued on one connection before it is closed: a client must read its replies.
    static let maxPending = 32

    private let service: ControlService
    private let pool: NIOThreadPool
    private let logger: Logger
    private var tail: EventLoopFuture<Void>?
    private var pending = 0
    private var closing = false

    init(service: ControlService, pool: NIOThreadPool, logger: Logger) {
        self.service = service
        self.pool = pool
        self.logger = logger
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !closing else { return }
        let loop = context.eventLoop
        let ctx = NIOLoopBound(context, eventLoop: loop)
        switch unwrapInboundIn(data) {
        case .tooLong:
            closing = true
            let reply = ControlJSON.object([("error", .object([
                ("class", .string("GenericError")),
                ("desc", .string("request line longer than \(ControlLimits.maxLineBytes) bytes; closing")),
            ]))]).text
            enqueue(loop) { reply }.whenComplete { _ in ctx.value.close(promise: nil) }
        case .line(let buffer):
            if buffer.readableBytesView.allSatisfy({ $0 == 0x20 || $0 == 0x09 }) { return }
            pending += 1
            guard pending <= Self.maxPending else {
                closing = true
                logger.notice("control: a client queued more than \(Self.maxPending) requests without reading; closing")
                context.close(promise: nil)
                return
            }
            let service = self.service
            let bytes = Array(buffer.readableBytesView)
            enqueue(loop) { service.handle(line: bytes) }.whenComplete { _ in }
        }
    }

    /// Chains one request after the previous one: `work` runs on the pool, its reply is
    /// written on the event loop.
    private func enqueue(_ loop: EventLoop, _ work: @escaping @Sendable () -> String)
        -> EventLoopFuture<Void> {
        let pool = self.pool
        let handler = NIOLoopBound(self, eventLoop: loop)
        let previous = tail ?? loop.makeSucceededVoidFuture()
        let next = previous.flatMap {
            pool.runIfActive(eventLoop: loop) { work() }
        }.map { reply in
            handler.value.write(reply)
        }.recover { _ in }
        tail = next
        return next
    }

    private func write(_ reply: String) {
        pending = max(0, pending - 1)
        guard let context = contextForWrite else { return }
        var out = context.channel.allocator.buffer(capacity: reply.utf8.count + 1)
        out.writeString(reply)
        out.writeInteger(UInt8(ascii: "\n"))
        context.writeAndFlush(NIOAny(out), promise: nil)
    }

    private var contextForWrite: ChannelHandlerContext?

    func handlerAdded(context: ChannelHandlerContext) { contextForWrite = context }
    func handlerRemoved(context: ChannelHandlerContext) { contextForWrite = nil }

    /// The client has sent its last request (`shutdown(SHUT_WR)`, or `socat` at end of input):
    /// answer what is queued, then close.
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard let e = event as? ChannelEvent, e == .inputClosed else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        closing = true
        let channel = NIOLoopBound(context.channel, eventLoop: context.eventLoop)
        (tail ?? context.eventLoop.makeSucceededVoidFuture()).whenComplete { _ in channel.value.close(promise: nil) }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        logger.debug("control: connection error: \(error)")
        context.close(promise: nil)
    }
}
