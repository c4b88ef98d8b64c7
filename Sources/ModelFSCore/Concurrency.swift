import Foundation
import Synchronization

// The project's concurrency kit: threads of its own for blocking work (`Workers`,
// `parallelFor`), the lifecycle of a background loop (`BackgroundLoop`), and a value shared
// by closures on several threads (`Shared`). Threads, not Dispatch or Swift tasks: see
// `Workers` for why; ARCHITECTURE.md "Threads and locks" lists every thread.

/// Threads of our own for work that blocks (a PUT waiting on a peer's link, a pread of a pack):
/// `count` of them, started on first use, each taking closures in the order they were given.
///
/// Not Dispatch: on Linux its pool sizes itself by the CPU count and adds a thread only when
/// the ones it has stayed blocked for a while. On this 2-vCPU machine 64 closures that each
/// block 100 ms ran at most 4 at a time on a concurrent queue, so replication that asked for 8
/// or 16 copies in flight got about 4: its links sat idle between blocks (issue #26: a 1 Gbit/s
/// link carried 75 MB/s). How many copies are in flight is a property of the network (its
/// bandwidth × delay), not of the CPU count, so the width here is the caller's.
public final class Workers: Sendable {
    public let count: Int
    let name: String
    private struct State {
        var queue: [@Sendable () -> Void] = []
        var head = 0
        var started = false
        var stopping = false
    }
    private let state = Mutex(State())
    private let ready = DispatchSemaphore(value: 0)

    public init(_ name: String, count: Int) {
        precondition(count > 0)
        self.name = name
        self.count = count
    }

    /// Runs `work` on one of the threads, after the work given before it has started.
    public func async(_ work: @escaping @Sendable () -> Void) {
        let start = state.withLock { s -> Bool in
            s.queue.append(work)
            defer { s.started = true }
            return !s.started
        }
        if start {
            for i in 0..<count {
                let t = Thread { [self] in loop() }
                t.name = "\(name)-\(i)"
                t.start()
            }
        }
        ready.signal()
    }

    /// Closures given and not started yet.
    public var queued: Int { state.withLock { $0.queue.count - $0.head } }

    /// The threads end once the work given so far is done (no later work is taken).
    public func stop() {
        let n = state.withLock { s -> Int in s.stopping = true; return s.started ? count : 0 }
        for _ in 0..<n { ready.signal() }
    }

    private func loop() {
        while true {
            ready.wait()
            let next = state.withLock { s -> (@Sendable () -> Void)? in
                guard s.head < s.queue.count else { return nil }
                let w = s.queue[s.head]
                s.head += 1
                if s.head > 1024 && s.head * 2 > s.queue.count {
                    s.queue.removeFirst(s.head)
                    s.head = 0
                }
                return w
            }
            if let next { next(); continue }
            if state.withLock({ $0.stopping }) { return }
        }
    }
}

/// Runs `body(0..<count)` on up to `width` threads of its own at once (the caller's among them)
/// and returns when every call has. For blocking work (requests to peers): see `Workers` for
/// why not Dispatch.
public func parallelFor(_ count: Int, width: Int, _ body: @escaping @Sendable (Int) -> Void) {
    guard count > 0 else { return }
    let threads = min(max(width, 1), count)
    if threads == 1 { for i in 0..<count { body(i) }; return }
    let next = Mutex(0)
    let each: @Sendable () -> Void = {
        while true {
            let i = next.withLock { n -> Int in defer { n += 1 }; return n }
            if i >= count { return }
            body(i)
        }
    }
    let done = DispatchSemaphore(value: 0)
    for _ in 1..<threads {
        Thread { each(); done.signal() }.start()
    }
    each()
    for _ in 1..<threads { done.wait() }
}

