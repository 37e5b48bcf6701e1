import Strata

/// fuzz_check: the input is a whole qcow2 file, held in memory.
///
/// 1. Check it (`strata check`, no repair).
/// 2. Repair a copy (`strata check -r all`).
/// 3. Check the repaired copy again, and open it and read its first and last clusters.
///
/// The assertion: when the repair completed (no error thrown, no internal check error) its
/// own report and a fresh check of what it left must agree, and both must find no
/// corruption and no leak. `-r all` turns every entry it cannot trust into a zero cluster,
/// rebuilds refcounts and drops an unreadable snapshot table (one whose L1 tables lie on other
/// metadata included). The one case where a completed repair leaves a corruption behind, and
/// says so in its log ("Cannot clear the entry ..."), is a bad entry that lies in the header or
/// the refcount structure, an active L1 table overlapping them: clearing it would destroy
/// that metadata. A repair that gives up (`checkErrors > 0`, or a thrown error) is allowed:
/// the image is then reported as not checked, which is an honest answer.
///
/// Errors are fine; a crash, a hang, a huge allocation or a failed assertion is a bug.
enum Budget {
    /// Largest input taken (a repair may grow the image; MemoryStorage caps that).
    static let maxInput = 4 << 20
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzCheck(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size <= Budget.maxInput else { return 0 }
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    let quiet: (String) -> Void = { _ in }

    _ = try? Qcow2Image.check(storage: MemoryStorage(name: "fuzz.qcow2", bytes: bytes), path: "fuzz.qcow2", repair: nil, log: quiet)

    let copy = MemoryStorage(name: "fuzz.qcow2", bytes: bytes)
    let log = LogLines()
    guard let repaired = try? Qcow2Image.check(storage: copy, path: "fuzz.qcow2", repair: .all, log: { log.lines.append($0) }),
          repaired.checkErrors == 0 else { return 0 }
    // The one case a completed repair leaves corrupt on purpose: a bad entry lying in the
    // header or the refcount structure (an active L1 table overlapping them) is not cleared,
    // since clearing it would destroy that metadata. The repair says so.
    let refusedToClear = log.lines.contains { $0.hasPrefix("Cannot clear the entry") }
    let after = copy.contents
    let again: CheckResult
    do {
        again = try Qcow2Image.check(storage: MemoryStorage(name: "fuzz.qcow2", bytes: after), path: "fuzz.qcow2",
                                     repair: nil, log: quiet)
    } catch {
        fatalError("fuzz_check: the repaired image cannot be checked again: \(error); repair said \(repaired)")
    }
    if !refusedToClear && (repaired.corruptions != 0 || repaired.leaks != 0 || again.corruptions != 0 || again.leaks != 0
        || again.checkErrors != 0) {
        fatalError("fuzz_check: not clean after -r all: repair reported \(repaired); check after it found \(again)")
    }
    readSome(after)
    return 0
}

/// The repair's log (the check runs synchronously, on this thread).
private final class LogLines: @unchecked Sendable {
    var lines: [String] = []
}

/// Opens the repaired image read-only and reads its first and last clusters (errors fine:
/// the check does not cover everything an open looks at, such as header extensions).
private func readSome(_ bytes: [UInt8]) {
    guard let disk = try? Qcow2Image(storage: MemoryStorage(name: "fuzz.qcow2", bytes: bytes),
                                     options: OpenOptions(writable: false, format: .qcow2, forceShare: true)) else { return }
    defer { try? disk.close() }
    let cluster = min(UInt64(max(disk.preferredBlockSize, 512)), 64 << 10, disk.size)
    guard cluster > 0 else { return }
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(cluster), alignment: 4096)
    defer { buffer.deallocate() }
    try? disk.read(into: buffer, at: 0)
    try? disk.read(into: buffer, at: disk.size - cluster)
}
