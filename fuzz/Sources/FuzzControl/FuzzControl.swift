#if canImport(Glibc)
import Glibc
#endif
import Logging
import Strata
import StrataNBD

/// fuzz_control: the input is what a client writes to the control socket, a stream of request
/// lines. Each line is framed as ``ControlLineDecoder`` frames it (split at `\n`; a line
/// longer than ``ControlLimits/maxLineBytes`` ends the connection) and answered by
/// ``ControlService/handle(line:)``, the way the connection handler does, without a socket
/// (a `\r` before the newline is dropped; a last line without a newline is answered too).
///
/// The service runs against a registry serving two files in a scratch folder (fresh for every
/// input): `disk.qcow2` (1 MiB qcow2, 4 KiB clusters, some data, one internal snapshot `s1`,
/// switchable, as `serve --control` opens exports) and `raw.img` (read-only raw), so that
/// adding, removing, snapshotting and switching exports all reach the engine.
///
/// Safety: commands name files. A line whose JSON holds a string with a `/` is not executed
/// (it is still parsed), so every file the service opens or creates is inside the scratch
/// folder, which is the working folder.
///
/// Errors are the expected answer; a crash, a hang, a huge allocation, or a reply that is not
/// one line of JSON is a bug.
enum Fixture {
    static let logger = Logger(label: "fuzz_control") { _ in SwiftLogNoOpLogHandler() }
    /// Most lines taken per input.
    static let maxLines = 64

    static let qcow2: [UInt8] = {
        let storage = MemoryStorage(name: "disk.qcow2")
        var options = CreateOptions(size: 1 << 20)
        options.clusterSize = 4096
        try! Qcow2Image.create(storage: storage, path: "disk.qcow2", options: options)
        let disk = try! Qcow2Image(storage: storage, options: OpenOptions(writable: true, format: .qcow2))
        let data = [UInt8](repeating: 0x5A, count: 8192)
        try! data.withUnsafeBytes { try disk.write($0, at: 4096, fua: false) }
        _ = try! disk.createSnapshot(name: "s1")
        try! data.withUnsafeBytes { try disk.write($0, at: 65536, fua: false) }
        try! disk.close()
        return storage.contents
    }()
    static let raw = [UInt8](repeating: 7, count: 65536)

    /// The scratch folder, made once per process in the working folder; the working folder from then on.
    static let folder: String = {
        // Inside the working folder (run.sh runs each target in a fresh one and removes it).
        var cwd = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        guard getcwd(&cwd, cwd.count) != nil else { fatalError("fuzz_control: getcwd failed") }
        var template = Array("\(String(cString: cwd))/control.XXXXXX".utf8CString)
        guard let p = mkdtemp(&template) else { fatalError("fuzz_control: mkdtemp failed") }
        let path = String(cString: p)
        guard chdir(path) == 0 else { fatalError("fuzz_control: chdir \(path) failed") }
        atexit {
            Fixture.clear()
            rmdir(Fixture.folder)
        }
        return path
    }()

    /// Removes every file in the scratch folder (commands create files, never folders).
    @discardableResult
    static func clear() -> Bool {
        guard let dir = opendir(folder) else { return false }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            if name != "." && name != ".." { names.append(name) }
        }
        for name in names { unlink("\(folder)/\(name)") }
        return true
    }

    static func write(_ name: String, _ bytes: [UInt8]) {
        let fd = open("\(folder)/\(name)", O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        precondition(fd >= 0, "fuzz_control: cannot create \(name)")
        defer { close(fd) }
        bytes.withUnsafeBytes { b in
            var done = 0
            while done < b.count {
                let n = Glibc.write(fd, b.baseAddress! + done, b.count - done)
                precondition(n > 0, "fuzz_control: cannot write \(name)")
                done += n
            }
        }
    }

    static func service() -> (ControlService, ExportRegistry) {
        _ = folder
        clear()
        write("disk.qcow2", qcow2)
        write("raw.img", raw)
        let options = OpenOptions(writable: true)
        let registry = try! ExportRegistry.open([ExportRegistry.Entry(name: "disk", path: "disk.qcow2")],
                                                options: options, discard: .unmap, description: nil,
                                                switchable: true, logger: logger)
        var readOnly = options
        readOnly.writable = false
        readOnly.format = .raw
        _ = try! registry.open(ExportRegistry.Entry(name: "ro", path: "raw.img"), options: readOnly, discard: .unmap,
                               description: nil)
        return (ControlService(registry: registry, defaults: .init(options: options, version: "fuzz"), logger: logger), registry)
    }
}

/// True if any string in `value` (keys included) holds a `/`: a path out of the scratch folder.
private func namesPath(_ value: ControlJSON) -> Bool {
    switch value {
    case .string(let s): return s.utf8.contains(UInt8(ascii: "/"))
    case .array(let items): return items.contains(where: namesPath)
    case .object(let fields): return fields.contains { $0.0.utf8.contains(UInt8(ascii: "/")) || namesPath($0.1) }
    default: return false
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzControl(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let input = UnsafeBufferPointer(start: data, count: size)
    let (service, registry) = Fixture.service()
    defer { try? registry.closeAll() }
    var start = 0
    var lines = 0
    while start < input.count, lines < Fixture.maxLines {
        let end = input[start...].firstIndex(of: UInt8(ascii: "\n")) ?? input.count
        var line = input[start..<end]
        start = end + 1
        if line.last == UInt8(ascii: "\r") { line = line.dropLast() }
        lines += 1
        // The decoder's framing: an over-long line is refused and the connection closed.
        if line.count > ControlLimits.maxLineBytes { return 0 }
        if let parsed = try? ControlJSON.parse(line), namesPath(parsed) { continue }
        let reply = service.handle(line: line)
        // The reply is one line of JSON, and an object.
        guard !reply.utf8.contains(UInt8(ascii: "\n")), case .object? = try? ControlJSON.parse(reply) else {
            fatalError("fuzz_control: the reply is not one line holding a JSON object: \(reply.prefix(200))")
        }
    }
    return 0
}
