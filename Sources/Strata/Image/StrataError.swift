#if canImport(Glibc)
import Glibc
#endif

/// Everything the engine can refuse or fail at, named for the action that failed and carrying
/// the file and the offending value. The CLI prints `description`; the NBD server maps
/// ``errnoValue`` to the wire.
public enum StrataError: Error, CustomStringConvertible, Sendable {
    case openFailed(path: String, errno: Int32)
    case io(path: String, SystemCallError)
    case notQcow2(path: String)
    case unsupportedVersion(path: String, version: UInt32)
    case invalidHeader(path: String, field: String, value: UInt64, reason: String)
    case unknownIncompatibleFeatures(path: String, names: [String])
    case unsupportedFeature(path: String, feature: String)
    case corruptImage(path: String, what: String)
    case imageIsCorruptBit(path: String)
    case imageIsDirty(path: String)
    case imageLocked(path: String, detail: String)
    case backingChainTooDeep(path: String, limit: Int)
    case backingChainLoop(path: String)
    case backingFormatUnknown(path: String, backing: String)
    case readOnly(path: String)
    case outOfRange(offset: UInt64, length: UInt64, size: UInt64)
    case invalidArgument(String)
    case noSpace(path: String)
    case decompressionFailed(path: String, offset: UInt64)
    case cannotShrink(path: String, size: UInt64, reason: String)

    public var description: String {
        switch self {
        case .openFailed(let p, let e): return "\(p): cannot open: \(String(cString: strerror(e)))"
        case .io(let p, let e): return "\(p): \(e)"
        case .notQcow2(let p): return "\(p): not a qcow2 image (bad magic)"
        case .unsupportedVersion(let p, let v): return "\(p): unsupported qcow2 version \(v) (2 and 3 are supported)"
        case .invalidHeader(let p, let f, let v, let r): return "\(p): invalid header field \(f) = \(v): \(r)"
        case .unknownIncompatibleFeatures(let p, let n): return "\(p): image uses unsupported incompatible feature(s): \(n.joined(separator: ", "))"
        case .unsupportedFeature(let p, let f): return "\(p): unsupported feature: \(f)"
        case .corruptImage(let p, let w): return "\(p): image is corrupt: \(w)"
        case .imageIsCorruptBit(let p): return "\(p): image is marked corrupt; it can only be opened read-only (repair with 'qemu-img check -r all')"
        case .imageIsDirty(let p): return "\(p): image is marked dirty (lazy refcounts were in use); repair it with 'qemu-img check -r all' before writing"
        case .imageLocked(let p, let d): return "\(p): failed to get \(d) lock: is another process using the image?"
        case .backingChainTooDeep(let p, let l): return "\(p): backing chain is deeper than \(l) images"
        case .backingChainLoop(let p): return "\(p): backing chain loops back to an image already in the chain"
        case .backingFormatUnknown(let p, let b): return "\(p): backing file '\(b)' has no recorded format; give it explicitly (backing format qcow2 or raw), the content is never probed"
        case .readOnly(let p): return "\(p): image is open read-only"
        case .outOfRange(let o, let l, let s): return "request at offset \(o) length \(l) is beyond the end of the disk (size \(s))"
        case .invalidArgument(let s): return s
        case .noSpace(let p): return "\(p): no space left on device"
        case .decompressionFailed(let p, let o): return "\(p): compressed cluster at host offset \(o) does not decompress"
        case .cannotShrink(let p, let s, let r): return "\(p): cannot shrink to \(s): \(r)"
        }
    }

    /// The errno closest to this error, for protocols that speak errno (NBD).
    public var errnoValue: Int32 {
        switch self {
        case .io(_, let e): return e.errno == ENOSPC ? ENOSPC : EIO
        case .readOnly, .imageIsCorruptBit: return EPERM
        case .outOfRange, .invalidArgument: return EINVAL
        case .noSpace: return ENOSPC
        case .openFailed(_, let e): return e
        default: return EIO
        }
    }
}

/// Named caps on every number read from an image file, checked before anything is
/// allocated or looped on.
public enum Limits {
    /// QEMU refuses L1 tables over 32 MiB; so do we.
    public static let maxL1Bytes: UInt64 = 32 << 20
    /// QEMU refuses refcount tables over 8 MiB; so do we.
    public static let maxRefcountTableBytes: UInt64 = 8 << 20
    /// The qcow2 spec caps backing file names at 1023 bytes.
    public static let maxBackingNameBytes: UInt64 = 1023
    /// Header extensions must fit in the first cluster; each is also capped here.
    public static let maxHeaderExtensionBytes: UInt64 = 2 << 20
    /// Deepest backing chain we follow.
    public static let maxBackingChainDepth = 64
    /// Largest virtual size we accept or create (QEMU's limit, 2^63 - 512 rounded to 2^62 here).
    public static let maxVirtualSize: UInt64 = 1 << 62
    /// Host offsets must lie below 2^56 (bits 9-55 of a descriptor).
    public static let maxHostOffset: UInt64 = 1 << 56
    /// Snapshot table entries we accept.
    public static let maxSnapshots: UInt64 = 65536
    /// Snapshot table size we read.
    public static let maxSnapshotTableBytes: UInt64 = 64 << 20
    /// In-memory storage cap (tests, fuzzing).
    public static let maxMemoryStorage: UInt64 = 1 << 30
}
