/// A JSON value with ordered object keys, printed the way QEMU's `qobject_to_json_pretty`
/// prints (4-space indent, `"key": value`), so `--output json` matches qemu-img byte for byte
/// where the fields agree.
indirect enum JSONValue: Equatable {
    case object([(String, JSONValue)])
    case array([JSONValue])
    case string(String)
    case int(Int64)
    case uint(UInt64)
    case bool(Bool)

    static func == (a: JSONValue, b: JSONValue) -> Bool { a.compact == b.compact }

    /// Pretty text as QEMU prints it, without a trailing newline.
    var pretty: String {
        var out = ""
        write(into: &out, indent: 0, pretty: true)
        return out
    }

    /// One-line text (`{"a": 1, "b": 2}`).
    var compact: String {
        var out = ""
        write(into: &out, indent: 0, pretty: false)
        return out
    }

    private func write(into out: inout String, indent: Int, pretty: Bool) {
        let pad = String(repeating: " ", count: (indent + 1) * 4)
        let closePad = String(repeating: " ", count: indent * 4)
        switch self {
        case .object(let fields):
            if fields.isEmpty { out += "{}"; return }
            out += pretty ? "{\n" : "{"
            for (i, (key, value)) in fields.enumerated() {
                if pretty { out += pad }
                out += Self.quote(key) + ": "
                value.write(into: &out, indent: indent + 1, pretty: pretty)
                if i < fields.count - 1 { out += pretty ? ",\n" : ", " }
            }
            out += pretty ? "\n" + closePad + "}" : "}"
        case .array(let items):
            // QEMU prints an empty list over two lines, the bracket at the key's indent.
            if items.isEmpty { out += pretty ? "[\n" + closePad + "]" : "[]"; return }
            out += pretty ? "[\n" : "["
            for (i, value) in items.enumerated() {
                if pretty { out += pad }
                value.write(into: &out, indent: indent + 1, pretty: pretty)
                if i < items.count - 1 { out += pretty ? ",\n" : ", " }
            }
            out += pretty ? "\n" + closePad + "]" : "]"
        case .string(let s): out += Self.quote(s)
        case .int(let n): out += String(n)
        case .uint(let n): out += String(n)
        case .bool(let b): out += b ? "true" : "false"
        }
    }

    /// JSON string quoting (control characters as `\uXXXX`).
    static func quote(_ s: String) -> String {
        var out = "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case "\u{08}": out += "\\b"
            case "\u{0C}": out += "\\f"
            default:
                if scalar.value < 0x20 {
                    let hex = String(scalar.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        return out + "\""
    }
}
