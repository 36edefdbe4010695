"""Import: activations made by any other tool (`.npy`, `.safetensors`, a Zarr array; n × d)
become a harvest-like artifact, addressed by the file's content, so they can be shuffled and
trained on like a harvest. There are no tokens; rows group into sequences of
`--context-size` (1: every row its own sequence) for the train/eval split, with no BOS.

Images come in the same way: an IDX file (MNIST's `train-images-idx3-ubyte`, gzipped or not)
or `sklearn:digits` (scikit-learn's 1,797 handwritten digits, 8×8, shipped inside its wheel),
one flattened image a row, pixels scaled to [0, 1], the image shape recorded for interpret.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saectl import arrays, layout, store
from saectl.config import address_params, opt, parse_image_shape
from saectl.console import info
from saectl.errors import ConfigError, NotFoundError
from saectl.hashing import file_sha256
from saectl.stage import Plan, RunnerOptions, Stage

NAME = "import"
SUFFIXES = (".npy", ".safetensors", ".zarr", ".idx", "-ubyte")
BUILTIN = {"sklearn:digits"}


@dataclass(frozen=True)
class ImportConfig(RunnerOptions):
    file: str | None = opt(None, "A .npy, .safetensors or Zarr array of shape (n, d), an IDX "
                                 "image file (MNIST), or sklearn:digits")
    hook: str = opt("acts", "Name to give the activations (used as --hook later)")
    key: str | None = opt(None, "Tensor name inside a .safetensors file with several")
    context_size: int = opt(1, "Rows per sequence, for the sequence-level train/eval split")
    dtype: str = opt("float32", "Storage dtype: float16, bfloat16 or float32")
    image_shape: str | None = opt(None, "HxW if each row is an image (e.g. 8x8), for drawing "
                                        "features as images")

    def __post_init__(self):
        if not self.file:
            raise ConfigError("give the file to import: saectl import FILE --hook NAME")
        if self.context_size < 1:
            raise ConfigError(f"--context-size must be at least 1, got {self.context_size}")
        if self.dtype not in arrays.STORAGE_DTYPES:
            raise ConfigError(f"--dtype {self.dtype} is not one of {', '.join(arrays.STORAGE_DTYPES)}")
        if "/" in self.hook or not self.hook.strip():
            raise ConfigError(f"--hook {self.hook!r} must be a plain name without '/'")
        self.image_hw()

    @property
    def hook_name(self) -> str:
        """--hook as stored and addressed: resid_post.03 is resid_post.3."""
        return layout.normalize_hook(self.hook)

    def image_hw(self) -> tuple[int, int] | None:
        return parse_image_shape(self.image_shape)


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


def _images(data: np.ndarray, scale: float) -> tuple[np.ndarray, tuple[int, int]]:
    """(n, h, w) pixels → (n, h·w) float32 in [0, 1], and (h, w)."""
    n, h, w = data.shape
    return (data.reshape(n, h * w).astype(np.float32) / scale), (h, w)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format: magic 0x0803, then n, h, w, big-endian)."""
    import gzip

    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(raw) < 16 or raw[:3] != b"\0\0\x08" or raw[3] != 3:
        raise ConfigError(f"{path.name} is not an IDX file of images (magic 0x00000803); give "
                          "MNIST's train-images-idx3-ubyte or t10k-images-idx3-ubyte")
    n, h, w = (int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(3))
    if len(raw) != 16 + n * h * w:
        raise ConfigError(f"{path.name} says it holds {n} images of {h}x{w} but has "
                          f"{len(raw) - 16} bytes of pixels; the file is truncated")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, h, w)


def _source(cfg: ImportConfig):
    """(name, identity, array-like (n, d), image shape or None) of `--file`."""
    if cfg.file in BUILTIN:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise ConfigError("sklearn:digits needs scikit-learn: pip install scikit-learn") from None
        data, hw = _images(load_digits().images, 16.0)  # pixel values 0-16
        import hashlib

        return cfg.file, hashlib.sha256(data.tobytes()).hexdigest(), data, hw
    path = Path(cfg.file).expanduser().absolute()
    if "idx" in path.name or path.name.endswith(("-ubyte", "-ubyte.gz")):
        if not path.exists():
            raise NotFoundError(f"{path} does not exist; give an IDX image file")
        data, hw = _images(_read_idx(path), 255.0)
        return path.name, _identity(path), data, hw
    return path.name, _identity(path) if path.exists() else "", _open(path, cfg.key), None


