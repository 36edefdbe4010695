"""TopK SAE training speed and memory: saectl's `Trainer.step` against EleutherAI's sparsify
(`eai-sparsify`), SAELens (`sae-lens`), each through its own model class, and a plain dense
PyTorch TopK loop (the memory baseline).

Setting (issue 3's): d_in = 576 (SmolLM2-135M), widths 8× (4608) and 32× (18432), k = 32,
batch 4096 tokens, float32, the same random batches and the same torch threads for all.

What one step of each does (each as its own trainer drives it; no dead latents yet, so no
implementation runs its AuxK pass):
- saectl: `Trainer.step` (sparse TopK kernels, unit-norm decoder, fused Adam, bookkeeping).
- sparsify: `SparseCoder(SparseCoderConfig(expansion_factor, k))` as `sparsify/trainer.py`
  drives it with `optimizer="adam"`: decoder set to unit norm, forward with the dead mask and
  the batch's total variance, loss = fvu + auxk_alpha·auxk_loss (+ multi_topk_fvu / 8, zero
  here), backward, gradient parallel to the decoder rows removed, `torch.optim.Adam` (lr
  2e-4/√(num_latents/2¹⁴)) step, zero_grad, linear warm-up schedule step, fired bookkeeping.
  (sparsify's default optimizer is signum; Adam is what saectl runs, so Adam is compared.)
- SAELens: `TopKTrainingSAE(TopKTrainingSAEConfig(d_in, d_sae, k))` as
  `SAETrainer._train_step` drives it: `training_forward_pass(TrainStepInput(...))`, fired
  bookkeeping, backward, `clip_grad_norm_(1.0)`, `torch.optim.Adam` (lr 3e-4) step, zero_grad.
  Dense activations, its default: `use_sparse_activations=True` fails in the backward on CPU
  (sae-lens 6.54, torch 2.13: no `aten::view` for SparseCPU).
- dense: dense encode, topk, dense decode matmul, autograd, Adam.

Timing: all of them in one process, one step each in turn (the order rotating every round),
median of BENCH_TRAIN_STEPS (default 7) steps after 2 warm-up rounds; the notes add the median
over rounds of the per-round time ratio, in wall time and in this process's CPU time. Memory:
each alone in a fresh subprocess; peak RSS (VmHWM) and its growth over the RSS just before the
first step. BENCH_TRAIN_THREADS sets the torch threads of all of them (default: torch's, one
per core); on a machine that others load, threads that wait on each other at every parallel
region slow the many-kernel steps most, and one thread gives steadier figures.
A baseline that is not installed (the project's .venv has neither) is skipped with a note.

    .bench-venv/bin/python benchmarks/bench_train.py           # prints a table
    BENCH_TRAIN_WIDTHS=8 .bench-venv/bin/python benchmarks/bench_train.py
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import paired, time_rounds

D_IN, K, BATCH = 576, 32, 4096
WIDTHS = [int(w) for w in os.environ.get("BENCH_TRAIN_WIDTHS", "8,32").split(",")]
STEPS = int(os.environ.get("BENCH_TRAIN_STEPS", "7"))
THREADS = int(os.environ.get("BENCH_TRAIN_THREADS", "0"))
"""torch threads for every implementation; 0 keeps torch's default (one per core)."""
WARMUP = 2
AUXK_ALPHA = 1 / 32
"""AuxK weight given to sparsify (its default is 0, which skips the dead-mask work); saectl's."""
DEAD_TOKENS = 10_000_000
"""sparsify's and saectl's dead-latent window in tokens."""


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


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so set-up peaks do not count."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# -- the implementations: make(d_sae, sample) -> step(x) -------------------------------------


def make_saectl(d_sae: int, sample: torch.Tensor):
    from saectl.sae import SAEConfig
    from saectl.trainer import TrainConfig, Trainer

    trainer = Trainer(SAEConfig(arch="topk", d_in=D_IN, d_sae=d_sae, k=K),
                      TrainConfig(total_steps=10_000, lr_warmup_steps=0), sample)
    return trainer.step


def _import_sparsify():
    with contextlib.redirect_stdout(io.StringIO()):  # it prints which decoder it picked
        import sparsify
        from sparsify import SparseCoder, SparseCoderConfig  # noqa: F401
    return sparsify


def make_sparsify(d_sae: int, sample: torch.Tensor):
    sparsify = _import_sparsify()
    torch.manual_seed(0)
    sae = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(expansion_factor=d_sae // D_IN,
                                                                k=K),
                               device="cpu", dtype=torch.float32)
    assert sae.num_latents == d_sae
    sae.b_dec.data = sample.mean(0)  # sparsify's first-step init
    step = sparsify_step(sae)
    return lambda x: step(x, x)


