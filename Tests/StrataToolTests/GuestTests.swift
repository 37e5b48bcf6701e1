import Foundation
import XCTest
import TestSupport

/// Real guests on Strata disks: a Debian kernel and a busybox initramfs (built from Debian
/// packages by scripts/guest/build.sh, cached under .guest/) booted under QEMU's TCG, with
/// their disks exported by `strata serve`. Each guest runs one job, a shell script the test
/// hands it on a small second disk (see scripts/guest/init.sh), prints `STRATA-RESULT key=value`
/// lines on its serial console and powers off; the test then reads the image with strata and
/// qemu-img and compares real bytes. Every guest and server is killed in tearDown, and every
/// wait is bounded, so a hung guest fails the test instead of hanging the run.
final class GuestTests: ToolTestCase {
    /// The package root, from this file's path (Tests/StrataToolTests/GuestTests.swift).
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// The built guest (its folder holds `kernel`, `initrd` and `info`), or why it could not be built.
    static let guest: Result<String, GuestBuildError> = {
        let script = root.appendingPathComponent("scripts/guest/build.sh").path
        let start = Date()
        guard let r = try? runProcess(["/bin/bash", script], timeout: 900) else {
            return .failure(GuestBuildError(message: "could not run \(script)"))
        }
        let folder = r.out.split(separator: "\n").last.map(String.init) ?? ""
        guard r.status == 0, !r.timedOut, FileManager.default.fileExists(atPath: folder + "/kernel") else {
            return .failure(GuestBuildError(message: "scripts/guest/build.sh could not build the guest "
                + "(it needs network on the first run, and the packages of scripts/deps.sh test): \(r.transcript)"))
        }
        let info = (try? String(contentsOfFile: folder + "/info", encoding: .utf8)) ?? ""
        print("guest: \(folder) ready in \(String(format: "%.1f", Date().timeIntervalSince(start))) s\n\(info)")
        return .success(folder)
    }()

    struct GuestBuildError: Error { var message: String }

    static let qemuSystem = which("qemu-system-x86_64")

    private var guestFolder = ""

    override func setUpWithError() throws {
        try super.setUpWithError()
        guard Self.qemuSystem != nil else {
            XCTFail("qemu-system-x86_64 not found: install qemu-system-x86 (scripts/deps.sh test)")
            throw XCTSkip("no qemu-system-x86_64")
        }
        switch Self.guest {
        case .success(let folder): guestFolder = folder
        case .failure(let error):
            XCTFail(error.message)
            throw XCTSkip("no guest")
        }
    }

    // MARK: 1. Boot and persist

    /// The guest writes a known pattern to /dev/vda with fsync and powers off; strata then
    /// reads exactly that pattern from the image, zeroes elsewhere, and qemu-img check is clean.
    func testGuestWritesPatternThatPersistsInTheImage() throws {
        let start = Date()
        ok(try strata("create", "-f", "qcow2", "disk.qcow2", "32M"), "create")
        let server = try serve([("disk", "disk.qcow2")])
        let run = try boot("write", job: """
            \(Self.makePattern)
            dd if=/tmp/p of=$DISK bs=65536 seek=16 conv=fsync 2>/dev/null
            result sha "$(sha256sum </tmp/p | cut -d' ' -f1)"
            echo 3 >/proc/sys/vm/drop_caches
            result readback "$(dd if=$DISK bs=65536 skip=16 count=64 2>/dev/null | sha256sum | cut -d' ' -f1)"
            """, disks: [server.uri("disk")])
        expectClean(run)
        try stop(server)

        let pattern = Self.pattern
        XCTAssertEqual(run["sha"], try sha256(pattern), "the guest wrote the pattern the test expects")
        XCTAssertEqual(run["readback"], run["sha"], "the guest read its pattern back from the disk")
        ok(try qemuImg("check", "disk.qcow2"), "qemu-img check")
        ok(try strata("convert", "-O", "raw", "disk.qcow2", "disk.raw"), "convert")
        let raw = try contents("disk.raw")
        XCTAssertEqual(raw.count, 32 << 20)
        XCTAssertTrue(raw[(1 << 20)..<(5 << 20)].elementsEqual(pattern), "the image holds the guest's pattern at 1 MiB")
        XCTAssertTrue(raw[0..<(1 << 20)].allSatisfy { $0 == 0 } && raw[(5 << 20)...].allSatisfy { $0 == 0 },
                      "and nothing else")
        print("boot and persist: guest \(run.secondsText), test \(since(start))")
    }

