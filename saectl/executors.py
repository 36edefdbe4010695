"""Executors: run many `saectl` commands (a sweep's grid points) as local processes or as one
SLURM array, and follow their completion through the artifact store.

Why the store and not the scheduler: a task is done exactly when its artifact's COMPLETE marker
exists (store.py). That holds whoever ran the command and whenever, survives the scheduler
forgetting the job, and needs no accounting database (`sacct` is missing on many clusters and
in our tests). The scheduler is asked one question only, with `squeue`: is this array task
still in the queue? A task that has left the queue without its COMPLETE failed, and its log
says why. So a sweep run again calls `pending` and resubmits only what is not complete, and
`--no-wait` can submit, exit, and let a later run collect.

The in-process executor is the sweep stage's own loop; this module holds the other two:
`run_processes` (local subprocesses, at most `jobs` at once) and `submit_slurm` +
`follow_slurm` (the real `sbatch` and `squeue` binaries; nothing is mocked or emulated).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from saectl import slurm_cpus, store
from saectl.console import info
from saectl.errors import ArtifactError, ConfigError
from saectl.sbatch import SlurmOptions, job_script

TASKS_FILE = "tasks.json"
SCRIPT_FILE = "submit.sbatch"
JOB_FILE = "slurm.json"
"""The live submission's record, {"job": ID}: the one place a re-run learns which job to follow."""
LOG_DIR = "logs"
# What squeue says of a job id the controller no longer knows (finished and purged, or never was).
_UNKNOWN_JOB = "invalid job id"
_SLURM_CALL_TIMEOUT = 60.0  # seconds for one sbatch/squeue call; a hung controller is an error
DRAIN_SECONDS = 30.0  # how long follow_slurm waits for done tasks to leave the queue


@dataclass(frozen=True)
class Task:
    """One `saectl` command and the artifact whose COMPLETE says it has succeeded."""

    name: str
    """Unique within a submission, used for its log file (`<name>.log`), e.g. "p03"."""
    argv: list[str]
    """saectl's arguments, e.g. ["train", "shuffle/ab12...", "--k", "8", "--store", STORE]."""
    artifact: store.Artifact
    """The artifact the command makes; the task is done when it is complete."""


@dataclass
class Outcome:
    """Where each task stands after an executor returns."""

    done: list[Task] = field(default_factory=list)
    failed: list[tuple[Task, str]] = field(default_factory=list)
    """(task, its log path, or the reason where there is no log)."""
    pending: list[Task] = field(default_factory=list)
    """Neither done nor failed yet (still queued when `follow_slurm` timed out)."""

    @property
    def ok(self) -> bool:
        return not self.failed and not self.pending

    def in_order(self, tasks: list[Task]) -> Outcome:
        """Sorted as `tasks` (results arrive in completion order), so reports are stable."""
        pos = {id(t): i for i, t in enumerate(tasks)}
        self.done.sort(key=lambda t: pos[id(t)])
        self.failed.sort(key=lambda f: pos[id(f[0])])
        self.pending.sort(key=lambda t: pos[id(t)])
        return self


def pending(tasks: list[Task]) -> list[Task]:
    """The tasks whose artifact is not complete: what a re-run must (re)submit."""
    return [t for t in tasks if not t.artifact.is_complete()]


def error_line(log: str | os.PathLike) -> str | None:
    """The last `saectl: error:` line of a task's log (else its last line), to report a failure
    in one line next to the log's path; None if the log does not exist."""
    try:
        lines = [ln.strip() for ln in Path(log).read_text(errors="replace").splitlines()
                 if ln.strip()]
    except OSError:
        return None
    errors = [ln for ln in lines if ln.startswith("saectl: error:")]
    return (errors or lines or [None])[-1]


def _check_tasks(tasks: list[Task]) -> None:
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique (they name the log files): {names}")
    for n in names:
        if not n or "/" in n or n.startswith("."):
            raise ValueError(f"task name {n!r} cannot name a log file")


# ---------------------------------------------------------------------------------------------
# Local processes


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
"""What sets a child's thread pools: torch's intra-op pool reads OMP_NUM_THREADS at start."""


def cores() -> int:
    """The cores this process may use: the CPU affinity mask (what a container, taskset or
    SLURM's cgroup allows), at most SLURM's --cpus-per-task inside a SLURM task."""
    try:
        mask = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        mask = os.cpu_count() or 1
    return min(mask, slurm_cpus() or mask)


