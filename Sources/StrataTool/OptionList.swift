/// A `-o key=value,key=value` list as qemu-img reads it: entries in order, `,,` stands for a
/// literal comma, several `-o` flags add up, and a later key overrides an earlier one.
/// `-o help` (or `-o ?`) asks for the list of options instead.
struct OptionList: Equatable {
    struct Entry: Equatable {
        var key: String
        var value: String
    }

    private(set) var entries: [Entry] = []
    /// True when one of the entries was `help` or `?`.
    private(set) var wantsHelp = false

    init() {}

    /// Parses every `-o` argument in order; `file` (the image the options are for) is named
    /// in errors about an entry.
    init(parsing texts: [String], file: String) throws {
        for text in texts { try add(text, file: file) }
    }

    private mutating func add(_ text: String, file: String) throws {
        guard Self.isValidList(text) else { throw CLIError.badOptionList(text) }
        for item in Self.split(text) {
            if item == "help" || item == "?" { wantsHelp = true; continue }
            guard let eq = item.firstIndex(of: "=") else {
                throw CLIError.badOption(file: file, entry: item, reason: "expected key=value")
            }
            let key = String(item[..<eq])
            guard !key.isEmpty else { throw CLIError.badOption(file: file, entry: item, reason: "empty option name") }
            set(key, String(item[item.index(after: eq)...]))
        }
    }

    /// qemu-img's test for a usable `-o` argument: not empty, no leading comma, and not ending
    /// in an unescaped comma (an odd run of trailing commas). What passes splits into entries
    /// that are never empty.
    static func isValidList(_ text: String) -> Bool {
        guard let first = text.first, first != "," else { return false }
        let trailingCommas = text.reversed().prefix { $0 == "," }.count
        return trailingCommas % 2 == 0
    }

    /// Sets (or replaces) one key.
    mutating func set(_ key: String, _ value: String) {
        if let i = entries.firstIndex(where: { $0.key == key }) {
            entries[i].value = value
        } else {
            entries.append(Entry(key: key, value: value))
        }
    }

    /// The value of `key`, if given.
    subscript(key: String) -> String? { entries.first { $0.key == key }?.value }

    /// Splits on single commas; `,,` is an escaped comma.
    static func split(_ text: String) -> [String] {
        var items: [String] = []
        var current = ""
        var chars = Array(text)[...]
        while let c = chars.popFirst() {
            if c == "," {
                if chars.first == "," { current.append(","); chars.removeFirst(); continue }
                items.append(current)
                current = ""
            } else {
                current.append(c)
            }
        }
        items.append(current)
        return items
    }

    /// Reads an on/off value the way qemu does (`on`/`off`, also `yes`/`no`, `true`/`false`).
    static func parseBool(_ value: String) -> Bool? {
        switch value {
        case "on", "yes", "true", "y": return true
        case "off", "no", "false", "n": return false
        default: return nil
        }
    }
}
