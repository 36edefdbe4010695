"""Harvest throughput against a bare Hugging Face forward pass stopped at the same layer (same
model, batches and machine), and bytes per activation value on disk.

Goal (issue 2 / issue 8): harvest ≥ 0.95× the bare forward; ≤ 2 bytes per value. And harvest
with `--autocast bfloat16` against the float32 harvest: the speed-up and the largest relative
error of a token's activation vector (a figure to report, not a goal to meet).
Default: the packaged SmolLM2-135M at resid_post.15, batches of 8 × 128.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import numpy as np
import torch

from benchmarks.common import Row, alternate, cpu_flags

HOOK, LAYER = "resid_post.15", 15
BATCH, CTX, N_SEQ = 8, 128, int(os.environ.get("BENCH_HARVEST_SEQS", "48"))


def setup(device: str, n_seq: int, batch: int, autocast: torch.dtype | None = None):
    """The packaged model on `device`, n_seq × CTX tokens of the default corpus, the hook at
    HOOK with its width, and `bare`: the baseline, HF's own forward over the first LAYER + 1
    blocks (the final norm is cheap) in batches of `batch`, under `autocast` if given."""
    from saectl import data, models
    from saectl.hooks import hook_dim, parse_hooks

    spec = models.resolve_model(None)
    tok = models.load_tokenizer(spec)
    model = models.load_model(spec, device=device)
    tokens = data.pack_tokens(tok, data.iter_texts(data.resolve_dataset(None)), CTX, n_seq)
    ids = torch.from_numpy(tokens).long().to(device)
    layers = model.model.layers
    truncated = torch.nn.ModuleList(list(layers)[: LAYER + 1])

    def bare():
        model.model.layers = truncated
        try:
            with torch.inference_mode(), (torch.autocast(device, dtype=autocast) if autocast
                                          else contextlib.nullcontext()):
                for s in range(0, n_seq, batch):
                    model.model(input_ids=ids[s:s + batch])
        finally:
            model.model.layers = layers

    hooks = parse_hooks(model, [HOOK])
    return model, tokens, hooks, {HOOK: hook_dim(model, hooks[0])}, bare


def harvest_once(cfg, model, hooks, dims, tokens, keep=None) -> None:
    """saectl's harvest of `tokens` (its arrays and its forward pass, not the stage's planning)
    into a fresh temporary store, removed afterwards; `keep(art, group)` reads what it needs
    from the artifact before that."""
    from saectl import store
    from stages import harvest

    root = tempfile.mkdtemp(prefix="bench-harvest-")
    try:
        art = store.artifact_for(store.store_root(root), "harvest", {"bench": root})
        with store.writing(art, {"bench": root}):
            layout = harvest.make_layout(cfg, dims)
            group = harvest._create_arrays(art, layout, dims, cfg)
            harvest._harvest(art, group, layout, model, hooks, tokens, torch.device(cfg.device),
                             cfg, None)
            if keep is not None:
                keep(art, group)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run() -> list[Row]:
    from saectl import arrays
    from stages import harvest

    model, tokens, hooks, dims, bare = setup("cpu", N_SEQ, BATCH)
    last: dict[str, dict] = {}
    acts: dict[str, np.ndarray] = {}

    def saectl_harvest(autocast=None):
        cfg = harvest.HarvestConfig(hooks=HOOK, tokens=N_SEQ * CTX, context_size=CTX,
                                    batch_size=BATCH, device="cpu", autocast=autocast)
        name = autocast or "float32"

        def keep(art, group):
            last[name] = harvest._summary(art, group, cfg, dims)
            acts[name] = arrays.read(group[f"acts/{HOOK}"])

        return lambda: harvest_once(cfg, model, hooks, dims, tokens, keep)

    t = alternate({"bare": bare, "saectl": saectl_harvest(),
                   "bf16": saectl_harvest("bfloat16")}, reps=3, warmup=1)
    n = N_SEQ * CTX
    # Relative error per token (the L2 norm of the difference over the fp32 token's norm): an
    # elementwise ratio is meaningless for values near zero. Both runs stored in float16.
    a, b = acts["bfloat16"].astype(np.float64), acts["float32"].astype(np.float64)
    rel = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-12)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1),
                                      1e-12)
    not_bos = np.arange(len(rel)) % CTX != 0  # BOS rows, which training drops by default
    worst = int(rel.argmax())
    flags = cpu_flags()
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    why = (f"this CPU has {' and '.join(native)}, so oneDNN runs bf16 matmuls natively"
           if native else "this CPU lacks avx512_bf16/amx_bf16: bf16 matmuls are emulated, "
           "expect a slow-down")
    return [
        Row("harvest tokens/s (SmolLM2 resid_post.15, 8x128, CPU)", n / t["saectl"], n / t["bare"],
            "tokens/s", ">= 0.95x", note="baseline: bare HF forward over blocks 0-15"),
        Row("harvest bytes per activation value (fp16 storage)", last["float32"]["bytes_per_value"],
            2.0, "bytes", "<= 2",
            note=f"codec ratio {2.0 / last['float32']['bytes_per_value']:.3f}x vs raw fp16"),
        Row("harvest tokens/s with --autocast bfloat16 vs float32 harvest", n / t["bf16"],
            n / t["saectl"], "tokens/s", "report", met=True,
            note=f"speed-up {t['saectl'] / t['bf16']:.2f}x; {why}"),
        Row("harvest bf16 autocast: max relative error per token vs float32", float(rel.max()),
            0.0, "", "report", met=True,
            note=f"||bf16 - fp32|| / ||fp32|| per token at {HOOK}: max {rel.max():.4f} (at "
                 f"position {worst % CTX}), without BOS {rel[not_bos].max():.4f}, median "
                 f"{np.median(rel):.4f}, 99th pct {np.quantile(rel, 0.99):.4f}; min cosine "
                 f"{cos.min():.5f} (both stored as float16, whose own rounding is ~3e-4)"),
    ]
