import Foundation
import XCTest

/// Internal snapshots, cross-checked with qemu-img both ways: what one tool creates the other
/// lists, applies and deletes; content compared with `qemu-img compare` against copies saved
/// at snapshot time; every image checked with `qemu-img check`.
final class SnapshotTests: ToolTestCase {
    /// `qemu-img check` must find no error and no leak.
    func checkClean(_ image: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try qemuImg("check", image)
        XCTAssertEqual(r.status, 0, "qemu-img check \(image):\n\(r.stdout)\(r.stderr)", file: file, line: line)
    }

    /// The snapshots as `strata snapshot list --output json` reports them.
    func snapshots(_ image: String, file: StaticString = #filePath, line: UInt = #line) throws -> [[String: Any]] {
        let r = ok(try strata("snapshot", "list", "--output", "json", image), "snapshot list", file: file, line: line)
        return json(r.stdout, file: file, line: line) as? [[String: Any]] ?? []
    }

    func fileLength(_ name: String) throws -> Int {
        (try FileManager.default.attributesOfItem(atPath: path(name))[.size] as? Int) ?? -1
    }

    func testStrataSnapshotsListApplyAndDeleteInQemuImg() throws {
        ok(try strata("create", "-q", "-f", "qcow2", "d.qcow2", "64M"), "create")
        ok(try qemuIO("-c", "write -P 1 0 2M", "-c", "write -P 2 40M 1M", "d.qcow2"), "write")
        ok(try qemuImg("convert", "-O", "raw", "d.qcow2", "first.raw"), "save")
        ok(try strata("snapshot", "create", "d.qcow2", "first"), "strata snapshot create")
        ok(try qemuIO("-c", "write -P 3 1M 2M", "-c", "write -P 4 60M 64k", "d.qcow2"), "write after")
        ok(try qemuImg("convert", "-O", "raw", "d.qcow2", "now.raw"), "save")
        ok(try strata("snapshot", "-c", "second", "d.qcow2"), "strata snapshot -c")
        try checkClean("d.qcow2")

        // QEMU lists ours with the fields it writes, and reads the snapshot's state.
        let list = ok(try qemuImg("snapshot", "-l", "d.qcow2"), "qemu-img snapshot -l").stdout
        let rows = list.split(separator: "\n").dropFirst(2).map { $0.split(separator: " ").prefix(3).joined(separator: " ") }
        XCTAssertEqual(rows, ["1 first 0", "2 second 0"], list)
        ok(try qemuImg("convert", "-l", "first", "-O", "raw", "d.qcow2", "first-by-qemu.raw"), "qemu-img convert -l")
        ok(try qemuImg("compare", "-f", "raw", "-F", "raw", "first.raw", "first-by-qemu.raw"), "the snapshot holds its state")
        // Our listing and QEMU's agree column for column (ours adds EXCLUSIVE at the end).
        let ours = ok(try strata("snapshot", "-l", "d.qcow2"), "strata snapshot -l").stdout
        XCTAssertEqual(ours.split(separator: "\n").dropFirst(2).map { String($0.prefix(79)) },
                       list.split(separator: "\n").dropFirst(2).map(String.init))
        let info = try XCTUnwrap(json(ok(try strata("info", "--output", "json", "d.qcow2"), "info").stdout) as? [String: Any])
        let theirInfo = try XCTUnwrap(json(ok(try qemuImg("info", "--output", "json", "d.qcow2"), "info").stdout) as? [String: Any])
        XCTAssertEqual(info["snapshots"] as? NSArray, theirInfo["snapshots"] as? NSArray, "info lists snapshots as qemu-img does")

        // QEMU applies ours, then deletes them; the image stays clean.
        ok(try qemuImg("snapshot", "-a", "first", "d.qcow2"), "qemu-img snapshot -a")
        ok(try qemuImg("compare", "-F", "raw", "d.qcow2", "first.raw"), "applied")
        try checkClean("d.qcow2")
        ok(try qemuImg("snapshot", "-a", "2", "d.qcow2"), "qemu-img snapshot -a by id")
        ok(try qemuImg("compare", "-F", "raw", "d.qcow2", "now.raw"), "applied by id")
        ok(try qemuImg("snapshot", "-d", "first", "d.qcow2"), "qemu-img snapshot -d")
        ok(try qemuImg("snapshot", "-d", "second", "d.qcow2"), "qemu-img snapshot -d")
        try checkClean("d.qcow2")
        XCTAssertEqual(try snapshots("d.qcow2").count, 0)
        XCTAssertEqual(ok(try strata("snapshot", "-l", "d.qcow2"), "list").stdout, "", "no snapshots: nothing, as qemu-img")
    }

