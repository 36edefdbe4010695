"""Executors: local processes and a real SLURM array (tests/slurm.py starts the cluster),
following completion through the store. The tasks are cheap real commands: `saectl shuffle`
of a 64×8 import with different seeds (about a second each)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import tried

from saectl import executors, store
from saectl.errors import ArtifactError, ConfigError
from saectl.executors import (
    JOB_FILE,
    SlurmOptions,
    Task,
    error_line,
    follow_slurm,
    pending,
    queued,
    recorded_job,
    run_processes,
    submit_or_follow,
    submit_slurm,
)
from saectl.sbatch import job_script
from saectl.stage import run as run_stage
from stages import import_acts, shuffle

SEEDS = range(8)
BAD_ERROR = "saectl: error: --eval-fraction must be in [0, 1), got 2.0"


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A store with one import, and the digest each shuffle seed addresses (learnt from real
    runs, then removed, so the tests follow shuffle's addressing whatever it becomes)."""
    root = tmp_path_factory.mktemp("executors")
    np.save(root / "x.npy", np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32))
    s = root / "store"
    cfg = import_acts.ImportConfig(file=str(root / "x.npy"), hook="h", store=str(s))
    imp = run_stage(import_acts.STAGE, cfg)
    digests = {}
    for seed in SEEDS:
        art = run_stage(shuffle.STAGE,
                        shuffle.ShuffleConfig(harvest=imp.ref, seed=seed, store=str(s)))
        digests[seed] = art.digest
        store.remove(art)
    shutil.rmtree(s / store.TRASH, ignore_errors=True)
    return s, imp.ref, digests


class Tasks:
    def __init__(self, template, tmp_path: Path, store_name: str = "store"):
        src, self.ref, self.digests = template
        self.store = tmp_path / store_name
        shutil.copytree(src, self.store)

    def good(self, seed: int) -> Task:
        argv = ["shuffle", self.ref, "--seed", str(seed), "--store", str(self.store)]
        return Task(f"s{seed}", argv, store.Artifact(self.store, "shuffle", self.digests[seed]))

    def bad(self) -> Task:
        argv = ["shuffle", self.ref, "--eval-fraction", "2", "--store", str(self.store)]
        return Task("bad", argv, store.Artifact(self.store, "shuffle", "f" * 64))


@pytest.fixture
def tasks(template, tmp_path) -> Tasks:
    return Tasks(template, tmp_path)


def _one_error(log: str) -> str:
    lines = [ln for ln in Path(log).read_text().splitlines() if ln.startswith("saectl: error:")]
    assert len(lines) == 1 and "Traceback" not in Path(log).read_text(), Path(log).read_text()
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Local processes


def test_run_processes_completes_tasks_and_a_rerun_starts_none(tasks, tmp_path):
    todo = [tasks.good(s) for s in range(4)]
    assert pending(todo) == todo
    out = run_processes(todo, jobs=2, log_dir=tmp_path / "logs")
    assert out.ok and [t.name for t in out.done] == ["s0", "s1", "s2", "s3"], out
    for t in todo:
        assert t.artifact.is_complete()
        assert t.artifact.ref in (tmp_path / "logs" / f"{t.name}.log").read_text()
    assert pending(todo) == []
    again = run_processes(todo, jobs=2, log_dir=tmp_path / "logs2")
    assert again.ok and len(again.done) == 4
    assert list((tmp_path / "logs2").iterdir()) == []  # complete: no process started


def test_run_processes_reports_a_failed_task_with_its_log(tasks, tmp_path):
    good, bad = tasks.good(0), tasks.bad()
    out = run_processes([good, bad], jobs=2, log_dir=tmp_path / "logs")
    assert out.done == [good] and out.pending == []
    [(task, log)] = out.failed
    assert task == bad and log == str(tmp_path / "logs" / "bad.log")
    assert _one_error(log) == BAD_ERROR == error_line(log)
    assert pending([good, bad]) == [bad]


