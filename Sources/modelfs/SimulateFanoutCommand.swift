import ArgumentParser
import Foundation
import ModelFSCore
import ModelFSPeer
import ModelFSWire

extension DebugCommand {
    /// N nodes loading one file at once, far more than this machine can run, with the real
    /// fan-out trees (`Placement.order` ranks a block's loaders, `Fanout.parentRank` links them)
    /// on simulated links (docs/SCALE.md): how long the last loader takes against one loader
    /// alone, and how many bytes the holders send.
    ///
    /// Each node has one link of `--link` bits/s each way. A transfer gets the smaller of its
    /// sender's and its receiver's equal share (no redistribution of what a share leaves unused,
    /// so the times are pessimistic). A loader reads the file in order and asks for at most
    /// `--window` blocks it does not have at a time (the daemon's readahead for a shared file:
    /// 64; 8 otherwise). A block is
    /// forwarded whole (store and forward, each hop verifies it). The holders hold every block
    /// (R = `--holders`); a tree's root fetches from the first holder in the block's placement
    /// order.
    struct SimulateFanout: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "simulate-fanout",
                                                        abstract: "Simulate many nodes loading one file at once (fan-out).")

        @Option(help: "Loader counts to simulate, comma-separated.") var loaders: String = "1,8,100,1000"
        @Option(help: "Holders of every block (R).") var holders: Int = 3
        @Option(help: "File size in bytes.") var size: Double = 2 * 1_073_741_824
        @Option(help: "Bytes per block.") var blockSize: Double = 1_048_576
        @Option(help: "Link rate of every node, bits/s each way.") var link: Double = 10e9
        @Option(help: "Blocks a loader asks for at a time (the daemon's readahead for a shared file).") var window: Int = 64
        @Option(help: "Children per loader in a block's tree (the daemon's: Fanout.degree).") var degree: Int = Fanout.degree
        @Flag(help: "Every loader fetches from the holders (no fan-out), for comparison.") var holdersOnly = false

        func validate() throws {
            let counts = loaders.split(separator: ",").compactMap { Int($0) }
            guard !counts.isEmpty, counts.allSatisfy({ $0 >= 1 }), holders >= 1, size >= blockSize, blockSize > 0, link > 0, window >= 1, degree >= 1 else {
                throw ValidationError("need loaders >= 1 (comma-separated), holders >= 1, size >= block size > 0, link > 0, window >= 1, degree >= 1")
            }
        }

        func run() throws {
            let blocks = Int((size / blockSize).rounded(.up))
            var rng = SplitMix(seed: 7)
            let ids = (0..<blocks).map { _ in BlockID(w0: rng.next(), w1: rng.next(), w2: rng.next(), w3: rng.next()) }
            let rate = link / 8
            print(String(format: "one file of %.2f GiB in %d blocks of %.0f KiB on %d holders; links %.0f Gbit/s; window %d blocks; trees of degree %d%@",
                         size / 1_073_741_824, blocks, blockSize / 1024, holders, link / 1e9, window, degree, holdersOnly ? "; no fan-out" : ""))
            let alone = simulate(loaders: 1, ids: ids, rate: rate).last
            print(String(format: "one loader alone: %.2f s (the link alone: %.2f s)", alone, size / rate))
            for n in loaders.split(separator: ",").compactMap({ Int($0) }) {
                let began = Date()
                let r = simulate(loaders: n, ids: ids, rate: rate)
                print(String(format: "%5d loaders: last done in %.2f s = %.2fx one alone (the first %.2f s); holders sent %.2fx the file; a loader sent at most %.2fx the file (mean %.2fx); without fan-out the holders' links allow no better than %.1fx [%.1f s to simulate]",
                             n, r.last, r.last / alone, r.first, r.holderBytes / size, r.maxSent / size, r.meanSent / size,
                             max(1, Double(n) / Double(holders)), Date().timeIntervalSince(began)))
            }
        }

        struct Result { var first: Double; var last: Double; var holderBytes: Double; var maxSent: Double; var meanSent: Double }

        func simulate(loaders n: Int, ids: [BlockID], rate: Double) -> Result {
            let b = ids.count
            let loaderInfo = (0..<n).map { NodeInfo(id: String(format: "l%05d", $0), address: "sim:\($0)") }
            let holderInfo = (0..<holders).map { NodeInfo(id: String(format: "h%03d", $0), address: "sim:h\($0)") }
            let index = Dictionary(uniqueKeysWithValues: loaderInfo.enumerated().map { ($1.id, $0) })
            let hindex = Dictionary(uniqueKeysWithValues: holderInfo.enumerated().map { ($1.id, n + $0) })
            // Per block: the loaders in rendezvous order and each loader's rank (the real trees).
            var ranked = [[Int]](), rank = [Int](repeating: 0, count: holdersOnly ? 0 : n * b)
            if !holdersOnly {
                ranked.reserveCapacity(b)
                for (k, id) in ids.enumerated() {
                    let order = Placement.order(id, loaderInfo).map { index[$0.id]! }
                    for (p, x) in order.enumerated() { rank[x * b + k] = p }
                    ranked.append(order)
                }
            }
            let source = ids.map { hindex[Placement.order($0, holderInfo)[0].id]! }

            var have = [Bool](repeating: false, count: n * b)
            var asked = [Bool](repeating: false, count: n * b)
            var wanted = [Bool](repeating: false, count: n * b)
            var waiters: [Int: [Int]] = [:]
            var next = [Int](repeating: 0, count: n), outstanding = [Int](repeating: 0, count: n)
            var received = [Int](repeating: 0, count: n), finished = [Double](repeating: -1, count: n)
            var sent = [Double](repeating: 0, count: n + holders)
            // Transfers under way.
            var src = [Int](), dst = [Int](), blk = [Int](), left = [Double]()
            var holderBytes = 0.0
            let blockBytes = size / Double(b)

            func start(_ from: Int, _ to: Int, _ k: Int) {
                src.append(from); dst.append(to); blk.append(k); left.append(blockBytes)
                sent[from] += blockBytes
                if from >= n { holderBytes += blockBytes }
            }
            // Node x gets block k: from its parent in the block's tree (which gets it first if it
            // must), or from the holders at the root.
            func acquire(_ x: Int, _ k: Int) {
                guard !have[x * b + k], !asked[x * b + k] else { return }
                asked[x * b + k] = true
                if !holdersOnly, let up = Fanout.parentRank(rank[x * b + k], degree: degree) {
                    let p = ranked[k][up]
                    if have[p * b + k] { start(p, x, k) } else {
                        waiters[p * b + k, default: []].append(x)
                        acquire(p, k)
                    }
                } else {
                    start(source[k], x, k)
                }
            }
            var now = 0.0
            func read(_ x: Int) {
                while outstanding[x] < window && next[x] < b {
                    let k = next[x]
                    next[x] += 1
                    if have[x * b + k] { received[x] += 1; continue }
                    wanted[x * b + k] = true
                    outstanding[x] += 1
                    acquire(x, k)
                }
                if received[x] == b && finished[x] < 0 { finished[x] = now }
            }
            for x in 0..<n { read(x) }

            let dt = blockBytes / rate / 4
            var out = [Int](repeating: 0, count: n + holders), inn = [Int](repeating: 0, count: n + holders)
            while finished.contains(where: { $0 < 0 }) {
                for i in 0..<out.count { out[i] = 0; inn[i] = 0 }
                for i in 0..<src.count { out[src[i]] += 1; inn[dst[i]] += 1 }
                now += dt
                var done: [Int] = []
                for i in 0..<src.count {
                    left[i] -= min(rate / Double(out[src[i]]), rate / Double(inn[dst[i]])) * dt
                    if left[i] <= 1e-9 { done.append(i) }
                }
                var arrived: [(Int, Int)] = []
                for i in done.reversed() {
                    arrived.append((dst[i], blk[i]))
                    src.swapAt(i, src.count - 1); src.removeLast()
                    dst.swapAt(i, dst.count - 1); dst.removeLast()
                    blk.swapAt(i, blk.count - 1); blk.removeLast()
                    left.swapAt(i, left.count - 1); left.removeLast()
                }
                for (x, k) in arrived {
                    have[x * b + k] = true
                    for w in waiters.removeValue(forKey: x * b + k) ?? [] { start(x, w, k) }
                    if wanted[x * b + k] {
                        outstanding[x] -= 1
                        received[x] += 1
                    }
                    read(x)
                }
            }
            let loaderSent = sent.prefix(n)
            return Result(first: finished.min()!, last: finished.max()!, holderBytes: holderBytes,
                          maxSent: loaderSent.max() ?? 0, meanSent: loaderSent.reduce(0, +) / Double(n))
        }
    }
}
