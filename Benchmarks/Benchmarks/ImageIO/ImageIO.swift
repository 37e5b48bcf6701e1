import Benchmark
import Strata

#if canImport(Glibc)
import Glibc
#endif

// Library-level I/O through `BlockDevice`: a 1 GiB qcow2 image (64 KiB clusters, writeback
// cache), the same with 4 KiB clusters (`qcow2-4k`), and a 1 GiB raw file (`RawImage`, which
// is pread/pwrite on the file), the same four workloads on each, so they compare in one run:
//
//   random read 4 KiB        fully written disk
//   random write 4 KiB       fully written disk (overwrites: no allocation)
//   sequential read 1 MiB    fully written disk
//   sequential write 1 MiB   fresh disk (qcow2: every write allocates clusters; raw: a sparse file)
//
// plus one qcow2-only case: random 4 KiB writes to a fresh image, each to a cluster not yet
// allocated (copy-on-write of a zero cluster).
//
// Files live in $STRATA_BENCH_DIR, else $TMPDIR/strata-bench, else /tmp/strata-bench. Every
// benchmark runs in its own process (package-benchmark's way), so the two fully written 1 GiB
// files are made once and reused by later benchmarks and later runs; `rm -rf` that folder to
// reclaim the 2 GiB. Fresh files are deleted in teardown. All files stay in the page cache
// (read benchmarks read the whole disk in setup to make sure), so this measures the engine,
// not the disk.
// Nothing is flushed inside the measured loop: both formats complete into the page cache.

let diskSize: UInt64 = 1 << 30
/// The cluster size of the allocating benchmark's image.
let clusterSize = 64 << 10
let smallIO = 4 << 10
let largeIO = 1 << 20

/// Time, rate, heap allocations and I/O system calls per operation. (CPU time is left out: on
/// Linux it is counted in 10 ms ticks, longer than most iterations here.)
let metrics: [BenchmarkMetric] = [.wallClock, .throughput, .mallocCountTotal, .readSyscalls, .writeSyscalls]

let benchmarks: @Sendable () -> Void = {
    let fast = Benchmark.Configuration(
        metrics: metrics,
        warmupIterations: 3,
        scalingFactor: .kilo,
        maxDuration: .seconds(4),
        maxIterations: 10_000)
    let large = Benchmark.Configuration(
        metrics: metrics,
        warmupIterations: 8,
        scalingFactor: .one,
        maxDuration: .seconds(4),
        // A fresh 1 GiB disk holds 1024 one-MiB writes; warmup plus measured iterations stay
        // below that, so every measured sequential write to a fresh disk allocates.
        maxIterations: 1000)
    let allocating = Benchmark.Configuration(
        metrics: metrics,
        warmupIterations: 16,
        scalingFactor: .one,
        maxDuration: .seconds(4),
        // 16384 clusters in the disk: every measured write lands in an unallocated one.
        maxIterations: 16_000)

    // What the harness itself costs per unscaled iteration (its own allocations and reads of
    // /proc are counted too): subtract it from the 1 MiB and allocating rows.
    Benchmark("baseline: empty iteration", configuration: large) { benchmark in
        for i in benchmark.scaledIterations { blackHole(i) }
    }

    for format in DiskFormat.allCases {
        Benchmark("\(format) random read 4 KiB", configuration: fast) { benchmark in
            let d = Fixture.shared!
            for _ in benchmark.scaledIterations {
                try d.device.read(into: d.buffer(smallIO), at: d.randomOffset(alignment: smallIO))
            }
        } setup: {
            Fixture.shared = try Fixture(format: format, prefilled: true)
        } teardown: {
            try Fixture.shared?.finish()
        }

        Benchmark("\(format) random write 4 KiB", configuration: fast) { benchmark in
            let d = Fixture.shared!
            for _ in benchmark.scaledIterations {
                try d.device.write(UnsafeRawBufferPointer(d.buffer(smallIO)), at: d.randomOffset(alignment: smallIO), fua: false)
            }
        } setup: {
            Fixture.shared = try Fixture(format: format, prefilled: true)
        } teardown: {
            try Fixture.shared?.finish()
        }

        Benchmark("\(format) sequential read 1 MiB", configuration: large) { benchmark in
            let d = Fixture.shared!
            for _ in benchmark.scaledIterations {
                try d.device.read(into: d.buffer(largeIO), at: d.nextSequential(largeIO))
            }
        } setup: {
            Fixture.shared = try Fixture(format: format, prefilled: true)
        } teardown: {
            try Fixture.shared?.finish()
        }

        Benchmark("\(format) sequential write 1 MiB (fresh)", configuration: large) { benchmark in
            let d = Fixture.shared!
            for _ in benchmark.scaledIterations {
                try d.device.write(UnsafeRawBufferPointer(d.buffer(largeIO)), at: d.nextSequential(largeIO), fua: false)
            }
        } setup: {
            Fixture.shared = try Fixture(format: format, prefilled: false)
        } teardown: {
            try Fixture.shared?.finish()
        }
    }

    Benchmark("qcow2 random write 4 KiB (fresh, allocating)", configuration: allocating) { benchmark in
        let d = Fixture.shared!
        for _ in benchmark.scaledIterations {
            try d.device.write(UnsafeRawBufferPointer(d.buffer(smallIO)), at: d.nextUnallocatedCluster(), fua: false)
        }
    } setup: {
        Fixture.shared = try Fixture(format: .qcow2, prefilled: false)
    } teardown: {
        try Fixture.shared?.finish()
    }
}

