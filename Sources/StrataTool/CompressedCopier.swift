import Dispatch
import Strata
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Copies `src` into a qcow2 image with every cluster that holds data compressed
/// (`convert -c`, `template create -c`), for any ``Copier/Target``: into a blank image zero
/// clusters are left out; into an existing one (`-n`) they are written as zeroes; onto a
/// backing file (`-B`) only the clusters the source's top image touches are written.
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
    let target: Copier.Target
    let bar: ProgressBar
    /// Bytes read and compressed at once per worker: a whole number of clusters.
    let chunkSize: Int
    let clusterSize: Int

    init(src: any BlockDevice, dst: Qcow2Image, target: Copier.Target = .blank, bar: ProgressBar) {
        self.src = src
        self.dst = dst
        self.target = target
        self.bar = bar
        clusterSize = Int(dst.header.clusterSize)
        chunkSize = max(Copier.chunkSize, clusterSize)
    }

    /// One chunk of the disk to copy: ranges to write as zeroes first, then whether any
    /// cluster holds data, and (onto a backing file) which clusters the top image touches.
    struct Chunk {
        var start: UInt64
        var zeroes: [Range<UInt64>] = []
        var hasData = false
        var touched: [Bool] = []
    }

    /// What is written for one cluster of a chunk.
    enum ClusterPlan {
        /// Nothing (zeroes into a blank image, or left to the backing file).
        case skip
        /// Zeroes, through the entry.
        case zero
        /// Stored compressed: these bytes of the slot's `packed` buffer.
        case packed(Range<Int>)
        /// Stored uncompressed (it did not shrink).
        case raw
    }

    /// One worker's reused buffers: the chunk read, and its clusters' compressed bytes.
    final class Slot {
        let chunk: ChunkBuffer
        let packed: ChunkBuffer
        let compressor: ClusterCompressor
        /// Per cluster of the chunk.
        var plan: [ClusterPlan] = []

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
        // The chunks with anything to write, in order.
        var chunks: [Chunk] = []
        let chunk = UInt64(chunkSize)
        let cs = UInt64(clusterSize)
        try src.forEachRun(from: 0, to: src.size) { offset, length, extent in
            if target == .onBacking, let extent, extent.depth != 1 { return true }  // the backing file has it
            let zero = extent?.status.contains(.zero) ?? false
            if zero && target == .blank { return true }
            for c in (offset / chunk)...((offset + length - 1) / chunk) {
                let start = c * chunk
                if chunks.last?.start != start { chunks.append(Chunk(start: start)) }
                let lo = max(offset, start), hi = min(offset + length, start + chunk)
                if zero {
                    chunks[chunks.count - 1].zeroes.append(lo..<hi)
                } else {
                    chunks[chunks.count - 1].hasData = true
                    if target == .onBacking {
                        if chunks[chunks.count - 1].touched.isEmpty {
                            chunks[chunks.count - 1].touched = [Bool](repeating: false, count: Int(chunk / cs))
                        }
                        for k in ((lo - start) / cs)...((hi - 1 - start) / cs) { chunks[chunks.count - 1].touched[Int(k)] = true }
                    }
                }
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

    /// Reads the chunk and compresses its clusters that hold data.
    private func compress(_ c: Chunk, into slot: Slot) throws {
        slot.plan.removeAll(keepingCapacity: true)
        guard c.hasData else { return }
        let length = Int(min(UInt64(chunkSize), src.size - c.start))
        let bytes = slot.chunk.prefix(length)
        try src.read(into: bytes, at: c.start)
        var packedEnd = 0
        var pos = 0
        while pos < length {
            let n = min(clusterSize, length - pos)
            let cluster = UnsafeRawBufferPointer(rebasing: bytes[pos..<pos + n])
            if !c.touched.isEmpty && !c.touched[pos / clusterSize] {
                slot.plan.append(.skip)
            } else if ZeroBuffer.isZero(cluster) {
                slot.plan.append(target == .blank ? .skip : .zero)
            } else if let packed = slot.compressor.compress(cluster) {
                UnsafeMutableRawBufferPointer(rebasing: slot.packed.bytes[packedEnd..<packedEnd + packed.count]).copyMemory(from: packed)
                slot.plan.append(.packed(packedEnd..<packedEnd + packed.count))
                packedEnd += packed.count
            } else {
                slot.plan.append(.raw)
            }
            pos += n
        }
    }

    /// Writes the chunk (its turn has come): its zero ranges, then its clusters.
    private func write(_ c: Chunk, from slot: Slot) throws {
        let length = Int(min(UInt64(chunkSize), src.size - c.start))
        let dstSize = dst.size
        for r in c.zeroes {
            try dst.writeZeroes(at: r.lowerBound, length: UInt64(r.count), mayUnmap: true, fua: false)
        }
        for (k, plan) in slot.plan.enumerated() {
            let pos = k * clusterSize
            let n = min(clusterSize, length - pos)
            let at = c.start + UInt64(pos)
            let cluster = UnsafeRawBufferPointer(rebasing: slot.chunk.bytes[pos..<pos + n])
            if n < clusterSize, at + UInt64(n) < dstSize {
                // The source's partial last cluster inside a larger existing image is not a
                // whole cluster there: an ordinary write.
                switch plan {
                case .skip: break
                case .zero: try dst.writeZeroes(at: at, length: UInt64(n), mayUnmap: true, fua: false)
                case .raw, .packed: try dst.write(cluster, at: at, fua: false)
                }
                continue
            }
            switch plan {
            case .skip: continue
            case .zero: try dst.writeZeroes(at: at, length: UInt64(n), mayUnmap: true, fua: false)
            case .raw: try dst.writeCompressed(precompressed: nil, cluster: cluster, at: at)
            case .packed(let r): try dst.writeCompressed(precompressed: UnsafeRawBufferPointer(rebasing: slot.packed.bytes[r]), cluster: cluster, at: at)
            }
        }
        bar.advance(by: UInt64(length))
    }
}
