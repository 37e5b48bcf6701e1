import Logging
import NIOCore
import Strata
@testable import StrataNBD

/// fuzz_nbd: the input is what a client sends, driven through the server's protocol layers the
/// way the channel handlers drive them, but with no channel, event loop or socket:
///
///     byte 0       bits 0-5: the input arrives in pieces of (value + 1) bytes, as reads would
///                  bit 7: skip the handshake and start in transmission with structured
///                  replies and both meta contexts on the writable export
///     bytes 1...   the client's byte stream
///
/// Handshake: ``HandshakeDecoder`` frames the client flags and options, the
/// ``HandshakeStateMachine`` answers them, and every reply is encoded as the handler would.
/// Transmission (with what was left in the buffer): ``RequestDecoder`` frames requests,
/// ``RequestValidator`` checks them, and valid ones are performed on the export, a small qcow2
/// image in memory (fresh for every input), producing the complete reply.
///
/// A thrown protocol error ends the input, as it ends a connection; only a crash, a hang or a
/// huge allocation is a bug.
enum Fixture {
    /// A 1 MiB qcow2 image with 4 KiB clusters and some data, made once; every input gets a copy.
    static let template: [UInt8] = {
        let storage = MemoryStorage(name: "template.qcow2")
        var options = CreateOptions(size: 1 << 20)
        options.clusterSize = 4096
        try! Qcow2Image.create(storage: storage, path: "template.qcow2", options: options)
        let disk = try! Qcow2Image(storage: storage, options: OpenOptions(writable: true, format: .qcow2))
        let data = [UInt8](repeating: 0x5A, count: 12288)
        try! data.withUnsafeBytes { try disk.write($0, at: 8192, fua: false) }
        try! disk.close()
        return storage.contents
    }()
    static let logger = Logger(label: "fuzz_nbd") { _ in SwiftLogNoOpLogHandler() }

    static func registry() -> ExportRegistry {
        let disk = try! Qcow2Image(storage: MemoryStorage(name: "disk.qcow2", bytes: template),
                                   options: OpenOptions(writable: true, format: .qcow2))
        let raw = try! RawImage(storage: MemoryStorage(name: "ro.raw", bytes: [UInt8](repeating: 1, count: 65536)), writable: false)
        return ExportRegistry([
            Export(name: "disk", description: "fuzz disk", device: disk),
            Export(name: "ro", device: raw, readOnly: true),
        ], logger: logger)
    }
}

/// The client's bytes, handed to the decoders a piece at a time as socket reads would be.
private final class ClientStream {
    private var input: ByteBuffer
    private let piece: Int
    /// What has arrived and not been consumed yet.
    var buffer = ByteBuffer()

    init(_ bytes: UnsafeBufferPointer<UInt8>, piece: Int) {
        input = ByteBuffer(bytes: bytes)
        self.piece = piece
    }

    /// Appends the next piece; false at the end of the input.
    func feed() -> Bool {
        guard input.readableBytes > 0 else { return false }
        var slice = input.readSlice(length: min(piece, input.readableBytes))!
        buffer.writeBuffer(&slice)
        return true
    }
}

/// Most requests one input may carry, so that a long input of tiny requests cannot stall.
private let maxRequests = 4096

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzNBD(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size >= 1 else { return 0 }
    let control = data[0]
    let stream = ClientStream(UnsafeBufferPointer(start: data + 1, count: size - 1), piece: Int(control & 0x3F) + 1)
    let registry = Fixture.registry()
    defer { try? registry.closeAll() }

    let session: NBDSession
    if control & 0x80 != 0 {
        session = NBDSession(export: registry.exports[0], structuredReplies: true, metaContexts: NBDMetaContext.allCases)
    } else {
        guard let s = handshake(registry: registry, stream) else { return 0 }
        session = s
    }
    transmission(session: session, stream)
    return 0
}

/// Runs the handshake until it hands over to transmission (returning the session) or ends.
private func handshake(registry: ExportRegistry, _ stream: ClientStream) -> NBDSession? {
    var decoder = HandshakeDecoder()
    var machine = HandshakeStateMachine(registry: registry)
    var out = ByteBuffer()
    ReplyEncoder.writeGreeting(flags: HandshakeStateMachine.greetingFlags, into: &out)
    while stream.feed() {
        while !machine.isFinished {
            let message: NBDHandshakeMessage?
            do { message = try decoder.decode(buffer: &stream.buffer) } catch { return nil }
            guard let message else { break }
            out.clear()
            switch machine.receive(message) {
            case .none:
                break
            case .send(let replies):
                for r in replies { ReplyEncoder.writeOptionReply(r, into: &out) }
            case .sendAndClose(let replies):
                for r in replies { ReplyEncoder.writeOptionReply(r, into: &out) }
                return nil
            case .enterTransmission(let session, let replies):
                for r in replies { ReplyEncoder.writeOptionReply(r, into: &out) }
                return session
            case .enterTransmissionAfterExportName(let session, let zeroes):
                ReplyEncoder.writeExportNameReply(size: session.export.size, flags: session.flags, zeroes: zeroes, into: &out)
                return session
            case .startTLS:
                // Not reached: this machine has no TLS credentials, so STARTTLS is refused.
                return nil
            case .close:
                return nil
            }
        }
    }
    return nil
}

/// Decodes, validates and performs requests until the input ends, a protocol error closes
/// the stream, or the client disconnects.
private func transmission(session: NBDSession, _ stream: ClientStream) {
    var decoder = RequestDecoder()
    var requests = 0
    repeat {
        while true {
            let request: NBDRequest?
            do { request = try decoder.decode(buffer: &stream.buffer) } catch { return }
            guard let request else { break }
            requests += 1
            if requests > maxRequests { return }
            switch RequestValidator.validate(request, session: session) {
            case .failure(let rejection):
                _ = session.export.errorReply(rejection.error, rejection.message, cookie: request.header.cookie, session: session)
            case .success(.disconnect):
                return
            case .success(let command):
                _ = session.export.perform(command, cookie: request.header.cookie, session: session, logger: Fixture.logger)
            }
        }
    } while stream.feed()
    // End of input: what a closed connection would do with a partial request.
    _ = try? decoder.decodeLast(buffer: &stream.buffer, seenEOF: true)
}
