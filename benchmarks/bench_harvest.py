"""Harvest throughput against a bare Hugging Face forward pass stopped at the same layer (same
model, batches and machine), and bytes per activation value on disk.

Goal (issue 2 / issue 8): harvest ≥ 0.95× the bare forward; ≤ 2 bytes per value.
Default: the packaged SmolLM2-135M at resid_post.15, batches of 8 × 128.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

from benchmarks.common import Row, alternate

HOOK, LAYER = "resid_post.15", 15
BATCH, CTX, N_SEQ = 8, 128, int(os.environ.get("BENCH_HARVEST_SEQS", 48))


def run() -> list[Row]:
    from saectl import data, models, store
    from stages import harvest

    spec = models.resolve_model(None)
    tok = models.load_tokenizer(spec)
    model = models.load_model(spec, device="cpu")
    tokens = data.pack_tokens(tok, data.iter_texts(data.resolve_dataset(None)), CTX, N_SEQ)
    ids = torch.from_numpy(tokens).long()

    # The baseline: HF's own forward over the first LAYER+1 blocks (the final norm is cheap).
    layers = model.model.layers
    truncated = torch.nn.ModuleList(list(layers)[: LAYER + 1])

    def bare():
        model.model.layers = truncated
        try:
            with torch.inference_mode():
                for s in range(0, N_SEQ, BATCH):
                    model.model(input_ids=ids[s:s + BATCH])
        finally:
            model.model.layers = layers

    hooks = models.parse_hooks(model, [HOOK])
    dims = {HOOK: models.hook_dim(model, hooks[0])}
    cfg = harvest.HarvestConfig(hooks=HOOK, tokens=N_SEQ * CTX, context_size=CTX,
                                batch_size=BATCH, device="cpu")
    last = {}

    def saectl_harvest():
        root = tempfile.mkdtemp(prefix="bench-harvest-")
        try:
            art = store.artifact_for(store.store_root(root), "harvest", {"bench": root})
            with store.writing(art, {"bench": root}):
                layout = harvest.make_layout(cfg, dims)
                group = harvest._create_arrays(art, layout, dims, cfg)
                harvest._harvest(art, group, layout, model, hooks, tokens, torch.device("cpu"),
                                 cfg, None)
                last.update(harvest._summary(art, group, cfg, dims))
        finally:
            shutil.rmtree(root, ignore_errors=True)

    t = alternate({"bare": bare, "saectl": saectl_harvest}, reps=3, warmup=1)
    n = N_SEQ * CTX
    return [
        Row("harvest tokens/s (SmolLM2 resid_post.15, 8x128, CPU)", n / t["saectl"], n / t["bare"],
            "tokens/s", ">= 0.95x", note="baseline: bare HF forward over blocks 0-15"),
        Row("harvest bytes per activation value (fp16 storage)", last["bytes_per_value"], 2.0,
            "bytes", "<= 2", note=f"codec ratio {2.0 / last['bytes_per_value']:.3f}x vs raw fp16"),
    ]
