#if canImport(Glibc)
import Glibc
#endif

/// The bottom room of the engine: the error every other room throws, and the one place where
/// a failed system call becomes one.
///
/// Everything the engine can refuse or fail at is named for the action that failed and carries
/// the file and the offending value. The CLI prints ``description``; the NBD server maps
/// ``errnoValue`` to the wire.
public enum StrataError: Error, CustomStringConvertible, Sendable {
    case openFailed(path: String, errno: Int32)
    case io(path: String, SystemCallError)
    case notQcow2(path: String)
    case unsupportedVersion(path: String, version: UInt32)
    case invalidHeader(path: String, field: String, value: UInt64, reason: String)
    case unknownIncompatibleFeatures(path: String, names: [String])
    case unsupportedFeature(path: String, feature: String)
    /// The image's structures contradict each other (see ``Corruption``).
    case corrupt(Corruption)
    case imageIsCorruptBit(path: String)
    case imageIsDirty(path: String)
    /// The image is a template (``StrataExtension/Flags/template``): its linked clones read
    /// through it, so it is never opened for writing.
    case imageIsTemplate(path: String)
    /// No internal snapshot has this id or name.
    case noSuchSnapshot(path: String, name: String)
    /// An internal snapshot of this name exists already.
    case snapshotExists(path: String, name: String)
    /// Another process holds a conflicting lock; `holders` names the processes found holding
    /// the file (empty when none could be found).
    case imageLocked(path: String, detail: String, holders: [LockHolder] = [])
    case backingChainTooDeep(path: String, limit: Int)
    case backingChainLoop(path: String)
    case backingFormatUnknown(path: String, backing: String)
    case readOnly(path: String)
    case outOfRange(offset: UInt64, length: UInt64, size: UInt64)
    /// An option or argument the engine refuses, with the file it is about.
    case invalidOption(path: String, reason: String)
    case noSpace(path: String)
    case cannotShrink(path: String, size: UInt64, reason: String)
    /// A write to a raw image whose format was probed would make it probe as another format.
    case formatChangeRefused(path: String, format: String)
    /// The store that holds the image cannot be reached (librbd missing, no Ceph monitor).
    case storageUnavailable(path: String, reason: String)
    /// Another client (host) holds the RBD image's exclusive lock; `owners` as librbd names them.
    case rbdLocked(path: String, owners: [String], errno: Int32)

    public var description: String {
        switch self {
        case .openFailed(let p, let e): return "\(p): cannot open: \(String(cString: strerror(e)))"
        case .io(let p, let e): return "\(p): \(e)"
        case .notQcow2(let p): return "\(p): not a qcow2 image (bad magic)"
        case .unsupportedVersion(let p, let v): return "\(p): unsupported qcow2 version \(v) (2 and 3 are supported)"
        case .invalidHeader(let p, let f, let v, let r): return "\(p): invalid header field \(f) = \(v): \(r)"
        case .unknownIncompatibleFeatures(let p, let n): return "\(p): image uses unsupported incompatible feature(s): \(n.joined(separator: ", "))"
        case .unsupportedFeature(let p, let f): return "\(p): unsupported feature: \(f)"
        case .corrupt(let c): return c.description
        case .imageIsCorruptBit(let p): return "\(p): image is marked corrupt; it can only be opened read-only (repair with 'qemu-img check -r all')"
        case .imageIsDirty(let p): return "\(p): image is marked dirty (lazy refcounts were in use); its repair on open did not leave it clean; run 'strata check -r all \(p)' to see why"
        case .imageIsTemplate(let p):
            return "\(p): image is a template, which is never opened for writing (its linked clones read through it, and would be corrupted); open it read-only to read it, make a linked clone to change it with 'strata clone \(p) NEW', or an independent copy with 'strata clone --full \(p) NEW'"
        case .noSuchSnapshot(let p, let n): return "\(p): no snapshot with id or name '\(n)'"
        case .snapshotExists(let p, let n): return "\(p): a snapshot named '\(n)' exists already"
        case .imageLocked(let p, let d, let holders):
            guard let first = holders.first else { return "\(p): failed to get \(d) lock: is another process using the image?" }
            return "\(p): failed to get \(d) lock: held by \(holders.map(\.description).joined(separator: ", ")); \(first.advice)"
        case .backingChainTooDeep(let p, let l): return "\(p): backing chain is deeper than \(l) images"
        case .backingChainLoop(let p): return "\(p): backing chain loops back to an image already in the chain"
        case .backingFormatUnknown(let p, let b): return "\(p): backing file '\(b)' has no recorded format; give it explicitly (backing format qcow2 or raw), the content is never probed"
        case .readOnly(let p): return "\(p): image is open read-only"
        case .outOfRange(let o, let l, let s): return "request at offset \(o) length \(l) is beyond the end of the disk (size \(s))"
        case .invalidOption(let p, let r): return "\(p): \(r)"
        case .noSpace(let p): return "\(p): no space left on device"
        case .cannotShrink(let p, let s, let r): return "\(p): cannot shrink to \(s): \(r)"
        case .formatChangeRefused(let p, let f):
            return "\(p): refusing a write to the first sector that would make this probed raw image look like \(f); open it with format raw to allow it"
        case .storageUnavailable(let p, let r): return "\(p): \(r)"
        case .rbdLocked(let p, let owners, let e):
            let who = owners.isEmpty ? "another client" : owners.joined(separator: ", ")
            return "\(p): failed to get the RBD exclusive lock (\(String(cString: strerror(e)))): held by \(who); another host or process writes this image (stop it first, or open the image read-only; if that host died, Ceph lets the next writer break its lock once the dead client's watch times out, 30 s by default)"
        }
    }

