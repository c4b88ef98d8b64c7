import Foundation
import Synchronization

/// Keeps work that reports its units (bytes copied, manifests read) under `rate` units per second
/// on average, from the pacer's creation on, across all the threads that share it: after each
/// piece, the caller waits until the units so far are due (0: never waits). The healer paces its
/// copies with one, garbage collection its pages of manifests.
public final class Pacer: Sendable {
    public let rate: UInt64
    let start = Date()
    private let total = Mutex<UInt64>(0)

    public init(rate: UInt64) { self.rate = rate }

    public func spent(_ units: UInt64) {
        guard rate > 0 else { return }
        let sum = total.withLock { $0 += units; return $0 }
        let wait = Double(sum) / Double(rate) - Date().timeIntervalSince(start)
        if wait > 0 { Thread.sleep(forTimeInterval: wait) }
    }
}