def test_pending_lists_only_incomplete_tasks(tasks, tmp_path):
    todo = [tasks.good(s) for s in range(3)]
    assert run_processes(todo[:2], jobs=1, log_dir=tmp_path).ok
    assert pending(todo) == [todo[2]]
    (todo[0].artifact.path / store.COMPLETE).unlink()  # written but never marked complete
    assert pending(todo) == [todo[0], todo[2]]


def test_run_processes_divides_the_cores_among_the_jobs(tasks, tmp_path, monkeypatch, capsys):
    """Each process gets its share of the cores (OMP_NUM_THREADS, which torch reads at start:
    the child's torch runs that many threads), SLURM's --cpus-per-task bounding the cores
    inside a SLURM task; cores that do not divide go to the first slots; never more processes
    than cores; --threads overrides."""
    import sys

    from saectl.executors import cores

    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\necho "threads=$OMP_NUM_THREADS"\n'
                       f'{sys.executable} -c "import torch; print(\'torch=%d\' % '
                       f'torch.get_num_threads())"\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    todo = [tasks.good(s) for s in range(2)]

    def run(name, jobs=2, **kw):
        for t in todo:  # fresh artifacts: these seeds may be complete from another test
            if t.artifact.path.exists():
                shutil.rmtree(t.artifact.path)
        assert run_processes(todo, jobs=jobs, log_dir=tmp_path / name, python=str(wrapper),
                             **kw).ok
        return [(tmp_path / name / f"s{i}.log").read_text() for i in range(2)]

    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    logs = run("a")
    want = max(1, cores() // 2)
    assert all(f"threads={want}\ntorch={want}\n" in log for log in logs), logs
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert cores() == 8
    for bad in ("x", "0", "\u00b2", "-2", ""):  # not a positive integer: ignored
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", bad)
        assert cores() == 8
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "16")  # more than the mask allows: the mask
    assert cores() == 8
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert cores() == 3
    logs = run("b")  # 3 cores, 2 jobs: 2 threads and 1 (s0 starts first, in the first slot)
    assert "threads=2\n" in logs[0] and "threads=1\n" in logs[1], logs
    assert "2 processes at a time, 2/1 threads" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    logs = run("c", jobs=4)  # more jobs than cores: one process at a time
    assert all("threads=1\n" in log for log in logs)
    assert "1 process at a time (--jobs 4 > 1 cores), 1 thread each" in capsys.readouterr().err
    logs = run("d", threads=3)
    assert all("threads=3\n" in log for log in logs)
    assert "2 processes at a time, 3 threads each" in capsys.readouterr().err


def test_thread_split():
    from saectl.executors import thread_split

    assert thread_split(2, 2, None) == (2, [1, 1])
    assert thread_split(8, 2, None) == (2, [4, 4])
    assert thread_split(3, 2, None) == (2, [2, 1])
    assert thread_split(5, 3, None) == (3, [2, 2, 1])
    assert thread_split(2, 4, None) == (2, [1, 1])  # never more processes than cores
    assert thread_split(2, 4, 1) == (4, [1, 1, 1, 1])  # --threads: as the user asked


