"""The framework matrix (issue #5) on one node: each framework's own save and load calls, unmodified,
on a live mount; every loaded tensor compared bit for bit with what was saved.

Each case is a list of phases (save, maybe update, load). Every phase runs in its own Python
process (`python THIS_FILE CASE PHASE DIR OUT`), so TensorFlow, JAX, torch and Spark never share
an interpreter, and a load never sees the saver's in-process state. A phase writes the arrays it
saved (its reference) or loaded into OUT (.npz, raw bits: bfloat16 as int16 with its dtype name
beside it) and the seconds its framework calls took into OUT.json; the test compares the last
reference with what the last phase loaded.

On one node the mount is remounted before the last phase (a fresh daemon: nothing comes from its
memory). test_frameworks_cluster.py runs the same cases with each phase on another node.

Set MODELFS_COMPAT_TIMES=FILE to also run every case on a local directory and append both
timings to FILE (JSON lines); docs/COMPATIBILITY.md's times come from that.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MiB = 1 << 20

# ---------------------------------------------------------------------------
# the phase side (runs in the child process)
# ---------------------------------------------------------------------------

TIMES: dict[str, float] = {}


@contextmanager
def timed(what: str):
    t = time.perf_counter()
    yield
    TIMES[what] = TIMES.get(what, 0.0) + time.perf_counter() - t


def to_np(x) -> np.ndarray:
    """Exact bits of a tensor/array as a numpy array (bfloat16 and other dtypes numpy lacks as raw ints)."""
    mod = type(x).__module__
    if mod.startswith("torch"):
        import torch
        x = x.detach().cpu().contiguous()
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().copy()
        return x.numpy().copy()
    if hasattr(x, "numpy") and not isinstance(x, np.ndarray):   # tf.Tensor / tf.Variable
        x = x.numpy()
    a = np.asarray(x)
    if a.dtype.name == "bfloat16":                                # jax / ml_dtypes
        return a.view(np.int16).copy()
    return np.array(a, copy=True)


def pack(d: dict) -> dict[str, np.ndarray]:
    out = {}
    for k, v in d.items():
        out[k] = to_np(v)
        out[k + "::dtype"] = np.array(str(getattr(v, "dtype", type(v).__name__)))
    return out


def torch_state(seed: int, big: bool = False):
    import torch
    g = torch.Generator().manual_seed(seed)
    sd = {
        "embed.weight": torch.randn(1000, 256, generator=g),
        "layer0.weight": torch.randn(512, 512, generator=g).to(torch.bfloat16),
        "layer0.bias": torch.randn(512, generator=g).to(torch.float16),
        "counts": torch.randint(0, 1 << 30, (4096,), generator=g, dtype=torch.int64),
        "mask": torch.rand(3000, generator=g) > 0.5,
        "scalar": torch.tensor(float(seed)),
    }
    if big:
        sd["huge.weight"] = torch.randn(8 * MiB, generator=g).reshape(-1, 1024)   # 32 MiB
    return sd


# -- torch -------------------------------------------------------------------

def torch_fileobj_save(d: Path):
    """torch.save into a file object (and torch.load from one)."""
    import torch
    sd = torch_state(11)
    with timed("save"):
        with open(d / "fobj.pt", "wb") as f:
            torch.save(sd, f)
    return sd


def torch_fileobj_load(d: Path):
    import torch
    with timed("load"):
        with open(d / "fobj.pt", "rb") as f:
            sd = torch.load(f, weights_only=True)
    mapped = torch.load(d / "fobj.pt", mmap=True, weights_only=True)
    for k in sd:
        assert torch.equal(mapped[k], sd[k]), f"mmap load of {k} differs from file-object load"
    return sd


def torch_replace_save(d: Path):
    """The safe-save idiom: write a temp file, fsync, os.replace over the previous checkpoint."""
    import torch
    for step in range(3):
        sd = torch_state(20 + step)
        with timed("save"):
            tmp = d / "latest.pt.tmp"
            with open(tmp, "wb") as f:
                torch.save(sd, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, d / "latest.pt")
            dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)   # fsync the directory: the rename is durable
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    assert not (d / "latest.pt.tmp").exists()
    return sd


def torch_replace_load(d: Path):
    import torch
    assert sorted(os.listdir(d)) == ["latest.pt"], os.listdir(d)
    with timed("load"):
        sd = torch.load(d / "latest.pt", weights_only=True)
    return sd


def torch_shrink_save_big(d: Path):
    import torch
    sd = torch_state(30, big=True)
    with timed("save"):
        torch.save(sd, d / "model.pt")
    return sd


def torch_shrink_load_big(d: Path):
    """Read (and mmap) the big version, so this node has its size and pages cached."""
    import torch
    sd = torch.load(d / "model.pt", mmap=True, weights_only=True)
    return {k: v.clone() for k, v in sd.items()}


def torch_shrink_save_small(d: Path):
    """Overwrite the larger file in place (O_TRUNC) with a smaller checkpoint."""
    import torch
    before = os.stat(d / "model.pt").st_size
    sd = torch_state(31)
    with timed("save"):
        torch.save(sd, d / "model.pt")
    assert os.stat(d / "model.pt").st_size < before // 4
    return sd


def torch_shrink_load_small(d: Path):
    import torch
    with timed("load"):
        sd = torch.load(d / "model.pt", weights_only=True)
    mapped = torch.load(d / "model.pt", mmap=True, weights_only=True)
    assert set(mapped) == set(sd) and all(torch.equal(mapped[k], sd[k]) for k in sd)
    return sd


# -- safetensors ---------------------------------------------------------------

def st_sharded_save(d: Path):
    """A sharded set with its index file, as Hugging Face writes it (safetensors' save_file per shard)."""
    from safetensors.torch import save_file
    sd = torch_state(40, big=True)
    sd = {k: v.contiguous() for k, v in sd.items()}
    shards = [["embed.weight", "scalar"], ["layer0.weight", "layer0.bias", "counts", "mask"], ["huge.weight"]]
    n = len(shards)
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())}, "weight_map": {}}
    with timed("save"):
        for i, keys in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file({k: sd[k] for k in keys}, str(d / name), metadata={"format": "pt"})
            for k in keys:
                index["weight_map"][k] = name
        with open(d / "model.safetensors.index.json", "w") as f:
            json.dump(index, f, indent=2)
    return sd


