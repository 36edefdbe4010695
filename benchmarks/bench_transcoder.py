"""TopK transcoder training speed: saectl's `Trainer.step(x, y)` against EleutherAI's sparsify
(`eai-sparsify`) with `transcode=True`, without and with its skip connection (issue 18).

Setting: bench_train's (d_in 576, width 8× = 4608, k 32, batch 4096, float32), a transcoder
mapping an input x to a target y of the same width (an MLP's input to its output), the same
random (x, y) batches and the same torch threads (BENCH_TRAIN_THREADS) for all.

What one step of each does (each as its own trainer drives it; no dead latents yet):
- saectl: `Trainer(SAEConfig(arch="topk", transcoder=True, skip=...), ..., target_sample=y)`
  and `Trainer.step(x, y)`: the sparse TopK kernels (the input shifted by b_dec, which the
  kernel subtracts again), unit-norm decoder, fused Adam, bookkeeping.
- sparsify: `SparseCoder(SparseCoderConfig(expansion_factor, k, transcode=True,
  skip_connection=...))` as `sparsify/trainer.py` drives a transcoder with `optimizer="adam"`:
  on the first step encoder bias −mean(x)·W_encᵀ and b_dec = mean(y); every step forward(x, y,
  dead_mask, total_variance of y), loss = fvu + auxk_alpha·auxk_loss (+ multi_topk_fvu / 8,
  zero here), backward, `torch.optim.Adam` step (lr 2e-4/√(num_latents/2¹⁴)), zero_grad,
  linear schedule step, fired bookkeeping. A transcoder's decoder is neither renormalised nor
  has its parallel gradient removed there (`not self.cfg.sae.transcode`), and starts at zero.

Timing as bench_train's: all four in one process, one step each in turn (the order rotating
every round), median of BENCH_TRAIN_STEPS (default 7) steps after 2 warm-up rounds, plus the
median over rounds of the per-round ratio saectl / sparsify (wall and this process's CPU
time), each saectl variant paired with sparsify's of the same kind. No memory figures: the
transcoder's parameters differ from the SAE's only by W_skip (d_in², 1.3 MB).

    BENCH_TRAIN_THREADS=1 .bench-venv/bin/python benchmarks/bench_transcoder.py
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_train import (
    BATCH,
    D_IN,
    STEPS,
    WARMUP,
    K,
    _import_sparsify,
    _progress,
    _set_threads,
    missing,
    sparsify_step,
)
from benchmarks.common import paired, time_rounds

MULT = int(os.environ.get("BENCH_TRANSCODER_WIDTH", "8"))
"""Width as a multiple of d_in (issue 18: 8×, 4608)."""
PAIRS = [("saectl", "sparsify"), ("saectl skip", "sparsify skip")]
"""Each saectl variant and the sparsify variant it is compared with."""


def make_saectl(d_sae: int, x0: torch.Tensor, y0: torch.Tensor, skip: bool):
    from saectl.sae import SAEConfig
    from saectl.trainer import TrainConfig, Trainer

    trainer = Trainer(SAEConfig(arch="topk", d_in=D_IN, d_sae=d_sae, k=K, transcoder=True,
                                skip=skip),
                      TrainConfig(total_steps=10_000, lr_warmup_steps=0), x0, target_sample=y0)
    return lambda x, y: trainer.step(x, y)["loss"]


def make_sparsify(d_sae: int, x0: torch.Tensor, y0: torch.Tensor, skip: bool):
    sparsify = _import_sparsify()
    torch.manual_seed(0)
    cfg = sparsify.SparseCoderConfig(expansion_factor=d_sae // D_IN, k=K, transcode=True,
                                     skip_connection=skip)
    sae = sparsify.SparseCoder(D_IN, cfg, device="cpu", dtype=torch.float32)
    assert sae.num_latents == d_sae
    with torch.no_grad():  # its trainer's first-step init for a transcoder
        sae.encoder.bias.data = -x0.mean(0) @ sae.encoder.weight.data.T
        sae.b_dec.data = y0.mean(0)
    return sparsify_step(sae)


MAKERS = {"saectl": (make_saectl, False), "saectl skip": (make_saectl, True),
          "sparsify": (make_sparsify, False), "sparsify skip": (make_sparsify, True)}


def _data(n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random (x, y) pairs; y is a fixed random linear image of x plus noise, so the target
    is related to the input as an MLP's output is (the speed does not depend on it)."""
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(D_IN, D_IN, generator=g) / D_IN**0.5
    out = []
    for _ in range(n_batches):
        x = torch.randn(BATCH, D_IN, generator=g)
        out.append((x, x @ mix + 0.5 * torch.randn(BATCH, D_IN, generator=g)))
    return out


