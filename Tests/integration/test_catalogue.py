"""The checkpoint catalogue (issue #31): `modelfs ckpt list/show/find/tag` on checkpoints that the
frameworks of the matrix wrote with their own save calls on a live mount. Each framework saves in
its own interpreter (TensorFlow, JAX and torch never share one)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from mfs import MODELFS_BIN

SAVES = {
    "torch": """
        import torch
        g = torch.Generator().manual_seed(1)
        sd = {f"layer{i}.weight": torch.randn(256, 256, generator=g) for i in range(8)}
        os.makedirs(d / "run", exist_ok=True)
        torch.save(sd, d / "run" / "step-100.pt")
        sd["layer3.weight"] = torch.randn(256, 256, generator=g)    # one tensor of eight changes
        torch.save(sd, d / "run" / "step-200.pt")
    """,
    "safetensors": """
        import numpy as np
        from safetensors.numpy import save_file
        os.makedirs(d / "st", exist_ok=True)
        save_file({"w": np.arange(4096, dtype=np.float32)}, str(d / "st" / "model.safetensors"))
    """,
    "huggingface": """
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(0)
        m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=500, n_positions=64))
        m.save_pretrained(d / "hf" / "checkpoint-500")
    """,
    "dcp": """
        import warnings
        import torch
        import torch.distributed.checkpoint as dcp
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.arange(10000, dtype=torch.float32)}, checkpoint_id=str(d / "dcp" / "step-7"))
    """,
    "tensorflow": """
        import tensorflow as tf
        v = tf.Variable(tf.zeros([64, 64]))
        mgr = tf.train.CheckpointManager(tf.train.Checkpoint(v=v), str(d / "tf"), max_to_keep=3)
        mgr.save(checkpoint_number=1)
        v.assign_add(tf.ones([64, 64]))
        mgr.save(checkpoint_number=2)
    """,
    "keras": """
        import keras
        m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
        os.makedirs(d / "keras", exist_ok=True)
        m.save(d / "keras" / "model.keras")
        m.save_weights(d / "keras" / "final.weights.h5")
    """,
    "orbax": """
        import numpy as np
        import orbax.checkpoint as ocp
        with ocp.CheckpointManager(d / "orbax") as mgr:
            for step in (1, 2):
                mgr.save(step, args=ocp.args.StandardSave({"w": np.full((128,), step, np.float32)}))
            mgr.wait_until_finished()
    """,
    "joblib": """
        import joblib, numpy as np
        joblib.dump({"w": np.ones(1000)}, d / "obj.joblib")
    """,
    "spark": """
        from pyspark.sql import SparkSession
        from pyspark.ml.classification import LogisticRegression
        from pyspark.ml.linalg import Vectors
        spark = (SparkSession.builder.master("local[1]").appName("modelfs-catalogue")
                 .config("spark.ui.enabled", "false").config("spark.driver.host", "127.0.0.1")
                 .config("spark.driver.bindAddress", "127.0.0.1").getOrCreate())
        try:
            df = spark.createDataFrame([(float(i % 2), Vectors.dense([float(i), 1.0])) for i in range(20)], ["label", "features"])
            LogisticRegression(maxIter=5).fit(df).save(str(d / "spark" / "lr"))
        finally:
            spark.stop()
    """,
    "h5py": """
        import h5py, numpy as np
        with h5py.File(d / "data.h5", "w") as f:
            f.create_dataset("x", data=np.ones((100, 100)))
    """,
}

EXPECTED = {   # path below the mount -> (framework, step)
    "run/step-100.pt": ("torch", 100), "run/step-200.pt": ("torch", 200),
    "st/model.safetensors": ("safetensors", None),
    "hf/checkpoint-500": ("huggingface", 500),
    "dcp/step-7": ("torch-dcp", 7),
    "tf/ckpt-1": ("tensorflow", 1), "tf/ckpt-2": ("tensorflow", 2),
    "keras/model.keras": ("keras", None), "keras/final.weights.h5": ("keras-weights", None),
    "orbax/1": ("orbax", 1), "orbax/2": ("orbax", 2),
    "data.h5": ("hdf5", None),
    "obj.joblib": ("joblib", None),
    "spark/lr": ("spark", None),
}


def save_all(d):
    for name, body in SAVES.items():
        code = "import os\nfrom pathlib import Path\nd = Path(os.environ['D'])\n" + textwrap.dedent(body)
        r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "D": str(d), "TF_CPP_MIN_LOG_LEVEL": "3"},
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{name} save failed:\n{r.stderr[-3000:]}"


def ckpt(*args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([MODELFS_BIN, "ckpt", *map(str, args)], capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, f"ckpt {args}: {r.stderr}"
    return r


def listing(d) -> dict[str, dict]:
    report = json.loads(ckpt("list", d, "--json").stdout)
    return {os.path.relpath(c["path"], str(d)): c for c in report["checkpoints"]}


def test_every_framework_save_is_catalogued(mnt):
    d = mnt.mp
    save_all(d)
    found = listing(d)
    assert {p: (c["framework"], c.get("step")) for p, c in found.items()} == EXPECTED
    for p, c in found.items():
        assert c["state"] == "replicated" and c["replicas"] == 1, (p, c)
        assert c["bytes"] == sum(os.path.getsize(f) for f in c["files"]), p
        assert c["bytes"] > 0 and 0 < c["newBytes"] <= c["bytes"] + 4096, (p, c["bytes"], c["newBytes"])
    # The torch series: one tensor of eight changed, so step-200 adds about an eighth.
    first, second = found["run/step-100.pt"], found["run/step-200.pt"]
    assert first["series"] == second["series"] == str(d / "run" / "step-#.pt")
    assert first["newBytes"] >= first["bytes"] * 0.95
    assert second["newBytes"] < second["bytes"] * 0.3, (second["newBytes"], second["bytes"])
    # A TensorFlow checkpoint is its prefix's files; the directory ones hold everything below them.
    assert sorted(os.path.basename(f) for f in found["tf/ckpt-2"]["files"]) == ["ckpt-2.data-00000-of-00001", "ckpt-2.index"]
    assert any(f.endswith("_CHECKPOINT_METADATA") for f in found["orbax/2"]["files"])
    assert any(f.endswith("config.json") for f in found["hf/checkpoint-500"]["files"])
    # The human table names every checkpoint.
    table = ckpt("list", d).stdout
    for p in EXPECTED:
        assert p in table, (p, table)
    # A checkpoint directory listed on its own is that one checkpoint.
    alone = json.loads(ckpt("list", d / "hf" / "checkpoint-500", "--json").stdout)["checkpoints"]
    assert [(c["path"], c["framework"], c["step"]) for c in alone] == [(str(d / "hf" / "checkpoint-500"), "huggingface", 500)]


def test_tag_find_show_and_metadata_that_moves_with_the_file(mnt):
    d = mnt.mp
    os.makedirs(d / "run")
    for step in (1, 2, 3):
        with open(d / "run" / f"step-{step}.pt", "wb") as f:
            f.write(os.urandom(100_000))
    ckpt("tag", d / "run" / "step-1.pt", "eval.accuracy=0.81", "dataset=wiki")
    ckpt("tag", d / "run" / "step-2.pt", "eval.accuracy=0.93", "dataset=wiki")
    ckpt("tag", d / "run" / "step-3.pt", "eval.accuracy=0.90", "dataset=books", "note=a value with spaces")
    # Readable without the CLI: plain xattrs.
    assert os.getxattr(d / "run" / "step-2.pt", "user.modelfs.meta.eval.accuracy") == b"0.93"
    assert ckpt("tag", d / "run" / "step-3.pt").stdout.splitlines() == [
        "dataset=books", "eval.accuracy=0.90", "note=a value with spaces"]

    def find(*args):
        r = ckpt("find", d, *args, check=False)
        return r.returncode, [os.path.relpath(p, str(d)) for p in r.stdout.split()]

    assert find("--where", "eval.accuracy>=0.9") == (0, ["run/step-2.pt", "run/step-3.pt"])
    assert find("--where", "eval.accuracy>=0.9", "--where", "dataset=wiki") == (0, ["run/step-2.pt"])
    assert find("--where", "eval.accuracy>=0.8", "--max", "eval.accuracy") == (0, ["run/step-2.pt"])
    assert find("--where", "dataset=wiki", "--min", "eval.accuracy") == (0, ["run/step-1.pt"])
    assert find("--where", "step>=2", "--latest") == (0, ["run/step-3.pt"])
    assert find("--where", "eval.accuracy>0.99")[0] == 1
    # `cp -a` copies it (as xattrs), with the blocks shared.
    subprocess.run(["cp", "-a", d / "run" / "step-3.pt", d / "run" / "step-3-copy.pt"], check=True)
    assert os.getxattr(d / "run" / "step-3-copy.pt", "user.modelfs.meta.dataset") == b"books"
    os.unlink(d / "run" / "step-3-copy.pt")
    # Metadata stays with the file through a rename; --delete removes a key.
    os.rename(d / "run" / "step-2.pt", d / "run" / "step-20.pt")
    assert find("--where", "eval.accuracy>=0.93") == (0, ["run/step-20.pt"])
    ckpt("tag", d / "run" / "step-20.pt", "--delete", "dataset")
    show = json.loads(ckpt("show", d / "run" / "step-20.pt", "--json").stdout)
    assert show["metadata"] == {"eval.accuracy": "0.93"} and show["step"] == 20 and show["framework"] == "torch"
    assert "eval.accuracy = 0.93" in ckpt("show", d / "run" / "step-20.pt").stdout
    # Bad input: one clear line, nothing changed.
    for args, says in [(("tag", d / "run" / "step-1.pt", "novalue"), "expected KEY=VALUE"),
                       (("tag", d / "run" / "step-1.pt", "a b=1"), "a key is not empty"),
                       (("tag", d / "run" / "nope.pt", "a=1"), "No such file"),
                       (("tag", d / "run" / "step-1.pt", "--delete", "absent"), "no metadata absent"),
                       (("find", d, "--where", "<=1"), "no key before"),
                       (("show", d / "run"), "not a checkpoint"),
                       (("list", "/tmp"), "not inside a modelfs mount")]:
        r = ckpt(*args, check=False)
        assert r.returncode != 0 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert ckpt("tag", d / "run" / "step-1.pt").stdout.splitlines() == ["dataset=wiki", "eval.accuracy=0.81"]
