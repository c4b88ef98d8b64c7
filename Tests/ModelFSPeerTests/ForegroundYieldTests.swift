import Foundation
import ModelFSTestSupport
import Testing
@testable import ModelFSCore
@testable import ModelFSPeer
@testable import ModelFSWire
@testable import ModelFSStore

/// Healing yields to the foreground (ForegroundYield): its arithmetic on a given clock, then
/// through a real peer server.
@Suite struct ForegroundYieldTests {
    let second: UInt64 = 1_000_000_000
    let t0: UInt64 = 50_000_000_000

    @Test func aNodeThatNeverServedTheForegroundNeverHoldsHealingBack() {
        let y = ForegroundYield(busyRate: 100_000_000)
        #expect(!y.busy(at: t0))
        #expect(y.reserve(100_000_000, at: t0) == 0)
        #expect(y.reserve(100_000_000, at: t0) == 0)
        #expect(y.status.heldCopies == 0)
    }

    @Test func whileBusyHealingGoesAtTheBusyRate() {
        let y = ForegroundYield(busyRate: 100_000_000)   // 100 MB/s
        y.noteForeground(at: t0)
        #expect(y.busy(at: t0 + second / 10))
        // The first 100 MB go at once, the next are due a second later, the ones after that
        // two seconds after the first, whenever they ask.
        #expect(y.reserve(100_000_000, at: t0) == 0)
        #expect(y.reserve(100_000_000, at: t0) == second)
        y.noteForeground(at: t0 + second / 2)
        #expect(y.reserve(100_000_000, at: t0 + second / 2) == 3 * second / 2)
        let s = y.status
        #expect(s.heldCopies == 2)
        #expect(abs(s.yieldedSeconds - 2.5) < 1e-6)
    }

    @Test func aQuarterSecondAfterTheForegroundHealingGoesAtFullSpeedAgain() {
        let y = ForegroundYield(busyRate: 100_000_000)
        y.noteForeground(at: t0)
        #expect(y.reserve(100_000_000, at: t0) == 0)
        #expect(y.reserve(100_000_000, at: t0 + ForegroundYield.quiet - 1) > 0)
        #expect(!y.busy(at: t0 + ForegroundYield.quiet))
        #expect(y.reserve(100_000_000, at: t0 + ForegroundYield.quiet) == 0)
        // Noted again by another thread after this one read the clock: still busy.
        y.noteForeground(at: t0 + 10 * second)
        #expect(y.busy(at: t0 + 10 * second - 1))
    }

    @Test func aBusyRateOfZeroNeverHoldsHealingBack() {
        let y = ForegroundYield(busyRate: 0)
        y.noteForeground(at: t0)
        #expect(y.reserve(1 << 30, at: t0) == 0)
        #expect(y.reserve(1 << 30, at: t0) == 0)
    }

    @Test func copiesOfBlocksDownToOneCopyDoNotYieldButAreCounted() {
        // A rate so low that a yielding copy would wait for hours: this one must not wait.
        let y = ForegroundYield(busyRate: 1)
        y.noteForeground()
        #expect(y.busy)
        y.admit(1 << 20, received: true, yielding: false)
        y.admit(1 << 20, received: false, yielding: false)
        let s = y.status
        #expect(s.heldCopies == 0)
        #expect(s.receivedBytes == 1 << 20)
        #expect(s.sentBytes == 1 << 20)
    }

    /// Through a peer server: another node's read (GET) or writer's copy (a PUT not marked as
    /// healing) is foreground work; a healing copy is held back while the node is busy, unless
    /// it is marked urgent.
    @Test func thePeerServerNotesTheForegroundAndHoldsHealingCopiesBack() throws {
        let dir = try scratch("yield")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let local = try PackBlockStore(root: dir + "/blocks")
        let source = try PackBlockStore(root: dir + "/source")
        // 10 MB/s: a copy of 2 MiB reserves 0.2 s, so the next one, sent right after it, waits.
        let y = ForegroundYield(busyRate: 10_000_000)
        let server = try PeerServer(host: "127.0.0.1", port: 0,
                                    routes: PeerService(secret: "s3cret", local: local, cache: nil, metrics: PeerMetrics(), yield: y,
                                                        status: { Data("{}".utf8) }),
                                    maxBody: PeerService.maxBody)
        defer { server.shutdown() }
        let client = PeerClient(secret: "s3cret")
        defer { client.shutdown() }
        let node = NodeInfo(id: "n", address: "127.0.0.1:\(server.port)")
        let blocks = (0..<6).map { blockOf((2 << 20) + $0 * 4096, seed: UInt64(900 + $0)) }
        for (id, bytes) in blocks { _ = try bytes.withUnsafeBytes { try source.put(id, $0) } }

        // A writer's copy: noted as foreground.
        #expect(y.notedAt == 0)
        try blocks[0].1.withUnsafeBytes { try client.put(blocks[0].0, $0, to: node, durable: false) }
        #expect(y.notedAt > 0)
        // Another node's read: noted too.
        let before = y.notedAt
        _ = try client.get(blocks[0].0, from: node)
        #expect(y.notedAt > before)

        // Healing copies into the busy node: the second one waits for the first's bytes.
        y.noteForeground()
        #expect(try client.put(OutgoingBlock(blocks[1].0, from: source), to: node, durable: false, heal: .yielding) == blocks[1].1.count)
        #expect(try client.put(OutgoingBlock(blocks[2].0, from: source), to: node, durable: false, heal: .yielding) == blocks[2].1.count)
        #expect(y.status.heldCopies >= 1)
        // They are not foreground work themselves: with the node idle they go at once.
        let held = y.status.heldCopies
        y.noteForeground(at: 1)   // long ago
        #expect(!y.busy)
        #expect(try client.put(OutgoingBlock(blocks[3].0, from: source), to: node, durable: false, heal: .yielding) != nil)
        #expect(try client.put(OutgoingBlock(blocks[4].0, from: source), to: node, durable: false, heal: .yielding) != nil)
        #expect(y.status.heldCopies == held)
        #expect(!y.busy)
        // Busy again: an urgent copy is not held.
        y.noteForeground()
        #expect(try client.put(OutgoingBlock(blocks[5].0, from: source), to: node, durable: false, heal: .urgent) != nil)
        #expect(y.status.heldCopies == held)
        #expect(y.status.receivedBytes == UInt64(blocks[1...5].reduce(0) { $0 + $1.1.count }))
        for (id, _) in blocks { #expect(local.contains(id)) }
    }
}