@dataclass
class Source:
    """What plan opened: the rows to import and their shape."""

    path: Path
    data: Any
    """Array-like (n, d), read lazily where the format allows."""
    n: int
    d: int
    hw: tuple[int, int] | None
    n_seq: int


def plan(cfg: ImportConfig) -> Plan:
    name, ident, data, native_hw = _source(cfg)
    path = Path(name)
    if data.ndim != 2:
        raise ConfigError(f"{path.name} has shape {tuple(data.shape)}; import needs (n, d) "
                          "(reshape images to one row each)")
    n, d = (int(v) for v in data.shape)
    hw = cfg.image_hw() or native_hw
    if hw and hw[0] * hw[1] != d:
        raise ConfigError(f"--image-shape {cfg.image_shape} has {hw[0] * hw[1]} pixels but rows "
                          f"have {d} values")
    if n < cfg.context_size:
        raise ConfigError(f"{path.name} has {n} rows, fewer than --context-size {cfg.context_size}")
    n_seq = n // cfg.context_size
    params = address_params(cfg)
    params.update(file={"name": name, "sha256": ident}, n_rows=n_seq * cfg.context_size,
                  hook=cfg.hook_name)
    if native_hw and not cfg.image_shape:
        params["image_shape"] = f"{hw[0]}x{hw[1]}"
    art = store.artifact_for(store.store_root(cfg.store), NAME, params)
    return Plan(art, params, context=Source(path, data, n, d, hw, n_seq))


def prepare(cfg: ImportConfig, plan: Plan) -> None:
    """Check every value before the artifact exists: a NaN found half-way would leave debris."""
    src: Source = plan.context
    step = max(1, (64 << 20) // (src.d * 4))
    for lo in range(0, src.n_seq * cfg.context_size, step):
        block = np.asarray(src.data[lo:lo + step], dtype=np.float32)
        bad = ~np.isfinite(block)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise ConfigError(f"{src.path.name} holds non-finite values (first at row {lo + r}, "
                              f"column {c}: {block[r, c]}); clean the data before importing")


def build(cfg: ImportConfig, plan: Plan, writer: store.Writing) -> None:
    import torch  # deferred: heavy, and only needed to convert to the storage dtype

    art, src = plan.art, plan.context
    d, hw, hook = src.d, src.hw, cfg.hook_name
    n_rows = src.n_seq * cfg.context_size
    step = max(1, (64 << 20) // (d * 4))
    g = art.group("r+")
    itemsize = arrays.numpy_dtype(cfg.dtype).itemsize
    chunk = arrays.rows_per_chunk(d * itemsize)
    out = arrays.create(g, layout.acts(hook), (n_rows, d), (chunk, d), cfg.dtype,
                        attrs={"hook": hook, "d": d, **({"image_shape": list(hw)} if hw else {})})
    for lo in range(0, n_rows, chunk * max(1, step // chunk)):
        hi = min(lo + chunk * max(1, step // chunk), n_rows)
        x = torch.from_numpy(np.array(src.data[lo:hi], dtype=np.float32))
        out[lo:hi] = arrays.to_storage(x, cfg.dtype)
    store.mark_complete(art, {"n_seq": src.n_seq, "context_size": cfg.context_size,
                              "n_tokens": n_rows, "bos": False, "dtype": cfg.dtype,
                              "hooks": {hook: {"d": d}},
                              "image_shape": list(hw) if hw else None,
                              "dropped_rows": src.n - n_rows})
    info(f"import: wrote {art.ref} ({n_rows:,} rows of {d})" +
         (f", dropped {src.n - n_rows} rows that fill no sequence" if src.n > n_rows else ""))


STAGE = Stage(NAME, ImportConfig, "Make a harvest-like artifact from activations in a .npy, "
              ".safetensors or Zarr file.", plan, build, positional=("file",),
              figures=("n_tokens",), prepare=prepare)
