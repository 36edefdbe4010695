"""Test helpers: run the real CLI in-process or as a subprocess, and build configs."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_cli(capsys, *args: str) -> Result:
    """`saectl ARGS` in this process (fast); stdout/stderr captured, exit status kept."""
    from saectl.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    cap = capsys.readouterr()
    return Result(code, cap.out, cap.err)


def saectl_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "saectl.cli", *[str(a) for a in args]]


def run_subprocess(*args: str, env: dict | None = None, timeout: float = 300) -> Result:
    full_env = {**os.environ, **(env or {})}
    p = subprocess.run(saectl_cmd(*args), capture_output=True, text=True, env=full_env,
                       timeout=timeout, cwd=REPO)
    return Result(p.returncode, p.stdout, p.stderr)


def assert_one_line_error(res: Result, *needles: str) -> None:
    """Exit 1, nothing on stdout, exactly one line on stderr containing each needle."""
    assert res.code == 1, (res.code, res.out, res.err)
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("saectl: error:")]
    assert len(errors) == 1 and "Traceback" not in res.err, res.err
    for n in needles:
        assert n.lower() in errors[0].lower(), (n, errors[0])
    assert res.out == "", res.out


# What the reliability tests tried, per stage: printed at the end of the run (conftest).
TRIED: dict[tuple[str, str], int] = {}


def tried(stage: str, kind: str, n: int = 1) -> None:
    """Count one fault or bad input survived (call it after the assertions that prove it)."""
    TRIED[(stage, kind)] = TRIED.get((stage, kind), 0) + n
