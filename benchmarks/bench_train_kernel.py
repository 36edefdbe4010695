"""TopK SAE training speed and memory: saectl's `Trainer.step` (sparse kernels) against a plain
dense PyTorch TopK loop (dense encode, topk, dense decode matmul, autograd, Adam).

Setting (the goal's): d_in = 576 (SmolLM2-135M), widths 8× (4608) and 32× (18432), k = 32,
batch 4096 tokens, float32, default torch threads. Timing: the two steps alternate in one
process, median of BENCH_TRAIN_STEPS (default 5) steps after 2 warm-up steps. Memory: each
implementation runs alone in a fresh subprocess; peak RSS of that process (ru_maxrss), and
its growth over the RSS just before the first step (Linux /proc).

    .venv/bin/python benchmarks/bench_train_kernel.py          # prints a table
    BENCH_TRAIN_WIDTHS=8 .venv/bin/python benchmarks/bench_train_kernel.py
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

D_IN, K, BATCH = 576, 32, 4096
WIDTHS = [int(w) for w in os.environ.get("BENCH_TRAIN_WIDTHS", "8,32").split(",")]
STEPS = int(os.environ.get("BENCH_TRAIN_STEPS", "5"))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    """VmHWM: this process's peak RSS. (ru_maxrss would carry the parent's peak over fork.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover


def make_saectl(d_sae: int, sample: torch.Tensor):
    from saectl.sae import SAEConfig
    from saectl.trainer import TrainConfig, Trainer

    trainer = Trainer(SAEConfig(arch="topk", d_in=D_IN, d_sae=d_sae, k=K),
                      TrainConfig(total_steps=10_000, lr_warmup_steps=0), sample)
    return trainer.step


def make_dense(d_sae: int, sample: torch.Tensor):
    """The plain loop: what one writes with dense tensors and autograd."""
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(d_sae, D_IN, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = torch.nn.Parameter(W_dec.t().clone())
    W_dec = torch.nn.Parameter(W_dec)
    b_enc = torch.nn.Parameter(torch.zeros(d_sae))
    b_dec = torch.nn.Parameter(sample.mean(0))
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=2e-4 / (d_sae / 2**14) ** 0.5)

    def step(x: torch.Tensor) -> None:
        pre = (x - b_dec) @ W_enc + b_enc
        vals, idx = pre.topk(K, dim=-1, sorted=False)
        acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        x_hat = acts @ W_dec + b_dec
        loss = (x_hat - x).pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


MAKERS = {"saectl": make_saectl, "dense": make_dense}


def _data(n_batches: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH, D_IN, generator=g) for _ in range(n_batches)]


def time_pair(d_sae: int) -> dict[str, float]:
    """Median tokens/s of each implementation, steps alternating."""
    import time

    data = _data(4)
    steps = {name: make(d_sae, data[0]) for name, make in MAKERS.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(2 + STEPS):
        for name, step in steps.items():
            x = data[r % len(data)]
            t0 = time.perf_counter()
            step(x)
            if r >= 2:
                times[name].append(time.perf_counter() - t0)
    return {name: BATCH / sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def memory_one(name: str, d_sae: int) -> dict[str, float]:
    """Run in a fresh process: peak RSS of `name` training at width d_sae."""
    data = _data(2)
    step = MAKERS[name](d_sae, data[0])
    before = _rss_mib()
    for r in range(3):
        step(data[r % 2])
    return {"peak_rss_mib": _peak_rss_mib(), "growth_mib": _peak_rss_mib() - before}


def memory(name: str, d_sae: int) -> dict[str, float]:
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
            f"import bench_train_kernel as b; print(json.dumps(b.memory_one({name!r}, {d_sae})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure() -> list[dict]:
    results = []
    for mult in WIDTHS:
        d_sae = mult * D_IN
        mem = {name: memory(name, d_sae) for name in MAKERS}
        speed = time_pair(d_sae)
        results.append({"width": f"{mult}x ({d_sae})", "d_sae": d_sae,
                        **{f"{n}_tokens_per_s": speed[n] for n in MAKERS},
                        **{f"{n}_{k}": v for n in MAKERS for k, v in mem[n].items()}})
    return results


def run():
    """Rows for `benchmarks/run.py`."""
    from benchmarks.common import Row

    rows = []
    for r in measure():
        rows.append(Row(f"topk train tokens/s {r['width']}", r["saectl_tokens_per_s"],
                        r["dense_tokens_per_s"], "tokens/s", ">= 1x",
                        note="baseline: plain dense PyTorch TopK loop"))
        rows.append(Row(f"topk train peak RSS MiB {r['width']}", r["saectl_peak_rss_mib"],
                        r["dense_peak_rss_mib"], "MiB", "",
                        note="goal: no higher than the dense loop"))
    return rows


def main() -> None:
    print(f"threads={torch.get_num_threads()} d_in={D_IN} k={K} batch={BATCH} "
          f"steps={STEPS} (median after 2 warm-up, alternating)")
    print(f"{'width':>14} {'impl':>7} {'tokens/s':>10} {'peak RSS MiB':>13} {'growth MiB':>11}")
    for r in measure():
        for n in MAKERS:
            print(f"{r['width']:>14} {n:>7} {r[f'{n}_tokens_per_s']:>10,.0f} "
                  f"{r[f'{n}_peak_rss_mib']:>13,.0f} {r[f'{n}_growth_mib']:>11,.0f}")
        print(f"{'':>14} speed-up {r['saectl_tokens_per_s'] / r['dense_tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