def thread_split(n_cores: int, jobs: int, threads: int | None) -> tuple[int, list[int]]:
    """(processes at once, threads of each process slot): `threads` each where given (the
    user's choice, `jobs` at once); else at most one process per core, the cores divided
    among them, the first slots taking one more where they do not divide evenly (3 cores, 2
    jobs: 2 and 1), so no core idles and none runs two threads."""
    if threads:
        return jobs, [threads] * jobs
    n = max(1, min(jobs, n_cores))
    return n, [n_cores // n + (i < n_cores % n) for i in range(n)]


def run_processes(tasks: list[Task], jobs: int, log_dir: Path,
                  python: str = sys.executable, poll: float = 0.1,
                  threads: int | None = None) -> Outcome:
    """Run each task as `python -m saectl.cli ARGV`, at most `jobs` at once, each writing
    stdout and stderr to `log_dir/<name>.log`.

    Each process gets `threads` threads, by default the cores divided among the jobs, and
    never more processes at once than cores (`thread_split`): every torch starts a thread per
    core, so N jobs would otherwise run N × cores threads and stall on each other's parallel
    regions (issue 22: two width-2,048 points side by side on two cores took 5 min each, 46 s
    alone).

    A task whose artifact is already complete is done without starting a process. A process
    that exits non-zero, or exits 0 without its artifact complete, is failed with its log path.
    Separate processes (not threads) because each stage owns its process: memory is returned
    when it exits and a crash takes down one task, not the sweep.
    """
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    _check_tasks(tasks)
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    out = Outcome()
    todo = []
    for t in tasks:
        (out.done.append(t) if t.artifact.is_complete() else todo.append(t))
    todo.reverse()  # pop() from the end starts them in the given order
    n_cores = cores()
    at_once, per_slot = thread_split(n_cores, min(jobs, max(1, len(todo))), threads)
    if todo:
        each = (f"{per_slot[0]} thread{'s' if per_slot[0] > 1 else ''} each"
                if len(set(per_slot)) == 1 else f"{'/'.join(map(str, per_slot))} threads")
        capped = f" (--jobs {jobs} > {n_cores} cores)" if at_once < min(jobs, len(todo)) else ""
        info(f"executor: {at_once} process{'es' if at_once > 1 else ''} at a time{capped}, "
             f"{each}")
    free = list(range(at_once))[::-1]  # process slots; pop() takes the lowest
    running: dict[subprocess.Popen, tuple[Task, Path, int]] = {}
    try:
        while todo or running:
            while todo and free:
                task, slot = todo.pop(), free.pop()
                log = log_dir / f"{task.name}.log"
                env = {**os.environ, **{v: str(per_slot[slot]) for v in THREAD_VARS}}
                with open(log, "wb") as f:  # the child holds its own copy of the descriptor
                    proc = subprocess.Popen([python, "-m", "saectl.cli", *task.argv],
                                            stdout=f, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env)
                running[proc] = (task, log, slot)
            time.sleep(poll)
            for proc in [p for p in running if p.poll() is not None]:
                task, log, slot = running.pop(proc)
                free.append(slot)
                free.sort(reverse=True)
                if proc.returncode == 0 and task.artifact.is_complete():
                    out.done.append(task)
                    continue
                if proc.returncode == 0:
                    with open(log, "a") as f:
                        f.write(f"saectl executor: exited 0 but {task.artifact.ref} is not "
                                "complete\n")
                out.failed.append((task, str(log)))
                info(f"{task.name}: failed (exit {proc.returncode}): {error_line(log)}; "
                     f"log {log}")
    finally:  # interrupted: stop the processes this call started, then let the error through
        for proc in running:
            proc.terminate()
        for proc in running:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return out.in_order(tasks)


# ---------------------------------------------------------------------------------------------
# SLURM


def _slurm(cmd: list[str]) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise ConfigError(f"{cmd[0]} not found: --executor slurm needs a SLURM client on PATH; "
                          "use --executor processes on this machine")
    try:
        return subprocess.run(cmd, check=False, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=_SLURM_CALL_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"`{' '.join(cmd)}` did not answer in {_SLURM_CALL_TIMEOUT:.0f}s; "
                          "is the SLURM controller up (try `sinfo`)?") from None



def submit_slurm(tasks: list[Task], opts: SlurmOptions, work_dir: Path) -> str:
    """Submit the tasks as one SLURM array (task I = tasks[I]) and return the job id.

    Writes `work_dir/tasks.json` (name, argv and artifact per index), `work_dir/submit.sbatch`
    and the logs folder `work_dir/logs/` (task I logs to `logs/I.log`), runs
    `sbatch --parsable`, and records the id in `work_dir/slurm.json` (`recorded_job`).

    A work_dir holds one live submission: queued tasks read tasks.json when they start, so it
    must not change under them. Submitting again into the same folder (a re-run resubmitting
    what failed) is refused while the earlier job still has tasks in the queue; once it has
    none, its logs move to `logs-<job>/` so the new indices never mix with the old.
    """
    if not tasks:
        raise ValueError("no tasks to submit")
    _check_tasks(tasks)
    if shutil.which("sbatch") is None:
        raise ConfigError("sbatch not found: --executor slurm needs a SLURM client on PATH; "
                          "use --executor processes on this machine")
    work_dir = Path(work_dir).absolute()
    tasks_json = work_dir / TASKS_FILE
    _retire(work_dir)
    (work_dir / LOG_DIR).mkdir(parents=True, exist_ok=True)
    entries = [{"name": t.name, "argv": [str(a) for a in t.argv], "artifact": t.artifact.ref}
               for t in tasks]
    store.atomic_write(tasks_json, (json.dumps(entries, indent=1) + "\n").encode())
    script = work_dir / SCRIPT_FILE
    text = job_script(len(tasks), opts, work_dir / LOG_DIR, tasks_json)
    store.atomic_write(script, text.encode())
    res = _slurm(["sbatch", "--parsable", str(script)])
    if res.returncode != 0:
        why = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
        raise ConfigError(f"sbatch refused the job ({why}); check the SLURM options "
                          f"(script: {script})")
    job_id = res.stdout.strip().split(";")[0]  # "JOBID" or "JOBID;CLUSTER"
    store.atomic_write(work_dir / JOB_FILE, (json.dumps({"job": job_id}) + "\n").encode())
    info(f"submitted {len(tasks)} tasks as SLURM array job {job_id}; logs in "
         f"{work_dir / LOG_DIR}")
    return job_id


def _retire(work_dir: Path) -> None:
    """Make room for a new submission in `work_dir`: refuse while the previous job still has
    tasks queued (they will read tasks.json), else keep its logs as `logs-<job>/`."""
    old = recorded_job(work_dir)
    if old is None:
        return
    left = queued(old)
    if left is None or left:
        state = "has tasks in the queue" if left else "may still be queued (squeue did not answer)"
        raise ArtifactError(f"SLURM job {old}, submitted from {work_dir}, {state}; follow it "
                            f"(run again without resubmitting) or `scancel {old}` first")
    logs, dest, n = work_dir / LOG_DIR, work_dir / f"{LOG_DIR}-{old}", 1
    while dest.exists():  # job ids restart on a new cluster
        dest, n = work_dir / f"{LOG_DIR}-{old}.{n}", n + 1
    if logs.is_dir():
        logs.rename(dest)
    (work_dir / JOB_FILE).unlink()


def _indices(spec: str) -> set[int]:
    """Array indices from squeue's task part: "3", or a range "[0-3,5%2]" for pending ones."""
    spec = spec.strip("[]").split("%")[0]
    out: set[int] = set()
    for part in filter(None, spec.split(",")):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _read_record(path: Path, kind: type):
    """A JSON record this module wrote, or None if there is none. A damaged one (cut short by a
    full disk, edited by hand) is one line saying what to do, not a traceback."""
    try:
        value = json.loads(path.read_text())
        why = None if isinstance(value, kind) else f"not a JSON {kind.__name__}"
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = str(e)
    if why is None and kind is dict and not isinstance(value.get("job"), str):
        why = "no job id"
    if why is not None:
        raise ArtifactError(f"{path} is damaged ({why}); once no saectl job of yours is left "
                            "in the queue (squeue --me), delete it and run again")
    return value


def recorded_job(work_dir: Path) -> str | None:
    """The SLURM job last submitted from `work_dir` (its `slurm.json`), None if none was."""
    record = _read_record(Path(work_dir) / JOB_FILE, dict)
    return None if record is None else record["job"]


def submit_or_follow(tasks: list[Task], opts: SlurmOptions, work_dir: Path) -> tuple[str, bool]:
    """(job id, whether it was submitted now): the job recorded in `work_dir` while it still
    has tasks in the queue (a re-run follows it, as after `--no-wait`), else a new array of
    `tasks` (a re-run after failures resubmits only what it is given)."""
    job = recorded_job(work_dir)
    if job is not None and queued(job):
        return job, False
    return submit_slurm(tasks, opts, work_dir), True


def queued(job_id: str) -> set[int] | None:
    """The array indices of `job_id` still in the queue (pending, running or completing); an
    empty set once the controller no longer knows the job; None if squeue could not answer
    (controller unreachable), so a caller waits instead of taking every task for failed."""
    res = _slurm(["squeue", "-h", "-j", str(job_id), "-r", "-o", "%i"])
    if res.returncode != 0:
        return set() if _UNKNOWN_JOB in res.stderr.lower() else None
    out: set[int] = set()
    for line in res.stdout.split():
        job, sep, idx = line.partition("_")
        if sep and job == str(job_id):
            out |= _indices(idx)
    return out


def _drain(job_id: str, indices: set[int], poll: float, deadline: float | None) -> None:
    """Wait (briefly) for finished tasks to leave the queue: a task is done at its COMPLETE
    but its process is still exiting, and a re-run that asks SLURM right away must not take
    the job for alive and follow it instead of resubmitting what failed."""
    end = time.monotonic() + DRAIN_SECONDS
    if deadline is not None:
        end = min(end, deadline)
    while time.monotonic() < end:
        left = queued(job_id)
        if left is not None and not left & indices:
            return
        time.sleep(min(poll, 0.5))


def follow_slurm(tasks: list[Task], job_id: str, work_dir: Path, poll: float = 2.0,
                 timeout: float | None = None) -> Outcome:
    """Wait for the array `job_id` (submitted with `submit_slurm` into `work_dir`) until every
    task is done (its artifact complete) or failed (gone from `squeue` without it; reported
    with `work_dir/logs/<index>.log`). After `timeout` seconds the rest are `pending`. Once all
    are done or failed it waits up to DRAIN_SECONDS for them to leave the queue, so the job is
    over when it returns.

    The queue is read before the store on each round: a task that left the queue before the
    snapshot wrote its COMPLETE (if it succeeded) before it exited, so none is misreported.
    """
    work_dir = Path(work_dir).absolute()
    entries = _read_record(work_dir / TASKS_FILE, list)
    index = ({e["name"]: i for i, e in enumerate(entries)} if entries is not None
             else {t.name: i for i, t in enumerate(tasks)})
    missing = [t.name for t in tasks if t.name not in index]
    if missing:
        raise ValueError(f"tasks {missing} are not part of the submission in {work_dir}")
    out = Outcome()
    waiting = list(tasks)
    deadline = None if timeout is None else time.monotonic() + timeout
    last = None
    while True:
        in_queue = queued(job_id)
        still = []
        for t in waiting:
            if t.artifact.is_complete():
                out.done.append(t)
            elif in_queue is not None and index[t.name] not in in_queue:
                log = work_dir / LOG_DIR / f"{index[t.name]}.log"
                why = (str(log) if log.exists() else
                       f"left the queue without writing {log} (cancelled before it started?)")
                out.failed.append((t, why))
                info(f"{t.name}: failed (array task {job_id}_{index[t.name]}): "
                     f"{error_line(log) or 'no log'}; {why}")
            else:
                still.append(t)
        waiting = still
        counts = (len(out.done), len(out.failed), len(waiting))
        if counts != last:
            info(f"SLURM job {job_id}: {counts[0]} done, {counts[1]} failed, {counts[2]} waiting"
                 + ("" if in_queue is not None else " (squeue did not answer; retrying)"))
            last = counts
        if not waiting:
            _drain(job_id, {index[t.name] for t in tasks}, poll, deadline)
            return out.in_order(tasks)
        if deadline is not None and time.monotonic() >= deadline:
            out.pending = waiting
            return out.in_order(tasks)
        time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))
