import Foundation

/// The latest progress value posted by worker threads, handed to one waiting thread: the
/// control socket's `send` is only ever called on the thread that handles the request, which is
/// why the workers never hold it (they may still be releasing their closures after the work ends).
public final class ProgressRelay<Value: Sendable>: @unchecked Sendable {
    private let cond = NSCondition()
    private var latest: Value?
    private var finished = false

    public init() {}

    public func post(_ value: Value) {
        cond.lock(); latest = value; cond.signal(); cond.unlock()
    }

    public func finish() {
        cond.lock(); finished = true; cond.signal(); cond.unlock()
    }

    /// Calls `send` with the newest value at most every `interval` seconds until `finish()`,
    /// then with the last value posted if it was not sent yet.
    public func relay(every interval: TimeInterval = 0.5, _ send: (Value) -> Void) {
        var last = Date.distantPast
        cond.lock()
        while true {
            while latest == nil && !finished { cond.wait() }
            if finished {
                let rest = latest
                latest = nil
                cond.unlock()
                if let rest { send(rest) }
                return
            }
            let due = last.addingTimeInterval(interval)
            if Date() < due { _ = cond.wait(until: due); continue }
            let value = latest!
            latest = nil
            cond.unlock()
            send(value)
            last = Date()
            cond.lock()
        }
    }
}
