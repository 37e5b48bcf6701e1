/// One `-c` command of `strata io`, parsed: qemu-io's `read`, `write`, `discard`, `flush` and
/// `length`, with qemu-io's flags and size suffixes.
enum IOCommandLine: Equatable {
    /// `read [-qv] [-P pattern [-s off] [-l len]] off len`
    case read(offset: UInt64, length: Int, pattern: UInt8?, patternOffset: Int, patternLength: Int?, verbose: Bool, quiet: Bool)
    /// `write [-fqz] [-u] [-P pattern] off len` (`-z` writes zeroes, `-u` lets them unmap, `-f` is FUA)
    case write(offset: UInt64, length: Int, pattern: UInt8, zeroes: Bool, unmap: Bool, fua: Bool, quiet: Bool)
    /// `discard [-q] off len`
    case discard(offset: UInt64, length: UInt64, quiet: Bool)
    /// `flush`
    case flush
    /// `length`: prints the virtual size
    case length

    /// Largest single read or write (qemu-io caps at INT_MAX; we hold the buffer in memory).
    static let maxTransfer = 1 << 30
    /// qemu-io's default write pattern.
    static let defaultPattern: UInt8 = 0xcd

    /// Usage line per command.
    static let usage: [String: String] = [
        "read": "read [-qv] [-P pattern [-s off] [-l len]] off len",
        "write": "write [-fqz] [-u] [-P pattern] off len",
        "discard": "discard [-q] off len",
        "flush": "flush",
        "length": "length",
    ]
    static let aliases = ["r": "read", "w": "write", "d": "discard", "f": "flush", "l": "length"]

    /// Why a command string is not a command (qemu-io's complaint, in our words).
    struct Invalid: Error, CustomStringConvertible {
        var reason: String
        var description: String { reason }
    }

    /// Parses one command string (words split on blanks, getopt-style flags); nil for a blank
    /// one, which qemu-io skips.
    static func parse(_ text: String) throws(Invalid) -> IOCommandLine? {
        let words = text.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init)
        func fail(_ reason: String) -> Invalid { Invalid(reason: reason) }
        guard let first = words.first else { return nil }
        let name = aliases[first] ?? first
        guard let usageLine = usage[name] else {
            throw fail("command \"\(first)\" not found (known: read, write, discard, flush, length)")
        }
        let valued: Set<Character> = name == "read" ? ["P", "s", "l"] : name == "write" ? ["P"] : []
        let allowed: Set<Character> = name == "read" ? ["q", "v"] : name == "write" ? ["f", "q", "z", "u"] : name == "discard" ? ["q"] : []

        // getopt: flags (possibly grouped), `-Xvalue` or `-X value`, then operands.
        var flags: Set<Character> = []
        var values: [Character: String] = [:]
        var operands: [String] = []
        var i = 1
        while i < words.count {
            let w = words[i]
            if w == "--" { operands += words[(i + 1)...]; break }
            guard w.hasPrefix("-"), w.count > 1, operands.isEmpty else { operands.append(w); i += 1; continue }
            var chars = Array(w.dropFirst())[...]
            while let c = chars.popFirst() {
                if valued.contains(c) {
                    if !chars.isEmpty {
                        values[c] = String(chars)
                    } else {
                        i += 1
                        guard i < words.count else { throw fail("option -\(c) needs a value; usage: \(usageLine)") }
                        values[c] = words[i]
                    }
                    break
                } else if allowed.contains(c) {
                    flags.insert(c)
                } else {
                    throw fail("unknown option -\(c); usage: \(usageLine)")
                }
            }
            i += 1
        }

        func number(_ s: String, _ what: String) throws(Invalid) -> UInt64 {
            do {
                return try SizeParser.parse(s)
            } catch .tooLarge {
                throw fail("invalid \(what) '\(s)': too large")
            } catch {
                throw fail("invalid \(what) '\(s)': non-numeric argument, or extraneous/unrecognized suffix")
            }
        }
        func pattern(_ s: String) throws(Invalid) -> UInt8 {
            // strtol(…, 0): decimal, 0x hex or 0 octal; one byte.
            var v: Int?
            if s.hasPrefix("0x") || s.hasPrefix("0X") { v = Int(s.dropFirst(2), radix: 16) }
            else if s.count > 1, s.hasPrefix("0") { v = Int(s.dropFirst(), radix: 8) }
            else { v = Int(s) }
            guard let v, (0...255).contains(v) else { throw fail("\(s) is not a valid pattern byte") }
            return UInt8(v)
        }
        func operandsOffsetLength() throws(Invalid) -> (UInt64, UInt64) {
            guard operands.count == 2 else { throw fail("expected offset and length; usage: \(usageLine)") }
            return (try number(operands[0], "offset"), try number(operands[1], "length"))
        }
        func transfer(_ n: UInt64) throws(Invalid) -> Int {
            guard n <= UInt64(maxTransfer) else { throw fail("length \(n) is above the \(maxTransfer)-byte limit of one request") }
            return Int(n)
        }

        switch name {
        case "read":
            let (off, len) = try operandsOffsetLength()
            let length = try transfer(len)
            let p = try values["P"].map(pattern)
            if p == nil, values["s"] != nil || values["l"] != nil { throw fail("-s and -l need -P; usage: \(usageLine)") }
            var pOff = 0, pLen: Int?
            if let s = values["s"] { pOff = Int(try number(s, "pattern offset")) }
            if let l = values["l"] { pLen = Int(try number(l, "pattern length")) }
            if p != nil, pOff + (pLen ?? max(0, length - pOff)) > length {
                throw fail("pattern verification range exceeds end of read data")
            }
            return .read(offset: off, length: length, pattern: p, patternOffset: pOff, patternLength: pLen,
                         verbose: flags.contains("v"), quiet: flags.contains("q"))
        case "write":
            let (off, len) = try operandsOffsetLength()
            let zeroes = flags.contains("z")
            if zeroes, values["P"] != nil { throw fail("-z and -P cannot be specified at the same time") }
            if flags.contains("u"), !zeroes { throw fail("-u requires -z to be specified") }
            let length = zeroes ? Int(clamping: len) : try transfer(len)
            return .write(offset: off, length: length, pattern: try values["P"].map(pattern) ?? defaultPattern,
                          zeroes: zeroes, unmap: flags.contains("u"), fua: flags.contains("f"), quiet: flags.contains("q"))
        case "discard":
            let (off, len) = try operandsOffsetLength()
            return .discard(offset: off, length: len, quiet: flags.contains("q"))
        case "flush":
            guard operands.isEmpty else { throw fail("flush takes no arguments") }
            return .flush
        default:
            guard operands.isEmpty else { throw fail("length takes no arguments") }
            return .length
        }
    }

    /// Whether the command changes the image (refused on a read-only open).
    var writes: Bool {
        switch self {
        case .write, .discard: return true
        default: return false
        }
    }
}