def st_sharded_load(d: Path):
    import torch
    from safetensors import safe_open
    out = {}
    with timed("load"):
        with open(d / "model.safetensors.index.json") as f:
            index = json.load(f)
        for name in sorted(set(index["weight_map"].values())):
            with safe_open(str(d / name), framework="pt") as f:   # mmap
                for k in f.keys():
                    out[k] = f.get_tensor(k)
    assert set(out) == set(index["weight_map"])
    with safe_open(str(d / index["weight_map"]["huge.weight"]), framework="pt") as f:
        sl = f.get_slice("huge.weight")
        assert torch.equal(sl[1000:1003], out["huge.weight"][1000:1003])
        assert torch.equal(sl[:, 1000:], out["huge.weight"][:, 1000:])
    return out


# -- TensorFlow ----------------------------------------------------------------

def _tf_objects():
    import tensorflow as tf
    model = tf.keras.Sequential([tf.keras.Input((16,)), tf.keras.layers.Dense(32), tf.keras.layers.Dense(4)])
    opt = tf.keras.optimizers.Adam(0.01)
    step = tf.Variable(0, dtype=tf.int64)
    return tf, model, opt, step


def tf_checkpoint_save(d: Path):
    """tf.train.Checkpoint + CheckpointManager(max_to_keep=2): each save writes its shards, replaces the
    `checkpoint` state file by rename and deletes the oldest checkpoint."""
    tf, model, opt, step = _tf_objects()
    ckpt = tf.train.Checkpoint(step=step, model=model, optimizer=opt)
    mgr = tf.train.CheckpointManager(ckpt, str(d / "tf"), max_to_keep=2)
    x = tf.random.stateless_normal((64, 16), seed=(1, 2))
    y = tf.random.stateless_normal((64, 4), seed=(3, 4))
    for _ in range(4):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        step.assign_add(1)
        with timed("save"):
            mgr.save(checkpoint_number=int(step))
    assert [os.path.basename(p) for p in mgr.checkpoints] == ["ckpt-3", "ckpt-4"], mgr.checkpoints
    return {"step": step, **{f"var{i}": v for i, v in enumerate(model.variables)},
            **{f"opt{i}": v for i, v in enumerate(opt.variables)}}