/// A value behind a lock that closures on several threads can share.
public final class Shared<T: Sendable>: Sendable {
    private let m: Mutex<T>
    public init(_ v: T) { m = Mutex(v) }
    public func withLock<R>(_ body: (inout T) throws -> R) rethrows -> R { try m.withLock { try body(&$0) } }
    public func get() -> T { m.withLock { $0 } }
    public func set(_ v: T) { m.withLock { $0 = v } }
}

/// One named background thread and its lifecycle: `start` runs `round` again and again, each
/// round returning how many seconds to sleep before the next; `poke` ends a sleep early; `stop`
/// ends the loop and waits (up to `timeout`) for the round under way to return. Long rounds
/// check `isStopped`, and pause with `sleep` (which a stop ends at once).
///
/// The replicator, healer, scrubber and membership loops run on it (they had four hand-written
/// lifecycles that had drifted apart: a `started` flag in a Mutex in one, a plain var in two).
public final class BackgroundLoop: Sendable {
    public let name: String
    private let stopped = Mutex(false)
    private let started = Mutex(false)
    private let wake = DispatchSemaphore(value: 0)
    private let done = DispatchSemaphore(value: 0)

    public init(_ name: String) { self.name = name }

    /// Starts the thread; its first round runs after `after` seconds. A second call does nothing.
    public func start(after: Double = 0, _ round: @escaping @Sendable () -> Double) {
        guard started.withLock({ s in defer { s = true }; return !s }) else { return }
        let t = Thread { [self] in
            defer { done.signal() }
            if after > 0, self.sleep(after) { return }
            while !isStopped {
                if self.sleep(round()) { return }
            }
        }
        t.name = name
        t.start()
    }

    public var isStopped: Bool { stopped.withLock { $0 } }

    /// Ends the loop's current sleep (or the next one) early.
    public func poke() { wake.signal() }

    /// Sleeps up to `seconds`, less if poked or stopped; true when the loop is stopping.
    @discardableResult
    public func sleep(_ seconds: Double) -> Bool {
        if isStopped { return true }
        if seconds > 0 { _ = wake.wait(timeout: .now() + seconds) }
        return isStopped
    }

    /// Stops the loop and waits up to `timeout` seconds (0: not at all) for its round to end.
    /// Later calls do nothing.
    public func stop(timeout: Double = 10) {
        guard !stopped.withLock({ s in defer { s = true }; return s }) else { return }
        wake.signal()
        if timeout > 0, started.withLock({ $0 }) { _ = done.wait(timeout: .now() + timeout) }
    }
}

/// The documented lock order (docs/ARCHITECTURE.md, "Threads and locks"), outermost first. A
/// thread may take a lock only while every lock it holds ranks lower; debug builds check this
/// on every ranked lock (`LockOrder`), so an inversion traps in the tests where it happens
/// instead of deadlocking one day in production. Release builds check nothing.
public enum LockRank: Int, Sendable, CaseIterable {
    /// A file's `WriteSession.lock`.
    case session
    /// `FileSystem.commitLock`.
    case commit
    /// A metadata engine's transaction (SQLite's connection; the etcd and memory engines' too).
    case metadata
    /// `PackBlockStore.appendLock`.
    case storeAppend
    /// `FileSystem.tables`: innermost, nothing is called while it is held but code on the value.
    case tables
}

public enum LockOrder {
    #if DEBUG
    /// Per thread: how many locks of each rank it holds.
    private static let key: pthread_key_t = {
        var k = pthread_key_t()
        pthread_key_create(&k) { free($0) }
        return k
    }()
    private static func held() -> UnsafeMutablePointer<UInt8> {
        if let p = pthread_getspecific(key) { return p.assumingMemoryBound(to: UInt8.self) }
        let p = calloc(LockRank.allCases.count, 1)!
        pthread_setspecific(key, p)
        return p.assumingMemoryBound(to: UInt8.self)
    }
    #endif

