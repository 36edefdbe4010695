"""How cost grows with work (issue 8's scaling curves), with the exponent of a power law
y = a·x^b fitted by least squares on log-log axes:

- harvest (SmolLM2-135M, resid_post.15, 8 × 128 batches): wall time and the artifact's bytes on
  disk against tokens (BENCH_SCALING_TOKENS, default 1024 … 8192); linear means b ≈ 1.
- shuffle (synthetic float16, d_in 576, 256 KiB chunks so the data can be many budgets large):
  peak RSS growth of the real `saectl shuffle --memory 32MiB` against the data's size
  (37 MB … 302 MB); flat at the budget means b ≈ 0 and every point ≤ 32 MiB.
- train (saectl's TopK `Trainer.step`, d_in 576, batch 4096): step time and peak RSS growth
  against width 4×–64× at k 32, and against k 16–128 at 16×.

Draws the curves into one PNG, benchmarks/scaling.png, copied to docs/scaling.png for README.
Sizes are small so the suite stays minutes long on a 2-core CPU; timings are medians.

    .bench-venv/bin/python benchmarks/bench_scaling.py      # prints the points and exponents
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import Row, peak_growth, synthetic_import

D_IN, BATCH = 576, 4096
HARVEST_HOOK, CTX, HARVEST_BATCH = "resid_post.15", 128, 8
HARVEST_TOKENS = [int(v) for v in
                  os.environ.get("BENCH_SCALING_TOKENS", "1024,2048,4096,8192").split(",")]
SHUFFLE_ROWS = [int(v) for v in
                os.environ.get("BENCH_SCALING_ROWS", "32768,65536,131072,262144").split(",")]
SHUFFLE_MEMORY, SHUFFLE_CHUNK_BYTES = "32MiB", 256 << 10
WIDTHS = [4, 8, 16, 32, 64]
KS = [16, 32, 64, 128]
K, K_WIDTH = 32, 16
STEPS, WARMUP = int(os.environ.get("BENCH_SCALING_STEPS", "5")), 2
ROUNDS = 3  # harvest rounds over the token counts
THREADS = int(os.environ.get("BENCH_SCALING_THREADS", "1"))
"""torch threads while timing. One: the exponents are properties of the work, and a single
thread's CPU time is the work done, which other jobs on a shared machine barely change (two
threads on a loaded 2-core machine wait on each other at every parallel region)."""
PNG = Path(__file__).with_name("scaling.png")
DOCS_PNG = ROOT / "docs" / "scaling.png"


def power_law(x, y) -> float:
    """The exponent b of y = a·x^b, least squares on log-log axes."""
    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- harvest ---------------------------------------------------------------------------------


def harvest_curve() -> dict:
    from saectl import data, models, store
    from saectl.hooks import hook_dim, parse_hooks
    from stages import harvest

    spec = models.resolve_model(None)
    tok = models.load_tokenizer(spec)
    model = models.load_model(spec, device="cpu")
    n_max = max(HARVEST_TOKENS) // CTX
    tokens = data.pack_tokens(tok, data.iter_texts(data.resolve_dataset(None)), CTX, n_max)
    hooks = parse_hooks(model, [HARVEST_HOOK])
    dims = {HARVEST_HOOK: hook_dim(model, hooks[0])}

    def once(n_tokens: int) -> tuple[float, float, int]:
        cfg = harvest.HarvestConfig(hooks=HARVEST_HOOK, tokens=n_tokens, context_size=CTX,
                                    batch_size=HARVEST_BATCH, device="cpu")
        root = tempfile.mkdtemp(prefix="bench-scaling-harvest-")
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            art = store.artifact_for(store.store_root(root), "harvest", {"bench": n_tokens})
            with store.writing(art, {"bench": n_tokens}):
                layout = harvest.make_layout(cfg, dims)
                group = harvest._create_arrays(art, layout, dims, cfg)
                harvest._harvest(art, group, layout, model, hooks, tokens[:cfg.n_seq],
                                 torch.device("cpu"), cfg, None)
                store.mark_complete(art, harvest._summary(art, group, cfg, dims))
            return (time.perf_counter() - t0, time.process_time() - c0,
                    _dir_bytes(art.path))
        finally:
            shutil.rmtree(root, ignore_errors=True)

    once(HARVEST_TOKENS[0])  # warm-up
    wall: dict[int, list[float]] = {n: [] for n in HARVEST_TOKENS}
    cpu: dict[int, list[float]] = {n: [] for n in HARVEST_TOKENS}
    disk: dict[int, int] = {}
    for r in range(ROUNDS):  # rounds over the sizes, the order rotating: drift hits all alike
        sizes = HARVEST_TOKENS[r % len(HARVEST_TOKENS):] + HARVEST_TOKENS[:r % len(HARVEST_TOKENS)]
        for n in sizes:
            dt, dc, nbytes = once(n)
            wall[n].append(dt)
            cpu[n].append(dc)
            disk[n] = nbytes
    return {"tokens": HARVEST_TOKENS,
            "seconds": [statistics.median(wall[n]) for n in HARVEST_TOKENS],
            "cpu_seconds": [statistics.median(cpu[n]) for n in HARVEST_TOKENS],
            "bytes": [disk[n] for n in HARVEST_TOKENS]}


# -- shuffle ---------------------------------------------------------------------------------


def shuffle_curve() -> dict:
    from saectl import arrays
    from saectl.config import parse_bytes

    growth, seconds, sizes = [], [], []
    old = arrays.CHUNK_BYTES
    work = Path(tempfile.mkdtemp(prefix="bench-scaling-shuffle-"))
    try:
        for n in SHUFFLE_ROWS:
            store_dir = work / str(n)
            arrays.CHUNK_BYTES = SHUFFLE_CHUNK_BYTES  # the import's chunks, as the shuffle's
            try:
                ref = synthetic_import(store_dir, n, D_IN)
            finally:
                arrays.CHUNK_BYTES = old
            t0 = time.perf_counter()
            g = peak_growth("shuffle", ref, "--store", store_dir, "--memory", SHUFFLE_MEMORY,
                            env={"SAECTL_CHUNK_BYTES": str(SHUFFLE_CHUNK_BYTES)})
            seconds.append(time.perf_counter() - t0)
            growth.append(g)
            sizes.append(n * D_IN * 2)
            shutil.rmtree(store_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"rows": SHUFFLE_ROWS, "bytes": sizes, "growth": growth, "seconds": seconds,
            "budget": parse_bytes(SHUFFLE_MEMORY)}


# -- train -----------------------------------------------------------------------------------


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH, D_IN, generator=g) for _ in range(n)]


def _trainer(d_sae: int, k: int, sample: torch.Tensor):
    from saectl.sae import SAEConfig
    from saectl.trainer import TrainConfig, Trainer

    return Trainer(SAEConfig(arch="topk", d_in=D_IN, d_sae=d_sae, k=k),
                   TrainConfig(total_steps=10_000, lr_warmup_steps=0), sample)


def train_memory_one(d_sae: int, k: int) -> dict:
    """In a fresh process: peak RSS growth of three steps over the RSS after set-up."""
    from benchmarks.bench_train import _peak_rss_mib, _reset_peak_rss, _rss_mib, _set_threads

    _set_threads()
    data = _batches(2)
    trainer = _trainer(d_sae, k, data[0])
    _reset_peak_rss()
    before = _rss_mib()
    for r in range(3):
        trainer.step(data[r % 2])
    return {"growth_mib": _peak_rss_mib() - before}


def _train_memory(d_sae: int, k: int) -> float:
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); "
            "from benchmarks import bench_scaling as b; "
            "print(json.dumps(b.train_memory_one(int(sys.argv[2]), int(sys.argv[3]))))")
    env = {**os.environ, "BENCH_TRAIN_THREADS": str(THREADS or torch.get_num_threads())}
    p = subprocess.run([sys.executable, "-c", code, str(ROOT), str(d_sae), str(k)],
                       check=False, capture_output=True, text=True, cwd=ROOT, env=env)
    if p.returncode:
        raise RuntimeError(f"train memory at d_sae={d_sae}, k={k} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])["growth_mib"]


def train_curves() -> dict:
    """Step times of all the trainers in one process, one step each in turn with the order
    rotating every round (so a busy moment of the machine hits every point alike); medians
    after WARMUP rounds, in wall and this process's CPU time. Memory: each in its own process."""
    data = _batches(4)
    points = list(dict.fromkeys([(m * D_IN, K) for m in WIDTHS] +
                                [(K_WIDTH * D_IN, k) for k in KS]))
    trainers = {p: _trainer(*p, data[0]) for p in points}
    wall: dict[tuple, list[float]] = {p: [] for p in points}
    cpu: dict[tuple, list[float]] = {p: [] for p in points}
    for r in range(WARMUP + STEPS):
        x = data[r % len(data)]
        for p in points[r % len(points):] + points[:r % len(points)]:
            t0, c0 = time.perf_counter(), time.process_time()
            trainers[p].step(x)
            if r >= WARMUP:
                wall[p].append(time.perf_counter() - t0)
                cpu[p].append(time.process_time() - c0)
    del trainers
    memory = {p: _train_memory(*p) for p in points}

    def series(ps):
        return {"seconds": [statistics.median(wall[p]) for p in ps],
                "cpu_seconds": [statistics.median(cpu[p]) for p in ps],
                "growth_mib": [memory[p] for p in ps]}

    return {"threads": torch.get_num_threads(),
            "width": {"mult": WIDTHS, **series([(m * D_IN, K) for m in WIDTHS])},
            "k": {"k": KS, **series([(K_WIDTH * D_IN, k) for k in KS])}}


