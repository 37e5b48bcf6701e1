import Foundation
import XCTest
import Strata

/// A command that would change an image a server holds is refused with the holder's name,
/// its pid and how to act online.
final class LockHolderTests: ToolTestCase {
    func which(_ name: String) -> String? { Self.which(name) }

    /// Starts a long-running holder, and waits until `ready` exists.
    func start(_ program: String, _ args: [String], ready: String) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: program)
        p.arguments = args
        p.currentDirectoryURL = dir
        p.standardError = FileHandle.nullDevice
        p.standardOutput = FileHandle.nullDevice
        try p.run()
        for _ in 0..<250 where !FileManager.default.fileExists(atPath: path(ready)) { usleep(20_000) }
        usleep(100_000)
        return p
    }

    func stop(_ p: Process) {
        p.terminate()
        p.waitUntilExit()
    }

    func testCommandsOnAnImageHeldByQemuNBDNameIt() throws {
        guard let qemuNBD = which("qemu-nbd") else { throw XCTSkip("no qemu-nbd") }
        ok(try qemuImg("create", "-q", "-f", "qcow2", "base.qcow2", "1M"), "base")
        ok(try qemuImg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "held.qcow2"), "overlay")
        let server = try start(qemuNBD, ["-k", path("n.sock"), "-f", "qcow2", path("held.qcow2")], ready: "n.sock")
        defer { stop(server) }
        let pid = server.processIdentifier
        for args in [["resize", "held.qcow2", "2M"], ["amend", "-o", "lazy_refcounts=on", "held.qcow2"], ["commit", "held.qcow2"],
                     ["rebase", "-b", "", "held.qcow2"]] {
            assertUserError(try strata(args), mentions: ["held.qcow2", "held by qemu-nbd (pid \(pid))", "kill \(pid)"])
        }
        // Its backing file is held too (read-only, sharing no writer): a commit into it from
        // another overlay is refused, naming the same server.
        ok(try qemuImg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "other.qcow2"), "sibling")
        assertUserError(try strata("commit", "other.qcow2"), mentions: ["base.qcow2", "held by qemu-nbd (pid \(pid))"])
        stop(server)
        ok(try strata("commit", "-q", "held.qcow2"), "free once the server is gone")
    }

    func testCommandsOnAnImageHeldByStrataServeNameIt() throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "base.qcow2", "1M"), "base")
        ok(try qemuImg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "held.qcow2"), "overlay")
        let server = try start(Self.strataBinary!, ["serve", "--socket", path("s.sock"), "--export", "disk=held.qcow2"], ready: "s.sock")
        defer { stop(server) }
        let pid = server.processIdentifier
        for args in [["resize", "held.qcow2", "2M"], ["amend", "-o", "lazy_refcounts=on", "held.qcow2"], ["commit", "held.qcow2"]] {
            assertUserError(try strata(args), mentions: ["held.qcow2", "held by strata serve (pid \(pid))", "--control"])
        }
        // A read-only look is not refused.
        ok(try strata("info", "-U", "held.qcow2"), "info -U")
    }

    /// What the message advises, per kind of holder (a server's control socket comes from its
    /// command line).
    func testAdvicePerHolder() {
        let served = LockHolders.classify(pid: 99, argv: ["/usr/bin/strata", "serve", "--control", "/run/c.sock", "--export", "vm1=/d/a.qcow2"], fallbackName: "strata")
        XCTAssertEqual(served.description, "strata serve (pid 99)")
        XCTAssertTrue(served.advice.contains("strata snapshot create --server /run/c.sock vm1 NAME"), served.advice)
        let plain = LockHolders.classify(pid: 98, argv: ["strata", "serve", "--socket", "s", "a.qcow2"], fallbackName: "strata")
        XCTAssertTrue(plain.advice.contains("kill 98") && plain.advice.contains("--control"), plain.advice)
        let vm = LockHolders.classify(pid: 7, argv: ["/usr/bin/qemu-system-x86_64", "-drive", "file=a.qcow2"], fallbackName: "qemu-system-x86")
        XCTAssertEqual(vm.description, "qemu-system-x86_64 (pid 7)")
        XCTAssertTrue(vm.advice.contains("blockdev-snapshot-internal-sync") && vm.advice.contains("blockdev-snapshot-sync"), vm.advice)
        XCTAssertEqual(LockHolders.classify(pid: 5, argv: ["qemu-nbd", "x"], fallbackName: "qemu-nbd").kind, .qemuNBD)
        XCTAssertEqual(LockHolders.classify(pid: 4, argv: [], fallbackName: "qemu-io").description, "qemu-io (pid 4)")
    }

    /// fdinfo's lock lines name the inode they lock.
    func testFdinfoLockLines() {
        let text = "pos:\t0\nflags:\t02100002\nmnt_id:\t27\nino:\t16229351\nlock:\t1: OFDLCK ADVISORY  READ -1 fe:00:16229351 100 101\n"
        XCTAssertTrue(LockHolders.hasLock(text, inode: 16229351))
        XCTAssertFalse(LockHolders.hasLock(text, inode: 1622935))
        XCTAssertFalse(LockHolders.hasLock("pos:\t0\nino:\t16229351\n", inode: 16229351))
    }
}
