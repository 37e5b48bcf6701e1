import Foundation
import XCTest
import TestSupport

/// A crash under load: `strata serve --dedup` (and, in one test, `strata serve` on a plain image) killed with SIGKILL while a client has
/// whole-cluster writes of repeated contents in flight. Each round: the image checks without
/// corruption (leaks allowed), every block the last completed flush made durable (and not
/// written after it) reads back byte-exact, and `strata serve --dedup` opens it again, takes
/// more writes, and after `qemu-img check -r leaks` it is clean. The client and its record of
/// durable blocks: Tests/nbd/dedup_crash_load.py.
final class DedupCrashTests: ToolTestCase {
    static let python = "/usr/bin/python3"
    static let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("nbd/dedup_crash_load.py").path


    func testKillingServeDedupUnderLoadKeepsFlushedBlocksAndAConsistentImage() throws {
        guard FileManager.default.isExecutableFile(atPath: Self.python),
              (try runProcess([Self.python, "-c", "import nbd"])).status == 0 else {
            XCTFail("/usr/bin/python3 cannot import nbd: install the Debian package python3-libnbd")
            return
        }
        let start = Date()
        for (round, seed) in (7001...7008).enumerated() {
            let t = Date()
            try crashRound(round, seed: seed, dedup: true)
            print("dedup crash round \(round) (seed \(seed)): \(String(format: "%.1f", Date().timeIntervalSince(t))) s")
            // Stay well under a minute on a loaded machine: later rounds only if time is left.
            if Date().timeIntervalSince(start) > 35 { break }
        }
    }

    /// One round: fresh image, load, SIGKILL after at least 3 completed flushes and a
    /// seed-chosen delay, then the three checks.
    /// The same kill on an image without dedup (64 KiB clusters; allocating writes and
    /// overwrites in place): no error at all is allowed, only leaks.
    func testKillingServeUnderLoadKeepsFlushedBlocks() throws {
        guard FileManager.default.isExecutableFile(atPath: Self.python),
              (try runProcess([Self.python, "-c", "import nbd"])).status == 0 else {
            XCTFail("/usr/bin/python3 cannot import nbd: install the Debian package python3-libnbd")
            return
        }
        for (round, seed) in (7101...7103).enumerated() { try crashRound(round, seed: seed, dedup: false) }
    }