    // MARK: 2. Snapshot and roll back

    /// A guest prepares the disk; the disk is snapshotted; a guest "installs software" (writes
    /// 16 MiB over it); rolling back makes a third guest see the disk exactly as the first left it.
    func testRollBackAfterAnInstallRestoresWhatTheGuestSaw() throws {
        let start = Date()
        ok(try strata("create", "-f", "qcow2", "disk.qcow2", "32M"), "create")
        var server = try serve([("disk", "disk.qcow2")])
        let prepare = try boot("prepare", job: """
            \(Self.makePattern)
            dd if=/tmp/p of=$DISK bs=65536 seek=16 conv=fsync 2>/dev/null
            echo 3 >/proc/sys/vm/drop_caches
            result sum "$(sha256sum <$DISK | cut -d' ' -f1)"
            """, disks: [server.uri("disk")])
        expectClean(prepare)
        try stop(server)
        ok(try strata("snapshot", "-c", "clean", "disk.qcow2"), "snapshot -c")

        server = try serve([("disk", "disk.qcow2")])
        let install = try boot("install", job: """
            dd if=/dev/urandom of=/tmp/pkg bs=65536 count=256 2>/dev/null
            dd if=/tmp/pkg of=$DISK bs=65536 seek=32 conv=fsync 2>/dev/null
            echo "installed" | dd of=$DISK bs=512 seek=2048 conv=sync,fsync 2>/dev/null
            echo 3 >/proc/sys/vm/drop_caches
            result sum "$(sha256sum <$DISK | cut -d' ' -f1)"
            """, disks: [server.uri("disk")])
        expectClean(install)
        try stop(server)
        XCTAssertNotNil(prepare["sum"])
        XCTAssertNotEqual(install["sum"], prepare["sum"], "the install changed the disk")

        ok(try strata("snapshot", "-a", "clean", "disk.qcow2"), "snapshot -a")
        server = try serve([("disk", "disk.qcow2")])
        let after = try boot("after", job: """
            result sum "$(sha256sum <$DISK | cut -d' ' -f1)"
            """, disks: [server.uri("disk")])
        expectClean(after)
        try stop(server)
        XCTAssertEqual(after["sum"], prepare["sum"], "after the rollback the guest sees the disk as before the install")
        ok(try qemuImg("check", "disk.qcow2"), "qemu-img check")
        let list = ok(try strata("snapshot", "-l", "disk.qcow2"), "snapshot -l")
        XCTAssertTrue(list.stdout.contains("clean"), list.stdout)
        print("snapshot and roll back: guests \(prepare.secondsText) + \(install.secondsText) + \(after.secondsText), test \(since(start))")
    }

    // MARK: 6. A file system written by the guest

    /// The guest makes an ext4 file system (e2fsprogs' mke2fs, journal and metadata checksums)
    /// on /dev/vda, writes a tree of files and their checksums, unmounts and powers off;
    /// e2fsck finds no error in the image exported to raw, the host reads the files with
    /// debugfs, and a second guest reads every file back with the right checksum.
    func testGuestExt4FileSystemSurvivesAndChecksClean() throws {
        let start = Date()
        ok(try strata("create", "-f", "qcow2", "disk.qcow2", "64M"), "create")
        var server = try serve([("disk", "disk.qcow2")])
        let first = try boot("mkfs", job: """
            /usr/sbin/mke2fs -q -F -t ext4 $DISK
            mount -t ext4 $DISK /mnt
            \(Self.writeTree)
            umount /mnt
            """, disks: [server.uri("disk")])
        expectClean(first)
        try stop(server)
        let sums = first.sums
        XCTAssertEqual(sums.count, 12, "the guest listed its files: \(first.console)")

        try checkExt4(image: "disk.qcow2", sums: sums)

        server = try serve([("disk", "disk.qcow2")])
        let read = try boot("fsck-read", job: """
            mount -t ext4 -o ro $DISK /mnt
            cd /mnt && find . -type f ! -name SUMS | sort | while read f; do echo "STRATA-SUM $(sha256sum "$f")"; done
            sha256sum -c SUMS >/dev/null && result verified yes
            cd / && umount /mnt
            """, disks: [server.uri("disk")])
        expectClean(read)
        try stop(server)
        XCTAssertEqual(read.sums, sums, "the second guest reads every file back with the first one's checksum")
        XCTAssertEqual(read["verified"], "yes", "sha256sum -c SUMS in the guest")
        ok(try qemuImg("check", "disk.qcow2"), "qemu-img check")
        print("ext4 in the guest: guests \(first.secondsText) + \(read.secondsText), test \(since(start))")
    }

