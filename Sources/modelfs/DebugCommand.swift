import ArgumentParser
import Foundation
import ModelFSCore
import ModelFSMeta
import Synchronization

/// What the loader's threads share.
final class LoadProgress: Sendable {
    let made = Atomic<Int>(0)
    let failure = Mutex<String?>(nil)
}

/// Tools for benchmarks and tests, not shown in `--help`.
struct DebugCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "debug", abstract: "Tools for benchmarks and tests.", shouldDisplay: false,
        subcommands: [Load.self, Simulate.self, SimulateFanout.self, GC.self, Tier.self])

    /// One tiering pass now on the mount holding PATH (tests: not waiting for the next one).
    struct Tier: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "tier", abstract: "Run a tiering pass now.")
        @Argument(help: "A path inside a modelfs mount.") var path: String
        func run() throws {
            let record = try mountRecord(containing: path)
            try controlStream(record, "tier") { print(String(decoding: $0, as: UTF8.self)) }
        }
    }

    /// One garbage-collection pass now on the mount holding PATH (tests: not waiting for the
    /// next timed pass).
    struct GC: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "gc", abstract: "Run a garbage-collection pass now.")
        @Argument(help: "A path inside a modelfs mount.") var path: String
        @Flag(help: "Blocks stored up to now are candidates too (only while nothing writes).") var noGrace = false
        func run() throws {
            let record = try mountRecord(containing: path)
            try controlStream(record, noGrace ? "gc no-grace" : "gc") { print(String(decoding: $0, as: UTF8.self)) }
        }
    }

    /// Builds a large namespace straight through the metadata engine (not through FUSE): the
    /// scale benchmark's million files. The layout is a `torch.distributed.checkpoint` run's:
    /// DIR/step-NNNNNN/ holding one `__RANK_SHARD.distcp` file per rank and shard plus `--small`
    /// small files (`.metadata`, `config-K.json`); `--wide N` adds DIR/wide with N files (the
    /// `ls -l` of a large directory). Files are created ~40 to a transaction
    /// (`KVMetadataEngine.createFiles`), each committed at version 1: with `--reuse PATH` each
    /// takes the content (size and manifest) of one of the files in the namespace directory PATH
    /// in turn, so it is readable and its blocks are real; without, it is empty.
    struct Load: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Build a large namespace through the metadata engine.")

        @Option(help: "The metadata engine (etcd://... or sqlite:PATH).") var meta: String
        @Option(help: "Directory under the root to build in (made if missing).") var dir: String = "scale"
        @Option(help: "Checkpoint steps: one directory each.") var steps: Int = 100
        @Option(help: "Ranks per step: one shard file per rank and shard.") var ranks: Int = 64
        @Option(help: "Shard files per rank.") var shards: Int = 1
        @Option(help: "Small files per step.") var small: Int = 2
        @Option(help: "Files in DIR/wide (0: none).") var wide: Int = 0
        @Option(help: "A directory of the namespace whose files' content the new files take, in turn.") var reuse: String?
        @Option(help: "Steps built at once.") var workers: Int = 8
        @Option(help: "Files per transaction.") var batch: Int = 40
        @Option(help: "The client id the engine writes as (its counters key).") var clientId: String = "loader"

        func validate() throws {
            guard steps >= 0, ranks >= 1, shards >= 1, small >= 0, wide >= 0, workers >= 1, (1...40).contains(batch) else {
                throw ValidationError("--steps, --small and --wide must be 0 or more, --ranks, --shards and --workers at least 1, --batch 1 to 40")
            }
        }

        func run() throws {
            let engine: any MetadataEngine
            do { engine = try MetadataURL.open(meta, rootUID: 0, rootGID: 0, clientID: clientId) } catch {
                throw fail("\(error)")
            }
            let base = try directory(engine, dir, make: true)
            var contents: [(UInt64, ManifestRef)] = [(0, .inline(Manifest()))]
            if let reuse {
                let d = try directory(engine, reuse, make: false)
                contents = []
                var cookie: UInt64 = 0
                while true {
                    let page = try engine.readdir(d, after: cookie, limit: 1000)
                    if page.isEmpty { break }
                    for e in page where e.kind == .regular {
                        contents.append((try engine.getattr(e.ino).size, try engine.manifest(of: e.ino)))
                    }
                    cookie = page.last!.cookie
                }
                guard !contents.isEmpty else { throw fail("--reuse \(reuse) holds no files") }
            }
            let now = Timestamp.now()
            let perStep = ranks * shards + small
            let total = steps * perStep + wide
            let progress = LoadProgress()
            let began = Date()
            let batch = self.batch
            let reused = contents
            @Sendable func build(_ parent: InodeNumber, _ names: [String], offset: Int) throws {
                for start in stride(from: 0, to: names.count, by: batch) {
                    let part = names[start..<min(names.count, start + batch)].enumerated().map { i, name in
                        let c = reused[(offset + start + i) % reused.count]
                        return (name: name, new: NewInode(kind: .regular, mode: 0o644, uid: 0, gid: 0, now: now), size: c.0, manifest: c.1)
                    }
                    _ = try engine.createFiles(parent: parent, part)
                    progress.made.add(part.count, ordering: .relaxed)
                }
            }
            let reporter = Thread {
                while progress.made.load(ordering: .relaxed) < total && progress.failure.withLock({ $0 == nil }) {
                    Thread.sleep(forTimeInterval: 5)
                    let n = progress.made.load(ordering: .relaxed)
                    FileHandle.standardOutput.write(Data("\(n) of \(total) files, \(Int(Double(n) / Date().timeIntervalSince(began))) files/s\n".utf8))
                }
            }
            reporter.start()
            // Threads of their own: concurrentPerform runs no more at once than there are CPUs,
            // and these mostly wait for etcd.
            let group = DispatchGroup()
            for w in 0..<workers {
                group.enter()
                Thread {
                defer { group.leave() }
                for step in stride(from: w, to: steps, by: workers) where progress.failure.withLock({ $0 == nil }) {
                    do {
                        let name = String(format: "step-%06d", step)
                        let d = try engine.create(parent: base, name: name, NewInode(kind: .directory, mode: 0o755, uid: 0, gid: 0, now: now)).ino
                        var names: [String] = []
                        for r in 0..<ranks { for s in 0..<shards { names.append("__\(r)_\(s).distcp") } }
                        for k in 0..<small { names.append(k == 0 ? ".metadata" : "config-\(k).json") }
                        try build(d, names, offset: step * perStep)
                    } catch {
                        progress.failure.withLock { $0 = $0 ?? "step \(step): \(error)" }
                    }
                }
                }.start()
            }
            group.wait()
            if progress.failure.withLock({ $0 == nil }), wide > 0 {
                do {
                    let d = try engine.create(parent: base, name: "wide", NewInode(kind: .directory, mode: 0o755, uid: 0, gid: 0, now: now)).ino
                    try build(d, (0..<wide).map { String(format: "entry-%06d.bin", $0) }, offset: 0)
                } catch {
                    progress.failure.withLock { $0 = "wide: \(error)" }
                }
            }
            if let f = progress.failure.withLock({ $0 }) { throw fail("loading stopped: \(f)") }
            let seconds = Date().timeIntervalSince(began)
            (engine as? KVMetadataEngine<EtcdTransactionalStore>)?.store.close()
            print("loaded \(progress.made.load(ordering: .relaxed)) files in \(String(format: "%.1f", seconds)) s (\(Int(Double(total) / max(seconds, 0.001))) files/s)")
        }

        /// The directory at `path` (slash-separated, from the root), made if asked.
        func directory(_ engine: any MetadataEngine, _ path: String, make: Bool) throws -> InodeNumber {
            var ino = InodeNumber.root
            for part in path.split(separator: "/").map(String.init) {
                do { ino = try engine.lookup(parent: ino, name: part).ino } catch let e as FSError where e.errno == ENOENT && make {
                    ino = try engine.create(parent: ino, name: part, NewInode(kind: .directory, mode: 0o755, uid: 0, gid: 0, now: .now())).ino
                }
            }
            return ino
        }
    }
}
