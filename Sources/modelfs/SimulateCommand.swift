import ArgumentParser
import Foundation
import ModelFSCore
import ModelFSPeer
import ModelFSWire

extension DebugCommand {
    /// A cluster far larger than this machine, simulated with the real `Placement` and the real
    /// healing planner (`Healer.plan`), fluid links and simulated time (docs/SCALE.md): how much
    /// data moves when a host joins or leaves, how long healing a lost host takes against the link
    /// rate, and how evenly the work spreads (hot spots).
    ///
    /// The cluster holds `--blocks` blocks of `--block-size`; `--sample` of them are simulated,
    /// each standing for blocks/sample real ones (block ids are uniform hashes, so the shares and
    /// rates scale; the planner's per-pass rebalancing budget is scaled by the same factor). Each
    /// block is written by a random host, which keeps a copy (data locality), R copies in all.
    struct Simulate: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Simulate placement and healing for a large cluster.")

        @Option(help: "Hosts.") var hosts: Int = 1000
        @Option(help: "Blocks in the cluster.") var blocks: Double = 1e8
        @Option(help: "Blocks simulated (each stands for blocks/sample).") var sample: Int = 100_000
        @Option(help: "Copies of every block.") var replicas: Int = 3
        @Option(help: "Bytes per block.") var blockSize: Double = 1_048_576
        @Option(help: "Link rates (bits/s, each way) to time healing against, comma-separated.") var links: String = "10e9,25e9,100e9"
        @Option(help: "Zones (the `zone` label; 0: none, no spread).") var zones: Int = 0

        func validate() throws {
            guard hosts >= replicas + 1, replicas >= 1, sample >= 1, blocks >= Double(sample), blockSize > 0 else {
                throw ValidationError("need hosts > replicas >= 1, blocks >= sample >= 1, block size > 0")
            }
        }