# -- the figure ------------------------------------------------------------------------------


def draw(res: dict, fits: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    h, s, w, k = res["harvest"], res["shuffle"], res["train"]["width"], res["train"]["k"]

    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")

    def loglog(ax, x, y, label, fit, marker="o", color=None, ls="-"):
        ax.loglog(x, y, marker=marker, color=color, ls=ls, label=f"{label} (b = {fit:.2f})")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xticks(x)
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)

    ax = axes[0, 0]
    loglog(ax, h["tokens"], h["cpu_seconds"], "CPU time", fits["harvest_time"], color="C0")
    loglog(ax, h["tokens"], h["seconds"], "wall time", fits["harvest_wall"], color="C0",
           marker=".", ls=":")
    ax.set_xlabel("tokens harvested")
    ax.set_ylabel("seconds")
    ax.set_title("harvest: time (SmolLM2 resid_post.15)")
    ax.legend(loc="upper left")

    ax = axes[0, 1]
    loglog(ax, h["tokens"], np.asarray(h["bytes"]) / 2**20, "artifact on disk, MiB",
           fits["harvest_disk"], color="C1")
    ax.set_xlabel("tokens harvested")
    ax.set_ylabel("MiB")
    ax.set_title("harvest: disk")
    ax.legend(loc="upper left")

    ax = axes[0, 2]
    mb = np.asarray(s["bytes"]) / 2**20
    ax.plot(mb, np.asarray(s["growth"]) / 2**20, "o-", color="C2",
            label=f"peak RSS growth (b = {fits['shuffle_memory']:.2f})")
    ax.axhline(s["budget"] / 2**20, color="k", ls="--", label=f"--memory {SHUFFLE_MEMORY}")
    ax.set_xscale("log")
    ax.set_xticks(mb)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(0, s["budget"] / 2**20 * 1.6)
    ax.set_xlabel("data shuffled, MiB (float16, d 576)")
    ax.set_ylabel("MiB")
    ax.set_title("shuffle: peak memory against data size")
    ax.legend(loc="upper left")
    ax.grid(True, which="both", alpha=0.3)

    x = np.asarray(w["mult"])
    ax = axes[1, 0]
    loglog(ax, x, w["cpu_seconds"], "CPU time", fits["train_time_width"], color="C3")
    loglog(ax, x, w["seconds"], "wall time", fits["train_wall_width"], color="C3", marker=".",
           ls=":")
    ax.set_xlabel(f"width multiple of d_in {D_IN} (k {K})")
    ax.set_ylabel("seconds per step (4096 tokens)")
    ax.set_title("train: step time against width")
    ax.legend(loc="upper left")

    ax = axes[1, 1]
    loglog(ax, x, w["growth_mib"], "peak RSS growth, MiB", fits["train_memory_width"],
           color="C4")
    ax.set_xlabel(f"width multiple of d_in {D_IN} (k {K})")
    ax.set_ylabel("MiB")
    ax.set_title("train: peak memory against width")
    ax.legend(loc="upper left")

    ax = axes[1, 2]
    kx = np.asarray(k["k"])
    loglog(ax, kx, np.asarray(k["cpu_seconds"]) / k["cpu_seconds"][0], "step CPU time",
           fits["train_time_k"], color="C3")
    loglog(ax, kx, np.asarray(k["growth_mib"]) / k["growth_mib"][0], "peak RSS growth",
           fits["train_memory_k"], marker="s", color="C4", ls="--")
    ax.set_xlabel(f"k (width {K_WIDTH}x = {K_WIDTH * D_IN})")
    ax.set_ylabel(f"relative to k {k['k'][0]} ({k['cpu_seconds'][0]:.2f} CPU s, "
                  f"{k['growth_mib'][0]:.0f} MiB)")
    ax.set_title("train: step time and memory against k")
    ax.legend(loc="upper left")

    fig.suptitle("saectl scaling: power-law exponent b of y = a·x^b in each legend; "
                 f"{THREADS} torch thread(s), CPU time of the process", y=0.995)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- entry points ----------------------------------------------------------------------------


