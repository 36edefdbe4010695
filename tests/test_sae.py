"""SAE architectures and the training core: feature recovery on synthetic data, the sparse
TopK kernels against their eager reference, exact resume, save/load, scale folding, configs.

Synthetic data: 256 random unit directions in d=64; each token activates each direction with
probability 4/256 with a coefficient in [0.5, 1.5], plus noise of std 0.01.
"""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys

import pytest
import torch

from saectl.errors import ConfigError, SaectlError
from saectl.initialization import geometric_median
from saectl.sae import ARCHS, SAEConfig, arch_names, kernels, load_sae, register
from saectl.sae.base import CFG_FILENAME, SAE, WEIGHTS_FILENAME
from saectl.trainer import TrainConfig, Trainer

D_IN, N_FEAT, WIDTH = 64, 256, 512


ONE_HOOK = sorted(a for a in ARCHS if not ARCHS[a].cross_layer)
"""The architectures that read one hook (the cross-layer transcoders read a layer range)."""


def build_sae_cfg(**overrides) -> SAEConfig:
    base = {"arch": "topk", "d_in": D_IN, "d_sae": WIDTH, "k": 4}
    return SAEConfig(**{**base, **overrides})


def build_train_cfg(**overrides) -> TrainConfig:
    base = {"total_steps": 600, "lr": 3e-3, "lr_warmup_steps": 50,
            "sparsity_warmup_steps": 120}
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def toy():
    """(true features (256, 64), tokens (32768, 64))."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(N_FEAT, D_IN, generator=g)
    feats /= feats.norm(dim=1, keepdim=True)
    n = 32768
    mask = torch.rand(n, N_FEAT, generator=g) < 4 / N_FEAT
    coef = torch.rand(n, N_FEAT, generator=g) + 0.5
    x = (mask * coef) @ feats + 0.01 * torch.randn(n, D_IN, generator=g)
    return feats, x


def batches(x: torch.Tensor, size: int):
    while True:
        yield from x.split(size)


def mean_max_cosine(feats: torch.Tensor, W_dec: torch.Tensor) -> float:
    W = W_dec / W_dec.norm(dim=1, keepdim=True)
    return (feats @ W.t()).max(dim=1).values.mean().item()


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return ((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


# -- every architecture learns the true features ------------------------------------------------

RECOVERY = {  # arch: (SAEConfig overrides, allowed eval L0 range)
    "topk": ({}, (3.5, 4.0)),
    "batchtopk": ({}, (3.0, 5.0)),
    "matryoshka": ({"matryoshka_prefixes": (64, 256, WIDTH)}, (3.0, 5.0)),
    "relu": ({"l1_coefficient": 5.0}, (2.0, 16.0)),
    "jumprelu": ({"l0_coefficient": 2.0}, (2.0, 16.0)),
    "gated": ({"l1_coefficient": 10.0}, (2.0, 16.0)),
}


def test_recovery_covers_every_architecture():
    # the cross-layer transcoders' recovery of planted features: tests/test_clt.py
    assert set(RECOVERY) == {a for a in arch_names() if not ARCHS[a].cross_layer}


@pytest.mark.parametrize("arch", sorted(RECOVERY))
def test_recovers_true_features(arch, toy):
    feats, x = toy
    overrides, (lo, hi) = RECOVERY[arch]
    trainer = Trainer(build_sae_cfg(arch=arch, **overrides), build_train_cfg(), x[:4096])
    data = batches(x[4096:], 512)
    for _ in range(trainer.cfg.total_steps):
        logs = trainer.step(next(data))
    assert logs["step"] == trainer.cfg.total_steps and logs["lr"] < 1e-4  # decayed
    assert {"loss", "mse", "l0", "fvu", "dead_fraction", "sparsity_scale"} <= logs.keys()
    sae = trainer.export()
    assert mean_max_cosine(feats, sae.W_dec.detach()) >= 0.9
    with torch.no_grad():
        acts = sae.encode(x[:4096])
        l0 = (acts > 0).sum(-1).float().mean().item()
        assert lo <= l0 <= hi, f"{arch} L0 {l0:.2f} outside [{lo}, {hi}]"
        assert fvu(x[:4096], sae.decode(acts)) < 0.6
    if sae.unit_norm_decoder:  # rows were unit norm in training units: 1/s once folded
        norms = trainer.sae.W_dec.detach().norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms))


# -- the sparse TopK kernels against the dense reference --------------------------------------


def _topk_grads(fn, params, x, k, dead_idx, k_aux):
    for p in params:
        p.grad = None
    x_hat, vals, idx, aux_hat = fn(x, *params, k, dead_idx, k_aux)
    loss = (x_hat - x).pow(2).sum(-1).mean() + 0.01 * vals.sum()
    if aux_hat.numel():
        loss = loss + (aux_hat - (x - x_hat).detach()).pow(2).sum(-1).mean()
    loss.backward()
    return x_hat.detach(), vals.detach(), idx, aux_hat.detach(), [p.grad for p in params]


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("n_dead", [0, 20, 40, 300])  # AuxK: none, dense (all, top-k), sparse
def test_fast_topk_matches_eager(bf16, n_dead):
    n, d, width, k = 700, 48, 1024, 12
    x = torch.randn(n, d) * 2
    W_dec = torch.randn(width, d)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    params = [torch.nn.Parameter(W_dec.clone().t()), torch.nn.Parameter(0.1 * torch.randn(width)),
              torch.nn.Parameter(W_dec.clone()), torch.nn.Parameter(0.1 * torch.randn(d))]
    dead_idx = torch.randperm(width)[:n_dead].sort().values if n_dead else None
    k_aux = d // 2 if n_dead else 0

    def fast(*args):
        return kernels.topk_autoencode(*args, bf16=bf16)

    got = _topk_grads(fast, params, x, k, dead_idx, k_aux)
    want = _topk_grads(kernels.topk_autoencode_eager, params, x, k, dead_idx, k_aux)
    assert torch.equal(got[2], want[2])  # same latents selected
    for a, b in zip(got[:2] + got[3:4], want[:2] + want[3:4]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for name, ga, gb in zip(["W_enc", "b_enc", "W_dec", "b_dec"], got[4], want[4]):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-4, msg=f"grad {name}")
    assert got[4][0].stride() == params[0].stride()  # W_enc's grad comes in its own layout


@pytest.mark.parametrize("shape,k", [((64, 4096), 40), ((33, 512), 12), ((8, 100), 7)])
def test_block_topk_selects_the_topk(shape, k):
    pre = torch.randn(*shape)
    got = kernels.block_topk_indices(pre, k).sort(dim=-1).values
    want = pre.topk(k, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(got, want)


def test_eager_switch_is_read_at_import():
    code = "from saectl.sae import kernels; print(kernels.FAST)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"SAECTL_EAGER": "1", "PATH": ""}, check=True)
    assert out.stdout.strip() == "False"


def test_topk_sae_eager_and_fast_train_alike(toy, monkeypatch):
    _, x = toy
    runs = []
    for fast in (True, False):
        monkeypatch.setattr(kernels, "FAST", fast)
        trainer = Trainer(build_sae_cfg(), build_train_cfg(total_steps=20), x[:2048])
        for batch in x[2048:2048 + 20 * 256].split(256):
            logs = trainer.step(batch)
        runs.append((logs, trainer.sae.W_dec.detach().clone()))
    assert runs[0][0]["loss"] == pytest.approx(runs[1][0]["loss"], rel=1e-3)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-3, atol=1e-4)


# -- exact resume ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_resume_is_exact(arch, toy):
    _, x = toy
    # a tiny dead window so AuxK and the dead-latent counters take part
    tcfg = build_train_cfg(total_steps=12, lr_warmup_steps=3, sparsity_warmup_steps=4,
                           dead_window_tokens=512)
    data = list(x[:12 * 128].split(128))
    kw = {}
    if not ARCHS[arch].cross_layer:
        scfg = build_sae_cfg(arch=arch, d_sae=256)
    else:  # a CLT over two layers: per-layer scales in the state too
        scfg = build_sae_cfg(arch=arch, d_sae=2048, n_layers=2, transcoder=True)  # some die
        data = [(b, b.flip(1) * 3) for b in data]
        kw = {"target_sample": x[-2048:].flip(1) * 3}
    step = (lambda t, b: t.step(*b)) if kw else (lambda t, b: t.step(b))
    straight = Trainer(scfg, tcfg, x[-2048:], **kw)
    logs = [step(straight, batch) for batch in data]
    if ARCHS[arch].uses_auxk:
        assert any(log.get("auxk_loss", 0) > 0 for log in logs)

    first = Trainer(scfg, tcfg, x[-2048:], **kw)
    for batch in data[:6]:
        step(first, batch)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    del first
    buf.seek(0)
    resumed = Trainer(scfg, tcfg, x[-2048:], **kw)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for batch in data[6:]:
        step(resumed, batch)

    assert resumed.step_count == straight.step_count == 12
    for (name, a), (_, b) in zip(straight.sae.state_dict().items(),
                                 resumed.sae.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(straight.tokens_since_fired, resumed.tokens_since_fired)
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for i in sa:
        for key in sa[i]:
            assert torch.equal(sa[i][key], sb[i][key]), (i, key)


def test_resume_refuses_another_config(toy):
    _, x = toy
    a = Trainer(build_sae_cfg(), build_train_cfg(total_steps=5), x[:1024])
    b = Trainer(build_sae_cfg(k=5), build_train_cfg(total_steps=5), x[:1024])
    with pytest.raises(ConfigError, match="another SAE config"):
        b.load_state_dict(a.state_dict())


# -- save / load / fold ----------------------------------------------------------------------

SAELENS_KEYS = {
    "relu": ("standard", {"W_enc", "b_enc", "W_dec", "b_dec"}),
    "topk": ("topk", {"W_enc", "b_enc", "W_dec", "b_dec"}),
    "batchtopk": ("jumprelu", {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}),
    "matryoshka": ("jumprelu", {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}),
    "jumprelu": ("jumprelu", {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}),
    "gated": ("gated", {"W_enc", "W_dec", "b_dec", "b_gate", "r_mag", "b_mag"}),
}


def _trained(arch: str, x: torch.Tensor, steps: int = 30) -> Trainer:
    trainer = Trainer(build_sae_cfg(arch=arch, d_sae=128),
                      build_train_cfg(total_steps=steps * 2, lr_warmup_steps=1), x[:2048])
    for batch in x[:steps * 256].split(256):
        trainer.step(batch)
    return trainer


@pytest.mark.parametrize("arch", ONE_HOOK)  # CLTs: tests/test_clt.py, test_interop_transcoder.py
def test_save_load_round_trip(arch, toy, tmp_path):
    from safetensors.torch import load_file

    _, x = toy
    sae = _trained(arch, x, steps=10).export()
    sae.save(tmp_path / "sae", sparsity=torch.full((128,), -2.0), metadata={"hook_name": "h"})
    cfg = json.loads((tmp_path / "sae" / CFG_FILENAME).read_text())
    saelens_arch, keys = SAELENS_KEYS[arch]
    assert cfg["architecture"] == saelens_arch and cfg["saectl"]["arch"] == arch
    assert (cfg["d_in"], cfg["d_sae"], cfg["metadata"]) == (D_IN, 128, {"hook_name": "h", "sae_lens_version": "6.0.0"})
    tensors = load_file(str(tmp_path / "sae" / WEIGHTS_FILENAME))
    assert set(tensors) == keys
    assert tensors["W_enc"].shape == (D_IN, 128) and tensors["W_dec"].shape == (128, D_IN)
    assert not list((tmp_path / "sae").glob(".*tmp"))

    loaded = load_sae(tmp_path / "sae")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x[:300]), sae.encode(x[:300]))
        torch.testing.assert_close(loaded(x[:300]).x_hat, sae(x[:300]).x_hat)
    assert isinstance(SAE.load(tmp_path / "sae"), ARCHS[arch])


def test_load_reports_missing_files(tmp_path):
    from saectl.errors import NotFoundError

    with pytest.raises(NotFoundError, match="cfg.json is missing"):
        load_sae(tmp_path)


@pytest.mark.parametrize("arch", ONE_HOOK)  # CLTs: tests/test_clt.py, test_interop_transcoder.py
def test_fold_input_scale_keeps_latents(arch, toy):
    _, x = toy
    trainer = _trained(arch, x * 7.0)  # raw activations far from norm √d
    s = trainer.input_scale
    assert (x[:2048] * 7.0 * s).norm(dim=1).mean().item() == pytest.approx(D_IN**0.5)
    raw = x[5000:5400] * 7.0
    model = trainer.sae.eval()  # training units: expects s·raw
    folded = trainer.export()  # raw units
    with torch.no_grad():
        want_acts = model.encode(raw * s)
        got_acts = folded.encode(raw)
        torch.testing.assert_close(got_acts, want_acts, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(folded.decode(got_acts), model.decode(want_acts) / s,
                                   rtol=1e-4, atol=1e-4)
        assert (want_acts > 0).any()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_sparse_encode_is_the_dense_encode(arch):
    """`encode_sparse` (the eval figures', the DL's) holds `encode`'s non-zero latents bit for
    bit, for every architecture (TopK's own never builds the dense block), and decoding them
    sparsely gives the dense decode."""
    cfg = build_sae_cfg(arch=arch, d_sae=96, k=6, **(
        {"n_layers": 2, "transcoder": True} if ARCHS[arch].cross_layer else {}))
    torch.manual_seed(0)
    sae = ARCHS[arch](cfg).eval()
    with torch.no_grad():
        for name in ("b_enc", "b_gate", "b_mag"):  # TopK: some of the top k ReLU'd to zero
            if hasattr(sae, name):
                getattr(sae, name).sub_(0.3)
        x = torch.randn(37, D_IN)
        dense, sparse = sae.encode(x), sae.encode_sparse(x)
        assert sparse.is_sparse and sparse.is_coalesced()
        assert torch.equal(sparse.to_dense(), dense)
        assert (sparse.values() != 0).all()
        assert 0 < sparse.values().numel() < dense.numel()
        torch.testing.assert_close(sae.decode(sparse), sae.decode(dense), rtol=1e-5, atol=1e-5)


def test_parallel_gradient_removed_in_blocks_as_at_once():
    """The decoder's gradient loses its component along each row, whatever the row count
    against the block size (300 = 2 blocks of 128 and a part)."""
    from saectl.trainer import remove_parallel_gradient

    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(300, 24), dim=1))
    W.grad = torch.randn(300, 24)
    want = W.grad - (W.grad * W).sum(1, keepdim=True) * W
    remove_parallel_gradient(W)
    torch.testing.assert_close(W.grad, want.detach(), rtol=1e-5, atol=1e-6)
    assert (W.grad * W).sum(1).abs().max() < 1e-5


def test_trainers_sharing_a_sample_share_its_geometric_median(toy):
    """A sweep's trainers share `b_dec_cache`: each starts exactly where it would alone, and a
    trainer whose inputs are scaled otherwise (normalize_inputs off) gets its own b_dec."""
    _, x = toy
    cache: dict = {}
    shared = [Trainer(build_sae_cfg(d_sae=w), build_train_cfg(normalize_inputs=n), x[:2048],
                      b_dec_cache=cache) for w, n in ((128, True), (256, True), (128, False))]
    alone = [Trainer(build_sae_cfg(d_sae=w), build_train_cfg(normalize_inputs=n), x[:2048])
             for w, n in ((128, True), (256, True), (128, False))]
    assert len(cache) == 2
    for a, b in zip(shared, alone):
        assert torch.equal(a.sae.b_dec, b.sae.b_dec)
        assert torch.equal(a.sae.W_dec, b.sae.W_dec)
    assert not torch.equal(shared[0].sae.b_dec, shared[2].sae.b_dec)


# -- configs and errors --------------------------------------------------------------------


@pytest.mark.parametrize("overrides,match", [
    ({"k": 64, "d_sae": 32}, "k=64 must be smaller than the width 32"),
    ({"arch": "batchtopk", "k": 32, "d_sae": 32}, "smaller than the width"),
    ({"arch": "nope"}, "unknown SAE architecture 'nope'"),
    ({"arch": "matryoshka", "matryoshka_prefixes": (128, 64, WIDTH)}, "strictly increasing"),
    ({"arch": "matryoshka", "matryoshka_prefixes": (64, 128)}, f"must end at the width {WIDTH}"),
    ({"d_in": 0}, "d_in=0 must be a positive integer"),
    ({"dtype": "int8"}, "dtype='int8' is not supported"),
])
def test_bad_sae_configs_raise_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match) as info:
        build_sae_cfg(**overrides)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("overrides,match", [
    ({"total_steps": 0}, "total_steps=0"),
    ({"lr": -1.0}, "lr=-1.0 must be a positive number"),
    ({"b_dec_init": "median"}, "b_dec_init='median' is unknown"),
    ({"lr_decay_fraction": 2.0}, "lr_decay_fraction"),
])
def test_bad_train_configs_raise_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match) as info:
        build_train_cfg(**overrides)
    assert "\n" not in str(info.value)


def test_matryoshka_default_prefixes():
    cfg = build_sae_cfg(arch="matryoshka")
    assert cfg.matryoshka_prefixes == (32, 128, WIDTH)
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg


def test_registry_refuses_duplicate_names():
    with pytest.raises(ValueError, match="already registered"):
        register("topk")(type("Other", (SAE,), {}))
    assert arch_names() == ["batchtopk", "clt", "gated", "jumprelu", "jumprelu-clt", "matryoshka",
                            "relu", "topk"]


def test_non_finite_loss_names_the_step(toy):
    _, x = toy
    trainer = Trainer(build_sae_cfg(), build_train_cfg(), x[:1024])
    trainer.step(x[:64])
    bad = x[:64].clone()
    bad[3, 5] = float("inf")
    with pytest.raises(SaectlError, match="at step 2;"):
        trainer.step(bad)


def test_schedules():
    cfg = build_train_cfg(total_steps=100, lr=1.0, lr_warmup_steps=10, lr_decay_fraction=0.2,
                          sparsity_warmup_steps=20)
    lrs = [cfg.lr_at(s, WIDTH) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[79] == 1.0
    assert lrs[80] == pytest.approx(1.0) and lrs[90] == pytest.approx(0.5)
    assert lrs[99] == pytest.approx(0.05) and cfg.lr_at(100, WIDTH) == 0.0
    assert cfg.sparsity_scale_at(0) == pytest.approx(0.05) and cfg.sparsity_scale_at(50) == 1.0
    assert TrainConfig().resolved_lr(2**14) == pytest.approx(2e-4)


def test_geometric_median_resists_outliers():
    pts = torch.randn(2000, 8) + 3.0
    pts[:200] += 1000.0
    gm = geometric_median(pts)
    assert (gm - 3.0).abs().max() < 0.3
    assert (pts.double().mean(0) - 3.0).abs().min() > 50


def test_forward_output_fields(toy):
    _, x = toy
    for arch in ("topk", "relu"):
        sae = ARCHS[arch](build_sae_cfg(arch=arch))
        out = sae(x[:100])
        assert out.x_hat.shape == (100, D_IN) and out.acts.shape == (100, WIDTH)
        assert out.losses["loss"].requires_grad and out.fired.shape == (WIDTH,)
        dense = out.acts.to_dense() if out.acts.is_sparse else out.acts
        assert out.l0.item() == pytest.approx((dense > 0).sum(-1).float().mean().item())
        copy.deepcopy(sae)
