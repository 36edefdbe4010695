"""The job script of a SLURM array (docs/architecture.md): its `#SBATCH` options, checked, and
its text. Nothing a user gives reaches the script unchecked: an option value is one word (a
newline in `--partition` would otherwise end the `#SBATCH` line and put a shell command in the
job), the log path is quoted for sbatch's own parser, and the tasks' arguments never pass
through a shell at all (they are read from a JSON file by index)."""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from saectl.errors import ConfigError

_EXAMPLES = {"partition": "gpu", "time": "2:00:00", "gres": "gpu:1", "mem": "16G",
             "gpus-per-task": "1"}
_COUNTS = ("cpus-per-task", "ntasks", "nodes")
"""Options whose value is a whole number."""


def _one_word(value: str) -> bool:
    return bool(value) and all(c.isprintable() and not c.isspace() for c in value)


@dataclass(frozen=True)
class SlurmOptions:
    """How the array is submitted; each field is also a sweep flag and YAML key."""

    partition: str | None = None
    """`--partition`; None: the cluster's default partition."""
    time: str | None = None
    """`--time` per array task, in SLURM's format (e.g. "2:00:00")."""
    gres: str | None = None
    """`--gres`, e.g. "gpu:1" for one GPU per task."""
    cpus_per_task: int | None = None
    """`--cpus-per-task`."""
    mem: str | None = None
    """`--mem` per task, e.g. "16G"."""
    ntasks: int | None = None
    """`--ntasks` per array task: above 1, each point trains data-parallel over that many
    ranks started by `srun` (saectl.distributed), e.g. one per GPU with `gpus_per_task`."""
    nodes: int | None = None
    """`--nodes` per array task (a point spread over several machines)."""
    gpus_per_task: str | None = None
    """`--gpus-per-task`, e.g. "1": one GPU per rank."""
    extra: tuple[str, ...] = ()
    """Free-form lines for site rules ("#SBATCH --account=abc" or just "--account=abc")."""
    python: str = sys.executable
    """The interpreter the tasks run saectl with; it must see the same saectl on the nodes."""

    def __post_init__(self):
        # Each value becomes an `#SBATCH --k=v` line: whitespace would split it and a newline
        # would start a line of its own, which the job's shell runs as a command.
        for flag, value in self._values().items():
            if flag in _COUNTS:
                if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                          or value < 1):
                    raise ConfigError(f"--{flag} must be a whole number of at least 1, "
                                      f"got {value!r}")
            elif value is not None and not _one_word(str(value)):
                raise ConfigError(f"SLURM option --{flag} {str(value)!r} must be one word, "
                                  f"without whitespace or control characters (e.g. "
                                  f"--{flag} {_EXAMPLES[flag]})")
        for line in self.extra:
            if not line.isprintable() or not line.strip().startswith(("#SBATCH", "-")):
                raise ConfigError(f"extra SLURM line {line!r} must be one '#SBATCH --option' "
                                  "line (or '--option'), without control characters")

    def _values(self) -> dict:
        return {"partition": self.partition, "time": self.time, "gres": self.gres,
                "cpus-per-task": self.cpus_per_task, "mem": self.mem, "ntasks": self.ntasks,
                "nodes": self.nodes, "gpus-per-task": self.gpus_per_task}

    @property
    def ranks(self) -> bool:
        """Whether each array task runs several ranks (srun), not one process."""
        return (self.ntasks or 1) > 1 or (self.nodes or 1) > 1

    def directives(self) -> list[str]:
        """The `#SBATCH` lines these options stand for."""
        lines = [f"#SBATCH --{k}={v}" for k, v in self._values().items() if v is not None]
        for line in self.extra:
            line = line.strip()
            lines.append(line if line.startswith("#SBATCH") else f"#SBATCH {line}")
        return lines


SLURM_KEYS = ("partition", "time", "gres", "cpus_per_task", "mem", "ntasks", "nodes",
              "gpus_per_task", "extra")
"""A sweep's `slurm:` keys (SlurmOptions' fields but the interpreter); also its flags."""


def merged_options(flags: dict, from_grid: dict) -> SlurmOptions:
    """The flags that are set over a grid's `slurm:` section; every value checked."""
    opts = {k: v for k, v in from_grid.items() if k != "extra"}
    opts.update({k: v for k, v in flags.items() if v})
    extra = from_grid.get("extra") or ()
    extra = [extra] if isinstance(extra, str) else extra
    return SlurmOptions(**opts, extra=tuple(str(line) for line in extra))


def _quoted(folder: Path, pattern: str) -> str:
    """`folder/pattern` as one argument of an `#SBATCH` line: sbatch splits those lines at
    whitespace unless double-quoted (a backslash escapes `"` and itself there) and expands `%`
    in file names (`%%` is a literal %), so only `pattern`'s own `%a` is a pattern."""
    path = str(folder)
    if not path.isprintable():
        raise ConfigError(f"the store path {path!r} holds a control character; SLURM cannot "
                          "write logs there: use a store path without one")
    escaped = path.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}/{pattern}"'


def job_script(n: int, opts: SlurmOptions, log_dir: Path, tasks_json: Path) -> str:
    """The array job: task I runs saectl with the argv of entry I of `tasks_json`, logging to
    `log_dir/I.log`."""
    # One python process reads its argv from tasks.json by index: arguments never pass through
    # the shell, so any value (spaces, quotes, $) arrives as written.
    pick = ("import json, os, sys; from saectl.cli import main; "
            "main(json.load(open(sys.argv[1]))[int(os.environ['SLURM_ARRAY_TASK_ID'])]['argv'])")
    return "\n".join([
        "#!/bin/bash",
        "#SBATCH --job-name=saectl",
        f"#SBATCH --array=0-{n - 1}",
        f"#SBATCH --output={_quoted(log_dir, '%a.log')}",
        *opts.directives(),
        "# Written by saectl: array task I runs `python -m saectl.cli ARGV` with the argv of",
        f"# entry I of {tasks_json.name}; completion is read from the artifact store, not "
        "from SLURM.",
        *(_RANKS if opts.ranks else []),
        f"exec {'srun --kill-on-bad-exit=1 ' if opts.ranks else ''}{shlex.quote(opts.python)} "
        f"-c {shlex.quote(pick)} {shlex.quote(str(tasks_json))}",
        "",
    ])


_RANKS = [
    "# Several tasks per point: srun starts one rank each; they meet at the first node",
    "# (saectl/distributed.py reads SLURM_PROCID/SLURM_NTASKS) and rank 0 writes the artifact.",
    'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
    "export MASTER_ADDR",
    'export MASTER_PORT="$((20000 + SLURM_JOB_ID % 20000))"',
]

