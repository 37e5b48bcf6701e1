/// QEMU-compatible image locking.
///
/// QEMU's file driver expresses "I use permission P" as a shared OFD lock on byte 100+P and
/// "I do not let others use permission P" as a shared OFD lock on byte 200+P
/// (P: 0 consistent read, 1 write, 2 write-unchanged, 3 resize). A conflict is found by
/// testing for an exclusive lock on the opposite byte. Strata takes the same bytes, so Strata,
/// qemu-img, qemu-io, qemu-nbd and QEMU never write one image at once.
struct ImageLock: ~Copyable {
    static let permBase: UInt64 = 100
    static let sharedBase: UInt64 = 200
    enum Perm: UInt64 { case consistentRead = 0, write = 1, writeUnchanged = 2, resize = 3 }
    static let names: [Perm: String] = [.consistentRead: "consistent read", .write: "write", .writeUnchanged: "write unchanged", .resize: "resize"]

    /// Takes the locks for a reader (uses consistent read; does not share write) or a writer
    /// (uses read, write, resize; shares neither write nor resize), after checking nobody
    /// holds a conflicting lock.
    /// The lock an image's store offers: a file's OFD locks, an RBD image's exclusive lock for
    /// a writer (librbd has no reader's lock: readers of an RBD image take none).
    init(storage: any BlockStorage, writable: Bool) throws {
        if let file = storage as? FileStorage {
            try Self.lock(file, writable: writable)
        } else if let rbd = storage as? RBDStorage {
            if writable { try rbd.lockForWriting() }
        }
    }

    private static func lock(_ file: FileStorage, writable: Bool) throws {
        let used: [Perm] = writable ? [.consistentRead, .write, .resize] : [.consistentRead]
        let unshared: [Perm] = writable ? [.write, .resize] : [.write]
        do {
            for p in used { _ = try Syscalls.ofdLock(file.fd, exclusive: false, start: Self.permBase + p.rawValue, length: 1) }
            for p in unshared { _ = try Syscalls.ofdLock(file.fd, exclusive: false, start: Self.sharedBase + p.rawValue, length: 1) }
            // Someone who refuses to share what we use?
            for p in used where !(try Syscalls.ofdTest(file.fd, exclusive: true, start: Self.sharedBase + p.rawValue, length: 1)) {
                throw StrataError.imageLocked(path: file.name, detail: "\"\(Self.names[p]!)\"", holders: LockHolders.find(fd: file.fd))
            }
            // Someone who uses what we refuse to share?
            for p in unshared where !(try Syscalls.ofdTest(file.fd, exclusive: true, start: Self.permBase + p.rawValue, length: 1)) {
                throw StrataError.imageLocked(path: file.name, detail: "shared \"\(Self.names[p]!)\"", holders: LockHolders.find(fd: file.fd))
            }
        } catch let e as SystemCallError {
            throw StrataError(e, path: file.name)
        }
    }
}