def tf_checkpoint_load(d: Path):
    tf, model, opt, step = _tf_objects()
    latest = tf.train.latest_checkpoint(str(d / "tf"))
    assert latest and latest.endswith("ckpt-4"), latest
    files = sorted(os.listdir(d / "tf"))
    assert not any(f.startswith(("ckpt-1.", "ckpt-2.")) for f in files), f"max_to_keep=2 left {files}"
    ckpt = tf.train.Checkpoint(step=step, model=model, optimizer=opt)
    mgr = tf.train.CheckpointManager(ckpt, str(d / "tf"), max_to_keep=2)
    assert [os.path.basename(p) for p in mgr.checkpoints] == ["ckpt-3", "ckpt-4"], mgr.checkpoints
    with timed("load"):
        ckpt.restore(latest).assert_existing_objects_matched()
    model.build((None, 16))
    opt.build(model.trainable_variables)
    ckpt.restore(latest).assert_consumed()
    return {"step": step, **{f"var{i}": v for i, v in enumerate(model.variables)},
            **{f"opt{i}": v for i, v in enumerate(opt.variables)}}


# -- Keras 3 -------------------------------------------------------------------

def _keras_model():
    import keras
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return keras, model


def keras_save(d: Path):
    """model.fit with ModelCheckpoint callbacks (.keras and .weights.h5 per epoch), model.save(.keras),
    model.save_weights(.weights.h5)."""
    keras, model = _keras_model()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((128, 8)).astype(np.float32)
    y = rng.standard_normal((128, 1)).astype(np.float32)
    cbs = [keras.callbacks.ModelCheckpoint(str(d / "ckpt-{epoch:02d}.keras")),
           keras.callbacks.ModelCheckpoint(str(d / "w-{epoch:02d}.weights.h5"), save_weights_only=True)]
    model.fit(x, y, epochs=3, batch_size=32, callbacks=cbs, verbose=0)
    with timed("save"):
        model.save(d / "model.keras")
        model.save_weights(d / "final.weights.h5")
    return {f"w{i}": w for i, w in enumerate(model.get_weights())}


def keras_load(d: Path):
    import keras
    assert {f"ckpt-{e:02d}.keras" for e in (1, 2, 3)} <= set(os.listdir(d))
    with timed("load"):
        m = keras.models.load_model(d / "model.keras")
    got = m.get_weights()
    for other in [keras.models.load_model(d / "ckpt-03.keras")]:
        for a, b in zip(other.get_weights(), got):
            assert a.tobytes() == b.tobytes(), "ModelCheckpoint's last .keras differs from model.save"
    _, fresh = _keras_model()
    fresh.load_weights(d / "final.weights.h5")
    _, fresh3 = _keras_model()
    fresh3.load_weights(d / "w-03.weights.h5")
    for a, b, c in zip(fresh.get_weights(), fresh3.get_weights(), got):
        assert a.tobytes() == c.tobytes(), "save_weights/load_weights differs from model.save"
        assert b.tobytes() == c.tobytes(), "ModelCheckpoint(save_weights_only) differs"
    return {f"w{i}": w for i, w in enumerate(got)}


# -- Orbax (JAX) ----------------------------------------------------------------

