#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Logging
import NIOCore
import NIOPosix
import Strata
import Synchronization

/// An NBD server: listens on a Unix socket or TCP address and serves the exports of an
/// ``ExportRegistry`` to any number of clients at once. Exports can be added and removed while
/// it runs (``add(_:)``, ``remove(_:)``).
///
/// Life cycle: ``start()`` binds and returns; ``wait()`` blocks until the server has stopped
/// and torn down; ``shutdown()`` (from any thread, or SIGINT/SIGTERM after
/// ``installSignalHandlers()``) stops it gracefully:
/// 1. stop accepting;
/// 2. connections still in the handshake are closed; connections in transmission stop reading,
///    answer anything already received with `NBD_ESHUTDOWN`, finish the requests in flight and
///    close;
/// 3. the I/O pool stops; the registry flushes and closes every image (dirty bit cleared,
///    lock released); the event loops stop; the Unix socket file is removed.
public final class NBDServer: Sendable {
    /// Where to listen.
    public enum Address: Sendable, Equatable, CustomStringConvertible {
        case unix(path: String)
        case tcp(host: String, port: Int)

        /// `PATH`, `HOST:PORT` or `[V6HOST]:PORT`.
        public var description: String {
            switch self {
            case .unix(let path): return path
            case .tcp(let host, let port): return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
            }
        }
    }

    /// Server settings.
    public struct Configuration: Sendable {
        /// Where to listen. The default is TCP 127.0.0.1:10809 (the IANA NBD port).
        public var address: Address = .tcp(host: "127.0.0.1", port: 10809)
        /// Connections served at once; more wait in the listen backlog until one closes.
        public var maxConnections = 128
        /// Stop after the first client that reached transmission has disconnected (and no
        /// other connection is open), like `qemu-nbd` without `--persistent`.
        public var once = false
        /// Threads running blocking device calls.
        public var ioThreads = 16
        /// Event loop threads (sockets, framing, replies).
        public var eventLoopThreads = System.coreCount
        /// How long a connection may take to finish the handshake before it is dropped.
        public var handshakeTimeout = TimeAmount.seconds(NBDLimits.handshakeTimeoutSeconds)
        /// TLS credentials and mode; nil serves plain text only (`NBD_OPT_STARTTLS` is refused
        /// with `NBD_REP_ERR_POLICY`).
        public var tls: NBDTLSConfiguration?

        public init(address: Address = .tcp(host: "127.0.0.1", port: 10809)) {
            self.address = address
        }
    }

    private struct Connections {
        var open: [ObjectIdentifier: Channel] = [:]
        var nextID = 1
        var stopping = false
        var acceptPaused = false
        var negotiatedClientLeft = false
        var drainedSignalled = false
        var serverChannel: Channel?
    }

    /// The exports served; the owner of their images.
    public let registry: ExportRegistry
    /// The settings it was started with.
    public let configuration: Configuration
    private let logger: Logger
    private let group: MultiThreadedEventLoopGroup
    private let pool: NIOThreadPool
    private let connections = Mutex(Connections())
    /// Signalled once the listener is closed and every connection is gone.
    private let drained = DispatchSemaphore(value: 0)
    private let boundAddress = Mutex<SocketAddress?>(nil)
    private let signalSources = Mutex<[DispatchSourceSignal]>([])

