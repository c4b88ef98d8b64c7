import Foundation
import Testing
@testable import ModelFS
@testable import ModelFSCore

/// The checkpoint catalogue: each framework's layout recognised as checkpoints, series ordered by
/// step, and the bytes a checkpoint adds to the previous one of its series.
@Suite struct CatalogueTests {
    static func block(_ n: Int) -> BlockID { BlockID.hash(Data("block \(n)".utf8)) }

    /// Files named by path, each of the given blocks (1 KiB each), mtime `t`.
    static func files(_ spec: [(String, [Int])], t: Int64 = 1000) -> [Catalogue.File] {
        spec.enumerated().map { i, s in
            Catalogue.File(path: s.0, size: UInt64(s.1.count * 1024), mtime: Timestamp(seconds: t + Int64(i), nanoseconds: 0),
                           blocks: s.1.map { ChunkRef(id: block($0), length: 1024) })
        }
    }

    static func summary(_ list: [Catalogue.Checkpoint]) -> [String] {
        list.map { "\($0.path) \($0.framework) \($0.step.map(String.init) ?? "-")" }
    }

    @Test func everyFrameworkOfTheMatrixIsRecognisedByItsLayout() {
        let fs = Self.files([
            ("torch/fobj.pt", [1]), ("torch/latest.pt.tmp", [2]),
            ("st/model-00001-of-00002.safetensors", [3]), ("st/model-00002-of-00002.safetensors", [4]),
            ("st/model.safetensors.index.json", [5]),
            ("single/model.safetensors", [6]),
            ("tf/checkpoint", [7]), ("tf/ckpt-3.index", [8]), ("tf/ckpt-3.data-00000-of-00001", [9]),
            ("tf/ckpt-4.index", [10]), ("tf/ckpt-4.data-00000-of-00001", [11]),
            ("saved/saved_model.pb", [12]), ("saved/variables/variables.index", [13]),
            ("keras/ckpt-03.keras", [14]), ("keras/w-03.weights.h5", [15]), ("keras/data.h5", [16]),
            ("orbax/2/_CHECKPOINT_METADATA", [17]), ("orbax/2/default/_METADATA", [18]), ("orbax/2/default/manifest.ocdbt", [19]),
            ("hf/tiny-gpt2/config.json", [20]), ("hf/tiny-gpt2/model.safetensors", [21]), ("hf/tiny-gpt2/generation_config.json", [22]),
            ("hub/models--org--m/blobs/abc", [23]), ("hub/models--org--m/refs/main", [24]),
            ("hub/models--org--m/snapshots/r1/placeholder", [25]),
            ("dcp/step-7/.metadata", [26]), ("dcp/step-7/__0_0.distcp", [27]),
            ("spark/lr/metadata/part-00000", [28]), ("spark/lr/metadata/_SUCCESS", [29]), ("spark/lr/data/part-00000.parquet", [30]),
            ("notes/readme.txt", [31]), ("obj.joblib", [32]),
        ])
        let found = Catalogue.recognise(fs, rootName: "ckpt")
        #expect(Set(Self.summary(found)) == [
            "torch/fobj.pt torch -", "st safetensors-sharded -", "single/model.safetensors safetensors -",
            "tf/ckpt-3 tensorflow 3", "tf/ckpt-4 tensorflow 4", "saved tensorflow-savedmodel -",
            "keras/ckpt-03.keras keras 3", "keras/w-03.weights.h5 keras-weights 3", "keras/data.h5 hdf5 -",
            "orbax/2 orbax 2", "hf/tiny-gpt2 huggingface -", "hub/models--org--m huggingface-hub -",
            "dcp/step-7 torch-dcp 7", "spark/lr spark -", "obj.joblib joblib -",
        ])
        // A directory checkpoint holds every file below it; a TensorFlow one its prefix's files.
        let tf = found.first { $0.path == "tf/ckpt-3" }!
        #expect(tf.files.map { fs[$0].path } == ["tf/ckpt-3.data-00000-of-00001", "tf/ckpt-3.index"])
        #expect(tf.anchor == "tf/ckpt-3.index")
        #expect(found.first { $0.path == "orbax/2" }!.files.count == 3)
        #expect(found.first { $0.path == "hf/tiny-gpt2" }!.bytes == 3 * 1024)
    }

    @Test func theStartItselfCanBeTheCheckpoint() {
        let dir = Catalogue.recognise(Self.files([("config.json", [1]), ("model.safetensors", [2])]), rootName: "checkpoint-500")
        #expect(Self.summary(dir) == [" huggingface 500"])
        let file = Catalogue.recognise(Self.files([("", [1])]), rootName: "step-9.pt")
        #expect(Self.summary(file) == [" torch 9"])
    }

    @Test func aSeriesIsOrderedByStepAndCountsWhatEachCheckpointAdds() {
        // step-10 shares blocks 1 and 2 with step-2; step-2 repeats block 1 inside itself.
        let fs = Self.files([
            ("run/step-10.pt", [1, 2, 5]), ("run/step-2.pt", [1, 1, 2, 3]), ("run/step-1.pt", [4]),
            ("run/other.pt", [1]),
        ])
        let found = Catalogue.recognise(fs, rootName: "x")
        let series = found.filter { $0.series == "run/step-#.pt" }
        #expect(series.map(\.step) == [1, 2, 10])
        #expect(series.map(\.newBytes) == [1024, 3 * 1024, 1024])
        #expect(series.map(\.bytes) == [1024, 4 * 1024, 3 * 1024])
        // Another series starts afresh: all its distinct blocks are new.
        #expect(found.first { $0.path == "run/other.pt" }!.newBytes == 1024)
    }

    @Test func stepsAreNumbersThatStandAlone() {
        #expect(Catalogue.step(in: "checkpoint-500") == 500)
        #expect(Catalogue.step(in: "epoch_2.pt") == 2)
        #expect(Catalogue.step(in: "w-03.weights.h5") == 3)
        #expect(Catalogue.step(in: "tiny-gpt2") == nil)
        #expect(Catalogue.step(in: "model.safetensors") == nil)
        #expect(Catalogue.step(in: "7") == 7)
        #expect(Catalogue.seriesName("step-100-of-200.pt") == "step-#-of-#.pt")
    }

    @Test func conditionsCompareNumbersAsNumbersAndTextAsText() throws {
        let ge = try Catalogue.Condition(parsing: "eval.accuracy>=0.9")
        #expect(ge.key == "eval.accuracy" && ge.op == .ge && ge.value == "0.9")
        #expect(ge.holds("0.91") && ge.holds("0.9") && !ge.holds("0.899") && !ge.holds(nil))
        #expect(try Catalogue.Condition(parsing: "loss < 10").holds("9.5"))           // 9.5 < 10 as numbers
        #expect(!(try Catalogue.Condition(parsing: "loss < 10").holds("abc")))
        #expect(try Catalogue.Condition(parsing: "dataset=wiki").holds("wiki"))
        #expect(try Catalogue.Condition(parsing: "dataset==wiki").holds("wiki"))
        #expect(try Catalogue.Condition(parsing: "dataset!=wiki").holds(nil))
        #expect(try Catalogue.Condition(parsing: "parent").holds("x"))
        #expect(!(try Catalogue.Condition(parsing: "parent").holds(nil)))
        #expect(throws: FSError.self) { try Catalogue.Condition(parsing: ">=3") }
        #expect(throws: FSError.self) { try Catalogue.Condition(parsing: "  ") }
        #expect(Catalogue.validKey("eval.accuracy") && !Catalogue.validKey("a b") && !Catalogue.validKey("a=b") && !Catalogue.validKey(""))
    }
}