def _orbax_state(step: int):
    import jax
    import jax.numpy as jnp
    k = jax.random.PRNGKey(step)
    k1, k2 = jax.random.split(k)
    return {"params": {"w": jax.random.normal(k1, (256, 512)), "b": jnp.arange(512, dtype=jnp.float32) * step,
                       "h": jax.random.normal(k2, (128,)).astype(jnp.bfloat16)},
            "step": jnp.int32(step)}


def orbax_save(d: Path):
    """CheckpointManager(max_to_keep=2): each step is written to a temporary directory and committed
    by renaming it; old steps are deleted."""
    import orbax.checkpoint as ocp
    opts = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    with ocp.CheckpointManager(d / "orbax", options=opts) as mgr:
        for step in range(4):
            with timed("save"):
                mgr.save(step, args=ocp.args.StandardSave(_orbax_state(step)))
                mgr.wait_until_finished()
        assert mgr.all_steps() == [2, 3], mgr.all_steps()
    s = _orbax_state(3)
    return {"w": s["params"]["w"], "b": s["params"]["b"], "h": s["params"]["h"], "step": s["step"]}


def orbax_load(d: Path):
    import jax
    import orbax.checkpoint as ocp
    assert sorted(os.listdir(d / "orbax")) == ["2", "3"], os.listdir(d / "orbax")
    with ocp.CheckpointManager(d / "orbax") as mgr:
        assert mgr.latest_step() == 3
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _orbax_state(0))
        with timed("load"):
            s = mgr.restore(3, args=ocp.args.StandardRestore(abstract))
    return {"w": s["params"]["w"], "b": s["params"]["b"], "h": s["params"]["h"], "step": s["step"]}


# -- Hugging Face transformers ----------------------------------------------------

def _hf_model():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(6)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=128)
    return GPT2LMHeadModel(cfg).eval()


def hf_pretrained_save(d: Path):
    """save_pretrained with small shards: several safetensors files and model.safetensors.index.json."""
    model = _hf_model()
    with timed("save"):
        model.save_pretrained(d / "tiny-gpt2", max_shard_size="100KB")
    names = os.listdir(d / "tiny-gpt2")
    assert "model.safetensors.index.json" in names and sum(n.endswith(".safetensors") for n in names) > 2, names
    return dict(model.state_dict())


def hf_pretrained_load(d: Path):
    from transformers import AutoModelForCausalLM
    with timed("load"):
        model = AutoModelForCausalLM.from_pretrained(d / "tiny-gpt2")
    return dict(model.state_dict())


def hf_cache_save(d: Path):
    """A Hugging Face hub cache (blobs named by their hash, snapshots/<rev>/ symlinks into them,
    refs/main), built the way huggingface_hub does: each blob written under its .locks lock file,
    as .incomplete, then renamed."""
    import hashlib
    import shutil
    import tempfile
    from filelock import FileLock
    model = _hf_model()
    repo = d / "hub" / "models--modelfs--tiny-gpt2"
    rev = "0123456789abcdef0123456789abcdef01234567"
    locks = d / "hub" / ".locks" / "models--modelfs--tiny-gpt2"
    for sub in ("blobs", f"snapshots/{rev}", "refs"):
        (repo / sub).mkdir(parents=True, exist_ok=True)
    locks.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, max_shard_size="200KB")
        with timed("save"):
            for name in sorted(os.listdir(tmp)):
                data = Path(tmp, name).read_bytes()
                h = hashlib.sha256(data).hexdigest()
                with FileLock(str(locks / f"{h}.lock")):
                    inc = repo / "blobs" / f"{h}.incomplete"
                    shutil.copyfile(Path(tmp, name), inc)
                    os.replace(inc, repo / "blobs" / h)
                os.symlink(f"../../blobs/{h}", repo / "snapshots" / rev / name)
            (repo / "refs" / "main").write_text(rev)
    return dict(model.state_dict())


