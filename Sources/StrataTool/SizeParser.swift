import ArgumentParser

/// Sizes as qemu-img and qemu-io read them (`qemu_strtosz`, then `cvtnum`'s range check): a
/// decimal number with an optional fraction, or a `0x` hex integer, followed by an optional
/// one-letter suffix (`b`, `k`, `M`, `G`, `T`, `P`, `E`, either case; powers of 1024). A bare
/// number is bytes. A fraction needs a suffix (`1.5M` is fine, `1.5` is not: there are no half
/// bytes). Sizes are at most ``maxSize``, as in qemu-img.
enum SizeParser {
    /// Why a size was refused.
    enum Problem: Error, Equatable {
        /// Not a number with an optional suffix.
        case notANumber
        /// A leading `-`: sizes are never negative.
        case negative
        /// Above ``SizeParser/maxSize``.
        case tooLarge
    }

    /// The largest size qemu-img accepts anywhere (`INT64_MAX`).
    static let maxSize = UInt64(Int64.max)

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

    /// Parses an unsigned size.
    static func parse(_ text: String) throws(Problem) -> UInt64 {
        var s = Substring(text).drop { $0 == " " || $0 == "\t" }
        if s.hasPrefix("-") {
            // Only a number with a minus sign is "negative"; "-x" is just not a number.
            let rest = s.dropFirst()
            if case .some = try? parse(String(rest)) { throw .negative }
            throw .notANumber
        }
        guard !s.isEmpty else { throw .notANumber }
        if s.hasPrefix("0x") || s.hasPrefix("0X") {
            s = s.dropFirst(2)
            guard !s.isEmpty, s.allSatisfy(\.isHexDigit) else { throw .notANumber }
            guard let n = UInt64(s, radix: 16), n <= maxSize else { throw .tooLarge }
            return n
        }
        var mul: UInt64 = 1
        if let last = s.last, !last.isNumber, last != "." {
            guard let m = multiplier(last) else { throw .notANumber }
            mul = m
            s = s.dropLast()
        }
        let parts = s.split(separator: ".", maxSplits: 1, omittingEmptySubsequences: false)
        guard let intText = parts.first, !intText.isEmpty, intText.allSatisfy(\.isASCIIDigit) else { throw .notANumber }
        var fractionBytes: UInt64 = 0
        if parts.count == 2 {
            let frac = parts[1]
            guard !frac.isEmpty, frac.allSatisfy(\.isASCIIDigit), mul > 1,
                  let f = Double("0." + frac) else { throw .notANumber }
            fractionBytes = UInt64(f * Double(mul))
        }
        guard let whole = UInt64(intText) else { throw .tooLarge }
        let (product, overflow) = whole.multipliedReportingOverflow(by: mul)
        let (sum, overflow2) = product.addingReportingOverflow(fractionBytes)
        guard !overflow, !overflow2, sum <= maxSize else { throw .tooLarge }
        return sum
    }

    /// Parses a size the user gave for `what`, naming `file` (when the size is about one) in
    /// the error.
    static func parse(_ text: String, what: String, file: String?) throws -> UInt64 {
        do {
            return try parse(text)
        } catch {
            throw CLIError.badSize(file: file, what: what, text: text, problem: error)
        }
    }

    /// For a size argument collected with the parser's unrecognised arguments (so that `-1`
    /// reaches ``parse(_:)``): refuses what is an unknown option rather than a negative
    /// number (a minus sign not followed by a digit or a point).
    static func refuseOptions(_ args: [String]) throws {
        for a in args where a.hasPrefix("-") {
            guard let c = a.dropFirst().first, c.isASCIIDigit || c == "." else {
                throw ValidationError("unknown option '\(a)'")
            }
        }
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
    static func parseChange(_ text: String) throws(Problem) -> Change {
        if text.hasPrefix("+") { return .grow(try parse(String(text.dropFirst()))) }
        if text.hasPrefix("-") { return .shrink(try parse(String(text.dropFirst()))) }
        return .absolute(try parse(text))
    }
}

extension Character {
    var isASCIIDigit: Bool { isASCII && isNumber }
}