    /// The errno closest to this error, for protocols that speak errno (NBD).
    public var errnoValue: Int32 {
        switch self {
        case .io(_, let e): return e.errno == ENOSPC ? ENOSPC : EIO
        case .readOnly, .formatChangeRefused, .imageIsTemplate: return EPERM
        case .outOfRange, .invalidOption, .snapshotExists: return EINVAL
        case .noSuchSnapshot: return ENOENT
        case .noSpace: return ENOSPC
        case .openFailed(_, let e): return e
        default: return EIO
        }
    }

    /// The one conversion of a failed system call on `path` into an engine error: a full disk
    /// (or quota, or file size limit) is ``noSpace``, anything else ``io(path:_:)``.
    public init(_ error: SystemCallError, path: String) {
        switch error.errno {
        case ENOSPC, EDQUOT, EFBIG: self = .noSpace(path: path)
        default: self = .io(path: path, error)
        }
    }
}

/// Runs `body`, turning a ``SystemCallError`` it throws into a ``StrataError`` naming `path`.
@inline(__always)
func onFile<T>(_ path: String, _ body: () throws -> T) throws -> T {
    do { return try body() } catch let e as SystemCallError { throw StrataError(e, path: path) }
}

/// A failed system call, with the call, errno and file offset.
public struct SystemCallError: Error, CustomStringConvertible, Sendable {
    public var op: String
    public var errno: Int32
    public var offset: UInt64
    public init(op: String, errno: Int32, offset: UInt64) {
        self.op = op
        self.errno = errno
        self.offset = offset
    }
    public var description: String {
        "\(op) failed at offset \(offset): \(String(cString: strerror(errno)))"
    }
}

/// What kind of structure an image's metadata cluster is (for overlap reports).
public enum MetadataKind: String, Sendable, Equatable, CaseIterable {
    case header = "the header"
    case l1Table = "the L1 table"
    case l2Table = "an L2 table"
    case refcountTable = "the refcount table"
    case refcountBlock = "a refcount block"
    case snapshotTable = "the snapshot table"
    case snapshotL1Table = "a snapshot's L1 table"
    case bitmapDirectory = "the bitmap directory"
    case bitmapTable = "a bitmap table"
}

/// What is wrong in a corrupt image.
public enum CorruptionKind: Sendable, Equatable {
    /// The file ends before a structure it must hold.
    case truncated
    /// An L1 or L2 entry has reserved bits set.
    case reservedBits
    /// A table entry points at a host offset that is not cluster aligned.
    case unaligned
    /// A table entry points past the end of the file.
    case pastEnd
    /// An extended L2 bitmap marks subclusters both allocated and zero.
    case invalidSubclusterBitmap
    /// A table, or data about to be written, lies on another metadata structure.
    case overlap(MetadataKind)
    /// A refcount would drop below zero, or a reference has no refcount block.
    case refcount
    /// A compressed cluster lies past the end of the file or does not decompress.
    case compressedData
    /// A table (snapshot table, bitmap directory) does not decode.
    case malformedTable

    /// Whether QEMU would set the corrupt bit for it: damage to the image's structure, as
    /// opposed to damaged payload bytes (a compressed cluster that does not decompress
    /// fails its read and nothing else).
    public var isStructural: Bool { self != .compressedData }
}

/// A corruption found in an image: where, what, and in words.
public struct Corruption: Sendable, Equatable, CustomStringConvertible {
    /// The image file.
    public var path: String
    public var kind: CorruptionKind
    /// The host offset of the damaged structure or entry (or the guest offset where the
    /// detail says so).
    public var offset: UInt64
    /// What was found, in words.
    public var detail: String

    public init(path: String, kind: CorruptionKind, offset: UInt64, detail: String) {
        self.path = path
        self.kind = kind
        self.offset = offset
        self.detail = detail
    }

    public var description: String { "\(path): image is corrupt: \(detail)" }
}
