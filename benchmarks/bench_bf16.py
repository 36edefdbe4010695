"""Training in bfloat16 (issue 23): TopK training tokens/s with `--autocast bfloat16` against
saectl's own float32 in the same run (goal >= 1.6x) and against sparsify as its trainer runs
here (goal >= 4x), at 8x and 32x width of d_in 576 (SmolLM2-135M), k 32; and the quality of
bf16 runs against fp32 ones (relative FVU difference <= 1%, MMCS within 0.01): every
architecture on the tests' planted features (10 seeds: bf16's effect is the mean signed
difference, beside a control that nudges an fp32 run once at bf16's resolution), TopK on
SmolLM2-135M activations.

- saectl fp32: `Trainer.step` as `saectl train` runs it with its TopK candidate selection in
  float32 too (SAECTL_BF16_SELECT=0), the goal's baseline; and as it runs by default (on a CPU
  with avx512_bf16/amx its TopK kernel already selects candidates from a bf16 product).
- BatchTopK bf16 against its fp32, a dense architecture, reported beside.
- saectl bf16: the same with `TrainConfig(autocast="bfloat16")` (saectl.precision).
- sparsify: bench_train's driver of `SparseCoder`; its forward is under bf16 autocast on CUDA
  only (`@torch.autocast("cuda", enabled=torch.cuda.is_bf16_supported())`), so fp32 on a CPU.

On a CPU without avx512_bf16/amx_bf16 every bf16 product is emulated and ~30x slower than
fp32: the rows say so, and the defaults there shrink the batch (512 tokens, 3 timed steps) so
the suite ends in minutes; tokens/s hardly depend on the batch at these widths.

    .bench-venv/bin/python benchmarks/bench_bf16.py
    BENCH_BF16_WIDTHS=8 BENCH_BF16_QUALITY=0 .bench-venv/bin/python benchmarks/bench_bf16.py
"""

from __future__ import annotations

import json
import math
import os
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

from benchmarks import bench_train
from benchmarks.common import planted_mixtures
from saectl import precision

D_IN, K = bench_train.D_IN, bench_train.K
NATIVE = not precision.emulated("cpu")
BATCH = int(os.environ.get("BENCH_BF16_BATCH", "4096" if NATIVE else "512"))
STEPS = int(os.environ.get("BENCH_BF16_STEPS", "7" if NATIVE else "3"))
WIDTHS = [int(w) for w in os.environ.get("BENCH_BF16_WIDTHS", "8,32").split(",") if w]
QUALITY = os.environ.get("BENCH_BF16_QUALITY", "1") == "1"
Q_HOOK, Q_TOKENS = "resid_post.15", int(os.environ.get("BENCH_BF16_Q_TOKENS", "16384"))
Q_STEPS, Q_BATCH, Q_EXPANSION = int(os.environ.get("BENCH_BF16_Q_STEPS", "40")), 1024, 4
WARMUP = 1
SYNTHETIC = [a for a in os.environ.get(
    "BENCH_BF16_ARCHS", "topk,batchtopk,matryoshka,relu,jumprelu,gated").split(",") if a]
SEEDS = [int(s) for s in os.environ.get("BENCH_BF16_SEEDS", "0,1,2,3,4,5,6,7,8,9").split(",")]


def why() -> str:
    if NATIVE:
        return "this CPU has avx512_bf16/amx_bf16: oneDNN runs the bf16 products natively"
    return ("this CPU lacks avx512_bf16/amx_bf16: bf16 products are emulated (~30x slower than "
            f"fp32), so bf16 cannot be faster here; batch {BATCH}, {STEPS} timed steps")


def make_trainer(d_sae: int, sample: torch.Tensor, autocast: str | None, arch: str = "topk"):
    from saectl.sae import SAEConfig
    from saectl.trainer import TrainConfig, Trainer

    return Trainer(SAEConfig(arch=arch, d_in=D_IN, d_sae=d_sae, k=K),
                   TrainConfig(total_steps=10_000, lr_warmup_steps=0, autocast=autocast), sample)


def make_saectl(d_sae: int, sample: torch.Tensor, autocast: str | None, arch: str = "topk"):
    return make_trainer(d_sae, sample, autocast, arch).step


def exact_fp32(step):
    """`step` with TopK's candidate selection in float32 too (SAECTL_BF16_SELECT=0): saectl's
    float32 where the hardware has no fast bf16, and the float32 limit issue 23 starts from.
    On a CPU with avx512_bf16/amx the default float32 step selects from a bf16 product."""
    from saectl.sae import kernels

    def run(x):
        old, kernels._BF16_ENV = kernels._BF16_ENV, "0"
        try:
            return step(x)
        finally:
            kernels._BF16_ENV = old
    return run


