"""Train stage: feature recovery through the real CLI, cache, resume after SIGKILL, NaN stop,
the downstream CE-loss/KL evaluation on a tiny model, bad input, a planted checkpoint pickle,
atomic checkpoints, and an architecture added by registering one class."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from benchmarks.common import planted_mixtures
from saectl import checkpoints, hooks, metrics, models, store
from saectl.config import build
from saectl.errors import ConfigError
from saectl.sae import ARCHS, SAE, load_sae, register
from stages import train
from tests.helpers import assert_one_line_error, run_cli, run_subprocess, tried


def synthetic(n=20000, d=32, F=96, active=3, seed=0):
    """Sparse non-negative combinations of F random unit directions (+ a little noise): x
    (n, d) float32 and the directions D (F, d), numpy (benchmarks.common.planted_mixtures)."""
    return planted_mixtures(n, d, F, active, seed)


@pytest.fixture
def split(tmp_path, capsys):
    x, D = synthetic()
    np.save(tmp_path / "x.npy", x)
    imp = run_cli(capsys, "import", tmp_path / "x.npy", "--hook", "h", "--store", tmp_path)
    sh = run_cli(capsys, "shuffle", imp.out.strip(), "--store", tmp_path)
    assert sh.code == 0, sh.err
    return tmp_path, sh.out.strip(), D


def train_args(root, ref, *extra):
    return ["train", ref, "--store", root, "--arch", "topk", "--k", "3", "--width", "96",
            "--tokens", "200000", "--batch-size", "512", "--lr", "3e-3", "--device", "cpu", *extra]


def test_train_recovers_features_and_caches(split, capsys):
    root, ref, D = split
    res = run_cli(capsys, *train_args(root, ref))
    assert res.code == 0, res.err
    art = store.open_complete(root, res.out.strip())
    sae = load_sae(store.sae_dir(art))
    W = sae.W_dec.detach().numpy()
    W = W / np.linalg.norm(W, axis=1, keepdims=True)
    assert (D @ W.T).max(1).mean() >= 0.9
    s = art.manifest()["summary"]
    assert s["l0"] == pytest.approx(3.0)
    assert s["fvu"] < 0.3 and 0 <= s["dead_fraction"] < 0.2 and s["cossim"] > 0.8
    assert "ce_loss_score" not in s  # imported: no model to splice into
    assert art.group()["log/loss"].shape[0] >= 10  # the training log is stored
    assert (store.sae_dir(art) / "sparsity.safetensors").exists()
    again = run_cli(capsys, *train_args(root, ref))
    assert again.out == res.out and "cache hit" in again.err
    other = run_cli(capsys, *train_args(root, ref, "--seed", "1"))
    assert other.out != res.out


def test_resume_after_sigkill_equals_uninterrupted(split):
    root, ref, _ = split
    args = train_args(root, ref, "--tokens", "60000", "--checkpoint-steps", "20")
    killed = run_subprocess(*args, env={"SAECTL_FAULTS": "train.checkpointed:3"})
    assert killed.code == -9, killed.err
    part = [a for a in store.list_artifacts(root, "train") if not a.is_complete()]
    assert len(part) == 1 and (part[0].path / "checkpoint.pt").exists()
    resumed = run_subprocess(*args)
    assert resumed.code == 0 and "resuming at step 60" in resumed.err, resumed.err
    a = store.open_complete(root, resumed.out.strip())
    weights = (store.sae_dir(a) / "sae_weights.safetensors").read_bytes()
    log = a.group()["log/loss"][:]
    store.remove(a)
    whole = run_subprocess(*args)
    assert whole.out == resumed.out
    b = store.open_complete(root, whole.out.strip())
    assert (store.sae_dir(b) / "sae_weights.safetensors").read_bytes() == weights
    assert np.array_equal(b.group()["log/loss"][:], log)
    assert not (b.path / "checkpoint.pt").exists()
    tried("train", "kill")

def test_divergence_stops_with_the_step(split, capsys):
    root, ref, _ = split
    res = run_cli(capsys, *train_args(root, ref, "--lr", "1e30", "--checkpoint-steps", "1"))
    assert_one_line_error(res, "diverged", "step")
    part = [a for a in store.list_artifacts(root, "train") if not a.is_complete()]
    assert len(part) == 1  # incomplete, its last good checkpoint kept
    state = torch.load(part[0].path / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["trainer"]["sae"].values())


def test_bad_input(split, capsys, tmp_path):
    root, ref, _ = split
    cases = [
        (["--k", "96"], ["--k 96", "width 96"]),
        (["--hook", "nope"], ["no hook", "h"]),
        (["--arch", "banana"], ["unknown --arch", "topk"]),
        (["--arch", "matryoshka", "--prefixes", "64,32,96"], ["prefixes"]),
        (["--prefixes", "a,b"], ["comma-separated"]),
        (["--batch-size", "0"], ["batch-size"]),
    ]
    for extra, needles in cases:
        assert_one_line_error(run_cli(capsys, *train_args(root, ref, *extra)), *needles)
    imp = store.list_artifacts(root, "import")[0]
    assert_one_line_error(run_cli(capsys, *train_args(root, imp.ref)), "train takes a shuffle")
    sh = store.resolve(root, ref)
    (sh.path / store.COMPLETE).rename(sh.path / "was-complete")
    assert_one_line_error(run_cli(capsys, *train_args(root, ref)), "incomplete")
    (sh.path / "was-complete").rename(sh.path / store.COMPLETE)
    # An SAE paired with activations of another width.
    res = run_cli(capsys, *train_args(root, ref, "--tokens", "2048"))
    sae = load_sae(store.sae_dir(store.resolve(root, res.out.strip())))
    with pytest.raises(ConfigError, match="d_in=32"):
        metrics.reconstruction(sae, [torch.zeros(4, 16)])


def test_downstream_scores_bracket_identity_and_zero(tiny_model_dirs, tiny_corpus, tmp_path):
    spec = models.resolve_model(str(tiny_model_dirs["llama"]))
    model = models.load_model(spec)
    hook = hooks.parse_hooks(model, ["resid_post.1"])[0]
    ids = [torch.randint(2, 300, (2, 16)) for _ in range(2)]
    ident = metrics.downstream(model, hook, lambda a: a, ids)
    assert ident["ce_loss_score"] == pytest.approx(1.0, abs=1e-6)
    assert ident["kl_score"] == pytest.approx(1.0, abs=1e-6)
    assert ident["delta_lm_loss"] == pytest.approx(0.0, abs=1e-6)
    zero = metrics.downstream(model, hook, torch.zeros_like, ids)
    assert zero["ce_loss_score"] == pytest.approx(0.0, abs=1e-6)
    assert zero["kl_score"] == pytest.approx(0.0, abs=1e-6)


def test_downstream_of_several_splices_shares_the_clean_and_zero_passes(tiny_model_dirs):
    """P splices at one site on the same batches: each gets the figures `downstream` gives it
    alone, bit for bit, from P + 2 forward passes a batch instead of 3P (issue 22)."""
    spec = models.resolve_model(str(tiny_model_dirs["llama"]))
    model = models.load_model(spec)
    hook = hooks.parse_hooks(model, ["resid_post.1"])[0]
    torch.manual_seed(0)
    ids = [torch.randint(2, 300, (2, 16)) for _ in range(3)]
    keep = [torch.rand(2, 16) < 0.2 for _ in range(3)]
    fns = {"ident": lambda a: a, "half": lambda a: 0.5 * a, "noisy": lambda a: a + 0.3}
    passes = []
    handle = model.register_forward_hook(lambda *_: passes.append(1))
    try:
        many = metrics.downstream_many(model, hook, fns, ids, passthrough=keep)
        assert len(passes) == len(ids) * (len(fns) + 2)
        passes.clear()
        alone = {k: metrics.downstream(model, hook, fn, ids, passthrough=keep)
                 for k, fn in fns.items()}
        assert len(passes) == len(ids) * 3 * len(fns)
    finally:
        handle.remove()
    assert many == alone
    assert many["ident"]["ce_loss_score"] == pytest.approx(1.0, abs=1e-6)
    assert 0 < many["half"]["ce_loss_score"] < 1 and many["half"] != many["noisy"]


def test_train_on_a_harvest_with_lm_eval(tiny_model_dirs, tiny_corpus, tmp_path, capsys):
    h = run_cli(capsys, "harvest", "--model", tiny_model_dirs["gpt_neox"], "--dataset",
                tiny_corpus, "--hooks", "resid_post.1", "--tokens", 64 * 16, "--context-size",
                16, "--store", tmp_path, "--device", "cpu")
    sh = run_cli(capsys, "shuffle", h.out.strip(), "--store", tmp_path, "--eval-fraction", "0.2")
    res = run_cli(capsys, "train", sh.out.strip(), "--store", tmp_path, "--arch", "relu",
                  "--expansion", "2", "--tokens", "4096", "--batch-size", "256",
                  "--lm-eval-seqs", "4", "--device", "cpu")
    assert res.code == 0, res.err
    s = store.open_complete(tmp_path, res.out.strip()).manifest()["summary"]
    for key in ("ce_loss_score", "kl_score", "delta_lm_loss", "ce_clean", "ce_zero"):
        assert np.isfinite(s[key]), key
    assert s["lm_eval_tokens"] == 4 * 15


class _Payload:
    """A pickle that writes a file when it is loaded: what someone with write access to a shared
    store could plant as a checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_planted_checkpoint_pickle_is_refused(split, capsys, tmp_path):
    root, ref, _ = split
    args = train_args(root, ref, "--tokens", "4096")
    cfg = build(train.STAGE.config, {"shuffle": ref, "store": str(root), "arch": "topk", "k": 3,
                                     "width": 96, "tokens": 4096, "batch_size": 512, "lr": 3e-3,
                                     "device": "cpu"})
    plan = train.STAGE.plan(cfg)
    with store.writing(plan.art, plan.params, plan.inputs):  # an incomplete train artifact
        pass
    ckpt = plan.art.path / "checkpoint.pt"
    marker = tmp_path / "payload-ran"
    pickle.loads(pickle.dumps(_Payload(marker)))  # the plant is real: loading it runs it
    assert marker.exists()
    marker.unlink()
    planted = [lambda: ckpt.write_bytes(pickle.dumps(_Payload(marker))),  # a bare pickle
               lambda: torch.save({"trainer": _Payload(marker), "log": {}, "window": {}}, ckpt)]
    for plant in planted:
        plant()
        res = run_cli(capsys, *args)
        assert_one_line_error(res, "refusing to resume", "checkpoint.pt", "rm ")
        assert not marker.exists()
        assert not plan.art.is_complete()
    # The error's advice: remove the checkpoint, and the SAE trains from scratch.
    ckpt.unlink()
    res = run_cli(capsys, *args)
    assert res.code == 0 and res.out.strip() == plan.art.ref, res.err
    assert "resuming" not in res.err and not marker.exists()
    tried("train", "planted file", len(planted))


