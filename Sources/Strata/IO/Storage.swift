#if canImport(Glibc)
import Glibc
#endif

/// Where an image's bytes live, chosen by its name: `rbd:POOL/IMAGE…` names an RBD image in
/// a Ceph pool (``RBDStorage``), anything else a file (``FileStorage``). Every command opens,
/// creates and tests images through here, so a new store is one more case, not a new path
/// through the engine.
public enum Storage {
    /// Opens the storage of an existing image.
    public static func open(_ name: String, mode: OpenMode) throws -> any BlockStorage {
        if RBDName.isRBD(name) { return try RBDStorage(name: RBDName(parsing: name), writable: mode.writable, uncached: mode.direct) }
        return try FileStorage(path: name, mode: mode)
    }

    /// Makes `name` a new, empty store for an image and lets `body` write it: created when
    /// missing, locked like a writable image (a store another process or host uses is
    /// refused, not clobbered), emptied, handed to `body`, then closed. A store this call made
    /// is removed when it fails.
    public static func replacing(_ name: String, _ body: (any BlockStorage) throws -> Void) throws {
        guard RBDName.isRBD(name) else { return try FileStorage.replacing(name, body) }
        let rbd = try RBDName(parsing: name)
        let (storage, created) = try RBDStorage.creating(rbd)
        do {
            defer { storage.close() }
            try storage.lockForWriting()
            try storage.setLength(0)
            try body(storage)
            try storage.sync()
        } catch {
            if created { RBDStorage.remove(rbd) }
            throw error
        }
    }

    /// Whether an image by this name exists (for an RBD name: and its cluster answers).
    public static func exists(_ name: String) -> Bool {
        if RBDName.isRBD(name) { return (try? RBDName(parsing: name)).map(RBDStorage.exists) ?? false }
        return access(name, F_OK) == 0
    }

    /// A name beside `name` for a copy made before it takes `name` (`NAME.TAG`, in the same
    /// folder or pool, with the same conf and user).
    public static func sibling(of name: String, tag: String) -> String {
        guard RBDName.isRBD(name), var rbd = try? RBDName(parsing: name) else { return "\(name).\(tag)" }
        rbd.image += "." + tag
        return rbd.description
    }

    /// Removes an image's store; quiet when there is none.
    public static func remove(_ name: String) {
        if RBDName.isRBD(name) {
            if let rbd = try? RBDName(parsing: name) { RBDStorage.remove(rbd) }
        } else {
            unlink(name)
        }
    }

    /// Gives the store `from` the name `to`, never replacing one there (EEXIST). Files are
    /// hard-linked then unlinked, or renamed where hard links are not supported after one
    /// more look; RBD images are renamed (in one pool).
    public static func rename(_ from: String, to: String) throws {
        if RBDName.isRBD(from) || RBDName.isRBD(to) {
            let a = try RBDName(parsing: from), b = try RBDName(parsing: to)
            guard a.pool == b.pool, a.namespace == b.namespace, a.clusterKey == b.clusterKey else {
                throw StrataError.invalidOption(path: to, reason: "an RBD image is renamed only within its pool")
            }
            try RBDStorage.rename(a, to: b.image)
            return
        }
        if link(from, to) == 0 {
            unlink(from)
            return
        }
        let e = errno
        var st = stat()
        // lstat: a dangling symbolic link at `to` is something there, and is not replaced.
        guard e == EPERM || e == ENOTSUP || e == EOPNOTSUPP || e == EXDEV, lstat(to, &st) != 0 else {
            throw StrataError.openFailed(path: to, errno: e == 0 ? EEXIST : e)
        }
        guard Glibc.rename(from, to) == 0 else { throw StrataError.openFailed(path: to, errno: errno) }
    }

    /// The names of the images in an RBD pool (`rbd:POOL[/NAMESPACE][:…]`), each as a whole
    /// `rbd:` name with the pool's settings, sorted.
    public static func listPool(_ pool: String) throws -> [String] {
        let p = try RBDName(parsingPool: pool)
        return try RBDStorage.list(p).sorted().map { p.sibling($0).description }
    }

    /// Whether `name` names a file (not another store).
    public static func isFile(_ name: String) -> Bool { !RBDName.isRBD(name) }
}