    // MARK: 5. Full clone

    /// A full clone of a linked clone boots with no backing file (its template moved away
    /// first): the guest sees the flattened disk, and its writes reach only the full clone.
    func testFullCloneBootsWithoutItsBackingFile() throws {
        let start = Date()
        try writePatternDisk("base.raw")
        ok(try strata("template", "create", "base.raw", "base.qcow2"), "template create")
        ok(try strata("clone", "base.qcow2", "vm.qcow2"), "linked clone")
        ok(try qemuIO("-f", "qcow2", "-c", "write -P 0x5a 16M 1M", path("vm.qcow2")), "write to the linked clone")
        ok(try strata("convert", "-O", "raw", "vm.qcow2", "vm.raw"), "convert the linked clone")
        let expected = try sha256(contents("vm.raw"))

        ok(try strata("clone", "--full", "vm.qcow2", "full.qcow2"), "clone --full")
        let info = json(try qemuImg("info", "--output", "json", path("full.qcow2")).stdout) as? [String: Any]
        XCTAssertNil(info?["backing-filename"], "a full clone has no backing file: \(String(describing: info))")
        try FileManager.default.moveItem(atPath: path("base.qcow2"), toPath: path("base.gone"))

        let server = try serve([("full", "full.qcow2")])
        let run = try boot("full", job: """
            result sum "$(sha256sum <$DISK | cut -d' ' -f1)"
            echo "written by the guest on the full clone" | dd of=$DISK bs=512 seek=40960 conv=sync,fsync 2>/dev/null
            """, disks: [server.uri("full")])
        expectClean(run)
        try stop(server)
        XCTAssertEqual(run["sum"], expected, "the guest sees the linked clone's flattened contents")
        ok(try qemuImg("check", "full.qcow2"), "qemu-img check")
        ok(try strata("convert", "-O", "raw", "full.qcow2", "full.raw"), "convert the full clone")
        let full = try contents("full.raw")
        XCTAssertTrue(String(decoding: full[(20 << 20)..<((20 << 20) + 38)], as: UTF8.self) == "written by the guest on the full clone",
                      "the guest's write is in the full clone")
        try FileManager.default.moveItem(atPath: path("base.gone"), toPath: path("base.qcow2"))
        ok(try strata("convert", "-O", "raw", "vm.qcow2", "vm-after.raw"), "convert the linked clone again")
        XCTAssertEqual(try sha256(contents("vm-after.raw")), expected, "the linked clone did not change")
        print("full clone: guest \(run.secondsText), test \(since(start))")
    }

    // MARK: 3. Template fleet

