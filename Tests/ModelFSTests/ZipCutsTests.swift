import Foundation
import ModelFSTestSupport
import Testing
@testable import ModelFS
@testable import ModelFSCore
@testable import ModelFSStore

/// Chunks of zip archives (torch.save's format) are cut at their entries' edges, so two
/// archives holding the same data under other entry names share every data chunk.
@Suite struct ZipCutsTests {
    /// A zip local file header (stored, sizes known) named `name`, followed by `data`.
    static func entry(_ name: String, _ data: [UInt8], extra: Int = 0) -> [UInt8] {
        func u16(_ v: Int) -> [UInt8] { [UInt8(v & 0xFF), UInt8(v >> 8 & 0xFF)] }
        func u32(_ v: Int) -> [UInt8] { u16(v & 0xFFFF) + u16(v >> 16) }
        return [0x50, 0x4B, 0x03, 0x04] + u16(20) + u16(0) + u16(0) + u16(0) + u16(0) + u32(0)
            + u32(data.count) + u32(data.count) + u16(name.utf8.count) + u16(extra)
            + Array(name.utf8) + [UInt8](repeating: 0x46, count: extra) + data
    }

    static func chunks(_ stream: [UInt8], pieces: Int) throws -> [(id: BlockID, length: Int)] {
        var w = ChunkWriter(parameters: .standard)
        var out: [(BlockID, Int)] = []
        let sink: ChunkWriter.Sink = { buffer, length in
            out.append((buffer.withUnsafeBytes { BlockID.hash(UnsafeRawBufferPointer(rebasing: $0[0..<length])) }, length))
        }
        try stream.withUnsafeBytes { all in
            var at = 0
            while at < all.count {
                let n = min(pieces, all.count - at)
                try w.append(UnsafeRawBufferPointer(rebasing: all[at..<at + n]), sink: sink)
                at += n
            }
        }
        try w.finish(sink: sink)
        return out
    }

    @Test func entriesUnderOtherNamesShareTheirDataChunks() throws {
        let tensors = (0..<6).map { i in randomBytes(700_000 + i * 450_000, seed: UInt64(i + 1)) }
        func archive(_ step: String) -> [UInt8] {
            tensors.enumerated().flatMap { i, t in Self.entry("\(step)/data/\(i)", t, extra: 64 - (30 + "\(step)/data/\(i)".utf8.count) % 64) }
        }
        let a = archive("step1"), b = archive("step22")
        // Whole writes, and 1 MiB writes (FUSE's size) whose edges fall anywhere.
        for pieces in [a.count, 1 << 20] {
            let ca = try Self.chunks(a, pieces: pieces), cb = try Self.chunks(b, pieces: pieces)
            #expect(ca.reduce(0) { $0 + $1.length } == a.count)
            let shared = Set(ca.map(\.id)).intersection(cb.map(\.id))
            let sharedBytes = cb.filter { shared.contains($0.id) }.reduce(0) { $0 + $1.length }
            let data = tensors.reduce(0) { $0 + $1.count }
            // Every header is its own chunk; all the data is shared (a header split by a write's
            // edge may cost the chunk that follows it).
            let headers = ca.filter { $0.length < 200 }.count
            if pieces == a.count {
                #expect(headers == tensors.count)
                #expect(sharedBytes == data)
            } else {
                #expect(headers >= tensors.count - 2)
                #expect(sharedBytes >= data - 2 * (4 << 20))
            }
        }
    }

    @Test func onlyAStreamThatBeginsAsAZipIsCut() throws {
        // A file that is not a zip (its first bytes say so) holding a zip's bytes later: chunked
        // by content alone, its bytes never searched.
        let zipBytes = Self.entry("a/data/0", randomBytes(600_000, seed: 5)) + Self.entry("a/data/1", randomBytes(600_000, seed: 6))
        let other = randomBytes(1000, seed: 7) + zipBytes
        #expect(try Self.chunks(other, pieces: other.count).allSatisfy { $0.length >= 200 })
        #expect(try Self.chunks(zipBytes, pieces: zipBytes.count).filter { $0.length < 200 }.count == 2)
    }

    @Test func offsetsOfHeadersAndTheirData() {
        let z = Self.entry("ab", [1, 2, 3]) + Self.entry("c", [9]) + [0x50, 0x4B, 0x03]
        let offsets = z.withUnsafeBytes { ZipCuts.offsets(in: $0) }
        #expect(offsets == [0, 32, 35, 66])
        // A compressed entry (method 8) is not cut; a header cut short by the write's end is cut
        // before, not after.
        var compressed = Self.entry("x", [1, 2])
        compressed[8] = 8
        #expect(compressed.withUnsafeBytes { ZipCuts.offsets(in: $0) } == [])
        let cut = [UInt8](repeating: 7, count: 5) + Self.entry("name", [1, 2, 3]).prefix(31)
        #expect(cut.withUnsafeBytes { ZipCuts.offsets(in: $0) } == [5])
        // Random data and short writes: no cuts, no crash.
        let noise = randomBytes(100_000, seed: 99)
        #expect(noise.withUnsafeBytes { ZipCuts.offsets(in: $0) }.count < 2)
        #expect([UInt8]([0x50, 0x4B]).withUnsafeBytes { ZipCuts.offsets(in: $0) } == [])
    }
}
