"""torch's thread count, narrowed where many small kernels would only wait on each other."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside, its thread count again after (an error included). For
    loops of many small kernels (the interpret scan's bookkeeping, probing's L-BFGS fits):
    under load two threads wait ~15 ms at every parallel region's barrier, which costs more
    than the second core gains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
