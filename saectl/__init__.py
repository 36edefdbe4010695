"""saectl: sparse autoencoders for language models as a content-addressed pipeline."""

import os as _os

__version__ = "0.1.0"

# Inside a SLURM task torch would start a thread per core of the node, not per core the task
# was given: honour --cpus-per-task unless the user set the thread count (issue 22).
if _os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit() and "OMP_NUM_THREADS" not in _os.environ:
    _os.environ["OMP_NUM_THREADS"] = _os.environ["SLURM_CPUS_PER_TASK"]
