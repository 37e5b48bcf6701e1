import Foundation
import XCTest
import TestSupport

/// Images in a Ceph pool (`rbd:strata/…`), on the throw-away cluster `scripts/test.sh` starts,
/// with QEMU's own rbd driver (`qemu-block-extra`) as the oracle. Without a cluster these
/// tests fail and say why.
final class RBDTests: ToolTestCase {
    var conf = ""
    var made: [String] = []

    override func setUpWithError() throws {
        try super.setUpWithError()
        conf = try Ceph.conf()
    }

    override func tearDownWithError() throws {
        try super.tearDownWithError()   // servers first: they hold the images
        Ceph.remove(made, conf: conf)
    }

    /// A fresh image name in the pool, removed after the test.
    func rbd(_ tag: String) -> String {
        let n = Ceph.name(tag, conf: conf)
        made.append(n)
        return n
    }

    func testQemuAndStrataReadEachOthersImagesInAPool() throws {
        // Strata writes, QEMU checks and reads.
        let mine = rbd("mine")
        ok(try strata("create", "-q", "-f", "qcow2", mine, "64M"), "create")
        ok(try strata("io", "-c", "write -P 0x5a 0 3M", "-c", "write -P 0x11 40M 64k", "-c", "write -z 1M 64k", mine), "strata io")
        let check = try qemuImg("check", "-f", "qcow2", mine)
        XCTAssertEqual(check.status, 0, "qemu-img check: \(check.stdout)\(check.stderr)")
        XCTAssertTrue(check.stdout.contains("No errors were found"), check.stdout)
        ok(try qemuIO("-f", "qcow2", "-c", "read -P 0x5a 0 1M", "-c", "read -P 0 1M 64k", "-c", "read -P 0x11 40M 64k", mine), "qemu-io read")
        ok(try qemuImg("convert", "-f", "qcow2", "-O", "raw", mine, "q.raw"), "qemu-img convert")
        ok(try strata("convert", "-O", "raw", mine, "s.raw"), "strata convert")
        XCTAssertEqual(try contents("q.raw"), try contents("s.raw"))

        // QEMU writes, Strata checks and reads.
        let theirs = rbd("theirs")
        ok(try qemuImg("create", "-f", "qcow2", theirs, "64M"), "qemu-img create")
        ok(try qemuIO("-f", "qcow2", "-c", "write -P 0x77 5M 2M", "-c", "write -P 0x78 63M 1M", theirs), "qemu-io write")
        ok(try strata("check", theirs), "strata check")
        ok(try strata("io", "-c", "read -P 0x77 5M 2M", "-c", "read -P 0x78 63M 1M", "-c", "read -P 0 0 5M", theirs), "strata read")
        ok(try qemuImg("convert", "-f", "qcow2", "-O", "raw", theirs, "q2.raw"), "qemu-img convert")
        let cmp = try strata("compare", "q2.raw", theirs)
        XCTAssertEqual(cmp.status, 0, cmp.stdout + cmp.stderr)

        // A raw image in the pool, and convert into the pool.
        let raw = rbd("raw")
        ok(try strata("convert", "-O", "raw", "q2.raw", raw), "convert into the pool")
        ok(try qemuImg("compare", "-f", "raw", "-F", "raw", "q2.raw", raw), "qemu-img compare")
        let info = try strata("info", "--output", "json", mine)
        XCTAssertTrue(info.stdout.contains("\"format\": \"qcow2\""), info.stdout)
    }

    func testASecondWriterIsRefusedNamingTheHolder() throws {
        let image = rbd("held")
        ok(try strata("create", "-q", "-f", "qcow2", image, "16M"), "create")
        let server = try serve(image, socket: "s.sock")
        let second = try strata("io", "-c", "write 0 4k", image)
        XCTAssertEqual(second.status, 1)
        XCTAssertTrue(second.stderr.contains("RBD exclusive lock") && second.stderr.contains("held by"), second.stderr)
        XCTAssertFalse(second.stderr.contains("held by another client"), "the holder is named: \(second.stderr)")
        // Readers need no lock.
        ok(try strata("info", image), "info while served")
        let q = try qemuIO("-f", "qcow2", "-c", "write 0 4k", image)
        XCTAssertNotEqual(q.status, 0, "qemu-io wrote an image Strata serves: \(q.stdout)")
        server.terminate()
        server.waitUntilExit()
        ok(try strata("io", "-c", "write -P 3 0 4k", image), "write after the server stopped")
        ok(try qemuImg("check", "-f", "qcow2", image), "check")
    }