def time_all(d_sae: int, with_sparsify: bool, arch: str = "topk") -> dict[str, float]:
    """Median tokens/s of each, one step each in turn (the order rotating), after a warm-up."""
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(BATCH, D_IN, generator=g) for _ in range(2)]
    steps = {"fp32": make_saectl(d_sae, data[0], None, arch),
             "bf16": make_saectl(d_sae, data[0], "bfloat16", arch)}
    if arch == "topk":
        steps["fp32_exact"] = exact_fp32(make_saectl(d_sae, data[0], None, arch))
    if with_sparsify:
        steps["sparsify"] = bench_train.make_sparsify(d_sae, data[0])
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(WARMUP + STEPS):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            steps[name](data[r % 2])
            if r >= WARMUP:
                times[name].append(time.perf_counter() - t0)
    return {n: BATCH / statistics.median(ts) for n, ts in times.items()}


def selection_times(d_sae: int) -> dict[str, float]:
    """Median seconds of the one part of a TopK step that `--autocast` changes: the kernel's
    selection (saectl.sae.kernels.select_topk) in fp32 (dense fp32 product, top k) and in bf16
    (bf16 product, top k + 8, their exact fp32 values by a sampled product, top k of those).
    The rest of the step (sparse decode, backward, Adam) is the same fp32 code in both, so
    (fp32 step) - (fp32 selection) is what bf16 shares, and these two bound bf16 ÷ fp32."""
    from saectl.sae import kernels

    g = torch.Generator().manual_seed(2)
    x = torch.randn(BATCH, D_IN, generator=g)
    trainer = make_trainer(d_sae, x, None)
    sae = trainer.sae
    with torch.no_grad():
        x_c = (x * trainer.input_scale - sae.b_dec).contiguous()
        fns = {b: (lambda b=b: kernels.select_topk(x_c, sae.W_enc, sae.b_enc, K, bf16=b))
               for b in (False, True)}
        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(WARMUP + STEPS):
            for b in ((False, True) if r % 2 else (True, False)):
                t0 = time.perf_counter()
                fns[b]()
                if r >= WARMUP:
                    times[b].append(time.perf_counter() - t0)
    return {"fp32": statistics.median(times[False]), "bf16": statistics.median(times[True])}


def floor_row(width: str, d_sae: int, step_fp32_s: float):
    """The measured ceiling of bf16 ÷ fp32 for TopK at this width: what bf16 changes is the
    selection; with the shared rest R of the step, bf16 ÷ fp32 <= (sel32 + R) / (sel16 + R)."""
    from benchmarks.common import Row
    from saectl.sae import kernels

    sel = selection_times(d_sae)
    rest = max(step_fp32_s - sel["fp32"], 0.0)
    ceiling = (sel["fp32"] + rest) / (sel["bf16"] + rest)
    need = (sel["fp32"] - 1.6 * sel["bf16"]) / 0.6  # R that would allow 1.6x
    reach = (f"1.6x would need the shared rest at <= {need * 1e3:.1f} ms" if need > 0 else
             "1.6x is out of reach even if the rest of the step cost nothing")
    return Row(f"bf16 train {width}: TopK selection time fp32 / bf16 (bf16's ceiling if the "
               "rest of the step were free)", sel["fp32"] * 1e3, sel["bf16"] * 1e3, "ms", "",
               note=f"selection of {BATCH} tokens: fp32 {sel['fp32'] * 1e3:.1f} ms, bf16 "
                    f"{sel['bf16'] * 1e3:.1f} ms (bf16 product + exact fp32 values of the "
                    f"k + {kernels.SELECT_MARGIN} candidates); the rest of the fp32 step, "
                    f"shared by both: {rest * 1e3:.1f} ms; so bf16 ÷ fp32 <= {ceiling:.2f}x "
                    f"with the rest as it is; {reach}")


