import Foundation

/// A directory's replication policy (DESIGN.md §3): `replicas` copies of every block, `ack` of
/// them durable before close() returns (1: write-back; = replicas: synchronous), copies spread
/// over the values of node label `spread` where there are enough.
public struct ReplicationPolicy: Codable, Sendable, Equatable, CustomStringConvertible {
    public var replicas: Int
    public var ack: Int
    public var spread: String?
    public init(replicas: Int, ack: Int, spread: String? = nil) { self.replicas = replicas; self.ack = ack; self.spread = spread }

    /// The xattr a directory's policy is kept in (inherited by everything below it).
    public static let xattr = "user.modelfs.policy"

    /// "replicas=3,ack=2[,spread=zone]"
    public var description: String { "replicas=\(replicas),ack=\(ack)" + (spread.map { ",spread=\($0)" } ?? "") }

    public init(parsing text: String) throws {
        var r: Int?, k: Int?, spread: String?
        for part in text.split(separator: ",") {
            let kv = part.split(separator: "=", maxSplits: 1).map { $0.trimmingCharacters(in: .whitespaces) }
            guard kv.count == 2 else { throw FSError.invalid("policy \"\(text)\": expected replicas=R,ack=K[,spread=LABEL]") }
            switch kv[0] {
            case "replicas": r = Int(kv[1])
            case "ack": k = Int(kv[1])
            case "spread": spread = kv[1].isEmpty ? nil : kv[1]
            default: throw FSError.invalid("policy \"\(text)\": unknown key \(kv[0]) (replicas, ack, spread)")
            }
        }
        guard let r, let k, r >= 1, r <= 16, k >= 1, k <= r else {
            throw FSError.invalid("policy \"\(text)\": need 1 <= ack <= replicas <= 16")
        }
        self.init(replicas: r, ack: k, spread: spread)
    }
}
