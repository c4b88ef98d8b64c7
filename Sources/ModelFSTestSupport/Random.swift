/// Deterministic data for tests: a seeded SplitMix64 generator, so a failure reproduces from its
/// seed. (A library target, not a test target, so every test target can share it.)
public struct SplitMix: RandomNumberGenerator {
    public var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// `n` pseudo-random bytes from `seed`.
public func randomBytes(_ n: Int, seed: UInt64) -> [UInt8] {
    var g = SplitMix(seed: seed)
    var out = [UInt8](repeating: 0, count: n)
    var i = 0
    while i < n {
        var w = g.next()
        for _ in 0..<8 where i < n { out[i] = UInt8(truncatingIfNeeded: w); w >>= 8; i += 1 }
    }
    return out
}