def sparsify_step(sae):
    """One step of `sparsify/trainer.py` with `optimizer="adam"` on the SparseCoder `sae`, as a
    function of the batch (x, y) returning its FVU: Adam at lr 2e-4/√(num_latents/2¹⁴), linear
    schedule without warm-up (lr_warmup_steps=0, as saectl's), AuxK on latents dead for
    DEAD_TOKENS, fired bookkeeping. An SAE's decoder is set to unit norm and the gradient
    parallel to its rows removed; a transcoder's is not (`not self.cfg.sae.transcode`)."""
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.Adam([{"params": sae.parameters(),
                             "lr": 2e-4 / (sae.num_latents / 2**14) ** 0.5}])
    sched = get_linear_schedule_with_warmup(opt, 0, 10_000)
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    did_fire = torch.zeros(sae.num_latents, dtype=torch.bool)
    unit_norm = not sae.cfg.transcode

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        if unit_norm:
            sae.set_decoder_norm_to_unit_norm()
        dead_mask = since_fired > DEAD_TOKENS if AUXK_ALPHA > 0 else None
        total_variance = (y - y.mean(0)).pow(2).sum()
        out = sae(x=x, y=y, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        fvu = float(out.fvu.detach())
        loss = out.fvu + AUXK_ALPHA * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        if unit_norm:
            sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sched.step()
        with torch.no_grad():
            since_fired.add_(x.shape[0])
            since_fired[did_fire] = 0
            did_fire.zero_()
        return fvu

    return step


def _import_saelens():
    import sae_lens
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig  # noqa: F401
    from sae_lens.saes.sae import TrainStepInput  # noqa: F401

    return sae_lens


def make_saelens(d_sae: int, sample: torch.Tensor):
    _import_saelens()
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=d_sae, k=K, dtype="float32",
                                                device="cpu"))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.999))
    since_fired = torch.zeros(d_sae)
    act_freq_scores = torch.zeros(d_sae)
    dead_feature_window = 1000  # SAELens's default, in steps
    n_steps = 0

    def step(x: torch.Tensor) -> float:
        nonlocal n_steps
        sae.train()
        out = sae.training_forward_pass(TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=(since_fired > dead_feature_window),
            n_training_steps=n_steps, is_logging_step=False))
        with torch.no_grad():
            firing = out.feature_acts.bool().float()
            fired = firing.sum(-2).bool()
            since_fired.add_(1)
            since_fired[fired] = 0
            act_freq_scores.add_(firing.sum(0))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        n_steps += 1
        return out.losses["mse_loss"].item()

    return step


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

    def step(x: torch.Tensor) -> float:
        pre = (x - b_dec) @ W_enc + b_enc
        vals, idx = pre.topk(K, dim=-1, sorted=False)
        acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        x_hat = acts @ W_dec + b_dec
        loss = (x_hat - x).pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


MAKERS = {"saectl": make_saectl, "sparsify": make_sparsify, "saelens": make_saelens,
          "dense": make_dense}
PACKAGES = {"sparsify": ("eai-sparsify", _import_sparsify),
            "saelens": ("sae-lens", _import_saelens)}


def missing() -> dict[str, str]:
    """Implementations that cannot run here, with the reason."""
    out = {}
    for name, (package, check) in PACKAGES.items():
        try:
            check()
        except Exception as e:  # noqa: BLE001 -- ImportError, or an incompatible version
            out[name] = (f"{package} not importable here ({type(e).__name__}: {e}); "
                         f"run `make bench`, which installs it into .bench-venv")
    return out


# -- measurement ---------------------------------------------------------------------------


def _data(n_batches: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH, D_IN, generator=g) for _ in range(n_batches)]


def time_all(d_sae: int, names: list[str]) -> dict[str, dict[str, float]]:
    """Median tokens/s of each implementation, one step each in turn, the order rotating;
    "paired": the median over rounds of its step time over names[0]'s in the same round;
    "cpu_paired": the same with this process's CPU seconds."""
    data = _data(4)
    steps = {name: MAKERS[name](d_sae, data[0]) for name in names}
    times, cpu, losses = time_rounds(steps, [(x,) for x in data], WARMUP, STEPS)
    return {name: {"tokens_per_s": BATCH / statistics.median(ts),
                   "spread": (max(ts) - min(ts)) / statistics.median(ts),
                   "paired": paired(ts, times[names[0]]),
                   "cpu_paired": paired(cpu[name], cpu[names[0]]),
                   "cpu_s": statistics.median(cpu[name]),
                   "last_loss": losses[name]} for name, ts in times.items()}


def _set_threads() -> None:
    if THREADS:
        torch.set_num_threads(THREADS)


