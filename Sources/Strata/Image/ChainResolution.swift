import Synchronization

/// Where each unit of a read-only backing chain's data lies, found once and remembered, so
/// that a read through many layers costs one lookup instead of one walk per layer.
///
/// A chain qualifies when every layer below the image is a read-only qcow2 image, except
/// the last, which may be raw: their mappings cannot change while they are open (they take
/// the shared image lock, which keeps every writer out, and the engine never writes a
/// read-only image). A unit (the first backing layer's cluster size) is remembered when one
/// layer holds all of it as plain data; anything else (zeroes, compressed clusters,
/// subclusters, a layer ending inside the unit, smaller clusters below) is remembered as
/// "walk", and reads of it walk the chain as before. At most ``capacity`` units are
/// remembered (about 40 bytes each), past which reads of new units walk.
final class ChainResolution: @unchecked Sendable {
    /// The byte stores of the layers, top (the image's backing) first.
    let layers: [any BlockStorage]
    /// The backing chain, for resolving: its first layer.
    private let first: any BlockDevice
    let unitBits: UInt64
    let unit: UInt64
    let capacity: Int
    private static let shardBits = 6
    /// One lock per shard of units (a class: a `Mutex` cannot sit in an array).
    private final class Shard: Sendable {
        let units = Mutex<[UInt64: UInt64]>([:])
    }
    private let shards: [Shard]
    private let count = Atomic<Int>(0)
    /// Remembered for a unit no single layer holds as plain data: the caller walks.
    private static let walk = UInt64.max
    /// Units remembered so far.
    var remembered: Int { count.load(ordering: .relaxed) }

    /// A resolution for the chain under `backing`, or nil when it does not qualify or is
    /// too shallow to gain (one layer: its walk costs what a lookup costs).
    static func make(backing: (any BlockDevice)?, capacity: Int = 1 << 18) -> ChainResolution? {
        guard let top = backing as? Qcow2Image, top.isReadOnly, top.backing != nil else { return nil }
        var layers: [any BlockStorage] = []
        var device: (any BlockDevice)? = top
        while let d = device {
            if let q = d as? Qcow2Image, q.isReadOnly {
                layers.append(q.storage)
                device = q.backing
            } else if let r = d as? RawImage, r.isReadOnly {
                layers.append(r.storage)
                device = nil
            } else {
                return nil
            }
        }
        guard layers.count <= 255 else { return nil }
        return ChainResolution(first: top, layers: layers, unitBits: top.clusterBits, capacity: capacity)
    }

    private init(first: any BlockDevice, layers: [any BlockStorage], unitBits: UInt64, capacity: Int) {
        self.first = first
        self.layers = layers
        self.unitBits = unitBits
        self.unit = 1 << unitBits
        self.capacity = capacity
        shards = (0..<(1 << Self.shardBits)).map { _ in Shard() }
    }

    /// Reads `[guest, guest+length)` of the chain into the sink when it lies within one
    /// unit that one layer holds as plain data; false when the caller must walk the chain.
    func read(at guest: UInt64, length: Int, to sink: ReadSink) throws -> Bool {
        let u = guest >> unitBits
        guard length > 0, (guest + UInt64(length) - 1) >> unitBits == u else { return false }
        let shard = shards[Int(truncatingIfNeeded: u & ((1 << UInt64(Self.shardBits)) - 1))]
        var packed = shard.units.withLock { $0[u] }
        if packed == nil {
            let found = try locate(u) ?? Self.walk
            packed = found
            if count.load(ordering: .relaxed) < capacity {
                shard.units.withLock { if $0.updateValue(found, forKey: u) == nil { count.add(1, ordering: .relaxed) } }
            }
        }
        guard let p = packed, p != Self.walk else { return false }
        guard let out = try sink(guest, length, false) else { return true }
        _ = try layers[Int(p >> 56)].read(into: out, at: (p & ((1 << 56) - 1)) + (guest & (unit - 1)))
        return true
    }

    /// The layer (index, top first) and host offset holding unit `u` whole as plain data,
    /// packed as `index << 56 | host`; nil when no single layer does.
    private func locate(_ u: UInt64) throws -> UInt64? {
        let guest = u << unitBits
        var device: (any BlockDevice)? = first
        var index: UInt64 = 0
        while let d = device {
            guard guest + unit <= d.size else { return nil }
            if let q = d as? Qcow2Image {
                let (source, n) = try q.lock.withLock { try q.run(guest, limit: unit) }
                guard n == unit else { return nil }
                switch source {
                case .data(let host): return index << 56 | host
                case .backing(hint: _): device = q.backing
                default: return nil
                }
            } else {
                return guest < 1 << 56 ? index << 56 | guest : nil
            }
            index += 1
        }
        return nil
    }
}
