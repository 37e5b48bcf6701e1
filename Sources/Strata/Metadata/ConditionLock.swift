#if canImport(Glibc)
import Glibc
#endif

/// A mutex with a condition variable: the metadata lock of an image. Writers that find a
/// cluster being allocated by someone else wait on it; flush waits on it for in-flight I/O
/// to drain.
final class ConditionLock: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let cond = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    init() {
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(cond, nil)
    }
    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        cond.deallocate()
    }
    @inline(__always) func lock() { pthread_mutex_lock(mutex) }
    @inline(__always) func unlock() { pthread_mutex_unlock(mutex) }
    /// Takes the lock if no one holds it; never waits.
    @inline(__always) func tryLock() -> Bool { pthread_mutex_trylock(mutex) == 0 }
    /// Waits for a broadcast; the lock must be held and is held again on return.
    func wait() { pthread_cond_wait(cond, mutex) }
    func broadcast() { pthread_cond_broadcast(cond) }
    @inline(__always) func withLock<T>(_ body: () throws -> T) rethrows -> T {
        lock()
        defer { unlock() }
        return try body()
    }
}

/// A value behind a pthread mutex: the engine's locks. ThreadSanitizer sees pthread locks;
/// it does not see `Synchronization.Mutex` on Linux once a waiter sleeps (its slow path is in
/// the uninstrumented standard library), and so reports the data such a mutex guards as
/// racing. The engine's sanitized runs stay meaningful with these.
final class PthreadLocked<Value>: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    /// Out of line: a stored `Void` would share its (empty) place with `mutex`, and the
    /// sanitizer would take the guarded access for one to the unguarded pointer load.
    private let value: UnsafeMutablePointer<Value>
    init(_ value: Value) {
        self.value = UnsafeMutablePointer<Value>.allocate(capacity: 1)
        self.value.initialize(to: value)
        pthread_mutex_init(mutex, nil)
    }
    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        value.deinitialize(count: 1)
        value.deallocate()
    }
    @inline(__always) func withLock<R>(_ body: (inout Value) throws -> R) rethrows -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value.pointee)
    }
}
