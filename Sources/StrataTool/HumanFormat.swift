#if canImport(Glibc)
import Glibc
#endif

/// Human-readable numbers, spelled exactly as qemu-img and qemu-io spell them.
enum HumanFormat {
    /// printf-style formatting through the C library (so `%0.3g`, `%#-16llx` behave as in QEMU).
    static func c(_ format: String, _ args: CVarArg...) -> String {
        withVaList(args) { va in
            var buffer = [CChar](repeating: 0, count: 256)
            let n = buffer.withUnsafeMutableBufferPointer { vsnprintf($0.baseAddress, $0.count, format, va) }
            if n >= 256 {
                buffer = [CChar](repeating: 0, count: Int(n) + 1)
                return withVaList(args) { va2 in
                    buffer.withUnsafeMutableBufferPointer { _ = vsnprintf($0.baseAddress, $0.count, format, va2) }
                    return String(cString: buffer)
                }
            }
            return String(cString: buffer)
        }
    }

    /// qemu-img's `size_to_str`: three significant digits and a binary unit, switching to the
    /// next unit from 1000 on ("10 MiB", "452 KiB", "1000 B" → "0.977 KiB").
    static func size(_ value: UInt64) -> String {
        let suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
        var exponent: Int32 = 0
        _ = frexp(Double(value) / (1000.0 / 1024.0), &exponent)
        let i = Int((exponent - 1) / 10)
        let divisor = Double(UInt64(1) << UInt64(i * 10))
        return c("%0.3g ", Double(value) / divisor) + suffixes[i] + "B"
    }

    /// qemu-io's `cvtstr`: "64 KiB", "40 bytes", "1.317 GiB".
    static func ioSize(_ value: Double) -> String {
        let units: [(Double, String)] = [(0x1p60, " EiB"), (0x1p50, " PiB"), (0x1p40, " TiB"),
                                         (0x1p30, " GiB"), (0x1p20, " MiB"), (0x1p10, " KiB")]
        var text: String
        var suffix = " bytes"
        if let (unit, name) = units.first(where: { value >= $0.0 }) {
            text = c("%.3f", value / unit)
            suffix = name
        } else {
            text = c("%f", value)
        }
        // C's strstr(".000") and cut there.
        let chars = Array(text)
        if let i = (0..<max(0, chars.count - 3)).first(where: { chars[$0] == "." && chars[$0 + 1] == "0" && chars[$0 + 2] == "0" && chars[$0 + 3] == "0" }) {
            text = String(chars[..<i])
        }
        return text + suffix
    }

    /// qemu-io's elapsed time: "00.01 sec" under a second, else "H:MM:SS.ss".
    static func ioTime(_ seconds: Double) -> String {
        if seconds < 1 { return c("%05.2f sec", seconds) }
        let whole = UInt32(seconds)
        let frac = seconds - Double(whole)
        return c("%u:%02u:%05.2f", whole / 3600, (whole % 3600) / 60, Double(whole % 60) + frac)
    }

    /// qemu-io's `-v` dump: `00000010:  41 41 …  AAAA…` (16 bytes a line, alnum or '.').
    static func hexdump(_ bytes: UnsafeRawBufferPointer, offset: UInt64) -> String {
        var out = ""
        var i = 0
        while i < bytes.count {
            let end = min(i + 16, bytes.count)
            out += c("%08llx:  ", UInt64(offset) + UInt64(i))
            for j in i..<end { out += c("%02x ", bytes[j]) }
            out += " "
            for j in i..<end {
                let b = bytes[j]
                let isAlnum = (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5a) || (b >= 0x61 && b <= 0x7a)
                out.unicodeScalars.append(isAlnum ? Unicode.Scalar(b) : ".")
            }
            out += "\n"
            i = end
        }
        return out
    }

    /// `%#-16llx`: "0x10000" padded to 16, and a bare "0" for zero (C's `#` flag).
    static func mapHex(_ value: UInt64) -> String { c("%#-16llx", value) }
}
