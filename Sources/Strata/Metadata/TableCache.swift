/// One cluster-sized metadata table (an L2 table or a refcount block) held in memory.
final class Table {
    let offset: UInt64
    let buf: UnsafeMutableRawBufferPointer
    var dirty = false
    var lastUse: UInt64 = 0
    /// False once the cache has dropped the table (a holder of a direct reference must then
    /// look it up again).
    var resident = true
    /// How many holders need the table to stay cached (see ``TableCache/pin(_:)``).
    fileprivate(set) var pins = 0
    init(offset: UInt64, size: Int) {
        self.offset = offset
        buf = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 4096)
        buf.zero()
    }
    deinit { buf.deallocate() }
    /// A copy of the bytes, for writing out while the table may change again.
    func snapshot() -> [UInt8] { UnsafeRawBufferPointer(buf).bytes() }
}

/// A bounded cache of tables keyed by host offset, LRU among clean, unpinned tables.
///
/// - Dirty tables are never evicted here: the image writes them out in crash-safe order at
///   flush, and asks for a flush when more than `capacity` tables are dirty.
/// - A pinned table is never evicted either: an operation that holds a table across a
///   release of the metadata lock (a write between its plan and its commit, a walk over
///   every table) pins it, so what it changes lands in the cached table and not in a copy the
///   cache has forgotten. Every pin is matched by one unpin.
struct TableCache {
    private(set) var tables: [UInt64: Table] = [:]
    let capacity: Int
    private var clock: UInt64 = 0
    private(set) var dirtyCount = 0

    init(capacity: Int) { self.capacity = max(capacity, 4) }

    @inline(__always) mutating func get(_ offset: UInt64) -> Table? {
        guard let t = tables[offset] else { return nil }
        clock &+= 1
        t.lastUse = clock
        return t
    }

    /// Marks a table the caller already holds as just used.
    @inline(__always) mutating func touch(_ t: Table) {
        clock &+= 1
        t.lastUse = clock
    }

    mutating func insert(_ t: Table) {
        if tables.count >= capacity { evictClean() }
        clock &+= 1
        t.lastUse = clock
        tables[t.offset] = t
        if t.dirty { dirtyCount += 1 }
    }

    /// Keeps `t` in the cache until the matching ``unpin(_:)``.
    mutating func pin(_ t: Table) {
        precondition(t.resident, "pinning a table the cache no longer holds")
        t.pins += 1
    }
    mutating func unpin(_ t: Table) {
        precondition(t.pins > 0, "unpin without a pin")
        t.pins -= 1
    }

    mutating func markDirty(_ t: Table) {
        if !t.dirty { t.dirty = true; dirtyCount += 1 }
    }
    mutating func markClean(_ t: Table) {
        if t.dirty { t.dirty = false; dirtyCount -= 1 }
    }
    /// Forgets a table (its cluster was freed or rewritten elsewhere).
    mutating func remove(_ offset: UInt64) {
        if let t = tables.removeValue(forKey: offset) {
            t.resident = false
            if t.dirty { dirtyCount -= 1 }
        }
    }
    var needsWriteback: Bool { dirtyCount >= capacity }
    var dirtyTables: [Table] { tables.values.filter(\.dirty).sorted { $0.offset < $1.offset } }

    /// Copies of the dirty tables (in offset order), which are marked clean: the caller
    /// writes the copies, and marks the tables dirty again if that fails.
    mutating func takeDirty() -> [(Table, [UInt8])] {
        let taken = dirtyTables.map { ($0, $0.snapshot()) }
        for (t, _) in taken { markClean(t) }
        return taken
    }

    private mutating func evictClean() {
        // Drop the least recently used eighth of the clean, unpinned tables in one pass.
        var clean = tables.values.filter { !$0.dirty && $0.pins == 0 }
        guard !clean.isEmpty else { return }
        clean.sort { $0.lastUse < $1.lastUse }
        for t in clean.prefix(max(1, clean.count / 8)) {
            tables.removeValue(forKey: t.offset)
            t.resident = false
        }
    }
}
