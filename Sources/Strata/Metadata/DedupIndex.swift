import Crypto
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Content fingerprints of dedup: the first 8 bytes of a cluster's SHA-256 (hardware
/// accelerated where the CPU has it). Stable across processes, so an index saved by one
/// run finds candidates for the next. Only a key: a share is always made after a byte
/// comparison, so a collision costs a comparison, never data.
enum ContentHash {
    static func of(_ bytes: UnsafeRawBufferPointer) -> UInt64 {
        var h = SHA256()
        h.update(bufferPointer: bytes)
        return h.finalize().withUnsafeBytes { UInt64(bigEndian: $0.loadUnaligned(as: UInt64.self)) }
    }
}

/// The index of inline dedup: content hash → a host cluster that held that content when it
/// was indexed, and the guest cluster whose entry owned it. Only a hint: every share is
/// checked against the image and the bytes themselves (see
/// ``Qcow2Image/shareIdentical(_:hash:guest:index:scratch:)``), so an entry that is stale,
/// wrong or missing costs dedup ratio, never correctness.
///
/// In memory: about 40 bytes per indexed cluster (dictionaries of 8-byte keys and 16-byte
/// entries, in 64 shards by hash, each with its own lock), at most `capacity` entries (``Limits/maxDedupIndexEntries``). Persistent when
/// the image has an index file (``DedupIndexFile``): new entries are appended to it at each
/// flush (and in batches in between), and the file is compacted when it holds more than
/// twice the live entries. Its own locks, never held across image I/O nor together with
/// the metadata lock for longer than a dictionary access.
final class DedupIndex: @unchecked Sendable {
    /// Host and guest cluster indexes (offset >> cluster bits).
    struct Entry: Equatable {
        var host: UInt64
        var guest: UInt64
    }
    /// One part of the index: the entries whose hash falls in it, and what is not in the
    /// file yet. Many writers look up and insert at once (one lookup per whole cluster
    /// written), so the index is split by hash into shards with a lock each.
    private struct Shard {
        var entries: [UInt64: Entry] = [:]
        var pending: [(UInt64, Entry)] = []
    }
    private final class Locked: Sendable {
        let shard = PthreadLocked(Shard())
        func withLock<R>(_ body: (inout Shard) throws -> R) rethrows -> R { try shard.withLock { try body(&$0) } }
    }
    private static let shardBits = 6
    private let shards: [Locked]
    /// Entries held, all shards together (updated under a shard's lock).
    private let total = Atomic<Int>(0)
    /// Entries recorded and not yet in the file, all shards together.
    private let pendingTotal = Atomic<Int>(0)
    /// Some cluster was not indexed (the index was full).
    private let missed = Atomic<Bool>(false)
    /// Most entries held.
    let capacity: Int
    /// The file this index persists to, nil for an index that lives as long as the open image.
    let file: DedupIndexFile?
    /// The entries came from ``file`` (it was trusted at open); otherwise the file is
    /// started afresh before the image's first change.
    let loaded: Bool
    /// Pending entries past which the writer that recorded them persists them.
    static let persistBatch = 16384

    init(capacity: Int, file: DedupIndexFile? = nil, loaded entries: [UInt64: Entry]? = nil) {
        self.capacity = capacity
        self.file = file
        self.loaded = entries != nil
        shards = (0..<(1 << Self.shardBits)).map { _ in Locked() }
        if let entries { fill(entries) }
    }

    @inline(__always) private func shard(_ hash: UInt64) -> Locked {
        shards[Int(truncatingIfNeeded: hash >> UInt64(64 - Self.shardBits))]
    }

    private func fill(_ entries: [UInt64: Entry]) {
        var parts = [[UInt64: Entry]](repeating: [:], count: shards.count)
        for (h, e) in entries { parts[Int(truncatingIfNeeded: h >> UInt64(64 - Self.shardBits))][h] = e }
        for (i, part) in parts.enumerated() { shards[i].withLock { $0.entries = part; $0.pending = [] } }
        total.store(entries.count, ordering: .relaxed)
        pendingTotal.store(0, ordering: .relaxed)
    }

