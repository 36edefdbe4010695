"""Import: activations made by any other tool (`.npy`, `.safetensors`, a Zarr array; n × d)
become a harvest-like artifact, addressed by the file's content, so they can be shuffled and
trained on like a harvest. There are no tokens; rows group into sequences of
`--context-size` (1: every row its own sequence) for the train/eval split, with no BOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saectl import arrays, store
from saectl.config import address_params, opt
from saectl.console import info
from saectl.errors import ConfigError, NotFoundError
from saectl.hashing import file_sha256

STAGE = "import"
FIGURES = ("n_tokens",)  # summary figures `saectl run` shows
SUFFIXES = (".npy", ".safetensors", ".zarr")


@dataclass(frozen=True)
class ImportConfig:
    file: str | None = opt(None, "A .npy, .safetensors or Zarr array of shape (n, d)")
    hook: str = opt("acts", "Name to give the activations (used as --hook later)")
    key: str | None = opt(None, "Tensor name inside a .safetensors file with several")
    context_size: int = opt(1, "Rows per sequence, for the sequence-level train/eval split")
    dtype: str = opt("float32", "Storage dtype: float16, bfloat16 or float32")
    image_shape: str | None = opt(None, "HxW if each row is an image (e.g. 8x8), for drawing "
                                        "features as images")
    store: str | None = opt(None, "Artifact store (default $SAECTL_STORE or ./artifacts)",
                            address=False)

    def __post_init__(self):
        if not self.file:
            raise ConfigError("give the file to import: saectl import FILE --hook NAME")
        if self.context_size < 1:
            raise ConfigError(f"--context-size must be at least 1, got {self.context_size}")
        if self.dtype not in arrays.STORAGE_DTYPES:
            raise ConfigError(f"--dtype {self.dtype} is not one of {', '.join(arrays.STORAGE_DTYPES)}")
        if "/" in self.hook or not self.hook:
            raise ConfigError(f"--hook {self.hook!r} must be a plain name without '/'")
        self.image_hw()

    def image_hw(self) -> tuple[int, int] | None:
        if not self.image_shape:
            return None
        try:
            h, w = (int(v) for v in self.image_shape.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--image-shape {self.image_shape!r} must look like 8x8") from None
        return h, w


def _open(path: Path, key: str | None):
    """An array-like (n, d) that is read lazily where the format allows."""
    if not path.exists():
        raise NotFoundError(f"{path} does not exist; give a {', '.join(SUFFIXES)} file")
    if path.suffix == ".npy":
        try:
            return np.load(path, mmap_mode="r")
        except ValueError as e:
            raise ConfigError(f"{path} is not a readable .npy file ({e})") from None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            keys = list(f.keys())
            if key is None and len(keys) != 1:
                raise ConfigError(f"{path} holds tensors {', '.join(keys)}; choose one with --key")
            if (key or keys[0]) not in keys:
                raise ConfigError(f"{path} has no tensor {key!r}; it holds {', '.join(keys)}")
            return f.get_tensor(key or keys[0])
    if path.is_dir() or path.suffix == ".zarr":
        import zarr

        try:
            return zarr.open_array(path, mode="r")
        except Exception as e:
            raise ConfigError(f"{path} is not a Zarr array ({type(e).__name__})") from None
    raise ConfigError(f"cannot import {path.name}: use one of {', '.join(SUFFIXES)}")


def _identity(path: Path) -> str:
    if path.is_file():
        return file_sha256(path)
    import hashlib

    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(file_sha256(p).encode())
    return h.hexdigest()


def _plan(cfg: ImportConfig):
    path = Path(cfg.file).expanduser().absolute()
    data = _open(path, cfg.key)
    if data.ndim != 2:
        raise ConfigError(f"{path.name} has shape {tuple(data.shape)}; import needs (n, d) "
                          "(reshape images to one row each)")
    n, d = (int(v) for v in data.shape)
    hw = cfg.image_hw()
    if hw and hw[0] * hw[1] != d:
        raise ConfigError(f"--image-shape {cfg.image_shape} has {hw[0] * hw[1]} pixels but rows "
                          f"have {d} values")
    if n < cfg.context_size:
        raise ConfigError(f"{path.name} has {n} rows, fewer than --context-size {cfg.context_size}")
    n_seq = n // cfg.context_size
    params = address_params(cfg)
    params.update(file={"name": path.name, "sha256": _identity(path)}, n_rows=n_seq * cfg.context_size)
    art = store.artifact_for(store.store_root(cfg.store), STAGE, params)
    return path, data, n, d, hw, n_seq, params, art


def address(cfg: ImportConfig) -> store.Artifact:
    """The artifact `run(cfg)` makes or finds, computed without writing anything."""
    return _plan(cfg)[-1]


def run(cfg: ImportConfig) -> store.Artifact:
    path, data, n, d, hw, n_seq, params, art = _plan(cfg)
    if art.is_complete():
        info(f"import: cache hit {art.ref}")
        return art
    step = max(1, (64 << 20) // (d * 4))
    # Check everything before writing anything: a NaN found half-way would leave debris.
    for lo in range(0, n_seq * cfg.context_size, step):
        block = np.asarray(data[lo:lo + step], dtype=np.float32)
        bad = ~np.isfinite(block)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise ConfigError(f"{path.name} holds non-finite values (first at row {lo + r}, "
                              f"column {c}: {block[r, c]}); clean the data before importing")
    import torch

    n_rows = n_seq * cfg.context_size
    with store.writing(art, params):
        g = art.group("r+")
        itemsize = arrays.numpy_dtype(cfg.dtype).itemsize
        chunk = arrays.rows_per_chunk(d * itemsize)
        out = arrays.create(g, f"acts/{cfg.hook}", (n_rows, d), (chunk, d), cfg.dtype,
                            attrs={"hook": cfg.hook, "d": d,
                                   **({"image_shape": list(hw)} if hw else {})})
        for lo in range(0, n_rows, chunk * max(1, step // chunk)):
            hi = min(lo + chunk * max(1, step // chunk), n_rows)
            x = torch.from_numpy(np.array(data[lo:hi], dtype=np.float32))
            out[lo:hi] = arrays.to_storage(x, cfg.dtype)
        store.mark_complete(art, {"n_seq": n_seq, "context_size": cfg.context_size,
                                  "n_tokens": n_rows, "bos": False, "dtype": cfg.dtype,
                                  "hooks": {cfg.hook: {"d": d}},
                                  "image_shape": list(hw) if hw else None,
                                  "dropped_rows": n - n_rows})
    info(f"import: wrote {art.ref} ({n_rows:,} rows of {d})" +
         (f", dropped {n - n_rows} rows that fill no sequence" if n > n_rows else ""))
    return art