    private func crashRound(_ round: Int, seed: Int, dedup: Bool) throws {
        let image = "d\(round).qcow2"
        // 8 MiB at 4 KiB clusters: the L2 cache holds exactly the disk's 4 tables, so requests
        // also write tables back in their middle while flushes apply decrements.
        ok(try strata("create", "-q", "-f", "qcow2", "-o", dedup ? "cluster_size=4096,dedup=on" : "cluster_size=65536", image, "8M"), "create")

        // Load until killed.
        let server = try serve(image, socket: "s\(round)a.sock", dedup: dedup)
        let state = path("state\(round).json")
        let load = try spawn(Self.python, ["-B", Self.script, "load", uri("s\(round)a.sock"), "\(seed)", state, "--region", "2048"],
                             log: "load\(round).log")
        let deadline = Date().addingTimeInterval(20)
        while flushes(state) < 3 && load.isRunning && Date() < deadline { usleep(5_000) }
        XCTAssertGreaterThanOrEqual(flushes(state), 3, "the load made progress: \(log("load\(round).log"))")
        var rng = SeededRandom(seed: UInt64(seed))
        usleep(UInt32(rng.next() % 400_000))
        XCTAssertTrue(server.isRunning, "server alive until killed: \(log("serve-s\(round)a.sock.log"))")
        kill(server.processIdentifier, SIGKILL)
        server.waitUntilExit()
        try waitExit(load, seconds: 20)
        XCTAssertEqual(load.terminationStatus, 0, "load: \(log("load\(round).log"))")
        print("round \(round): \(log("load\(round).log").trimmingCharacters(in: .whitespacesAndNewlines))")

        // (a) No corruption. Leaks are allowed after a crash, and so is qcow2's COPIED window
        // (spec/format.md "Crash ordering"): a share's refcount increment and the owner's
        // COPIED clear live in different clusters, so a crash between their writes leaves an
        // entry whose COPIED flag disagrees with its refcount while only that entry maps the
        // cluster; qemu-img check calls it an OFLAG_COPIED error, and it is harmless (a write
        // through it is either in place into a cluster nobody else maps, or a copy). Never
        // allowed: any other error, or COPIED on a cluster that two entries map.
        let check = try qemuImg("check", image)
        if check.status != 0 && check.status != 3 {
            let (window, detail) = try copiedWindowOnly(check.stderr, image: image)
            if window && dedup {
                print("round \(round): the COPIED window after the kill (repaired by check -r all):\n\(detail)")
                let repair = try qemuImg("check", "-r", "all", image)
                XCTAssertEqual(repair.status, 0, "check -r all after the COPIED window:\n\(repair.stdout)\(repair.stderr)")
            } else {
                let kept = "/tmp/dedup-crash-seed\(seed)-\(getpid()).qcow2"
                try? FileManager.default.removeItem(atPath: kept)
                try? FileManager.default.copyItem(atPath: path(image), toPath: kept)
                try? FileManager.default.removeItem(atPath: kept + ".state.json")
                try? FileManager.default.copyItem(atPath: state, toPath: kept + ".state.json")
                XCTFail("""
                    round \(round), seed \(seed): qemu-img check exit \(check.status) after the kill (image kept as \(kept)):
                    \((check.stderr + check.stdout).split(separator: "\n").filter { !$0.hasPrefix("Leaked") }.joined(separator: "\n"))
                    \(detail)
                    """)
            }
        }
        // (b) Every block durable at the last completed flush reads back.
        ok(try qemuImg("convert", "-f", "qcow2", "-O", "raw", image, "r\(round).raw"), "convert after the crash")
        ok(try python(["verify", path("r\(round).raw"), state]), "durable blocks after the crash (seed \(seed))")

        // (c) Served again with dedup, more writes work and read back; then only leaks to repair.
        let again = try serve(image, socket: "s\(round)b.sock", dedup: dedup)
        let state2 = path("state\(round)b.json")
        ok(try python(["load", uri("s\(round)b.sock"), "\(seed + 500)", state2, "--ops", "300", "--initial", state, "--region", "2048"]),
           "writes after reopening")
        again.terminate()
        try waitExit(again, seconds: 20)
        ok(try qemuImg("convert", "-f", "qcow2", "-O", "raw", image, "r\(round)b.raw"), "convert after reopening")
        ok(try python(["verify", path("r\(round)b.raw"), state2]), "blocks after reopening")
        let repair = try qemuImg("check", "-r", "leaks", image)
        XCTAssertTrue(repair.status == 0, "check -r leaks: exit \(repair.status)\n\(repair.stdout)\(repair.stderr)")
        ok(try qemuImg("check", image), "clean after repairing leaks")
    }

    /// Regression: with 4 KiB clusters on an 8 MiB disk the L2 cache holds exactly its 4
    /// tables, so random writes soon make every table dirty, and requests write tables back
    /// in their middle while flushes apply decrements (which dedup's overwrites of shared
    /// clusters produce). The server must keep answering: 1500 writes, with flushes, finish.
    /// It hung before the flush had a separate write-out lock: a full flush held `flushLock`
    /// while it waited for the old epoch's requests, and one of those requests waited for
    /// `flushLock` in `writeBackTables` (called from `steps` when the caches are full).
    func testServeDedupKeepsAnsweringWhenEveryTableIsDirty() throws {
        guard FileManager.default.isExecutableFile(atPath: Self.python),
              (try runProcess([Self.python, "-c", "import nbd"])).status == 0 else {
            XCTFail("/usr/bin/python3 cannot import nbd: install the Debian package python3-libnbd")
            return
        }
        ok(try strata("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,dedup=on", "small.qcow2", "8M"), "create")
        let server = try serve("small.qcow2", socket: "small.sock")
        let load = try runProcess([Self.python, "-B", Self.script, "load", uri("small.sock"), "42", path("small.json"), "--ops", "1500"],
                                  cwd: dir.path, timeout: 20)
        XCTAssertFalse(load.timedOut, "the server stopped answering (no reply within 20 s): \(load.transcript)")
        XCTAssertEqual(load.status, 0, load.transcript)
        guard !load.timedOut else { return }  // tearDown kills the hung server
        server.terminate()
        try waitExit(server, seconds: 20)
        ok(try qemuImg("check", "small.qcow2"), "check after a clean stop")
        ok(try qemuImg("convert", "-f", "qcow2", "-O", "raw", "small.qcow2", "small.raw"), "convert")
        ok(try python(["verify", path("small.raw"), path("small.json")]), "every block reads back")
    }

