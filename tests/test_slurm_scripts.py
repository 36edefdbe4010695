"""pipelines/slurm/*: option lists from the environment reach `saectl` and `sbatch` as words,
never as globs (issue 15.7). The scripts run under bash with stand-ins for `saectl` and `sbatch`
first on PATH that record their arguments, one per line; the chain itself runs on the real
cluster in tests/test_pipeline.py."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.helpers import REPO, tried

SCRIPTS = REPO / "pipelines" / "slurm"
RECORD = """#!/bin/sh
for a in "$@"; do printf '%s\\n' "$a"; done >> "$ARGV_LOG.$(basename "$0")"
echo 1234
"""


@pytest.fixture
def shell(tmp_path):
    """A folder holding files a glob would match, and stand-ins that record their argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("saectl", "sbatch"):
        (bin_dir / name).write_text(RECORD)
        (bin_dir / name).chmod(0o755)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for name in ("--set=evil", "--qos=evil", "--debug-evil"):
        (cwd / name).write_text("")
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "ARGV_LOG": str(tmp_path / "argv"),
           "SAECTL_STORE": str(tmp_path / "store"), "PIPELINE": str(tmp_path / "p.yaml"),
           "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2", "HOME": str(tmp_path)}

    def run(script: str, **extra: str) -> dict[str, list[list[str]]]:
        res = subprocess.run(["bash", str(SCRIPTS / script)], env={**env, **extra}, cwd=cwd,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        calls = {}
        for f in tmp_path.glob("argv.*"):
            calls[f.name.split(".", 1)[1]] = f.read_text().splitlines()
            f.unlink()
        return calls

    return run


@pytest.mark.parametrize("script,var", [("harvest.sbatch", "SAECTL_ARGS"),
                                        ("shuffle.sbatch", "SAECTL_ARGS"),
                                        ("sweep.sbatch", "SAECTL_ARGS"),
                                        ("interpret.sbatch", "INTERPRET_ARGS")])
def test_sbatch_files_pass_option_lists_unglobbed(shell, script, var):
    """`--set=*` matched the file `--set=evil` in the job's folder and arrived as that."""
    argv = shell(script, **{var: "--set=* --debug-*"})["saectl"]
    assert argv[-2:] == ["--set=*", "--debug-*"], argv
    assert shell(script)["saectl"][-1] != "", "an empty list adds no empty argument"
    tried("sweep", "injection")


def test_submit_sh_keeps_values_whole_and_lists_unglobbed(shell):
    """SBATCH_ARGS' `--qos=*` matched `--qos=evil`; an account with a space was split into two
    sbatch arguments (the second taken for the job script)."""
    calls = shell("submit.sh", SBATCH_ARGS="--qos=* --mem=1G", SAECTL_ACCOUNT="my account",
                  SAECTL_CPU_PARTITION="cpu part", UNTIL="harvest")
    argv = calls["sbatch"]
    assert "--qos=*" in argv and "--mem=1G" in argv and "--qos=evil" not in argv, argv
    assert "--account=my account" in argv and "--partition=cpu part" in argv, argv
    assert argv[-1] == str(SCRIPTS / "harvest.sbatch")
    assert calls["saectl"][0] == "run" and calls["saectl"][-1] == "--dry-run"
    tried("sweep", "injection")
