import Foundation
import ModelFS
import ModelFSCore
import ModelFSWire
import ModelFSMeta
import ModelFSStore
import Synchronization

// Executing a healing plan: each copy sent by one of its holders (this node directly, the
// others through POST /v1/copy), in batches per holder, every holder at once; drops after.

extension Healer {
    /// Makes the planned copies and drops. Each block's holder sends it (this node directly,
    /// others through POST /v1/copy), in batches per holder, every holder at once.
    func execute(_ planned: Plan, copies: [Copy], drops: [(BlockID, NodeInfo)]) throws -> Plan {
        var plan = planned
        let started = Date()
        let me = membership.me.id
        let pass = state.withLock { $0.passes }
        var batches: [(source: NodeInfo, items: [CopyOrder.Item], bytes: UInt64)] = []
        // Under a --heal-rate cap, batches of at most half a second of copying each, so the
        // pacing below is smooth.
        let batchBytes = rate > 0 ? max(4 << 20, rate / 2) : UInt64.max
        let pacer = Pacer(rate: rate)
        var bySource: [String: Int] = [:]
        for c in copies {
            guard let source = Self.source(of: c, pass: pass) else { plan.errors.append("block \(c.id.hex) has no holder to copy from"); continue }
            let item = CopyOrder.Item(id: c.id.hex, to: c.to, urgent: c.urgent ? true : nil)
            let bytes = UInt64(c.length) * UInt64(c.to.count)
            if let i = bySource[source.id], batches[i].items.count < Self.batch, batches[i].bytes + bytes <= batchBytes {
                batches[i].items.append(item)
                batches[i].bytes += bytes
            } else {
                bySource[source.id] = batches.count
                batches.append((source, [item], bytes))
            }
        }
        let sent = Shared<UInt64>(0)
        let made = Shared(0)
        let errors = Shared<[String]>([])
        // Batches of different holders in parallel; one holder's batches one after another.
        let sources = Dictionary(grouping: batches, by: { $0.source.id }).map { $0.value }
        parallelFor(sources.count, width: width) { [self] i in
            for var b in sources[i] {
                // Nodes that left since the plan was made get nothing more.
                let live = Set(membership.nodes.map(\.id))
                guard live.contains(b.source.id) || b.source.id == me else { continue }
                b.items = b.items.map { var it = $0; it.to = it.to.filter { live.contains($0.id) }; return it }.filter { !$0.to.isEmpty }
                if b.items.isEmpty { continue }
                let began = Date()
                var firstError = ""
                // A slow batch is said only when something in it failed: without errors it is
                // slow by design (copies yield to the foreground on both ends, or --heal-rate
                // paces them), and `modelfs status` shows the time they yielded.
                defer {
                    let took = Date().timeIntervalSince(began)
                    if took > 5 && !firstError.isEmpty {
                        let to = Set(b.items.flatMap { $0.to.map(\.id) }).sorted().joined(separator: ",")
                        Log.warning("healing: a batch of \(b.items.count) copies from \(b.source.id) to \(to) took \(Int(took)) s \(firstError)")
                    }
                }
                let result: CopyResult
                if b.source.id == me {
                    result = Healer.perform(CopyOrder(items: b.items), local: local, client: client, me: me, width: width, yield: yield)
                } else {
                    do { result = try client.copy(CopyOrder(items: b.items), at: b.source) } catch {
                        firstError = "\(error)"
                        errors.withLock { $0.append("\(error)") }
                        continue
                    }
                }
                sent.withLock { $0 += result.bytes }
                made.withLock { $0 += result.copies }
                state.withLock { $0.copiedBlocks += UInt64(result.copies); $0.copiedBytes += result.bytes }
                if !result.errors.isEmpty { errors.withLock { $0 += result.errors }; firstError = result.errors[0] }
                publishSoon()
                pacer.spent(result.bytes)
            }
        }
        plan.copiedBytes = sent.get()
        plan.copySeconds = Date().timeIntervalSince(started)
        plan.copiesPlanned = copies.reduce(0) { $0 + $1.to.count }
        plan.copiesMade = made.get()
        plan.executed = true
        let drop = drops
        parallelFor(drop.count, width: width) { [self] i in
            let (id, node) = drop[i]
            do {
                if node.id == me { try local.remove(id) } else { _ = try client.delete(id, at: node) }
                state.withLock { $0.removedCopies += 1 }
            } catch {
                errors.withLock { $0.append("drop of \(id.hex) on \(node.id): \(error)") }
            }
        }
        plan.errors += errors.get()
        plan.dropped = drop.count
        return plan
    }

