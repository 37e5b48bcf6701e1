#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Every system call the engine makes goes through here, so EINTR and short transfers
/// are handled in one place and a test can see exactly what reaches the kernel.
// GNU extensions Glibc's Swift overlay does not export.
@_silgen_name("fallocate") private func c_fallocate(_ fd: Int32, _ mode: Int32, _ offset: off_t, _ len: off_t) -> Int32
@_silgen_name("preadv2") private func c_preadv2(_ fd: Int32, _ iov: UnsafePointer<iovec>, _ iovcnt: Int32, _ offset: off_t, _ flags: Int32) -> Int
/// `RWF_NOWAIT`: fail with EAGAIN instead of waiting for the disk.
private let RWF_NOWAIT: Int32 = 0x08
let O_DIRECT_FLAG: Int32 = 0o40000  // x86_64 / aarch64 Linux
let SEEK_DATA_WHENCE: Int32 = 3
let SEEK_HOLE_WHENCE: Int32 = 4

enum Syscalls {
    /// Reads exactly `buffer.count` bytes at `offset`, looping on EINTR and short reads.
    /// Returns the number of bytes read; fewer than asked means end of file.
    static func preadFully(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, _ offset: UInt64) throws(SystemCallError) -> Int {
        var done = 0
        while done < buffer.count {
            let n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemCallError(op: "pread", errno: errno, offset: offset + UInt64(done))
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// Reads all of `buffer` at `offset` only if it can be done without waiting for the disk
    /// (`preadv2` with `RWF_NOWAIT`: the bytes are in the page cache). Returns false when it
    /// cannot, or the read comes up short; the buffer's contents are then unspecified.
    static func preadIfCached(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, _ offset: UInt64) -> Bool {
        var iov = iovec(iov_base: buffer.baseAddress, iov_len: buffer.count)
        while true {
            let n = c_preadv2(fd, &iov, 1, off_t(offset), RWF_NOWAIT)
            if n < 0 && errno == EINTR { continue }
            return n == buffer.count
        }
    }

    /// Writes all of `buffer` at `offset`, looping on EINTR and short writes.
    static func pwriteFully(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, _ offset: UInt64) throws(SystemCallError) {
        var done = 0
        while done < buffer.count {
            let n = pwrite(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemCallError(op: "pwrite", errno: errno, offset: offset + UInt64(done))
            }
            done += n
        }
    }

    static func fdatasync(_ fd: Int32) throws(SystemCallError) {
        while Glibc.fdatasync(fd) != 0 {
            if errno == EINTR { continue }
            throw SystemCallError(op: "fdatasync", errno: errno, offset: 0)
        }
    }

    static func size(_ fd: Int32) throws(SystemCallError) -> UInt64 {
        var st = stat()
        if fstat(fd, &st) != 0 { throw SystemCallError(op: "fstat", errno: errno, offset: 0) }
        return UInt64(st.st_size)
    }

    static func truncate(_ fd: Int32, _ length: UInt64) throws(SystemCallError) {
        while ftruncate(fd, off_t(length)) != 0 {
            if errno == EINTR { continue }
            throw SystemCallError(op: "ftruncate", errno: errno, offset: length)
        }
    }

    /// `fallocate` modes: FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, and FALLOC_FL_ZERO_RANGE.
    static let punchHoleMode: Int32 = 0x02 | 0x01
    static let zeroRangeMode: Int32 = 0x10

    /// Deallocates or zeroes a range in place; returns false when the file system cannot
    /// (the caller then writes zeroes, or leaves bytes that are never read).
    static func fallocate(_ fd: Int32, mode: Int32, _ offset: UInt64, _ length: UInt64) -> Bool {
        while c_fallocate(fd, mode, off_t(offset), off_t(length)) != 0 {
            if errno == EINTR { continue }
            return false
        }
        return true
    }

    /// Takes an OFD byte-range lock (shared or exclusive), without waiting.
    /// Returns false when another open file description holds a conflicting lock.
    static func ofdLock(_ fd: Int32, exclusive: Bool, start: UInt64, length: UInt64) throws(SystemCallError) -> Bool {
        var fl = lockRange(exclusive, start, length)
        let F_OFD_SETLK: Int32 = 37
        if fcntl(fd, F_OFD_SETLK, &fl) == 0 { return true }
        if errno == EAGAIN || errno == EACCES { return false }
        throw SystemCallError(op: "fcntl(F_OFD_SETLK)", errno: errno, offset: start)
    }

    /// Tests whether an OFD lock could be taken, without taking it.
    static func ofdTest(_ fd: Int32, exclusive: Bool, start: UInt64, length: UInt64) throws(SystemCallError) -> Bool {
        var fl = lockRange(exclusive, start, length)
        let F_OFD_GETLK: Int32 = 36
        if fcntl(fd, F_OFD_GETLK, &fl) != 0 { throw SystemCallError(op: "fcntl(F_OFD_GETLK)", errno: errno, offset: start) }
        return fl.l_type == Int16(F_UNLCK)
    }

    private static func lockRange(_ exclusive: Bool, _ start: UInt64, _ length: UInt64) -> flock {
        var fl = flock()
        fl.l_type = Int16(exclusive ? F_WRLCK : F_RDLCK)
        fl.l_whence = Int16(SEEK_SET)
        fl.l_start = off_t(start)
        fl.l_len = off_t(length)
        fl.l_pid = 0
        return fl
    }
}