    /// Two hosts: two servers, one template in the pool, a linked clone each, each written by
    /// its own client at the same time.
    func testTwoServersServeClonesOfOneTemplate() throws {
        let base = rbd("base"), template = rbd("tmpl"), c1 = rbd("c1"), c2 = rbd("c2")
        ok(try strata("create", "-q", "-f", "qcow2", base, "32M"), "create")
        ok(try strata("io", "-c", "write -P 0x40 0 32M", base), "fill")
        ok(try strata("template", "create", base, template), "template")
        ok(try strata("clone", template, c1), "clone 1")
        ok(try strata("clone", template, c2), "clone 2")
        let before = try qemuImg("convert", "-f", "qcow2", "-O", "raw", template, "t-before.raw")
        XCTAssertEqual(before.status, 0, before.stderr)

        let a = try serve(c1, socket: "a.sock"), b = try serve(c2, socket: "b.sock")
        var writers: [Process] = []
        for (socket, pattern) in [("a.sock", 0x61), ("b.sock", 0x62)] {
            var args = ["-f", "raw"]
            for i in 0..<16 { args += ["-c", "write -P \(pattern) \(i * 2)M 1M"] }
            args += ["-c", "flush", "nbd+unix:///disk?socket=\(path(socket))"]
            writers.append(try spawn(Self.qemuIO!, args, log: "\(socket).io.log"))
        }
        for w in writers { w.waitUntilExit(); XCTAssertEqual(w.terminationStatus, 0) }
        // Each server reads its clone back through the template.
        for (socket, pattern) in [("a.sock", 0x61), ("b.sock", 0x62)] {
            ok(try qemuIO("-f", "raw", "-c", "read -P \(pattern) 0 1M", "-c", "read -P 0x40 1M 1M",
                          "nbd+unix:///disk?socket=\(path(socket))"), "read through \(socket)")
        }
        // Overwrites of what a clone owns, without FUA (qemu-io's default writethrough mode
        // sends FUA): started from the event loop, read back at once.
        ok(try qemuIO("-t", "writeback", "-f", "raw", "-c", "write -P 0x63 4k 8k", "-c", "read -P 0x63 4k 8k", "-c", "read -P 0x61 0 4k",
                      "-c", "read -P 0x61 12k 4k", "nbd+unix:///disk?socket=\(path("a.sock"))"), "overwrite through a.sock")
        for s in [a, b] { s.terminate(); s.waitUntilExit() }
        for (clone, pattern) in [(c1, 0x61), (c2, 0x62)] {
            let check = try qemuImg("check", "-f", "qcow2", clone)
            XCTAssertEqual(check.status, 0, "qemu-img check: \(check.stdout)\(check.stderr)")
            ok(try qemuIO("-f", "qcow2", "-c", "read -P \(pattern) 30M 1M", "-c", "read -P 0x40 31M 1M", clone), "qemu reads the clone")
        }
        ok(try qemuIO("-f", "qcow2", "-c", "read -P 0x63 4k 8k", c1), "qemu reads the overwrite")
        ok(try qemuImg("convert", "-f", "qcow2", "-O", "raw", template, "t-after.raw"), "template after")
        XCTAssertEqual(try contents("t-before.raw"), try contents("t-after.raw"), "the template changed under its clones")
        // And it is still a template: no writer may open it.
        let w = try strata("io", "-c", "write 0 4k", template)
        XCTAssertEqual(w.status, 1, w.stderr)
        // template list finds it and its clones in the pool (and the scratch folder, empty).
        let list = ok(try strata("template", "list", "--output", "json", "rbd:\(Ceph.pool):conf=\(conf)", "."), "template list")
        let doc = json(list.stdout) as? [String: Any]
        let entry = (doc?["templates"] as? [[String: Any]])?.first { $0["filename"] as? String == template }
        let clones = (entry?["clones"] as? [[String: Any]])?.compactMap { $0["filename"] as? String } ?? []
        XCTAssertEqual(Set(clones), [c1, c2], list.stdout)
        XCTAssertNil(entry?["disk-size"], "RBD gives no disk size: \(list.stdout)")
    }