def test_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoints.save(path, {"w": torch.ones(3)})
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace",
                        lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    checkpoints.save(path, {"w": torch.zeros(3)})
    assert events == ["fsync", "replace", "fsync"]  # the file, the rename, then the folder
    assert torch.equal(checkpoints.load(path, "cpu", ("w",))["w"], torch.zeros(3))

    def dies_midway(obj, f):
        f.write(b"PK half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save(path, {"w": torch.full((3,), 2.0)})
    assert torch.equal(checkpoints.load(path, "cpu", ("w",))["w"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temp file left
    tried("train", "kill")


def test_an_architecture_is_one_registered_class(split, capsys):
    """Adding an architecture is one file under saectl/sae/: here its class, registered in the
    test, trains through `saectl train` with nothing else changed."""
    root, ref, _ = split

    class ToySAE(SAE):
        saelens_architecture = "standard"
        unit_norm_decoder = False
        takes_k = True  # k is checked against the width, as for every architecture taking k

        def encode(self, x):
            return self.pre_acts(x).relu()

        def forward(self, x, *, dead_mask=None, auxk_coefficient=0.0, sparsity_scale=1.0):
            x = x.to(self.dtype)
            acts = self.encode(x)
            l1 = self.cfg.l1_coefficient * sparsity_scale * acts.sum(-1).mean()
            return self._finish(x, self.decode(acts), acts, {"l1_loss": l1})

    register("toy")(ToySAE)
    try:
        base = ["train", ref, "--store", root, "--arch", "toy", "--width", "64", "--tokens",
                "4096", "--batch-size", "512", "--l1", "0.1", "--device", "cpu"]
        assert_one_line_error(run_cli(capsys, *base, "--k", "64"), "--k 64", "width 64")
        res = run_cli(capsys, *base)
        assert res.code == 0, res.err
        art = store.open_complete(root, res.out.strip())
        assert art.manifest()["summary"]["arch"] == "toy"
        assert art.manifest()["params"]["sae"]["arch"] == "toy"
        assert isinstance(load_sae(store.sae_dir(art)), ToySAE)
    finally:
        del ARCHS["toy"]
