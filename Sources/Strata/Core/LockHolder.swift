/// A process that holds an image file open with a lock on it (a server, a VM, another tool).
public struct LockHolder: Sendable, Equatable, CustomStringConvertible {
    /// What kind of program it is, for the advice on how to act on the image while it runs.
    public enum Kind: Sendable, Equatable {
        /// `strata serve`, with its control socket if it was started with `--control`, and the
        /// name it exports the image under when its command line says so.
        case strataServe(control: String?, export: String?)
        /// `qemu-nbd` (no monitor: it has to be stopped).
        case qemuNBD
        /// A QEMU system emulator (acts on its disks through QMP).
        case qemuSystem
        /// Anything else (qemu-img, qemu-io, another strata command, …).
        case other
    }

    public var pid: Int32
    /// The program's name as its command line gives it (`qemu-nbd`, `strata serve`).
    public var program: String
    public var kind: Kind

    public init(pid: Int32, program: String, kind: Kind) {
        self.pid = pid
        self.program = program
        self.kind = kind
    }

    /// `qemu-nbd (pid 1234)`.
    public var description: String { "\(program) (pid \(pid))" }

    /// How to act on the image while this process holds it, or how to free it.
    public var advice: String {
        switch kind {
        case .strataServe(let control?, let export):
            return "act through the server: 'strata snapshot create --server \(control) \(export ?? "EXPORT") NAME', or stop it (kill \(pid)) first"
        case .strataServe(nil, _):
            return "stop the server (kill \(pid)) first; a server started with --control SOCKET takes snapshots online"
        case .qemuNBD:
            return "stop it (kill \(pid)) first: qemu-nbd has no monitor to act through"
        case .qemuSystem:
            return "act through its QMP monitor (blockdev-snapshot-internal-sync, blockdev-snapshot-sync, block_resize, block-commit), or shut the VM down first"
        case .other:
            return "wait for it to finish, or stop it (kill \(pid))"
        }
    }
}
