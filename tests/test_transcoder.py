"""Transcoders (issue 18): one harvest holds an MLP's input and output, the shuffle keeps them
aligned, and `saectl train --hook mlp_in.L --target mlp_out.L [--skip]` learns the MLP. A tiny
GPT-2 whose MLP is planted as an exact sparse dictionary is recovered; a skip transcoder's
W_skip learns a planted linear map; the replacement-model CE-loss score is 1 for the MLP itself
and 0 for nothing."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from saectl import hooks, metrics, models, store
from saectl.sae import SAEConfig, load_sae
from saectl.trainer import TrainConfig, Trainer
from tests.conftest import corpus_texts
from tests.helpers import assert_one_line_error, run_cli, tried

N_FEAT, D = 24, 32


def planted_gpt2(src, out, seed=0):
    """The tiny GPT-2 with block 1's MLP replaced by a sparse dictionary: hidden unit i fires
    (GELU ≈ ReLU far from 0) when mlp_in · e_i > 1.5 and writes 3 · f_i; the other units never
    fire. Returns the folder and the planted output directions f (N_FEAT, D)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    g = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(src)
    mlp = model.transformer.h[1].mlp
    e = torch.nn.functional.normalize(torch.randn(N_FEAT, D, generator=g), dim=1)
    f = torch.nn.functional.normalize(torch.randn(N_FEAT, D, generator=g), dim=1)
    with torch.no_grad():
        mlp.c_fc.weight.zero_()
        mlp.c_fc.bias.fill_(-30.0)
        mlp.c_fc.weight[:, :N_FEAT] = 8 * e.T  # Conv1D weights are (in, out)
        mlp.c_fc.bias[:N_FEAT] = -12.0
        mlp.c_proj.weight.zero_()
        mlp.c_proj.weight[:N_FEAT] = f / 2
        mlp.c_proj.bias.zero_()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out, f


@pytest.fixture(scope="module")
def planted(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("transcoder")
    model_dir, f = planted_gpt2(tiny_model_dirs["gpt2"], root / "planted")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts(400)))
    return root, model_dir, corpus, f


def _cli(capsys, *args):
    res = run_cli(capsys, *args)
    assert res.code == 0, res.err
    return res.out.strip()


def test_a_planted_sparse_mlp_is_recovered(planted, capsys):
    root, model_dir, corpus, f = planted
    common = ["--store", root, "--device", "cpu"]
    h = _cli(capsys, "harvest", "--model", model_dir, "--dataset", corpus, "--hooks",
             "mlp_in.1,mlp_out.1", "--tokens", 24000, "--context-size", 32, *common)
    sh = _cli(capsys, "shuffle", h, "--store", root)
    tc = _cli(capsys, "train", sh, "--hook", "mlp_in.1", "--target", "mlp_out.1", "--arch", "topk",
              "--k", "4", "--width", "48", "--tokens", 150_000, "--batch-size", 512, "--lr", "3e-3",
              "--lm-eval-seqs", "8", *common)
    art = store.open_complete(root, tc)
    s = art.manifest()["summary"]
    assert (s["hook"], s["target"], s["transcoder"]) == ("mlp_in.1", "mlp_out.1", True)
    W = torch.nn.functional.normalize(load_sae(store.sae_dir(art)).W_dec.detach(), dim=1)
    fired = _fired_features(root, h, f)
    best = (f[fired] @ W.T).max(1).values
    assert fired.sum() >= N_FEAT // 2, "the planted features must fire on this text"
    assert best.mean() > 0.9 and (best > 0.9).float().mean() >= 0.7, best
    # The planted MLP barely moves this random model's loss (zero-ablation costs nothing), so
    # the CE-loss score is ill-conditioned here; the KL divergence still tells.
    assert s["fvu"] < 0.5 and s["kl_sae"] < 0.6 * s["kl_zero"], s
    # An SAE on the MLP's output alone is the same artifact kind; a transcoder is addressed
    # apart from it (the target is in its address).
    sae = _cli(capsys, "train", sh, "--hook", "mlp_out.1", "--k", "4", "--width", "48",
               "--tokens", 20_000, "--batch-size", 512, "--no-lm-eval", *common)
    assert sae != tc and "target" not in store.open_complete(root, sae).manifest()["params"]