def _saectl(*args) -> str:
    p = subprocess.run([sys.executable, "-m", "saectl", *map(str, args)], check=False,
                       capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise RuntimeError(f"saectl {args[0]} failed: {p.stderr.strip()[-500:]}")
    return p.stdout.strip()


def quality() -> dict:
    """fp32 and bf16 TopK SAEs (4x, k 32, Q_STEPS × 1024 tokens) on SmolLM2-135M's
    resid_post.15 over Q_TOKENS harvested tokens: their eval FVUs, and MMCS of the bf16
    decoder against the fp32 one beside that of a second fp32 seed (what "the same" means)."""
    from saectl import store
    from saectl.sae import load_sae

    with tempfile.TemporaryDirectory(prefix="bench-bf16-") as tmp:
        root = store.store_root(tmp)
        h = _saectl("harvest", "--hooks", Q_HOOK, "--tokens", Q_TOKENS, "--store", root)
        sh = _saectl("shuffle", h, "--store", root)
        base = ["train", sh, "--store", root, "--arch", "topk", "--k", K, "--expansion",
                Q_EXPANSION, "--tokens", Q_STEPS * Q_BATCH, "--batch-size", Q_BATCH,
                "--no-lm-eval", "--device", "cpu"]
        refs = {"fp32": _saectl(*base), "bf16": _saectl(*base, "--autocast", "bfloat16"),
                "fp32 seed 1": _saectl(*base, "--seed", "1")}
        arts = {n: store.open_complete(root, r) for n, r in refs.items()}
        fvu = {n: a.manifest()["summary"]["fvu"] for n, a in arts.items()}
        W = {}
        for n, a in arts.items():
            w = load_sae(store.sae_dir(a)).W_dec.detach()
            W[n] = w / w.norm(dim=1, keepdim=True)

        def mmcs(a, b):
            return float((W[a] @ W[b].T).max(1).values.mean())

        return {"fvu": fvu, "mmcs_bf16": mmcs("bf16", "fp32"),
                "mmcs_seed": mmcs("fp32 seed 1", "fp32")}


def synthetic_quality(arch: str, seed: int) -> dict:
    """fp32 and bf16 runs of one architecture on the planted data (width 96, k 3, 390 steps of
    512, the tests' budget): held-out FVU and MMCS against the planted directions of each. And
    the control "nudge": the fp32 run with its initial W_enc moved once by a relative 2^-9 (bf16's
    resolution), to measure how far any such nudge carries a run by its end."""
    from saectl.fitting import DECODER_LR_MULT
    from saectl.sae import ARCHS, SAEConfig
    from saectl.trainer import TrainConfig, Trainer

    x, D = planted_mixtures()  # tests/test_train.py's ground truth
    x = torch.from_numpy(x)
    train, held = x[:18000], x[18000:]
    out = {}
    for name, autocast in (("fp32", None), ("bfloat16", "bfloat16"), ("nudge", None)):
        torch.manual_seed(seed)
        cfg = TrainConfig(seed=seed, total_steps=390, lr=3e-3, lr_warmup_steps=19,
                          sparsity_warmup_steps=19, autocast=autocast,
                          decoder_lr_multiplier=DECODER_LR_MULT if ARCHS[arch].takes_k else 1.0)
        tr = Trainer(SAEConfig(arch=arch, d_in=32, d_sae=96, k=3), cfg, train[:16384])
        if name == "nudge":
            with torch.no_grad():
                w = tr.sae.W_enc
                u = torch.rand(w.shape, generator=torch.Generator().manual_seed(seed + 99))
                w.mul_(1 + 2.0**-9 * (2 * u - 1))
        g = torch.Generator().manual_seed(seed)
        for _ in range(cfg.total_steps):
            tr.step(train[torch.randint(0, len(train), (512,), generator=g)])
        sae = tr.export()
        with torch.no_grad():
            fvu = float((sae(held).x_hat - held).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
        W = sae.W_dec.detach().numpy()
        mmcs = float((D @ (W / np.linalg.norm(W, axis=1, keepdims=True)).T).max(1).mean())
        out[name] = (fvu, mmcs)
    return out


def _progress(what: str) -> None:
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"bench bf16: {what} (load {load}, {torch.get_num_threads()} threads)",
          file=sys.stderr, flush=True)


def run():
    """Rows for `benchmarks/run.py`."""
    from benchmarks.common import Row

    skipped = bench_train.missing().get("sparsify")
    rows = []
    for mult in WIDTHS:
        d_sae = mult * D_IN
        width = f"{mult}x ({d_sae})"
        _progress(f"{width} speed")
        t = time_all(d_sae, skipped is None)
        note = (f"bf16 {t['bf16']:,.0f}, fp32 {t['fp32_exact']:,.0f} (selection in fp32), "
                f"fp32 default {t['fp32']:,.0f} tokens/s; {why()}; "
                f"{torch.get_num_threads()} torch threads")
        rows.append(Row(f"bf16 train tokens/s {width} vs saectl fp32", t["bf16"],
                        t["fp32_exact"], "tokens/s", ">= 1.6x", note=note))
        rows.append(Row(f"bf16 train tokens/s {width} vs saectl fp32 as it runs here by "
                        "default", t["bf16"], t["fp32"], "tokens/s", "",
                        note="saectl's float32 TopK selects its candidates from a bf16 product "
                             "where the CPU has avx512_bf16/amx (values recomputed in fp32), so "
                             f"on such a CPU --autocast adds little for TopK; {note}"))
        rows.append(floor_row(width, d_sae, BATCH / t["fp32_exact"]))
        if os.environ.get("BENCH_BF16_DENSE", "1") == "1":
            _progress(f"{width} speed, batchtopk")
            tb = time_all(d_sae, False, "batchtopk")
            rows.append(Row(f"bf16 train tokens/s {width} batchtopk vs its fp32", tb["bf16"],
                            tb["fp32"], "tokens/s", "",
                            note=f"a dense architecture: its encoder and decoder products are "
                                 f"bf16 under --autocast; {why()}"))
        if skipped:
            rows.append(Row(f"bf16 train tokens/s {width} vs sparsify", t["bf16"], 0.0,
                            "tokens/s", "", note=f"skipped (goal >= 4x): {skipped}"))
        else:
            rows.append(Row(f"bf16 train tokens/s {width} vs sparsify", t["bf16"],
                            t["sparsify"], "tokens/s", ">= 4x",
                            note=f"sparsify {t['sparsify']:,.0f} tokens/s (fp32: its autocast "
                                 f"is CUDA-only); {note}"))
    if SYNTHETIC:
        _progress(f"quality on planted features, seeds {SEEDS}")
        for arch in SYNTHETIC:
            runs = [synthetic_quality(arch, s) for s in SEEDS]
            rel = np.array([(r["bfloat16"][0] - r["fp32"][0]) / r["fp32"][0] for r in runs])
            nudge = np.array([(r["nudge"][0] - r["fp32"][0]) / r["fp32"][0] for r in runs])
            dm = [abs(r["bfloat16"][1] - r["fp32"][1]) for r in runs]
            f32 = [r["fp32"][0] for r in runs]
            se = float(rel.std(ddof=1) / np.sqrt(len(rel))) if len(rel) > 1 else math.nan
            # bf16's effect is the mean signed difference over seeds; a single run's |difference|
            # is set by how far any bf16-sized nudge carries a run (the fp32 control beside it)
            rows.append(Row(f"bf16 train quality on planted features {arch}: relative FVU "
                            f"difference, mean signed over {len(SEEDS)} seeds", float(abs(rel.mean())),
                            0.0, "", "<= 0.01",
                            note=f"bf16 - fp32: {rel.mean():+.4f} ± {se:.4f} (standard error); "
                                 f"per seed {', '.join(f'{v:+.4f}' for v in rel)}; mean |.| "
                                 f"{np.abs(rel).mean():.4f}, where fp32 nudged once at bf16's "
                                 f"resolution ends {np.abs(nudge).mean():.4f} from fp32 (mean "
                                 f"|.|); |MMCS bf16 - fp32| max {max(dm):.4f} (goal <= 0.01); "
                                 f"fp32 FVU over the seeds {min(f32):.4f}-{max(f32):.4f}"))
    if QUALITY:
        _progress("quality on SmolLM2 activations")
        try:
            q = quality()
        except Exception as e:  # noqa: BLE001 -- no model here: say so, keep the speed rows
            rows.append(Row("bf16 train quality on SmolLM2: relative FVU difference", 0.0, 0.0,
                            "", "", note=f"skipped: {type(e).__name__}: {e}"))
            return rows
        fa, fb = q["fvu"]["fp32"], q["fvu"]["bf16"]
        rows.append(Row(f"bf16 train quality on SmolLM2 {Q_HOOK}: relative FVU difference",
                        abs(fb - fa) / fa, 0.0, "", "<= 0.01",
                        note=f"eval FVU fp32 {fa:.4f}, bf16 {fb:.4f}, fp32 seed 1 "
                             f"{q['fvu']['fp32 seed 1']:.4f}; topk {Q_EXPANSION}x k{K}, "
                             f"{Q_STEPS} steps of {Q_BATCH} tokens on {Q_TOKENS:,} tokens"))
        rows.append(Row(f"bf16 train quality on SmolLM2 {Q_HOOK}: MMCS bf16 vs fp32 decoder",
                        q["mmcs_bf16"], q["mmcs_seed"], "", "",
                        note=f"mean max cosine of the bf16 decoder's rows to the fp32 one's: "
                             f"{q['mmcs_bf16']:.4f}; a second fp32 seed's: "
                             f"{q['mmcs_seed']:.4f} (the baseline column)"))
    return rows


def main() -> None:
    print(json.dumps([r.as_dict() for r in run()], indent=1))


if __name__ == "__main__":
    main()
