"""Eval: the metrics on a tiny case against hand-computed values, k-sparse probing on a planted
latent, the stage end to end through the CLI (cached on the second run), and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saectl import metrics, probing, store
from saectl import stage as contract
from stages import harvest, shuffle, train
from tests.helpers import assert_one_line_error, run_cli, tried


class Halving:
    """A 2-in, 4-latent 'SAE' with x̂ = x / 2: latents relu(±x) / 2, decoder [I; −I]."""

    d_in, d_sae, device = 2, 4, torch.device("cpu")

    def encode(self, x):
        return torch.cat([x, -x], -1).relu() / 2

    def decode(self, a):
        return a[:, :2] - a[:, 2:]


X = torch.tensor([[2.0, 0.0], [0.0, 2.0], [4.0, 4.0], [-2.0, 2.0]])


def test_metrics_equal_hand_computed_values():
    fig, log_density = metrics.reconstruction(Halving(), lambda: iter([X[:2], X[2:]]))
    # x̄ = (1, 2); ‖x − x̂‖² = ‖x‖²/4 = 1, 1, 8, 2 (Σ 12); ‖x − x̄‖² = 5, 1, 13, 9 (Σ 28)
    assert fig["n_tokens"] == 4
    assert fig["mse"] == pytest.approx(12 / 8)
    assert fig["fvu"] == pytest.approx(12 / 28)
    assert fig["explained_variance"] == pytest.approx(1 - 12 / 28)
    assert fig["explained_variance_per_token"] == pytest.approx(
        ((1 - 1 / 5) + (1 - 1 / 1) + (1 - 8 / 13) + (1 - 2 / 9)) / 4)
    assert fig["worst_error_share"] == pytest.approx(8 / 12)  # ⌈0.1% of 4⌉ = 1 token
    assert fig["top_variance_share"] == pytest.approx(13 / 28)
    assert fig["cossim"] == pytest.approx(1.0)
    assert fig["l2_ratio"] == pytest.approx(0.5)
    assert fig["relative_reconstruction_bias"] == pytest.approx(0.5)  # Σ‖x̂‖² / Σ⟨x, x̂⟩
    # latents fire: 0 on A, C; 1 on B, C, D; 2 on D; 3 never
    assert fig["l0"] == pytest.approx(6 / 4)
    assert fig["dead_fraction"] == pytest.approx(1 / 4)
    assert fig["dense_fraction"] == pytest.approx(3 / 4)
    assert np.allclose(log_density[:3], np.log10([2 / 4, 3 / 4, 1 / 4]))
    # A one-shot iterable takes each batch's own mean, as SAEBench does: here x̄ = (1, 1) for the
    # first batch, so ‖x − x̄‖² = 2, 2 and the per-token figure moves; the rest does not.
    once, _ = metrics.reconstruction(Halving(), [X[:2], X[2:]])
    assert once["explained_variance_per_token"] == pytest.approx(
        ((1 - 1 / 2) + (1 - 1 / 2) + (1 - 8 / 10) + (1 - 2 / 10)) / 4)
    assert once["fvu"] == pytest.approx(fig["fvu"])


def test_worst_share_names_the_few_tokens_that_carry_the_error():
    err = np.ones(10_000)
    err[:10] = 9_990.0  # 0.1% of the tokens carry 99.9% of the squared error
    assert metrics.top_share(err) == pytest.approx(9_990 * 10 / (9_990 * 10 + 9_990))
    assert metrics.top_share(np.ones(2000)) == pytest.approx(2 / 2000)


def planted(n_per_class=400, d_sae=300, d=16, seed=0):
    """Latent 7 is the label of class 'a' exactly; every other latent and dimension is noise."""
    rng = np.random.default_rng(seed)
    labels = np.array(["a"] * n_per_class + ["b"] * n_per_class)
    lat = torch.from_numpy(rng.random((len(labels), d_sae))).float()
    lat[:, 7] = torch.from_numpy((labels == "a").astype(np.float32))
    acts = torch.from_numpy(rng.standard_normal((len(labels), d))).float()
    train_mask = rng.random(len(labels)) < 0.8
    return probing.Split(lat, acts, labels, train_mask)


def test_k_sparse_probing_finds_a_planted_latent_and_random_latents_do_not():
    res = probing.sparse_probing(planted())
    assert res["k"] == [1, 2, 5, 10, 20, 50]
    for task in res["tasks"].values():
        assert task["latents"]["1"] == [7]
        assert task["sae_top_k"]["1"] == 1.0
    assert res["sae_top_k"]["1"] == 1.0
    assert abs(res["random_k"]["1"] - 0.5) < 0.1  # chance, as the noise latents are
    assert abs(res["model_full"] - 0.5) < 0.1  # the 'model' here is pure noise


def test_logistic_regression_agrees_with_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    X = rng.standard_normal((300, 20)) * np.logspace(-2, 3, 20)  # scales far apart
    y = (X[:, 3] / 1e-1 + X[:, 10] / 30 + rng.standard_normal(300) > 0).astype(np.int64)
    Z = (X - X.mean(0)) / X.std(0)
    ours = probing.fit_logistic(torch.from_numpy(X), torch.from_numpy(y))(torch.from_numpy(X))
    theirs = LogisticRegression(C=1.0, max_iter=1000).fit(Z, y).predict(Z)
    assert (ours.numpy() == theirs).mean() >= 0.99


def test_one_vs_rest_draws_negatives_evenly():
    labels = np.array(["a"] * 12 + ["b"] * 30 + ["c"] * 30)
    rows, target = probing.one_vs_rest(labels, "a", np.random.default_rng(0))
    assert target.sum() == 12 and len(rows) == 24
    negs = labels[rows[target == 0]]
    assert (negs == "b").sum() == 6 and (negs == "c").sum() == 6


# ---------------------------------------------------------------- the stage


def _run(st, **kw):
    return contract.run(st.STAGE, st.STAGE.config(device="cpu", **kw)).ref


@pytest.fixture(scope="module")
def trained(tiny_model_dirs, tmp_path_factory):
    """A tiny GPT-NeoX's resid_post.1 harvested, shuffled, and one small SAE trained."""
    from tests.conftest import corpus_texts

    root = tmp_path_factory.mktemp("eval_store")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts()))
    h = _run(harvest, model=str(tiny_model_dirs["gpt_neox"]), dataset=str(corpus),
             hooks="resid_post.1", tokens=64 * 16, context_size=16, store=str(root))
    sh = contract.run(shuffle.STAGE, shuffle.STAGE.config(harvest=h, store=str(root),
                                                          eval_fraction=0.2)).ref
    sae = _run(train, shuffle=sh, store=str(root), arch="topk", k=4, expansion=2.0,
               tokens=4096, batch_size=256, lm_eval_seqs=4)
    return root, h, sh, sae


