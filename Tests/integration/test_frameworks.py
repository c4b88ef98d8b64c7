"""ML framework I/O on a live mount: numpy, safetensors, h5py, torch, torch DCP.

Every loaded tensor/array is compared bit for bit with what was saved, both
right away and after a remount (so the data really went through the daemon).
"""
from __future__ import annotations

import os
import warnings

import h5py
import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file

from mfs import MiB, read_file

torch.manual_seed(0)


def np_equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def t_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    # torch.equal plus an explicit dtype/shape check (torch.equal is value-based)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def state_dict(big: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    sd = {
        "embed.weight": torch.randn(1000, 256, generator=g),  # ~1 MB
        "layer0.weight": torch.randn(512, 512, generator=g).to(torch.bfloat16),
        "layer0.bias": torch.randn(512, generator=g).to(torch.float16),
        "counts": torch.randint(0, 1 << 30, (4096,), generator=g, dtype=torch.int64),
        "mask": torch.rand(3000, generator=g) > 0.5,
        "scalar": torch.tensor(3.5),
    }
    if big:
        sd["huge.weight"] = torch.randn(16 * MiB, generator=g).reshape(-1, 1024)  # 64 MiB fp32
    return sd


def assert_sd_equal(got: dict, want: dict, what: str):
    assert set(got) == set(want), f"{what}: keys differ: {set(got) ^ set(want)}"
    for k in want:
        assert t_equal(got[k], want[k]), f"{what}: tensor {k!r} differs"


# ---------------------------------------------------------------------------
# numpy
# ---------------------------------------------------------------------------

def test_numpy_save_load_savez_mmap(mnt):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((700, 333)).astype(np.float32)
    b = rng.integers(0, 255, size=(5 * MiB,), dtype=np.uint8)
    c = rng.standard_normal((64, 64, 3)).astype(np.float64)
    np.save(mnt.path("a.npy"), a)
    np.savez(mnt.path("bundle.npz"), b=b, c=c)
    np.savez_compressed(mnt.path("bundle_z.npz"), a=a, c=c)

    def check():
        assert np_equal(np.load(mnt.path("a.npy")), a)
        with np.load(mnt.path("bundle.npz")) as z:
            assert np_equal(z["b"], b) and np_equal(z["c"], c)
        with np.load(mnt.path("bundle_z.npz")) as z:
            assert np_equal(z["a"], a) and np_equal(z["c"], c)
        m = np.load(mnt.path("a.npy"), mmap_mode="r")
        assert isinstance(m, np.memmap)
        assert np_equal(np.asarray(m), a)
        assert np_equal(m[123:456, 7:300], a[123:456, 7:300])
        del m

    check()
    mnt.remount()
    check()


def test_numpy_memmap_write_then_reload(mnt):
    p = mnt.path("mm.dat")
    shape = (2048, 1024)  # 8 MiB of float32
    rng = np.random.default_rng(2)
    want = rng.standard_normal(shape).astype(np.float32)
    m = np.memmap(p, dtype=np.float32, mode="w+", shape=shape)
    m[:] = want
    m.flush()
    del m
    # modify part of it in place through a second MAP_SHARED mapping
    m = np.memmap(p, dtype=np.float32, mode="r+", shape=shape)
    m[100:200, :] = 7.25
    want[100:200, :] = 7.25
    del m  # unmapped without explicit flush
    assert os.stat(p).st_size == want.nbytes
    assert np_equal(np.fromfile(p, dtype=np.float32).reshape(shape), want)
    mnt.remount()
    assert np_equal(np.fromfile(p, dtype=np.float32).reshape(shape), want)
    r = np.memmap(p, dtype=np.float32, mode="r", shape=shape)
    assert np_equal(np.asarray(r), want)
    del r


# ---------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------

def test_safetensors_save_and_safe_open(mnt):
    sd = state_dict()
    sd = {k: v.contiguous() for k, v in sd.items()}
    p = mnt.path("model.safetensors")
    save_file(sd, str(p), metadata={"format": "pt", "note": "modelfs"})

    def check():
        with safe_open(str(p), framework="pt") as f:
            assert set(f.keys()) == set(sd)
            assert f.metadata()["note"] == "modelfs"
            for k in sd:
                assert t_equal(f.get_tensor(k), sd[k]), k
            sl = f.get_slice("embed.weight")
            assert list(sl.get_shape()) == [1000, 256]
            assert t_equal(sl[10:20], sd["embed.weight"][10:20])
            assert t_equal(sl[:, 5:9], sd["embed.weight"][:, 5:9])
            assert t_equal(f.get_slice("layer0.weight")[500:], sd["layer0.weight"][500:])

    check()
    mnt.remount()
    check()


