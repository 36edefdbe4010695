"""Importing a published SAE (`saectl import-sae`) against loading it with SAELens from the same
local folder (issue 22.5).

The folder is a SAELens TopK SAE at 32x SmolLM2's width (576 -> 18,432, k 32: 85 MB of float32
weights) written by SAELens itself (`TopKSAE.save_model`). saectl: `import-sae FOLDER` run in
this process (its artifact removed between runs): it reads the folder, hashes it (the
artifact's address), checks the weights and writes them into the store; then `load_sae` of the
imported artifact, what every later stage does. Baseline: `sae_lens.SAE.load_from_disk(FOLDER)`,
what a SAELens user runs. Medians of alternated runs; no goal was set: the rows report. Needs
SAELens (.bench-venv); skipped without it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import Row, alternate

D_IN, D_SAE, K = 576, 18_432, 32


def run() -> list[Row]:
    try:
        from sae_lens import SAE, TopKSAE, TopKSAEConfig
    except ImportError:
        return [Row("import-sae seconds vs SAELens load_from_disk", 0, 0, "s", "",
                    note="skipped: SAELens is not installed (run in .bench-venv)")]
    import torch

    from saectl import store
    from saectl.sae import load_sae
    from saectl.stage import run as run_stage
    from stages import import_sae

    work = Path(tempfile.mkdtemp(prefix="bench-import-sae-"))
    try:
        torch.manual_seed(0)
        cfg = TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, dtype="float32", device="cpu",
                            apply_b_dec_to_input=True)
        cfg.metadata.model_name = "smollm2-135m"
        cfg.metadata.hook_name = "blocks.15.hook_resid_post"
        sae = TopKSAE(cfg)
        for p in sae.parameters():
            torch.nn.init.normal_(p, std=0.02)
        folder = work / "sae"
        sae.save_model(str(folder))
        icfg = import_sae.ImportSAEConfig(source=str(folder), store=str(work / "store"))
        got = {}

        def ours():
            art = import_sae.STAGE.address(icfg)
            shutil.rmtree(art.path, ignore_errors=True)
            t0 = time.perf_counter()
            art = run_stage(import_sae.STAGE, icfg)
            got["import"] = time.perf_counter() - t0
            got["ours"], got["art"] = load_sae(store.sae_dir(art)), art

        def load_only():
            if "art" in got:
                load_sae(store.sae_dir(got["art"]))

        def theirs():
            got["theirs"] = SAE.load_from_disk(folder, device="cpu")

        t = alternate({"saectl": ours, "load": load_only, "saelens": theirs}, reps=5, warmup=1)
        x = torch.randn(64, D_IN)
        with torch.no_grad():
            diff = float((got["ours"].encode(x) - got["theirs"].encode(x)).abs().max())
        mb = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [Row(f"import-sae seconds, SAELens TopK {D_IN} -> {D_SAE:,} ({mb:.0f} MB), "
                "vs SAELens load_from_disk", t["saectl"], t["saelens"], "s", "",
                note=f"saectl import-sae + load_sae {t['saectl']:.2f}s (the import alone "
                     f"{got['import']:.2f}s in the last run; load_sae of the imported artifact "
                     f"alone, as later stages do, {t['load']:.3f}s) against SAELens "
                     f"SAE.load_from_disk {t['saelens']:.2f}s from the same folder; the two "
                     f"encodes of 64 random inputs differ by at most {diff:.2e}")]


if __name__ == "__main__":
    for r in run():
        print(r)
