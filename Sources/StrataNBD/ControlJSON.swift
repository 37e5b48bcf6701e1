/// A JSON value as the control socket carries it: objects keep their key order (replies print
/// fields in a stable order), numbers are integers or doubles.
///
/// The parser is for one line from an untrusted peer: the input is already bounded by
/// ``ControlLimits/maxLineBytes``; nesting is bounded by ``ControlLimits/maxDepth``; any
/// error is a ``ControlJSON/ParseError`` carrying the byte offset, never a trap.
public indirect enum ControlJSON: Sendable, Equatable {
    case object([(String, ControlJSON)])
    case array([ControlJSON])
    case string(String)
    case int(Int64)
    case double(Double)
    case bool(Bool)
    case null

    public static func == (a: ControlJSON, b: ControlJSON) -> Bool { a.text == b.text }

    /// Why a line is not JSON, and where.
    public struct ParseError: Error, Equatable, CustomStringConvertible {
        public var offset: Int
        public var reason: String
        public var description: String { "invalid JSON at byte \(offset): \(reason)" }
    }

    // MARK: Access

    /// The value of `key` in an object (nil for a missing key or a non-object).
    public subscript(key: String) -> ControlJSON? {
        guard case .object(let fields) = self else { return nil }
        return fields.first { $0.0 == key }?.1
    }

    public var stringValue: String? { if case .string(let s) = self { return s } else { return nil } }
    public var boolValue: Bool? { if case .bool(let b) = self { return b } else { return nil } }
    public var intValue: Int64? {
        switch self {
        case .int(let i): return i
        case .double(let d) where d.rounded() == d && abs(d) < 9e15: return Int64(d)
        default: return nil
        }
    }
    public var arrayValue: [ControlJSON]? { if case .array(let a) = self { return a } else { return nil } }
    public var objectValue: [(String, ControlJSON)]? { if case .object(let o) = self { return o } else { return nil } }

    // MARK: Text

    /// One line of compact JSON (`{"a": 1, "b": [true, null]}`), no newline.
    public var text: String {
        var out = ""
        write(into: &out)
        return out
    }

    private func write(into out: inout String) {
        switch self {
        case .object(let fields):
            out += "{"
            for (i, (k, v)) in fields.enumerated() {
                if i > 0 { out += ", " }
                Self.quote(k, into: &out)
                out += ": "
                v.write(into: &out)
            }
            out += "}"
        case .array(let items):
            out += "["
            for (i, v) in items.enumerated() {
                if i > 0 { out += ", " }
                v.write(into: &out)
            }
            out += "]"
        case .string(let s): Self.quote(s, into: &out)
        case .int(let i): out += String(i)
        case .double(let d): out += d.isFinite ? "\(d)" : "null"
        case .bool(let b): out += b ? "true" : "false"
        case .null: out += "null"
        }
    }

    private static func quote(_ s: String, into out: inout String) {
        out += "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where u.value < 0x20:
                let hex = String(u.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(u)
            }
        }
        out += "\""
    }

    // MARK: Parsing

    /// Parses one complete JSON value (surrounding whitespace allowed).
    public static func parse(_ bytes: some Collection<UInt8>) throws(ParseError) -> ControlJSON {
        var p = Parser(bytes: Array(bytes))
        p.skipSpace()
        let v = try p.value(depth: 0)
        p.skipSpace()
        guard p.pos == p.bytes.count else { throw p.fail("unexpected text after the value") }
        return v
    }

    public static func parse(_ text: String) throws(ParseError) -> ControlJSON {
        try parse(Array(text.utf8))
    }

    private struct Parser {
        let bytes: [UInt8]
        var pos = 0

        func fail(_ why: String) -> ParseError { ParseError(offset: pos, reason: why) }

        mutating func skipSpace() {
            while pos < bytes.count, [0x20, 0x09, 0x0A, 0x0D].contains(bytes[pos]) { pos += 1 }
        }

        mutating func literal(_ word: String, _ v: ControlJSON) throws(ParseError) -> ControlJSON {
            let w = Array(word.utf8)
            guard pos + w.count <= bytes.count, Array(bytes[pos..<(pos + w.count)]) == w else { throw fail("unknown literal") }
            pos += w.count
            return v
        }

        mutating func value(depth: Int) throws(ParseError) -> ControlJSON {
            guard pos < bytes.count else { throw fail("unexpected end of input") }
            if bytes[pos] == UInt8(ascii: "{") || bytes[pos] == UInt8(ascii: "[") {
                guard depth < ControlLimits.maxDepth else { throw fail("nested deeper than \(ControlLimits.maxDepth) levels") }
            }
            switch bytes[pos] {
            case UInt8(ascii: "{"):
                pos += 1
                var fields: [(String, ControlJSON)] = []
                skipSpace()
                if pos < bytes.count, bytes[pos] == UInt8(ascii: "}") { pos += 1; return .object(fields) }
                while true {
                    skipSpace()
                    guard pos < bytes.count, bytes[pos] == UInt8(ascii: "\"") else { throw fail("expected a key string") }
                    let key = try string()
                    skipSpace()
                    guard pos < bytes.count, bytes[pos] == UInt8(ascii: ":") else { throw fail("expected ':'") }
                    pos += 1
                    skipSpace()
                    let v = try value(depth: depth + 1)
                    guard !fields.contains(where: { $0.0 == key }) else { throw fail("duplicate key '\(key.prefix(64))'") }
                    fields.append((key, v))
                    skipSpace()
                    guard pos < bytes.count else { throw fail("unterminated object") }
                    if bytes[pos] == UInt8(ascii: ",") { pos += 1; continue }
                    if bytes[pos] == UInt8(ascii: "}") { pos += 1; return .object(fields) }
                    throw fail("expected ',' or '}'")
                }
            case UInt8(ascii: "["):
                pos += 1
                var items: [ControlJSON] = []
                skipSpace()
                if pos < bytes.count, bytes[pos] == UInt8(ascii: "]") { pos += 1; return .array(items) }
                while true {
                    skipSpace()
                    items.append(try value(depth: depth + 1))
                    skipSpace()
                    guard pos < bytes.count else { throw fail("unterminated array") }
                    if bytes[pos] == UInt8(ascii: ",") { pos += 1; continue }
                    if bytes[pos] == UInt8(ascii: "]") { pos += 1; return .array(items) }
                    throw fail("expected ',' or ']'")
                }
            case UInt8(ascii: "\""): return .string(try string())
            case UInt8(ascii: "t"): return try literal("true", .bool(true))
            case UInt8(ascii: "f"): return try literal("false", .bool(false))
            case UInt8(ascii: "n"): return try literal("null", .null)
            case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try number()
            default: throw fail("unexpected character")
            }
        }

        mutating func number() throws(ParseError) -> ControlJSON {
            let start = pos
            var isInt = true
            if bytes[pos] == UInt8(ascii: "-") { pos += 1 }
            while pos < bytes.count {
                let c = bytes[pos]
                if c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9") { pos += 1; continue }
                if c == UInt8(ascii: ".") || c == UInt8(ascii: "e") || c == UInt8(ascii: "E")
                    || c == UInt8(ascii: "+") || c == UInt8(ascii: "-") { isInt = false; pos += 1; continue }
                break
            }
            let text = String(decoding: bytes[start..<pos], as: UTF8.self)
            if isInt, let i = Int64(text) { return .int(i) }
            guard let d = Double(text), d.isFinite else { pos = start; throw fail("invalid number") }
            return .double(d)
        }

        mutating func hex4() throws(ParseError) -> UInt32 {
            guard pos + 4 <= bytes.count, let v = UInt32(String(decoding: bytes[pos..<(pos + 4)], as: UTF8.self), radix: 16)
            else { throw fail("invalid \\u escape") }
            pos += 4
            return v
        }

        mutating func string() throws(ParseError) -> String {
            pos += 1  // the opening quote
            var out: [UInt8] = []
            while true {
                guard pos < bytes.count else { throw fail("unterminated string") }
                let c = bytes[pos]
                pos += 1
                switch c {
                case UInt8(ascii: "\""):
                    guard let s = String(validating: out, as: UTF8.self) else { throw fail("string is not valid UTF-8") }
                    return s
                case UInt8(ascii: "\\"):
                    guard pos < bytes.count else { throw fail("unterminated string") }
                    let e = bytes[pos]
                    pos += 1
                    switch e {
                    case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): out.append(e)
                    case UInt8(ascii: "n"): out.append(0x0A)
                    case UInt8(ascii: "r"): out.append(0x0D)
                    case UInt8(ascii: "t"): out.append(0x09)
                    case UInt8(ascii: "b"): out.append(0x08)
                    case UInt8(ascii: "f"): out.append(0x0C)
                    case UInt8(ascii: "u"):
                        var v = try hex4()
                        if (0xD800..<0xDC00).contains(v) {
                            guard pos + 2 <= bytes.count, bytes[pos] == UInt8(ascii: "\\"), bytes[pos + 1] == UInt8(ascii: "u")
                            else { throw fail("unpaired surrogate") }
                            pos += 2
                            let low = try hex4()
                            guard (0xDC00..<0xE000).contains(low) else { throw fail("unpaired surrogate") }
                            v = 0x10000 + ((v - 0xD800) << 10) + (low - 0xDC00)
                        }
                        guard let scalar = Unicode.Scalar(v) else { throw fail("invalid \\u escape") }
                        out.append(contentsOf: Array(String(Character(scalar)).utf8))
                    default: throw fail("invalid escape")
                    }
                case 0..<0x20: throw fail("control character in a string")
                default: out.append(c)
                }
            }
        }
    }
}