def hf_cache_load(d: Path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_CACHE"] = str(d / "hub")
    from transformers import AutoModelForCausalLM
    snap = next((d / "hub" / "models--modelfs--tiny-gpt2" / "snapshots").iterdir())
    assert all(p.is_symlink() for p in snap.iterdir())
    with timed("load"):
        model = AutoModelForCausalLM.from_pretrained("modelfs/tiny-gpt2")
    return dict(model.state_dict())


# -- h5py, joblib -----------------------------------------------------------------

def _h5_data():
    rng = np.random.default_rng(3)
    return {"x": rng.standard_normal((1000, 500)), "y": rng.integers(0, 1000, size=(20000,), dtype=np.int32),
            "z": rng.standard_normal((256, 256)).astype(np.float32)}


def h5_create(d: Path):
    import h5py
    a = _h5_data()
    with timed("save"):
        with h5py.File(d / "data.h5", "w") as f:
            f.create_dataset("x", data=a["x"])
            f.create_dataset("grp/y", data=a["y"], chunks=(1000,))
            f.create_dataset("z", data=a["z"], compression="gzip", chunks=(64, 64))
            f.attrs["epoch"] = 1
    return a


def h5_update(d: Path):
    """In-place updates (r+): HDF5 rewrites chunks and its superblock inside the existing file."""
    import h5py
    a = _h5_data()
    with timed("update"):
        with h5py.File(d / "data.h5", "r+") as f:
            assert f.attrs["epoch"] == 1
            f["x"][10:20, :] = -1.0
            f["grp/y"][5000:6000] = 42
            f["z"][0:64, 0:64] = 0.5
            f.attrs["epoch"] = 2
            f.create_dataset("added", data=np.arange(100))
    a["x"][10:20, :] = -1.0
    a["grp/y"] = a.pop("y")
    a["grp/y"][5000:6000] = 42
    a["z"][0:64, 0:64] = 0.5
    a["added"] = np.arange(100)
    a["epoch"] = np.int64(2)
    return a


def h5_read(d: Path):
    import h5py
    with timed("load"):
        with h5py.File(d / "data.h5", "r") as f:
            return {"x": f["x"][()], "grp/y": f["grp/y"][()], "z": f["z"][()], "added": f["added"][()],
                    "epoch": np.int64(f.attrs["epoch"])}


def _joblib_obj():
    rng = np.random.default_rng(8)
    return {"w": rng.standard_normal((2048, 1024)).astype(np.float32), "ids": rng.integers(0, 1 << 40, 100000),
            "meta": np.array([1.5, 2.5])}


def joblib_save(d: Path):
    import joblib
    obj = _joblib_obj()
    with timed("save"):
        joblib.dump(obj, d / "obj.joblib")
    joblib.dump(obj, d / "obj.joblib.z", compress=3)
    return obj


def joblib_load(d: Path):
    import joblib
    with timed("load"):
        plain = joblib.load(d / "obj.joblib")
    mm = joblib.load(d / "obj.joblib", mmap_mode="r")      # np.memmap over the file: MAP_SHARED
    assert isinstance(mm["w"], np.memmap), type(mm["w"])
    z = joblib.load(d / "obj.joblib.z")
    for k in plain:
        assert np.asarray(mm[k]).tobytes() == plain[k].tobytes(), f"mmap_mode='r' {k} differs"
        assert z[k].tobytes() == plain[k].tobytes(), f"compressed {k} differs"
    return plain


# -- Spark MLlib and Hadoop SequenceFiles (pyspark local mode, Java 17) ----------------

def _spark():
    from pyspark.sql import SparkSession
    return (SparkSession.builder.master("local[2]").appName("modelfs-compat")
            .config("spark.ui.enabled", "false").config("spark.driver.host", "127.0.0.1")
            .config("spark.driver.bindAddress", "127.0.0.1").config("spark.sql.shuffle.partitions", "2")
            .getOrCreate())


def _spark_frame(spark, seed: int):
    from pyspark.ml.linalg import Vectors
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((200, 5))
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0, 3.0]) + rng.standard_normal(200) > 0).astype(float)
    return spark.createDataFrame([(float(y[i]), Vectors.dense(x[i].tolist())) for i in range(200)], ["label", "features"])