        func run() throws {
            let scale = blocks / Double(sample)
            let weight = UInt32(clamping: Int(blockSize))   // a sample block's length for the planner
            let spread: String? = zones > 0 ? "zone" : nil
            func node(_ i: Int) -> NodeInfo {
                NodeInfo(id: String(format: "h%04d", i), address: "sim:\(i)", labels: zones > 0 ? ["zone": "z\(i % zones)"] : [:])
            }
            var nodes = (0..<hosts).map(node)
            var rng = SplitMix(seed: 1)
            var holders: [BlockID: [String]] = [:]
            var want: [BlockID: Healer.Want] = [:]
            let began = Date()
            for _ in 0..<sample {
                let id = BlockID(w0: rng.next(), w1: rng.next(), w2: rng.next(), w3: rng.next())
                let writer = nodes[Int(rng.next() % UInt64(hosts))].id
                holders[id] = Placement.targets(id, nodes: nodes, replicas: replicas, writer: writer, spreadLabel: spread).map(\.id)
                want[id] = Healer.Want(copies: replicas, length: weight, spread: spread, settled: true)
            }
            print("placed \(sample) sample blocks (each for \(String(format: "%.0f", scale))) on \(hosts) hosts in \(String(format: "%.1f", Date().timeIntervalSince(began))) s")
            let total = blocks * blockSize * Double(replicas)
            report("stored", holders, nodes, scale)

            // A host joins: passes of the planner until it moves nothing more. The real planner moves
            // at most Healer.moveBudget a pass; here a pass moves all it would over many, and the
            // real number of passes is counted from the bytes.
            nodes.append(node(hosts))
            let joined = nodes.last!.id
            var moved = 0.0, dropped = 0.0, passes = 0
            while passes < 100 {
                setUsage(&nodes, holders, scale, weight)
                let (_, copies, drops) = Healer.plan(want: want, holders: holders, live: nodes, draining: [], everyNodeAnswered: true,
                                                     moveBudget: .max)
                if copies.isEmpty && drops.isEmpty { break }
                for c in copies { holders[c.id, default: []] += c.to.map(\.id); moved += Double(c.to.count) }
                for (id, n) in drops { holders[id]?.removeAll { $0 == n.id }; dropped += 1 }
                passes += 1
            }
            let movedBytes = moved * scale * blockSize
            let share = Double(holders.values.reduce(0) { $0 + ($1.contains(joined) ? 1 : 0) }) * scale * blockSize
            print(String(format: "join: %.2f TB copied (to the new host and to any other under-filled one) = %.2f%% of the stored bytes (at most %.0f GiB a pass: %.0f healer passes), %.2f TB dropped elsewhere; it holds %.2f%% of the bytes, a fair share is %.2f%%",
                         movedBytes / 1e12, 100 * movedBytes / total, Double(Healer.moveBudget) / Double(1 << 30),
                         (movedBytes / Double(Healer.moveBudget)).rounded(.up), dropped * scale * blockSize / 1e12,
                         100 * share / total, 100.0 / Double(nodes.count)))

            // A host is lost: one planner pass, then the copies timed on fluid links.
            let lost = nodes[Int(rng.next() % UInt64(hosts))].id
            nodes.removeAll { $0.id == lost }
            for (id, h) in holders { holders[id] = h.filter { $0 != lost } }
            setUsage(&nodes, holders, scale, weight)
            let (plan, copies, _) = Healer.plan(want: want, holders: holders, live: nodes, draining: [], everyNodeAnswered: true)
            var sent: [String: Double] = [:], received: [String: Double] = [:]
            for c in copies {
                guard let s = Healer.source(of: c, pass: 0) else { continue }
                sent[s.id, default: 0] += Double(c.to.count) * scale * blockSize
                for t in c.to { received[t.id, default: 0] += scale * blockSize }
            }
            let bytes = sent.values.reduce(0, +)
            let maxOut = sent.values.max() ?? 0, maxIn = received.values.max() ?? 0
            let meanOut = bytes / Double(nodes.count)
            print(String(format: "lose %@: %.2f TB to copy (%d sample blocks short, %d unreadable); %d hosts send, %d receive; hot spots: busiest sender %.2fx the mean, busiest receiver %.2fx",
                         lost, bytes / 1e12, plan.short, plan.unreadable, sent.count, received.count, maxOut / max(meanOut, 1), maxIn / max(bytes / Double(nodes.count), 1)))
            for l in links.split(separator: ",").compactMap({ Double($0) }) {
                let rate = l / 8
                let t = max(maxOut, maxIn) / rate
                let ideal = bytes / (Double(nodes.count) * rate)
                print(String(format: "  links %.0f Gbit/s: healed in %.1f s (the busiest host's link; perfectly even: %.1f s), %.1f GB/s cluster-wide",
                             l / 1e9, t, ideal, bytes / t / 1e9))
            }
        }

        /// Each node's used bytes, from the sample (scaled).
        func setUsage(_ nodes: inout [NodeInfo], _ holders: [BlockID: [String]], _ scale: Double, _ weight: UInt32) {
            var used: [String: UInt64] = [:]
            for h in holders.values { for n in h { used[n, default: 0] += UInt64(weight) } }
            for i in nodes.indices { nodes[i].usedBytes = used[nodes[i].id] ?? 0 }
        }

        func report(_ what: String, _ holders: [BlockID: [String]], _ nodes: [NodeInfo], _ scale: Double) {
            var per: [String: Int] = [:]
            for h in holders.values { for n in h { per[n, default: 0] += 1 } }
            let counts = nodes.map { Double(per[$0.id] ?? 0) }
            let mean = counts.reduce(0, +) / Double(counts.count)
            let sd = (counts.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Double(counts.count)).squareRoot()
            print(String(format: "%@: per host %.0f blocks on average (scaled: %.3g), max %.2fx the mean, min %.2fx, sd %.1f%%",
                         what, mean, mean * scale, (counts.max() ?? 0) / mean, (counts.min() ?? 0) / mean, 100 * sd / mean))
        }
    }
}

/// SplitMix64: a seeded, reproducible generator for the simulation.
struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
