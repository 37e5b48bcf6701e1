import NIOCore

/// What the handshake settled, carried into the transmission phase.
public struct NBDSession: Sendable, Equatable {
    /// The export the client chose.
    public let export: Export
    /// Whether the client negotiated `NBD_OPT_STRUCTURED_REPLY`.
    public let structuredReplies: Bool
    /// The contexts block status reports, in the order of their chunks (empty: block status
    /// is refused).
    public let metaContexts: [NBDMetaContext]
    /// The transmission flags the client was sent.
    public var flags: NBDTransmissionFlags { export.transmissionFlags(structuredReplies: structuredReplies) }

    public init(export: Export, structuredReplies: Bool, metaContexts: [NBDMetaContext]) {
        self.export = export
        self.structuredReplies = structuredReplies
        self.metaContexts = metaContexts
    }

    /// Sessions are equal when they serve the same export object with the same settings.
    public static func == (a: NBDSession, b: NBDSession) -> Bool {
        a.export === b.export && a.structuredReplies == b.structuredReplies && a.metaContexts == b.metaContexts
    }
}

/// The fixed-newstyle handshake as a state machine: the handler feeds it decoded messages and
/// performs the ``Action`` each returns. No I/O and no NIO channel here, so every option
/// exchange can be tested with plain values.
///
/// The server has already sent the greeting (`NBDMAGIC`, `IHAVEOPT`, handshake flags
/// `FIXED_NEWSTYLE | NO_ZEROES`) when the machine starts.
///
/// TLS (when the server has credentials): `NBD_OPT_STARTTLS` is answered with `NBD_REP_ACK`
/// and everything after it is encrypted. In ``NBDTLSMode/require`` (the protocol's FORCEDTLS)
/// every other option before it gets `NBD_REP_ERR_TLS_REQD`, except `NBD_OPT_ABORT`, and
/// `NBD_OPT_EXPORT_NAME`, which cannot carry an error, closes the connection. STARTTLS forgets
/// structured replies and meta contexts negotiated before it, as the protocol asks.
struct HandshakeStateMachine {
    /// What the handler must do next.
    enum Action: Equatable {
        /// Nothing to send; wait for the next message.
        case none
        /// Send these replies, then wait for the next option.
        case send([NBDOptionReply])
        /// Send these replies, then close the connection (`NBD_OPT_ABORT`).
        case sendAndClose([NBDOptionReply])
        /// `NBD_OPT_GO` succeeded: send these replies (ending in `NBD_REP_ACK`) and switch to
        /// the transmission phase.
        case enterTransmission(NBDSession, replies: [NBDOptionReply])
        /// `NBD_OPT_EXPORT_NAME` succeeded: send size and flags (plus 124 zeroes unless the
        /// client negotiated no-zeroes) and switch to the transmission phase.
        case enterTransmissionAfterExportName(NBDSession, zeroes: Bool)
        /// `NBD_OPT_STARTTLS` accepted: send this `NBD_REP_ACK` in plain text, then run the
        /// TLS handshake on the same connection; option haggling goes on inside TLS.
        case startTLS(NBDOptionReply)
        /// The client broke the protocol: drop the connection.
        case close(NBDProtocolError)
    }

    private enum State {
        case awaitingClientFlags
        case negotiating
        case finished
    }

    private let registry: ExportRegistry
    private let tls: NBDTLSMode?
    /// True once `NBD_OPT_STARTTLS` was acknowledged: the rest of the connection is encrypted.
    private(set) var tlsStarted = false
    private var state: State = .awaitingClientFlags
    private var optionCount = 0
    private var noZeroes = false
    private var structuredReplies = false
    /// The contexts of the last `NBD_OPT_SET_META_CONTEXT`, and the export they were chosen for.
    private var metaContexts: [NBDMetaContext] = []
    private var metaContextExport: Export?

    /// The flags this server greets with.
    static let greetingFlags: NBDHandshakeFlags = [.fixedNewstyle, .noZeroes]

    /// A machine answering from `registry`, which it asks afresh on every option; `tls` is nil
    /// when the server has no TLS credentials (STARTTLS is refused by policy).
    init(registry: ExportRegistry, tls: NBDTLSMode? = nil) {
        self.registry = registry
        self.tls = tls
    }

    /// True once the handshake has handed over to transmission or decided to close.
    var isFinished: Bool {
        if case .finished = state { return true }
        return false
    }

    mutating func receive(_ message: NBDHandshakeMessage) -> Action {
        switch (state, message) {
        case (.awaitingClientFlags, .clientFlags(let raw)):
            let flags = NBDClientFlags(rawValue: raw)
            guard flags.isSubset(of: .known) else { return finish(.close(.unknownClientFlags(raw))) }
            guard flags.contains(.fixedNewstyle) else { return finish(.close(.notFixedNewstyle)) }
            noZeroes = flags.contains(.noZeroes)
            state = .negotiating
            return .none

        case (.negotiating, .option(let code, let data)):
            optionCount += 1
            guard optionCount <= NBDLimits.maxOptionsPerHandshake else { return finish(.close(.tooManyOptions)) }
            return option(code, data)

        case (.awaitingClientFlags, .option), (.negotiating, .clientFlags), (.finished, _):
            preconditionFailure("handshake message \(message) in state \(state): the decoder frames flags once, then options")
        }
    }

    private mutating func finish(_ action: Action) -> Action {
        state = .finished
        return action
    }