def _seq_pairs():
    rng = np.random.default_rng(10)
    return [(i, bytearray(rng.integers(0, 256, int(rng.integers(1, 5000)), dtype=np.uint8).tobytes()))
            for i in range(300)]


def _seq_arrays(pairs):
    pairs = sorted(pairs)
    return {"keys": np.array([k for k, _ in pairs], dtype=np.int64),
            "lens": np.array([len(v) for _, v in pairs], dtype=np.int64),
            "bytes": np.frombuffer(b"".join(bytes(v) for _, v in pairs), dtype=np.uint8)}


def spark_save(d: Path):
    """MLlib: model.save, then model.write().overwrite().save() of another model over it; an RDD saved
    as a Hadoop SequenceFile on a file:// path (Hadoop's local FileSystem: .crc side files,
    _temporary task directories renamed into place by the output committer, _SUCCESS)."""
    from pyspark.ml.classification import LogisticRegression
    spark = _spark()
    try:
        first = LogisticRegression(maxIter=10).fit(_spark_frame(spark, 1))
        second = LogisticRegression(maxIter=20, regParam=0.01).fit(_spark_frame(spark, 2))
        with timed("save"):
            first.save(str(d / "lr"))
            second.write().overwrite().save(str(d / "lr"))
            spark.sparkContext.parallelize(_seq_pairs(), 3).saveAsSequenceFile("file://" + str(d / "seq"))
        names = os.listdir(d / "seq")
        assert "_SUCCESS" in names and any(n.endswith(".crc") for n in names), names
        assert not (d / "seq" / "_temporary").exists()
        return {"coef": second.coefficients.toArray(), "intercept": np.float64(second.intercept),
                **_seq_arrays(_seq_pairs())}
    finally:
        spark.stop()


def spark_load(d: Path):
    from pyspark.ml.classification import LogisticRegressionModel
    spark = _spark()
    try:
        with timed("load"):
            m = LogisticRegressionModel.load(str(d / "lr"))
            pairs = spark.sparkContext.sequenceFile("file://" + str(d / "seq")).collect()
        return {"coef": m.coefficients.toArray(), "intercept": np.float64(m.intercept), **_seq_arrays(pairs)}
    finally:
        spark.stop()


# ---------------------------------------------------------------------------
# the case table: name -> [(phase function, node index)], and which tiers run it
# ---------------------------------------------------------------------------

CASES: dict[str, list] = {
    "torch-fileobj": [(torch_fileobj_save, 0), (torch_fileobj_load, 1)],
    "torch-replace": [(torch_replace_save, 0), (torch_replace_load, 1)],
    "torch-shrink": [(torch_shrink_save_big, 0), (torch_shrink_load_big, 1), (torch_shrink_save_small, 0),
                     (torch_shrink_load_small, 1)],
    "safetensors-sharded": [(st_sharded_save, 0), (st_sharded_load, 1)],
    "tf-checkpoint-manager": [(tf_checkpoint_save, 0), (tf_checkpoint_load, 1)],
    "keras": [(keras_save, 0), (keras_load, 1)],
    "orbax": [(orbax_save, 0), (orbax_load, 1)],
    "hf-save-pretrained": [(hf_pretrained_save, 0), (hf_pretrained_load, 1)],
    "hf-cache": [(hf_cache_save, 0), (hf_cache_load, 1)],
    "h5py-inplace": [(h5_create, 0), (h5_update, 1), (h5_read, 2)],
    "joblib": [(joblib_save, 0), (joblib_load, 1)],
    "spark": [(spark_save, 0), (spark_load, 1)],
}
# Already covered on one node by test_frameworks.py (test_torch_save_load: tmp + os.replace;
# test_h5py_create_modify_in_place): run across nodes only.
CLUSTER_ONLY = {"torch-replace", "h5py-inplace"}
# Slow (a JVM per phase): their own file, test_frameworks_spark.py (marker `spark`).
SPARK = {"spark"}
SAVES = ("save", "create", "update")


