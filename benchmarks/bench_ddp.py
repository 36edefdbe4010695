"""Data-parallel training step time on CPU: 1 rank against 2 (torchrun, gloo), issue 21.

Each rank runs `Trainer.step` on its half of the global batch (saectl.distributed: gradients
averaged, fired latents and logs reduced), one torch thread per rank, so 2 ranks use the two
cores one rank leaves idle. CPU gloo is not the target of data parallelism (GPUs with nccl
are); the figure shows what the collectives cost on top of the halved compute. Reported, no
goal. Setting: bench_train's TopK (d_in 576, 8x, k 32), global batch 4096.

Latents sharded (`--shards 2`, saectl.sharding) at 8x and 32x width: 2 ranks each holding
half the latents, on the whole batch; per rank, the bytes of the SAE's parameters and Adam's
moments (exact, from the tensors) against the unsharded run's, and the step time (each shard
selects without gradient and back-propagates through its chosen latents, as the TopK kernels
do, plus three collectives per step).

    .venv/bin/python benchmarks/bench_ddp.py
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

D_IN, MULT, K, BATCH = 576, 8, 32, 4096
STEPS = int(os.environ.get("BENCH_TRAIN_STEPS", "7"))


def worker(out: str, shards: int = 1, mult: int = MULT) -> None:
    """Under torchrun: time STEPS steps on this rank's slice (or with sharded latents, of the
    whole batch); rank 0 writes the median and its bytes of parameters and Adam state."""
    import torch

    from saectl import distributed
    from saectl.sae import SAEConfig
    from saectl.trainer import TrainConfig, Trainer

    torch.set_num_threads(1)
    distributed.init("cpu")
    distributed.mesh(shards)
    rank, world = distributed.data_part()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, D_IN, generator=g)
    trainer = Trainer(SAEConfig(arch="topk", d_in=D_IN, d_sae=mult * D_IN, k=K),
                      TrainConfig(total_steps=10_000, lr_warmup_steps=0), x[:2048])
    distributed.broadcast_module(trainer.sae)
    trainer.shard(shards)
    part = x[rank * BATCH // world:(rank + 1) * BATCH // world]
    times = []
    for i in range(2 + STEPS):
        t0 = time.perf_counter()
        trainer.step(part)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    held = sum(p.numel() * p.element_size() for p in trainer.sae.parameters())
    held += sum(v.numel() * v.element_size() for s in trainer.optimizer.state.values()
                for v in s.values() if torch.is_tensor(v))
    if distributed.rank() == 0:
        Path(out).write_text(json.dumps({"step_s": statistics.median(times), "bytes": held}))
    distributed.shutdown()


def measure(nproc: int, shards: int = 1, mult: int = MULT) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", __file__, "--worker", str(out), str(shards),
               str(mult)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
        if p.returncode != 0:
            raise RuntimeError(f"torchrun with {nproc} ranks failed: {p.stderr[-2000:]}")
        return json.loads(out.read_text())


def run():
    from benchmarks.common import Row

    one, two = measure(1)["step_s"], measure(2)["step_s"]
    rows = [Row("ddp train step time, 2 ranks vs 1 (CPU gloo, 1 thread each)", BATCH / two,
                BATCH / one, "tokens/s", "",
                note=f"1 rank {one * 1e3:.0f} ms/step, 2 ranks {two * 1e3:.0f} ms/step on half "
                     f"the batch each; TopK {MULT}x{D_IN} k{K}, global batch {BATCH}")]
    for mult in (8, 32):
        whole, sharded = measure(1, 1, mult), measure(2, 2, mult)
        mib = 2**20
        rows.append(Row(f"sharded latents, memory per rank, TopK {mult}x{D_IN} (2 shards vs 1)",
                        sharded["bytes"] / mib, whole["bytes"] / mib, "MiB", "",
                        note=f"parameters + Adam moments per rank: {sharded['bytes'] / mib:.1f} "
                             f"MiB sharded over 2 ranks, {whole['bytes'] / mib:.1f} MiB whole; "
                             f"step {sharded['step_s'] * 1e3:.0f} ms sharded (whole batch on "
                             f"each rank) vs {whole['step_s'] * 1e3:.0f} ms whole"))
    return rows


if __name__ == "__main__":
    if "--worker" in sys.argv:
        i = sys.argv.index("--worker")
        worker(sys.argv[i + 1], *map(int, sys.argv[i + 2:i + 4]))
    else:
        for r in run():
            print(r.as_dict())
