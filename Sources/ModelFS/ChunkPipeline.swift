import Foundation
import ModelFSCore
import ModelFSStore
import CModelFSSys

/// Hashes and stores a session's streamed chunks off the FUSE thread, so that thread only copies
/// and scans: one thread hashes, another writes the hashed chunks to the store, in order (a
/// chunk's `O_DIRECT` write waits on the disk, and with one thread doing both the hashing stood
/// still meanwhile). At most three chunks are in flight. Results are collected by `drain`.
final class ChunkPipeline: @unchecked Sendable {
    private let hashing = DispatchQueue(label: "modelfs.chunks.hash")
    private let storing = DispatchQueue(label: "modelfs.chunks.store")
    private let slots = DispatchSemaphore(value: 3)
    private let lock = NSLock()
    private var done: [ChunkRef] = []
    /// Chunks hashed and not yet stored, in order: named before their put, so a garbage-
    /// collection mark taken meanwhile sees them (a pass with a late cutoff collected one between
    /// put and append).
    private var inFlight: [BlockID] = []
    private var error: (any Error)?
    let store: any BlockStore

    init(store: any BlockStore) { self.store = store }

    func submit(_ buffer: BlockBuffer, _ length: Int) {
        slots.wait()
        hashing.async { [self] in
            let id = hash(buffer, length)
            storing.async { [self] in
                defer { slots.signal() }
                put(id, buffer, length)
            }
        }
    }

    /// Stores a chunk on the calling thread, after every chunk submitted before it: for the last
    /// chunk of a stream, which the caller waits for anyway (a small file's only chunk cost two
    /// thread hand-offs, there and back, for nothing). Callers never submit concurrently (the
    /// session's lock), so the order of `done` holds.
    func putNow(_ buffer: BlockBuffer, _ length: Int) {
        waitForSubmitted()
        put(hash(buffer, length), buffer, length)
    }

    private func waitForSubmitted() {
        hashing.sync {}
        storing.sync {}
    }

    private func hash(_ buffer: BlockBuffer, _ length: Int) -> BlockID {
        let id = buffer.withUnsafeBytes { BlockID.hash(UnsafeRawBufferPointer(rebasing: $0[0..<length])) }
        lock.lock(); inFlight.append(id); lock.unlock()
        return id
    }

    private func put(_ id: BlockID, _ buffer: BlockBuffer, _ length: Int) {
        do {
            // The chunk's buffer is this pipeline's now: the store may write straight from it.
            try store.put(id, owned: buffer, length: length)
            let r = ChunkRef(id: id, length: UInt32(length))
            lock.lock(); done.append(r); inFlight.removeFirst(); lock.unlock()
        } catch {
            lock.lock(); inFlight.removeFirst(); if self.error == nil { self.error = error }; lock.unlock()
        }
    }

    /// Ids of the chunks stored and not yet drained: they are referenced by the session (garbage
    /// collection must see them; a long write keeps them here until its commit).
    var storedIDs: [BlockID] {
        lock.lock(); defer { lock.unlock() }
        return done.map(\.id) + inFlight
    }

    /// The first error of a chunk stored so far, if any.
    var failure: (any Error)? { lock.lock(); defer { lock.unlock() }; return error }

    /// Waits for every submitted chunk and returns them in order.
    func drain() throws -> [ChunkRef] {
        waitForSubmitted()
        lock.lock(); defer { lock.unlock() }
        if let error { throw error }
        let out = done
        done.removeAll()
        return out
    }
}