def probe_file(path, classes=("sports", "music", "food"), n=12, column="label"):
    words = {"sports": "The team won the match and the cup",
             "music": "The band played a song on the guitar",
             "food": "The cook baked bread with butter and salt"}
    rows = [{"text": f"{words[c]} number {i}.", column: c} for c in classes for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_end_to_end_and_cached(trained, tmp_path, capsys):
    root, h, sh, sae = trained
    probes = probe_file(tmp_path / "probe.jsonl")
    args = ["eval", sae, "--store", root, "--device", "cpu", "--probe-data", probes,
            "--lm-eval-seqs", "4", "--tolerance", "0.9"]
    res = run_cli(capsys, *args)
    assert res.code == 0, res.err
    ref = res.out.strip()
    assert ref.startswith("eval/") and "k-sparse probing" in res.err
    art = store.open_complete(root, ref)
    s = art.manifest()["summary"]
    t = store.open_complete(root, sae).manifest()["summary"]
    assert s["data"] == sh and s["n_tokens"] == t["n_tokens"]
    for key in ("mse", "fvu", "cossim", "l2_ratio", "l0", "dead_fraction", "ce_loss_score",
                "explained_variance_per_token", "worst_error_share",
                "relative_reconstruction_bias"):  # train's own figures, on the same tokens
        assert s[key] == pytest.approx(t[key], rel=1e-6), key
    for key in ("kl_score", "dl"):
        assert s[key] is not None and np.isfinite(s[key]), key
    p = s["probing"]
    assert p["class_counts"] == {"food": 12, "music": 12, "sports": 12}
    assert set(p["tasks"]) == {"food", "music", "sports"} and p["k"] == [1, 2, 5, 10, 20, 50]
    assert all(0 <= v <= 1 for v in p["sae_top_k"].values())
    assert (art.report_dir / "probe_k.png").stat().st_size > 0
    again = run_cli(capsys, *args)
    assert again.out == res.out and "cache hit" in again.err
    # The same SAE on its harvest (all tokens but BOS): another artifact, more tokens.
    on_h = run_cli(capsys, "eval", sae, "--harvest", h, "--store", root, "--device", "cpu",
                   "--no-probe", "--lm-eval-seqs", "2")
    assert on_h.code == 0, on_h.err
    sh_ = store.open_complete(root, on_h.out.strip()).manifest()["summary"]
    assert sh_["data"] == h and sh_["n_tokens"] == 64 * 15 and sh_["probing"] is None


def test_eval_default_probe_task_is_the_packaged_topics(trained, capsys):
    root, _, _, sae = trained
    res = run_cli(capsys, "eval", sae, "--store", root, "--device", "cpu", "--probe-texts",
                  "10", "--probe-context", "32", "--no-lm-eval")
    assert res.code == 0, res.err
    p = store.open_complete(root, res.out.strip()).manifest()["summary"]["probing"]
    assert p["label_column"] == "topic" and len(p["tasks"]) == 11
    assert "Uncategorized" not in p["tasks"] and p["class_counts"]["Mathematics"] == 256


def test_bad_input(trained, tiny_model_dirs, tmp_path, capsys):
    root, _, _, sae = trained
    base = ["eval", sae, "--store", root, "--device", "cpu", "--no-lm-eval"]
    res = run_cli(capsys, *base, "--probe-data", probe_file(tmp_path / "a.jsonl", column="y"))
    assert_one_line_error(res, "no column 'label'", "--label-column")
    res = run_cli(capsys, *base, "--probe-data", probe_file(tmp_path / "b.jsonl", ("music",)))
    assert_one_line_error(res, "1 class", "at least two")
    res = run_cli(capsys, *base, "--probe-data", probe_file(tmp_path / "c.jsonl", n=3))
    assert_one_line_error(res, "too few texts", "at least 10")
    # A harvest of another model (same width and hook), and one of another hook.
    other = _run(harvest, model=str(tiny_model_dirs["llama"]),
                 dataset=str(root / "corpus.jsonl"), hooks="resid_post.1", tokens=64 * 4,
                 context_size=16, store=str(root))
    res = run_cli(capsys, *base, "--harvest", other)
    assert_one_line_error(res, "another model")
    hook0 = _run(harvest, model=str(tiny_model_dirs["gpt_neox"]),
                 dataset=str(root / "corpus.jsonl"), hooks="resid_post.0", tokens=64 * 4,
                 context_size=16, store=str(root))
    res = run_cli(capsys, *base, "--harvest", hook0)
    assert_one_line_error(res, "no activations at resid_post.1")
    assert not store.list_artifacts(root, "eval") or all(
        a.is_complete() for a in store.list_artifacts(root, "eval"))
    tried("eval", "bad input", 5)
