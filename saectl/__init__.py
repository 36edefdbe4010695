"""saectl: sparse autoencoders for language models as a content-addressed pipeline."""

import os as _os

__version__ = "0.1.0"

# Inside a SLURM task torch would start a thread per core of the node, not per core the task
# was given: honour --cpus-per-task unless the user set the thread count (issue 22).
# (Only where saectl is imported before torch, as the CLI and the job scripts do.)
_cpus = _os.environ.get("SLURM_CPUS_PER_TASK", "")
if (_cpus.isascii() and _cpus.isdigit() and int(_cpus) > 0
        and "OMP_NUM_THREADS" not in _os.environ):
    _os.environ["OMP_NUM_THREADS"] = str(int(_cpus))
