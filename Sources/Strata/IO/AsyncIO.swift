import Synchronization

/// The reads or writes one request has in flight on a store that works asynchronously (RBD),
/// started without waiting by ``BlockDevice/startRead(at:length:runs:io:)`` or
/// ``BlockDevice/startWrite(_:at:io:)``. `completion` runs once, on the thread that ends the
/// last one (or the starter's, if that is last), with true when every one succeeded and the
/// starter finished starting them. With false, the caller redoes the request on a thread that
/// may block (which reports any error); the buffers used must stay alive until `completion`
/// runs either way. (A write redone writes the same bytes to the same place again.)
public final class AsyncIO: @unchecked Sendable {
    /// Requests in flight, plus one for the starter until ``finishStarting(ok:)``.
    private let pending = Atomic<Int>(1)
    private let failed = Atomic<Bool>(false)
    /// Run before `completion`, in order: releases of what the reads held (I/O tokens).
    /// Written only by the starter, before ``finishStarting(ok:)``.
    private var releases: [() -> Void] = []
    private let completion: @Sendable (Bool) -> Void

    public init(completion: @escaping @Sendable (Bool) -> Void) {
        self.completion = completion
    }

    /// A request started (by the store, before it is submitted).
    func begin() { pending.add(1, ordering: .relaxed) }

    /// A request ended (by the store's completion).
    func end(ok: Bool) {
        if !ok { failed.store(true, ordering: .relaxed) }
        if pending.subtract(1, ordering: .acquiringAndReleasing).newValue == 0 { finish() }
    }

    /// Keeps something held until every request has ended (the starter only).
    public func hold(until release: @escaping () -> Void) { releases.append(release) }

    /// The starter has submitted every request it will (`ok`), or gave up part way (false).
    public func finishStarting(ok: Bool) { end(ok: ok) }

    private func finish() {
        for r in releases { r() }
        completion(!failed.load(ordering: .acquiring))
    }
}
