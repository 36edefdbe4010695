"""Streaming training batches out of a shuffled activation array, with prefetching.

The batch a step gets is a function of the step alone, so a resumed run reads exactly what an
uninterrupted one would. Epoch 0 reads the (already shuffled) rows in order; each later epoch
reads whole chunks in a seeded new order, which re-mixes batches without a second shuffle.
A background thread decodes the next batches while the model trains on this one; only
`prefetch` batches are ever held, so memory stays flat however large the array.

With a `target` array (a transcoder's: the MLP output beside its input, shuffled alike by the
shuffle) each batch is the pair (x, y) of the same rows of both arrays. A cross-layer
transcoder reads a layer range (`mlp_in.0..3`): `split_rows` gives the layers' arrays side by
side as one (`Stacked`), each batch their concatenation (n, L·d).
"""

from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from saectl import arrays, layout
from saectl.errors import ArtifactError, ConfigError


class Stacked:
    """The arrays of a layer range side by side: rows are the same tokens (one shuffle), read
    as the concatenation of each array's row. Only what the reader and `arrays.read` use."""

    def __init__(self, parts: list, artifact: str = ""):
        rows = {int(a.shape[0]) for a in parts}
        if len(rows) != 1:
            raise ArtifactError(f"{artifact}: the hooks of the layer range hold different "
                                f"numbers of rows ({sorted(rows)}); re-run the shuffle")
        self.parts, self.artifact = parts, artifact
        self.shape = (rows.pop(), sum(int(a.shape[1]) for a in parts))
        self.chunks = parts[0].chunks
        self.attrs: dict = {}  # each part is decoded to float32 as it is read
        self.path = "+".join(a.path for a in parts)

    def __getitem__(self, selection) -> np.ndarray:
        return np.concatenate([arrays.read(a, selection, artifact=self.artifact)
                               for a in self.parts], axis=1)


def hook_acts(group, hook: str, artifact: str = ""):
    """A harvest's (or import's) activations at `hook`, or at every layer of a range side by
    side (a cross-layer transcoder's input)."""
    return _arrays(group, hook, layout.acts, artifact)


def split_rows(group, hook: str, split: str = "train", artifact: str = ""):
    """A shuffle's `split` rows (train or eval) of `hook`, or of every hook of a layer range."""
    return _arrays(group, hook, layout.train_rows if split == "train" else layout.eval_rows,
                   artifact)


def _arrays(group, hook: str, path, artifact: str):
    hooks = layout.layer_range(hook)
    if hooks is None:
        return group[path(hook)]
    return Stacked([group[path(h)] for h in hooks], artifact)


class BatchReader:
    """`part=(rank, world)`: each batch is this rank's slice of the global batch, rows
    [rank·B/world, (rank+1)·B/world) of it (data-parallel training; saectl.distributed)."""

    def __init__(self, arr, batch_size: int, seed: int = 0, artifact: str = "", target=None,
                 part: tuple[int, int] = (0, 1)):
        self.arr, self.B, self.seed, self.artifact = arr, batch_size, seed, artifact
        self.target, self.part = target, part
        if batch_size % part[1]:
            raise ConfigError(f"--batch-size {batch_size} does not split over {part[1]} ranks; "
                              f"give a multiple of {part[1]}")
        if target is not None and int(target.shape[0]) != int(arr.shape[0]):
            raise ArtifactError(f"{artifact}: a transcoder's input and target hold "
                                f"{arr.shape[0]} and {target.shape[0]} rows, not the same "
                                "tokens; re-run the shuffle of one harvest of both hooks")
        self.n = int(arr.shape[0])
        self.chunk = int(arr.chunks[0])
        self.n_chunks = -(-self.n // self.chunk)
        self._orders: dict[int, np.ndarray] = {}

    def epoch_of(self, step: int) -> int:
        return (step * self.B) // self.n

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if epoch == 0:
                order = np.arange(self.n_chunks)
            else:  # permute the full chunks; a partial last chunk stays last, so rows map by divmod
                full = self.n // self.chunk
                rng = np.random.default_rng([self.seed, epoch, 0xBA7C])
                order = np.concatenate([rng.permutation(full), np.arange(full, self.n_chunks)])
            self._orders = {epoch: order}  # keep one epoch's order: memory stays flat
        return self._orders[epoch]

    def _segments(self, step: int) -> list[tuple[int, int]]:
        """(start, stop) row ranges of the array that make up batch `step`."""
        out, pos, left = [], step * self.B, self.B
        while left > 0:
            epoch, r = divmod(pos, self.n)
            order = self._order(epoch)
            c, off = divmod(r, self.chunk)
            chunk_rows = min(self.chunk, self.n - order[c] * self.chunk)
            take = min(left, chunk_rows - off)
            start = int(order[c]) * self.chunk + off
            if out and out[-1][1] == start:
                out[-1] = (out[-1][0], start + take)
            else:
                out.append((start, start + take))
            pos += take
            left -= take
        return out

    def _local(self, segments: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """This rank's rows of the global batch's segments."""
        rank, world = self.part
        if world == 1:
            return segments
        lo, hi = rank * self.B // world, (rank + 1) * self.B // world
        out, pos = [], 0
        for a, b in segments:
            s0, s1 = max(a, a + lo - pos), min(b, a + hi - pos)
            if s0 < s1:
                out.append((s0, s1))
            pos += b - a
        return out

    def batch(self, step: int):
        """The rows of batch `step` (this rank's part of them): a tensor, or the pair (x, y)
        with a target array."""
        segments = self._local(self._segments(step))
        x = self._read(self.arr, segments)
        return x if self.target is None else (x, self._read(self.target, segments))

    def _read(self, arr, segments) -> torch.Tensor:
        parts = [arrays.read(arr, slice(a, b), artifact=self.artifact) for a, b in segments]
        return torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0])

    def once(self, prefetch: int = 3):
        """Every row exactly once, in array order (the last batch may be shorter): for
        evaluation, where wrapping into a second epoch would count rows twice."""
        steps = -(-self.n // self.B)
        for s, x in self.iterate(0, steps, prefetch):
            end = self.n - s * self.B
            yield x[:end] if self.target is None else (x[0][:end], x[1][:end])

    def iterate(self, start: int, stop: int, prefetch: int = 3):
        """Yield (step, batch) for steps [start, stop), decoded ahead on a thread."""
        q: queue.Queue = queue.Queue(maxsize=prefetch)
        stop_flag = threading.Event()

        def work():
            try:
                for s in range(start, stop):
                    if stop_flag.is_set():
                        return
                    q.put((s, self.batch(s)))
                q.put(None)
            except BaseException as e:  # handed to the consumer
                q.put(e)

        t = threading.Thread(target=work, name="saectl-reader", daemon=True)
        t.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop_flag.set()
            while t.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    pass
                t.join(timeout=0.05)
