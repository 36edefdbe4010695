"""import-sae: published SAEs in each tool's file layout, written here by hand from the layouts
those tools document, become SAE artifacts whose latents equal the tool's own formula on the
same activations; then every stage runs on one. (tests/test_interop.py checks the same against
the real SAELens, sparsify and TransformerLens.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from saectl import stage as contract
from saectl import store
from saectl.sae import load_sae
from stages import harvest
from tests.helpers import assert_one_line_error, run_cli, tried

D_IN, D_SAE, K = 32, 64, 5


@pytest.fixture(scope="module")
def acts(tiny_model_dirs, tmp_path_factory):
    """A tiny GPT-2's resid_post.1 (and mlp_out.1) harvested: the activations every SAE reads."""
    from tests.conftest import corpus_texts

    root = tmp_path_factory.mktemp("import_sae")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts()))
    h = contract.run(harvest.STAGE, harvest.STAGE.config(
        model=str(tiny_model_dirs["gpt2"]), dataset=str(corpus), hooks="resid_post.1",
        tokens=32 * 16, context_size=16, store=str(root), device="cpu")).ref
    from saectl import arrays, layout

    x = torch.from_numpy(arrays.read(store.open_complete(root, h).group()[
        layout.acts("resid_post.1")])[:256].astype(np.float32))
    return root, h, x


def weights(seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * scale  # noqa: E731
    return {"W_enc": r(D_IN, D_SAE), "b_enc": r(D_SAE), "W_dec": r(D_SAE, D_IN),
            "b_dec": r(D_IN), "threshold": r(D_SAE).abs()}


def topk(pre, k=K):
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals.relu())


