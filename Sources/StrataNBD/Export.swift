import Strata

/// What `NBD_CMD_TRIM` does (qemu's `--discard`).
public enum DiscardMode: String, Sendable, CaseIterable {
    /// Pass trims to the image, which frees whole clusters.
    case unmap
    /// Accept trims and do nothing; write-zeroes never deallocates either.
    case ignore
}

/// One named export: an open image shared by every connection to it.
///
/// All connections to an export use the same ``BlockDevice``, so a flush on any of them covers
/// writes made on all of them; that is what makes `NBD_FLAG_CAN_MULTI_CONN` truthful.
///
/// What an export does with a request lives in `Export+Commands.swift`; how replies are cut
/// into chunks and descriptors in `ReplyPlanning.swift`; the set of exports a server offers in
/// `ExportRegistry.swift`, which also owns the devices.
public final class Export: Sendable {
    /// The export name clients ask for.
    public let name: String
    /// Free text shown by `nbdinfo` (`NBD_INFO_DESCRIPTION`, and after the name in `NBD_OPT_LIST`).
    public let description: String?
    /// The image. Once the export is in an ``ExportRegistry``, the registry owns it and is the
    /// only one to close it.
    public let device: any BlockDevice
    /// True when writes are refused (by `--read-only` or because the image is read-only).
    public let isReadOnly: Bool
    /// What trims do.
    public let discard: DiscardMode
    /// Virtual size, read from the device each time it is asked: an image resized while it is
    /// served is seen by new handshakes and by the request validator's range check.
    public var size: UInt64 { device.size }

    /// - Parameters:
    ///   - readOnly: refuse writes even when the device accepts them.
    public init(name: String, description: String? = nil, device: any BlockDevice,
                readOnly: Bool = false, discard: DiscardMode = .unmap) {
        self.name = name
        self.description = description
        self.device = device
        self.isReadOnly = readOnly || device.isReadOnly
        self.discard = discard
    }

    /// Transmission flags for a client that did (or did not) negotiate structured replies.
    /// Every flag is a promise the command path keeps:
    /// FLUSH, FUA and CACHE always; TRIM, WRITE_ZEROES and FAST_ZERO when writable; DF with
    /// structured replies; MULTI_CONN because all connections share one device.
    public func transmissionFlags(structuredReplies: Bool) -> NBDTransmissionFlags {
        var flags: NBDTransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendCache, .canMultiConn]
        if isReadOnly {
            flags.insert(.readOnly)
        } else {
            flags.formUnion([.sendTrim, .sendWriteZeroes, .sendFastZero])
        }
        if structuredReplies { flags.insert(.sendDF) }
        return flags
    }

    /// The preferred block size we advertise: the device's natural I/O unit, made a power of
    /// two between 512 bytes and the maximum payload as the protocol requires.
    public var preferredBlockSize: UInt32 {
        let wanted = UInt32(clamping: max(device.preferredBlockSize, 512))
        var p: UInt32 = 512
        while p < wanted && p < NBDLimits.maxPayload { p <<= 1 }
        return p
    }
}
