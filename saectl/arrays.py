"""How activations sit in Zarr: dtypes, codecs, chunk shapes, and reads that never return
damaged numbers.

Every array is written with a `crc32c` checksum after compression, so a flipped byte is caught
on read and reported with the artifact and chunk by name (`read`), never decoded as numbers.
bfloat16 has no NumPy dtype; it is stored as its raw uint16 bits with `"dtype": "bfloat16"`
in the array's attributes, and widened to float32 on read.
"""

from __future__ import annotations

import os

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from saectl.errors import ArtifactError

STORAGE_DTYPES = ("float16", "bfloat16", "float32")

# Zarr's codec thread pool defaults to cpu_count + 4 threads; each keeps its own malloc arena,
# which on a 2-core machine tripled a shuffle's peak memory for no speed. One per core (at most
# 8) unless the user chose (ZARR_THREADING__MAX_WORKERS).
if "ZARR_THREADING__MAX_WORKERS" not in os.environ:
    zarr.config.set({"threading.max_workers": max(1, min(8, len(os.sched_getaffinity(0))))})
# ~4 MiB chunks: large enough to compress and read fast, small enough to resume cheaply.
# SAECTL_CHUNK_BYTES changes it (tests use small chunks to get many with a tiny model).
CHUNK_BYTES = int(os.environ.get("SAECTL_CHUNK_BYTES", 4 << 20))


def compressors(itemsize: int):
    """zstd level 1, then a checksum. Chosen by measurement on SmolLM2 activations
    (`BENCH_ONLY=codecs make bench`): 1.86 bytes per float16 value and 1.59 per bfloat16, as
    small as Blosc's byte- or bit-shuffled zstd and zstd-3 give within 1-4%, at 300-850 MB/s,
    hundreds of times what the model produces; lz4 saves nothing on 16-bit floats."""
    return [ZstdCodec(level=1), Crc32cCodec()]


def numpy_dtype(storage: str) -> np.dtype:
    return np.dtype(np.uint16) if storage == "bfloat16" else np.dtype(storage)


def create(group: zarr.Group, name: str, shape: tuple[int, ...], chunks: tuple[int, ...],
           storage: str, attrs: dict | None = None) -> zarr.Array:
    """Create (or reopen, if it exists with the same shape) a checksummed array."""
    dtype = numpy_dtype(storage) if storage in STORAGE_DTYPES else np.dtype(storage)
    if name in group:
        arr = group[name]
        if tuple(arr.shape) != tuple(shape):
            raise ArtifactError(f"{name} exists with shape {arr.shape}, expected {shape}")
        return arr
    arr = group.create_array(name, shape=shape, chunks=chunks, dtype=dtype,
                             compressors=compressors(dtype.itemsize), fill_value=0,
                             attributes={"dtype": storage, **(attrs or {})})
    return arr


def to_storage(x, storage: str) -> np.ndarray:
    """A torch tensor → the NumPy array that is written. Non-finite values are refused by the
    caller (an overflow to inf in float16 is a wrong number, not a rounding)."""
    import torch  # deferred: the store and the CLI never need it

    if storage == "bfloat16":
        return x.to(torch.bfloat16).contiguous().view(torch.uint16).cpu().numpy()
    return x.to(getattr(torch, storage)).cpu().numpy()


def from_storage(data: np.ndarray, storage: str) -> np.ndarray:
    """Stored values → float32."""
    if storage == "bfloat16":
        return (data.astype(np.uint32) << 16).view(np.float32)
    if data.dtype == np.float16 and data.size >= 1 << 16:
        return _widen_half(np.ascontiguousarray(data))
    return data.astype(np.float32, copy=False)


_PIECE = (1 << 15) - 1  # below torch's grain size (32768): one thread per copy


def _widen_half(data: np.ndarray) -> np.ndarray:
    """float16 → float32 through torch's vectorised cast: the same bits as NumPy's for every
    number (both exact; a NaN stays NaN, its payload aside), 3-4x less CPU here, where NumPy widens a value at a time, and the
    shuffle widens every value of a harvest. In pieces below torch's grain size, so each copy
    stays on the calling thread: the callers run them on threads of their own, and torch's
    OpenMP team, spinning at a barrier while others' jobs hold the cores, cost 10x the CPU on
    this shared machine."""
    import torch  # deferred: the store and the CLI never need it

    if not data.flags.writeable:  # torch.from_numpy warns on a read-only array
        data = data.copy()
    out = np.empty(data.shape, np.float32)
    src, dst = torch.from_numpy(data.reshape(-1)), torch.from_numpy(out.reshape(-1))
    for lo in range(0, src.numel(), _PIECE):
        dst[lo:lo + _PIECE].copy_(src[lo:lo + _PIECE])
    return out


def read(arr: zarr.Array, selection=slice(None), *, artifact: str = "", raw: bool = False):
    """`arr[selection]` as float32 (or raw storage values), with a damaged chunk reported by name."""
    try:
        data = arr[selection]
    except Exception as e:  # zarr raises ValueError/RuntimeError from codecs on a bad chunk
        chunk = _bad_chunk(arr, selection)
        raise ArtifactError(
            f"artifact {artifact or arr.store} is damaged: array '{arr.path}' has an unreadable "
            f"chunk{f' {chunk}' if chunk else ''} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); re-run the command that made it after "
            "`saectl gc --all`, or delete the artifact") from None
    if raw or arr.attrs.get("dtype") not in STORAGE_DTYPES:
        return data
    return from_storage(data, arr.attrs["dtype"])


def read_ahead(arr: zarr.Array, start: int, step: int, *, artifact: str = ""):
    """(lo, hi, raw values of arr[lo:hi]) for lo = start, start + step, ... to the end, the
    next read decoding on a thread while the caller works on this one: a small --memory
    reads a chunk at a time, which Zarr decodes on one core."""
    from concurrent.futures import ThreadPoolExecutor

    n = arr.shape[0]

    def get(lo):
        return read(arr, slice(lo, min(lo + step, n)), artifact=artifact, raw=True)

    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(get, start) if start < n else None
        for lo in range(start, n, step):
            raw = nxt.result()
            if lo + step < n:
                nxt = pool.submit(get, lo + step)
            yield lo, min(lo + step, n), raw


def _bad_chunk(arr: zarr.Array, selection) -> str:
    """The key ('c/3/0') of the first chunk along axis 0 of `selection` that fails to decode."""
    sel = selection if isinstance(selection, slice) else slice(None)
    lo, hi, _ = sel.indices(arr.shape[0])
    rows = arr.chunks[0]
    for c in range(lo // rows, -(-hi // rows)):
        try:
            arr[c * rows:(c + 1) * rows]
        except Exception:
            return "c/" + "/".join([str(c)] + ["0"] * (arr.ndim - 1))
    return ""


def rows_per_chunk(row_bytes: int, multiple: int = 1) -> int:
    """Rows per chunk: a power of two near CHUNK_BYTES, a multiple of `multiple`."""
    n = max(1, CHUNK_BYTES // max(row_bytes, 1))
    n = 1 << (n.bit_length() - 1)
    return max(multiple, (n // multiple) * multiple)
