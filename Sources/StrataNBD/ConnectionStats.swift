import Logging
import NIOCore

/// What one connection did, for the single log line (at debug level) written when it closes.
/// Lives on the connection's event loop; only its handlers touch it.
final class ConnectionStats {
    /// Server-wide connection number, for the logs.
    let id: Int
    /// The client's address (see ``NBDServer/peerDescription(_:)``).
    let peer: String
    /// The export chosen, once the handshake is over.
    var exportName: String?
    /// True once `NBD_OPT_STARTTLS` was acknowledged.
    var tls = false
    /// True once the client reached the transmission phase.
    var negotiated = false
    var requests = 0
    var rejected = 0
    var failed = 0
    var bytesRead = 0
    var bytesWritten = 0
    /// Why the server closed the connection, if it did.
    var closeReason: String?

    init(id: Int, peer: String) {
        self.id = id
        self.peer = peer
    }

    /// The summary logged when the connection closes.
    var summary: String {
        var s = "connection \(id) from \(peer) closed"
        if let exportName { s += " (export '\(exportName)')" }
        if tls { s += " over TLS" }
        s += ": \(requests) requests, \(bytesRead) bytes read, \(bytesWritten) bytes written"
        if rejected > 0 { s += ", \(rejected) refused" }
        if failed > 0 { s += ", \(failed) failed" }
        if let closeReason { s += "; \(closeReason)" }
        return s
    }
}