    /// A server killed with kill -9 while a client writes: another server (another host)
    /// takes the image over once Ceph lets the dead one's lock go, every flushed write is
    /// there, and the image has at most leaked clusters, which `check -r leaks` frees.
    func testKilledServerLosesNoFlushedWrite() throws {
        let image = rbd("crash")
        ok(try strata("create", "-q", "-f", "qcow2", image, "64M"), "create")
        let first = try serve(image, socket: "a.sock")
        let uri = { (s: String) in "nbd+unix:///disk?socket=\(self.path(s))" }
        ok(try qemuIO("-f", "raw", "-c", "write -P 0x71 0 8M", "-c", "write -P 0x72 20M 64k", "-c", "flush", uri("a.sock")), "flushed writes")
        var args = ["-f", "raw"]
        for i in 0..<64 { args += ["-c", "write -P 0x73 \(32 + (i % 32))M 512k"] }
        let writer = try spawn(Self.qemuIO!, args + [uri("a.sock")], log: "writer.log")
        usleep(300_000)
        kill(first.processIdentifier, SIGKILL)
        first.waitUntilExit()
        writer.waitUntilExit()

        // The second server retries until the dead client's lock can be broken.
        var second: Process? = nil
        let deadline = Date().addingTimeInterval(90)
        while second == nil && Date() < deadline {
            let p = try serve(image, socket: "b.sock", mayFail: true)
            if p.isRunning { second = p } else { sleep(2) }
        }
        guard let second else { return XCTFail("no second server could take the image: \(log("serve-b.sock.log"))") }
        ok(try qemuIO("-f", "raw", "-c", "read -P 0x71 0 8M", "-c", "read -P 0x72 20M 64k", uri("b.sock")), "flushed data after the crash")
        second.terminate()
        second.waitUntilExit()
        // A crash may leak clusters (allocated for writes that never completed: exit 3), never
        // corrupt the image (exit 2); freeing the leaks leaves it clean for both checkers.
        let check = try strata("check", image)
        XCTAssertTrue(check.status == 0 || check.status == 3, "strata check after the crash: \(check.stdout)\(check.stderr)")
        if check.status == 3 { ok(try strata("check", "-r", "leaks", image), "check -r leaks") }
        let clean = try strata("check", image)
        XCTAssertEqual(clean.status, 0, "strata check: \(clean.stdout)\(clean.stderr)")
        ok(try qemuImg("check", "-f", "qcow2", image), "qemu-img check")
        ok(try qemuIO("-f", "qcow2", "-c", "read -P 0x71 0 8M", "-c", "read -P 0x72 20M 64k", image), "flushed data after the repair")
    }