    func testQemuSnapshotsListApplyAndDeleteInStrata() throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "q.qcow2", "64M"), "create")
        ok(try qemuIO("-c", "write -P 5 0 3M", "-c", "write -P 6 50M 1M", "q.qcow2"), "write")
        ok(try qemuImg("convert", "-O", "raw", "q.qcow2", "q1.raw"), "save")
        ok(try qemuImg("snapshot", "-c", "q1", "q.qcow2"), "qemu-img snapshot -c")
        ok(try qemuIO("-c", "write -P 7 2M 2M", "-c", "discard 50M 1M", "q.qcow2"), "write after")

        // convert -l reads a snapshot's state, as qemu-img convert -l does.
        ok(try strata("convert", "-l", "q1", "-O", "raw", "q.qcow2", "q1-by-strata.raw"), "strata convert -l")
        ok(try strata("convert", "-l", "snapshot.id=1", "-O", "qcow2", "q.qcow2", "q1-by-strata.qcow2"), "strata convert -l snapshot.id=")
        ok(try qemuImg("compare", "-f", "raw", "-F", "raw", "q1.raw", "q1-by-strata.raw"), "the snapshot's state")
        ok(try qemuImg("compare", "-F", "raw", "q1-by-strata.qcow2", "q1.raw"), "the snapshot's state")

        let list = try snapshots("q.qcow2")
        XCTAssertEqual(list.map { $0["name"] as? String }, ["q1"])
        XCTAssertEqual(list.first?["id"] as? String, "1")
        XCTAssertNotNil(list.first?["exclusive-bytes"] as? Int)

        ok(try strata("snapshot", "revert", "q.qcow2", "q1"), "strata snapshot revert")
        try checkClean("q.qcow2")
        ok(try qemuImg("compare", "-F", "raw", "q.qcow2", "q1.raw"), "reverted to the snapshot")
        // The disk after the revert is writable and copy-on-write toward the snapshot.
        ok(try strata("io", "-c", "write -P 9 0 1M", "q.qcow2"), "write after revert")
        ok(try qemuImg("convert", "-l", "q1", "-O", "raw", "q.qcow2", "q1-again.raw"), "snapshot state")
        ok(try qemuImg("compare", "-f", "raw", "-F", "raw", "q1-again.raw", "q1.raw"), "the snapshot did not change")
        ok(try strata("snapshot", "-d", "q1", "q.qcow2"), "strata snapshot -d")
        try checkClean("q.qcow2")
        XCTAssertEqual(try snapshots("q.qcow2").count, 0)
        ok(try qemuIO("-c", "read -P 9 0 1M", "-c", "read -P 5 1M 1M", "q.qcow2"), "active disk intact")
    }

    func testSnapshotCostFollowsMetadataAndDeletedSpaceIsReused() throws {
        ok(try strata("create", "-q", "-f", "qcow2", "big.qcow2", "1G"), "create")
        ok(try qemuIO("-c", "write -P 1 0 256M", "big.qcow2"), "256 MiB of data")
        let before = try fileLength("big.qcow2")
        ok(try strata("snapshot", "create", "big.qcow2", "s"), "snapshot")
        let grown = try fileLength("big.qcow2") - before
        XCTAssertLessThan(grown, 1 << 20, "a snapshot of 256 MiB of data grew the file by \(grown) bytes")
        try checkClean("big.qcow2")

        // Overwriting copies on write; deleting the snapshot frees the old copies.
        ok(try strata("io", "-c", "write -P 2 0 256M", "big.qcow2"), "overwrite")
        let exclusive = try XCTUnwrap(try snapshots("big.qcow2").first?["exclusive-bytes"] as? Int)
        XCTAssertGreaterThanOrEqual(exclusive, 256 << 20, "the snapshot alone holds the old data")
        ok(try strata("snapshot", "delete", "big.qcow2", "s"), "delete")
        try checkClean("big.qcow2")
        let afterDelete = try fileLength("big.qcow2")
        // New data lands in the freed clusters: the file does not grow.
        ok(try strata("io", "-c", "write -P 3 512M 200M", "big.qcow2"), "new writes")
        XCTAssertLessThanOrEqual(try fileLength("big.qcow2"), afterDelete, "freed clusters were reused")
        try checkClean("big.qcow2")
        ok(try qemuIO("-c", "read -P 2 0 256M", "-c", "read -P 3 512M 200M", "big.qcow2"), "content")
    }

    func testExclusiveBytesAreWhatDeletingFrees() throws {
        ok(try strata("create", "-q", "-f", "qcow2", "e.qcow2", "128M"), "create")
        ok(try qemuIO("-c", "write -P 1 0 16M", "e.qcow2"), "write")
        ok(try strata("snapshot", "create", "e.qcow2", "a"), "a")
        ok(try qemuIO("-c", "write -P 2 0 4M", "-c", "write -P 2 32M 2M", "e.qcow2"), "write")
        ok(try strata("snapshot", "create", "e.qcow2", "b"), "b")
        ok(try qemuIO("-c", "write -P 3 2M 4M", "e.qcow2"), "write")
        ok(try strata("snapshot", "create", "e.qcow2", "c"), "c")
        ok(try qemuIO("-c", "write -P 4 8M 1M", "e.qcow2"), "write")
        // Delete in an order that exercises shared and exclusive clusters; each time the
        // figure reported for the snapshot equals the bytes the file gives back.
        for name in ["b", "a", "c"] {
            let list = try snapshots("e.qcow2")
            let exclusive = try XCTUnwrap(list.first { $0["name"] as? String == name }?["exclusive-bytes"] as? Int)
            let before = dataBytes("e.qcow2")
            ok(try strata("snapshot", "delete", "e.qcow2", name), "delete \(name)")
            XCTAssertEqual(before - (dataBytes("e.qcow2")), exclusive, "snapshot \(name)")
            try checkClean("e.qcow2")
        }
    }

    func testMistakesGetOneClearLine() throws {
        ok(try strata("create", "-q", "-f", "qcow2", "m.qcow2", "1M"), "create")
        ok(try strata("snapshot", "create", "m.qcow2", "x"), "create x")
        assertUserError(try strata("snapshot", "create", "m.qcow2", "x"), mentions: ["'x' exists already"])
        assertUserError(try strata("snapshot", "delete", "m.qcow2", "nope"), mentions: ["nope"])
        assertUserError(try strata("snapshot", "revert", "m.qcow2", "nope"), mentions: ["nope"])
        assertUserError(try strata("snapshot", "create", "m.qcow2"), mentions: ["snapshot name"])
        assertUserError(try strata("snapshot", "-c", "y", "-d", "x", "m.qcow2"), mentions: ["only one"])
        assertUserError(try strata("snapshot", "-c", "y"), mentions: ["image file"])
        assertUserError(try strata("snapshot", "-c", "y", "-c", "z", "m.qcow2"), mentions: ["only one"])
        assertUserError(try strata("snapshot", "frobnicate", "m.qcow2"), mentions: ["'frobnicate' is not an action"])
        assertUserError(try strata("snapshot", "list", "missing.qcow2"), mentions: ["missing.qcow2"])
        assertUserError(try strata("snapshot", "external", "m.qcow2", "top.qcow2"), mentions: ["--server", "strata create -f qcow2 -b m.qcow2"])
        assertUserError(try strata("snapshot", "list", "--server", "no-such.sock", "m"), mentions: ["no-such.sock"])
        try truncate("r.img", to: 1 << 20)
        assertUserError(try strata("snapshot", "create", "-f", "raw", "r.img", "x"), mentions: ["raw"])
        XCTAssertEqual(try snapshots("m.qcow2").count, 1, "nothing changed")
        try checkClean("m.qcow2")
    }

    func testBadSnapshotTableIsReportedAndTheDiskStillReads() throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "b.qcow2", "4M"), "create")
        ok(try qemuIO("-c", "write -P 8 0 1M", "b.qcow2"), "write")
        ok(try qemuImg("snapshot", "-c", "s", "b.qcow2"), "snapshot")
        // nb_snapshots (header bytes 60-63) = 1000: the table runs past its cluster and the
        // entries after the first are garbage.
        try write("b.qcow2", [0, 0, 0x03, 0xe8], at: 60)
        let r = try strata("snapshot", "list", "b.qcow2")
        assertUserError(r, mentions: ["snapshot table"])
        ok(try strata("io", "-c", "read -P 8 0 1M", "b.qcow2"), "the active disk reads")
        assertUserError(try strata("snapshot", "create", "b.qcow2", "t"), mentions: ["snapshot table"])
    }
}
