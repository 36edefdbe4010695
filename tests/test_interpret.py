"""Interpret stage: streaming statistics equal a full computation, a planted feature is found
(its token's contexts on top, its token first in the logit lens), explanations over a live
local HTTP server with caching and a failing endpoint (detection and fuzzing), the dashboard in
Chromium, bad input."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil

import numpy as np
import pytest
import torch

from saectl import store
from saectl.errors import ConfigError
from saectl.fuzzing import FUZZ_SYSTEM
from saectl.sae import load_sae
from saectl.scan import HIST_EDGES, NO_SEQ, hash_keys, scan, windows
from stages import interpret
from tests.helpers import assert_one_line_error, run_cli
from tests.test_dashboard import devtools, needs_chromium  # noqa: F401  (a fixture)
from tests.test_explain import keyword_model, serve

# ------------------------------------------------------------------- the scan, on its own


def _blocks(x: torch.Tensor, per: int):
    for lo in range(0, x.shape[0], per):
        yield lo, x[lo:lo + per]


def _sparse_acts(n_seq=37, C=9, n_f=13, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n_seq, C, n_f, generator=g) * 5
    a[torch.rand(n_seq, C, n_f, generator=g) < 0.8] = 0  # sparse, with whole silent sequences
    a[:, :, 3] = 0  # a dead feature
    return a


@pytest.mark.parametrize("subset", [False, True])
def test_scan_of_a_topk_sae_kept_sparse_equals_the_dense_encode(subset):
    """`latents` (interpret's encode of a TopK SAE, issue 22) gives the scan the same numbers,
    bit for bit, as the SAE's dense encode, for every latent or a chosen few."""
    from saectl.sae import ARCHS, SAEConfig
    from saectl.scan import latents

    torch.manual_seed(0)
    sae = ARCHS["topk"](SAEConfig(arch="topk", d_in=16, d_sae=96, k=6)).eval()
    sae.b_enc.data -= 0.3  # some of the top k negative: ReLU'd to zero, not counted as firing
    x = torch.randn(21, 7, 16)
    feats = np.sort(np.random.default_rng(1).choice(96, 40, replace=False)) if subset \
        else np.arange(96)
    sparse = latents(sae, feats)
    assert sparse is not None
    cols = torch.from_numpy(feats)

    def dense(v):
        with torch.inference_mode():
            return sae.encode(v)[:, cols]

    def kept_sparse(v):
        with torch.inference_mode():
            return sparse(v)

    a = scan(_blocks(x, 4), dense, feats, top=5, pool=6, seed=3, skip_first=True)
    b = scan(_blocks(x, 4), kept_sparse, feats, top=5, pool=6, seed=3, skip_first=True)
    assert a.fired.sum() > 0
    for name in a.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


@pytest.mark.parametrize("per, merge_every", [(1, 1), (4, 5), (37, 64), (3, 64)])
def test_scan_incremental_equals_full_computation(per, merge_every, monkeypatch):
    monkeypatch.setattr("saectl.scan.MERGE_EVERY", merge_every)
    a = _sparse_acts()
    n_seq, C, n_f = a.shape
    feats = np.arange(100, 100 + n_f)
    st = scan(_blocks(a, per), lambda x: x, feats, top=5, pool=6, seed=3, skip_first=True)
    b = a.clone()
    b[:, 0] = 0
    assert st.n_tokens == n_seq * (C - 1)
    np.testing.assert_array_equal(st.fired, (b > 0).sum((0, 1)).numpy())
    np.testing.assert_allclose(st.act_sum, b.sum((0, 1)).double().numpy(), rtol=1e-6)
    np.testing.assert_array_equal(st.max_act, b.amax((0, 1)).numpy())
    assert (st.hist.sum(1) == st.fired).all()
    v = b[:, :, 0][b[:, :, 0] > 0].numpy()
    want, _ = np.histogram(np.clip(np.log10(v), HIST_EDGES[0], HIST_EDGES[-1] - 1e-9), HIST_EDGES)
    np.testing.assert_array_equal(st.hist[0], want)
    m, pos = b.max(1)
    for f in range(n_f):
        # Full sort of sequences by (max activation desc, sequence asc).
        order = sorted(range(n_seq), key=lambda s: (-float(m[s, f]), s))
        order = [s for s in order if m[s, f] > 0][:5]
        got = [s for s in st.top_seq[f] if s != NO_SEQ]
        assert got == order, f
        np.testing.assert_array_equal(st.top_act[f][:len(order)], m[order, f].numpy())
        np.testing.assert_array_equal(st.top_pos[f][:len(order)], pos[order, f].numpy())
        # The pool: the 6 firing sequences of least hash key.
        firing = [s for s in range(n_seq) if m[s, f] > 0]
        keys = hash_keys(3, np.array(firing, dtype=np.int64), np.array([feats[f]]))[:, 0]
        want_pool = [firing[i] for i in np.argsort(keys)[:6]]
        assert [s for s in st.pool_seq[f] if s != NO_SEQ] == want_pool
    assert (st.top_seq[3] == NO_SEQ).all() and st.fired[3] == 0


def test_windows_reads_only_what_is_asked():
    a = _sparse_acts(n_seq=20, C=9, n_f=5)
    seq = np.array([7, 0, 19, 7, 3])
    start = np.array([2, 0, 5, 0, 1])
    feat = np.array([1, 4, 2, 0, 3])
    reads = []

    def read(lo, hi):
        reads.append((lo, hi))
        return a[lo:hi]

    out = windows(read, lambda x: x, seq, start, feat, 4, seqs_per_block=8, n_seq=20)
    for r in range(len(seq)):
        np.testing.assert_array_equal(out[r], a[seq[r], start[r]:start[r] + 4, feat[r]].numpy())
    assert reads == [(0, 8), (16, 20)]  # block 8-15 holds no requested sequence


def test_example_kinds_keep_their_stored_numbers():
    """`windows/kind` of existing artifacts holds 0-3: the enum must read them the same."""
    from saectl.examples import Kind

    assert [(k.name, int(k)) for k in Kind] == [("TOP", 0), ("QUANTILE", 1), ("POSITIVE", 2),
                                                ("NEGATIVE", 3)]


def test_keep_drops_firing_negatives_then_caps_each_feature():
    from saectl.examples import Kind, Requests, keep

    K = Kind
    rows = [(0, K.TOP, -1, 1, 0), (0, K.NEGATIVE, -1, 2, 0), (0, K.NEGATIVE, -1, 3, 0),
            (0, K.NEGATIVE, -1, 4, 0), (0, K.NEGATIVE, -1, 5, 0), (1, K.NEGATIVE, -1, 6, 0),
            (1, K.POSITIVE, -1, 7, 0)]
    acts = np.zeros((len(rows), 3), np.float32)
    acts[0, 1] = acts[6, 0] = 1.0  # activating kinds fire, as they should
    acts[2, 2] = 0.5  # a "non-activating" context that fires somewhere: dropped
    kept = keep(Requests.from_rows(rows), acts, detection=2)
    assert kept.tolist() == [True, True, False, True, False, True, True]


def test_window_placement():
    from saectl.examples import Placement

    p = Placement(context_size=32, width=8, skip_first=True)
    assert [p.start(pos) for pos in (0, 1, 10, 31)] == [1, 1, 4, 24]
    assert Placement(32, 1, True).start(7) == 7  # imported rows: the row itself


# ------------------------------------------------------------------- a planted feature


def _cli(*args) -> str:
    """The real CLI in-process (module-scoped fixtures have no capsys): its stdout."""
    from saectl.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            assert not e.code, f"saectl {' '.join(map(str, args))} failed"
    return out.getvalue().strip()


@pytest.fixture(scope="module")
def planted(tiny_model_dirs, tmp_path_factory):
    """A tiny GPT-NeoX with tied embeddings, harvested at resid_pre.0 (= the token embedding),
    and a trained ReLU SAE whose feature 5 is then planted: it reads and writes the direction
    of one frequent token's embedding and fires exactly where that token is."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import corpus_texts

    root = tmp_path_factory.mktemp("interpret")
    model_dir = root / "tied_neox"
    shutil.copytree(tiny_model_dirs["gpt_neox"], model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight.copy_(model.get_input_embeddings().weight)
    model.save_pretrained(model_dir)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts(300)))
    st = ["--store", root / "store"]
    h = _cli("harvest", "--model", model_dir, "--dataset", corpus, "--hooks", "resid_pre.0",
             "--tokens", "4096", "--context-size", "32", "--dtype", "float32", "--device", "cpu", *st)
    s = _cli("shuffle", h, *st)
    t = _cli("train", s, "--arch", "relu", "--width", "64", "--tokens", "8192", "--batch-size",
             "512", "--no-lm-eval", "--device", "cpu", *st)
    art = store.open_complete(root / "store", t)
    tokens = np.asarray(store.open_complete(root / "store", h).group()["tokens"][:])
    ids, counts = np.unique(tokens[:, 1:], return_counts=True)
    freq = counts / tokens[:, 1:].size
    token = int(ids[np.argmin(np.abs(freq - 0.03))])  # a token on ~3% of positions
    E = model.get_input_embeddings().weight.detach()
    u = E[token] / E[token].norm()
    sae = load_sae(store.sae_dir(art))
    with torch.no_grad():
        sae.W_dec[5] = u
        sae.W_enc[:, 5] = u / E[token].norm()
        sae.b_enc[5] = -0.8 + float(sae.b_dec @ sae.W_enc[:, 5])  # 0.2 at the token, < 0 elsewhere
    sae.save(store.sae_dir(art))
    return {"root": root / "store", "sae": t, "harvest": h, "token": token, "tokens": tokens,
            "model_dir": model_dir, "corpus": corpus}


def _interpret(p, *extra):
    return ["interpret", p["sae"], "--store", p["root"], "--device", "cpu", *extra]


def test_planted_feature_is_found(planted, capsys):
    res = run_cli(capsys, *_interpret(planted, "--no-explain", "--top", "8"))
    assert res.code == 0, res.err
    art = store.open_complete(planted["root"], res.out.strip())
    g = art.group()
    feats = list(g["features"][:])
    assert feats == list(range(64))
    j, T, tokens = 5, planted["token"], planted["tokens"]
    # Density is exactly the token's frequency (BOS positions excluded).
    assert g["stats/fired"][j] == int((tokens[:, 1:] == T).sum())
    assert g.attrs["n_tokens"] == tokens[:, 1:].size
    # Every top context fires on the planted token, at the position it reports.
    top_seq, top_pos = g["top/seq"][j], g["top/pos"][j]
    assert (top_seq != NO_SEQ).sum() == 8
    for s, p in zip(top_seq, top_pos):
        assert tokens[s, p] == T
    # The logit lens ranks the token first (tied embeddings, decoder = its direction).
    assert g["lens/pos_ids"][j][0] == T
    # The example windows shade exactly the token.
    kinds, slots = g["windows/kind"][:], g["windows/slot"][:]
    mine = (slots == j) & (kinds == 0)
    toks, acts = g["windows/tokens"][:][mine], g["windows/acts"][:][mine]
    assert ((acts > 0) == (toks == T)).all()
    neg = (slots == j) & (kinds == 3)
    assert neg.sum() >= 5 and (g["windows/acts"][:][neg] == 0).all()
    s = art.manifest()["summary"]
    assert s["n_features"] == 64 and s["n_explained"] == 0 and s["n_tokens"] == tokens[:, 1:].size
    page = art.path / "report" / "index.html"
    data = _embedded(page)
    f5 = data["features"][5]
    assert f5["index"] == 5 and len(f5["top"]) == 8 and f5["logits_pos"][0][0] == _decode(
        planted, T)
    assert sum(f5["hist"]["counts"]) == g["stats/fired"][j]
    # A re-run is a cache hit; a feature subset is its own artifact with the same figures.
    again = run_cli(capsys, *_interpret(planted, "--no-explain", "--top", "8"))
    assert again.out == res.out and "cache hit" in again.err
    sub = run_cli(capsys, *_interpret(planted, "--no-explain", "--top", "8", "--features", "3-5"))
    gs = store.open_complete(planted["root"], sub.out.strip()).group()
    assert list(gs["features"][:]) == [3, 4, 5]
    np.testing.assert_array_equal(gs["top/seq"][2], top_seq)
    np.testing.assert_array_equal(gs["stats/hist"][2], g["stats/hist"][j])


def _decode(p, token: int) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(p["model_dir"]).decode([token])


def _embedded(page) -> dict:
    from tests.test_dashboard import read_embedded

    return read_embedded(page)


def test_explanations_over_http_are_cached_and_survive_a_failing_endpoint(planted, capsys):
    state = {"fail": True}

    def answer(body, n):
        if state["fail"] and n > 3:  # a few answers arrive, then the endpoint breaks
            return 503, {"error": "overloaded"}
        return keyword_model(body, n)

    with serve(answer) as (url, requests):
        args = _interpret(planted, "--features", "0-15", "--explainer", url,
                          "--explainer-model", "kw", "--explain-max", "6", "--detection", "6")
        res = run_cli(capsys, *args)
        assert_one_line_error(res, "HTTP 503", "left unexplained", "re-run")
        art = store.resolve(planted["root"], "interpret/" + res.err.split("interpret/")[1][:8])
        assert not art.is_complete()
        assert (art.path / "report" / "index.html").is_file()  # stats and dashboard were written
        asked = len(requests)
        state["fail"] = False
        ok = run_cli(capsys, *args)
        assert ok.code == 0, ok.err
        assert "scanning" not in ok.err  # the scan was kept
        assert len(requests) > asked
        done = store.open_complete(planted["root"], ok.out.strip())
        assert done == art
        expl = json.loads((art.path / "explanations.json").read_text())
        assert "5" in expl or len(expl) == 6
        assert len(expl) == 6 and all(e["explanation"] for e in expl.values())
        s = done.manifest()["summary"]
        assert s["n_explained"] == 6 and 0 <= s["mean_score"] <= 1
        if "5" in expl:  # the planted feature is explained by its token, and detected
            assert expl["5"]["balanced_accuracy"] >= 0.75
        n = len(requests)
        again = run_cli(capsys, *args)
        assert again.out == ok.out and len(requests) == n  # a re-run asks nothing


def test_planted_feature_explained_and_scored(planted, capsys):
    """The keyword 'model' explains feature 5 by its token and detects it on held-out
    contexts far better than the control explanation does."""
    def answer(body, n):  # detection: a context has the feature iff it holds the quoted text
        user = body["messages"][-1]["content"]
        m = re.search(r'^Feature explanation: .*"(.+)"', user, re.MULTILINE)
        if not m:
            return keyword_model(body, n)
        contexts = re.findall(r"^Example \d+: (.*)$", user, re.MULTILINE)
        return str([int(m.group(1) in c.lower()) for c in contexts])

    with serve(answer) as (url, _):
        res = run_cli(capsys, *_interpret(planted, "--features", "4-6", "--explainer", url,
                                          "--explainer-model", "kw", "--detection", "8"))
        assert res.code == 0, res.err
    art = store.open_complete(planted["root"], res.out.strip())
    e = json.loads((art.path / "explanations.json").read_text())["5"]
    assert _decode(planted, planted["token"]).strip().lower() in e["explanation"].lower()
    assert e["n"] >= 12 and e["balanced_accuracy"] >= 0.9


@needs_chromium
def test_dashboard_in_chromium(planted, capsys, devtools):  # noqa: F811
    res = run_cli(capsys, *_interpret(planted, "--no-explain", "--top", "8"))
    page = store.open_complete(planted["root"], res.out.strip()).path / "report" / "index.html"
    devtools.load(page.as_uri())
    assert devtools.errors() == []
    js = devtools.js
    assert js("document.querySelectorAll('#rows tr').length") == 64
    js("[...document.querySelectorAll('#rows tr')].find(r => r.dataset.i === '5').click()")
    js("new Promise(r => setTimeout(r, 50))")
    assert js("document.querySelector('#panel .feature').id") == "feature-5"
    shaded = js("""[...document.querySelectorAll('#panel .ex .tok')]
        .filter(t => /^rgba?\\(255, 140, 0/.test(t.style.background)).length""")
    assert shaded >= 8
    assert devtools.errors() == []


def test_bad_input(planted, tiny_model_dirs, capsys):
    p, st = planted, ["--store", planted["root"]]
    assert_one_line_error(run_cli(capsys, *_interpret(p, "--features", "0-64", "--no-explain")),
                          "feature 64 is out of range", "64 features")
    assert_one_line_error(run_cli(capsys, *_interpret(p, "--features", "a-b", "--no-explain")),
                          "--features")
    shuffle_ref = store.open_complete(p["root"], p["sae"]).manifest()["inputs"]["shuffle"]
    assert_one_line_error(run_cli(capsys, "interpret", shuffle_ref, *st), "shuffle artifact",
                          "train ref")
    # A harvest of another model, and one of the same model at another hook.
    other = _cli("harvest", "--model", tiny_model_dirs["llama"], "--dataset", p["corpus"],
                 "--hooks", "resid_pre.0", "--tokens", "256", "--context-size", "32", *st)
    assert_one_line_error(run_cli(capsys, *_interpret(p, "--harvest", other, "--no-explain")),
                          "another model")
    hook = _cli("harvest", "--model", p["model_dir"], "--dataset", p["corpus"],
                "--hooks", "resid_post.1", "--tokens", "256", "--context-size", "32", *st)
    assert_one_line_error(run_cli(capsys, *_interpret(p, "--harvest", hook, "--no-explain")),
                          "no activations at resid_pre.0")
    assert_one_line_error(run_cli(capsys, *_interpret(p, "--explainer", "http://127.0.0.1:1/v1")),
                          "--explainer-model")
    assert_one_line_error(run_cli(capsys, *_interpret(p, "--sample", "3", "--features", "1")),
                          "not both")


def test_refused_endpoint_still_writes_statistics(planted, capsys):
    res = run_cli(capsys, *_interpret(planted, "--features", "0-7", "--explainer",
                                      "http://127.0.0.1:9/v1", "--explainer-model", "m"))
    assert_one_line_error(res, "refused the connection", "features left unexplained")
    ref = "interpret/" + res.err.split("interpret/")[1][:12]
    art = store.resolve(planted["root"], ref)
    assert not art.is_complete() and (art.path / "report" / "index.html").is_file()
    assert art.group()["stats/fired"].shape == (8,)


def test_imported_images(tmp_path, capsys):
    """Imported activations have no tokens and no model: examples are row numbers, there is no
    logit lens, and with an image shape each feature's decoder row is drawn."""
    from tests.test_train import synthetic

    x, _ = synthetic(n=3000, d=16, F=24)
    np.save(tmp_path / "x.npy", x)
    st = ["--store", tmp_path]
    imp = run_cli(capsys, "import", tmp_path / "x.npy", "--hook", "px", "--image-shape", "4x4", *st)
    sh = run_cli(capsys, "shuffle", imp.out.strip(), *st)
    tr = run_cli(capsys, "train", sh.out.strip(), "--arch", "topk", "--k", "3", "--width", "24",
                 "--tokens", "20000", "--batch-size", "500", "--no-lm-eval", *st)
    res = run_cli(capsys, "interpret", tr.out.strip(), "--no-explain", "--top", "5", *st)
    assert res.code == 0, res.err
    art = store.open_complete(tmp_path, res.out.strip())
    assert "lens" not in art.group() and art.manifest()["params"]["image_shape"] == [4, 4]
    data = _embedded(art.path / "report" / "index.html")
    live = [f for f in data["features"] if f.get("top")]
    assert live and all(np.array(f["image"]).shape == (4, 4) for f in data["features"])
    assert live[0]["top"][0]["tokens"][0].startswith("row ")
    assert "logits_pos" not in live[0]
    # Fuzzing marks tokens: imported rows have none, which is one line before anything runs.
    assert_one_line_error(run_cli(capsys, "interpret", tr.out.strip(), "--explainer",
                                  "http://127.0.0.1:9/v1", "--explainer-model", "m", "--scorers",
                                  "detection,fuzzing", *st), "imported activations have none",
                          "--scorers detection")


# ------------------------------------------------------------------- fuzzing (saectl/fuzzing.py)


def _truthful(body, n):
    """Detection: a context has the feature iff it holds the quoted text of the explanation;
    fuzzing: the marks fit iff every marked run is that text, repeated; explanations are
    keyword_model's ('The word "X".', X the most marked token)."""
    user = body["messages"][-1]["content"]
    m = re.search(r'^Feature explanation: .*"(.+)"', user, re.MULTILINE)
    if not m:
        return keyword_model(body, n)
    word, texts = m.group(1), re.findall(r"^Example \d+: (.*)$", user, re.MULTILINE)
    if body["messages"][0]["content"] == FUZZ_SYSTEM:
        return str([int(all(not run.lower().replace(word, "").strip()
                            for run in re.findall(r"<<(.*?)>>", t))) for t in texts])
    return str([int(word in t.lower()) for t in texts])


def test_scorers_default_keeps_the_address(planted):
    base = {"sae": planted["sae"], "store": str(planted["root"]), "device": "cpu",
            "explainer": "http://127.0.0.1:9/v1", "explainer_model": "m"}
    plans = {s: interpret.STAGE.plan(interpret.InterpretConfig(**base, **(
        {} if s is None else {"scorers": s}))) for s in
        (None, "detection", " detection ", "detection,fuzzing", "fuzzing , detection", "fuzzing")}
    assert "scorers" not in plans[None].params  # as before --scorers existed
    assert plans["detection"].art == plans[" detection "].art == plans[None].art
    assert plans["detection,fuzzing"].art == plans["fuzzing , detection"].art != plans[None].art
    assert plans["detection,fuzzing"].params["scorers"] == ["detection", "fuzzing"]
    assert plans["fuzzing"].art not in (plans[None].art, plans["detection,fuzzing"].art)
    for bad, why in (("fuzz", "unknown fuzz"), (",", "no scorer")):
        with pytest.raises(ConfigError, match=why) as err:
            interpret.InterpretConfig(**base, scorers=bad)
        assert "detection, fuzzing" in str(err.value) and "\n" not in str(err.value)


def test_fuzzing_scores_the_planted_feature_and_resumes_after_a_failing_endpoint(planted, capsys):
    """Fuzzing beside detection through the CLI: the endpoint fails once the first feature's
    fuzz prompts are answered; statistics, dashboard and that feature's scores are written,
    the error is one line, and the same command resumes, asking again no prompt it had
    answered. A truthful scorer ranks the planted feature's explanation at 1."""
    state = {"fail": True, "fuzz": 0}
    answered: list[str] = []

    def answer(body, n):
        key = json.dumps(body["messages"])
        if body["messages"][0]["content"] == FUZZ_SYSTEM:
            state["fuzz"] += 1
            if state["fail"] and state["fuzz"] > 8:  # the first feature's 8 fuzz prompts pass
                return 503, {"error": "overloaded"}
        answered.append(key)
        return _truthful(body, n)

    with serve(answer) as (url, requests):
        args = _interpret(planted, "--features", "4-6", "--explainer", url, "--explainer-model",
                          "kw", "--detection", "8", "--scorers", "detection,fuzzing")
        res = run_cli(capsys, *args)
        assert_one_line_error(res, "HTTP 503", "2 of 3 features left unexplained", "re-run")
        art = store.resolve(planted["root"], "interpret/" + res.err.split("interpret/")[1][:8])
        assert not art.is_complete() and (art.path / "report" / "index.html").is_file()
        first = json.loads((art.path / "explanations.json").read_text())
        assert list(first) == ["4"] and first["4"]["fuzz_n"] > 0
        before = set(answered)
        answered.clear()
        state["fail"] = False
        ok = run_cli(capsys, *args)
        assert ok.code == 0, ok.err
        assert "scanning" not in ok.err and answered
        # Asked again: only fuzz prompts of the feature that failed (in flight together).
        again = [json.loads(k) for k in set(answered) & before]
        assert all(m[0]["content"] == FUZZ_SYSTEM for m in again) and len(again) < 8
        n = len(requests)
        assert run_cli(capsys, *args).out == ok.out and len(requests) == n  # all cached
    done = store.open_complete(planted["root"], ok.out.strip())
    assert done == art
    expl = json.loads((art.path / "explanations.json").read_text())
    e = expl["5"]
    assert _decode(planted, planted["token"]).strip().lower() in e["explanation"].lower()
    assert e["balanced_accuracy"] >= 0.9 and e["fuzz_balanced_accuracy"] == 1.0
    assert e["fuzz_n"] >= 12 and e["fuzz_invalid_answers"] == 0
    assert e["fuzz_control_balanced_accuracy"] <= 0.75
    s = done.manifest()["summary"]
    assert s["mean_fuzz_score"] == pytest.approx(np.mean(
        [v["fuzz_balanced_accuracy"] for v in expl.values()]))
    assert s["mean_fuzz_control_score"] is not None
    page = _embedded(art.path / "report" / "index.html")
    row = next(f for f in page["features"] if f["index"] == 5)
    assert row["fuzz_score"] == 1.0 and row["fuzz_control_score"] == pytest.approx(
        e["fuzz_control_balanced_accuracy"], rel=1e-3)
    assert page["meta"]["mean fuzz score"] == pytest.approx(s["mean_fuzz_score"], rel=1e-3)
    # A detection-only run shows no fuzz figures at all.
    with serve(_truthful) as (url, _):
        plain = run_cli(capsys, *_interpret(planted, "--features", "5", "--explainer", url,
                                            "--explainer-model", "kw", "--detection", "8"))
    pa = store.open_complete(planted["root"], plain.out.strip())
    assert "mean_fuzz_score" not in pa.manifest()["summary"]
    assert "fuzz_score" not in _embedded(pa.path / "report" / "index.html")["features"][0]


@needs_chromium
def test_dashboard_fuzz_column_in_chromium(planted, capsys, devtools):  # noqa: F811
    with serve(_truthful) as (url, _):
        res = run_cli(capsys, *_interpret(planted, "--features", "4-6", "--explainer", url,
                                          "--explainer-model", "kw", "--detection", "8",
                                          "--scorers", "detection,fuzzing"))
        plain = run_cli(capsys, *_interpret(planted, "--features", "4-6", "--explainer", url,
                                            "--explainer-model", "kw", "--detection", "8"))
    js = devtools.js
    for out, fuzz in ((res.out, True), (plain.out, False)):
        page = store.open_complete(planted["root"], out.strip()).path / "report" / "index.html"
        devtools.load(page.as_uri())
        assert devtools.errors() == []
        heads = js("[...document.querySelectorAll('th')].map(t => t.textContent)")
        assert ("fuzz" in heads) == fuzz
        cells = js("document.querySelector('#rows tr').children.length")
        assert cells == len(heads)
        stats = js("[...document.querySelectorAll('#panel .stats div')].map(d => d.textContent)")
        assert any(t.startswith("fuzz score") for t in stats) == fuzz
    devtools.load(store.open_complete(planted["root"], res.out.strip()).path.joinpath(
        "report", "index.html").as_uri() + "#f=5")
    js("new Promise(r => setTimeout(r, 50))")
    stats = js("[...document.querySelectorAll('#panel .stats div')].map(d => d.textContent)")
    assert "fuzz score1" in stats
