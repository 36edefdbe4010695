"""Training in bfloat16 (issue 23): `saectl train --autocast bfloat16` ends where float32 ends on
planted features, resumes bit for bit, keeps float32 master weights and Adam state for every
architecture, has its own address (float32 addresses unchanged), flows through sweeps and
torchrun, refuses other dtypes in one line, and says once when the CPU only emulates bf16.

Sizes are tiny: on a CPU without avx512_bf16 every bf16 product is emulated (slow). No timing
is asserted here; benchmarks/bench_bf16.py measures the speed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from saectl import layout, precision, store
from saectl.config import build
from saectl.hashing import digest
from saectl.sae import ARCHS, SAEConfig, load_sae
from saectl.train_config import TrainStageConfig, address_for, resolve
from saectl.trainer import TrainConfig, Trainer
from stages import sweep
from tests.helpers import REPO, assert_one_line_error, run_cli, run_subprocess, tried
from tests.test_train import split, synthetic  # noqa: F401 (split: a fixture)

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # 2 shared cores: threads only contend at these sizes


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train_args(root, ref, arch, *extra):
    flags = {"topk": [], "jumprelu": ["--l0", "0.1"], "gated": [],
             "matryoshka": ["--prefixes", "24,96"]}
    return ["train", ref, "--store", root, "--arch", arch, "--k", "3", "--width", "96",
            "--tokens", "200000", "--batch-size", "512", "--lr", "3e-3", "--device", "cpu",
            *flags[arch], *extra]


def mmcs(art, D) -> float:
    """Mean over the planted directions of the best cosine with a decoder row."""
    W = load_sae(store.sae_dir(art)).W_dec.detach().numpy()
    return float((D @ (W / np.linalg.norm(W, axis=1, keepdims=True)).T).max(1).mean())


# topk: the sparse kernel (bf16 selection, exact fp32 values); jumprelu: custom autograd
# Functions under autocast; gated: dense bf16 products with fp32 biases. The BatchTopK family
# (bf16 batch-wide selection) is within 1% on average but up to 1.5% on one seed here, as
# much as fp32 seeds differ (benchmarks/bench_bf16.py): too close to assert on one seed.
@pytest.mark.parametrize("arch", ["topk", "jumprelu", "gated"])
def test_bf16_ends_where_fp32_ends(split, capsys, one_thread, arch):  # noqa: F811
    root, ref, D = split
    fp32 = run_cli(capsys, *train_args(root, ref, arch))
    bf16 = run_cli(capsys, *train_args(root, ref, arch, "--autocast", "bfloat16"))
    assert fp32.code == bf16.code == 0, fp32.err + bf16.err
    assert fp32.out != bf16.out  # its own address
    a, b = store.open_complete(root, fp32.out.strip()), store.open_complete(root, bf16.out.strip())
    assert "autocast" not in a.manifest()["params"]["train"]
    assert b.manifest()["params"]["train"]["autocast"] == "bfloat16"
    fa, fb = a.manifest()["summary"]["fvu"], b.manifest()["summary"]["fvu"]
    assert abs(fb - fa) <= 0.01 * fa, (fa, fb)
    assert abs(mmcs(b, D) - mmcs(a, D)) <= 0.01, (mmcs(a, D), mmcs(b, D))
    # the weights are saved in float32 (the master weights), whatever the products ran in
    assert load_sae(store.sae_dir(b)).W_dec.dtype == torch.float32


def test_bf16_resume_equals_uninterrupted(split):  # noqa: F811
    """Killed after its third checkpoint and run again: the same weights and log, bit for bit,
    as a run never killed (matryoshka: bf16 dense products, BatchTopK and AuxK all replayed)."""
    root, ref, _ = split
    args = train_args(root, ref, "matryoshka", "--autocast", "bfloat16", "--tokens", "60000",
                      "--checkpoint-steps", "20")
    killed = run_subprocess(*args, env={**ONE_THREAD, "SAECTL_FAULTS": "train.checkpointed:3"})
    assert killed.code == -9, killed.err
    resumed = run_subprocess(*args, env=ONE_THREAD)
    assert resumed.code == 0 and "resuming at step 60" in resumed.err, resumed.err
    a = store.open_complete(root, resumed.out.strip())
    weights = (store.sae_dir(a) / "sae_weights.safetensors").read_bytes()
    log = a.group()["log/loss"][:]
    store.remove(a)
    whole = run_subprocess(*args, env=ONE_THREAD)
    assert whole.out == resumed.out
    b = store.open_complete(root, whole.out.strip())
    assert (store.sae_dir(b) / "sae_weights.safetensors").read_bytes() == weights
    assert np.array_equal(b.group()["log/loss"][:], log)
    tried("train", "kill")


def _arch_cfg(arch: str) -> tuple[SAEConfig, bool]:
    if ARCHS[arch].cross_layer:
        return SAEConfig(arch=arch, d_in=32, d_sae=128, k=4, n_layers=2, transcoder=True), True
    return SAEConfig(arch=arch, d_in=32, d_sae=128, k=4), False


@pytest.mark.parametrize("arch", [*sorted(ARCHS), "topk-skip-transcoder"])
def test_every_architecture_keeps_fp32_weights_adam_and_loss(arch, one_thread):
    if arch == "topk-skip-transcoder":
        cfg, pairs = SAEConfig(arch="topk", d_in=32, d_sae=128, k=4, transcoder=True,
                               skip=True), True
    else:
        cfg, pairs = _arch_cfg(arch)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, 32, generator=g), torch.randn(512, 32, generator=g)
    tr = Trainer(cfg, TrainConfig(total_steps=4, dead_window_tokens=0, autocast="bfloat16"), x,
                 target_sample=y if pairs else None)
    for _ in range(3):  # every latent dead from the start: AuxK runs too
        logs = tr.step(x, y) if pairs else tr.step(x)
        assert all(np.isfinite(v) for v in logs.values()), logs
    assert all(p.dtype == torch.float32 for p in tr.sae.parameters())
    for state in tr.optimizer.state.values():
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    with precision.autocast("cpu", "bfloat16"):
        out = tr.sae(x * tr.input_scale, **({"target": y} if pairs else {}),
                     dead_mask=tr.dead_mask(), auxk_coefficient=1 / 32)
    assert all(v.dtype == torch.float32 for v in out.losses.values()), out.losses


def test_addresses_without_autocast_are_unchanged():
    """Digests made before --autocast existed (commit b84eecc), pinned: the option is absent
    from the address unless given."""
    pinned = {"topk": "344949c8f777490992d0a4794ba783d26bb3eb25800d9788743b9a483650b444",
              "relu": "aae4ea7d37123f025936d6be06894db83a89d4971a82df5cae6ab8a552111f60"}
    for arch, want in pinned.items():
        digests = []
        for extra in ({}, {"autocast": "bfloat16"}):
            cfg = TrainStageConfig(shuffle="shuffle/x", arch=arch, k=3, width=96, tokens=200000,
                                   batch_size=512, lr=3e-3, **extra)
            hook, target, sae_cfg, train_cfg, _, _ = resolve(cfg, {"summary": {"n_train": 16000}},
                                                             {"h": 32})
            params = address_for(cfg, sae_cfg, train_cfg, hook, target)
            digests.append(digest("train", params, {"shuffle": "shuffle/x"}))
        assert digests[0] == want
        assert digests[1] != want


def test_bad_autocast_is_one_line_and_writes_nothing(split, capsys, tmp_path):  # noqa: F811
    root, ref, _ = split
    (tmp_path / "grid-ok.yaml").write_text("k: [2, 3]\nwidth: 96\ntokens: 2048\n")
    for value, needles in (("float16", ["--autocast float16", "loss scaling", "bfloat16"]),
                           ("banana", ["--autocast banana", "bfloat16"])):
        res = run_cli(capsys, *train_args(root, ref, "topk", "--autocast", value))
        assert_one_line_error(res, *needles)
        grid = tmp_path / f"grid-{value}.yaml"
        grid.write_text(f"k: [2, 3]\nwidth: 96\ntokens: 2048\nautocast: {value}\n")
        assert_one_line_error(run_cli(capsys, "sweep", ref, "--grid", grid, "--store", root),
                              f"--autocast {value}")
        assert_one_line_error(run_cli(capsys, "sweep", ref, "--grid", tmp_path / "grid-ok.yaml",
                                      "--store", root, "--autocast", value),
                              f"--autocast {value}")
        tried("train", "bad input")
    res = run_cli(capsys, *train_args(root, ref, "topk", "--autocast", ""))
    assert_one_line_error(res, "--autocast '' is not supported", "bfloat16")
    assert store.list_artifacts(root, "train") == [] and store.list_artifacts(root, "sweep") == []


def test_a_sweep_passes_autocast_to_its_points(split, tmp_path):  # noqa: F811
    root, ref, _ = split
    grid = tmp_path / "grid.yaml"
    grid.write_text("k: [2, 3]\nwidth: 96\ntokens: 2048\nautocast: [null, bfloat16]\n")
    plan = sweep.plan(build(sweep.SweepConfig, {"shuffle": ref, "grid": str(grid),
                                                "store": str(root)}))
    made = [p.params["train"].get("autocast") for p in plan.context.points]
    assert made == [None, "bfloat16", None, "bfloat16"]  # k, then autocast
    (tmp_path / "plain.yaml").write_text("k: [2, 3]\nwidth: 96\ntokens: 2048\n")
    plan = sweep.plan(build(sweep.SweepConfig, {"shuffle": ref, "grid": str(tmp_path / "plain.yaml"),
                                                "store": str(root), "autocast": "bfloat16"}))
    assert [p.params["train"]["autocast"] for p in plan.context.points] == ["bfloat16"] * 2
    assert [p.cfg.autocast for p in plan.context.points] == ["bfloat16"] * 2


def test_emulated_bf16_is_said_once(monkeypatch, capsys):
    # the real check first: this host (AVX2 only) has no native bf16
    assert precision.emulated("cpu") == (not precision.cpu_has_native_bf16())
    x = torch.randn(256, 16)
    cfg = SAEConfig(arch="topk", d_in=16, d_sae=64, k=4)
    for emulated, lines in ((True, 1), (False, 0)):
        monkeypatch.setattr(precision, "emulated", lambda device, e=emulated: e)
        monkeypatch.setattr(precision, "_told", set())
        capsys.readouterr()
        for _ in range(2):  # two SAEs (a sweep's points) in one process: one line
            Trainer(cfg, TrainConfig(total_steps=2, autocast="bfloat16"), x).step(x)
        Trainer(cfg, TrainConfig(total_steps=2), x).step(x)  # float32: never
        said = [ln for ln in capsys.readouterr().err.splitlines() if "emulated" in ln]
        assert len(said) == lines, said


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def test_two_ranks_train_in_bf16_like_one_process(tmp_path):
    """`--autocast bfloat16` under torchrun: BatchTopK's global threshold over the ranks'
    bf16 pre-activations; the same address, weights as one process's up to bf16 rounding."""
    rng = np.random.default_rng(0)
    f = rng.normal(size=(48, 16))
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    a = (rng.random((8192, 48)) < 0.08) * rng.random((8192, 48))
    np.save(tmp_path / "x.npy", (a @ f + 0.01 * rng.normal(size=(8192, 16))).astype(np.float32))

    def run(args, launcher=()):
        cmd = [*launcher, *([] if launcher else [sys.executable]), "-m", "saectl", *map(str, args)]
        p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600,
                           cwd=REPO, env={**os.environ, **ONE_THREAD})
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout.strip()

    imp = run(["import", tmp_path / "x.npy", "--hook", "h", "--store", tmp_path / "one"])
    sh = run(["shuffle", imp, "--store", tmp_path / "one"])
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    args = ["train", sh, "--arch", "batchtopk", "--width", "64", "--k", "4", "--tokens", "8192",
            "--batch-size", "256", "--no-lm-eval", "--device", "cpu", "--autocast", "bfloat16"]
    ref = run([*args, "--store", tmp_path / "one"])
    assert run([*args, "--store", tmp_path / "two"], launcher=TORCHRUN) == ref
    one, two = (store.open_complete(tmp_path / s, ref) for s in ("one", "two"))
    assert one.manifest()["params"]["train"]["autocast"] == "bfloat16"
    s1, s2 = one.manifest()["summary"], two.manifest()["summary"]
    assert s2["fvu"] == pytest.approx(s1["fvu"], rel=0.02)
    # exactly k·B kept over the ranks at every step, as one process's topk keeps: bf16 values
    # tie at the cut often, and keeping every tie once made L0 exceed k
    for art in (one, two):
        l0 = art.group()[layout.train_log("l0")][:]
        assert l0.max() <= 4, l0
