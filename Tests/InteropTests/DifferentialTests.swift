import Foundation
import XCTest
import TestSupport

/// One seeded sequence of random operations goes through `strata io` on one image and through
/// `qemu-io` on its twin; `qemu-img compare` must find them identical and `qemu-img check`
/// must find both clean.
final class DifferentialTests: XCTestCase {
    func testRandomOps64k() throws { try differential(clusterSize: 65536, backing: false, seed: 1) }
    func testRandomOps4k() throws { try differential(clusterSize: 4096, backing: false, seed: 2) }
    func testRandomOps64kWithBacking() throws { try differential(clusterSize: 65536, backing: true, seed: 3) }
    func testRandomOps4kWithBacking() throws { try differential(clusterSize: 4096, backing: true, seed: 4) }
    func testRandomOpsExtendedL2WithBacking() throws { try differential(clusterSize: 32768, backing: true, seed: 5, options: ",extended_l2=on") }
    /// The same, with every image (the backing file too) in a Ceph pool, through librbd on
    /// both sides (Strata's RBD store, QEMU's rbd driver).
    func testRandomOpsOnRBD() throws {
        let conf = try Ceph.conf()
        var made: [String] = []
        addTeardownBlock { Ceph.remove(made, conf: conf) }
        try differential(clusterSize: 65536, backing: true, seed: 6) { tag in
            let n = Ceph.name(tag, conf: conf)
            made.append(n)
            return n
        }
    }

    /// Ops per image; several thousand in all.
    let opCount = 1500
    let size = 24 << 20

    /// `place` names each image (by a tag: base, strata, qemu): files in a scratch folder by default.
    func differential(clusterSize cs: Int, backing: Bool, seed: UInt64, options: String = "",
                      place: ((String) -> String)? = nil) throws {
        let dir = try Peer.tempDir(self)
        let name = place ?? { "\(dir)/\($0).qcow2" }
        let strata = try Peer.strata()
        var backingArgs: [String] = []
        if backing {
            let base = name("base")
            try Peer.ok(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", base, "\(size)"])
            var rng = SeededRandom(seed: seed &* 77)
            var cmds: [String] = []
            for i in 0..<200 {
                cmds += ["-c", "write -P \(i % 200 + 20) \(rng.next() % UInt64(size - 200_000)) \(rng.next() % 200_000 + 1)"]
            }
            try Peer.ok(["qemu-io", "-f", "qcow2", base] + cmds)
            backingArgs = ["-b", base, "-F", "qcow2"]
        }
        let a = name("strata"), b = name("qemu")
        try Peer.ok([strata, "create", "-f", "qcow2", "-o", "cluster_size=\(cs)\(options)"] + backingArgs + [a, "\(size)"])
        try Peer.ok(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=\(cs)\(options)"] + backingArgs + [b, "\(size)"])

        var rng = SeededRandom(seed: seed)
        var cmds: [String] = []
        for i in 0..<opCount {
            let off = rng.next() % UInt64(size - 3 * cs)
            let len = rng.next() % UInt64(3 * cs) + 1
            switch rng.next() % 10 {
            case 0...5: cmds.append("write -P \(i % 251 + 1) \(off) \(len)")
            case 6: cmds.append("write -z \(off) \(len)")
            case 7: cmds.append("write -z -u \(off) \(len)")
            case 8: cmds.append("discard \(off / UInt64(cs) * UInt64(cs)) \((len / UInt64(cs) + 1) * UInt64(cs))")
            default: cmds.append("flush")
            }
        }
        // Apply in batches so a failure names a smaller window.
        for start in stride(from: 0, to: cmds.count, by: 500) {
            let batch = cmds[start..<min(start + 500, cmds.count)].flatMap { ["-c", $0] }
            try Peer.ok([strata, "io", "-f", "qcow2", a] + batch)
            try Peer.ok(["qemu-io", "-f", "qcow2", b] + batch)
        }
        let cmp = try Peer.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", a, b])
        XCTAssertEqual(cmp.status, 0, "qemu-img compare: \(cmp.out)\(cmp.err)")
        for img in [a, b] {
            let check = try Peer.run(["qemu-img", "check", img])
            XCTAssertEqual(check.status, 0, "qemu-img check \(img): \(check.out)\(check.err)")
        }
        // And strata agrees with itself.
        let scmp = try Peer.run([strata, "compare", a, b])
        XCTAssertEqual(scmp.status, 0, "strata compare: \(scmp.out)\(scmp.err)")
    }
}
