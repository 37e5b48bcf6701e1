import Foundation

/// The throw-away Ceph cluster `scripts/test.sh` starts (`scripts/ceph-cluster.sh`): its
/// ceph.conf comes in `STRATA_CEPH_CONF`, with a pool named `strata`. Tests that need it fail
/// with the reason when there is none (`STRATA_CEPH_ERROR`, or how to start one); they are
/// never skipped.
public enum Ceph {
    public struct Unavailable: Error, CustomStringConvertible {
        public var description: String
    }

    public static let pool = "strata"

    /// The cluster's ceph.conf, or the reason there is none.
    public static func conf() throws -> String {
        let env = ProcessInfo.processInfo.environment
        if let conf = env["STRATA_CEPH_CONF"], !conf.isEmpty, FileManager.default.fileExists(atPath: conf) { return conf }
        let why = env["STRATA_CEPH_ERROR"].map { "the test cluster did not start: \($0)" }
            ?? "no Ceph cluster: run the suite with scripts/test.sh, or start one with 'scripts/ceph-cluster.sh start /tmp/sc' and export STRATA_CEPH_CONF=/tmp/sc/ceph.conf"
        throw Unavailable(description: why)
    }

    /// A fresh image name in the pool for this test (`rbd:strata/T-RANDOM:conf=…`); nothing
    /// is created.
    public static func name(_ tag: String, conf: String) -> String {
        "rbd:\(pool)/\(tag)-\(UUID().uuidString.prefix(8).lowercased()):conf=\(conf)"
    }

    /// The image part of an `rbd:` name (for the `rbd` command).
    public static func image(of name: String) -> String {
        let spec = name.dropFirst(4).split(separator: ":", maxSplits: 1)[0]
        return String(spec)
    }

    /// Removes images by their `rbd:` names (snapshots first); quiet when they are missing.
    public static func remove(_ names: [String], conf: String) {
        for n in names {
            let spec = image(of: n)
            _ = try? runProcess(["rbd", "-c", conf, "snap", "purge", spec], timeout: 60)
            _ = try? runProcess(["rbd", "-c", conf, "rm", "--no-progress", spec], timeout: 60)
        }
    }
}
