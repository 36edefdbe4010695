"""A local sweep of 8 TopK SAEs against 8 separate `saectl train` runs, in one run (issue 4),
and the processes executor with two jobs against the same 8 points one by one, and against
one job on issue 22's MNIST grid (`_mnist_processes`; BENCH_MNIST, BENCH_MNIST_TOKENS,
BENCH_MNIST_ROUNDS); and the sweep's downstream evaluation with the clean and zero-ablated
passes shared against each SAE's own (`_shared_lm_eval`, on the packaged SmolLM2).

Synthetic float16 activations at d_in 576 (SmolLM2's width) are imported and shuffled; the
grid is TopK at 4×, 8×, 16×, 32× and k 16, 32, each on the same tokens. Both sides run the real
commands as subprocesses on fresh stores (so neither gets a cache hit), alternating. Reported:
the ratio of wall times (goal ≤ 0.75) and the share of the separate runs' time spent reading
and decoding activations, which the sweep pays once instead of eight times.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import Row

REPO = Path(__file__).resolve().parents[1]
D_IN, N_ROWS = 576, int(os.environ.get("BENCH_SWEEP_ROWS", "65536"))
TOKENS, BATCH = int(os.environ.get("BENCH_SWEEP_TOKENS", "262144")), 4096
GRID = {"expansion": [4, 8, 16, 32], "k": [16, 32]}


def _saectl(*args, store) -> str:
    p = subprocess.run([sys.executable, "-m", "saectl.cli", *map(str, args), "--store", str(store)],
                       check=False, capture_output=True, text=True, cwd=REPO)
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    return p.stdout.strip()


def _fresh_split(npy: Path) -> tuple[Path, str]:
    store = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    imp = _saectl("import", npy, "--hook", "h", "--dtype", "float16", store=store)
    return store, _saectl("shuffle", imp, store=store)


def run() -> list[Row]:
    from saectl import store as st
    from saectl.reader import BatchReader

    work = Path(tempfile.mkdtemp(prefix="bench-sweep-data-"))
    rng = np.random.default_rng(0)
    np.save(work / "x.npy", rng.normal(size=(N_ROWS, D_IN)).astype(np.float32))
    grid = work / "grid.yaml"
    grid.write_text(f"arch: topk\nexpansion: {GRID['expansion']}\nk: {GRID['k']}\n"
                    f"tokens: {TOKENS}\nbatch_size: {BATCH}\n")
    points = [(e, k) for e in GRID["expansion"] for k in GRID["k"]]
    times = {"sweep": [], "separate": [], "processes": []}
    read_s = None
    order = ["sweep", "separate", "processes"]
    for rep in range(2):
        for side in (order if rep % 2 == 0 else order[::-1]):
            store, split = _fresh_split(work / "x.npy")
            t0 = time.perf_counter()
            if side == "sweep":
                _saectl("sweep", split, "--grid", grid, "--tolerance", "0.99", "--device", "cpu",
                        store=store)
            elif side == "processes":  # issue 22.4: two jobs share the cores, not oversubscribe
                _saectl("sweep", split, "--grid", grid, "--tolerance", "0.99", "--device", "cpu",
                        "--executor", "processes", "--jobs", "2", store=store)
            else:
                for e, k in points:
                    _saectl("train", split, "--arch", "topk", "--expansion", e, "--k", k,
                            "--tokens", TOKENS, "--batch-size", BATCH, "--device", "cpu",
                            store=store)
            times[side].append(time.perf_counter() - t0)
            if read_s is None:  # reading and decoding one SAE's batches, alone
                arr = st.open_complete(store, split).group()["train/h"]
                reader = BatchReader(arr, BATCH, 0)
                t1 = time.perf_counter()
                for _ in reader.iterate(0, -(-TOKENS // BATCH)):
                    pass
                read_s = time.perf_counter() - t1
            shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    sweep, separate, procs = min(times["sweep"]), min(times["separate"]), min(times["processes"])
    share = 8 * read_s / separate
    return [
        Row("local sweep of 8 TopK SAEs vs 8 train runs (wall s)", sweep, separate, "s",
            "<= 0.75x", note=f"{TOKENS:,} tokens each, d_in {D_IN}, 4x-32x, k 16/32; the sweep "
            "also computes 8 description lengths; every run (s): sweep "
            + ", ".join(f"{v:.0f}" for v in times["sweep"]) + "; separate "
            + ", ".join(f"{v:.0f}" for v in times["separate"])),
        Row("processes executor --jobs 2 vs the 8 points run one by one (wall s)", procs,
            separate, "s", "<= 0.7x",
            note=f"{os.cpu_count()} cores, each job given its share of them; every run (s): "
            + ", ".join(f"{v:.0f}" for v in times["processes"])),
        Row("share of the 8 train runs spent reading+decoding activations", share, 1.0, "",
            "", note=f"{8 * read_s:.1f}s of {separate:.1f}s; the sweep reads once: {read_s:.1f}s"),
        *_mnist_processes(),
        _concatenated_encoder(),
        *_shared_lm_eval(),
    ]


MNIST = Path(os.environ.get("BENCH_MNIST", REPO.parent / "shared" / "data" / "mnist"))
MNIST_TOKENS = int(os.environ.get("BENCH_MNIST_TOKENS", "120000"))
MNIST_ROUNDS = int(os.environ.get("BENCH_MNIST_ROUNDS", "2"))


def _mnist_processes() -> list[Row]:
    """The processes executor on issue 22's own case: a 12-point TopK grid on MNIST pixels
    (d_in 784, widths 32 to 2,048, k 2/8/16, batch 256, as pipelines/mdl-mnist.yaml trains),
    `--jobs 2` (one thread each) against `--jobs 1` (each point alone with every core), each on
    a fresh store. Small SAEs on small batches use a second thread poorly, so two one-thread
    jobs gain most here. Skipped, saying why, without the data."""
    images = MNIST / "train-images.idx3-ubyte.gz"
    if not images.is_file():
        print(f"bench: no {images} (set BENCH_MNIST to the MNIST folder): MNIST processes row "
              "skipped")
        return []
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-mnist-"))
    grid = work / "grid.yaml"
    grid.write_text(f"arch: topk\nwidth: [32, 128, 512, 2048]\nk: [2, 8, 16]\n"
                    f"tokens: {MNIST_TOKENS}\nbatch_size: 256\ndead_tokens: 50000\n"
                    "lm_eval: false\n")
    times: dict[int, list[float]] = {1: [], 2: []}
    for rnd in range(MNIST_ROUNDS):  # alternated: 1 then 2, 2 then 1, ...
        for jobs in ((1, 2) if rnd % 2 == 0 else (2, 1)):
            store = work / f"round{rnd}-jobs{jobs}"
            imp = _saectl("import", images, "--hook", "pixels", store=store)
            split = _saectl("shuffle", imp, "--eval-fraction", "0.0834",
                            "--max-activation-norm-multiple", "0", store=store)
            t0 = time.perf_counter()
            _saectl("sweep", split, "--grid", grid, "--tolerance", "0.5", "--device", "cpu",
                    "--executor", "processes", "--jobs", jobs, store=store)
            times[jobs].append(time.perf_counter() - t0)
            shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    each = "; ".join(f"--jobs {j}: {', '.join(f'{t:.1f}' for t in ts)} s" for j, ts in times.items())
    return [Row("processes executor --jobs 2 vs --jobs 1, MNIST grid of 12 (wall s)",
                statistics.median(times[2]), statistics.median(times[1]), "s", "<= 0.7x",
                note=f"issue 22's case: TopK widths 32-2,048 x k 2/8/16 on MNIST pixels, "
                     f"{MNIST_TOKENS:,} images each, batch 256; medians of {MNIST_ROUNDS} "
                     f"alternated rounds ({each})")]


def _concatenated_encoder() -> Row:
    """What sharing the encoder product could save: the 8 SAEs' encoder matmuls on one batch
    as one concatenated product (the sweep's SAEs share the batch and d_in) against 8 separate
    ones, outputs preallocated (as the TopK kernel's buffer is), alternated, medians."""
    import torch

    x = torch.randn(1024, D_IN + 1)  # the kernel's augmented input (bias folded in)
    widths = [D_IN * e for e in GRID["expansion"] for _ in GRID["k"]]
    Ws = [torch.randn(D_IN + 1, w) for w in widths]
    W_cat, outs = torch.cat(Ws, 1), [torch.empty(1024, w) for w in widths]
    out_cat = torch.empty(1024, sum(widths))

    def separate():
        for W, o in zip(Ws, outs):
            torch.mm(x, W, out=o)

    times = {"separate": [], "concatenated": []}
    for rep in range(6):
        for name, fn in ((("separate", separate), ("concatenated", lambda: torch.mm(
                x, W_cat, out=out_cat))))[:: 1 if rep % 2 else -1]:
            t0 = time.perf_counter()
            fn()
            if rep:
                times[name].append(time.perf_counter() - t0)
    cat, sep = (statistics.median(times[n]) for n in ("concatenated", "separate"))
    return Row("sweep floor: the 8 encoders as one concatenated matmul vs 8 (s per 1024 rows)",
               cat, sep, "s", "", note=f"{torch.get_num_threads()} torch threads; the encoder "
               "product is most of a TopK step, and one concatenated product does the same "
               "FLOPs: this ratio bounds what a shared encoder could save")


LM_EVAL_SEQS = int(os.environ.get("BENCH_LM_EVAL_SEQS", "8"))


def _shared_lm_eval() -> list[Row]:
    """The sweep's downstream evaluation: the grid's 8 TopK SAEs (randomly initialised; the
    time does not depend on the weights) spliced into the packaged SmolLM2-135M at
    resid_post.15 on LM_EVAL_SEQS sequences of 128 tokens (the demo's lm_eval_seqs), as a
    local sweep now does it (`metrics.spliced_many`: one clean and one zero-ablated pass a
    batch for all 8) against each SAE alone (`metrics.spliced`, as 8 train runs or the
    processes executor do). Alternated, the figures checked equal. Skipped, saying why,
    without the packaged model."""
    import torch

    from saectl import metrics, models
    from saectl.errors import SaectlError
    from saectl.sae import ARCHS, SAEConfig

    try:
        model = models.load_model(models.resolve_model(models.DEFAULT_MODEL), device="cpu")
    except SaectlError as e:
        print(f"bench: {e}: shared lm-eval row skipped")
        return []
    torch.manual_seed(0)
    saes = {f"{e}x k{k}": ARCHS["topk"](SAEConfig(arch="topk", d_in=D_IN, d_sae=D_IN * e, k=k))
            for e in GRID["expansion"] for k in GRID["k"]}
    ids = torch.randint(0, model.config.vocab_size, (LM_EVAL_SEQS, 128))
    hook = "resid_post.15"
    times: dict[str, list[float]] = {"shared": [], "alone": []}
    figures = {}

    def shared():
        figures["shared"] = metrics.spliced_many(model, saes, hook, None, ids, 1)

    def alone():
        figures["alone"] = {k: metrics.spliced(model, sae, hook, None, ids, 1)
                            for k, sae in saes.items()}

    for rep in range(2):
        for name, fn in (("shared", shared), ("alone", alone))[:: 1 if rep % 2 == 0 else -1]:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    same = figures["shared"] == figures["alone"]
    return [Row("sweep lm-eval of 8 SAEs: clean and zero-ablated passes shared vs each SAE "
                "alone (wall s)", min(times["shared"]), min(times["alone"]), "s", "",
                note=f"SmolLM2-135M resid_post.15, {LM_EVAL_SEQS} sequences of 128 tokens, "
                     f"4 a batch: {2 + len(saes)} forward passes a batch against "
                     f"{3 * len(saes)}; figures {'equal' if same else 'DIFFER'}; every run (s): "
                     + "; ".join(f"{n} {', '.join(f'{t:.1f}' for t in ts)}"
                                 for n, ts in times.items()))]