# ---------------------------------------------------------------------------
# h5py
# ---------------------------------------------------------------------------

def test_h5py_create_modify_in_place(mnt):
    p = mnt.path("data.h5")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1000, 500))
    y = rng.integers(0, 1000, size=(20000,), dtype=np.int32)
    z = rng.standard_normal((256, 256)).astype(np.float32)
    with h5py.File(p, "w") as f:
        f.create_dataset("x", data=x)
        f.create_dataset("grp/y", data=y, chunks=(1000,))
        f.create_dataset("z", data=z, compression="gzip", chunks=(64, 64))
        f.attrs["epoch"] = 1
    with h5py.File(p, "r+") as f:
        f["x"][10:20, :] = -1.0
        f["grp/y"][5000:6000] = 42
        f["z"][0:64, 0:64] = 0.5
        f.attrs["epoch"] = 2
        f.create_dataset("added", data=np.arange(100))
    x[10:20, :] = -1.0
    y[5000:6000] = 42
    z[0:64, 0:64] = 0.5

    def check():
        with h5py.File(p, "r") as f:
            assert np_equal(f["x"][()], x)
            assert np_equal(f["grp/y"][()], y)
            assert np_equal(f["z"][()], z)
            assert np_equal(f["added"][()], np.arange(100))
            assert f.attrs["epoch"] == 2

    check()
    mnt.remount()
    check()


# ---------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------

def test_torch_save_load(mnt):
    sd = state_dict(big=True)
    assert sd["huge.weight"].numel() * 4 == 64 * MiB
    p = mnt.path("ckpt.pt")
    torch.save(sd, p)
    # tmp file + os.replace, the safe-save pattern
    tmp = mnt.path("ckpt2.pt.tmp")
    small = state_dict()
    with open(tmp, "wb") as f:
        torch.save(small, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, mnt.path("ckpt2.pt"))

    def check():
        assert_sd_equal(torch.load(p, weights_only=True), sd, "torch.load")
        assert_sd_equal(torch.load(p, mmap=True, weights_only=True), sd, "torch.load(mmap=True)")
        assert_sd_equal(torch.load(mnt.path("ckpt2.pt"), weights_only=True), small, "replaced ckpt")
        assert not tmp.exists()

    check()
    mnt.remount()
    check()


def test_torch_save_overwrite_same_path(mnt):
    p = mnt.path("latest.pt")
    for step in range(3):
        sd = {k: v + step if v.is_floating_point() else v for k, v in state_dict().items()}
        torch.save(sd, p)
        assert_sd_equal(torch.load(p, weights_only=True), sd, f"overwrite step {step}")
    mnt.remount()
    assert_sd_equal(torch.load(p, weights_only=True), sd, "after remount")


def test_torch_distributed_checkpoint(mnt):
    sd = state_dict()
    sd["big"] = torch.randn(2 * MiB)  # 8 MiB
    ckpt = mnt.path("dcp", "step-100")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        dcp.save(sd, checkpoint_id=str(ckpt))
        assert os.path.isfile(ckpt / ".metadata")

        def check():
            target = {k: torch.zeros_like(v) for k, v in sd.items()}
            dcp.load(target, checkpoint_id=str(ckpt))
            assert_sd_equal(target, sd, "dcp.load")

        check()
        mnt.remount()
        check()


def test_torch_checkpoint_dedup_across_saves(mnt):
    """Saving the same weights twice stores them (roughly) once."""
    sd = {"w": torch.randn(8 * MiB)}  # 32 MiB
    # same basename in two dirs -> same zip layout (the archive's record prefix is the basename)
    os.mkdir(mnt.path("run1"))
    os.mkdir(mnt.path("run2"))
    torch.save(sd, mnt.path("run1", "model.pt"))
    torch.save(sd, mnt.path("run2", "model.pt"))
    a, b = read_file(mnt.path("run1", "model.pt")), read_file(mnt.path("run2", "model.pt"))
    assert len(a) == len(b)
    st = mnt.status()
    assert st["logicalBytes"] >= 64 * MiB, st
    if st["storedBytes"] >= 0.75 * st["logicalBytes"]:
        pytest.fail(f"two identical torch.save files are not deduplicated: {st}")
