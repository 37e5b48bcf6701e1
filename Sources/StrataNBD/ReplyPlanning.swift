import Strata

// Reply planning: pure functions from the engine's extents to the descriptors of a block
// status chunk. No I/O.

/// Lays the engine's extents over the range `[offset, offset+length)`, calling `body` for
/// each consecutive piece in order: the extent covering it, or nil for a gap the engine did not
/// describe (including any tail). Pieces never fall outside the range and are never empty.
/// `body` returns false to stop early.
func forEachPiece(of extents: [BlockExtent], offset: UInt64, length: UInt64,
                  _ body: (_ length: UInt64, _ extent: BlockExtent?) -> Bool) {
    let end = offset + length
    var cursor = offset
    for e in extents where cursor < end {
        let eEnd = e.offset &+ e.length
        guard eEnd > cursor, e.length > 0 else { continue }
        if e.offset > cursor {
            let gap = min(e.offset, end) - cursor
            guard body(gap, nil) else { return }
            cursor += gap
            if cursor == end { return }
        }
        let piece = min(eEnd, end) - cursor
        guard body(piece, e) else { return }
        cursor += piece
    }
    if cursor < end { _ = body(end - cursor, nil) }
}

/// One descriptor of a block status chunk: 32-bit length and 32-bit flags.
struct BlockStatusDescriptor: Equatable {
    var length: UInt32
    var flags: UInt32

    /// The flags `context` defines for an extent; 0 ("allocated, contents unknown", always
    /// safe) where the engine said nothing.
    static func flags(of extent: BlockExtent?, in context: NBDMetaContext) -> UInt32 {
        guard let extent else { return 0 }
        switch context {
        case .baseAllocation: return UInt32(extent.status.intersection([.hole, .zero]).rawValue)
        case .allocationDepth: return extent.depth
        }
    }

    /// The descriptors for one context: contiguous from `offset`, neighbours with equal flags
    /// merged, cut at the end of the request, at most ``NBDLimits/maxBlockStatusExtents``
    /// (or one, with `NBD_CMD_FLAG_REQ_ONE`). Never empty.
    static func plan(_ extents: [BlockExtent], context: NBDMetaContext, offset: UInt64, length: UInt64,
                     requestOne: Bool) -> [BlockStatusDescriptor] {
        let limit = requestOne ? 1 : NBDLimits.maxBlockStatusExtents
        var out: [BlockStatusDescriptor] = []
        forEachPiece(of: extents, offset: offset, length: length) { len, extent in
            let flags = flags(of: extent, in: context)
            if let last = out.last, last.flags == flags {
                out[out.count - 1].length += UInt32(len)
            } else {
                guard out.count < limit else { return false }
                out.append(BlockStatusDescriptor(length: UInt32(len), flags: flags))
            }
            return true
        }
        return out
    }
}