    /// Three guests boot at once from one `strata serve` with three exports, each a linked
    /// clone of one template, and each writes its identity: each clone holds only its own
    /// change, the template is unchanged, and the clones share the template's clusters.
    func testThreeGuestsOnLinkedClonesOfOneTemplate() throws {
        let start = Date()
        try writePatternDisk("golden.raw")
        ok(try strata("template", "create", "golden.raw", "golden.qcow2"), "template create")
        let templateHash = try sha256(contents("golden.qcow2"))
        let names = ["vm1", "vm2", "vm3"]
        for n in names { ok(try strata("clone", "golden.qcow2", "\(n).qcow2"), "clone \(n)") }
        let server = try serve(names.map { ($0, "\($0).qcow2") })
        let vms = try names.map { n in
            try startGuest(n, job: """
                result sum "$(dd if=$DISK bs=65536 skip=16 count=64 2>/dev/null | sha256sum | cut -d' ' -f1)"
                yes "I am \(n)" | head -c 65536 | dd of=$DISK bs=65536 seek=128 conv=fsync 2>/dev/null
                """, disks: [server.uri(n)])
        }
        let runs = vms.map { waitGuest($0, timeout: 240) }
        try stop(server)
        let patternSum = try sha256(Self.pattern)
        for (n, run) in zip(names, runs) {
            expectClean(run)
            XCTAssertEqual(run["sum"], patternSum, "\(n) reads the template's pattern")
        }
        XCTAssertEqual(try sha256(contents("golden.qcow2")), templateHash, "the template file is unchanged")
        ok(try qemuImg("check", "golden.qcow2"), "check the template")
        for n in names {
            ok(try qemuImg("check", "\(n).qcow2"), "check \(n)")
            ok(try strata("convert", "-O", "raw", "\(n).qcow2", "\(n).raw"), "convert \(n)")
            let raw = try contents("\(n).raw")
            let identity = Array(String(repeating: "I am \(n)\n", count: 65536 / (n.count + 6) + 1).utf8.prefix(65536))
            XCTAssertTrue(raw[(8 << 20)..<((8 << 20) + 65536)].elementsEqual(identity), "\(n) holds its identity")
            XCTAssertTrue(raw[(1 << 20)..<(5 << 20)].elementsEqual(Self.pattern), "\(n) still reads the template's pattern")
            // What the clone itself stores (depth 0) is its identity cluster and nothing else;
            // the pattern is read from the template (depth 1).
            let map = json(ok(try qemuImg("map", "--output", "json", path("\(n).qcow2")), "map").stdout) as? [[String: Any]] ?? []
            let own = map.filter { ($0["depth"] as? Int) == 0 && ($0["data"] as? Bool) == true }
                .map { [$0["start"] as? Int ?? -1, $0["length"] as? Int ?? -1] }
            XCTAssertEqual(own, [[8 << 20, 65536]], "\(n) holds only its own change: \(map)")
            let shared = map.filter { ($0["depth"] as? Int) == 1 && ($0["data"] as? Bool) == true }
                .reduce(0) { $0 + ($1["length"] as? Int ?? 0) }
            XCTAssertEqual(shared, 4 << 20, "\(n) reads the 4 MiB pattern from the template's clusters")
        }
        for f in ["golden.qcow2"] + names.map({ "\($0).qcow2" }) {
            print("fleet: \(f) \(dataBytes(f)) bytes stored (file size \((try? FileManager.default.attributesOfItem(atPath: path(f))[.size] as? Int) ?? -1))")
        }
        print("template fleet: guests \(runs.map(\.secondsText).joined(separator: ", ")) at once, test \(since(start))")
    }

    // MARK: 4. Live snapshot under a running guest

    /// While a guest writes numbered 4 KiB records one by one with O_DIRECT, an internal
    /// snapshot is taken through the control socket: the guest sees no I/O error, and the
    /// snapshot holds records 1...k with none missing below k, and nothing after.
    func testLiveSnapshotWhileTheGuestWritesRecords() throws {
        let start = Date()
        let total = 300
        ok(try strata("create", "-f", "qcow2", "disk.qcow2", "32M"), "create")
        let server = try serve([("disk", "disk.qcow2")], control: true)
        let guest = try startGuest("writer", job: """
            errors=0
            i=1
            while [ $i -le \(total) ]; do
              printf 'record %08d\\n' $i | dd of=$DISK bs=4096 seek=$i conv=sync oflag=direct 2>/dev/null || errors=$((errors + 1))
              [ $((i % 25)) -eq 0 ] && echo "STRATA-PROGRESS $i"
              i=$((i + 1))
            done
            result errors $errors
            """, disks: [server.uri("disk")])
        // Once the guest has written 50 records, snapshot it.
        let deadline = Date().addingTimeInterval(180)
        while !console("writer").contains("STRATA-PROGRESS 50") && guest.isRunning && Date() < deadline { usleep(50_000) }
        XCTAssertTrue(guest.isRunning, "the guest is still writing: \(console("writer"))")
        let snap = try strata("snapshot", "create", "--server", path("ctl.sock"), "disk", "live")
        ok(snap, "live snapshot")
        let progressAtSnapshot = console("writer").components(separatedBy: "STRATA-PROGRESS").count - 1
        let run = waitGuest(guest, timeout: 240)
        expectClean(run)
        XCTAssertEqual(run["errors"], "0", "the guest saw no I/O error")
        try stop(server)
        ok(try qemuImg("check", "disk.qcow2"), "qemu-img check")

        func records(_ raw: Data) -> [Int] {
            (1...total).filter { i in
                let r = raw[(i * 4096)..<(i * 4096 + 16)]
                let number = String(i)
                return String(decoding: r, as: UTF8.self) == "record " + String(repeating: "0", count: 8 - number.count) + number + "\n"
            }
        }
        ok(try strata("convert", "-O", "raw", "disk.qcow2", "disk.raw"), "convert the disk")
        XCTAssertEqual(records(try contents("disk.raw")), Array(1...total), "the disk holds every record")
        ok(try strata("clone", "--full", "--snapshot", "live", "disk.qcow2", "snap.qcow2"), "clone the snapshot")
        ok(try strata("convert", "-O", "raw", "snap.qcow2", "snap.raw"), "convert the snapshot")
        let snapRecords = records(try contents("snap.raw"))
        let k = snapRecords.count
        XCTAssertEqual(snapRecords, Array(1..<(k + 1)), "the snapshot holds records 1...\(k), none missing")
        XCTAssertGreaterThanOrEqual(k, 50, "the snapshot holds what was written before it")
        XCTAssertLessThan(k, total, "the snapshot was taken while the guest was writing")
        print("live snapshot: snapshot holds records 1...\(k) of \(total) (\(progressAtSnapshot * 25) reported before it); guest \(run.secondsText), test \(since(start))")
    }

