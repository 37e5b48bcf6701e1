/// Sizes as qemu-img and qemu-io read them (`qemu_strtosz`): a decimal number with an optional
/// fraction, or a `0x` hex integer, followed by an optional one-letter suffix
/// (`b`, `k`, `M`, `G`, `T`, `P`, `E`, either case; powers of 1024). A bare number is bytes.
/// A fraction needs a suffix (`1.5M` is fine, `1.5` is not: there are no half bytes).
enum SizeParser {
    /// Multiplier for each suffix letter.
    static func multiplier(_ c: Character) -> UInt64? {
        switch c {
        case "b", "B": return 1
        case "k", "K": return 1 << 10
        case "m", "M": return 1 << 20
        case "g", "G": return 1 << 30
        case "t", "T": return 1 << 40
        case "p", "P": return 1 << 50
        case "e", "E": return 1 << 60
        default: return nil
        }
    }

    /// Parses an unsigned size; nil when the text is not one (or overflows 64 bits).
    static func parse(_ text: String) -> UInt64? {
        var s = Substring(text).drop { $0 == " " || $0 == "\t" }
        guard !s.isEmpty else { return nil }
        if s.hasPrefix("0x") || s.hasPrefix("0X") {
            s = s.dropFirst(2)
            guard !s.isEmpty, s.allSatisfy(\.isHexDigit) else { return nil }
            return UInt64(s, radix: 16)
        }
        var mul: UInt64 = 1
        if let last = s.last, !last.isNumber, last != "." {
            guard let m = multiplier(last) else { return nil }
            mul = m
            s = s.dropLast()
        }
        let parts = s.split(separator: ".", maxSplits: 1, omittingEmptySubsequences: false)
        guard let intText = parts.first, !intText.isEmpty, intText.allSatisfy(\.isASCIIDigit),
              let whole = UInt64(intText) else { return nil }
        var fractionBytes: UInt64 = 0
        if parts.count == 2 {
            let frac = parts[1]
            guard !frac.isEmpty, frac.allSatisfy(\.isASCIIDigit), mul > 1,
                  let f = Double("0." + frac) else { return nil }
            fractionBytes = UInt64(f * Double(mul))
        }
        let (product, overflow) = whole.multipliedReportingOverflow(by: mul)
        guard !overflow else { return nil }
        let (sum, overflow2) = product.addingReportingOverflow(fractionBytes)
        return overflow2 ? nil : sum
    }

    /// A size for `resize`: absolute, or relative with a `+`/`-` prefix.
    enum Change: Equatable {
        case absolute(UInt64)
        case grow(UInt64)
        case shrink(UInt64)

        /// The new size given the current one; nil when it would go below zero or overflow.
        func apply(to current: UInt64) -> UInt64? {
            switch self {
            case .absolute(let n): return n
            case .grow(let n):
                let (r, o) = current.addingReportingOverflow(n)
                return o ? nil : r
            case .shrink(let n): return n > current ? nil : current - n
            }
        }
    }

    /// Parses `[+|-]SIZE`.
    static func parseChange(_ text: String) -> Change? {
        if text.hasPrefix("+") { return parse(String(text.dropFirst())).map(Change.grow) }
        if text.hasPrefix("-") { return parse(String(text.dropFirst())).map(Change.shrink) }
        return parse(text).map(Change.absolute)
    }
}

extension Character {
    var isASCIIDigit: Bool { isASCII && isNumber }
}
