#if canImport(Glibc)
import Glibc
#endif
import NIOCore
import NIOSSL

/// Whether a TLS server insists on TLS (the protocol's FORCEDTLS mode) or lets the client
/// choose (its SELECTIVETLS mode, with no export TLS-only).
public enum NBDTLSMode: String, Sendable, CaseIterable {
    /// Every option but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` is refused with
    /// `NBD_REP_ERR_TLS_REQD` until TLS is on; `NBD_OPT_EXPORT_NAME` closes the connection.
    case require
    /// Clients may upgrade with `NBD_OPT_STARTTLS` or stay in plain text.
    case optional
}

/// Limits on the credential files, which are read whole into memory.
public enum NBDTLSLimits {
    /// A PEM file larger than this is refused (a long chain of certificates is a few tens of KiB).
    public static let maxPEMBytes = 1 << 20
}

/// Why the TLS credentials cannot be used, naming the flag and the file.
public enum NBDTLSError: Error, Equatable, CustomStringConvertible {
    /// The file cannot be opened or read.
    case unreadable(option: String, path: String, errno: Int32)
    /// The file is larger than ``NBDTLSLimits/maxPEMBytes``.
    case tooLarge(option: String, path: String)
    /// The file holds no PEM certificate (or no PEM private key) that can be parsed.
    case invalid(option: String, path: String, reason: String)
    /// The certificate and key cannot make a TLS context (typically: the key is not the
    /// certificate's).
    case unusable(certificate: String, key: String, reason: String)

    public var description: String {
        switch self {
        case .unreadable(let option, let path, let errno):
            return "\(option): cannot read '\(path)': \(String(cString: strerror(errno)))"
        case .tooLarge(let option, let path):
            return "\(option): '\(path)' is larger than \(NBDTLSLimits.maxPEMBytes) bytes; expected a PEM file"
        case .invalid(let option, let path, let reason):
            return "\(option): '\(path)' \(reason)"
        case .unusable(let certificate, let key, let reason):
            return "--tls-cert '\(certificate)' and --tls-key '\(key)' cannot be used together: \(reason)"
        }
    }
}

/// The server's TLS settings: x509 credentials, the mode, and whether clients must present a
/// certificate. One context is shared by every connection.
///
/// With a client CA, the server asks for a certificate and refuses clients whose certificate
/// is missing or not signed by that CA (like QEMU's `tls-creds-x509` with `verify-peer=on`).
/// Without one, any client may connect once TLS is up; it checks the server's certificate on
/// its side.
public struct NBDTLSConfiguration: Sendable {
    /// Whether plain-text clients are served.
    public let mode: NBDTLSMode
    /// True when clients must present a certificate signed by the client CA.
    public let verifiesClients: Bool
    let context: NIOSSLContext

    /// Loads PEM files: the server's certificate (chain), its private key, and optionally the
    /// CA that signs client certificates. Throws ``NBDTLSError`` naming the flag and path.
    public init(certificate: String, key: String, clientCA: String? = nil, mode: NBDTLSMode = .require) throws {
        let chain = try Self.certificates(in: certificate, option: "--tls-cert")
        let keyBytes = try Self.readPEM(key, option: "--tls-key")
        let privateKey: NIOSSLPrivateKey
        do {
            privateKey = try NIOSSLPrivateKey(bytes: keyBytes, format: .pem)
        } catch {
            throw NBDTLSError.invalid(option: "--tls-key", path: key, reason: "holds no PEM private key (\(error))")
        }
        var tls = TLSConfiguration.makeServerConfiguration(certificateChain: chain.map { .certificate($0) },
                                                           privateKey: .privateKey(privateKey))
        tls.minimumTLSVersion = .tlsv12
        if let clientCA {
            tls.trustRoots = .certificates(try Self.certificates(in: clientCA, option: "--tls-ca"))
            tls.certificateVerification = .noHostnameVerification
            tls.sendCANameList = true
        } else {
            tls.certificateVerification = .none
        }
        do {
            context = try NIOSSLContext(configuration: tls)
        } catch NIOSSLError.failedToLoadPrivateKey {
            // The key parsed above, so BoringSSL refused the pair.
            throw NBDTLSError.unusable(certificate: certificate, key: key,
                                       reason: "the key is not the certificate's (failedToLoadPrivateKey)")
        } catch {
            throw NBDTLSError.unusable(certificate: certificate, key: key, reason: "\(error)")
        }
        self.mode = mode
        self.verifiesClients = clientCA != nil
    }

    /// A handler that runs the server side of a TLS session; goes first in the pipeline.
    func makeHandler() -> NIOSSLServerHandler {
        NIOSSLServerHandler(context: context)
    }

    private static func certificates(in path: String, option: String) throws -> [NIOSSLCertificate] {
        let bytes = try readPEM(path, option: option)
        let certificates: [NIOSSLCertificate]
        do {
            certificates = try NIOSSLCertificate.fromPEMBytes(bytes)
        } catch {
            throw NBDTLSError.invalid(option: option, path: path, reason: "holds no valid PEM certificate (\(error))")
        }
        guard !certificates.isEmpty else {
            throw NBDTLSError.invalid(option: option, path: path, reason: "holds no PEM certificate")
        }
        return certificates
    }

    /// The whole file, at most ``NBDTLSLimits/maxPEMBytes``.
    private static func readPEM(_ path: String, option: String) throws -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw NBDTLSError.unreadable(option: option, path: path, errno: errno) }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw NBDTLSError.unreadable(option: option, path: path, errno: errno)
            }
            if n == 0 { return bytes }
            bytes += chunk[0..<n]
            if bytes.count > NBDTLSLimits.maxPEMBytes { throw NBDTLSError.tooLarge(option: option, path: path) }
        }
    }
}