    // MARK: 7. The kernel's NBD client in the guest

    /// The guest's own kernel NBD client (nbd.ko, driven by Debian's nbd-client) connects
    /// over QEMU's user network to `strata serve` on a host TCP port, makes ext4 on
    /// /dev/nbd0, writes files and disconnects; the image checks as in the ext4 test.
    func testGuestKernelNBDClientOverTCP() throws {
        let start = Date()
        ok(try strata("create", "-f", "qcow2", "disk.qcow2", "64M"), "create")
        let server = try serve([("disk", "disk.qcow2")], socket: nil, tcp: true)
        guard let url = URLComponents(string: server.uris.first ?? ""), let port = url.port else {
            XCTFail("no TCP URI from strata serve: \(server.uris)")
            return
        }
        let run = try boot("nbd", job: """
            ip link set lo up
            ip link set eth0 up
            ip addr add 10.0.2.15/24 dev eth0
            nbd-client 10.0.2.2 \(port) /dev/nbd0 -N disk
            result nbd-size "$(cat /sys/block/nbd0/size)"
            /usr/sbin/mke2fs -q -F -t ext4 /dev/nbd0
            mount -t ext4 /dev/nbd0 /mnt
            \(Self.writeTree)
            umount /mnt
            nbd-client -d /dev/nbd0
            """, disks: [], net: true)
        expectClean(run)
        try stop(server)
        XCTAssertEqual(run["nbd-size"], "\((64 << 20) / 512)", "the guest's /dev/nbd0 has the export's size")
        XCTAssertEqual(run.sums.count, 12, "the guest listed its files: \(run.console)")
        try checkExt4(image: "disk.qcow2", sums: run.sums)
        print("kernel NBD client in the guest: guest \(run.secondsText), test \(since(start))")
    }

    // MARK: Guest jobs

    /// Shell that writes the 4 MiB pattern of `pattern` to /tmp/p (awk is slow under TCG:
    /// few long lines).
    static let makePattern = #"awk 'BEGIN { for (i = 0; i < 16384; i++) printf "%0255d\n", i }' >/tmp/p"#

    /// The 4 MiB pattern: the numbers 0..<16384, each as 255 digits and a newline.
    static let pattern: [UInt8] = {
        var out = [UInt8]()
        out.reserveCapacity(4 << 20)
        var digits = [UInt8](repeating: 0x30, count: 255)
        for i in 0..<16_384 {
            var n = i
            for d in (250..<255).reversed() { digits[d] = 0x30 + UInt8(n % 10); n /= 10 }
            out += digits
            out.append(0x0a)
        }
        return out
    }()

    /// Shell run in a mounted /mnt: 3 folders of 4 files of different sizes, their checksums
    /// printed (`STRATA-SUM sha  ./path`) and kept in /mnt/SUMS.
    static let writeTree = """
        for d in 1 2 3; do
          mkdir -p /mnt/dir$d/sub
          for f in 1 2 3 4; do
            target=/mnt/dir$d/file$f
            [ $f -gt 2 ] && target=/mnt/dir$d/sub/file$f
            awk -v d=$d -v f=$f 'BEGIN { for (i = 0; i < d * f * 400; i++) printf "dir %d file %d line %d\\n", d, f, i }' >$target
          done
        done
        dd if=/dev/urandom of=/mnt/dir1/random bs=65536 count=16 2>/dev/null
        rm /mnt/dir3/file1
        (cd /mnt && find . -type f | sort | xargs sha256sum >/tmp/SUMS && cp /tmp/SUMS SUMS)
        while read line; do echo "STRATA-SUM $line"; done </tmp/SUMS
        sync
        """