    func lookup(_ hash: UInt64) -> Entry? { shard(hash).withLock { $0.entries[hash] } }

    /// Records `entry` for `hash` (replacing an older one), unless the index is full.
    /// Returns whether enough is pending that the caller should ``persist()`` now.
    @discardableResult
    func insert(_ hash: UInt64, _ entry: Entry) -> Bool {
        shard(hash).withLock { s in
            if s.entries[hash] == nil {
                guard total.load(ordering: .relaxed) < capacity else {
                    missed.store(true, ordering: .relaxed)
                    return false
                }
                total.add(1, ordering: .relaxed)
            }
            s.entries[hash] = entry
            guard file != nil else { return false }
            s.pending.append((hash, entry))
            return pendingTotal.add(1, ordering: .relaxed).newValue >= Self.persistBatch
        }
    }

    /// Forgets `hash` if it still names `entry` (found stale). The file keeps its record
    /// until the next compaction; a later run finds it stale again and drops it again.
    func drop(_ hash: UInt64, ifStill entry: Entry) {
        shard(hash).withLock { s in
            if s.entries[hash] == entry {
                s.entries[hash] = nil
                total.subtract(1, ordering: .relaxed)
            }
        }
    }

    /// Replaces every entry (offline dedup rebuilt the index) and rewrites the file, as
    /// complete: every data cluster of the active disk was offered to it.
    func replaceAll(_ entries: [UInt64: Entry]) throws {
        let kept = entries.count <= capacity ? entries : Dictionary(uniqueKeysWithValues: entries.prefix(capacity).map { ($0.key, $0.value) })
        fill(kept)
        missed.store(entries.count > capacity, ordering: .relaxed)
        try file?.rewrite(kept, complete: entries.count <= capacity)
    }

    var count: Int { total.load(ordering: .relaxed) }

    /// Appends what is pending to the file, or compacts the file when it holds more than
    /// twice the live entries. A failure stops the persisting (the file then lacks entries,
    /// which costs ratio in a later run, nothing else) and is not the caller's error: the
    /// index is a hint, and guest I/O must not fail for it.
    func persist() {
        guard let file else { return }
        file.serialized {
            var batch: [(UInt64, Entry)] = []
            for shard in shards {
                shard.withLock { s in
                    batch += s.pending
                    s.pending.removeAll(keepingCapacity: true)
                }
            }
            pendingTotal.subtract(batch.count, ordering: .relaxed)
            let wasMissed = missed.load(ordering: .relaxed)
            if file.records + batch.count > 2 * count + Self.persistBatch * 4 {
                var live: [UInt64: Entry] = [:]
                live.reserveCapacity(count)
                for shard in shards { shard.withLock { live.merge($0.entries) { $1 } } }
                try file.rewriteLocked(live, complete: file.complete && !wasMissed)
            } else {
                if wasMissed && file.complete { try file.setCompleteLocked(false) }
                try file.appendLocked(batch)
            }
        }
    }
}

/// The dedup index file kept beside an image (`IMAGE.dedup-index`), so that reopening an
/// image does not rescan it. Layout (big endian; spec/format.md "Dedup index file"):
/// ```
/// 0-7    magic "STRATAIX"
/// 8-11   version (1)
/// 12-15  cluster_bits of the image
/// 16-31  the image's index id (its Strata header extension carries the same 16 bytes)
/// 32-39  flags: bit 0 complete (every data cluster of the active disk was offered to the
///        index when it was started, by `strata dedup` or at create, and every one since)
/// 40-63  reserved, zero
/// 64-    records of 24 bytes: content hash, host cluster index, guest cluster index
/// ```
/// Later records win. A torn last record is ignored; a record naming clusters outside the
/// image is skipped. The image's autoclear bit ``AutoclearFeatures/dedupIndex`` says the file
/// may be trusted: set only after the file was started, cleared by QEMU (and by any Strata
/// writer that does not keep the index) when it writes the image.
final class DedupIndexFile: @unchecked Sendable {
    static let magic: [UInt8] = Array("STRATAIX".utf8)
    static let headerBytes = 64
    static let recordBytes = 24
    static let version: UInt32 = 1
    static let completeFlag: UInt64 = 1