    // MARK: Helpers

    /// Whether every error `qemu-img check` printed (on its stderr) is an OFLAG_COPIED error
    /// on a cluster that at most one entry of the active disk maps (from `qemu-img map`), and
    /// a line per such error: the entry's COPIED flag, the refcount qemu-img read, and how
    /// many entries map the cluster.
    private func copiedWindowOnly(_ checkOutput: String, image: String) throws -> (Bool, String) {
        var refs: [Int: Int] = [:]
        let map = json(try qemuImg("map", "--output", "json", "-U", image).stdout) as? [[String: Any]] ?? []
        for e in map where e["data"] as? Bool == true {
            guard let off = e["offset"] as? Int, let len = e["length"] as? Int else { continue }
            for k in stride(from: 0, to: len, by: 4096) { refs[off + k, default: 0] += 1 }
        }
        var window = true
        var lines: [String] = []
        for line in checkOutput.split(separator: "\n") where line.hasPrefix("ERROR") {
            let fields = line.split(separator: " ")
            guard line.contains("OFLAG_COPIED"), let e = fields.first(where: { $0.hasPrefix("l2_entry=") }),
                  let raw = UInt64(e.dropFirst(9), radix: 16) else {
                window = false
                lines.append("  " + line)
                continue
            }
            let host = Int(raw & 0x00ff_ffff_ffff_fe00)
            if refs[host, default: 0] > 1 { window = false }
            lines.append("  host 0x\(String(host, radix: 16)): COPIED \(raw >> 63 == 1 ? "set" : "clear"), "
                         + "\(fields.last ?? ""), mapped by \(refs[host] ?? 0) entr\(refs[host] == 1 ? "y" : "ies")")
        }
        return (window, lines.isEmpty ? "" : "errors:\n" + lines.joined(separator: "\n"))
    }

    private func uri(_ socket: String) -> String { "nbd+unix:///disk?socket=\(path(socket))" }

    private func serve(_ image: String, socket: String, dedup: Bool = true) throws -> Process {
        let p = try spawn(Self.strataBinary!, ["serve"] + (dedup ? ["--dedup"] : []) + ["--socket", path(socket), "--export", "disk=\(image)"],
                          log: "serve-\(socket).log")
        let deadline = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: path(socket)) && p.isRunning && Date() < deadline { usleep(10_000) }
        guard FileManager.default.fileExists(atPath: path(socket)) else {
            XCTFail("strata serve did not listen: \(log("serve-\(socket).log"))")
            throw XCTSkip("no server")
        }
        return p
    }

    private func waitExit(_ p: Process, seconds: TimeInterval) throws {
        let deadline = Date().addingTimeInterval(seconds)
        while p.isRunning && Date() < deadline { usleep(10_000) }
        if p.isRunning {
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            XCTFail("\(p.executableURL?.lastPathComponent ?? "?") did not exit within \(seconds) s")
        }
        p.waitUntilExit()
    }

    private func python(_ args: [String]) throws -> RunResult {
        let r = try runProcess([Self.python, "-B", Self.script] + args, cwd: dir.path, timeout: 15)
        return RunResult(status: r.status, stdout: r.out, stderr: r.err)
    }

    /// Completed flushes recorded in a load's state file (0 before the first).
    private func flushes(_ state: String) -> Int {
        guard let d = FileManager.default.contents(atPath: state),
              let o = try? JSONSerialization.jsonObject(with: d) as? [String: Any] else { return 0 }
        return o["flushes"] as? Int ?? 0
    }

    private func log(_ name: String) -> String { (try? String(contentsOfFile: path(name), encoding: .utf8)) ?? "" }
}