def _fired_features(root, h, f):
    """Which planted features the harvest's MLP outputs use (their directions appear)."""
    from saectl import arrays, layout

    y = torch.from_numpy(arrays.read(store.open_complete(root, h).group()[
        layout.acts("mlp_out.1")])[:4000])
    return ((y @ f.T) > 1.0).sum(0) > 10


def test_skip_transcoder_learns_a_planted_linear_map():
    """y = x A + sparse(x): W_skip finds A, the latents the sparse part."""
    g = torch.Generator().manual_seed(0)
    n = 8192
    x = torch.randn(n, D, generator=g)
    A = torch.randn(D, D, generator=g) / D ** 0.5
    dirs = torch.nn.functional.normalize(torch.randn(N_FEAT, D, generator=g), dim=1)
    codes = (x @ torch.nn.functional.normalize(torch.randn(D, N_FEAT, generator=g), dim=0)
             - 1.5).relu()
    y = x @ A + codes @ dirs
    cfg = SAEConfig(arch="topk", d_in=D, d_sae=48, k=4, transcoder=True, skip=True)
    trainer = Trainer(cfg, TrainConfig(total_steps=1500, lr=3e-3, lr_warmup_steps=50),
                      x[:4096], target_sample=y[:4096])
    for step in range(1500):
        rows = torch.randint(0, n, (512,), generator=g)
        trainer.step(x[rows], y[rows])
    sae = trainer.export()
    err = (sae.W_skip.detach() - A).norm() / A.norm()
    assert err < 0.15, float(err)
    with torch.no_grad():
        y_hat = metrics.output(sae, sae.encode(x), x)
    assert float((y - y_hat).square().sum() / (y - y.mean(0)).square().sum()) < 0.1


def test_replacement_ce_score_is_one_for_the_mlp_itself_and_zero_for_nothing(tiny_model_dirs):
    model = models.load_model(models.resolve_model(str(tiny_model_dirs["llama"])), "cpu")
    src, out = hooks.parse_hooks(model, ["mlp_in.1", "mlp_out.1"])
    mlp = copy.deepcopy(model.get_submodule(out.module))  # a copy: no hooks of its own
    ids = [torch.randint(2, 100, (2, 16), generator=torch.Generator().manual_seed(i))
           for i in range(2)]
    exact = metrics.downstream(model, out, lambda a: mlp(a), ids, 1, source=src)
    assert exact["ce_loss_score"] == pytest.approx(1.0, abs=1e-5)
    assert exact["kl_score"] == pytest.approx(1.0, abs=1e-5)
    zero = metrics.downstream(model, out, lambda a: torch.zeros_like(a), ids, 1, source=src)
    assert zero["ce_loss_score"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_transcoders_train_on_every_family(family, tiny_model_dirs, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts()))
    common = ["--store", tmp_path, "--device", "cpu"]
    h = _cli(capsys, "harvest", "--model", tiny_model_dirs[family], "--dataset", corpus,
             "--hooks", "mlp_in.2,mlp_out.2", "--tokens", 2048, "--context-size", 16, *common)
    sh = _cli(capsys, "shuffle", h, "--store", tmp_path)
    tc = _cli(capsys, "train", sh, "--hook", "mlp_in.2", "--target", "mlp_out.2", "--skip",
              "--arch", "jumprelu", "--width", "64", "--tokens", 8192, "--batch-size", 256,
              "--lm-eval-seqs", "4", *common)
    s = store.open_complete(tmp_path, tc).manifest()["summary"]
    assert np.isfinite(s["fvu"]) and np.isfinite(s["ce_loss_score"]) and s["target"] == "mlp_out.2"
    sae = load_sae(store.sae_dir(store.open_complete(tmp_path, tc)))
    assert sae.cfg.transcoder and sae.cfg.skip and sae.W_skip.abs().sum() > 0
    # Bad input: one line each, nothing trained.
    base = ["train", sh, "--store", tmp_path, "--device", "cpu"]
    assert_one_line_error(run_cli(capsys, *base, "--hook", "mlp_in.2", "--target", "mlp_out.1"),
                          "no target hook", "mlp_out.1", "harvest both hooks")
    assert_one_line_error(run_cli(capsys, *base, "--hook", "mlp_in.2", "--skip"),
                          "--skip", "--target")
    assert_one_line_error(run_cli(capsys, *base, "--hook", "mlp_in.2", "--target", "mlp_in.2"),
                          "--target", "itself")
    tried("train", "bad input", 3)