    /// Where the index file of the image at `imagePath` lives.
    static func path(forImage imagePath: String) -> String { imagePath + ".dedup-index" }

    let storage: any BlockStorage
    let id: [UInt8]
    let clusterBits: UInt32
    private let io = PthreadLocked<Void>(())
    // Guarded by `io`:
    /// Records in the file.
    private(set) var records = 0
    private(set) var complete = false
    /// A write failed: nothing more is written.
    private(set) var broken = false

    init(storage: any BlockStorage, id: [UInt8], clusterBits: UInt32) {
        self.storage = storage
        self.id = id
        self.clusterBits = clusterBits
    }

    /// Opens (creating when missing) the index file of an image.
    static func open(imagePath: String, id: [UInt8], clusterBits: UInt32) throws -> DedupIndexFile {
        DedupIndexFile(storage: try FileStorage(creating: path(forImage: imagePath)), id: id, clusterBits: clusterBits)
    }

    /// What a file's header says.
    struct Header {
        var clusterBits: UInt32
        var id: [UInt8]
        var complete: Bool
        var records: Int
    }

    /// Reads and checks the header; returns why the file cannot be used otherwise.
    static func readHeader(_ storage: any BlockStorage) throws -> Result<Header, DedupIndexProblem> {
        let length = try storage.length()
        guard length >= UInt64(headerBytes) else { return .failure(.unusable("it is shorter than its header")) }
        let h = try storage.readBytes(at: 0, count: headerBytes)
        guard Array(h[0..<8]) == magic else { return .failure(.unusable("it is not a Strata dedup index")) }
        guard h.be32(8) == version else { return .failure(.unusable("its version \(h.be32(8)) is unknown")) }
        let records = (length - UInt64(headerBytes)) / UInt64(recordBytes)
        return .success(Header(clusterBits: h.be32(12), id: Array(h[16..<32]), complete: h.be64(32) & completeFlag != 0,
                               records: Int(min(records, UInt64(Int.max)))))
    }

    /// Loads the entries, bounded: at most `capacity` entries kept, a file of more than
    /// four times that many records refused, every record's clusters checked against the
    /// image (`hostClusters`, `guestClusters`).
    func load(capacity: Int, hostClusters: UInt64, guestClusters: UInt64) throws -> Result<[UInt64: DedupIndex.Entry], DedupIndexProblem> {
        var entries: [UInt64: DedupIndex.Entry] = [:]
        let scanned = try forEachRecord(maxRecords: 4 * capacity + 4 * DedupIndex.persistBatch) { hash, host, guest in
            guard host > 0, host < hostClusters, guest < guestClusters else { return }
            if entries.count < capacity || entries[hash] != nil { entries[hash] = .init(host: host, guest: guest) }
        }
        switch scanned {
        case .failure(let p): return .failure(p)
        case .success(let header):
            io.withLock { _ in
                records = header.records
                complete = header.complete
            }
            return .success(entries)
        }
    }

