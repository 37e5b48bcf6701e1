#if canImport(Glibc)
import Glibc
#endif

/// Finding the processes that hold locks on a file, from `/proc` (Linux): each process's open
/// file descriptors are matched by device and inode, and a match counts only when the
/// descriptor's `fdinfo` lists a lock (QEMU's and Strata's OFD locks show there as `lock:`
/// lines; `/proc/locks` gives OFD locks pid -1, so it cannot name the holder). Best effort
/// and bounded: at most ``maxProcesses`` processes and ``maxDescriptors`` descriptors are
/// looked at, and nothing is reported when `/proc` cannot be read.
public enum LockHolders {
    /// Processes looked at, at most.
    public static let maxProcesses = 4096
    /// File descriptors looked at, at most, over all processes.
    public static let maxDescriptors = 65536
    /// Bytes of a command line or fdinfo file read, at most.
    static let maxFileBytes = 64 << 10

    /// The processes other than this one that hold a lock on the file open as `fd`.
    public static func find(fd: Int32) -> [LockHolder] {
        var st = stat()
        guard fstat(fd, &st) == 0 else { return [] }
        return find(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
    }

    /// The processes other than this one that hold a lock on the file at `path`.
    public static func find(path: String) -> [LockHolder] {
        var st = stat()
        guard stat(path, &st) == 0 else { return [] }
        return find(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
    }

    static func find(device: UInt64, inode: UInt64) -> [LockHolder] {
        let me = getpid()
        var holders: [LockHolder] = []
        var descriptors = 0
        var processes = 0
        for name in entries("/proc") {
            guard let pid = Int32(name), pid != me else { continue }
            processes += 1
            if processes > maxProcesses || descriptors >= maxDescriptors { break }
            for fdName in entries("/proc/\(pid)/fd") {
                descriptors += 1
                if descriptors > maxDescriptors { break }
                var st = stat()
                guard stat("/proc/\(pid)/fd/\(fdName)", &st) == 0,
                      UInt64(st.st_dev) == device, UInt64(st.st_ino) == inode,
                      hasLock(readSmallFile("/proc/\(pid)/fdinfo/\(fdName)"), inode: inode) else { continue }
                holders.append(describe(pid: pid))
                break
            }
        }
        return holders
    }

    /// Whether an fdinfo text lists a lock on this inode (`lock:\t1: OFDLCK ADVISORY READ -1 fe:00:INODE 100 101`).
    public static func hasLock(_ fdinfo: String, inode: UInt64) -> Bool {
        for line in fdinfo.split(separator: "\n") where line.hasPrefix("lock:") {
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            if fields.contains(where: { $0.split(separator: ":").last.map(String.init) == String(inode) }) { return true }
        }
        return false
    }

    /// What a process is, from its command line.
    static func describe(pid: Int32) -> LockHolder {
        let argv = readSmallFile("/proc/\(pid)/cmdline").split(separator: "\0", omittingEmptySubsequences: false).map(String.init)
        var comm = readSmallFile("/proc/\(pid)/comm")
        while comm.hasSuffix("\n") { comm.removeLast() }
        let program = argv.first.map { String($0.split(separator: "/").last ?? "") } ?? comm
        return classify(pid: pid, argv: argv, fallbackName: program.isEmpty ? comm : program)
    }

    /// The kind of holder its arguments say it is.
    public static func classify(pid: Int32, argv: [String], fallbackName: String) -> LockHolder {
        let program = argv.first.map { String($0.split(separator: "/").last ?? "") } ?? fallbackName
        if program == "qemu-nbd" { return LockHolder(pid: pid, program: "qemu-nbd", kind: .qemuNBD) }
        if program.hasPrefix("qemu-system-") || program == "qemu-kvm" || program == "kvm" {
            return LockHolder(pid: pid, program: program, kind: .qemuSystem)
        }
        if program == "strata" || program.hasPrefix("strata"), argv.count > 1, argv[1] == "serve" {
            func value(_ flag: String) -> String? {
                for (i, a) in argv.enumerated() {
                    if a == flag, i + 1 < argv.count { return argv[i + 1] }
                    if a.hasPrefix(flag + "=") { return String(a.dropFirst(flag.count + 1)) }
                }
                return nil
            }
            let export = value("--export").flatMap { $0.split(separator: "=").first.map(String.init) } ?? value("-x") ?? value("--export-name")
            return LockHolder(pid: pid, program: "strata serve", kind: .strataServe(control: value("--control"), export: export))
        }
        return LockHolder(pid: pid, program: program.isEmpty ? fallbackName : program, kind: .other)
    }

    /// The names in a folder (none when it cannot be read).
    static func entries(_ path: String) -> [String] {
        guard let d = opendir(path) else { return [] }
        defer { closedir(d) }
        var out: [String] = []
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            if name != "." && name != ".." { out.append(name) }
        }
        return out
    }

    /// The first ``maxFileBytes`` of a small file (a /proc file), or "" when it cannot be read.
    static func readSmallFile(_ path: String) -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return "" }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while bytes.count < maxFileBytes {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            bytes += chunk[0..<n]
        }
        return String(decoding: bytes.prefix(maxFileBytes), as: UTF8.self)
    }
}