def phase_names(case: str) -> list[str]:
    return [fn.__name__ for fn, _ in CASES[case]]


# ---------------------------------------------------------------------------
# the test side
# ---------------------------------------------------------------------------

PHASE_TIMEOUT = float(os.environ.get("MODELFS_PHASE_TIMEOUT", "240"))


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
               KERAS_BACKEND="tensorflow", PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1")
    return env


def run_child(args: list, timeout: float = PHASE_TIMEOUT, env: dict | None = None,
              cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run a child in its own process group; on timeout kill that group (by the child's pid)."""
    p = subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, text=True, env=env or child_env(), cwd=cwd,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        raise AssertionError(f"{args[1:]} timed out after {timeout}s\n{out[-6000:]}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, "")


def run_phase(case: str, i: int, d: Path, out: Path) -> tuple[dict, dict]:
    fn = CASES[case][i][0].__name__
    r = run_child([sys.executable, __file__, case, str(i), d, out])
    assert r.returncode == 0, f"{case}: phase {fn} in {d} failed (rc={r.returncode}):\n{r.stdout[-8000:]}"
    with np.load(out, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads(Path(str(out) + ".json").read_text())


def assert_same(got: dict, want: dict, what: str):
    assert set(got) == set(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))}"
    for k in want:
        a, b = got[k], want[k]
        assert a.dtype == b.dtype and a.shape == b.shape, \
            f"{what}: {k}: {a.dtype}{a.shape} loaded, {b.dtype}{b.shape} saved"
        assert a.tobytes() == b.tobytes(), f"{what}: {k}: loaded bits differ from the saved ones"


def run_case(case: str, dirs: list[Path], between=None, scratch: Path = None) -> dict[str, float]:
    """Run CASE's phases, phase i in dirs[node index] (all the same directory in the cluster's
    namespace, seen through different nodes). `between(i)` runs before phase i > 0. Returns the
    framework-call seconds, and checks every load against the reference before it."""
    ref, times = None, {}
    for i, (fn, node) in enumerate(CASES[case]):
        if between and i:
            between(i)
        arrays, t = run_phase(case, i, dirs[node], scratch / f"{case}-{i}.npz")
        for k, v in t.items():
            times[k] = times.get(k, 0.0) + v
        if fn.__name__.split("_")[-1] in SAVES or fn.__name__.endswith(("_save_big", "_save_small")):
            ref = arrays
        else:
            assert ref is not None
            assert_same(arrays, ref, f"{case}: {fn.__name__} on node {node}")
    return times


def record_times(case: str, where: str, times: dict, local: dict | None):
    path = os.environ.get("MODELFS_COMPAT_TIMES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"case": case, "where": where, "modelfs": times, "local": local}) + "\n")


# pytest is imported here, not at the top: the phase children never need it.
if __name__ != "__main__":
    import pytest

    SINGLE = [c for c in CASES if c not in CLUSTER_ONLY | SPARK]

    @pytest.mark.parametrize("case", SINGLE)
    def test_framework_on_one_node(case, mnt, tmp_path):
        d = mnt.path("ckpt")
        d.mkdir()
        last = len(CASES[case]) - 1
        # Remount before the last phase: what it loads comes from the data dir, not the daemon's memory.
        times = run_case(case, [d, d, d], between=lambda i: mnt.remount() if i == last else None,
                         scratch=tmp_path)
        local = None
        if os.environ.get("MODELFS_COMPAT_TIMES"):
            ld = tmp_path / "local"
            ld.mkdir()
            local = run_case(case, [ld, ld, ld], scratch=tmp_path)
        record_times(case, "one node", times, local)


def _child_main(argv):
    case, i, d, out = argv[0], int(argv[1]), Path(argv[2]), Path(argv[3])
    fn = CASES[case][i][0]
    got = fn(d)
    np.savez(out, **pack(got))
    Path(str(out) + ".json").write_text(json.dumps(TIMES))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    _child_main(sys.argv[1:])
