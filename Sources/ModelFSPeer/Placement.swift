import Foundation
import ModelFSCore
import ModelFSWire

/// Where a block's copies live: rendezvous (highest-random-weight) hashing of the block id over
/// the live nodes (DESIGN.md §5). Every node computes the same order from the same membership,
/// so no block-location table exists anywhere; when a node joins or leaves, only the blocks
/// whose top-R set it enters or leaves move.
public enum Placement {
    /// The node's weight for a block: the block id is already uniformly random, so mixing its
    /// first 8 bytes with a hash of the node id (SplitMix64's finaliser) is enough.
    static func weight(_ block: BlockID, _ nodeHash: UInt64) -> UInt64 {
        var z = block.w0 ^ nodeHash
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    static func nodeHash(_ id: String) -> UInt64 {
        var h: UInt64 = 0xCBF2_9CE4_8422_2325   // FNV-1a
        for b in id.utf8 { h = (h ^ UInt64(b)) &* 0x0100_0000_01B3 }
        return h
    }

    /// All nodes, best first for this block.
    public static func order(_ block: BlockID, _ nodes: [NodeInfo]) -> [NodeInfo] {
        nodes.map { ($0, weight(block, nodeHash($0.id))) }
            .sorted { $0.1 != $1.1 ? $0.1 > $1.1 : $0.0.id < $1.0.id }
            .map(\.0)
    }

    /// The `replicas` nodes that should hold `block`: the writer first (data locality), then the
    /// best-ranked others. With `spreadLabel` (e.g. "zone"), nodes whose label value is not yet
    /// used are preferred, so copies land in different zones while there are zones to spare.
    public static func targets(_ block: BlockID, nodes: [NodeInfo], replicas: Int, writer: String?,
                               spreadLabel: String? = nil) -> [NodeInfo] {
        var ranked = order(block, nodes)
        var out: [NodeInfo] = []
        if let writer, let i = ranked.firstIndex(where: { $0.id == writer }) { out.append(ranked.remove(at: i)) }
        if let label = spreadLabel {
            var used = Set(out.compactMap { $0.labels[label] })
            for n in ranked where out.count < replicas {
                if let v = n.labels[label], !used.contains(v) { out.append(n); used.insert(v) }
            }
            ranked.removeAll { n in out.contains { $0.id == n.id } }
        }
        for n in ranked where out.count < replicas { out.append(n) }
        return Array(out.prefix(replicas))
    }
}
