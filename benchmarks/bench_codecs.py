"""Which codec for activations? Compression ratio and encode speed of candidate codecs on real
SmolLM2 activations, in float16 and bfloat16. This is the measurement behind
`saectl.arrays.compressors` (zstd-1).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks.common import Row

N_SEQ, CTX = 16, 128
CHOSEN = "zstd-1"
"""The codec `saectl.arrays.compressors` uses: the only row held to the goal (≤ 2 bytes per
value); the other candidates are figures to compare, not goals."""


def _candidates(itemsize: int):
    from numcodecs import LZ4, Blosc, Zstd

    return {
        "zstd-1": Zstd(level=1),
        "zstd-3": Zstd(level=3),
        "lz4": LZ4(),
        "blosc-lz4-shuffle": Blosc("lz4", 5, Blosc.SHUFFLE, typesize=itemsize),
        "blosc-zstd1-shuffle": Blosc("zstd", 1, Blosc.SHUFFLE, typesize=itemsize),
        "blosc-zstd3-shuffle": Blosc("zstd", 3, Blosc.SHUFFLE, typesize=itemsize),
        "blosc-zstd1-bitshuffle": Blosc("zstd", 1, Blosc.BITSHUFFLE, typesize=itemsize),
    }


def run() -> list[Row]:
    from saectl import data, models
    from saectl.hooks import parse_hooks, run_with_hooks

    spec = models.resolve_model(None)
    tok = models.load_tokenizer(spec)
    model = models.load_model(spec)
    tokens = data.pack_tokens(tok, data.iter_texts(data.resolve_dataset(None)), CTX, N_SEQ)
    hooks = parse_hooks(model, ["resid_post.15", "mlp_out.3"])
    acts = run_with_hooks(model, hooks, torch.from_numpy(tokens).long())
    rows = []
    for hook, x in acts.items():
        x = x.reshape(-1, x.shape[-1])
        for storage in ("float16", "bfloat16"):
            y = x.to(getattr(torch, storage))
            raw = (y.view(torch.uint16) if storage == "bfloat16" else y).numpy()
            raw = np.ascontiguousarray(raw)
            for name, codec in _candidates(2).items():
                t0 = time.perf_counter()
                enc = codec.encode(raw)
                dt = time.perf_counter() - t0
                bpv = len(enc) / raw.size
                mbs = raw.nbytes / dt / 1e6
                chosen = name == CHOSEN
                rows.append(Row(f"codec {name}{' (saectl uses it)' if chosen else ''} on {hook} "
                                f"{storage}", bpv, 2.0, "bytes/value", "<= 2" if chosen else "",
                                note=f"encode {mbs:,.0f} MB/s" + (
                                    "" if chosen else "; a candidate saectl does not use")))
    return rows