def measure() -> tuple[dict, dict]:
    threads = torch.get_num_threads()
    if THREADS:
        torch.set_num_threads(THREADS)
    try:
        res = {"harvest": harvest_curve(), "shuffle": shuffle_curve(), "train": train_curves()}
    finally:
        torch.set_num_threads(threads)
    h, s, w, k = res["harvest"], res["shuffle"], res["train"]["width"], res["train"]["k"]
    fits = {"harvest_time": power_law(h["tokens"], h["cpu_seconds"]),
            "harvest_wall": power_law(h["tokens"], h["seconds"]),
            "harvest_disk": power_law(h["tokens"], h["bytes"]),
            "shuffle_memory": power_law(s["bytes"], s["growth"]),
            "shuffle_time": power_law(s["bytes"], s["seconds"]),
            "train_time_width": power_law(w["mult"], w["cpu_seconds"]),
            "train_wall_width": power_law(w["mult"], w["seconds"]),
            "train_memory_width": power_law(w["mult"], w["growth_mib"]),
            "train_time_k": power_law(k["k"], k["cpu_seconds"]),
            "train_wall_k": power_law(k["k"], k["seconds"]),
            "train_memory_k": power_law(k["k"], k["growth_mib"])}
    draw(res, fits, PNG)
    DOCS_PNG.parent.mkdir(exist_ok=True)
    shutil.copyfile(PNG, DOCS_PNG)
    return res, fits


