import Foundation
import XCTest

/// `strata info` and `strata map` print what qemu-img prints, on images made by either tool.
final class InfoMapTests: ToolTestCase {
    /// Option sets that exercise every field of qemu-img's qcow2 info.
    let variants: [(name: String, options: String)] = [
        ("default", ""),
        ("v2-4k", "compat=0.10,cluster_size=4k"),
        ("zstd-lazy-ext", "compression_type=zstd,lazy_refcounts=on,extended_l2=on,refcount_bits=8"),
        ("small-64bit", "cluster_size=512,refcount_bits=64"),
    ]

    func testInfoJSONEqualsQemuForImagesMadeByBothTools() throws {
        for v in variants {
            var qemuArgs = ["create", "-q", "-f", "qcow2"]
            var strataArgs = ["create", "-q", "-f", "qcow2"]
            if !v.options.isEmpty { qemuArgs += ["-o", v.options]; strataArgs += ["-o", v.options] }
            ok(try run(Self.qemuImg!, qemuArgs + ["q-\(v.name).qcow2", "5M"]), "qemu-img create \(v.name)")
            ok(try run(Self.strataBinary!, strataArgs + ["s-\(v.name).qcow2", "5M"]), "strata create \(v.name)")

            for image in ["q-\(v.name).qcow2", "s-\(v.name).qcow2"] {
                let ours = ok(try strata("info", "--output", "json", image), "strata info")
                let theirs = ok(try qemuImg("info", "--output", "json", image), "qemu-img info")
                let a = json(ours.stdout) as? NSDictionary, b = json(theirs.stdout) as? NSDictionary
                XCTAssertNotNil(a)
                XCTAssertEqual(a, b, "info --output json of \(image)")
                // Byte for byte too (same key order and layout as QEMU).
                XCTAssertEqual(ours.stdout, theirs.stdout, "info json text of \(image)")
                // Human output, line for line.
                XCTAssertEqual(try strata("info", image).stdout, try qemuImg("info", image).stdout, "human info of \(image)")
            }
            // The image strata made describes itself like the one qemu-img made (all but
            // the file name and the bytes on disk).
            let q = json(try qemuImg("info", "--output", "json", "q-\(v.name).qcow2").stdout) as? [String: Any]
            let s = json(try qemuImg("info", "--output", "json", "s-\(v.name).qcow2").stdout) as? [String: Any]
            for key in ["virtual-size", "cluster-size", "format", "dirty-flag", "format-specific"] {
                XCTAssertEqual(q?[key] as? NSObject, s?[key] as? NSObject, "\(v.name): \(key) of a strata-made image")
            }
        }
    }

    func testInfoBackingChainJSONEqualsQemu() throws {
        ok(try qemuImg("create", "-q", "-f", "raw", "base.raw", "4M"), "create base")
        ok(try strata("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "mid.qcow2"), "strata create mid")
        ok(try qemuImg("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "8M"), "qemu create top")
        for args in [["info", "--output", "json", "--backing-chain", "top.qcow2"],
                     ["info", "--output", "json", "top.qcow2"],
                     ["info", "--backing-chain", "top.qcow2"],
                     ["info", "--output=json", path("top.qcow2")]] {
            let ours = ok(try run(Self.strataBinary!, args), "strata \(args)")
            let theirs = ok(try run(Self.qemuImg!, args), "qemu-img \(args)")
            XCTAssertEqual(ours.stdout, theirs.stdout, "\(args)")
            if args.contains("json") {
                XCTAssertEqual(json(ours.stdout) as? NSObject, json(theirs.stdout) as? NSObject)
            }
        }
        let chain = json(try strata("info", "--output", "json", "--backing-chain", "top.qcow2").stdout) as? [[String: Any]]
        XCTAssertEqual(chain?.count, 3)
        XCTAssertEqual(chain?.map { $0["filename"] as? String }, ["top.qcow2", "mid.qcow2", "base.raw"])
        XCTAssertEqual(chain.flatMap { $0.count > 1 ? $0[1]["backing-filename-format"] as? String : nil }, "raw")
    }

    func testInfoWithMissingBackingFileStillDescribesTheImage() throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", "orphan.qcow2", "1M"), "create orphan")
        let ours = ok(try strata("info", "--output", "json", "orphan.qcow2"), "strata info orphan")
        let theirs = ok(try qemuImg("info", "--output", "json", "orphan.qcow2"), "qemu-img info orphan")
        XCTAssertEqual(json(ours.stdout) as? NSDictionary, json(theirs.stdout) as? NSDictionary)
        // Reading it needs the backing file: one clear error naming it.
        assertUserError(try strata("map", "orphan.qcow2"), mentions: ["gone.qcow2"])
    }

    /// A chain with every kind of range: data in the top, data in the backing file, zero
    /// clusters at both levels, ranges nobody allocates, and a top bigger than its backing.
    func makeChain() throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "base.qcow2", "10M"), "create base")
        ok(try qemuIO("-c", "write -P 1 0 128k", "-c", "write -z 1M 64k", "-c", "write -P 9 3M 192k", "base.qcow2"), "fill base")
        ok(try strata("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", "12M"), "strata create top")
        ok(try strata("io", "-c", "write -P 2 64k 128k", "-c", "write -z 2M 128k", "-c", "write -P 3 4M 4k",
                      "-c", "write -z 3M 64k", "-c", "write -P 4 11M 64k", "top.qcow2"), "fill top")
    }

