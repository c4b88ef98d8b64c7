import Foundation
import GRDB
import ModelFS
import ModelFSCore
import ModelFSWire
import ModelFSMeta
import ModelFSStore
import Synchronization

// The job loop: journaled jobs brought to their policy's copies in the background, oldest
// first; waiting for them (`modelfs sync`) and the status they make.

extension Replicator {
    /// One round of the job loop: every job, oldest first; returns the seconds until the next.
    func round() -> Double {
        let jobs = state.withLock { $0.jobs.values.sorted { $0.id < $1.id } }
        var idle = jobs.isEmpty
        var progress = false
        for job in jobs {
            if loop.isStopped { break }
            waitForEager(job.blocks, until: Date().addingTimeInterval(timeout))
            if let short = ensure(job.blocks, copies: job.policy.replicas, policy: job.policy, durable: false) {
                state.withLock { s in s.jobs[job.id]?.attempts += 1; s.lastError = short }
                idle = true   // retry after a pause, not in a tight loop
                continue
            }
            do {
                try onDisk.remove(job.id)
                state.withLock { _ = $0.jobs.removeValue(forKey: job.id) }
                progress = true
            } catch {
                state.withLock { $0.lastError = "cannot update the replication journal: \(error)" }
            }
        }
        if progress { state.withLock { $0.lastError = nil } }
        changed.lock(); changed.broadcast(); changed.unlock()
        return idle ? 2 : 0.5
    }

    /// Kicks the background thread (after a node joined, or `modelfs sync`).
    public func poke() { loop.poke() }

    /// Waits until no pending job is for one of `inodes` (every job, if nil). Returns the
    /// status at the end; `progress` is called at least once a second.
    public func waitUntilReplicated(inodes: Set<InodeNumber>?, timeout: Double,
                                    progress: (ReplicationStatus) -> Void) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        poke()
        while true {
            let remaining = state.withLock { s in s.jobs.values.filter { inodes == nil || inodes!.contains($0.ino) }.count }
            progress(status())
            if remaining == 0 { return true }
            if Date() >= deadline { return false }
            changed.lock()
            _ = changed.wait(until: min(deadline, Date().addingTimeInterval(1)))
            changed.unlock()
        }
    }

    public func status() -> ReplicationStatus {
        state.withLock { s in
            var r = ReplicationStatus(defaultPolicy: defaultPolicy)
            r.pendingJobs = s.jobs.count
            r.pendingFiles = Set(s.jobs.values.map(\.ino)).count
            r.pendingBytes = s.pendingBytes
            r.underReplicatedBytes = s.jobs.values.filter { $0.attempts > 0 }.reduce(0) { $0 + $1.bytes }
            r.oldestPendingSeconds = s.jobs.values.map { -$0.created.timeIntervalSinceNow }.max() ?? 0
            r.replicatedBytes = s.replicatedBytes
            r.lastError = s.lastError
            var pending: [UInt64: Double] = [:]
            for j in s.jobs.values where pending.count < 10_000 {
                pending[j.ino.rawValue] = max(pending[j.ino.rawValue] ?? 0, -j.created.timeIntervalSinceNow)
            }
            r.pendingInodes = pending
            return r
        }
    }
}