def _pts(xs, ys, fmt) -> str:
    return ", ".join(f"{x:,}: {fmt(y)}" for x, y in zip(xs, ys))


def run() -> list[Row]:
    """Rows for `benchmarks/run.py`: one per fitted exponent, the points in the note."""
    res, fits = measure()
    h, s, w, k = res["harvest"], res["shuffle"], res["train"]["width"], res["train"]["k"]
    budget = s["budget"] / 2**20
    threads = res["train"]["threads"]
    f1, f3 = "{:.1f}".format, "{:.3f}".format
    return [
        Row("scaling: harvest CPU time vs tokens, exponent", fits["harvest_time"], 1.0, "",
            "<= 1.1", note="tokens: CPU s = " + _pts(h["tokens"], h["cpu_seconds"], f1)
                           + "; wall s = " + _pts(h["tokens"], h["seconds"], f1)
                           + f" (exponent {fits['harvest_wall']:.2f}); {threads} torch thread(s)"),
        Row("scaling: harvest disk bytes vs tokens, exponent", fits["harvest_disk"], 1.0, "",
            "<= 1.05", note="tokens: MiB = " + _pts(h["tokens"], h["bytes"],
                                                     lambda b: f"{b / 2**20:.2f}")),
        Row(f"scaling: shuffle peak RSS vs data size, exponent (--memory {SHUFFLE_MEMORY})",
            fits["shuffle_memory"], 0.0, "", "<= 0.1",
            note="data MB: growth MiB = " + _pts([b // 10**6 for b in s["bytes"]], s["growth"],
                                                  lambda g: f"{g / 2**20:.1f}")
                 + f"; shuffle wall time exponent {fits['shuffle_time']:.2f}"),
        Row(f"scaling: shuffle largest peak RSS growth MiB vs --memory {SHUFFLE_MEMORY}",
            max(s["growth"]) / 2**20, budget, "MiB", "<= 1x",
            note=f"largest data {max(s['bytes']) / 2**20:.0f} MiB, "
                 f"{max(s['bytes']) / s['budget']:.0f}x the budget"),
        Row(f"scaling: train step CPU time vs width {WIDTHS[0]}x-{WIDTHS[-1]}x (k {K}), exponent",
            fits["train_time_width"], 1.0, "", "report", met=True,
            note="width: CPU s/step = " + _pts(w["mult"], w["cpu_seconds"], f3)
                 + "; wall s/step = " + _pts(w["mult"], w["seconds"], f3)
                 + f" (exponent {fits['train_wall_width']:.2f}); {threads} torch thread(s)"),
        Row(f"scaling: train peak RSS growth vs width {WIDTHS[0]}x-{WIDTHS[-1]}x, exponent",
            fits["train_memory_width"], 1.0, "", "report", met=True,
            note="width: MiB = " + _pts(w["mult"], w["growth_mib"], "{:.0f}".format)),
        Row(f"scaling: train step CPU time vs k {KS[0]}-{KS[-1]} (width {K_WIDTH}x), exponent",
            fits["train_time_k"], 0.0, "", "report", met=True,
            note="k: CPU s/step = " + _pts(k["k"], k["cpu_seconds"], f3)
                 + "; wall s/step = " + _pts(k["k"], k["seconds"], f3)
                 + f" (exponent {fits['train_wall_k']:.2f})"),
        Row(f"scaling: train peak RSS growth vs k {KS[0]}-{KS[-1]}, exponent",
            fits["train_memory_k"], 0.0, "", "report", met=True,
            note="k: MiB = " + _pts(k["k"], k["growth_mib"], "{:.0f}".format)),
    ]


def main() -> None:
    for r in run():
        print(f"{r.benchmark}: {r.saectl:.3f}  ({r.note})")
    print(f"wrote {PNG} and {DOCS_PNG}")


if __name__ == "__main__":
    main()
