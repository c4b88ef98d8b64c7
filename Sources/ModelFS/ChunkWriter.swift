import Foundation
import ModelFSCore
import ModelFSStore

/// Turns a stream of bytes into stored blocks: bytes are copied once into a chunk-sized buffer,
/// the chunker finds content-defined boundaries as they arrive, and every finished chunk is
/// hashed and written to the store at once. Nothing is re-read later (DESIGN.md §3).
struct ChunkWriter {
    let store: any BlockStore
    private var chunker: Chunker
    private let buffer: BlockBuffer
    /// Bytes in `buffer` (the unfinished chunk).
    private(set) var length = 0
    /// How far the chunker has scanned `buffer`.
    private var scanned = 0

    init(store: any BlockStore, parameters: ChunkerParameters) {
        self.store = store
        chunker = Chunker(parameters)
        buffer = BlockBuffer(count: parameters.maxSize)
    }

    var pending: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: buffer.pointer, count: length) }

    /// Appends bytes; `emit` receives each finished chunk (and whether the store was new to it).
    mutating func append(_ bytes: UnsafeRawBufferPointer, emit: (ChunkRef, Bool) throws -> Void) throws {
        var src = bytes
        while !src.isEmpty {
            let take = min(src.count, buffer.count - length)
            (buffer.pointer + length).copyMemory(from: src.baseAddress!, byteCount: take)
            length += take
            src = UnsafeRawBufferPointer(rebasing: src[take...])
            while scanned < length {
                let (n, boundary) = chunker.consume(UnsafeRawBufferPointer(start: buffer.pointer + scanned, count: length - scanned))
                scanned += n
                if boundary { try cut(at: scanned, emit: emit) }
            }
        }
    }

    /// Emits whatever is pending as a last (short) chunk.
    mutating func finish(emit: (ChunkRef, Bool) throws -> Void) throws {
        if length > 0 { try cut(at: length, emit: emit) }
        chunker.reset()
    }

    /// Drops pending bytes (the file was truncated below them).
    mutating func discard() {
        length = 0; scanned = 0
        chunker.reset()
    }

    private mutating func cut(at p: Int, emit: (ChunkRef, Bool) throws -> Void) throws {
        let bytes = UnsafeRawBufferPointer(start: buffer.pointer, count: p)
        let id = BlockID.hash(bytes)
        let created = try store.put(id, bytes)
        try emit(ChunkRef(id: id, length: UInt32(p)), created)
        let rest = length - p
        if rest > 0 { buffer.pointer.copyMemory(from: buffer.pointer + p, byteCount: rest) }
        length = rest
        scanned = 0
        chunker.reset()
    }
}
