"""The stage contract, tested once on a toy stage (tests/toy_stage.py) registered the way a real
one is: through the CLI in this process and in a subprocess, through `saectl run`, killed and
resumed, and with --no-wait while another process writes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from saectl import cli, store
from saectl.stage import run as run_stage
from tests import toy_stage
from tests.helpers import REPO, Result, assert_one_line_error, run_cli, tried

# `saectl` with the toy registered: what a project adding a stage does in saectl/cli.py.
_MAIN = ("import sys; from saectl import cli; from tests import toy_stage; "
         "cli.add_stage(toy_stage.STAGE); cli.main(sys.argv[1:])")


def toy_cli(*args, env=None, timeout=120) -> Result:
    p = subprocess.run([sys.executable, "-c", _MAIN, *map(str, args)], capture_output=True,
                       text=True, cwd=REPO, env={**os.environ, **(env or {})}, timeout=timeout)
    return Result(p.returncode, p.stdout, p.stderr)


@pytest.fixture(autouse=True)
def registered():
    cli.add_stage(toy_stage.STAGE)  # idempotent: the same Stage value twice is one command


def values(root, ref) -> np.ndarray:
    return store.open_complete(root, ref).group()["values"][:]


def test_cli_runs_then_hits_the_cache(tmp_path, capsys):
    first = run_cli(capsys, "toy", "--n", 35, "--store", tmp_path)
    assert first.code == 0, first.err
    ref = first.out.strip()
    assert ref.startswith("toy/") and "toy: wrote" in first.err
    again = run_cli(capsys, "toy", "--n", 35, "--store", tmp_path)
    assert again.out.strip() == ref and "cache hit" in again.err
    art = store.open_complete(tmp_path, ref)
    assert art.manifest()["summary"]["n"] == 35 and len(values(tmp_path, ref)) == 35
    # runner options never move the address; params do
    cfg = toy_stage.ToyConfig(n=35, store=str(tmp_path), no_wait=True)
    assert toy_stage.STAGE.address(cfg).ref == ref
    assert toy_stage.STAGE.address(toy_stage.ToyConfig(n=36, store=str(tmp_path))).ref != ref
    # the library path is the same lifecycle
    assert run_stage(toy_stage.STAGE, cfg).ref == ref


def test_an_input_is_addressed_by_its_ref(tmp_path, capsys):
    a = run_cli(capsys, "toy", "--n", 20, "--store", tmp_path).out.strip()
    b = run_cli(capsys, "toy", "--source", a, "--n", 20, "--seed", 1, "--store", tmp_path).out.strip()
    assert a != b
    assert store.open_complete(tmp_path, b).manifest()["inputs"] == {"source": a}


def test_bad_input_is_one_line(tmp_path, capsys):
    assert_one_line_error(run_cli(capsys, "toy", "--n", 0, "--store", tmp_path), "--n")
    assert_one_line_error(run_cli(capsys, "toy", "--source", "toy/ffff", "--store", tmp_path),
                          "ffff")
    assert not list((tmp_path / "toy").glob("*")) if (tmp_path / "toy").exists() else True
    tried("contract", "bad input", 2)


@pytest.mark.parametrize("fault", ["toy.chunk:2", "store.before_complete"])
def test_killed_then_resumed_equals_uninterrupted(fault, tmp_path):
    args = ["toy", "--n", 45, "--seed", 3]
    killed = toy_cli(*args, "--store", tmp_path / "a", env={"SAECTL_FAULTS": fault})
    assert killed.code == -9, killed.err
    art = store.list_artifacts(tmp_path / "a", "toy")[0]
    assert not art.is_complete()
    resumed = toy_cli(*args, "--store", tmp_path / "a")
    whole = toy_cli(*args, "--store", tmp_path / "b")
    assert resumed.code == whole.code == 0, resumed.err + whole.err
    assert resumed.out == whole.out  # the same address in both stores
    ref = resumed.out.strip()
    assert np.array_equal(values(tmp_path / "a", ref), values(tmp_path / "b", ref))
    tried("contract", "SIGKILL")


def test_no_wait_fails_at_once_while_another_process_writes(tmp_path):
    art = toy_stage.STAGE.address(toy_stage.ToyConfig(n=10, store=str(tmp_path)))
    art.path.mkdir(parents=True)
    with store.flock(art.path / store.LOCK, True, art.ref):
        res = toy_cli("toy", "--n", 10, "--no-wait", "--store", tmp_path)
    assert_one_line_error(res, "being written", "--no-wait")
    assert not art.is_complete()
    done = toy_cli("toy", "--n", 10, "--store", tmp_path)  # the lock is free again
    assert done.code == 0 and done.out.strip() == art.ref
    tried("contract", "busy writer")


def test_saectl_run_takes_a_registered_stage(tmp_path):
    pipeline = tmp_path / "toys.yaml"
    pipeline.write_text("steps:\n"
                        "  first: {stage: toy, params: {n: 30}}\n"
                        "  second: {stage: toy, input: {source: first}, params: {n: 30, seed: 2}}\n")
    root = tmp_path / "store"
    plan = toy_cli("run", pipeline, "--store", root, "--dry-run")
    assert plan.code == 0, plan.err
    assert "will run" in plan.out and "unknown until first runs" in plan.out
    ran = toy_cli("run", pipeline, "--store", root)
    assert ran.code == 0, ran.err
    second = ran.out.strip()
    assert store.resolve(root, "refs/toys/second").ref == second
    assert store.open_complete(root, second).manifest()["inputs"]["source"] == \
        store.resolve(root, "refs/toys/first").ref
    again = toy_cli("run", pipeline, "--store", root, "--dry-run")
    assert again.out.count("cached") == 2, again.out
    # killed inside the second step, the pipeline resumes that step
    (root / "refs").rename(tmp_path / "old-refs")
    for a in store.list_artifacts(root, "toy"):
        store.remove(a)
    killed = toy_cli("run", pipeline, "--store", root, env={"SAECTL_FAULTS": "toy.chunk:5"})
    assert killed.code == -9
    resumed = toy_cli("run", pipeline, "--store", root)
    assert resumed.code == 0 and resumed.out.strip() == second, resumed.err
    tried("contract", "SIGKILL")
