import Foundation
import Synchronization

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
