import ArgumentParser
import Strata

/// `strata map [-f FMT] [--output human|json] [--start-offset OFF] [--max-length LEN] [-U] FILE`
struct Map: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show where each range of the disk lives in the backing chain.",
        discussion: """
            JSON: one entry per run (start, length, depth 0 = this image, present, zero, data, \
            offset when the data sits uncompressed in a file), as qemu-img map prints it. \
            Human: only ranges with data, as offset/length/host offset/file.
            """)

    @OptionGroup var format: FormatOption
    @OptionGroup var output: OutputOption

    // `.unconditional`: a value such as `-1` must reach the size parser, not look like a flag.
    @Option(name: .customLong("start-offset"), parsing: .unconditional, help: ArgumentHelp("First byte to map.", valueName: "offset"))
    var startOffset: String?

    @Option(name: .customLong("max-length"), parsing: .unconditional, help: ArgumentHelp("How many bytes to map at most.", valueName: "len"))
    var maxLength: String?

    @OptionGroup var share: ForceShareOption

    @Argument(help: "The image file.")
    var file: String

    mutating func validate() throws { _ = try range() }

    /// `--start-offset` and `--max-length`, parsed (0 and "to the end" when not given).
    func range() throws -> (start: UInt64, maxLength: UInt64) {
        (try startOffset.map { try SizeParser.parse($0, what: "start offset", file: nil) } ?? 0,
         try maxLength.map { try SizeParser.parse($0, what: "max length", file: nil) } ?? UInt64.max)
    }

    func run() throws {
        let device = try ImageChain.open(file, format: format.format, forceShare: share.forceShare)
        defer { try? device.close() }
        let layers = ImageChain.layers(of: device, name: file)
        let range = try range()
        let start = min(range.start, device.size)
        let length = min(range.maxLength, device.size - start)
        let entries = try MapEntry.collect(layers: layers, start: start, length: length)
        switch output.output {
        case .json:
            let lines = (entries.isEmpty ? [MapEntry.empty(at: start)] : entries).map(\.jsonLine)
            print("[" + lines.joined(separator: ",\n") + "]")
        case .human:
            print("Offset          Length          Mapped to       File")
            for e in entries where e.data {
                guard let offset = e.offset else {
                    throw CLIError.refused(file: file, reason: "the range at offset \(e.start) is compressed, so it has no host offset to show; use --output json")
                }
                if !e.zero {
                    print(HumanFormat.mapHex(e.start) + HumanFormat.mapHex(e.length) + HumanFormat.mapHex(offset) + (e.file ?? ""))
                }
            }
        }
    }
}

/// One run of `qemu-img map`: QEMU's `MapEntry`.
struct MapEntry: Equatable {
    var start: UInt64
    var length: UInt64
    /// 0 = the image itself, 1 = its backing file, …
    var depth: Int
    /// False when no image of the chain holds the range (a deeper image could supply it).
    var present: Bool
    var zero: Bool
    var data: Bool
    /// Where the bytes are, in `file`, when they are stored there uncompressed.
    var offset: UInt64?
    /// The file that holds them (human output only; set with `offset`).
    var file: String?

    var end: UInt64 { start + length }

    static func empty(at start: UInt64) -> MapEntry {
        MapEntry(start: start, length: 0, depth: 0, present: false, zero: false, data: false)
    }

    /// `{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680}`
    var jsonLine: String {
        var s = "{ \"start\": \(start), \"length\": \(length), \"depth\": \(depth), \"present\": \(present), \"zero\": \(zero), \"data\": \(data)"
        if let offset { s += ", \"offset\": \(offset)" }
        return s + "}"
    }

    /// qemu-img's rule for growing one entry by the next: same flags, same depth, and offsets
    /// (when there are any) that continue each other.
    func canMerge(_ next: MapEntry) -> Bool {
        guard length > 0, next.start == end, zero == next.zero, data == next.data, depth == next.depth,
              present == next.present, file == next.file, (offset == nil) == (next.offset == nil) else { return false }
        if let offset, let nextOffset = next.offset { return offset + length == nextOffset }
        return true
    }

    /// Walks `[start, start+length)` with block status and turns the engine's extents into
    /// qemu-img's entries, merged.
    ///
    /// The engine says which image holds a range (`depth` 1 = top, 0 = none). qemu-img map asks
    /// one image at a time and stops at the first that knows the range reads as data or zeroes;
    /// for ranges no image allocates, that is the first image that has no backing file, or
    /// whose backing file ends before the range. A raw image always "holds" its ranges (its
    /// holes are present zeroes at host offset = guest offset).
    static func collect(layers: [ChainLayer], start: UInt64, length: UInt64) throws -> [MapEntry] {
        guard let top = layers.first else { return [] }
        let sizes = layers.map(\.device.size)
        var out: [MapEntry] = []
        func append(_ e: MapEntry) {
            guard e.length > 0 else { return }
            if let last = out.last, last.canMerge(e) { out[out.count - 1].length += e.length } else { out.append(e) }
        }
        /// The image where qemu-img's walk stops for a byte at `x` that no image allocates:
        /// the first one without a backing file or whose backing file ends at or before `x`.
        func stopLayer(_ x: UInt64) -> Int {
            (0..<layers.count).first { $0 == layers.count - 1 || x >= sizes[$0 + 1] } ?? 0
        }
        try top.device.forEachRun(from: start, to: start + length) { s, n, ext in
            guard let ext else {
                throw CLIError.refused(file: top.displayName, reason: "block status returned no extent at offset \(s)")
            }
            let e = s + n
            // qemu-img's "data" is false for anything known to read as zeroes (a zero
            // cluster keeps its host offset but is not data).
            let zero = ext.status.contains(.zero), data = !ext.status.contains(.hole) && !zero
            if ext.depth >= 1, Int(ext.depth) <= layers.count {
                let i = Int(ext.depth) - 1
                let raw = layers[i].format == .raw
                let offset: UInt64? = raw ? s : (ext.compressed ? nil : ext.hostOffset.map { $0 + (s - ext.offset) })
                append(MapEntry(start: s, length: e - s, depth: i, present: true, zero: zero, data: data,
                                offset: offset, file: offset == nil ? nil : layers[i].displayName))
            } else {
                // Unallocated everywhere: split where a backing file ends. An unallocated
                // subcluster of an allocated cluster (extended L2) still has its host offset
                // in the image where the walk stops, which qemu-img shows.
                var x = s
                while x < e {
                    let i = stopLayer(x)
                    // The answer stays until x passes the end of a shallower backing file.
                    var pieceEnd = e
                    for j in stride(from: 1, through: i, by: 1) { pieceEnd = min(pieceEnd, sizes[j]) }
                    let raw = layers[i].format == .raw
                    let offset = raw ? x : ext.hostOffset.map { $0 + (x - ext.offset) }
                    append(MapEntry(start: x, length: pieceEnd - x, depth: i, present: raw, zero: zero, data: data,
                                    offset: offset, file: offset == nil ? nil : layers[i].displayName))
                    x = pieceEnd
                }
            }
            return true
        }
        return out
    }
}
