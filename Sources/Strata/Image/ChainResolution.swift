#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// Where each unit of a read-only backing chain's data lies, found once and remembered, so
/// that a read through many layers costs one atomic load instead of one walk per layer.
///
/// A chain qualifies when every layer below the image is a read-only qcow2 image, except
/// the last, which may be raw: their mappings cannot change while they are open (they take
/// the shared image lock, which keeps every writer out, and the engine never writes a
/// read-only image). A unit (the first backing layer's cluster size) is remembered with the
/// layer and host offset when one layer holds all of it as plain data; anything else
/// (zeroes, compressed clusters, subclusters, a layer ending inside the unit, smaller
/// clusters below) is remembered as "walk", and reads of it walk the chain as before.
///
/// One 8-byte word per unit, for the first ``maxUnits`` units (past them, reads walk), in
/// zero-filled memory that the kernel backs only where units were read: 8 bytes per 64 KiB
/// read at the usual cluster size. Lookups take no lock: the words only go from unknown to
/// their final value, and any thread that finds a unit unknown computes the same value.
final class ChainResolution: @unchecked Sendable {
    /// The byte stores of the layers, top (the image's backing) first.
    let layers: [any BlockStorage]
    /// The backing chain, for resolving: its first layer.
    private let first: any BlockDevice
    let unitBits: UInt64
    let unit: UInt64
    /// Units with a word (the chain's size in units, at most ``maxUnits``).
    let units: UInt64
    /// 1 TiB of 64 KiB units (128 MiB of address space, backed only where touched).
    static let maxUnits: UInt64 = 1 << 24
    /// 0: not known yet; ``walk``; else 1 + (layer index << 56 | host offset of the unit).
    private let words: UnsafeMutablePointer<Atomic<UInt64>>
    private static let walk = UInt64.max
    private let count = Atomic<Int>(0)
    /// Units resolved so far (held by one layer, or to walk).
    var remembered: Int { count.load(ordering: .relaxed) }

    /// A resolution for the chain under `backing`, or nil when it does not qualify or is
    /// too shallow to gain (one layer: its walk costs what a lookup costs).
    static func make(backing: (any BlockDevice)?) -> ChainResolution? {
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
        guard layers.count < 255 else { return nil }
        let units = min(maxUnits, (top.size + top.clusterSize - 1) >> top.clusterBits)
        guard units > 0, let raw = calloc(Int(units), MemoryLayout<UInt64>.stride) else { return nil }
        let words = raw.bindMemory(to: Atomic<UInt64>.self, capacity: Int(units))
        return ChainResolution(first: top, layers: layers, unitBits: top.clusterBits, units: units, words: words)
    }

    private init(first: any BlockDevice, layers: [any BlockStorage], unitBits: UInt64, units: UInt64,
                 words: UnsafeMutablePointer<Atomic<UInt64>>) {
        self.first = first
        self.layers = layers
        self.unitBits = unitBits
        self.unit = 1 << unitBits
        self.units = units
        self.words = words
    }

    deinit { free(words) }

    /// Reads `[guest, guest+length)` of the chain into the sink when it lies within one
    /// unit that one layer holds as plain data; false when the caller must walk the chain.
    func read(at guest: UInt64, length: Int, to sink: ReadSink) throws -> Bool {
        let u = guest >> unitBits
        guard length > 0, u < units, (guest + UInt64(length) - 1) >> unitBits == u else { return false }
        var word = words[Int(u)].load(ordering: .relaxed)
        if word == 0 {
            word = try locate(u).map { $0 + 1 } ?? Self.walk
            if words[Int(u)].compareExchange(expected: 0, desired: word, ordering: .relaxed).exchanged {
                count.add(1, ordering: .relaxed)
            }
        }
        guard word != Self.walk else { return false }
        let p = word - 1
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