    /// A server for the exports in `registry`, which it closes in ``wait()``. Nothing happens
    /// until ``start()``.
    public init(registry: ExportRegistry, configuration: Configuration, logger: Logger) {
        self.registry = registry
        self.configuration = configuration
        self.logger = logger
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, configuration.eventLoopThreads))
        self.pool = NIOThreadPool(numberOfThreads: max(1, configuration.ioThreads))
    }

    /// The address actually bound (with the real port when 0 was asked for).
    public var localAddress: SocketAddress? { boundAddress.withLock { $0 } }

    /// Binds the listening socket and starts accepting. Throws ``NBDServerError/cannotListen(_:_:)``
    /// saying why when the address cannot be bound. A Unix socket file left by a server that is
    /// gone is replaced; one a server still listens on is left alone.
    public func start() throws {
        pool.start()
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: 256)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(ChannelOptions.recvAllocator,
                                value: AdaptiveRecvByteBufferAllocator(minimum: 1024, initial: 64 << 10, maximum: 256 << 10))
            .childChannelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture { try self.accepted(channel) }
            }
        let channel: Channel
        do {
            switch configuration.address {
            case .unix(let path):
                if isServed(unixSocket: path) { throw NBDServerError.cannotListen(configuration.address, .socketInUse) }
                channel = try bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).wait()
            case .tcp(let host, let port):
                channel = try bootstrap
                    .childChannelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
                    .bind(host: host, port: port).wait()
            }
        } catch {
            try? pool.syncShutdownGracefully()
            try? group.syncShutdownGracefully()
            if let e = error as? NBDServerError { throw e }
            throw NBDServerError.cannotListen(configuration.address,
                                              NBDServerError.listenFailure(error, address: configuration.address))
        }
        boundAddress.withLock { $0 = channel.localAddress }
        connections.withLock { $0.serverChannel = channel }
        channel.closeFuture.whenComplete { [self] _ in checkDrained() }
        if let tls = configuration.tls {
            logger.info("TLS \(tls.mode == .require ? "required" : "optional")\(tls.verifiesClients ? ", client certificates verified" : "")")
        }
        logger.info("listening on \(boundDescription), exports: \(registry.exports.map { "'\($0.name)'" }.joined(separator: ", "))")
    }

    /// True when something accepts connections on the Unix socket at `path`: binding there would
    /// unlink a live server's socket.
    private func isServed(unixSocket path: String) -> Bool {
        guard path.utf8.count <= NBDServerError.maxUnixPathBytes,
              let probe = try? ClientBootstrap(group: group).connectTimeout(.seconds(1))
                .connect(unixDomainSocketPath: path).wait()
        else { return false }
        probe.close(promise: nil)
        return true
    }

    /// The NBD URIs clients can use, one per export served now (the first export is also the
    /// default, reached with an empty name). With TLS they use the `nbds` schemes.
    public var uris: [String] {
        registry.exports.map {
            NBDServer.uri(for: configuration.address, bound: localAddress, export: $0.name, tls: configuration.tls != nil)
        }
    }

    /// Serves `export` from now on; new handshakes see it at once. The registry takes
    /// ownership of its device (see ``ExportRegistry/add(_:)``).
    public func add(_ export: Export) throws {
        try registry.add(export)
    }

    /// Stops serving the export `name` (see ``ExportRegistry/remove(_:)``): new handshakes no
    /// longer find it; its connections answer new requests with `NBD_ESHUTDOWN`, finish the
    /// ones in flight and close; its image is closed once nothing uses it.
    public func remove(_ name: String) throws {
        try registry.remove(name)
    }

    /// Stops gracefully; returns at once (``wait()`` blocks until it is done). Idempotent,
    /// callable from any thread.
    public func shutdown() {
        let (server, channels): (Channel?, [Channel]) = connections.withLock {
            guard !$0.stopping else { return (nil, []) }
            $0.stopping = true
            return ($0.serverChannel, Array($0.open.values))
        }
        guard let server else { return }
        logger.info("shutting down: \(channels.count) connection(s) to finish")
        server.close(promise: nil)
        for channel in channels {
            channel.pipeline.fireUserInboundEventTriggered(NBDServerEvent.shutdown)
        }
    }

    /// Blocks until the server has stopped, then tears down: stops the I/O pool, flushes and
    /// closes every image, stops the event loops, removes the Unix socket. Throws the first
    /// error from closing an image (each one is logged).
    public func wait() throws {
        drained.wait()
        try? pool.syncShutdownGracefully()
        var firstError: Error?
        do {
            try registry.closeAll()
        } catch {
            firstError = error
        }
        try? group.syncShutdownGracefully()
        if case .unix(let path) = configuration.address { unlink(path) }
        signalSources.withLock { sources in
            for s in sources { s.cancel() }
            sources.removeAll()
        }
        logger.info("server stopped")
        if let firstError { throw firstError }
    }

    /// Makes SIGINT and SIGTERM stop the server gracefully. A second signal exits at once
    /// with status 1.
    public func installSignalHandlers() {
        // A write past a file size limit (RLIMIT_FSIZE) fails with EFBIG, answered as ENOSPC,
        // instead of the signal killing the server.
        signal(SIGXFSZ, SIG_IGN)
        let sources = [SIGINT, SIGTERM].map { sig -> DispatchSourceSignal in
            signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: DispatchQueue.global())
            source.setEventHandler { [self] in
                if connections.withLock({ $0.stopping }) {
                    logger.warning("second signal: exiting without a clean shutdown")
                    exit(1)
                }
                logger.info("received signal \(sig)")
                shutdown()
            }
            source.resume()
            return source
        }
        signalSources.withLock { $0 = sources }
    }

    // MARK: Connections

    private func accepted(_ channel: Channel) throws {
        enum Admission { case admit(Int), refuse(String) }
        let admission: Admission = connections.withLock {
            if $0.stopping { return .refuse("server is shutting down") }
            if $0.open.count >= configuration.maxConnections { return .refuse("too many connections") }
            let id = $0.nextID
            $0.nextID += 1
            $0.open[ObjectIdentifier(channel)] = channel
            if $0.open.count >= configuration.maxConnections && !$0.acceptPaused {
                $0.acceptPaused = true
                $0.serverChannel?.setOption(ChannelOptions.autoRead, value: false).whenComplete { _ in }
            }
            return .admit(id)
        }
        guard case .admit(let id) = admission else {
            if case .refuse(let why) = admission { logger.notice("refused a connection: \(why)") }
            channel.close(promise: nil)
            return
        }
        let stats = ConnectionStats(id: id, peer: Self.peerDescription(channel.remoteAddress))
        var connectionLogger = logger
        connectionLogger[metadataKey: "conn"] = "\(id)"
        let handshake = HandshakeHandler(registry: registry, pool: pool, logger: connectionLogger, stats: stats,
                                         timeout: configuration.handshakeTimeout, tls: configuration.tls)
        try channel.pipeline.syncOperations.addHandler(handshake)
        channel.closeFuture.assumeIsolated().whenComplete { [self] _ in
            connectionLogger.debug("\(stats.summary)")
            closed(channel, negotiated: stats.negotiated)
        }
    }

    private func closed(_ channel: Channel, negotiated: Bool) {
        let (resumeAccept, stopNow) = connections.withLock { c -> (Channel?, Bool) in
            c.open[ObjectIdentifier(channel)] = nil
            if negotiated { c.negotiatedClientLeft = true }
            var resume: Channel?
            if c.acceptPaused && c.open.count < configuration.maxConnections && !c.stopping {
                c.acceptPaused = false
                resume = c.serverChannel
            }
            let stop = configuration.once && c.negotiatedClientLeft && c.open.isEmpty && !c.stopping
            return (resume, stop)
        }
        resumeAccept?.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
        if stopNow {
            logger.info("--once: the client has disconnected")
            shutdown()
        }
        checkDrained()
    }

    private func checkDrained() {
        let done = connections.withLock { c in
            guard c.stopping, !c.drainedSignalled, c.open.isEmpty, !(c.serverChannel?.isActive ?? false) else { return false }
            c.drainedSignalled = true
            return true
        }
        if done { drained.signal() }
    }

    /// A client's address for the logs: `HOST:PORT`, `[V6HOST]:PORT`, or "the Unix socket".
    static func peerDescription(_ address: SocketAddress?) -> String {
        switch address {
        case .unixDomainSocket?: return "the Unix socket"
        case let a?:
            let host = a.ipAddress ?? "?"
            return (host.contains(":") ? "[\(host)]" : host) + ":\(a.port ?? 0)"
        case nil: return "an unknown address"
        }
    }

    // MARK: URIs

    /// The address as bound (the real port when 0 was asked for).
    private var boundDescription: String {
        switch configuration.address {
        case .unix: return "unix socket \(configuration.address)"
        case .tcp(let host, let port): return "tcp \(Address.tcp(host: host, port: localAddress?.port ?? port))"
        }
    }

    /// The NBD URI for one export (see the NBD URI specification): `nbd+unix:///NAME?socket=PATH`
    /// or `nbd://HOST:PORT/NAME`, with the name and path percent-encoded; `nbds+unix` and
    /// `nbds` when `tls`.
    public static func uri(for address: Address, bound: SocketAddress?, export: String, tls: Bool = false) -> String {
        let scheme = tls ? "nbds" : "nbd"
        switch address {
        case .unix(let path):
            return "\(scheme)+unix:///\(percentEncode(export, keeping: "/"))?socket=\(percentEncode(path, keeping: "/"))"
        case .tcp(let host, let port):
            let h = host.contains(":") ? "[\(host)]" : host
            return "\(scheme)://\(h):\(bound?.port ?? port)/\(percentEncode(export, keeping: "/"))"
        }
    }

    static func percentEncode(_ s: String, keeping extra: String) -> String {
        var out = ""
        for byte in s.utf8 {
            let c = Character(Unicode.Scalar(byte))
            if byte < 0x80 && (c.isLetter || c.isNumber || "-._~".contains(c) || extra.contains(c)) {
                out.append(c)
            } else {
                out += "%" + (byte < 16 ? "0" : "") + String(byte, radix: 16, uppercase: true)
            }
        }
        return out
    }
}

/// Events the server sends down a connection's pipeline.
public enum NBDServerEvent: Sendable {
    /// The server is stopping: finish what is in flight, answer anything already received
    /// with `NBD_ESHUTDOWN`, then close.
    case shutdown
    /// The connection's export was removed: the same as ``shutdown``, for this connection only.
    case exportRemoved
}
