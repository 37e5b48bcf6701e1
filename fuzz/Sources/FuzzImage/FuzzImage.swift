import Strata

/// fuzz_image: the input is a whole qcow2 file, held in memory.
///
/// 1. Open it read-only; ask block status over the start and the end of the disk; read every
///    extent that holds data (compressed clusters included) up to a budget, plus the first and
///    last clusters of the disk.
/// 2. Open a copy writable; eight writes, write zeroes and discard at offsets picked from the
///    input; flush; close; reopen the result read-only and read the written ranges back.
///
/// For half of the inputs the table caches are as small as the engine allows, so evictions
/// and write-backs of dirty tables happen in the middle of operations.
///
/// Errors are fine (hostile input must be refused, not obeyed); a crash, a hang or a huge
/// allocation is a bug. Every count the image controls is bounded here by a named budget, so
/// that what this target itself allocates stays small.
enum Budget {
    /// Largest input taken (the images the engine may grow it to are capped by MemoryStorage).
    static let maxInput = 4 << 20
    /// Guest bytes read per open.
    static let readBytes: UInt64 = 4 << 20
    /// Largest single read.
    static let chunk = 256 << 10
    /// Guest range one block status call covers.
    static let statusWindow: UInt64 = 64 << 20
    /// Extents looked at per block status call.
    static let extents = 512
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzImage(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size <= Budget.maxInput else { return 0 }
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    readAll(bytes)
    writeSome(bytes)
    return 0
}

private let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: Budget.chunk, alignment: 4096)

/// Reads `[offset, offset+length)` in chunks, ignoring errors, within `budget`.
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

/// Reads the extents block status reports as data in `[offset, offset+window)`.
private func readData(_ disk: any BlockDevice, from offset: UInt64, _ budget: inout UInt64) {
    let length = min(Budget.statusWindow, disk.size - offset)
    guard length > 0, let extents = try? disk.blockStatus(at: offset, length: length) else { return }
    for e in extents.prefix(Budget.extents) where !e.status.contains(.zero) {
        read(disk, e.offset, min(e.length, UInt64(Budget.chunk)), &budget)
    }
}

/// Open options; for half of the inputs (the last byte odd) with the smallest table caches the
/// engine allows (4 tables each), so that tables are evicted and dirty ones written back in
/// the middle of an operation.
private func options(_ bytes: [UInt8], writable: Bool) -> OpenOptions {
    let tiny = (bytes.last ?? 0) & 1 == 1
    return OpenOptions(writable: writable, format: .qcow2, forceShare: !writable,
                       l2CacheBytes: tiny ? 1 : nil, refcountCacheBytes: tiny ? 1 : nil)
}

private func readAll(_ bytes: [UInt8]) {
    guard let disk = try? Qcow2Image(storage: MemoryStorage(bytes: bytes), options: options(bytes, writable: false)) else { return }
    defer { try? disk.close() }
    var budget = Budget.readBytes
    let size = disk.size
    let cluster = UInt64(max(disk.preferredBlockSize, 512))
    read(disk, 0, cluster, &budget)
    if size > cluster { read(disk, size - cluster, cluster, &budget) }
    readData(disk, from: 0, &budget)
    if size > Budget.statusWindow { readData(disk, from: size - Budget.statusWindow, &budget) }
    // An unaligned read that straddles clusters.
    if size > 3 { read(disk, size / 3, min(cluster + 1, size - size / 3), &budget) }
}

/// A deterministic offset in the disk from input bytes, so the fuzzer can steer it.
private func offset(_ bytes: [UInt8], _ salt: Int, size: UInt64, length: UInt64) -> UInt64 {
    guard size > length else { return 0 }
    var h: UInt64 = 0xcbf2_9ce4_8422_2325 &+ UInt64(salt)
    for b in bytes.suffix(16) { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
    return (h % (size - length)) & ~511
}

private func writeSome(_ bytes: [UInt8]) {
    let storage = MemoryStorage(bytes: bytes)
    var written: [(UInt64, UInt64, UInt8)] = []
    do {
        let disk = try Qcow2Image(storage: storage, options: options(bytes, writable: true))
        defer { try? disk.close() }
        let size = disk.size
        let cluster = UInt64(max(disk.preferredBlockSize, 512))
        let pattern = UnsafeMutableRawBufferPointer(rebasing: scratch[0..<8192])
        for (i, length) in [UInt64(4096), 512, 4096, 1536, 512, 8192, 700, 4096].enumerated() where size >= length {
            let at = i == 0 ? 0 : offset(bytes, i, size: size, length: length)
            let fill = UInt8(0xA0 + i)
            pattern.initializeMemory(as: UInt8.self, repeating: fill)
            if (try? disk.write(UnsafeRawBufferPointer(rebasing: pattern[0..<Int(length)]), at: at, fua: i % 4 == 2)) != nil {
                written.append((at, length, fill))
            }
        }
        if size >= 2 * cluster {
            let at = offset(bytes, 7, size: size, length: 2 * cluster)
            try? disk.writeZeroes(at: at, length: cluster, mayUnmap: true, fua: false)
            try? disk.discard(at: at + cluster / 2, length: cluster)
            written.removeAll { $0.0 < at + 2 * cluster && at < $0.0 + $0.1 }
        }
        try disk.flush()
    } catch {
        return
    }
    // Reopen what the engine left behind and read the writes back. (Contents are not compared:
    // a hostile image may map two guest clusters to one host cluster.)
    guard let again = try? Qcow2Image(storage: MemoryStorage(bytes: storage.contents),
                                      options: options(bytes, writable: false)) else { return }
    defer { try? again.close() }
    var budget = Budget.readBytes
    for (at, length, _) in written { read(again, at, length, &budget) }
    readData(again, from: 0, &budget)
}
