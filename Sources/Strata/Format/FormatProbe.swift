/// Image formats Strata reads and writes.
public enum ImageFormat: String, Sendable, CaseIterable {
    case qcow2, raw
}

/// What the first sector of a file says it is. Pure function on bytes; no I/O.
///
/// Strata itself opens qcow2 and raw. To keep a guest of a probed raw image from turning it
/// into another format (whose header could name any host file as its backing file), the raw
/// driver refuses writes after which this probe would no longer say raw; so it also knows the
/// signatures QEMU probes for.
public enum FormatProbe {
    /// Bytes of the first sector a probe looks at.
    public static let sectorSize = 512

    /// The format whose signature starts `sector`, or nil for raw.
    public static func signature(of sector: UnsafeRawBufferPointer) -> String? {
        func has(_ text: [UInt8], at offset: Int = 0) -> Bool {
            guard offset + text.count <= sector.count else { return false }
            for (i, b) in text.enumerated() where sector[offset + i] != b { return false }
            return true
        }
        if has([0x51, 0x46, 0x49, 0xfb]) { return "qcow2" }                     // "QFI\xfb" (qcow and qcow2)
        if has(Array("QED\0".utf8)) { return "qed" }
        if has(Array("KDMV".utf8)) || has(Array("COWD".utf8)) { return "vmdk" }
        if has(Array("# Disk DescriptorFile".utf8)) { return "vmdk" }
        if has([0x7f, 0x10, 0xda, 0xbe], at: 0x40) { return "vdi" }           // signature 0xbeda107f, little-endian
        if has(Array("vhdxfile".utf8)) { return "vhdx" }
        if has(Array("conectix".utf8)) { return "vpc" }
        if has(Array("LUKS".utf8) + [0xba, 0xbe]) { return "luks" }
        if has(Array("WithoutFreeSpace".utf8)) || has(Array("WithouFreSpacExt".utf8)) { return "parallels" }
        if has(Array("Bochs Virtual HD Image".utf8)) { return "bochs" }
        if has(Array("#!/bin/sh\n#V2.0 Format\n".utf8)) { return "cloop" }
        return nil
    }

    /// The format Strata opens a file as when none is given: qcow2 for the qcow2 magic, else raw.
    public static func format(of sector: UnsafeRawBufferPointer) -> ImageFormat {
        signature(of: sector) == "qcow2" && sector.count >= 4 ? .qcow2 : .raw
    }
}
