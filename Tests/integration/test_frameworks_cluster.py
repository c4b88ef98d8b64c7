"""The framework matrix (issue #5) across the nodes of a loopback cluster: every case of
test_frameworks_matrix.py saved on node A and loaded on node B (h5py: created on A, updated in place
on B, read on C), and torch.distributed.checkpoint written by two processes (gloo on 127.0.0.1) on
two different nodes into one checkpoint directory, then loaded on a third node. Bits compared."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_frameworks_matrix import CASES, SPARK, pack, timed  # noqa: E402


def dcp_full_state():
    import torch
    g = torch.Generator().manual_seed(77)
    return {"w": torch.randn(1024, 1024, generator=g),               # 4 MiB, rows split over the ranks
            "emb": torch.randn(64, 4096, generator=g).to(torch.bfloat16),   # columns split
            "bias": torch.randn(1024, generator=g),                   # replicated: written once
            "step": torch.tensor(1200)}


def dcp_rank_main(rank: int, world: int, port: int, d: Path, out: Path):
    """One rank of a 2-process job: its shards of a DTensor state dict, saved with dcp.save."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        full = dcp_full_state()
        sd = {"w": distribute_tensor(full["w"], mesh, [Shard(0)]),
              "emb": distribute_tensor(full["emb"], mesh, [Shard(1)]),
              "bias": distribute_tensor(full["bias"], mesh, [Replicate()]),
              "step": full["step"]}
        with timed("save"):
            dcp.save(sd, checkpoint_id=str(d))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    np.savez(out, **pack(full))


def dcp_load_main(d: Path, out: Path):
    """Load the 2-rank checkpoint in one process (no process group): DCP reassembles the shards."""
    import warnings
    import torch
    import torch.distributed.checkpoint as dcp
    target = {k: torch.zeros_like(v) for k, v in dcp_full_state().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with timed("load"):
            dcp.load(target, checkpoint_id=str(d))
    np.savez(out, **pack(target))


if __name__ != "__main__":
    import json

    import pytest

    from cluster import free_port
    from mfs import wait_until
    from test_cluster import etcd, make_nodes  # noqa: F401  (fixtures)
    from test_frameworks_matrix import assert_same, record_times, run_case, run_child

    @pytest.mark.parametrize("case", [c for c in CASES if c not in SPARK])
    def test_framework_across_nodes(case, make_nodes, tmp_path):
        nodes = make_nodes(3, replicas=2, ack=1)
        (nodes[0] / "ckpt").mkdir()
        times = run_case(case, [n / "ckpt" for n in nodes], scratch=tmp_path)
        record_times(case, "across nodes", times, None)

    def test_torch_dcp_two_ranks_on_two_nodes_loaded_on_a_third(make_nodes, tmp_path):
        a, b, c = make_nodes(3, replicas=2, ack=1)
        port = free_port()
        outs = [tmp_path / f"rank{r}.npz" for r in (0, 1)]
        procs = []
        from test_frameworks_matrix import child_env
        import subprocess
        import signal
        try:
            for r, node in enumerate((a, b)):
                procs.append(subprocess.Popen(
                    [sys.executable, __file__, "dcp-rank", str(r), "2", str(port), str(node / "dcp" / "step-100"),
                     str(outs[r])], stdout=open(tmp_path / f"rank{r}.log", "w"), stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, env=child_env(), start_new_session=True))
            for r, p in enumerate(procs):
                try:
                    rc = p.wait(timeout=180)
                except subprocess.TimeoutExpired:
                    rc = "timeout"
                assert rc == 0, f"rank {r} on {(a, b)[r].node_id}: rc={rc}\n{(tmp_path / f'rank{r}.log').read_text()[-6000:]}"
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        ckpt = c / "dcp" / "step-100"
        names = sorted(os.listdir(ckpt))
        assert ".metadata" in names and "__0_0.distcp" in names and "__1_0.distcp" in names, names
        assert os.stat(ckpt / "__1_0.distcp").st_size > 2 * (1 << 20), "rank 1 (node B) did not write its shards"
        r = run_child([sys.executable, __file__, "dcp-load", ckpt, tmp_path / "loaded.npz"])
        assert r.returncode == 0, r.stdout[-8000:]
        with np.load(outs[0]) as z0, np.load(outs[1]) as z1, np.load(tmp_path / "loaded.npz") as zl:
            want = {k: z0[k] for k in z0.files}
            assert_same({k: z1[k] for k in z1.files}, want, "the two ranks' full state")
            assert_same({k: zl[k] for k in zl.files}, want, "dcp.load on the third node")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "dcp-rank":
        dcp_rank_main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]), Path(sys.argv[6]))
    elif cmd == "dcp-load":
        dcp_load_main(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        raise SystemExit(f"unknown command {cmd}")