    /// Runs e2fsck -fn on the image exported to raw with strata, and reads every file of
    /// `sums` with debugfs, comparing checksums.
    private func checkExt4(image: String, sums: [String: String], file: StaticString = #filePath, line: UInt = #line) throws {
        ok(try qemuImg("check", image), "qemu-img check", file: file, line: line)
        ok(try strata("convert", "-O", "raw", image, "fs.raw"), "convert to raw", file: file, line: line)
        let fsck = try runProcess(["e2fsck", "-fn", path("fs.raw")], cwd: dir.path, timeout: 60)
        XCTAssertEqual(fsck.status, 0, "e2fsck -fn finds no error: \(fsck.transcript)", file: file, line: line)
        print("e2fsck: \(fsck.out.split(separator: "\n").last ?? "")")
        for (name, sum) in sums {
            let cat = try runProcess(["debugfs", "-R", "cat \(name.dropFirst())", path("fs.raw")], cwd: dir.path, timeout: 60)
            XCTAssertEqual(try sha256(cat.outData), sum, "\(name) read by debugfs on the host", file: file, line: line)
        }
    }

    /// A raw 32 MiB disk holding `pattern` at 1 MiB.
    private func writePatternDisk(_ name: String) throws {
        try truncate(name, to: 32 << 20)
        try write(name, Self.pattern, at: 1 << 20)
    }

    // MARK: Running guests

    /// What one guest printed and how it ended.
    struct GuestRun {
        var console: String
        /// The status the job exited with (`STRATA-GUEST-EXIT`), nil if the guest never said.
        var exit: String?
        var results: [String: String]
        /// `STRATA-SUM` lines: checksum by path.
        var sums: [String: String]
        var seconds: Double
        var timedOut: Bool
        subscript(key: String) -> String? { results[key] }
        var secondsText: String { String(format: "%.1f s", seconds) }
    }

    /// Fails unless the guest ran its job to the end with status 0.
    private func expectClean(_ run: GuestRun, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertFalse(run.timedOut, "the guest was still running at the timeout:\n\(run.console)", file: file, line: line)
        XCTAssertEqual(run.exit, "0", "the guest job's exit status; console:\n\(run.console)", file: file, line: line)
    }

    /// Boots a guest and waits for it to power off.
    private func boot(_ name: String, job: String, disks: [String], net: Bool = false, timeout: TimeInterval = 180) throws -> GuestRun {
        waitGuest(try startGuest(name, job: job, disks: disks, net: net), timeout: timeout)
    }

    /// Starts QEMU on `disks` (their `file=` values, the first one /dev/vda) and a job disk
    /// holding `job`; the console goes to NAME.console in the scratch folder.
    private func startGuest(_ name: String, job: String, disks: [String], net: Bool = false) throws -> Process {
        // The job disk: "#!strata-job" on the first line (init looks for it), helpers, the job,
        // padded with newlines to whole sectors, 64 KiB at least (the kernel's partition
        // scan complains about a smaller disk).
        var text = "#!strata-job\nset -e\nresult() { echo \"STRATA-RESULT $1=$2\"; }\n\(job)\n"
        text += String(repeating: "\n", count: max(65536 - text.utf8.count, (512 - text.utf8.count % 512) % 512))
        try write("\(name).job", Array(text.utf8))
        var args = ["-accel", "tcg", "-m", "256", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                    "-kernel", guestFolder + "/kernel", "-initrd", guestFolder + "/initrd",
                    "-append", "console=ttyS0 quiet panic=-1",
                    "-serial", "file:" + path("\(name).console")]
        for d in disks { args += ["-drive", "file=\(d),format=raw,if=virtio"] }
        args += ["-drive", "file=\(path("\(name).job")),format=raw,if=virtio,readonly=on"]
        if net { args += ["-nic", "user,model=virtio-net-pci"] }
        let p = try spawn(Self.qemuSystem!, args, log: "\(name).qemu.log")
        guests[ObjectIdentifier(p)] = (name, Date())
        return p
    }

    private var guests: [ObjectIdentifier: (name: String, started: Date)] = [:]

