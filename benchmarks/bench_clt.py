"""Cross-layer transcoder training step time against width and number of layers (issue 18).

A CLT over L layers does the work of L per-layer transcoders (L encoders) plus its cross-layer
decoders: a latent of layer l writes to the L - l layers from l on, (L + 1) / 2 layers on
average, so its decoder does about (L + 1) / 2 times the per-layer transcoders' decoding. The
baseline, measured in the same run, is therefore L steps of saectl's per-layer TopK transcoder
of the same per-layer width and k (its sparse kernels), and the goal is that a CLT step costs
no more than (L + 1) / 2 times that: the cross-layer decoding and nothing wasted beside it.

Setting: d 576 per layer (SmolLM2-135M), k 32 per layer, batch BENCH_CLT_BATCH (1024) tokens,
float32, random (x, y) batches; `Trainer.step` for both (unit-norm decoder, fused Adam, AuxK
bookkeeping). Median of BENCH_TRAIN_STEPS steps after 2 warm-up rounds, the two alternating.

    BENCH_TRAIN_THREADS=1 .venv/bin/python benchmarks/bench_clt.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_train import STEPS, WARMUP, _progress, _set_threads  # noqa: E402

D, K = 576, 32
BATCH = int(os.environ.get("BENCH_CLT_BATCH", "1024"))
GRID = [(layers, mult) for layers in (2, 4) for mult in (4, 8)]
"""(layers, per-layer width as a multiple of d)."""


def _trainer(arch: str, layers: int, mult: int, x0, y0):
    from saectl.sae import SAEConfig
    from saectl.trainer import TrainConfig, Trainer

    cfg = SAEConfig(arch=arch, d_in=layers * D, d_sae=layers * mult * D, k=K, n_layers=layers,
                    transcoder=True)
    return Trainer(cfg, TrainConfig(total_steps=10_000, lr_warmup_steps=0), x0, target_sample=y0)


def time_one(layers: int, mult: int) -> tuple[float, float]:
    """(median CLT step seconds, median seconds of one per-layer transcoder step)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, layers * D, generator=g)
    y = x @ (torch.randn(layers * D, layers * D, generator=g) / (layers * D) ** 0.5)
    clt = _trainer("clt", layers, mult, x, y)
    one = _trainer("topk", 1, mult, x[:, :D], y[:, :D])
    t_clt, t_one = [], []
    for r in range(WARMUP + STEPS):
        for name in (("clt", "one") if r % 2 else ("one", "clt")):
            t0 = time.perf_counter()
            if name == "clt":
                clt.step(x, y)
            else:
                one.step(x[:, :D], y[:, :D])
            if r >= WARMUP:
                (t_clt if name == "clt" else t_one).append(time.perf_counter() - t0)
    return statistics.median(t_clt), statistics.median(t_one)


def run():
    """Rows for `benchmarks/run.py`: one per (layers, width), goal <= (L + 1) / 2."""
    from benchmarks.common import Row

    _set_threads()
    rows = []
    for layers, mult in GRID:
        _progress(f"clt {layers} layers {mult}x")
        t_clt, t_one = time_one(layers, mult)
        bound = (layers + 1) / 2
        # saectl's figure and the baseline as tokens/s, so the ratio is the CLT's speed relative
        # to L per-layer transcoders: the goal is ratio >= 1 / bound
        rows.append(Row(f"CLT step {layers} layers x {mult}x{D} latents vs {layers} per-layer "
                        "transcoders", BATCH / t_clt, BATCH / (layers * t_one), "tokens/s",
                        f">= {1 / bound:.2f}x",
                        note=f"CLT step {t_clt * 1e3:.0f} ms, per-layer transcoder step "
                             f"{t_one * 1e3:.0f} ms (x{layers} = {layers * t_one * 1e3:.0f} ms); "
                             f"goal: at most (L+1)/2 = {bound:g}x their time; batch {BATCH}, "
                             f"{torch.get_num_threads()} torch threads"))
    return rows


def main() -> None:
    for r in run():
        print(r.as_dict())


if __name__ == "__main__":
    main()
