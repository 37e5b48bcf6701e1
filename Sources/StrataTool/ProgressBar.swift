import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// qemu-img's `-p` progress line, `    (12.34/100%)` rewritten in place with `\r`, on stdout
/// as qemu-img prints it (its result lines, such as compare's, follow on the same line).
/// Shown at 0% when made, whenever it has moved by more than `minStep` points or reached
/// 100%, and on ``complete()``; ``end()`` ends the line. Safe to advance from several threads.
final class ProgressBar: Sendable {
    private struct State {
        var done: UInt64 = 0
        var lastShown: Double = 0
    }
    private let total: UInt64
    private let enabled: Bool
    /// Percentage points the value must move by to be shown again (qemu-img: 1 for
    /// convert, 2 for compare).
    private let minStep: Double
    private let state = Mutex(State())

    init(enabled: Bool, total: UInt64, minStep: Double) {
        self.enabled = enabled
        self.total = total
        self.minStep = minStep
        if enabled { show(0) }
    }

    /// Records `bytes` more as done.
    func advance(by bytes: UInt64) {
        guard enabled else { return }
        state.withLock { s in
            s.done += bytes
            let percent = total == 0 ? 100 : min(100, Double(s.done) * 100 / Double(total))
            guard abs(percent - s.lastShown) > minStep || percent == 100 else { return }
            s.lastShown = percent
            show(percent)
        }
    }

    /// Shows 100% (again, if advancing got there).
    func complete() {
        guard enabled else { return }
        state.withLock { s in
            s.done = total
            s.lastShown = 100
            show(100)
        }
    }

    /// Ends the line (after the result, or where the bar stands when the work stopped early).
    func end() {
        guard enabled else { return }
        fputs("\n", stdout)
        fflush(stdout)
    }

    private func show(_ percent: Double) {
        fputs(HumanFormat.c("    (%3.2f/100%%)\r", percent), stdout)
        fflush(stdout)
    }
}
