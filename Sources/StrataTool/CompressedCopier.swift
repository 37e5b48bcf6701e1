import Dispatch
import Strata
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Copies `src` into a blank qcow2 image with every cluster that holds data compressed
/// (`convert -c`, `template create -c`).
///
/// A bounded pool of workers (one per core, at most `workers`) each takes the next chunk of
/// the disk in order, reads it and compresses its clusters into its own reused buffers; the
/// chunks are then written strictly in disk order, each worker waiting for its turn (a ring
/// of one semaphore per worker). Compression runs in parallel, but the image receives the
/// same writes in the same order whatever the number of workers, so its bytes are the same.
/// Clusters that read as zeroes are left out; clusters that do not shrink are stored
/// uncompressed.
final class CompressedCopier: Sendable {
    let src: any BlockDevice
    let dst: Qcow2Image
    let bar: ProgressBar
    /// Bytes read and compressed at once per worker: a whole number of clusters.
    let chunkSize: Int
    let clusterSize: Int

    init(src: any BlockDevice, dst: Qcow2Image, bar: ProgressBar) {
        self.src = src
        self.dst = dst
        self.bar = bar
        clusterSize = Int(dst.header.clusterSize)
        chunkSize = max(Copier.chunkSize, clusterSize)
    }

    /// One worker's reused buffers: the chunk read, and its clusters' compressed bytes.
    final class Slot {
        let chunk: ChunkBuffer
        let packed: ChunkBuffer
        let compressor: ClusterCompressor
        /// Per cluster of the chunk: nil to skip (zeroes), else the compressed range in
        /// `packed` (empty when the cluster is stored uncompressed).
        var plan: [Range<Int>?] = []

        init(chunkSize: Int, compressor: ClusterCompressor) {
            chunk = ChunkBuffer(count: chunkSize)
            packed = ChunkBuffer(count: chunkSize)
            self.compressor = compressor
        }
    }

    /// The worker count used for `requested` workers: no more than the cores.
    static func poolSize(_ requested: Int) -> Int {
        max(1, min(requested, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))))
    }

    func run(workers requested: Int) throws {
        // The chunks holding any data, in order.
        var chunks: [UInt64] = []
        let chunk = UInt64(chunkSize)
        try src.forEachRun(from: 0, to: src.size) { offset, length, extent in
            if extent?.status.contains(.zero) ?? false { return true }
            for c in (offset / chunk)...((offset + length - 1) / chunk) where chunks.last != c * chunk {
                chunks.append(c * chunk)
            }
            return true
        }
        let n = min(Self.poolSize(requested), max(chunks.count, 1))
        let turns = (0..<n).map { _ in DispatchSemaphore(value: 0) }
        turns[0].signal()
        let next = Atomic<Int>(0)
        let failure = Mutex<(any Error)?>(nil)
        let slots = (0..<n).map { _ in Slot(chunkSize: chunkSize, compressor: dst.makeCompressor()) }
        nonisolated(unsafe) let shared = slots
        DispatchQueue.concurrentPerform(iterations: n) { w in
            let slot = shared[w]
            while true {
                let i = next.add(1, ordering: .relaxed).oldValue
                guard i < chunks.count else { return }
                var ok = failure.withLock { $0 == nil }
                if ok {
                    do { try compress(chunks[i], into: slot) } catch {
                        failure.withLock { if $0 == nil { $0 = error } }
                        ok = false
                    }
                }
                turns[i % n].wait()
                if ok && failure.withLock({ $0 == nil }) {
                    do { try write(chunks[i], from: slot) } catch {
                        failure.withLock { if $0 == nil { $0 = error } }
                    }
                }
                turns[(i + 1) % n].signal()
            }
        }
        if let error = failure.withLock({ $0 }) { throw error }
    }

    /// Reads the chunk at `start` and compresses its clusters that hold data.
    private func compress(_ start: UInt64, into slot: Slot) throws {
        let length = Int(min(UInt64(chunkSize), src.size - start))
        let bytes = slot.chunk.prefix(length)
        try src.read(into: bytes, at: start)
        slot.plan.removeAll(keepingCapacity: true)
        var packedEnd = 0
        var pos = 0
        while pos < length {
            let n = min(clusterSize, length - pos)
            let cluster = UnsafeRawBufferPointer(rebasing: bytes[pos..<pos + n])
            if ZeroBuffer.isZero(cluster) {
                slot.plan.append(nil)
            } else if let packed = slot.compressor.compress(cluster) {
                UnsafeMutableRawBufferPointer(rebasing: slot.packed.bytes[packedEnd..<packedEnd + packed.count]).copyMemory(from: packed)
                slot.plan.append(packedEnd..<packedEnd + packed.count)
                packedEnd += packed.count
            } else {
                slot.plan.append(packedEnd..<packedEnd)
            }
            pos += n
        }
    }

    /// Writes the compressed chunk at `start` (its turn has come).
    private func write(_ start: UInt64, from slot: Slot) throws {
        let length = Int(min(UInt64(chunkSize), src.size - start))
        for (k, range) in slot.plan.enumerated() {
            let pos = k * clusterSize
            let n = min(clusterSize, length - pos)
            guard let range else { continue }
            let cluster = UnsafeRawBufferPointer(rebasing: slot.chunk.bytes[pos..<pos + n])
            let packed = range.isEmpty ? nil : UnsafeRawBufferPointer(rebasing: slot.packed.bytes[range])
            try dst.writeCompressed(precompressed: packed, cluster: cluster, at: start + UInt64(pos))
        }
        bar.advance(by: UInt64(length))
    }
}
