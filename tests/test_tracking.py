"""Training curves in Weights & Biases and TensorBoard (issue 24), with the real libraries in
offline mode, read back with their own readers (TensorBoard's EventAccumulator; W&B's offline
run file, whose records are wandb's own protobuf messages in its LevelDB-style log). A run
killed (SIGKILL) after its checkpoint at step 16 and resumed: TensorBoard holds each step once;
W&B holds every step (its killed session flushed nothing; the resumed one sends the stored
windows again)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from saectl import store
from tests.helpers import REPO, assert_one_line_error, run_cli, tried

pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")

TRAIN = ["--arch", "topk", "--width", "64", "--k", "4", "--tokens", "8192", "--batch-size",
         "256", "--no-lm-eval", "--device", "cpu", "--log-every", "4", "--checkpoint-steps", "8"]


@pytest.fixture
def shuffled(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.normal(size=(4096, 16)).astype(np.float32))
    s = tmp_path / "store"
    imp = _run(["import", tmp_path / "x.npy", "--hook", "h", "--store", s]).stdout.strip()
    return s, _run(["shuffle", imp, "--store", s]).stdout.strip()


def _run(args, env=None, check=True):
    p = subprocess.run([sys.executable, "-m", "saectl", *map(str, args)], capture_output=True,
                       text=True, timeout=600, cwd=REPO,
                       env={**os.environ, "WANDB_SILENT": "true", **(env or {})})
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def _wandb_history(folder: Path) -> list[int]:
    """The `_step` of every history record in every offline run file under `folder`."""
    from wandb.proto import wandb_internal_pb2

    steps = []
    for f in sorted(folder.glob("**/run-*.wandb")):
        data, pos, frag = f.read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's trailer
                pos += 32768 - pos % 32768
                continue
            n, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
            chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
            frag = chunk if kind in (1, 2) else frag + chunk
            if kind in (1, 4):
                rec = wandb_internal_pb2.Record()
                rec.ParseFromString(frag)
                if rec.WhichOneof("record_type") == "history":
                    items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                             for i in rec.history.item}
                    if "train/loss" in items:
                        steps.append(int(items.get("_step", rec.history.step.num)))
    return steps


def _tensorboard_steps(folder: Path, tag: str = "train/loss") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder))
    ea.Reload()
    return [e.step for e in ea.Scalars(tag)]


@pytest.mark.parametrize("kind", ["tensorboard", "wandb"])
def test_a_killed_and_resumed_run_logs_each_step_once(shuffled, kind):
    s, sh = shuffled
    args = ["train", sh, *TRAIN, "--store", s, "--log", kind]
    killed = _run(args, env={"SAECTL_FAULTS": "train.checkpointed:2"}, check=False)
    assert killed.returncode != 0  # killed after its checkpoint at step 16
    ref = _run(args).stdout.strip()
    assert ref.startswith("train/") and store.open_complete(s, ref).is_complete()
    want = list(range(4, 33, 4))  # every window of the 32 steps, once
    digest = ref.split("/")[1]
    if kind == "tensorboard":
        folder = s / "tracking" / "tensorboard" / digest[:12]
        assert _tensorboard_steps(folder) == want
        assert _tensorboard_steps(folder, "eval/fvu") == [0]
    else:
        # the killed session's unflushed tail is lost (SIGKILL), the resumed one sends it again
        got = _wandb_history(s / "tracking" / "wandb")
        assert sorted(set(got)) == want and sorted(got)[-5:] == want[-5:], got


def test_logging_never_changes_the_address_and_a_broken_tracker_is_one_line(shuffled, capsys,
                                                                             tmp_path):
    s, sh = shuffled
    plain = _run(["train", sh, *TRAIN, "--store", tmp_path / "a"], check=False)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    env = {"WANDB_DIR": str(blocked / "sub")}
    goes_on = _run(["train", sh, *TRAIN, "--store", s, "--log", "wandb"], env=env)
    assert "--log wandb cannot start" in goes_on.stderr and "training goes on" in goes_on.stderr
    ref = goes_on.stdout.strip()
    assert store.open_complete(s, ref).is_complete()
    assert plain.returncode != 0  # another store without the shuffle: the address is the same
    strict = _run(["train", sh, *TRAIN, "--store", s, "--log", "wandb", "--log-strict",
                   "--seed", "1"], env=env, check=False)
    assert strict.returncode == 1
    lines = [ln for ln in strict.stderr.strip().splitlines() if ln.startswith("saectl: error")]
    assert len(lines) == 1 and "--log wandb cannot start" in lines[0], strict.stderr
    assert_one_line_error(run_cli(capsys, "train", sh, *TRAIN, "--store", s, "--log", "mlflow"),
                          "--log", "wandb, tensorboard")
    # replaying the stored log of the run that had no tracker
    res = run_cli(capsys, "log", ref, "--to", "tensorboard", "--store", s)
    assert res.code == 0, res.err
    assert _tensorboard_steps(s / "tracking" / "tensorboard" / ref.split("/")[1][:12]) == \
        list(range(4, 33, 4))
    tried("train", "bad input", 2)
