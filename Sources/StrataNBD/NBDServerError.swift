#if canImport(Glibc)
import Glibc
#endif
import NIOCore
import NIOPosix

/// What can stop a server from starting, in words a user can act on. SwiftNIO's own errors
/// (`IOError`, `SocketAddressError`, `UnixDomainSocketPathWrongType`) are translated here and
/// nowhere else.
public enum NBDServerError: Error, Equatable, CustomStringConvertible {
    /// Binding the listening socket failed.
    case cannotListen(NBDServer.Address, ListenFailure)

    /// Why a listening socket could not be bound.
    public enum ListenFailure: Equatable, Sendable {
        /// Another socket is bound to the TCP address.
        case addressInUse
        /// A server is listening on the Unix socket already (it is left alone).
        case socketInUse
        /// Not allowed: a privileged port, or a directory the user cannot write.
        case permissionDenied
        /// No interface of this machine has that IP address.
        case addressNotAvailable
        /// The Unix socket's directory does not exist.
        case noDirectory(String)
        /// Something other than a socket already has the Unix socket's path (it is left alone).
        case notASocket
        /// The Unix socket path is longer than `sun_path` can hold.
        case pathTooLong(bytes: Int)
        /// The host name does not resolve.
        case unknownHost(String)
        /// Any other system error.
        case system(errno: Int32)
        /// An error with no errno; its own text.
        case other(String)
    }

    /// The longest Unix socket path: `sun_path` holds 108 bytes including the final NUL.
    public static let maxUnixPathBytes = 107

    public var description: String {
        switch self {
        case .cannotListen(let address, let failure):
            return "cannot listen on \(address): \(Self.words(failure, address: address))"
        }
    }

    private static func words(_ failure: ListenFailure, address: NBDServer.Address) -> String {
        switch failure {
        case .addressInUse: return "address already in use"
        case .socketInUse: return "another server is listening on it"
        case .permissionDenied:
            if case .tcp(_, let port) = address, port > 0 && port < 1024 {
                return "permission denied (ports below 1024 need root)"
            }
            return "permission denied"
        case .addressNotAvailable: return "no interface of this machine has that address"
        case .noDirectory(let dir): return "directory \(dir) does not exist"
        case .notASocket: return "\(address) exists and is not a socket"
        case .pathTooLong(let bytes):
            return "the path is \(bytes) bytes; a Unix socket path can have at most \(maxUnixPathBytes)"
        case .unknownHost(let host): return "unknown host '\(host)'"
        case .system(let errno): return lowercasedFirst(String(cString: strerror(errno)))
        case .other(let text): return text
        }
    }

    private static func lowercasedFirst(_ s: String) -> String {
        guard let first = s.first else { return s }
        return first.lowercased() + s.dropFirst()
    }

    /// Translates an error from binding `address`.
    static func listenFailure(_ error: Error, address: NBDServer.Address) -> ListenFailure {
        switch error {
        case let e as IOError:
            switch e.errnoCode {
            case EADDRINUSE: return .addressInUse
            case EACCES, EPERM: return .permissionDenied
            case EADDRNOTAVAIL: return .addressNotAvailable
            case ENOENT, ENOTDIR:
                if case .unix(let path) = address { return .noDirectory(directory(of: path)) }
                return .system(errno: e.errnoCode)
            default: return .system(errno: e.errnoCode)
            }
        case is UnixDomainSocketPathWrongType:
            return .notASocket
        case SocketAddressError.unixDomainSocketPathTooLong:
            if case .unix(let path) = address { return .pathTooLong(bytes: path.utf8.count) }
            return .other("\(error)")
        case SocketAddressError.unknown(let host, _):
            return .unknownHost(host)
        case let e as SocketAddressError.UnknownHost:
            return .unknownHost(e.host)
        default:
            return .other("\(error)")
        }
    }

    /// The directory part of a path (`.` for a bare name).
    private static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }
}