    /// Waits for a guest to power off (killing it after `timeout` seconds) and parses its console.
    private func waitGuest(_ p: Process, timeout: TimeInterval = 180) -> GuestRun {
        let (name, started) = guests[ObjectIdentifier(p)]!
        let deadline = started.addingTimeInterval(timeout)
        while p.isRunning && Date() < deadline { usleep(20_000) }
        let timedOut = p.isRunning
        if timedOut { kill(p.processIdentifier, SIGKILL) }
        p.waitUntilExit()
        let seconds = Date().timeIntervalSince(started)
        let text = console(name) + "\n--- qemu: \(log("\(name).qemu.log"))"
        var results: [String: String] = [:], sums: [String: String] = [:]
        var exit: String?
        for raw in text.split(whereSeparator: \.isNewline) {  // the serial console ends lines with "\r\n"
            let line = String(raw)
            if let r = line.range(of: "STRATA-RESULT ") {
                let kv = line[r.upperBound...]
                if let eq = kv.firstIndex(of: "=") { results[String(kv[..<eq])] = String(kv[kv.index(after: eq)...]) }
            } else if let r = line.range(of: "STRATA-SUM ") {
                let parts = line[r.upperBound...].split(separator: " ", omittingEmptySubsequences: true)
                if parts.count == 2 { sums[String(parts[1])] = String(parts[0]) }
            } else if let r = line.range(of: "STRATA-GUEST-EXIT ") {
                exit = String(line[r.upperBound...])
            }
        }
        return GuestRun(console: text, exit: exit, results: results, sums: sums, seconds: seconds, timedOut: timedOut)
    }

    private func console(_ name: String) -> String { log("\(name).console") }

    // MARK: The server

    struct Server {
        var process: Process
        var uris: [String]
        var socket: String?
        func uri(_ export: String) -> String { "nbd+unix:///\(export)?socket=\(socket ?? "")" }
    }

    /// `strata serve` of `exports` on a Unix socket (or a free TCP port), once it has printed its URIs.
    private func serve(_ exports: [(String, String)], socket: String? = "nbd.sock", tcp: Bool = false, control: Bool = false) throws -> Server {
        var args = ["serve"]
        if let socket { args += ["--socket", path(socket)] }
        if tcp { args += ["--port", "0"] }
        if control { args += ["--control", path("ctl.sock")] }
        for (name, file) in exports { args += ["--export", "\(name)=\(file)"] }
        let n = serveCount
        serveCount += 1
        let p = try spawn(Self.strataBinary!, args, log: "serve\(n).err", stdout: "serve\(n).out")
        let deadline = Date().addingTimeInterval(20)
        var uris: [String] = []
        while p.isRunning && Date() < deadline {
            uris = log("serve\(n).out").split(separator: "\n").map(String.init)
            if uris.count >= exports.count { break }
            usleep(20_000)
        }
        guard uris.count >= exports.count else {
            XCTFail("strata serve did not start: \(log("serve\(n).err"))")
            throw XCTSkip("no server")
        }
        return Server(process: p, uris: uris, socket: socket.map { path($0) })
    }

    private var serveCount = 0

    /// Stops a server with SIGTERM and insists on a clean exit.
    private func stop(_ server: Server, file: StaticString = #filePath, line: UInt = #line) throws {
        server.process.terminate()
        let deadline = Date().addingTimeInterval(30)
        while server.process.isRunning && Date() < deadline { usleep(20_000) }
        if server.process.isRunning {
            kill(server.process.processIdentifier, SIGKILL)
            XCTFail("strata serve did not stop within 30 s", file: file, line: line)
        }
        server.process.waitUntilExit()
        XCTAssertEqual(server.process.terminationStatus, 0, "strata serve exit status", file: file, line: line)
    }

    // MARK: Helpers

    private func log(_ name: String) -> String { (try? String(contentsOfFile: path(name), encoding: .utf8)) ?? "" }

    private func sha256<C: Collection>(_ bytes: C) throws -> String where C.Element == UInt8 {
        let file = path("sha-input-\(UUID().uuidString)")
        _ = FileManager.default.createFile(atPath: file, contents: Data(bytes))
        defer { try? FileManager.default.removeItem(atPath: file) }
        let r = try runProcess(["sha256sum", file])
        return String(r.out.prefix(64))
    }

    private func since(_ start: Date) -> String { String(format: "%.1f s", Date().timeIntervalSince(start)) }
}
