/// Named caps on every number read from an image file, checked before anything is
/// allocated or looped on. Where QEMU has the same cap, the value is QEMU's.
public enum Limits {
    /// QEMU refuses L1 tables over 32 MiB; so do we.
    public static let maxL1Bytes: UInt64 = 32 << 20
    /// QEMU refuses refcount tables over 8 MiB; so do we.
    public static let maxRefcountTableBytes: UInt64 = 8 << 20
    /// The qcow2 spec caps backing file names at 1023 bytes.
    public static let maxBackingNameBytes: UInt64 = 1023
    /// Header extensions must fit in the first cluster; each is also capped here.
    public static let maxHeaderExtensionBytes: UInt64 = 2 << 20
    /// Most entries the inline dedup index holds (about 40 bytes each in memory, so about
    /// 80 MiB; 24 bytes each in its file; 8 GiB of distinct data at 4 KiB clusters). Past
    /// it, new clusters are not indexed: dedup ratio drops, nothing else changes.
    public static let maxDedupIndexEntries = 1 << 21
    /// Bytes of image names read when listing an RBD pool (`template list rbd:POOL`): about
    /// a million names; a larger listing is refused rather than allocated.
    public static let maxPoolListing = 64 << 20
    /// Deepest backing chain we follow.
    public static let maxBackingChainDepth = 64
    /// Largest virtual size we accept or create (QEMU's limit, 2^63 - 512 rounded to 2^62 here).
    public static let maxVirtualSize: UInt64 = 1 << 62
    /// Host offsets must lie below 2^56 (bits 9-55 of a descriptor).
    public static let maxHostOffset: UInt64 = 1 << 56
    /// Snapshot table entries we accept (QEMU's QCOW_MAX_SNAPSHOTS).
    public static let maxSnapshots: UInt64 = 65536
    /// Snapshot table size we read (QEMU's QCOW_MAX_SNAPSHOTS_SIZE).
    public static let maxSnapshotTableBytes: UInt64 = 64 << 20
    /// Snapshot names and ids (QEMU keeps them under 1 KiB; the spec allows 64 KiB).
    public static let maxSnapshotNameBytes: UInt64 = 1024
    /// Extra data per snapshot entry (QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA).
    public static let maxSnapshotExtraBytes: UInt64 = 1024
    /// Clusters of snapshot L1 tables and bitmap tables the overlap guard claims at open (a
    /// real image needs snapshots × its L1 table; a hostile one could ask for billions).
    public static let maxClaimedTableClusters: UInt64 = 1 << 20
    /// Persistent bitmaps per image (QEMU's QCOW2_MAX_BITMAPS).
    public static let maxBitmaps: UInt64 = 65535
    /// Bitmap directory size (QEMU's QCOW2_MAX_BITMAP_DIRECTORY_SIZE).
    public static let maxBitmapDirectoryBytes: UInt64 = 1024 * 65535
    /// Entries of one bitmap table (QEMU's BME_MAX_TABLE_SIZE).
    public static let maxBitmapTableEntries: UInt64 = 0x800_0000
    /// Bitmap names (QEMU's BDRV_BITMAP_MAX_NAME_SIZE).
    public static let maxBitmapNameBytes: UInt64 = 1023
    /// Bytes `check -r all` copies to separate the references a refcount width cannot count
    /// (a hostile 1-bit image could ask for billions of copies); past it, the rest stay
    /// corrupt and are reported.
    public static let maxRepairCopyBytes: UInt64 = 1 << 30
    /// In-memory storage cap (tests, fuzzing).
    public static let maxMemoryStorage: UInt64 = 1 << 30
}
