import XCTest
@testable import Strata

/// `rbd:` names as QEMU spells them, and how backing names resolve under an RBD image.
final class RBDNameTests: XCTestCase {
    func testParsesQemusForms() throws {
        let n = try RBDName(parsing: "rbd:pool/img@snap:conf=/etc/ceph/x.conf:id=alice:mon_host=127.0.0.1\\:3300")
        XCTAssertEqual(n.pool, "pool")
        XCTAssertEqual(n.namespace, "")
        XCTAssertEqual(n.image, "img")
        XCTAssertEqual(n.snapshot, "snap")
        XCTAssertEqual(n.conf, "/etc/ceph/x.conf")
        XCTAssertEqual(n.id, "alice")
        XCTAssertEqual(n.options.map { "\($0)=\($1)" }, ["mon_host=127.0.0.1:3300"])
        XCTAssertEqual(n.description, "rbd:pool/img@snap:conf=/etc/ceph/x.conf:id=alice:mon_host=127.0.0.1\\:3300")
        XCTAssertEqual(n.canonical, "rbd:pool/img@snap")
        XCTAssertEqual(try RBDName(parsing: n.description), n)

        let ns = try RBDName(parsing: "rbd:pool/tenant/img")
        XCTAssertEqual(ns.namespace, "tenant")
        XCTAssertEqual(ns.image, "img")
        XCTAssertNil(ns.snapshot)
        XCTAssertNil(ns.conf)
    }

    func testRefusesMalformedNames() {
        for bad in ["rbd:", "rbd:pool", "rbd:pool/", "rbd:/img", "rbd:a/b/c/d", "rbd:p/i@", "rbd:p/i@a@b", "rbd:p/i:conf", "rbd:p/i:=x"] {
            XCTAssertThrowsError(try RBDName(parsing: bad), bad) { e in
                XCTAssertTrue("\(e)".contains("not an RBD image name"), "\(bad): \(e)")
            }
        }
        XCTAssertFalse(RBDName.isRBD("/tmp/rbd:x"))
        XCTAssertFalse(RBDName.isRBD("disk.qcow2"))
    }

    func testBackingNamesResolveInThePool() {
        let clone = "rbd:vms/clone1:conf=/c/ceph.conf:id=hv"
        // A bare name: the same pool, the overlay's cluster settings.
        XCTAssertEqual(BackingChain.resolve("tmpl", relativeTo: clone), "rbd:vms/tmpl:conf=/c/ceph.conf:id=hv")
        XCTAssertEqual(BackingChain.resolve("tmpl@gold", relativeTo: clone), "rbd:vms/tmpl@gold:conf=/c/ceph.conf:id=hv")
        // An rbd: name without settings takes the overlay's; with settings, its own.
        XCTAssertEqual(BackingChain.resolve("rbd:base/t", relativeTo: clone), "rbd:base/t:conf=/c/ceph.conf:id=hv")
        XCTAssertEqual(BackingChain.resolve("rbd:base/t:conf=/d.conf", relativeTo: clone), "rbd:base/t:conf=/d.conf")
        // A file path stays a file; a file overlay never makes an rbd: name relative.
        XCTAssertEqual(BackingChain.resolve("/srv/base.qcow2", relativeTo: clone), "/srv/base.qcow2")
        XCTAssertEqual(BackingChain.resolve("rbd:p/t", relativeTo: "/srv/vm.qcow2"), "rbd:p/t")
        XCTAssertEqual(BackingChain.resolve("base.qcow2", relativeTo: "/srv/vm.qcow2"), "/srv/base.qcow2")
        // Loop detection sees one image whatever the settings that reach it.
        XCTAssertEqual(BackingChain.realPath("rbd:vms/t:conf=/a"), BackingChain.realPath("rbd:vms/t:id=x"))
        XCTAssertEqual(Storage.sibling(of: clone, tag: "partial-7"), "rbd:vms/clone1.partial-7:conf=/c/ceph.conf:id=hv")
    }

    func testWithoutAClusterTheErrorSaysWhy() {
        // A monitor nobody listens on: the connection fails in bounded time with a reason.
        let name = "rbd:p/i:mon_host=127.0.0.1\\:9:client_mount_timeout=2"
        let start = ContinuousClock.now
        XCTAssertThrowsError(try Storage.open(name, mode: .readOnly)) { e in
            XCTAssertTrue("\(e)".hasPrefix("rbd:p/i"), "\(e)")
        }
        XCTAssertLessThan(ContinuousClock.now - start, .seconds(30))
        XCTAssertFalse(Storage.exists(name))
    }
}
