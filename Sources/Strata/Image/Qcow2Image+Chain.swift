/// Chain operations (commit, rebase): emptying an overlay into its backing file, and walking
/// which layer of a chain holds each range, without reading any data.
extension Qcow2Image {
    /// Drops every cluster of the active disk, so the whole disk reads from the backing file
    /// again (qemu's make_empty after a commit): entries become unallocated, never zero
    /// clusters, and their host clusters are freed unless a snapshot still holds them.
    /// Unallocated L2 tables are stepped over, so the cost follows the allocated clusters.
    public func makeEmpty() throws {
        try perform(.unallocate, at: 0, length: size)
        if cache == .writethrough { try flushNow() }
    }
}

extension WriteRequest {
    var isUnallocate: Bool { if case .unallocate = self { return true } else { return false } }
}

extension BackingChain {
    /// Walks `[start, end)` of a chain given as separately opened layers (top first, each
    /// opened alone, without its backing file: ``OpenOptions/noBacking``) and reports, in
    /// order, every range that one of the layers holds, with that layer's index and whether
    /// it reads as zeroes there. A range that no layer holds is not reported (it reads from
    /// whatever lies below the last layer). Past the end of a layer below the top, the range
    /// reads as zeroes through the layers above it, so it is reported as zeroes of that
    /// layer. Costs follow the allocated data (block status only, no data is read).
    /// `body` returns false to stop.
    public static func forEachAllocated(in layers: [any BlockDevice], from start: UInt64, to end: UInt64,
                                        _ body: (_ offset: UInt64, _ length: UInt64, _ layer: Int, _ zero: Bool) throws -> Bool) throws {
        _ = try walk(layers, 0, start, end, body)
    }

    /// One layer of ``forEachAllocated(in:from:to:_:)``; false once `body` asked to stop.
    private static func walk(_ layers: [any BlockDevice], _ i: Int, _ start: UInt64, _ end: UInt64,
                             _ body: (UInt64, UInt64, Int, Bool) throws -> Bool) throws -> Bool {
        guard i < layers.count, end > start else { return true }
        let layer = layers[i]
        let inside = min(end, max(start, layer.size))
        var going = true
        if inside > start {
            try layer.forEachRun(from: start, to: inside) { o, n, ext in
                if let ext, ext.depth == 0 {
                    going = try walk(layers, i + 1, o, o + n, body)
                } else {
                    // Held by this layer (an undescribed run counts as data).
                    going = try body(o, n, i, ext?.status.contains(.zero) ?? false)
                }
                return going
            }
        }
        if going, end > inside { going = try body(inside, end - inside, i, true) }
        return going
    }
}
