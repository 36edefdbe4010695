"""Data-parallel training with torch.distributed (issue 21): `torchrun --nproc-per-node 2 -m
saectl train ...` on CPU with the gloo backend.

- A 2-rank run equals a 1-process run with the same global batch, for TopK, BatchTopK and
  JumpReLU, to 1e-5 (absolute, on weights of order 1): the ranks' gradients are averaged in
  float32 in another order than one process sums them, which moves the last bits of each step,
  and Adam carries those differences over the run (measured ~2e-7 over 32 steps).
- Rank 0 killed mid-run (after its first checkpoint) stops the group; the run resumed in ONE
  process equals the uninterrupted run (resume with another number of ranks).
- `--nproc 2` launches the same command under torchrun; a batch that does not split over the
  ranks is one line, exit 1, nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from saectl import layout, store
from saectl.sae import load_sae
from tests.helpers import REPO, assert_one_line_error, run_cli, tried

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
TRAIN = ["--width", "64", "--k", "4", "--tokens", "8192", "--batch-size", "256", "--no-lm-eval",
         "--device", "cpu"]
ARCH_FLAGS = {"topk": [], "batchtopk": [], "jumprelu": ["--l0", "0.1"]}


@pytest.fixture(scope="module")
def shuffled(tmp_path_factory):
    """A shuffle of 8,192 imported rows of a sparse mixture of 48 directions in 16 dims."""
    root = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(0)
    f = rng.normal(size=(48, 16))
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    a = (rng.random((8192, 48)) < 0.08) * rng.random((8192, 48))
    np.save(root / "x.npy", (a @ f + 0.01 * rng.normal(size=(8192, 16))).astype(np.float32))
    store_dir = root / "base"
    imp = _run(["import", root / "x.npy", "--hook", "h", "--store", store_dir]).stdout.strip()
    sh = _run(["shuffle", imp, "--store", store_dir]).stdout.strip()
    return root, store_dir, sh


def _run(args, launcher=(), env=None, check=True) -> subprocess.CompletedProcess:
    cmd = [*launcher, *([sys.executable, "-m", "saectl"] if not launcher else ["-m", "saectl"]),
           *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def _copy(root, base, name):
    dest = root / name
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(base, dest)
    return dest


def _weights(store_dir, ref) -> dict:
    return load_sae(store.sae_dir(store.open_complete(store_dir, ref))).state_dict()


@pytest.mark.parametrize("arch", sorted(ARCH_FLAGS))
def test_two_ranks_equal_one_process(shuffled, arch):
    root, base, sh = shuffled
    args = ["train", sh, "--arch", arch, *ARCH_FLAGS[arch], *TRAIN]
    one, two = _copy(root, base, f"one-{arch}"), _copy(root, base, f"two-{arch}")
    ref1 = _run([*args, "--store", one]).stdout.strip()
    p = _run([*args, "--store", two], launcher=TORCHRUN)
    assert p.stdout.strip() == ref1, "one address whatever the number of ranks, printed once"
    a, b = _weights(one, ref1), _weights(two, ref1)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0, msg=name)
    s1 = store.open_complete(one, ref1).manifest()["summary"]
    s2 = store.open_complete(two, ref1).manifest()["summary"]
    assert s2["fvu"] == pytest.approx(s1["fvu"], rel=1e-4)
    assert s2["final_log"]["fvu"] == pytest.approx(s1["final_log"]["fvu"], rel=1e-3)


def test_a_killed_rank_resumes_on_one_process(shuffled):
    root, base, sh = shuffled
    args = ["train", sh, "--arch", "batchtopk", *TRAIN, "--checkpoint-steps", "8"]
    straight, broken = _copy(root, base, "straight"), _copy(root, base, "broken")
    ref = _run([*args, "--store", straight]).stdout.strip()
    p = _run([*args, "--store", broken], launcher=TORCHRUN, check=False,
             env={"SAECTL_FAULTS": "train.checkpointed:2"})  # rank 0 dies at step 16
    assert p.returncode != 0
    resumed = _run([*args, "--store", broken])  # one process this time
    assert "resuming at step 16" in resumed.stderr
    a, b = _weights(straight, ref), _weights(broken, ref)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("arch,extra", [("topk", []), ("batchtopk", []),
                                        ("topk", ["--autocast", "bfloat16"])])
def test_latents_sharded_over_two_ranks_equal_one_process(shuffled, arch, extra):
    """--shards 2: each rank holds half the latents (and their Adam state); TopK's and
    BatchTopK's selection runs across the shards, so the steps are the unsharded ones. Under
    bf16 autocast the shards' TopK recomputes its candidates' exact values as the kernel does:
    exactly k latents a token, the same steps."""
    root, base, sh = shuffled
    args = ["train", sh, "--arch", arch, *TRAIN, *extra]
    name = f"{arch}{'-bf16' if extra else ''}"
    one, two = _copy(root, base, f"one-sh-{name}"), _copy(root, base, f"sharded-{name}")
    ref1 = _run([*args, "--store", one]).stdout.strip()
    p = _run([*args, "--shards", "2", "--store", two], launcher=TORCHRUN)
    assert p.stdout.strip() == ref1, "the address does not depend on the sharding"
    assert "the latents split over 2 ranks" in p.stderr
    a, b = _weights(one, ref1), _weights(two, ref1)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0, msg=name)
    s1 = store.open_complete(one, ref1).manifest()["summary"]
    s2 = store.open_complete(two, ref1).manifest()["summary"]
    assert s2["final_log"]["fvu"] == pytest.approx(s1["final_log"]["fvu"], rel=1e-3)
    assert s2["final_log"]["l0"] == pytest.approx(s1["final_log"]["l0"], rel=1e-4)
    if arch == "topk":  # every logging window: at most k a token (bf16 ties once kept more)
        l0 = store.open_complete(two, ref1).group()[layout.train_log("l0")][:]
        assert l0.max() <= int(TRAIN[TRAIN.index("--k") + 1]), l0


def test_a_two_by_two_mesh_equals_one_process(shuffled):
    """4 ranks with --shards 2: a 2-D mesh (2 data groups x 2 latent shards, through
    torch.distributed.device_mesh) takes the steps one process takes."""
    root, base, sh = shuffled
    args = ["train", sh, "--arch", "batchtopk", *TRAIN]
    one, mesh = _copy(root, base, "one-mesh"), _copy(root, base, "mesh")
    ref = _run([*args, "--store", one]).stdout.strip()
    four = [*TORCHRUN[:-1], "4"]
    p = _run([*args, "--shards", "2", "--store", mesh], launcher=four)
    assert p.stdout.strip() == ref
    assert "data-parallel over 2 ranks, 128 of each 256-token batch" in p.stderr
    a, b = _weights(one, ref), _weights(mesh, ref)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0, msg=name)


def test_a_sharded_run_killed_mid_run_resumes_unsharded(shuffled):
    """Checkpoints gather the shards into the unsharded layout (weights and Adam state): rank 0
    killed after its 2nd checkpoint; the run resumed in one process equals the uninterrupted."""
    root, base, sh = shuffled
    args = ["train", sh, "--arch", "topk", *TRAIN, "--checkpoint-steps", "8"]
    straight, broken = _copy(root, base, "sh-straight"), _copy(root, base, "sh-broken")
    ref = _run([*args, "--store", straight]).stdout.strip()
    p = _run([*args, "--shards", "2", "--store", broken], launcher=TORCHRUN, check=False,
             env={"SAECTL_FAULTS": "train.checkpointed:2"})
    assert p.returncode != 0
    resumed = _run([*args, "--store", broken])
    assert "resuming at step 16" in resumed.stderr
    a, b = _weights(straight, ref), _weights(broken, ref)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0, msg=name)


def test_sharding_refuses_what_it_cannot_split(shuffled, capsys):
    root, base, sh = shuffled
    s = _copy(root, base, "sh-bad")
    args = ["train", sh, *TRAIN, "--store", s]
    for extra, words in ((["--arch", "jumprelu", "--shards", "2", "--nproc", "2"],
                          ("--shards", "jumprelu")),
                         (["--width", "63", "--shards", "2", "--nproc", "2"],
                          ("width 63", "2 shards")),
                         (["--shards", "3", "--nproc", "2"], ("2 ranks", "3 shards")),
                         (["--shards", "2"], ("--shards 2", "--nproc 2"))):
        assert_one_line_error(run_cli(capsys, *args, *extra), *words)
    assert not (s / "train").exists() or not any((s / "train").iterdir())  # nothing written
    tried("train", "bad input", 4)


def test_nproc_launches_torchrun_and_refuses_an_uneven_batch(shuffled, capsys):
    root, base, sh = shuffled
    s = _copy(root, base, "nproc")
    args = ["train", sh, "--arch", "topk", *TRAIN, "--store", s]
    ref = _run([*args, "--nproc", "2"]).stdout.strip()
    assert ref.startswith("train/") and store.open_complete(s, ref).is_complete()
    bad = [a if a != "256" else "255" for a in args]
    assert_one_line_error(run_cli(capsys, *bad, "--nproc", "2"), "--batch-size 255",
                          "2 ranks")
    assert [p.name for p in (s / "train").iterdir()] == [ref.split("/")[1]]  # nothing written
    tried("train", "bad input", 1)


def test_the_sbatch_script_trains_with_two_tasks(shuffled, slurm_cluster, tmp_path):  # noqa: F811
    """pipelines/slurm/train-ddp.sbatch on the local cluster: srun's 2 tasks train one SAE
    data-parallel; it equals the 1-process run."""
    import time
    from pathlib import Path

    root, base, sh = shuffled
    s, one = _copy(root, base, "slurm"), _copy(root, base, "slurm-one")
    args = ["--arch", "topk", *TRAIN]
    ref = _run(["train", sh, *args, "--store", one]).stdout.strip()
    log = tmp_path / "ddp.log"
    env = {**slurm_cluster.env, "SAECTL_STORE": str(s), "SHUFFLE": sh,
           "SAECTL_ARGS": " ".join(args), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    sub = subprocess.run(["sbatch", "--cpus-per-task=1", "--mem=1G", f"--output={log}",
                          str(REPO / "pipelines" / "slurm" / "train-ddp.sbatch")], env=env,
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert sub.returncode == 0, sub.stderr
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if not slurm_cluster.run("squeue", "-h", check=False).stdout.strip():
            break
        time.sleep(2)
    out = log.read_text() if log.exists() else ""
    assert store.open_complete(s, ref).is_complete(), out + slurm_cluster.logs()
    assert out.splitlines().count(ref) == 1, out  # rank 0 alone prints the ref
    assert out.count("train: wrote") == 1 and "data-parallel over 2 ranks" in out, out
    a, b = _weights(one, ref), _weights(s, ref)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0, msg=name)


KEEP_LARGEST = """
import json, sys, torch
from saectl import distributed
distributed.init("cpu")
values = {0: [3.0, 2.0, 2.0, 2.0, 1.0], 1: [2.0, 2.0, 0.0, 0.0, 5.0]}[distributed.rank()]
keep = distributed.keep_largest(torch.tensor(values), 4)
with open(f"{sys.argv[1]}/rank{distributed.rank()}.json", "w") as f:
    json.dump(keep.tolist(), f)
distributed.shutdown()
"""


def test_keep_largest_keeps_exactly_count_over_the_ranks(tmp_path):
    """The 4 largest of [3, 2, 2, 2, 1] and [2, 2, 0, 0, 5] over 2 ranks: 5 and 3 are above the
    cut (2); of the five 2s, two are kept, the lower rank's and its earlier ones first (keeping
    every tie would keep 7, as bf16 values tie at BatchTopK's cut)."""
    script = tmp_path / "keep.py"
    script.write_text(KEEP_LARGEST)
    p = subprocess.run([*TORCHRUN, str(script), str(tmp_path)], check=False, capture_output=True,
                       text=True, timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got == [[True, True, True, False, False], [False, False, False, False, True]]
