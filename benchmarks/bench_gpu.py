"""GPU rows (issue 21): run where CUDA is present, skipped with a line where it is not.

- harvest tokens/s on CUDA with `--autocast bfloat16` against the bare HF forward of the same
  blocks under the same autocast (goal >= 0.95x, as on CPU): SmolLM2, resid_post.15;
- TopK training tokens/s on CUDA, saectl's `Trainer.step` under `--autocast bfloat16` against
  sparsify's `SparseCoder` under `torch.autocast("cuda", bfloat16)` as its trainer runs it
  (goal >= 1.5x, as on CPU), and against saectl's own float32 step (issue 23: goal >= 1.6x):
  d_in 576, 8x and 32x, k 32, batch 4096.

Each timing is the median of alternated repetitions after a warm-up, synchronised with the
device. Not measured on this project's machines so far: no GPU has been lent to this work.

    .bench-venv/bin/python benchmarks/bench_gpu.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_harvest import CTX, HOOK, harvest_once, setup
from benchmarks.common import Row, alternate

BATCH, N_SEQ = 32, 256
D_IN, MULT, K, TRAIN_BATCH = 576, 8, 32, 4096


def _synced(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


def harvest_row() -> Row:
    from stages import harvest

    model, tokens, hooks, dims, bare = setup("cuda", N_SEQ, BATCH, torch.bfloat16)
    cfg = harvest.HarvestConfig(hooks=HOOK, tokens=N_SEQ * CTX, context_size=CTX,
                                batch_size=BATCH, device="cuda", autocast="bfloat16")

    def ours():
        harvest_once(cfg, model, hooks, dims, tokens)

    t = alternate({"bare": _synced(bare), "saectl": _synced(ours)}, reps=3, warmup=1)
    n = N_SEQ * CTX
    return Row(f"gpu: harvest tokens/s (SmolLM2 {HOOK}, bf16 autocast) vs bare forward",
               n / t["saectl"], n / t["bare"], "tokens/s", ">= 0.95x",
               note=f"{torch.cuda.get_device_name(0)}; {N_SEQ} x {CTX} tokens, batch {BATCH}")


def train_rows(mult: int) -> list[Row]:
    from benchmarks.bench_train import AUXK_ALPHA, DEAD_TOKENS, _import_sparsify
    from saectl.sae import SAEConfig
    from saectl.trainer import TrainConfig, Trainer

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(TRAIN_BATCH, D_IN, device="cuda", generator=g)
    trainers = {name: Trainer(SAEConfig(arch="topk", d_in=D_IN, d_sae=mult * D_IN, k=K),
                              TrainConfig(total_steps=10_000, lr_warmup_steps=0,
                                          autocast=autocast), x, device="cuda")
                for name, autocast in (("saectl", "bfloat16"), ("fp32", None))}
    sparsify = _import_sparsify()
    sae = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(expansion_factor=mult, k=K),
                               device="cuda", dtype=torch.float32)
    sae.b_dec.data = x.mean(0)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (sae.num_latents / 2**14) ** 0.5)
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long, device="cuda")

    def theirs():
        sae.set_decoder_norm_to_unit_norm()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = sae(x=x, y=x, dead_mask=since_fired > DEAD_TOKENS,
                      total_variance=(x - x.mean(0)).pow(2).sum())
            loss = out.fvu + AUXK_ALPHA * out.auxk_loss
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        since_fired.add_(TRAIN_BATCH)
        since_fired[out.latent_indices.flatten()] = 0

    t = alternate({"sparsify": _synced(theirs),
                   **{n: _synced(lambda tr=tr: tr.step(x)) for n, tr in trainers.items()}},
                  reps=9, warmup=2)
    note = f"{torch.cuda.get_device_name(0)}; batch {TRAIN_BATCH}"
    return [Row(f"gpu: topk train tokens/s {mult}x{D_IN} k{K} (bf16 autocast) vs sparsify",
                TRAIN_BATCH / t["saectl"], TRAIN_BATCH / t["sparsify"], "tokens/s", ">= 1.5x",
                note=note),
            Row(f"gpu: topk train tokens/s {mult}x{D_IN} k{K} bf16 autocast vs saectl fp32",
                TRAIN_BATCH / t["saectl"], TRAIN_BATCH / t["fp32"], "tokens/s", ">= 1.6x",
                note=f"{note}; fp32: no autocast (TF32 as torch's default leaves it: off)")]


def run() -> list[Row]:
    if not torch.cuda.is_available():
        why = ("skipped: no CUDA device here (torch.cuda.is_available() is False); run "
               "`BENCH_ONLY=gpu make bench` on a GPU machine")
        return [Row("gpu: harvest tokens/s (bf16 autocast) vs bare forward", 0.0, 0.0,
                    "tokens/s", "", note=why),
                Row("gpu: topk train tokens/s (bf16 autocast) vs sparsify", 0.0, 0.0,
                    "tokens/s", "", note=why),
                Row("gpu: topk train tokens/s bf16 autocast vs saectl fp32", 0.0, 0.0,
                    "tokens/s", "", note=why)]
    rows = []
    for name, make in (("harvest", lambda: [harvest_row()]),
                       *((f"train {m}x", lambda m=m: train_rows(m)) for m in (MULT, 32))):
        try:
            rows.extend(make())
        except ImportError as e:  # sparsify missing from the environment
            rows.append(Row(f"gpu: {name}", 0.0, 0.0, "", "", note=f"skipped: {e}"))
    return rows


if __name__ == "__main__":
    for r in run():
        print(r.as_dict())