    func testMapJSONEqualsQemuOnAChain() throws {
        try makeChain()
        for image in ["top.qcow2", "base.qcow2"] {
            let ours = ok(try strata("map", "--output", "json", image), "strata map \(image)")
            let theirs = ok(try qemuImg("map", "--output", "json", image), "qemu-img map \(image)")
            XCTAssertEqual(json(ours.stdout) as? NSArray, json(theirs.stdout) as? NSArray, "map json of \(image)")
            XCTAssertEqual(ours.stdout, theirs.stdout, "map json text of \(image)")
            XCTAssertEqual(try strata("map", image).stdout, try qemuImg("map", image).stdout, "human map of \(image)")
        }
        // The chain really has all the kinds of entries the test means to cover.
        let entries = json(try strata("map", "--output", "json", "top.qcow2").stdout) as? [[String: Any]] ?? []
        func has(_ depth: Int, present: Bool, zero: Bool, data: Bool) -> Bool {
            entries.contains { ($0["depth"] as? Int) == depth && ($0["present"] as? Bool) == present
                && ($0["zero"] as? Bool) == zero && ($0["data"] as? Bool) == data }
        }
        XCTAssertTrue(has(0, present: true, zero: false, data: true), "top data")
        XCTAssertTrue(has(1, present: true, zero: false, data: true), "backing data")
        XCTAssertTrue(has(0, present: true, zero: true, data: false), "top zero cluster")
        XCTAssertTrue(has(1, present: true, zero: true, data: false), "backing zero cluster")
        XCTAssertTrue(has(1, present: false, zero: true, data: false), "unallocated everywhere")
        XCTAssertTrue(has(0, present: false, zero: true, data: false), "past the end of the backing file")
        // --start-offset / --max-length as qemu-img.
        let window = ["map", "--output=json", "--start-offset=64k", "--max-length=3M", "top.qcow2"]
        XCTAssertEqual(try run(Self.strataBinary!, window).stdout, try run(Self.qemuImg!, window).stdout)
    }

    func testMapJSONEqualsQemuWithRawBackingAndCompressedClusters() throws {
        try truncate("back.raw", to: 4 << 20)
        try write("back.raw", noise(65536, seed: 7), at: 1 << 20)
        ok(try strata("create", "-q", "-f", "qcow2", "-b", "back.raw", "-F", "raw", "over.qcow2", "6M"), "create over raw")
        ok(try strata("io", "-c", "write -P 1 0 64k", "over.qcow2"), "write over")
        // Compressed clusters (made by qemu-img; strata does not write compressed data).
        try truncate("plain.raw", to: 4 << 20)
        try write("plain.raw", noise(1 << 20, seed: 3), at: 0)
        try write("plain.raw", [UInt8](repeating: 0x61, count: 1 << 20), at: 2 << 20)
        ok(try qemuImg("convert", "-c", "-O", "qcow2", "plain.raw", "packed.qcow2"), "qemu-img convert -c")
        for image in ["over.qcow2", "back.raw", "packed.qcow2", "plain.raw"] {
            let ours = ok(try strata("map", "--output", "json", image), "strata map \(image)")
            let theirs = ok(try qemuImg("map", "--output", "json", image), "qemu-img map \(image)")
            XCTAssertEqual(json(ours.stdout) as? NSArray, json(theirs.stdout) as? NSArray, "map json of \(image)")
            XCTAssertEqual(ours.stdout, theirs.stdout, "map json text of \(image)")
        }
        // Human map refuses compressed data like qemu-img (status 1), after the lines before it.
        let ours = try strata("map", "packed.qcow2"), theirs = try qemuImg("map", "packed.qcow2")
        XCTAssertEqual(ours.status, 1)
        XCTAssertEqual(theirs.status, 1)
        XCTAssertEqual(ours.stdout, theirs.stdout)
        XCTAssertEqual(ours.stderrLines.count, 1)
    }

    /// A zero cluster that keeps its host cluster (`write -z`) next to one that dropped it
    /// (`write -z -u`): qemu-img shows an offset for the first only, and no data for either.
    func testMapZeroClustersKeepOnlyTheirOwnHostOffsets() throws {
        ok(try qemuImg("create", "-q", "-f", "qcow2", "z.qcow2", "4M"), "create")
        ok(try qemuIO("-c", "write -P 1 0 256k", "-c", "write -z 0 64k", "-c", "write -z -u 64k 64k", "z.qcow2"), "fill")
        let ours = ok(try strata("map", "--output", "json", "z.qcow2"), "strata map")
        let theirs = ok(try qemuImg("map", "--output", "json", "z.qcow2"), "qemu-img map")
        XCTAssertEqual(ours.stdout, theirs.stdout)
        XCTAssertEqual(try strata("map", "z.qcow2").stdout, try qemuImg("map", "z.qcow2").stdout)
    }
}
