"""Data-parallel training step time on CPU: 1 rank against 2 (torchrun, gloo), issue 21.

Each rank runs `Trainer.step` on its half of the global batch (saectl.distributed: gradients
averaged, fired latents and logs reduced), one torch thread per rank, so 2 ranks use the two
cores one rank leaves idle. CPU gloo is not the target of data parallelism (GPUs with nccl
are); the figure shows what the collectives cost on top of the halved compute. Reported, no
goal. Setting: bench_train's TopK (d_in 576, 8x, k 32), global batch 4096.

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


def worker(out: str) -> None:
    """Under torchrun: time STEPS steps on this rank's slice; rank 0 writes the median."""
    import torch

    from saectl import distributed
    from saectl.sae import SAEConfig
    from saectl.trainer import TrainConfig, Trainer

    torch.set_num_threads(1)
    distributed.init("cpu")
    rank, world = distributed.world()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, D_IN, generator=g)
    trainer = Trainer(SAEConfig(arch="topk", d_in=D_IN, d_sae=MULT * D_IN, k=K),
                      TrainConfig(total_steps=10_000, lr_warmup_steps=0), x[:2048])
    distributed.broadcast_module(trainer.sae)
    part = x[rank * BATCH // world:(rank + 1) * BATCH // world]
    times = []
    for i in range(2 + STEPS):
        t0 = time.perf_counter()
        trainer.step(part)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(json.dumps({"step_s": statistics.median(times)}))
    distributed.shutdown()


def measure(nproc: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", __file__, "--worker", str(out)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
        if p.returncode != 0:
            raise RuntimeError(f"torchrun with {nproc} ranks failed: {p.stderr[-2000:]}")
        return json.loads(out.read_text())["step_s"]


def run():
    from benchmarks.common import Row

    one, two = measure(1), measure(2)
    return [Row("ddp train step time, 2 ranks vs 1 (CPU gloo, 1 thread each)", BATCH / two,
                BATCH / one, "tokens/s", "",
                note=f"1 rank {one * 1e3:.0f} ms/step, 2 ranks {two * 1e3:.0f} ms/step on half "
                     f"the batch each; TopK {MULT}x{D_IN} k{K}, global batch {BATCH}")]


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker(sys.argv[sys.argv.index("--worker") + 1])
    else:
        for r in run():
            print(r.as_dict())
