import Strata

/// fuzz_snapshots: the input is a whole qcow2 file, held in memory; the seeds hold several
/// internal snapshots, so mutations land in the snapshot table and the snapshots' L1 tables.
///
/// 1. Open it read-only; list the snapshots (and why the table cannot be read, if so) and
///    the bytes each one holds alone (`snapshotUsage`, as `snapshot-list` reports it).
/// 2. For each of the first few snapshots, by id and by name: open its state read-only
///    (``OpenOptions/snapshot``), ask block status and read what holds data, within a budget.
/// 3. On a writable copy: create a snapshot, delete the first listed one, close, and list the
///    snapshots of what is left.
///
/// Errors are fine; a crash, a hang or a huge allocation is a bug.
enum Budget {
    static let maxInput = 4 << 20
    /// Snapshots opened per input.
    static let snapshots = 6
    /// Guest bytes read per snapshot.
    static let readBytes: UInt64 = 1 << 20
    /// Largest single read.
    static let chunk = 64 << 10
    /// Guest range of one block status call, and extents looked at.
    static let statusWindow: UInt64 = 16 << 20
    static let extents = 256
}

private let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: Budget.chunk, alignment: 4096)

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzSnapshots(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size <= Budget.maxInput else { return 0 }
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    let records = list(bytes)
    for r in records.prefix(Budget.snapshots) {
        readSnapshot(bytes, r.id)
        if r.name != r.id { readSnapshot(bytes, r.name) }
    }
    change(bytes, first: records.first)
    return 0
}

private func readOnly(snapshot: String? = nil) -> OpenOptions {
    OpenOptions(writable: false, format: .qcow2, forceShare: true, snapshot: snapshot)
}

/// Lists the snapshots as `snapshot -l` and the control socket's `snapshot-list` do.
private func list(_ bytes: [UInt8]) -> [SnapshotRecord] {
    guard let disk = try? Qcow2Image(storage: MemoryStorage(name: "fuzz.qcow2", bytes: bytes), options: readOnly()) else { return [] }
    defer { try? disk.close() }
    let records = disk.snapshots
    _ = disk.snapshotTableError.map { "\($0)" }
    for r in records { _ = (r.id, r.name, r.icount, r.diskSize, r.encodedLength) }
    _ = try? disk.snapshotUsage()
    return records
}

private func read(_ disk: any BlockDevice, _ offset: UInt64, _ length: UInt64, _ budget: inout UInt64) {
    var at = offset
    let end = min(offset &+ length, disk.size)
    while at < end, budget > 0 {
        let n = Int(min(end - at, UInt64(Budget.chunk), budget))
        do { try disk.read(into: UnsafeMutableRawBufferPointer(rebasing: scratch[0..<n]), at: at) } catch { return }
        at += UInt64(n)
        budget -= UInt64(n)
    }
}

private func readSnapshot(_ bytes: [UInt8], _ idOrName: String) {
    guard let disk = try? Qcow2Image(storage: MemoryStorage(name: "fuzz.qcow2", bytes: bytes),
                                     options: readOnly(snapshot: idOrName)) else { return }
    defer { try? disk.close() }
    var budget = Budget.readBytes
    let size = disk.size
    let cluster = UInt64(max(disk.preferredBlockSize, 512))
    read(disk, 0, cluster, &budget)
    if size > cluster { read(disk, size - cluster, cluster, &budget) }
    let window = min(Budget.statusWindow, size)
    guard window > 0, let extents = try? disk.blockStatus(at: 0, length: window) else { return }
    for e in extents.prefix(Budget.extents) where !e.status.contains(.zero) {
        read(disk, e.offset, min(e.length, UInt64(Budget.chunk)), &budget)
    }
}

private func change(_ bytes: [UInt8], first: SnapshotRecord?) {
    let storage = MemoryStorage(name: "fuzz.qcow2", bytes: bytes)
    do {
        let disk = try Qcow2Image(storage: storage, options: OpenOptions(writable: true, format: .qcow2))
        defer { try? disk.close() }
        _ = try? disk.createSnapshot(name: "fuzz")
        if let first { _ = try? disk.deleteSnapshot(first.id) }
    } catch {
        return
    }
    _ = list(storage.contents)
}
