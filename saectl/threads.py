"""torch's thread count, narrowed where many small kernels would only wait on each other."""

from __future__ import annotations

import contextlib

import torch


def one_thread():
    """torch on one thread inside, its thread count again after (an error included). For
    loops of many small kernels (the interpret scan's bookkeeping, probing's L-BFGS fits):
    under load two threads wait ~15 ms at every parallel region's barrier, which costs more
    than the second core gains."""
    return count(1)


@contextlib.contextmanager
def count(n: int | None):
    """torch on `n` threads inside (None: as it is), its thread count again after."""
    threads = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
