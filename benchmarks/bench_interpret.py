"""Interpret's scan against the SAE's encode alone on the same in-memory blocks.

The scan (saectl.scan) does the encode and, per block, the statistics: counts, sums, log
histogram, the per-sequence maxima merged into the top list, and the hashed sample. The goal
is that the bookkeeping costs little beside the encode: scan tokens/s ≥ 0.9× encode-only (issue
22), the scan run as interpret runs it (`saectl.scan.latents`: a TopK SAE's latents kept
sparse) and the baseline the SAE's own dense `encode`, what a user would run instead. The
note also gives the sparse encode alone, so the bookkeeping's own share shows.
A TopK SAE on SmolLM2's width (576), at 8× and 32×, 64 sequences of 128 tokens in blocks of 16.
Then the dashboard at 65,536 latents in headless Chromium (benchmarks/bench_dashboard.py:
first paint of the list, opening a feature; skipped without Playwright or chromium).
"""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.common import Row, alternate

D_IN, K, N_SEQ, CTX, BLOCK = 576, 32, 64, 128, 16


def run() -> list[Row]:
    from saectl.sae import ARCHS, SAEConfig
    from saectl.scan import latents, scan

    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_SEQ, CTX, D_IN, generator=g)
    rows = []
    for mult in (8, 32):
        d_sae = D_IN * mult
        sae = ARCHS["topk"](SAEConfig(arch="topk", d_in=D_IN, d_sae=d_sae, k=K)).eval()
        feats = np.arange(d_sae)

        def blocks():
            for lo in range(0, N_SEQ, BLOCK):
                yield lo, x[lo:lo + BLOCK]

        def encode(v, sae=sae):
            with torch.inference_mode():
                return sae.encode(v)

        def encode_only():
            for _, b in blocks():
                encode(b.reshape(-1, D_IN)).float().cpu()

        sparse = latents(sae, feats)

        def sparse_encode(v, sparse=sparse):
            with torch.inference_mode():
                return sparse(v)

        def sparse_only():
            for _, b in blocks():
                sparse_encode(b.reshape(-1, D_IN)).values().float().cpu()

        def full_scan(feats=feats, sparse_encode=sparse_encode):
            scan(blocks(), sparse_encode, feats, top=20, pool=64, seed=0, skip_first=True)

        t = alternate({"scan": full_scan, "encode": encode_only, "sparse": sparse_only}, reps=3)
        tokens = N_SEQ * CTX
        rows.append(Row(f"interpret scan tokens/s, topk {mult}x ({d_sae:,} features)",
                        tokens / t["scan"], tokens / t["encode"], "tokens/s", ">= 0.9x",
                        note=f"scan {tokens / t['scan']:,.0f} vs encode alone "
                             f"{tokens / t['encode']:,.0f} tokens/s; the scan's sparse encode "
                             f"alone {tokens / t['sparse']:,.0f} (the scan "
                             f"{t['sparse'] / t['scan']:.2f}x of it)"))
    from benchmarks import bench_dashboard

    return rows + bench_dashboard.run()
