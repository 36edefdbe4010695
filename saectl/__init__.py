"""saectl: sparse autoencoders for language models as a content-addressed pipeline."""

import os as _os

__version__ = "0.1.0"


def slurm_cpus() -> int | None:
    """SLURM's --cpus-per-task inside a SLURM task (SLURM_CPUS_PER_TASK, a positive integer),
    else None; a value that is not one is ignored, as torch would ignore it."""
    value = _os.environ.get("SLURM_CPUS_PER_TASK", "")
    return int(value) if value.isascii() and value.isdigit() and int(value) > 0 else None


# Inside a SLURM task torch would start a thread per core of the node, not per core the task
# was given: honour --cpus-per-task unless the user set the thread count (issue 22). Only
# where saectl is imported before torch, as the CLI and the job scripts do.
if slurm_cpus() and "OMP_NUM_THREADS" not in _os.environ:
    _os.environ["OMP_NUM_THREADS"] = str(slurm_cpus())