@pytest.mark.parametrize("value,want", [("1", "1"), ("\u00b2", None), ("0", None)])
def test_slurm_cpus_set_the_threads_of_a_task(value, want):
    """Inside a SLURM task `import saectl` (before torch) sets torch's threads from
    --cpus-per-task; a value that is not a positive integer is ignored, without an error."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in executors.THREAD_VARS}
    code = ("import saectl, torch, os; "
            "print(torch.get_num_threads(), os.environ.get('OMP_NUM_THREADS'))")
    p = subprocess.run([sys.executable, "-c", code],
                       check=False, capture_output=True, text=True,
                       env={**env, "SLURM_CPUS_PER_TASK": value})
    assert p.returncode == 0 and p.stderr == "", p.stderr
    threads, omp = p.stdout.split()
    if want:
        assert (threads, omp) == (want, want)
    else:
        assert omp == "None"


def test_jobs_must_be_positive(tasks, tmp_path):
    with pytest.raises(ConfigError, match="--jobs must be at least 1"):
        run_processes([tasks.good(0)], jobs=0, log_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# SLURM


def test_sbatch_missing_is_one_line(tasks, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ConfigError) as e:
        submit_slurm([tasks.good(0)], SlurmOptions(), tmp_path / "work")
    assert str(e.value) == ("sbatch not found: --executor slurm needs a SLURM client on PATH; "
                            "use --executor processes on this machine")
    assert not (tmp_path / "work").exists()


def test_slurm_options_become_sbatch_lines():
    opts = SlurmOptions(partition="gpu", time="1:00:00", gres="gpu:1", cpus_per_task=4,
                        mem="16G", extra=("#SBATCH --account=abc", "--qos=low"))
    assert opts.directives() == [
        "#SBATCH --partition=gpu", "#SBATCH --time=1:00:00", "#SBATCH --gres=gpu:1",
        "#SBATCH --cpus-per-task=4", "#SBATCH --mem=16G", "#SBATCH --account=abc",
        "#SBATCH --qos=low"]
    with pytest.raises(ConfigError, match="extra SLURM line"):
        SlurmOptions(extra=("echo hi",))


def test_slurm_options_cannot_inject_a_line_into_the_job_script(tmp_path):
    """Issue 15.7: a value with a line break ended its `#SBATCH` line and put a shell command
    into the job script; whitespace split it. Every option is one word, or a one-line error
    naming it."""
    examples = {"partition": "gpu", "time": "1:00:00", "gres": "gpu:1", "mem": "16G"}
    for name in examples:
        for bad in ("gpu\necho pwned", "a b", "x\r", "\t", "", "16G\x00"):
            with pytest.raises(ConfigError) as e:
                SlurmOptions(**{name: bad})
            msg = str(e.value)
            assert f"--{name}" in msg and "whitespace" in msg and "\n" not in msg, msg
    with pytest.raises(ConfigError, match="--cpus-per-task"):
        SlurmOptions(cpus_per_task="4\necho pwned")
    with pytest.raises(ConfigError, match="extra SLURM line"):
        SlurmOptions(extra=("--account=abc\necho pwned",))
    script = job_script(1, SlurmOptions(**examples), tmp_path / "logs", tmp_path / "tasks.json")
    assert [ln for ln in script.splitlines() if "pwned" in ln] == []
    tried("sweep", "injection")


def test_job_script_quotes_the_log_path():
    """Issue 15.7: `--output=/my store/...` was cut at the space by sbatch, so the logs went
    to `/my`; `%` in a folder name was taken for a file-name pattern."""
    script = job_script(2, SlurmOptions(), Path('/my store/50%/a"b/logs'), Path("/t.json"))
    [line] = [ln for ln in script.splitlines() if ln.startswith("#SBATCH --output")]
    assert line == '#SBATCH --output="/my store/50%%/a\\"b/logs/%a.log"'
    tried("sweep", "injection")


def test_a_damaged_job_record_is_one_line(tasks, tmp_path):
    """Issue 15.4: slurm.json cut short (a full disk, a kill mid-write before it was written
    atomically) gave a JSONDecodeError traceback; now one line naming the file and the fix."""
    work = tmp_path / "work"
    work.mkdir()
    assert recorded_job(work) is None
    for damaged in ('{"job": "12', "", '["12"]', '{"job": 12}', b"\xff\xfe"):
        f = work / JOB_FILE
        (f.write_bytes if isinstance(damaged, bytes) else f.write_text)(damaged)
        for call in (lambda: recorded_job(work),
                     lambda: submit_or_follow([tasks.good(0)], SlurmOptions(), work)):
            with pytest.raises(ArtifactError) as e:
                call()
            msg = str(e.value)
            assert str(f) in msg and "damaged" in msg and "delete it" in msg, msg
            assert "\n" not in msg
    tried("sweep", "corruption")


@pytest.fixture
def slurm_env(slurm_cluster, monkeypatch):  # noqa: F811
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    return slurm_cluster


def test_slurm_array_completes_through_the_store(tasks, tmp_path, slurm_env):
    todo = [tasks.good(s) for s in range(4)]
    work = tmp_path / "work"
    job = submit_slurm(todo, SlurmOptions(), work)
    assert job.isdigit()
    entries = json.loads((work / "tasks.json").read_text())
    assert [e["argv"] for e in entries] == [t.argv for t in todo]
    out = follow_slurm(todo, job, work, poll=0.3, timeout=120)
    assert out.ok and len(out.done) == 4, out
    assert all(t.artifact.is_complete() for t in todo)
    for i, t in enumerate(todo):
        assert t.artifact.ref in (work / "logs" / f"{i}.log").read_text()
    assert queued("987654") == set()  # a job the controller never knew


def test_slurm_array_in_a_store_path_with_a_space(template, tmp_path, slurm_env):
    """Issue 15.7, on the real cluster: a store and work folder whose paths hold a space and a
    `%` (unquoted, sbatch wrote the logs to the path cut at the space); the record it leaves is
    JSON that a re-run reads back."""
    tasks = Tasks(template, tmp_path, "my store")
    todo = [tasks.good(s) for s in range(2)]
    work = tmp_path / "my store" / "work 100%"
    job, submitted = submit_or_follow(todo, SlurmOptions(), work)
    assert submitted and recorded_job(work) == job
    out = follow_slurm(todo, job, work, poll=0.3, timeout=120)
    assert out.ok and len(out.done) == 2, out
    for i, t in enumerate(todo):
        assert t.artifact.ref in (work / "logs" / f"{i}.log").read_text()
    assert not (tmp_path / "my").exists()
    tried("sweep", "injection")


def test_slurm_failed_task_is_reported_with_its_log(tasks, tmp_path, slurm_env):
    good, bad = tasks.good(4), tasks.bad()
    work = tmp_path / "work"
    job = submit_slurm([good, bad], SlurmOptions(), work)
    out = follow_slurm([good, bad], job, work, poll=0.3, timeout=120)
    assert out.done == [good] and out.pending == []
    [(task, log)] = out.failed
    assert task == bad and log == str(work / "logs" / "1.log")
    assert _one_error(log) == BAD_ERROR
    tried("sweep", "slurm fault")

def test_slurm_cancelled_task_is_the_only_one_resubmitted(tasks, tmp_path, slurm_env):
    todo = [tasks.good(s) for s in (5, 6, 7)]
    work = tmp_path / "work"
    # Held, so the cancel certainly lands before the task could run.
    job = submit_slurm(todo, SlurmOptions(extra=("--hold",)), work)
    assert queued(job) == {0, 1, 2}
    with pytest.raises(ArtifactError, match=f"SLURM job {job}, submitted from .* has tasks in"):
        submit_slurm(todo, SlurmOptions(), work)  # its tasks are about to read tasks.json
    slurm_env.run("scancel", f"{job}_2")
    slurm_env.run("scontrol", "release", job)
    out = follow_slurm(todo, job, work, poll=0.3, timeout=120)
    assert out.done == todo[:2] and out.pending == []
    [(task, why)] = out.failed
    assert task == todo[2] and str(work / "logs" / "2.log") in why
    assert pending(todo) == [todo[2]]
    # The re-run, into the same folder as a sweep does: only the cancelled task goes again.
    rest = pending(todo)
    job2 = submit_slurm(rest, SlurmOptions(), work)
    assert (work / f"logs-{job}" / "0.log").exists()  # the earlier job's logs, kept aside
    assert [e["name"] for e in json.loads((work / "tasks.json").read_text())] == ["s7"]
    assert follow_slurm(rest, job2, work, poll=0.3, timeout=120).ok
    assert pending(todo) == []
    assert todo[2].artifact.ref in (work / "logs" / "0.log").read_text()
    tried("sweep", "slurm fault")
