#!/usr/bin/env python3
"""Dedup across a checkpoint series, measured honestly (issue #31): bytes each checkpoint adds to
a single-node modelfs store, against its size and against the bytes of the tensors that changed.

Model: GPT-2 built from a config by transformers (no hub): 6 layers, width 512, vocabulary 8,192
(about 23 M parameters, 92 MB in fp32). Between two saves it trains one step on random tokens.
Series, STEPS checkpoints each, every checkpoint a new file (or directory) named by its step, each
series in a store of its own (a fresh single-node mount):
  frozen-torch   backbone frozen, the last block and the final norm train (AdamW); torch.save
  frozen-st      the same run saved with safetensors' save_file
  frozen-dcp     the same run saved with torch.distributed.checkpoint (one process)
  adapter-torch  every weight frozen, a LoRA-style low-rank adapter per attention block trains;
                 torch.save of the whole state dict (backbone and adapters)
  full-torch     full fine-tuning (AdamW, every tensor changes); torch.save
  full-st        the same, safetensors
For each checkpoint: its size, the bytes the store grew by (status: storedBytes), and the bytes
of the tensors that changed since the previous step (the floor any dedup can reach; the first
checkpoint of a series: its size). The table gives, per series, the first checkpoint and the
mean of the later ones as a share of the checkpoint size, and the later ones against the floor.

Usage: scripts/bench/run-py.sh dedup [--steps 5] [--out FILE]
The mounts are made under a temporary directory and each is unmounted when its series ends,
even on failure.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import reads  # noqa: E402  (Target: a modelfs mount started and stopped by PID; log, sh)
MB = 1e6


def stored(t: reads.Target) -> int:
    r = reads.sh(t.modelfs, "status", t.mp, "--json", timeout=60)
    return int(json.loads(r.stdout)["mount"]["storedBytes"])


def model(adapters: bool):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(31)
    m = GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=512, n_head=8, vocab_size=8192, n_positions=256))
    if adapters:
        # A low-rank adapter (rank 8) beside each attention block's output projection.
        for block in m.transformer.h:
            proj = block.attn.c_proj
            down = torch.nn.Linear(512, 8, bias=False)
            up = torch.nn.Linear(8, 512, bias=False)
            torch.nn.init.zeros_(up.weight)

            def forward(x, proj=proj, down=down, up=up, inner=proj.forward):
                return inner(x) + up(down(x))
            block.attn.add_module("lora_down", down)
            block.attn.add_module("lora_up", up)
            proj.forward = forward
    return m


def trainable(m, kind: str):
    for name, p in m.named_parameters():
        if kind == "full":
            p.requires_grad = True
        elif kind == "frozen":
            p.requires_grad = name.startswith("transformer.h.5.") or name.startswith("transformer.ln_f.")
        else:  # adapter
            p.requires_grad = ".lora_" in name
    return [p for p in m.parameters() if p.requires_grad]


def train_step(m, params, opt):
    import torch
    x = torch.randint(0, 8192, (4, 128))
    loss = m(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def state(m) -> dict:
    # Tied weights (lm_head = wte) appear once, as safetensors requires.
    return {k: v.detach().clone().contiguous() for k, v in m.state_dict().items() if k != "lm_head.weight"}


def changed_bytes(prev: dict | None, cur: dict) -> int:
    if prev is None:
        return sum(v.numel() * v.element_size() for v in cur.values())
    import torch
    return sum(v.numel() * v.element_size() for k, v in cur.items() if not torch.equal(prev[k], v))


def save(fmt: str, sd: dict, d: Path, step: int) -> Path:
    if fmt == "torch":
        import torch
        p = d / f"step{step}.pt"
        torch.save(sd, p)
    elif fmt == "st":
        from safetensors.torch import save_file
        p = d / f"step{step}.safetensors"
        save_file(sd, str(p))
    else:
        import torch.distributed.checkpoint as dcp
        p = d / f"step{step}"
        dcp.save(sd, checkpoint_id=str(p))
    return p


def size_of(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


SERIES = [("frozen-torch", "frozen", "torch"), ("frozen-st", "frozen", "st"), ("frozen-dcp", "frozen", "dcp"),
          ("adapter-torch", "adapter", "torch"), ("full-torch", "full", "torch"), ("full-st", "full", "st")]


def run(binary: str, work: Path, steps: int) -> list[dict]:
    """Each series in a store of its own (a fresh mount): otherwise a checkpoint would also
    deduplicate against the other formats' files of the same tensors."""
    import torch
    rows = []
    for name, kind, fmt in SERIES:
        mount = reads.Target("modelfs_pt", work / name, binary, None, None)
        mount.start()
        try:
            m = model(kind == "adapter")
            params = trainable(m, kind)
            opt = torch.optim.AdamW(params, lr=1e-3)
            prev = None
            for step in range(steps):
                if step > 0:
                    train_step(m, params, opt)
                sd = state(m)
                changed = changed_bytes(prev, sd)
                before = stored(mount)
                p = save(fmt, sd, mount.mp, step)
                added = stored(mount) - before
                size = size_of(p)
                rows.append({"series": name, "step": step, "size": size, "added": added, "changed": changed})
                reads.log(f"{name} step {step}: {size / MB:.1f} MB, stored +{added / MB:.1f} MB, "
                    f"tensors changed {changed / MB:.1f} MB")
                prev = sd
        finally:
            mount.stop()
    return rows


def table(rows: list[dict], steps: int) -> str:
    out = [f"GPT-2 from a config (6 layers, width 512, 23 M parameters), {steps} checkpoints per series, one "
           "training step between them; single-node modelfs, defaults (FastCDC, ~1 MiB chunks).", "",
           "| series | checkpoint size | first: stored / size | later: stored / size (mean) | later: tensors changed / size | later: stored / changed |",
           "|---|---|---|---|---|---|"]
    for name, _, _ in SERIES:
        r = [x for x in rows if x["series"] == name]
        if not r:
            continue
        first, later = r[0], r[1:]
        size = statistics.mean(x["size"] for x in r)
        share = statistics.mean(x["added"] / x["size"] for x in later) if later else 0
        changed = statistics.mean(x["changed"] / x["size"] for x in later) if later else 0
        over = statistics.mean(x["added"] / max(x["changed"], 1) for x in later) if later else 0
        out.append(f"| {name} | {size / MB:.1f} MB | {first['added'] / first['size'] * 100:.0f} % | {share * 100:.1f} % | "
                   f"{changed * 100:.1f} % | {over:.2f}× |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--modelfs", default=os.environ.get("MODELFS_BIN", str(ROOT / ".build/release/modelfs")))
    a = ap.parse_args()
    if a.steps < 2:
        sys.exit("dedup.py: --steps must be at least 2")
    work = Path(tempfile.mkdtemp(prefix="modelfs-dedup-", dir="/var/tmp"))
    try:
        rows = run(a.modelfs, work, a.steps)
        text = table(rows, a.steps)
        print(text)
        if a.out:
            a.out.write_text(text + "\n\n```json\n" + json.dumps(rows, indent=1) + "\n```\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
