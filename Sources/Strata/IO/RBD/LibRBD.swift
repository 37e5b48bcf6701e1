#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// librados and librbd, loaded when the first `rbd:` name is opened (`dlopen`), so that
/// Strata builds and runs without Ceph's libraries, and needs them only where RBD images
/// are used (Debian: `librbd1`, which `ceph-common` and QEMU's `qemu-block-extra` bring).
///
/// The declarations follow `<rados/librados.h>` and `<rbd/librbd.h>` (their C ABI is stable
/// since Ceph 14); every call returns 0 or a byte count, or a negated errno.
final class LibRBD: @unchecked Sendable {
    typealias Handle = OpaquePointer
    typealias RadosCreate = @convention(c) (UnsafeMutablePointer<Handle?>, UnsafePointer<CChar>?) -> Int32
    typealias RadosConfReadFile = @convention(c) (Handle, UnsafePointer<CChar>?) -> Int32
    typealias RadosConfSet = @convention(c) (Handle, UnsafePointer<CChar>, UnsafePointer<CChar>) -> Int32
    typealias RadosConfParseEnv = @convention(c) (Handle, UnsafePointer<CChar>?) -> Int32
    typealias RadosConnect = @convention(c) (Handle) -> Int32
    typealias RadosShutdown = @convention(c) (Handle) -> Void
    typealias RadosIoctxCreate = @convention(c) (Handle, UnsafePointer<CChar>, UnsafeMutablePointer<Handle?>) -> Int32
    typealias RadosIoctxDestroy = @convention(c) (Handle) -> Void
    typealias RadosIoctxSetNamespace = @convention(c) (Handle, UnsafePointer<CChar>?) -> Void
    typealias RBDOpen = @convention(c) (Handle, UnsafePointer<CChar>, UnsafeMutablePointer<Handle?>, UnsafePointer<CChar>?) -> Int32
    typealias RBDClose = @convention(c) (Handle) -> Int32
    typealias RBDCreate = @convention(c) (Handle, UnsafePointer<CChar>, UInt64, UnsafeMutablePointer<Int32>) -> Int32
    typealias RBDRemove = @convention(c) (Handle, UnsafePointer<CChar>) -> Int32
    typealias RBDCallback = @convention(c) (UnsafeMutableRawPointer?, UnsafeMutableRawPointer?) -> Void
    typealias RBDAioCreateCompletion = @convention(c) (UnsafeMutableRawPointer?, RBDCallback, UnsafeMutablePointer<UnsafeMutableRawPointer?>) -> Int32
    typealias RBDAioRead = @convention(c) (Handle, UInt64, Int, UnsafeMutablePointer<CChar>, UnsafeMutableRawPointer) -> Int32
    typealias RBDAioWrite = @convention(c) (Handle, UInt64, Int, UnsafePointer<CChar>, UnsafeMutableRawPointer) -> Int32
    typealias RBDAioGetReturnValue = @convention(c) (UnsafeMutableRawPointer) -> Int
    typealias RBDAioRelease = @convention(c) (UnsafeMutableRawPointer) -> Void
    typealias RBDList = @convention(c) (Handle, UnsafeMutablePointer<CChar>, UnsafeMutablePointer<Int>) -> Int32
    typealias RBDRename = @convention(c) (Handle, UnsafePointer<CChar>, UnsafePointer<CChar>) -> Int32
    typealias RBDGetU64 = @convention(c) (Handle, UnsafeMutablePointer<UInt64>) -> Int32
    typealias RBDResize = @convention(c) (Handle, UInt64) -> Int32
    typealias RBDRead = @convention(c) (Handle, UInt64, Int, UnsafeMutablePointer<CChar>) -> Int
    typealias RBDWrite = @convention(c) (Handle, UInt64, Int, UnsafePointer<CChar>) -> Int
    typealias RBDWriteZeroes = @convention(c) (Handle, UInt64, Int, Int32, Int32) -> Int32
    typealias RBDImageOp = @convention(c) (Handle) -> Int32
    typealias RBDLockAcquire = @convention(c) (Handle, Int32) -> Int32
    typealias RBDLockGetOwners = @convention(c) (Handle, UnsafeMutablePointer<Int32>, UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>, UnsafeMutablePointer<Int>) -> Int32
    typealias RBDLockGetOwnersCleanup = @convention(c) (UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>, Int) -> Void

    let radosCreate: RadosCreate
    let radosConfReadFile: RadosConfReadFile
    let radosConfSet: RadosConfSet
    let radosConfParseEnv: RadosConfParseEnv
    let radosConnect: RadosConnect
    let radosShutdown: RadosShutdown
    let radosIoctxCreate: RadosIoctxCreate
    let radosIoctxSetNamespace: RadosIoctxSetNamespace
    let radosIoctxDestroy: RadosIoctxDestroy
    let open: RBDOpen
    let openReadOnly: RBDOpen
    let close: RBDClose
    let create: RBDCreate
    let remove: RBDRemove
    let rename: RBDRename
    let list: RBDList
    let aioCreateCompletion: RBDAioCreateCompletion
    let aioRead: RBDAioRead
    let aioWrite: RBDAioWrite
    let aioGetReturnValue: RBDAioGetReturnValue
    let aioRelease: RBDAioRelease
    let getSize: RBDGetU64
    let getFeatures: RBDGetU64
    let resize: RBDResize
    let read: RBDRead
    let write: RBDWrite
    let writeZeroes: RBDWriteZeroes
    let flush: RBDImageOp
    let lockAcquire: RBDLockAcquire
    let lockGetOwners: RBDLockGetOwners
    let lockGetOwnersCleanup: RBDLockGetOwnersCleanup