def test_eval_interpret_and_steer_take_a_transcoder(planted, capsys):
    """The eval stage measures a transcoder as train does (same figures on the same split),
    and on a harvest; interpret reads its input side; steer adds at its target hook."""
    root, model_dir, corpus, _ = planted
    common = ["--store", root, "--device", "cpu"]
    h = _cli(capsys, "harvest", "--model", model_dir, "--dataset", corpus, "--hooks",
             "mlp_in.1,mlp_out.1", "--tokens", 2048, "--context-size", 16, *common)
    sh = _cli(capsys, "shuffle", h, "--store", root, "--eval-fraction", "0.25")
    tc = _cli(capsys, "train", sh, "--hook", "mlp_in.1", "--target", "mlp_out.1", "--k", "4",
              "--width", "48", "--tokens", 8192, "--batch-size", 256, "--lm-eval-seqs", "4",
              *common)
    t = store.open_complete(root, tc).manifest()["summary"]
    ev = store.open_complete(root, _cli(capsys, "eval", tc, "--no-probe", "--lm-eval-seqs", "4",
                                        *common)).manifest()["summary"]
    for key in ("fvu", "l0", "ce_loss_score", "kl_score"):
        assert ev[key] == pytest.approx(t[key], rel=1e-6), key
    assert ev["target"] == "mlp_out.1"
    on_h = _cli(capsys, "eval", tc, "--harvest", h, "--no-probe", "--lm-eval-seqs", "2", *common)
    assert store.open_complete(root, on_h).manifest()["summary"]["n_tokens"] == 2048 // 16 * 15
    it = _cli(capsys, "interpret", tc, "--no-explain", "--top", "4", *common)
    assert store.open_complete(root, it).manifest()["summary"]["n_features"] == 48
    st = _cli(capsys, "steer", tc, "--feature", "0", "--prompt", "The", "--max-new-tokens", "3",
              *common)
    assert store.open_complete(root, st).manifest()["summary"]["hook"] == "mlp_out.1"
    clamp = run_cli(capsys, "steer", tc, "--feature", "0", "--prompt", "The", "--mode", "clamp",
                    *common)
    assert_one_line_error(clamp, "--mode add", "mlp_out.1")


def test_sweep_tabulates_transcoders_like_saes(planted, tmp_path, capsys):
    root, model_dir, corpus, _ = planted
    common = ["--store", root, "--device", "cpu"]
    h = _cli(capsys, "harvest", "--model", model_dir, "--dataset", corpus, "--hooks",
             "mlp_in.1,mlp_out.1", "--tokens", 2048, "--context-size", 16, *common)
    sh = _cli(capsys, "shuffle", h, "--store", root)
    grid = tmp_path / "grid.yaml"
    grid.write_text("hook: mlp_in.1\ntarget: mlp_out.1\nskip: [false, true]\nk: 4\nwidth: 32\n"
                    "tokens: 4096\nbatch_size: 256\nlm_eval: false\n")
    res = run_cli(capsys, "sweep", sh, "--grid", grid, "--store", root, "--tolerance", "0.9")
    assert res.code in (0, 1), res.err  # 1 only if no point meets the tolerance
    table = (store.list_artifacts(root, "sweep")[0].report_dir / "table.csv").read_text()
    assert "skip" in table.splitlines()[0] and len(table.splitlines()) == 3