def time_all(d_sae: int, names: list[str]) -> dict[str, dict]:
    """Median tokens/s of each, one step each in turn with the order rotating; the per-round
    wall and CPU times, for the paired ratios."""
    data = _data(4)
    steps = {n: MAKERS[n][0](d_sae, *data[0], skip=MAKERS[n][1]) for n in names}
    times, cpu, losses = time_rounds(steps, data, WARMUP, STEPS)
    return {n: {"tokens_per_s": BATCH / statistics.median(ts),
                "spread": (max(ts) - min(ts)) / statistics.median(ts),
                "cpu_s": statistics.median(cpu[n]), "times": ts, "cpu": cpu[n],
                "last_loss": losses[n]} for n, ts in times.items()}


def _paired(a: list[float], b: list[float]) -> float:
    """Median over rounds of b's step time over a's: a's speed-up over b in the same round."""
    return paired(b, a)


def measure() -> tuple[dict, dict[str, str]]:
    _set_threads()
    skipped = missing()
    names = [n for n in MAKERS if not (n.startswith("sparsify") and "sparsify" in skipped)]
    d_sae = MULT * D_IN
    _progress(f"transcoder {MULT}x ({d_sae}) speed")
    speed = time_all(d_sae, names)
    _progress(f"transcoder {MULT}x ({d_sae}) done")
    return speed, skipped


def _speed(m: dict, name: str) -> str:
    return (f"{name} {m['tokens_per_s']:,.0f} tokens/s (spread {m['spread']:.0%}, "
            f"{m['cpu_s']:.2f} CPU s/step)")


def run():
    """Rows for `benchmarks/run.py`: one per (saectl, sparsify) pair, goal >= 1.5x."""
    from benchmarks.common import Row

    speed, skipped = measure()
    width = f"{MULT}x ({MULT * D_IN})"
    rows = []
    for ours, theirs in PAIRS:
        kind = "skip transcoder" if "skip" in ours else "transcoder"
        bench = f"topk {kind} train tokens/s {width} vs {theirs}"
        if theirs not in speed:
            rows.append(Row(bench, speed[ours]["tokens_per_s"], 0.0, "tokens/s", "",
                            note=f"skipped (goal >= 1.5x): {skipped['sparsify']}"))
            continue
        a, b = speed[ours], speed[theirs]
        rows.append(Row(bench, a["tokens_per_s"], b["tokens_per_s"], "tokens/s", ">= 1.5x",
                        note=f"{_speed(a, ours)}, {_speed(b, theirs)}; per-round ratio "
                             f"{_paired(a['times'], b['times']):.2f}x wall, "
                             f"{_paired(a['cpu'], b['cpu']):.2f}x CPU time; "
                             f"{torch.get_num_threads()} torch threads"))
    return rows


def main() -> None:
    _set_threads()
    print(f"threads={torch.get_num_threads()} d_in={D_IN} width={MULT}x k={K} batch={BATCH} "
          f"steps={STEPS} (median after {WARMUP} warm-up rounds, rotating)")
    speed, skipped = measure()
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    print(f"{'impl':>14} {'tokens/s':>10} {'cpu s':>6} {'spread':>7} {'own loss':>9}")
    for n, m in speed.items():
        print(f"{n:>14} {m['tokens_per_s']:>10,.0f} {m['cpu_s']:>6.2f} {m['spread']:>7.0%} "
              f"{m['last_loss']:>9.4g}")
    for ours, theirs in PAIRS:
        if theirs in speed:
            a, b = speed[ours], speed[theirs]
            print(f"{ours} / {theirs}: {a['tokens_per_s'] / b['tokens_per_s']:.2f}x medians, "
                  f"{_paired(a['times'], b['times']):.2f}x per round wall, "
                  f"{_paired(a['cpu'], b['cpu']):.2f}x CPU")


if __name__ == "__main__":
    main()