    /// `RBD_FEATURE_EXCLUSIVE_LOCK`.
    static let exclusiveLockFeature: UInt64 = 1 << 2
    /// `RBD_LOCK_MODE_EXCLUSIVE`.
    static let lockModeExclusive: Int32 = 0

    private init(rados: UnsafeMutableRawPointer, rbd: UnsafeMutableRawPointer) throws {
        func symbol<T>(_ lib: UnsafeMutableRawPointer, _ name: String, _: T.Type) throws -> T {
            guard let p = dlsym(lib, name) else {
                throw StrataError.storageUnavailable(path: "rbd:", reason: "librbd/librados lack \(name) (Ceph 15 or later is needed)")
            }
            return unsafeBitCast(p, to: T.self)
        }
        radosCreate = try symbol(rados, "rados_create", RadosCreate.self)
        radosConfReadFile = try symbol(rados, "rados_conf_read_file", RadosConfReadFile.self)
        radosConfSet = try symbol(rados, "rados_conf_set", RadosConfSet.self)
        radosConfParseEnv = try symbol(rados, "rados_conf_parse_env", RadosConfParseEnv.self)
        radosConnect = try symbol(rados, "rados_connect", RadosConnect.self)
        radosShutdown = try symbol(rados, "rados_shutdown", RadosShutdown.self)
        radosIoctxCreate = try symbol(rados, "rados_ioctx_create", RadosIoctxCreate.self)
        radosIoctxSetNamespace = try symbol(rados, "rados_ioctx_set_namespace", RadosIoctxSetNamespace.self)
        radosIoctxDestroy = try symbol(rados, "rados_ioctx_destroy", RadosIoctxDestroy.self)
        open = try symbol(rbd, "rbd_open", RBDOpen.self)
        openReadOnly = try symbol(rbd, "rbd_open_read_only", RBDOpen.self)
        close = try symbol(rbd, "rbd_close", RBDClose.self)
        create = try symbol(rbd, "rbd_create", RBDCreate.self)
        remove = try symbol(rbd, "rbd_remove", RBDRemove.self)
        rename = try symbol(rbd, "rbd_rename", RBDRename.self)
        list = try symbol(rbd, "rbd_list", RBDList.self)
        aioCreateCompletion = try symbol(rbd, "rbd_aio_create_completion", RBDAioCreateCompletion.self)
        aioRead = try symbol(rbd, "rbd_aio_read", RBDAioRead.self)
        aioWrite = try symbol(rbd, "rbd_aio_write", RBDAioWrite.self)
        aioGetReturnValue = try symbol(rbd, "rbd_aio_get_return_value", RBDAioGetReturnValue.self)
        aioRelease = try symbol(rbd, "rbd_aio_release", RBDAioRelease.self)
        getSize = try symbol(rbd, "rbd_get_size", RBDGetU64.self)
        getFeatures = try symbol(rbd, "rbd_get_features", RBDGetU64.self)
        resize = try symbol(rbd, "rbd_resize", RBDResize.self)
        read = try symbol(rbd, "rbd_read", RBDRead.self)
        write = try symbol(rbd, "rbd_write", RBDWrite.self)
        writeZeroes = try symbol(rbd, "rbd_write_zeroes", RBDWriteZeroes.self)
        flush = try symbol(rbd, "rbd_flush", RBDImageOp.self)
        lockAcquire = try symbol(rbd, "rbd_lock_acquire", RBDLockAcquire.self)
        lockGetOwners = try symbol(rbd, "rbd_lock_get_owners", RBDLockGetOwners.self)
        lockGetOwnersCleanup = try symbol(rbd, "rbd_lock_get_owners_cleanup", RBDLockGetOwnersCleanup.self)
    }

    private static let loaded: Result<LibRBD, StrataError> = {
        func load(_ name: String) -> Result<UnsafeMutableRawPointer, StrataError> {
            if let h = dlopen(name, RTLD_NOW | RTLD_GLOBAL) { return .success(h) }
            let why = dlerror().map { String(cString: $0) } ?? name
            return .failure(.storageUnavailable(path: "rbd:", reason: "rbd: names need librbd and librados (Debian: librbd1): \(why)"))
        }
        return Result {
            let rados = try load("librados.so.2").get()
            let rbd = try load("librbd.so.1").get()
            return try LibRBD(rados: rados, rbd: rbd)
        }.mapError { $0 as? StrataError ?? .storageUnavailable(path: "rbd:", reason: "\($0)") }
    }()