enum DiskFormat: String, CaseIterable, CustomStringConvertible {
    case qcow2, qcow2Small = "qcow2-4k", raw
    var description: String { rawValue }
    /// The cluster size of a qcow2 disk.
    var clusterSize: Int { self == .qcow2Small ? 4 << 10 : 64 << 10 }
}

/// One open disk and the state a benchmark walks it with. Each benchmark runs in a process of
/// its own, so there is one fixture at a time.
final class Fixture {
    nonisolated(unsafe) static var shared: Fixture?

    let device: any BlockDevice
    let path: String
    let isFresh: Bool
    private let data: UnsafeMutableRawBufferPointer
    private var rng = SplitMix64(seed: 0x5EED)
    private var cursor: UInt64 = 0
    private var clusterOrder: [UInt64] = []
    private var clusterIndex = 0

    init(format: DiskFormat, prefilled: Bool) throws {
        data = .allocate(byteCount: largeIO, alignment: 4096)
        for i in 0..<largeIO { data[i] = UInt8(truncatingIfNeeded: i &* 31 &+ 7) }
        let dir = Fixture.directory()
        if prefilled {
            path = "\(dir)/prefilled-1g.\(format)"
            if access(path, F_OK) != 0 { try Fixture.makePrefilled(format: format, at: path, pattern: UnsafeRawBufferPointer(data)) }
        } else {
            path = "\(dir)/fresh-\(getpid()).\(format)"
            try Fixture.makeEmpty(format: format, at: path)
        }
        isFresh = !prefilled
        device = try Fixture.open(format: format, at: path)
        if prefilled { try warm() }
    }

    /// Reads the whole disk once, so its data (and for qcow2 its L2 tables) are in memory when
    /// measuring starts. The file may have been made minutes ago, and this kind of machine
    /// reclaims page cache that has gone cold (kdamond runs here), which turns 2 µs reads into
    /// 25 µs ones.
    private func warm() throws {
        var offset: UInt64 = 0
        while offset < diskSize {
            try device.read(into: data, at: offset)
            offset += UInt64(largeIO)
        }
        for i in 0..<largeIO { data[i] = UInt8(truncatingIfNeeded: i &* 31 &+ 7) }
    }

    static func directory() -> String {
        let dir = environment("STRATA_BENCH_DIR") ?? "\(environment("TMPDIR") ?? "/tmp")/strata-bench"
        mkdir(dir, 0o755)
        return dir
    }

    static func open(format: DiskFormat, at path: String) throws -> any BlockDevice {
        switch format {
        case .qcow2, .qcow2Small: return try Qcow2Image(path: path, options: OpenOptions(writable: true, cache: .writeback))
        case .raw: return try RawImage(path: path, writable: true)
        }
    }

    static func makeEmpty(format: DiskFormat, at path: String) throws {
        switch format {
        case .qcow2, .qcow2Small:
            var options = CreateOptions(size: diskSize)
            options.clusterSize = format.clusterSize
            try Qcow2Image.create(path: path, options: options)
        case .raw:
            let file = try FileStorage(creating: path)
            defer { file.close() }
            try file.setLength(diskSize)
        }
    }

    /// Writes the whole disk once under a temporary name, then renames it into place, so an
    /// interrupted setup never leaves a half-written file to be reused.
    static func makePrefilled(format: DiskFormat, at path: String, pattern: UnsafeRawBufferPointer) throws {
        let partial = "\(path).partial-\(getpid())"
        try makeEmpty(format: format, at: partial)
        let device = try open(format: format, at: partial)
        var offset: UInt64 = 0
        while offset < diskSize {
            try device.write(pattern, at: offset, fua: false)
            offset += UInt64(pattern.count)
        }
        try device.close()
        guard rename(partial, path) == 0 else { throw BenchmarkSetupError.rename(path, errno) }
    }

    func buffer(_ count: Int) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(rebasing: data[0..<count])
    }

    func randomOffset(alignment: Int) -> UInt64 {
        let slots = diskSize / UInt64(alignment)
        return (rng.next() % slots) * UInt64(alignment)
    }

    func nextSequential(_ count: Int) -> UInt64 {
        if cursor + UInt64(count) > diskSize { cursor = 0 }
        defer { cursor += UInt64(count) }
        return cursor
    }

    /// A 4 KiB-aligned offset inside a cluster no earlier call returned, in random order.
    func nextUnallocatedCluster() -> UInt64 {
        if clusterOrder.isEmpty {
            clusterOrder = Array(0..<(diskSize / UInt64(clusterSize)))
            for i in stride(from: clusterOrder.count - 1, to: 0, by: -1) {
                clusterOrder.swapAt(i, Int(rng.next() % UInt64(i + 1)))
            }
        }
        let cluster = clusterOrder[clusterIndex % clusterOrder.count]
        clusterIndex += 1
        let within = (rng.next() % UInt64(clusterSize / smallIO)) * UInt64(smallIO)
        return cluster * UInt64(clusterSize) + within
    }

    func finish() throws {
        try device.close()
        if isFresh { unlink(path) }
        data.deallocate()
        Fixture.shared = nil
    }
}

enum BenchmarkSetupError: Error {
    case rename(String, Int32)
}

/// A tiny deterministic generator: the same offsets every run, and no system call per number.
struct SplitMix64 {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

func environment(_ name: String) -> String? {
    getenv(name).map { String(cString: $0) }
}
