import Strata

// Stand-ins for the engine's internal snapshot API, which is being written on main with these
// signatures. Delete this file when merging it.
extension Qcow2Image {
    func createSnapshot(name: String) throws -> SnapshotRecord {
        throw ControlError("internal snapshots are not supported by this build's engine yet")
    }
    func deleteSnapshot(_ idOrName: String) throws -> SnapshotRecord {
        throw ControlError("internal snapshots are not supported by this build's engine yet")
    }
    func snapshotUsage() throws -> [UInt64] { snapshots.map { _ in 0 } }
}