    /// The loaded libraries, or why they cannot be loaded.
    static func shared() throws -> LibRBD { try loaded.get() }

    /// The loaded libraries, or why they cannot be loaded, said about `name`.
    static func shared(for name: RBDName) throws -> LibRBD {
        do { return try loaded.get() } catch StrataError.storageUnavailable(_, let reason) {
            throw StrataError.storageUnavailable(path: name.description, reason: reason)
        }
    }

    // MARK: Connections

    /// One librados connection per configuration (conf, user, options), and one I/O context
    /// per pool and namespace, kept for the life of the process: opening a backing chain of
    /// twenty images in one pool connects once.
    private let connections = Mutex<[String: Handle]>([:])
    private let contexts = Mutex<[String: Handle]>([:])

    /// The I/O context for `name`'s pool and namespace, connecting when needed. `uncached`:
    /// a connection whose images bypass librbd's cache (`cache=none`, as QEMU sets
    /// `rbd_cache=false` for it).
    func ioContext(for name: RBDName, uncached: Bool = false) throws -> Handle {
        let key = name.clusterKey + (uncached ? "\u{3}" : "") + "\u{2}" + name.pool + "\u{2}" + name.namespace
        if let io = contexts.withLock({ $0[key] }) { return io }
        let cluster = try connection(for: name, uncached: uncached)
        var io: Handle? = nil
        let r = radosIoctxCreate(cluster, name.pool, &io)
        guard r == 0, let io else {
            if r == -ENOENT { throw StrataError.storageUnavailable(path: name.description, reason: "the cluster has no pool '\(name.pool)'") }
            throw StrataError.openFailed(path: name.description, errno: -r)
        }
        if !name.namespace.isEmpty { radosIoctxSetNamespace(io, name.namespace) }
        return contexts.withLock { table in
            if let existing = table[key] { return existing }   // raced: keep one (the other leaks once)
            table[key] = io
            return io
        }
    }

    private func connection(for name: RBDName, uncached: Bool) throws -> Handle {
        let key = name.clusterKey + (uncached ? "\u{3}" : "")
        // Connecting can take seconds; hold the table's lock so two threads connect once.
        return try connections.withLock { table in
            if let c = table[key] { return c }
            var cluster: Handle? = nil
            var r = radosCreate(&cluster, name.id)
            guard r == 0, let cluster else { throw unavailable(name, "rados_create", r) }
            // Fail in seconds, not in librados' default five minutes, when no monitor answers.
            // The configuration file and the name's options may set it otherwise.
            _ = radosConfSet(cluster, "client_mount_timeout", "30")
            r = radosConfReadFile(cluster, name.conf)
            // No ceph.conf at the default places is fine when the options name the monitors.
            if r != 0 && (name.conf != nil || !name.options.contains { $0.0 == "mon_host" }) {
                radosShutdown(cluster)
                let hint = name.conf == nil ? " (name one with :conf=PATH)" : ""
                throw StrataError.storageUnavailable(path: name.description,
                    reason: "reading \(name.conf ?? "the default ceph.conf")\(hint) failed: \(String(cString: strerror(-r)))")
            }
            _ = radosConfParseEnv(cluster, nil)
            if uncached { _ = radosConfSet(cluster, "rbd_cache", "false") }
            for (k, v) in name.options {
                r = radosConfSet(cluster, k, v)
                if r != 0 {
                    radosShutdown(cluster)
                    throw StrataError.invalidOption(path: name.description, reason: "librados refuses the option \(k)=\(v): \(String(cString: strerror(-r)))")
                }
            }
            r = radosConnect(cluster)
            if r != 0 {
                radosShutdown(cluster)
                let who = r == -EACCES || r == -EPERM ? " as client.\(name.id ?? "admin") (is its key in the keyring the conf names?)" : ""
                throw unavailable(name, "connecting to the cluster\(who)", r)
            }
            table[key] = cluster
            if table.count == 1 { atexit { try? LibRBD.shared().shutdown() } }
            return cluster
        }
    }

    /// RBD images open now (``RBDStorage`` counts them).
    let openImages = Atomic<Int>(0)

    /// Closes every connection, at process exit: librados' threads must stop before the
    /// process's exit handlers tear down what they use (OpenSSL's, registered before ours and
    /// so run after it), or a thread still decrypting a monitor's message aborts the process.
    /// Skipped while an image is still open (librados would wait for it).
    private func shutdown() {
        guard openImages.load(ordering: .acquiring) == 0 else { return }
        for io in contexts.withLock({ t in defer { t = [:] }; return Array(t.values) }) { radosIoctxDestroy(io) }
        for c in connections.withLock({ t in defer { t = [:] }; return Array(t.values) }) { radosShutdown(c) }
    }

    private func unavailable(_ name: RBDName, _ what: String, _ r: Int32) -> StrataError {
        .storageUnavailable(path: name.description, reason: "\(what) failed: \(String(cString: strerror(-r)))")
    }
}
