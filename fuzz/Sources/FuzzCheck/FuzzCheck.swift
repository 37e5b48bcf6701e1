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
/// that metadata. A second is a cluster with more references than the refcount width can
/// count (1-bit refcounts and a shared L2 table or compressed host cluster): the check after
/// the repair then reports only `refcount=MAX reference=MORE` errors. A repair that gives up (`checkErrors > 0`, or a thrown error) is allowed:
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
    let againLog = LogLines()
    do {
        again = try Qcow2Image.check(storage: MemoryStorage(name: "fuzz.qcow2", bytes: after), path: "fuzz.qcow2",
                                     repair: nil, log: { againLog.lines.append($0) })
    } catch {
        fatalError("fuzz_check: the repaired image cannot be checked again: \(error); repair said \(repaired)")
    }
    if !refusedToClear && !onlyCountsAboveWidth(againLog.lines, refcountOrder(bytes)) && (repaired.corruptions != 0 || repaired.leaks != 0 || again.corruptions != 0 || again.leaks != 0
        || again.checkErrors != 0) {
        fatalError("fuzz_check: not clean after -r all: repair reported \(repaired); check after it found \(again)")
    }
    readSome(after)
    return 0
}

/// The image's refcount_order (4, 16-bit counts, for version 2 images or a short input).
private func refcountOrder(_ bytes: [UInt8]) -> UInt32 {
    guard bytes.count >= 100, bytes[4...7] == [0, 0, 0, 3] else { return 4 }
    return bytes[96...99].reduce(0) { $0 << 8 | UInt32($1) }
}

/// The second case a completed repair cannot make clean: a cluster with more references than
/// the refcount width can count (an L2 table shared by two L1 entries, or a host cluster
/// holding two compressed clusters, with 1-bit refcounts). No count can be right, and the
/// check says so: every error it reports is `refcount=MAX reference=MORE`.
private func onlyCountsAboveWidth(_ lines: [String], _ order: UInt32) -> Bool {
    guard order < 6 else { return false }
    let max = (UInt64(1) << (UInt64(1) << order)) - 1
    let errors = lines.filter { $0.hasPrefix("ERROR") }
    return !errors.isEmpty && errors.allSatisfy { line in
        let words = line.split(separator: " ")
        guard words.count == 5, words[1] == "cluster",
              let have = UInt64(words[3].dropFirst("refcount=".count)),
              let want = UInt64(words[4].dropFirst("reference=".count)) else { return false }
        return have == max && want > max
    }
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
