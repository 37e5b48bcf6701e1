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

    /// Parses every `-o` argument in order.
    init(parsing texts: [String]) throws {
        for text in texts { try add(text) }
    }

    private mutating func add(_ text: String) throws {
        for item in Self.split(text) {
            if item.isEmpty { continue }
            if item == "help" || item == "?" { wantsHelp = true; continue }
            guard let eq = item.firstIndex(of: "=") else {
                throw CLIError.badOption(item, reason: "expected key=value")
            }
            let key = String(item[..<eq])
            guard !key.isEmpty else { throw CLIError.badOption(item, reason: "empty option name") }
            set(key, String(item[item.index(after: eq)...]))
        }
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
