/// One entry of the qcow2 snapshot table (an internal snapshot). Pure value; no I/O.
///
/// ```
///  0 l1_table_offset (8)   8 l1_size (4)   12 id_str_size (2)   14 name_size (2)
/// 16 date_sec (4)  20 date_nsec (4)  24 vm_clock_nsec (8)  32 vm_state_size (4)
/// 36 extra_data_size (4)  40 extra data: vm_state_size_large (8), disk_size (8), icount (8), …
///    then id string, name, padding to 8
/// ```
public struct SnapshotRecord: Sendable, Equatable {
    public var l1TableOffset: UInt64
    public var l1Size: UInt32
    public var id: String
    public var name: String
    public var dateSeconds: UInt32
    public var dateNanoseconds: UInt32
    public var vmClockNanoseconds: UInt64
    /// Bytes of saved VM state (the large field when present, else the 32-bit one).
    public var vmStateSize: UInt64
    /// The disk size when the snapshot was taken (extra data; nil when the entry has none).
    public var diskSize: UInt64?
    /// The extra data as stored (kept verbatim on rewrite, fields we do not know included).
    public var extraData: [UInt8]

    /// The instruction count the snapshot was taken at (extra data; nil when absent or -1).
    public var icount: UInt64? {
        guard extraData.count >= 24 else { return nil }
        let v = extraData.be64(16)
        return v == .max ? nil : v
    }

    /// A new entry as `qemu-img snapshot -c` writes it: no VM state, VM clock 0, extra data
    /// of 24 bytes (vm_state_size_large 0, disk_size, icount 0).
    public static func new(id: String, name: String, l1TableOffset: UInt64, l1Size: UInt32, diskSize: UInt64,
                           dateSeconds: UInt32, dateNanoseconds: UInt32) -> SnapshotRecord {
        var extra = [UInt8](repeating: 0, count: 24)
        extra.put64(diskSize, 8)
        return SnapshotRecord(l1TableOffset: l1TableOffset, l1Size: l1Size, id: id, name: name, dateSeconds: dateSeconds,
                              dateNanoseconds: dateNanoseconds, vmClockNanoseconds: 0, vmStateSize: 0, diskSize: diskSize,
                              extraData: extra)
    }

    /// Bytes the entry takes in the table, padding included.
    public var encodedLength: Int {
        Int(alignUp(UInt64(40 + extraData.count + id.utf8.count + name.utf8.count), 8))
    }

    /// Decodes `count` entries from the table bytes, bounding every size by ``Limits``.
    public static func decodeTable(_ bytes: [UInt8], count: Int, tableOffset: UInt64, path: String) throws -> [SnapshotRecord] {
        func bad(_ at: Int, _ what: String) -> StrataError {
            .corrupt(Corruption(path: path, kind: .malformedTable, offset: tableOffset + UInt64(at),
                                detail: "snapshot table entry at host offset \(tableOffset + UInt64(at)) \(what)"))
        }
        var out: [SnapshotRecord] = []
        out.reserveCapacity(count)
        var pos = 0
        for _ in 0..<count {
            guard pos + 40 <= bytes.count else { throw bad(pos, "runs past the end of the table") }
            let idSize = Int(bytes.be16(pos + 12)), nameSize = Int(bytes.be16(pos + 14))
            let extra = Int(bytes.be32(pos + 36))
            guard UInt64(extra) <= Limits.maxSnapshotExtraBytes else { throw bad(pos, "has \(extra) bytes of extra data (at most \(Limits.maxSnapshotExtraBytes))") }
            guard UInt64(idSize) <= Limits.maxSnapshotNameBytes, UInt64(nameSize) <= Limits.maxSnapshotNameBytes else {
                throw bad(pos, "has an id or name longer than \(Limits.maxSnapshotNameBytes) bytes")
            }
            let end = pos + 40 + extra + idSize + nameSize
            guard end <= bytes.count else { throw bad(pos, "runs past the end of the table") }
            let extraBytes = Array(bytes[(pos + 40)..<(pos + 40 + extra)])
            var r = SnapshotRecord(
                l1TableOffset: bytes.be64(pos), l1Size: bytes.be32(pos + 8),
                id: String(decoding: bytes[(pos + 40 + extra)..<(pos + 40 + extra + idSize)], as: UTF8.self),
                name: String(decoding: bytes[(pos + 40 + extra + idSize)..<end], as: UTF8.self),
                dateSeconds: bytes.be32(pos + 16), dateNanoseconds: bytes.be32(pos + 20),
                vmClockNanoseconds: bytes.be64(pos + 24), vmStateSize: UInt64(bytes.be32(pos + 32)),
                diskSize: nil, extraData: extraBytes)
            if extra >= 8 { r.vmStateSize = extraBytes.be64(0) }
            if extra >= 16 { r.diskSize = extraBytes.be64(8) }
            guard UInt64(r.l1Size) * 8 <= Limits.maxL1Bytes else { throw bad(pos, "has an L1 table of \(r.l1Size) entries (at most \(Limits.maxL1Bytes / 8))") }
            out.append(r)
            pos = Int(alignUp(UInt64(end), 8))
        }
        return out
    }

    /// The extra data a version 3 image needs (vm_state_size_large, disk_size), added where an
    /// entry has less, with `diskSize` for entries that never recorded one.
    public mutating func completeExtraData(diskSize fallback: UInt64) {
        guard extraData.count < 16 else { return }
        var extra = [UInt8](repeating: 0, count: 16)
        extra.replaceSubrange(0..<extraData.count, with: extraData)
        extra.put64(vmStateSize, 0)
        extra.put64(diskSize ?? fallback, 8)
        extraData = extra
        diskSize = diskSize ?? fallback
    }

    /// Encodes the entry (padding included).
    public func encode() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: encodedLength)
        b.put64(l1TableOffset, 0)
        b.put32(l1Size, 8)
        b.put16(UInt16(id.utf8.count), 12)
        b.put16(UInt16(name.utf8.count), 14)
        b.put32(dateSeconds, 16)
        b.put32(dateNanoseconds, 20)
        b.put64(vmClockNanoseconds, 24)
        b.put32(UInt32(truncatingIfNeeded: min(vmStateSize, UInt64(UInt32.max))), 32)
        b.put32(UInt32(extraData.count), 36)
        let idStart = 40 + extraData.count
        b.replaceSubrange(40..<idStart, with: extraData)
        b.replaceSubrange(idStart..<idStart + id.utf8.count, with: Array(id.utf8))
        b.replaceSubrange(idStart + id.utf8.count..<idStart + id.utf8.count + name.utf8.count, with: Array(name.utf8))
        return b
    }

    /// Bytes of the whole table holding `records`.
    public static func tableLength(_ records: [SnapshotRecord]) -> Int {
        records.reduce(0) { $0 + $1.encodedLength }
    }
}