def memory_one(name: str, d_sae: int) -> dict[str, float]:
    """Run in a fresh process: peak RSS of `name` training at width d_sae."""
    _set_threads()
    data = _data(2)
    step = MAKERS[name](d_sae, data[0])
    _reset_peak_rss()
    before = _rss_mib()
    for r in range(3):
        step(data[r % 2])
    peak = _peak_rss_mib()
    return {"peak_rss_mib": peak, "growth_mib": peak - before}


def memory(name: str, d_sae: int) -> dict[str, float]:
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); "
            "from benchmarks import bench_train as b; "
            "print(json.dumps(b.memory_one(sys.argv[2], int(sys.argv[3]))))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), name, str(d_sae)],
                         check=False, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"memory run of {name} at d_sae={d_sae} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _progress(what: str) -> None:
    """To stderr, with the load average: others' work on a shared machine shows up there."""
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"bench train: {what} (load {load}, {torch.get_num_threads()} threads)",
          file=sys.stderr, flush=True)


def measure() -> tuple[list[dict], dict[str, str]]:
    _set_threads()
    skipped = missing()
    names = [n for n in MAKERS if n not in skipped]
    results = []
    for mult in WIDTHS:
        d_sae = mult * D_IN
        _progress(f"{mult}x ({d_sae}) memory")
        mem = {name: memory(name, d_sae) for name in names}
        _progress(f"{mult}x ({d_sae}) speed")
        speed = time_all(d_sae, names)
        _progress(f"{mult}x ({d_sae}) done")
        results.append({"mult": mult, "d_sae": d_sae,
                        **{n: speed[n] | mem[n] for n in names}})
    return results, skipped


def _speed(r: dict, name: str) -> str:
    m = r[name]
    return (f"{name} {m['tokens_per_s']:,.0f} tokens/s (spread {m['spread']:.0%}, "
            f"{m['cpu_s']:.2f} CPU s/step)")


def _mem(r: dict, name: str) -> str:
    m = r[name]
    return f"{name} +{m['growth_mib']:,.0f} MiB (peak {m['peak_rss_mib']:,.0f})"


def run():
    """Rows for `benchmarks/run.py`."""
    from benchmarks.common import Row

    rows = []
    results, skipped = measure()
    for r in results:
        width = f"{r['mult']}x ({r['d_sae']})"
        saectl = r["saectl"]
        for name, goal in (("sparsify", ">= 1.5x"), ("saelens", ">= 4x"), ("dense", "")):
            bench = f"topk train tokens/s {width} vs {name}"
            if name in skipped:
                rows.append(Row(bench, saectl["tokens_per_s"], 0.0, "tokens/s", "",
                                note=f"skipped (goal {goal}): {skipped[name]}"))
                continue
            rows.append(Row(bench, saectl["tokens_per_s"], r[name]["tokens_per_s"], "tokens/s",
                            goal, note=f"{_speed(r, 'saectl')}, {_speed(r, name)}; "
                                       f"per-round ratio {r[name]['paired']:.2f}x wall, "
                                       f"{r[name]['cpu_paired']:.2f}x CPU time; "
                                       f"{torch.get_num_threads()} torch threads"))
        mems = ", ".join(_mem(r, n) for n in MAKERS if n in r)
        rows.append(Row(f"topk train peak RSS growth MiB {width} vs dense",
                        saectl["growth_mib"], r["dense"]["growth_mib"], "MiB", "<= 1x",
                        note=f"RSS growth over set-up: {mems}"))
    return rows


def main() -> None:
    _set_threads()
    print(f"threads={torch.get_num_threads()} d_in={D_IN} k={K} batch={BATCH} "
          f"steps={STEPS} (median after {WARMUP} warm-up rounds, alternating)")
    results, skipped = measure()
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    print(f"{'width':>14} {'impl':>9} {'tokens/s':>10} {'saectl/x':>9} {'paired':>7} "
          f"{'cpu':>6} {'spread':>7} {'peak MiB':>9} {'growth MiB':>11} {'own loss':>9}")
    for r in results:
        width = f"{r['mult']}x ({r['d_sae']})"
        for n in MAKERS:
            if n not in r:
                continue
            m = r[n]
            ratio = r["saectl"]["tokens_per_s"] / m["tokens_per_s"]
            print(f"{width:>14} {n:>9} {m['tokens_per_s']:>10,.0f} {ratio:>8.2f}x "
                  f"{m['paired']:>6.2f}x {m['cpu_paired']:>5.2f}x {m['spread']:>7.0%} "
                  f"{m['peak_rss_mib']:>9,.0f} {m['growth_mib']:>11,.0f} {m['last_loss']:>9.4g}")


if __name__ == "__main__":
    main()