    /// Called before taking a lock of rank `r`: traps (debug) if this thread holds `r` or a later rank.
    @inline(__always) public static func taking(_ r: LockRank) {
        #if DEBUG
        let h = held()
        for later in r.rawValue..<LockRank.allCases.count where h[later] > 0 {
            preconditionFailure("lock order: taking \(r) while holding \(LockRank(rawValue: later)!) (order: \(LockRank.allCases.map { "\($0)" }.joined(separator: " → ")))")
        }
        h[r.rawValue] += 1
        #endif
    }

    /// Called after a lock of rank `r` was taken without waiting (`try`): it cannot deadlock, so
    /// the order is not checked, but it counts as held.
    @inline(__always) public static func tookWithoutWaiting(_ r: LockRank) {
        #if DEBUG
        held()[r.rawValue] += 1
        #endif
    }

    /// Called after releasing a lock of rank `r`.
    @inline(__always) public static func released(_ r: LockRank) {
        #if DEBUG
        held()[r.rawValue] -= 1
        #endif
    }

    /// Runs `body` as if holding a lock of rank `r` (for locks the caller does not own, such as
    /// a database's transaction).
    @inline(__always) public static func holding<T>(_ r: LockRank, _ body: () throws -> T) rethrows -> T {
        taking(r)
        defer { released(r) }
        return try body()
    }
}

/// An `NSLock` with a place in the lock order (`LockRank`), checked in debug builds.
public final class RankedLock: @unchecked Sendable {
    private let inner = NSLock()
    public let rank: LockRank

    public init(_ rank: LockRank) { self.rank = rank }

    @inline(__always) public func lock() {
        LockOrder.taking(rank)
        inner.lock()
    }

    @inline(__always) public func unlock() {
        inner.unlock()
        LockOrder.released(rank)
    }

    /// Takes the lock if it is free (never waits, so it cannot deadlock: not checked).
    @inline(__always) public func `try`() -> Bool {
        guard inner.try() else { return false }
        LockOrder.tookWithoutWaiting(rank)
        return true
    }

    @inline(__always) public func withLock<T>(_ body: () throws -> T) rethrows -> T {
        self.lock()
        defer { unlock() }
        return try body()
    }
}

/// `Synchronization.Mutex`'s interface over a pthread lock, for ThreadSanitizer builds only
/// (`scripts/test.sh tsan` passes `-DMODELFS_TSAN`): on Linux `Mutex` waits on a futex, which
/// ThreadSanitizer cannot see, so every value behind one would be reported as raced. In those
/// builds each module's `Mutex` is this (its TSan.swift); release and debug builds never use it.
public final class TrackedMutex<Value: ~Copyable>: @unchecked Sendable {
    private let lock = NSLock()
    private var value: Value

    public init(_ initial: consuming sending Value) { value = initial }

    public func withLock<Result: ~Copyable, E: Error>(_ body: (inout sending Value) throws(E) -> sending Result) throws(E) -> sending Result {
        lock.lock()
        defer { lock.unlock() }
        return try body(&value)
    }
}

/// When something last happened (uptime nanoseconds; 0: never), and whether that was within
/// `quiet`: foreground work that healing yields to (`ForegroundYield`), namespace changes that
/// garbage collection's scans yield to (`FileSystem.scanReferences`). One clock read and one
/// relaxed store per note.
public final class RecentActivity: Sendable {
    public let quiet: UInt64
    private let last = Atomic<UInt64>(0)

    public init(quiet: UInt64) { self.quiet = quiet }

    public static func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds }

    public func note(at t: UInt64 = RecentActivity.now()) { last.store(t, ordering: .relaxed) }

    /// When it was last noted (0: never).
    public var notedAt: UInt64 { last.load(ordering: .relaxed) }

    /// Whether it was noted within `quiet` before `t`.
    public func busy(at t: UInt64 = RecentActivity.now()) -> Bool {
        let l = last.load(ordering: .relaxed)
        // `l` may be a moment after `t` (noted by another thread since `t` was read).
        return l != 0 && (l >= t || t - l < quiet)
    }

    /// As if never noted.
    public func forget() { last.store(0, ordering: .relaxed) }
}