    /// Checks the header (this image's id and cluster size, at most `maxRecords` records),
    /// then calls `body` with each record, (hash, host cluster, guest cluster), in file order.
    func forEachRecord(maxRecords: Int, _ body: (UInt64, UInt64, UInt64) -> Void) throws -> Result<Header, DedupIndexProblem> {
        let header: Header
        switch try Self.readHeader(storage) {
        case .failure(let p): return .failure(p)
        case .success(let h): header = h
        }
        guard header.id == id else { return .failure(.unusable("it belongs to another image")) }
        guard header.clusterBits == clusterBits else { return .failure(.unusable("it was made for another cluster size")) }
        guard header.records <= maxRecords else {
            return .failure(.unusable("it holds \(header.records) records, more than the \(maxRecords) an index ever writes"))
        }
        let chunkRecords = 1 << 16
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkRecords * Self.recordBytes, alignment: 8)
        defer { buf.deallocate() }
        var done = 0
        while done < header.records {
            let n = min(chunkRecords, header.records - done)
            let bytes = UnsafeMutableRawBufferPointer(rebasing: buf[0..<n * Self.recordBytes])
            _ = try storage.read(into: bytes, at: UInt64(Self.headerBytes + done * Self.recordBytes))
            for r in 0..<n { body(bytes.be64(r * 3), bytes.be64(r * 3 + 1), bytes.be64(r * 3 + 2)) }
            done += n
        }
        return .success(header)
    }

    /// Runs `body` with the file's lock held; a failure marks the file broken.
    func serialized(_ body: () throws -> Void) {
        io.withLock { _ in
            guard !broken else { return }
            do { try body() } catch { broken = true }
        }
    }

    /// Stops all writes to the file.
    func markBroken() { io.withLock { _ in broken = true } }

    /// Starts the file afresh, with no records (durable when it returns).
    func reset(complete: Bool) throws {
        try io.withLock { _ in try rewriteLocked([:], complete: complete) }
    }

    /// Replaces the records with `entries` (durable when it returns).
    func rewrite(_ entries: [UInt64: DedupIndex.Entry], complete: Bool) throws {
        try io.withLock { _ in try rewriteLocked(entries, complete: complete) }
    }

    /// Rewrites in place: header, records, then the length. A crash in between leaves older
    /// records after the new ones, each true when it was recorded: hints still.
    func rewriteLocked(_ entries: [UInt64: DedupIndex.Entry], complete: Bool) throws {
        var header = [UInt8](repeating: 0, count: Self.headerBytes)
        header.replaceSubrange(0..<8, with: Self.magic)
        header.put32(Self.version, 8)
        header.put32(clusterBits, 12)
        header.replaceSubrange(16..<32, with: id)
        header.put64(complete ? Self.completeFlag : 0, 32)
        try storage.writeBytes(header, at: 0)
        records = 0
        self.complete = complete
        var batch: [(UInt64, DedupIndex.Entry)] = []
        batch.reserveCapacity(min(entries.count, 1 << 16))
        for (h, e) in entries {
            batch.append((h, e))
            if batch.count == 1 << 16 { try appendLocked(batch); batch.removeAll(keepingCapacity: true) }
        }
        try appendLocked(batch)
        try storage.setLength(UInt64(Self.headerBytes + records * Self.recordBytes))
        try storage.sync()
    }

    /// Appends records after the last whole one.
    func appendLocked(_ batch: [(UInt64, DedupIndex.Entry)]) throws {
        guard !batch.isEmpty else { return }
        var bytes = [UInt8](repeating: 0, count: batch.count * Self.recordBytes)
        for (i, (h, e)) in batch.enumerated() {
            bytes.put64(h, i * 24)
            bytes.put64(e.host, i * 24 + 8)
            bytes.put64(e.guest, i * 24 + 16)
        }
        try storage.writeBytes(bytes, at: UInt64(Self.headerBytes + records * Self.recordBytes))
        records += batch.count
    }

    func setCompleteLocked(_ value: Bool) throws {
        var flags = [UInt8](repeating: 0, count: 8)
        flags.put64(value ? Self.completeFlag : 0, 0)
        try storage.writeBytes(flags, at: 32)
        complete = value
    }

    func close() { storage.close() }
}

/// Why an index file is not used.
enum DedupIndexProblem: Error, Equatable {
    case unusable(String)
}

/// What `strata info` and `strata serve` say about an image's dedup index.
public enum DedupIndexState: Sendable, Equatable {
    /// The image keeps no index file (not a dedup image, a version 2 image, or one
    /// deduplicated before index files existed: `strata dedup` gives it one).
    case none
    /// The file describes the image: `records` records (some may be stale or repeat a
    /// hash), `complete` when every data cluster was offered to it.
    case valid(records: Int, complete: Bool)
    /// The file is not used, for `reason`; the next writer with dedup starts a new one, and
    /// `strata dedup FILE` rebuilds it from the image.
    case stale(reason: String)
}