    /// The commands the tests above do not run, each once on images in the pool, with QEMU
    /// checking the results.
    func testEveryCommandTakesAnRBDName() throws {
        let base = rbd("cmd-base"), top = rbd("cmd-top")
        ok(try strata("create", "-q", "-f", "qcow2", base, "8M"), "create")
        ok(try strata("io", "-c", "write -P 0x21 0 1M", base), "io")
        ok(try strata("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top), "create with an rbd: backing file")
        ok(try strata("io", "-c", "write -P 0x22 1M 1M", top), "io on the overlay")
        let map = ok(try strata("map", "--output", "json", top), "map")
        XCTAssertTrue(map.stdout.contains("\"depth\": 1"), map.stdout)
        let chain = ok(try strata("info", "--backing-chain", top), "info --backing-chain")
        XCTAssertTrue(chain.stdout.contains(Ceph.image(of: base)), chain.stdout)
        ok(try strata("snapshot", "-c", "s1", top), "snapshot -c")
        ok(try strata("io", "-c", "write -P 0x23 1M 64k", top), "write after the snapshot")
        XCTAssertTrue(ok(try strata("snapshot", "-l", top), "snapshot -l").stdout.contains("s1"))
        ok(try strata("snapshot", "-a", "s1", top), "snapshot -a")
        ok(try qemuIO("-f", "qcow2", "-c", "read -P 0x22 1M 64k", top), "the snapshot's data is back")
        ok(try strata("snapshot", "-d", "s1", top), "snapshot -d")
        ok(try strata("resize", top, "16M"), "resize")
        XCTAssertEqual(try virtualSize(top), 16 << 20)
        ok(try strata("amend", "-o", "lazy_refcounts=on", top), "amend")
        ok(try strata("measure", "-O", "qcow2", top), "measure")
        ok(try strata("bench", "-c", "200", "-s", "4k", top), "bench")
        ok(try strata("commit", top), "commit")
        ok(try qemuIO("-f", "qcow2", "-c", "read -P 0x21 0 1M", "-c", "read -P 0x22 1M 1M", base), "committed into the base")
        ok(try strata("rebase", "-u", "-b", "", top), "rebase onto nothing")
        ok(try strata("check", "-r", "leaks", top), "check -r leaks")
        for image in [base, top] {
            let check = try qemuImg("check", "-f", "qcow2", image)
            XCTAssertEqual(check.status, 0, "qemu-img check \(image): \(check.stdout)\(check.stderr)")
        }
    }

    func testBadNamesAndMissingImagesSayWhat() throws {
        let missing = try strata("info", "rbd:strata/no-such-image:conf=\(conf)")
        XCTAssertEqual(missing.status, 1)
        XCTAssertTrue(missing.stderr.contains("No such file or directory"), missing.stderr)
        let bad = try strata("info", "rbd:strata")
        XCTAssertEqual(bad.status, 1)
        XCTAssertTrue(bad.stderr.contains("POOL/IMAGE"), bad.stderr)
        let noPool = try strata("create", "-f", "qcow2", "rbd:no-such-pool/x:conf=\(conf)", "1M")
        XCTAssertEqual(noPool.status, 1)
        XCTAssertFalse(noPool.stderr.isEmpty)
        // An RBD snapshot reads, and refuses writes.
        let image = rbd("snapped")
        ok(try strata("create", "-q", "-f", "qcow2", image, "1M"), "create")
        ok(try strata("io", "-c", "write -P 9 0 64k", image), "write")
        let r = try runProcess(["rbd", "-c", conf, "snap", "create", Ceph.image(of: image) + "@s1"], timeout: 60)
        XCTAssertEqual(r.status, 0, r.err)
        ok(try strata("io", "-c", "write -P 8 0 64k", image), "write after the snapshot")
        let snap = image.replacingOccurrences(of: ":conf=", with: "@s1:conf=")
        ok(try strata("io", "-r", "-c", "read -P 9 0 64k", snap), "read the RBD snapshot")
        let snapshotWrite = try strata("io", "-c", "write 0 4k", snap)
        XCTAssertEqual(snapshotWrite.status, 1)
        XCTAssertTrue(snapshotWrite.stderr.contains("read-only"), snapshotWrite.stderr)
        let noConf = try strata("info", "rbd:strata/x:conf=\(path("nope.conf"))")
        XCTAssertEqual(noConf.status, 1)
        XCTAssertTrue(noConf.stderr.contains("nope.conf"), noConf.stderr)
    }

    // MARK: Helpers

    func serve(_ image: String, socket: String, mayFail: Bool = false) throws -> Process {
        try? FileManager.default.removeItem(atPath: path(socket))
        let p = try spawn(Self.strataBinary!, ["serve", "--socket", path(socket), "--export", "disk=\(image)"],
                          log: "serve-\(socket).log")
        let deadline = Date().addingTimeInterval(30)
        while !FileManager.default.fileExists(atPath: path(socket)) && p.isRunning && Date() < deadline { usleep(20_000) }
        if !p.isRunning && mayFail { return p }
        guard FileManager.default.fileExists(atPath: path(socket)) else {
            XCTFail("strata serve did not listen: \(log("serve-\(socket).log"))")
            throw XCTSkip("no server")
        }
        return p
    }

    func log(_ name: String) -> String { (try? String(contentsOfFile: path(name), encoding: .utf8)) ?? "" }
}
