/// A latency histogram in seconds, rendered as Prometheus text: the peer server's routes, etcd's
/// requests and the FUSE operations (whose counts come from C) all print through it.
public struct Histogram: Sendable {
    /// Upper bounds of the buckets, ascending; one more bucket (+Inf) follows them.
    public let bounds: [Double]
    /// Observations per bucket (not cumulative), `bounds.count + 1` of them.
    public var counts: [UInt64]
    public var sum = 0.0

    public init(bounds: [Double]) {
        self.bounds = bounds
        counts = [UInt64](repeating: 0, count: bounds.count + 1)
    }

    public init(bounds: [Double], counts: [UInt64], sum: Double) {
        self.bounds = bounds
        self.counts = counts
        self.sum = sum
    }

    public var count: UInt64 { counts.reduce(0, +) }

    public mutating func record(_ seconds: Double) {
        counts[bounds.firstIndex { seconds <= $0 } ?? bounds.count] += 1
        sum += seconds
    }

    /// The `_bucket`, `_sum` and `_count` lines of `name` with `labels` (`op="read"`).
    public func render(_ name: String, labels: String) -> String {
        var out = ""
        var cumulative: UInt64 = 0
        for (i, b) in bounds.enumerated() {
            cumulative += counts[i]
            out += "\(name)_bucket{\(labels),le=\"\(b)\"} \(cumulative)\n"
        }
        out += "\(name)_bucket{\(labels),le=\"+Inf\"} \(count)\n"
        out += "\(name)_sum{\(labels)} \(sum)\n"
        out += "\(name)_count{\(labels)} \(count)\n"
        return out
    }
}
