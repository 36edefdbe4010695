"""`saectl export`: an SAE (trained or imported) in another tool's layout, written whole or
not at all.

- `saelens`: a train or import-sae artifact already keeps its SAE in SAELens's layout (`sae/`:
  cfg.json, sae_weights.safetensors, sparsity.safetensors), which
  `sae_lens.SAE.load_from_disk` loads; export copies those files byte for byte.
- `sparsify`: `cfg.json` + `sae.safetensors` as `sparsify.SparseCoder.save_to_disk` writes them,
  which `SparseCoder.load_from_disk` loads (strictly: exactly encoder.weight (d_sae, d_in),
  encoder.bias, W_dec, b_dec). sparsify's only inference activation is TopK, and its
  relu-then-topk gives what saectl's topk-then-relu gives, so only topk SAEs go there; name the
  folder by the HF module path (`layers.6`) for `SparseCoder.load_many`.

The files go to a temporary folder beside `--out`, each fsynced, and it is renamed into place,
so `--out` holds either the old export or the new one, never a mix and never stale files. A
symbolic link at `--out` is refused (never written through), and so is a folder that is not a
previous export, even with `--force`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from saectl import layout
from saectl.errors import ConfigError, SaectlError
from saectl.store import Artifact

FORMATS = ("saelens", "sparsify")
MARKER = "cfg.json"
"""What every export holds: a non-empty folder without it is not one, and --force keeps off."""


def _check_out(out: Path, force: bool) -> None:
    if out.is_symlink():
        raise ConfigError(f"--out {out} is a symbolic link; export never writes through one: "
                          "pass the folder it points to, or another path")
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; choose another --out")
    if not any(out.iterdir()):
        return
    if not force:
        raise ConfigError(f"{out} is not empty; choose another --out or pass --force")
    if not (out / MARKER).is_file():
        raise ConfigError(f"--force replaces only an earlier export (a folder with {MARKER}); "
                          f"{out} holds other files: choose another --out")


def _copy_into(src: Path, dest: Path) -> None:
    """Copy the SAE's regular files (links are not followed) and fsync each one."""
    for f in sorted(src.iterdir()):
        if f.is_symlink() or not f.is_file():
            continue
        shutil.copyfile(f, dest / f.name, follow_symlinks=False)
        fd = os.open(dest / f.name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(dest / f.name, 0o644)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o644)


def _sparsify_sae(src: Path):
    """The SAE in `src`, refused in one line unless sparsify can run it (TopK)."""
    from saectl.sae import load_sae  # deferred: torch

    sae = load_sae(src)
    if sae.arch != "topk":
        raise ConfigError(f"sparsify runs only TopK SAEs (its activation keeps the k largest "
                          f"latents per token) and this one is {sae.arch}; export it with "
                          "--format saelens")
    return sae


def _write_sparsify(sae, dest: Path) -> None:
    """cfg.json and sae.safetensors exactly as `SparseCoder.save_to_disk` writes them."""
    from safetensors.torch import save as st_save  # deferred: torch

    cfg = {"activation": "topk", "expansion_factor": max(sae.d_sae // sae.d_in, 1),
           "normalize_decoder": True, "num_latents": sae.d_sae, "k": sae.cfg.k,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": sae.d_in}
    tensors = {"encoder.weight": sae.W_enc.detach().T, "encoder.bias": sae.b_enc.detach(),
               "W_dec": sae.W_dec.detach(), "b_dec": sae.b_dec.detach()}
    _write(dest / "sae.safetensors",
           st_save({k: v.cpu().contiguous() for k, v in tensors.items()}))
    _write(dest / MARKER, (json.dumps(cfg, indent=2) + "\n").encode())


def _put_in_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` (checked by `_check_out`) is first renamed
    aside and deleted after, so `out` is never a mix of two exports."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export(art: Artifact, out: Path, fmt: str = "saelens", force: bool = False) -> Path:
    """Write the SAE of the complete train or import-sae artifact `art` to `out` in format
    `fmt`."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not supported; use --format "
                          f"{' or --format '.join(FORMATS)}")
    out = Path(os.path.abspath(out))  # `a/..` resolved by name, never through a link at `out`
    _check_out(out, force)
    src = layout.sae_dir(art.path)
    sae = _sparsify_sae(src) if fmt == "sparsify" else None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.export-"))
    except OSError as e:
        raise SaectlError(f"cannot write beside {out} ({e.strerror or e}); choose another "
                          "--out") from None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; an export is for others to load
        if sae is not None:
            _write_sparsify(sae, tmp)
        else:
            _copy_into(src, tmp)
        _check_out(out, force)  # again: something may have appeared there meanwhile
        _put_in_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