    /// Blocks per copy order.
    static let batch = 64

    /// Carries out a copy order on the holder: reads each block (not hashed here: its receiver
    /// hashes it before storing), sends it to its targets `width` at a time, then has every
    /// target fdatasync the packs it wrote them to (not syncfs: nodes sharing a disk would flush
    /// each other's writes), so the copies are durable before the healer counts them. While the
    /// holder serves the foreground, each copy first waits its turn (`yield`); a receiver that
    /// does holds back its copies itself (they are sent marked as healing).
    public static func perform(_ order: CopyOrder, local: PackBlockStore, client: PeerClient, me: String, width: Int = 8,
                               yield: ForegroundYield? = nil) -> CopyResult {
        let result = Shared(CopyResult())
        let touched = Shared<[String: (NodeInfo, [BlockID])]>([:])
        // A target that failed once is skipped for the rest of the order: a node that just died
        // costs one connect timeout, not one per block.
        let failed = Shared<Set<String>>([])
        let items = order.items
        parallelFor(items.count, width: width) { i in
            guard let id = BlockID(hex: items[i].id) else { return }
            let urgent = items[i].urgent ?? false
            do {
                guard local.contains(id) else { throw StoreError(.missing, "no replica here") }
                var outgoing: OutgoingBlock?   // read once for every remote target
                for node in items[i].to {
                    if failed.withLock({ $0.contains(node.id) }) { continue }
                    do {
                        let n: Int
                        if node.id == me {
                            let b = try local.readForPeer(id)
                            yield?.admit(b.count, received: true, yielding: !urgent)
                            try b.withUnsafeBytes { raw in
                                guard BlockID.hash(raw) == id else { throw StoreError(.corrupt, "local replica of \(id.hex) is corrupt") }
                                _ = try local.put(id, raw)
                            }
                            n = b.count
                        } else {
                            // Not hashed here; the receiver hashes it.
                            if outgoing == nil { outgoing = OutgoingBlock(id, from: local) }
                            yield?.admit(outgoing!.length > 0 ? outgoing!.length : local.length(of: id) ?? 0, received: false, yielding: !urgent)
                            guard let sent = try client.put(outgoing!, to: node, durable: false, heal: urgent ? .urgent : .yielding) else {
                                // Gone meanwhile (dropped or collected): not the target's fault.
                                result.withLock { $0.errors.append("\(me) cannot copy block \(id.hex): no replica here any more") }
                                return
                            }
                            n = sent
                        }
                        touched.withLock { $0[node.id, default: (node, [])].1.append(id) }
                        result.withLock { $0.copies += 1; $0.bytes += UInt64(n) }
                    } catch {
                        failed.withLock { _ = $0.insert(node.id) }
                        result.withLock { $0.errors.append("copy of \(id.hex) to \(node.id): \(error)") }
                    }
                }
            } catch {
                result.withLock { $0.errors.append("\(me) cannot read block \(id.hex) to copy it: \(error)") }
            }
        }
        for (node, ids) in touched.get().values {
            do {
                if node.id == me { try local.sync(ids) } else { try client.sync(ids, at: node) }
            } catch {
                result.withLock { $0.errors.append("sync of \(node.id): \(error)") }
            }
        }
        return result.get()
    }
}
