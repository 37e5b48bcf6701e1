import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// qemu-img's `-p` progress line, `    (12.34/100%)` rewritten in place with `\r`, on stderr
/// (so stdout stays clean for scripts). Prints when the value moves by at least 1% and at the
/// end. Safe to advance from several threads.
final class ProgressBar: Sendable {
    private struct State {
        var done: UInt64 = 0
        var lastShown: Double = -100
    }
    private let total: UInt64
    private let enabled: Bool
    private let state = Mutex(State())

    init(enabled: Bool, total: UInt64) {
        self.enabled = enabled
        self.total = total
        show(force: true)
    }

    /// Records `bytes` more as done.
    func advance(by bytes: UInt64) {
        guard enabled else { return }
        state.withLock { $0.done += bytes }
        show(force: false)
    }

    /// Prints 100% and ends the line.
    func finish() {
        guard enabled else { return }
        state.withLock { $0.done = total }
        show(force: true)
        fputs("\n", stderr)
    }

    /// Ends the line where the bar stands (an early stop, e.g. a mismatch).
    func stop() {
        guard enabled else { return }
        fputs("\n", stderr)
    }

    private func show(force: Bool) {
        guard enabled else { return }
        state.withLock { s in
            let percent = total == 0 ? 100 : min(100, Double(s.done) * 100 / Double(total))
            guard force || percent - s.lastShown >= 1 else { return }
            s.lastShown = percent
            fputs(HumanFormat.c("    (%3.2f/100%%)\r", percent), stderr)
        }
    }
}