def saelens_folder(path, arch, w, **cfg):
    path.mkdir()
    t = {n: w[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if arch == "jumprelu":
        t["threshold"] = w["threshold"]
    if arch == "gated":
        del t["b_enc"]
        t.update(b_gate=w["b_enc"], r_mag=w["threshold"] - 0.2, b_mag=w["b_enc"].flip(0))
    save_file({k: v.contiguous() for k, v in t.items()}, str(path / "sae_weights.safetensors"))
    body = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
            "apply_b_dec_to_input": True, "normalize_activations": "none",
            "metadata": {"model_name": "tiny", "hook_name": "blocks.1.hook_resid_post"}, **cfg}
    (path / "cfg.json").write_text(json.dumps(body))
    return path


def saelens_encode(x, arch, w, apply_b_dec=True, rescale=False, scale=1.0):
    x = x * scale
    x_in = x - w["b_dec"] / 1.0 * apply_b_dec
    if arch == "gated":
        enc = x_in @ w["W_enc"]
        gate = (enc + w["b_enc"]) > 0
        return gate * (enc * (w["threshold"] - 0.2).exp() + w["b_enc"].flip(0)).relu()
    pre = x_in @ w["W_enc"] + w["b_enc"]
    if rescale:
        pre = pre * w["W_dec"].norm(dim=-1)
    if arch == "topk":
        return topk(pre)
    if arch == "jumprelu":
        return pre.relu() * (pre > w["threshold"])
    return pre.relu()


def imported_latents(capsys, root, source, x, *flags):
    res = run_cli(capsys, "import-sae", source, "--store", root, *flags)
    assert res.code == 0, res.err
    ref = res.out.strip()
    art = store.open_complete(root, ref)
    with torch.no_grad():
        return ref, art, load_sae(store.sae_dir(art)).encode(x)


def close(a, b):
    scale = b.abs().max().clamp(min=1e-6)
    assert (a - b).abs().max() / scale < 1e-5, float((a - b).abs().max())


SAELENS_CASES = {
    "standard": ("standard", {}, {}),
    "topk": ("topk", {"k": K}, {}),
    "topk-rescaled": ("topk", {"k": K, "rescale_acts_by_decoder_norm": True}, {"rescale": True}),
    "jumprelu": ("jumprelu", {}, {}),
    "gated": ("gated", {}, {}),
    "no-b_dec-in": ("standard", {"apply_b_dec_to_input": False}, {"apply_b_dec": False}),
    "scaled": ("jumprelu", {"normalize_activations": "expected_average_only_in"}, {"scale": 2.5}),
}


@pytest.mark.parametrize("case", list(SAELENS_CASES))
def test_saelens_folders_encode_as_saelens_does(case, acts, tmp_path, capsys):
    root, _, x = acts
    arch, cfg, ref_kw = SAELENS_CASES[case]
    w = weights(seed=len(case))
    folder = saelens_folder(tmp_path / case, arch, w, **cfg)
    flags = ["--norm-scaling-factor", "2.5"] if case == "scaled" else []
    ref, art, z = imported_latents(capsys, root, folder, x, *flags)
    close(z, saelens_encode(x, arch, w, **ref_kw))
    s = art.manifest()["summary"]
    assert (s["hook"], s["d_in"], s["d_sae"], s["format"]) == ("resid_post.1", D_IN, D_SAE,
                                                               "saelens")
    assert (z > 0).float().sum(-1).mean() > 0  # the comparison is not of two zero matrices


def test_sparsify_dictionary_learning_and_gemma_scope(acts, tmp_path, capsys):
    root, _, x = acts
    w = weights(seed=7)
    # sparsify: one folder per hookpoint, named by HF module path.
    sp = tmp_path / "sparsify" / "layers.1"
    sp.mkdir(parents=True)
    save_file({"encoder.weight": w["W_enc"].T.contiguous(), "encoder.bias": w["b_enc"],
               "W_dec": w["W_dec"], "b_dec": w["b_dec"]}, str(sp / "sae.safetensors"))
    (sp / "cfg.json").write_text(json.dumps({"k": K, "num_latents": D_SAE, "d_in": D_IN,
                                             "activation": "topk", "expansion_factor": 2}))
    _, art, z = imported_latents(capsys, root, sp, x, "--model", "tiny")
    close(z, topk(((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()))
    assert art.manifest()["summary"]["hook"] == "resid_post.1"
    parent = run_cli(capsys, "import-sae", tmp_path / "sparsify", "--store", root)
    assert_one_line_error(parent, "several hookpoints", "layers.1")
    # dictionary_learning: ae.pt (a plain state dict) + config.json; each class its formula.
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    dl_cases = {
        "AutoEncoder": ({"encoder.weight": w["W_enc"].T, "encoder.bias": w["b_enc"],
                         "decoder.weight": w["W_dec"].T, "bias": w["b_dec"]},  # its from_pretrained
                        (pre * w["W_dec"].norm(dim=1)).relu()),               # normalises W_dec
        "AutoEncoderTopK": ({"encoder.weight": w["W_enc"].T, "encoder.bias": w["b_enc"],
                             "decoder.weight": w["W_dec"].T, "b_dec": w["b_dec"],
                             "k": torch.tensor(K), "threshold": torch.tensor(-1.0)},
                            topk(pre.relu())),
        "BatchTopKSAE": ({"encoder.weight": w["W_enc"].T, "encoder.bias": w["b_enc"],
                          "decoder.weight": w["W_dec"].T, "b_dec": w["b_dec"],
                          "k": torch.tensor(K), "threshold": torch.tensor(0.4)},
                         pre.relu() * (pre.relu() > 0.4)),
        "JumpReluAutoEncoder": ({n: w[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec",
                                                   "threshold")},
                                (x @ w["W_enc"] + w["b_enc"]).relu()
                                * ((x @ w["W_enc"] + w["b_enc"]) > w["threshold"])),
    }
    for cls, (state, want) in dl_cases.items():
        folder = tmp_path / cls
        folder.mkdir()
        torch.save({k: v.contiguous() for k, v in state.items()}, folder / "ae.pt")
        (folder / "config.json").write_text(json.dumps({"trainer": {
            "dict_class": cls, "activation_dim": D_IN, "dict_size": D_SAE, "k": K, "layer": 1,
            "lm_name": "tiny", "submodule_name": "resid_post_layer_1"}}))
        _, art, z = imported_latents(capsys, root, folder, x)
        close(z, want)
        assert art.manifest()["summary"]["hook"] == "resid_post.1", cls
    # Gemma Scope: params.npz, a JumpReLU whose input is not centred on b_dec.
    gs = tmp_path / "gemma-scope-2b-pt-res" / "layer_1" / "width_64" / "average_l0_5"
    gs.mkdir(parents=True)
    np.savez(gs / "params.npz", **{k: v.numpy() for k, v in w.items()})
    _, art, z = imported_latents(capsys, root, gs / "params.npz", x)
    pre = x @ w["W_enc"] + w["b_enc"]
    close(z, pre.relu() * (pre > w["threshold"]))
    assert art.manifest()["summary"]["hook"] == "resid_post.1"


def test_hub_location_is_pinned_to_its_commit(acts, tmp_path, capsys, monkeypatch):
    """hf://ORG/REPO/PATH through huggingface_hub, against a local hub cache (no hub here)."""
    import huggingface_hub.constants as constants

    from saectl import hub

    root, _, x = acts
    cache = tmp_path / "hub"
    repo = cache / "models--saectl-test--saes"
    w = weights(seed=3)
    for sha, bump in (("1" * 40, 0.0), ("2" * 40, 1.0)):  # two commits, other weights
        (repo / "snapshots" / sha).mkdir(parents=True)
        saelens_folder(repo / "snapshots" / sha / "res1", "standard",
                       {k: v + bump for k, v in w.items()})
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("1" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.resolve_revision.cache_clear()
    try:
        ref, art, z = imported_latents(capsys, root, "hf://saectl-test/saes/res1", x)
        close(z, saelens_encode(x, "standard", w))
        assert art.manifest()["params"]["source"]["revision"] == "1" * 40
        ref2, _, z2 = imported_latents(capsys, root, "hf://saectl-test/saes/res1@" + "2" * 40, x)
        assert ref2 != ref and not torch.allclose(z, z2)
        missing = run_cli(capsys, "import-sae", "hf://saectl-test/saes/nothing", "--store", root)
        assert_one_line_error(missing, "nothing")
    finally:
        hub.resolve_revision.cache_clear()


def test_every_stage_runs_on_an_imported_sae(acts, tiny_model_dirs, tmp_path, capsys):
    root, h, x = acts
    model = str(tiny_model_dirs["gpt2"])
    eye = torch.eye(D_IN)  # latents relu(x) and relu(-x): a perfect reconstruction
    w = {"W_enc": torch.cat([eye, -eye], 1), "b_enc": torch.zeros(D_SAE),
         "W_dec": torch.cat([eye, -eye], 0), "b_dec": torch.zeros(D_IN)}
    folder = saelens_folder(tmp_path / "sae", "standard", w)
    res = run_cli(capsys, "import-sae", folder, "--model", model, "--store", root)
    assert res.code == 0, res.err
    sae = res.out.strip()
    again = run_cli(capsys, "import-sae", folder, "--model", model, "--store", root)
    assert again.out == res.out and "cache hit" in again.err
    no_h = run_cli(capsys, "interpret", sae, "--store", root, "--device", "cpu")
    assert_one_line_error(no_h, "was imported", "--harvest")
    common = ["--store", root, "--device", "cpu"]
    it = run_cli(capsys, "interpret", sae, "--harvest", h, *common, "--top", "5", "--no-explain")
    assert it.code == 0, it.err
    ev = run_cli(capsys, "eval", sae, "--harvest", h, *common, "--no-probe", "--lm-eval-seqs", "2")
    assert ev.code == 0, ev.err
    s = store.open_complete(root, ev.out.strip()).manifest()["summary"]
    assert s["fvu"] < 1e-6 and s["dl"] is not None and s["ce_loss_score"] == pytest.approx(1, abs=1e-3)
    st = run_cli(capsys, "steer", sae, "--feature", "3", "--prompt", "The", *common,
                 "--max-new-tokens", "4")
    assert st.code == 0, st.err
    out = tmp_path / "exported"
    ex = run_cli(capsys, "export", sae, "--out", out, "--store", root)
    assert ex.code == 0, ex.err
    with torch.no_grad():
        close(load_sae(out).encode(x), load_sae(store.sae_dir(store.open_complete(root, sae)))
              .encode(x))
    shown = run_cli(capsys, "show", sae, "--store", root)
    assert "saelens" in shown.out and str(folder) in shown.out


def test_bad_input(acts, tiny_model_dirs, tmp_path, capsys):
    root, h, _ = acts
    (tmp_path / "empty").mkdir()
    res = run_cli(capsys, "import-sae", tmp_path / "empty", "--store", root)
    assert_one_line_error(res, "not a published SAE", "SAELens", "sparsify", "dictionary_learning",
                          "Gemma Scope")
    w = weights()
    bad = saelens_folder(tmp_path / "bad", "standard", w)
    cfg = json.loads((bad / "cfg.json").read_text())
    (bad / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 128}))
    res = run_cli(capsys, "import-sae", bad, "--store", root)
    assert_one_line_error(res, "d_sae=128", "64")
    ok = saelens_folder(tmp_path / "ok", "standard", w)
    res = run_cli(capsys, "import-sae", ok, "--hook", "blocks.1.attn.hook_z", "--store", root)
    assert_one_line_error(res, "cannot be mapped", "--hook")
    res = run_cli(capsys, "import-sae", ok, "--norm-scaling-factor", "-1", "--store", root)
    assert_one_line_error(res, "--norm-scaling-factor")
    # An SAE bound to one model, and a harvest of another (same width and hook).
    other = run_cli(capsys, "import-sae", ok, "--model", str(tiny_model_dirs["llama"]),
                    "--store", root)
    assert other.code == 0, other.err
    res = run_cli(capsys, "interpret", other.out.strip(), "--harvest", h, "--store", root,
                  "--device", "cpu")
    assert_one_line_error(res, "harvested from", "--model")
    assert store.list_artifacts(root, "interpret") == [] or all(
        a.is_complete() for a in store.list_artifacts(root, "interpret"))
    tried("import-sae", "bad input", 5)


def test_transformer_lens_centred_basis_is_folded_in(acts, tiny_model_dirs, tmp_path, capsys):
    """An SAE that records center_writing_weights saw x - mean(x): saectl's latents on raw HF
    activations are the SAE's on centred ones; eval measures the centred reconstruction."""
    root, h, x = acts
    w = weights(seed=5)
    kwargs = {"model_from_pretrained_kwargs": {"center_writing_weights": True}}
    folder = saelens_folder(tmp_path / "centred", "jumprelu", w)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"].update(kwargs)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    model = str(tiny_model_dirs["gpt2"])
    ref, art, z = imported_latents(capsys, root, folder, x, "--model", model)
    close(z, saelens_encode(x - x.mean(-1, keepdim=True), "jumprelu", w))
    assert art.manifest()["summary"]["basis"] == "center"
    _, _, raw = imported_latents(capsys, root, folder, x, "--model", model, "--activations", "hf")
    close(raw, saelens_encode(x, "jumprelu", w))
    no_model = run_cli(capsys, "import-sae", folder, "--store", root)  # "tiny" is on no hub here
    assert_one_line_error(no_model, "TransformerLens", "--model")


def test_eval_on_activations_leaves_out_massive_tokens_as_the_shuffle_does(tmp_path, capsys):
    """Eval on a harvest or import applies the shuffle's rule (norm > 5 × median) by default;
    0 keeps every token."""
    x = np.random.default_rng(0).normal(size=(2000, D_IN)).astype(np.float32)
    x[[3, 500, 999, 1500, 1999]] *= 100  # five massive-activation tokens
    np.save(tmp_path / "x.npy", x)
    root = tmp_path / "s"
    imp = run_cli(capsys, "import", tmp_path / "x.npy", "--hook", "resid_post.1", "--store", root)
    eye = torch.eye(D_IN)
    w = {"W_enc": torch.cat([eye, -eye], 1), "b_enc": torch.zeros(D_SAE),
         "W_dec": torch.cat([eye, -eye], 0) * 0.5, "b_dec": torch.zeros(D_IN)}
    sae = run_cli(capsys, "import-sae", saelens_folder(tmp_path / "sae", "standard", w),
                  "--store", root).out.strip()
    figures = {}
    for multiple in ("5", "0"):
        res = run_cli(capsys, "eval", sae, "--harvest", imp.out.strip(), "--store", root,
                      "--device", "cpu", "--max-activation-norm-multiple", multiple)
        assert res.code == 0, res.err
        figures[multiple] = store.open_complete(root, res.out.strip()).manifest()["summary"]
    assert figures["5"]["n_tokens"] == 1995 and figures["5"]["outliers_left_out"] == 5
    assert figures["0"]["n_tokens"] == 2000 and figures["0"]["outliers_left_out"] == 0
    # The top 0.1% of tokens (two of them) carry half the variance only while the five stay in.
    assert figures["0"]["top_variance_share"] > 0.3 > 0.05 > figures["5"]["top_variance_share"]
    bad = run_cli(capsys, "eval", sae, "--harvest", imp.out.strip(), "--store", root,
                  "--max-activation-norm-multiple", "0.5")
    assert_one_line_error(bad, "--max-activation-norm-multiple", "above 1")


SAELENS_PY = __import__("pathlib").Path(__file__).resolve().parents[1] / ".venv-saelens/bin/python"
REGISTRY = """
import json
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
i = get_pretrained_saes_directory()["gpt2-small-res-jb"]
print(json.dumps({"release": i.release, "repo_id": i.repo_id, "model": i.model,
                  "saes_map": {"blocks.1.hook_resid_pre": i.saes_map["blocks.1.hook_resid_pre"]},
                  "norm_scaling_factor": i.norm_scaling_factor,
                  "config_overrides": i.config_overrides}))
"""


@pytest.mark.skipif(not SAELENS_PY.exists(), reason=f"sae-lens is not installed at {SAELENS_PY} "
                    "(`make test` builds it)")
def test_saelens_release_names_resolve_through_its_registry(acts, tmp_path, capsys, monkeypatch):
    """saelens:RELEASE/ID: the real registry entry of gpt2-small-res-jb (read with the real
    sae_lens in its own environment) served to saectl's process, which has no sae_lens, and the
    release's files from a local hub cache (no hub here)."""
    import subprocess
    import sys

    import huggingface_hub.constants as constants

    from saectl import hub

    entry = json.loads(subprocess.run([str(SAELENS_PY), "-c", REGISTRY], capture_output=True,
                                      text=True, check=True).stdout)
    assert entry["config_overrides"]["model_from_pretrained_kwargs"] == {
        "center_writing_weights": True}  # what the release's own cfg.json leaves out
    pkg = tmp_path / "site" / "sae_lens" / "loading"
    pkg.mkdir(parents=True)
    (pkg.parent / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "pretrained_saes_directory.py").write_text(
        "from types import SimpleNamespace\n"
        f"ENTRY = {entry!r}\n"
        "def get_pretrained_saes_directory():\n"
        "    return {ENTRY['release']: SimpleNamespace(**ENTRY)}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in [m for m in sys.modules if m.startswith("sae_lens")]:
        monkeypatch.delitem(sys.modules, name)
    root, _, x = acts
    cache = tmp_path / "hub"
    snap = cache / f"models--{entry['repo_id'].replace('/', '--')}" / "snapshots" / ("3" * 40)
    snap.mkdir(parents=True)
    w = weights(seed=9)
    folder = saelens_folder(snap / entry["saes_map"]["blocks.1.hook_resid_pre"], "standard", w)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"] = {"model_name": "gpt2-small", "hook_name": "blocks.1.hook_resid_pre"}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("3" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.resolve_revision.cache_clear()
    try:
        # Centred by the registry's override, so the model must be at hand: "gpt2-small" is
        # TransformerLens's name of openai-community/gpt2, which is not in this hub cache.
        res = run_cli(capsys, "import-sae", "saelens:gpt2-small-res-jb/blocks.1.hook_resid_pre",
                      "--store", root)
        assert_one_line_error(res, "TransformerLens", "--model")
        _, art, z = imported_latents(capsys, root,
                                     "saelens:gpt2-small-res-jb/blocks.1.hook_resid_pre", x,
                                     "--activations", "hf")
        close(z, saelens_encode(x, "standard", w))
        m = art.manifest()
        assert m["params"]["source"]["saelens_release"] == "gpt2-small-res-jb"
        assert m["params"]["source"]["revision"] == "3" * 40
        assert (m["summary"]["hook"], m["summary"]["model"]) == ("resid_pre.1", "gpt2-small")
        missing = run_cli(capsys, "import-sae", "saelens:gpt2-small-res-jb/blocks.99.hook_z",
                          "--store", root)
        assert_one_line_error(missing, "no SAE", "blocks.99.hook_z")
    finally:
        hub.resolve_revision.cache_clear()