    private mutating func option(_ code: NBDOptionCode, _ data: ByteBuffer) -> Action {
        if tls == .require && !tlsStarted {
            switch code {
            case .startTLS, .abort:
                break
            case .exportName:
                return finish(.close(.tlsRequired))
            default:
                return .send([.error(code, .errTLSRequired, "TLS is required: send NBD_OPT_STARTTLS first")])
            }
        }
        switch code {
        case .exportName:
            let name = String(buffer: data)
            guard data.readableBytes <= NBDLimits.maxStringLength, let export = registry.lookup(name) else {
                return finish(.close(.unknownExport(name)))
            }
            return finish(.enterTransmissionAfterExportName(session(for: export), zeroes: !noZeroes))

        case .abort:
            // Any data is ignored, as the protocol asks.
            return finish(.sendAndClose([.ack(code)]))

        case .list:
            guard data.readableBytes == 0 else { return .send([.error(code, .errInvalid, "NBD_OPT_LIST takes no data")]) }
            var replies = registry.exports.map {
                NBDOptionReply(option: code, type: .server, payload: .server(name: $0.name, details: $0.description))
            }
            replies.append(.ack(code))
            return .send(replies)

        case .startTLS:
            guard data.readableBytes == 0 else { return .send([.error(code, .errInvalid, "NBD_OPT_STARTTLS takes no data")]) }
            guard tls != nil else { return .send([.error(code, .errPolicy, "TLS is not enabled on this server")]) }
            guard !tlsStarted else { return .send([.error(code, .errInvalid, "TLS is already on")]) }
            tlsStarted = true
            structuredReplies = false
            metaContexts = []
            metaContextExport = nil
            return .startTLS(.ack(code))

        case .info, .go:
            guard let request = NBDInfoRequest.parse(data) else {
                return .send([.error(code, .errInvalid, "malformed \(code) request")])
            }
            guard let export = registry.lookup(request.exportName) else {
                return .send([.error(code, .errUnknown, "no export named '\(request.exportName)'")])
            }
            let session = session(for: export)
            var replies = [NBDOptionReply(option: code, type: .info,
                                          payload: .exportInfo(size: export.size, flags: session.flags))]
            if request.requests.contains(.name) {
                replies.append(NBDOptionReply(option: code, type: .info, payload: .nameInfo(export.name)))
            }
            if request.requests.contains(.description), let text = export.description {
                replies.append(NBDOptionReply(option: code, type: .info, payload: .descriptionInfo(text)))
            }
            // Always sent: it tells every client the 32 MiB cap and the efficient I/O size.
            replies.append(NBDOptionReply(option: code, type: .info, payload: .blockSizeInfo(
                minimum: 1, preferred: export.preferredBlockSize, maximum: NBDLimits.maxPayload)))
            replies.append(.ack(code))
            if code == .go { return finish(.enterTransmission(session, replies: replies)) }
            return .send(replies)

        case .structuredReply:
            guard data.readableBytes == 0 else {
                return .send([.error(code, .errInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")])
            }
            guard !structuredReplies else {
                return .send([.error(code, .errInvalid, "structured replies are already negotiated")])
            }
            structuredReplies = true
            return .send([.ack(code)])

        case .listMetaContext, .setMetaContext:
            let setting = code == .setMetaContext
            if setting {
                // A set replaces the previous selection even when it fails.
                metaContexts = []
                metaContextExport = nil
            }
            guard structuredReplies else {
                return .send([.error(code, .errInvalid, "negotiate structured replies first")])
            }
            let request: NBDMetaContextRequest
            switch NBDMetaContextRequest.parse(data) {
            case .success(let r): request = r
            case .failure(.malformed): return .send([.error(code, .errInvalid, "malformed \(code) request")])
            case .failure(.tooManyQueries):
                return .send([.error(code, .errTooBig, "more than \(NBDLimits.maxMetaContextQueries) queries")])
            }
            guard let export = registry.lookup(request.exportName) else {
                return .send([.error(code, .errUnknown, "no export named '\(request.exportName)'")])
            }
            let matched = Self.matchContexts(request.queries, listing: !setting)
            if setting {
                metaContexts = matched
                metaContextExport = export
            }
            var replies = matched.map {
                NBDOptionReply(option: code, type: .metaContext,
                               payload: .metaContext(id: setting ? $0.rawValue : 0, name: $0.name))
            }
            replies.append(.ack(code))
            return .send(replies)

        default:
            return .send([.error(code, .errUnsupported, "\(code) is not supported")])
        }
    }

    /// The session a client gets for `export`: contexts chosen for another export do not carry
    /// over.
    private func session(for export: Export) -> NBDSession {
        NBDSession(export: export, structuredReplies: structuredReplies,
                   metaContexts: metaContextExport === export ? metaContexts : [])
    }

    /// The contexts a list of queries names. Exact names select a context; when listing, a
    /// bare namespace (`base:`, `qemu:`) or no query at all lists every context in it. Queries
    /// we do not know are ignored, as the protocol requires.
    static func matchContexts(_ queries: [String], listing: Bool) -> [NBDMetaContext] {
        if queries.isEmpty { return listing ? NBDMetaContext.allCases : [] }
        return NBDMetaContext.allCases.filter { context in
            queries.contains { $0 == context.name || (listing && $0 == context.namespace) }
        }
    }
}
