"""Transcoders against the real libraries (issue 18), in their own environments as
test_interop.py does: saectl's transcoders exported to SAELens load there as Transcoder,
SkipTranscoder, JumpReLUTranscoder or JumpReLUSkipTranscoder and predict what saectl predicts;
SAELens's transcoders, saved by SAELens, import into saectl exactly and export back unchanged;
circuit-tracer (its own environment, `.venv-circuit`: it pins transformers < 5) loads saectl's
transcoder set and computes the same outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from saectl import arrays, layout, metrics, store
from saectl.sae import load_sae
from tests.conftest import corpus_texts
from tests.helpers import REPO, assert_one_line_error, run_cli
from tests.test_interop import (
    MEASURED,
    SAELENS_PY,
    check,
    import_sae,
    report,
    saectl_sae,
    tl_gpt2,
    venv,
)

__all__ = ["report", "tl_gpt2"]  # fixtures: the measured differences, the tiny TL GPT-2

CT_PY = Path(os.environ.get("SAECTL_CIRCUIT_TRACER_PYTHON", REPO / ".venv-circuit/bin/python"))
pytestmark = pytest.mark.skipif(not SAELENS_PY.exists(), reason=f"sae-lens is not installed at "
                                f"{SAELENS_PY} (`make test` builds it)")
# `make test` stamps .installed only when circuit-tracer installed whole
_CT_OK = CT_PY.exists() and ("SAECTL_CIRCUIT_TRACER_PYTHON" in os.environ
                             or (CT_PY.parents[1] / ".installed").exists())
needs_ct = pytest.mark.skipif(not _CT_OK, reason=f"circuit-tracer is not installed at {CT_PY} "
                              "(`make test` builds it)")

D, W = 32, 64
KINDS = {"transcoder": "Transcoder", "skip_transcoder": "SkipTranscoder",
         "jumprelu_transcoder": "JumpReLUTranscoder",
         "jumprelu_skip_transcoder": "JumpReLUSkipTranscoder"}


def predict(sae, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        x = torch.from_numpy(x)
        acts = sae.encode(x)
        return acts, metrics.output(sae, acts, x)


# ------------------------------------------------- SAELens's transcoders into saectl

BUILD = r"""
import sys, numpy as np, torch
from pathlib import Path
from sae_lens import SAE
from sae_lens.saes import transcoder as tc
from sae_lens.saes.sae import SAEMetadata
out, x, w = Path(sys.argv[1]), torch.from_numpy(np.load(sys.argv[2])), int(sys.argv[3])
d = x.shape[1]
torch.manual_seed(0)
kinds = {"transcoder": "Transcoder", "skip_transcoder": "SkipTranscoder",
         "jumprelu_transcoder": "JumpReLUTranscoder",
         "jumprelu_skip_transcoder": "JumpReLUSkipTranscoder"}
for name, cls in kinds.items():
    for layer in (0, 1, 2):
        md = SAEMetadata(model_name="tiny-gpt2", hook_name=f"blocks.{layer}.mlp.hook_in",
                         hook_name_out=f"blocks.{layer}.hook_mlp_out")
        cfg = getattr(tc, cls + "Config")(d_in=d, d_sae=w, d_out=d, apply_b_dec_to_input=False,
                                          metadata=md)
        sae = getattr(tc, cls)(cfg)
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
            if hasattr(sae, "threshold"):
                sae.threshold.copy_(torch.rand_like(sae.threshold) * 0.5)
        folder = out / f"{name}-{layer}"
        sae.save_model(str(folder))
        back = SAE.load_from_disk(str(folder), device="cpu")
        with torch.no_grad():
            np.save(out / f"{name}-{layer}.acts.npy", back.encode(x).numpy())
            np.save(out / f"{name}-{layer}.out.npy", back(x).numpy())
        print(name, layer, type(back).__name__)
"""

LOAD = r"""
import sys, json, numpy as np, torch
from pathlib import Path
from sae_lens import SAE
x = torch.from_numpy(np.load(sys.argv[1]))
for folder in map(Path, sys.argv[2:]):
    sae = SAE.load_from_disk(str(folder), device="cpu")
    with torch.no_grad():
        np.save(folder.parent / f"{folder.name}.acts.npy", sae.encode(x).numpy())
        np.save(folder.parent / f"{folder.name}.out.npy", sae(x).numpy())
    print(json.dumps({"folder": folder.name, "class": type(sae).__name__,
                      "metadata": sae.cfg.metadata.to_dict()}))
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop_tc")
    x = np.random.default_rng(0).normal(size=(256, D)).astype(np.float32)
    np.save(root / "x.npy", x)
    venv(BUILD, root / "lib", root / "x.npy", W)
    return root, x


@pytest.mark.parametrize("name", KINDS)
def test_saelens_transcoder_imports_exactly(built, name, tmp_path, capsys):
    root, x = built
    src = root / "lib" / f"{name}-1"
    r = import_sae(capsys, root, src)
    sae = saectl_sae(root, r)
    assert sae.cfg.transcoder and sae.cfg.skip == ("skip" in name)
    s = store.resolve(root, r).manifest()["summary"]
    assert (s["hook"], s["target"], s["transcoder"]) == ("mlp_in.1", "mlp_out.1", True)
    acts, out = predict(sae, x)
    ref_acts = np.load(root / "lib" / f"{name}-1.acts.npy")
    assert (ref_acts > 0).any(axis=1).mean() > 0.5
    check(f"saelens {name} latents", acts, ref_acts, 1e-5)
    check(f"saelens {name} output", out, np.load(root / "lib" / f"{name}-1.out.npy"), 1e-5)
    # and back: SAELens's own tensors, exactly, under its own architecture
    res = run_cli(capsys, "export", r, "--format", "saelens", "--out", tmp_path / "back",
                  "--store", root)
    assert res.code == 0, res.err
    theirs, ours = (load_file(str(p / "sae_weights.safetensors")) for p in (src, tmp_path / "back"))
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs if k != "threshold")
    if "threshold" in theirs:  # saectl's jumprelu keeps its log: exp(log θ) is θ to an ulp or two
        check(f"saelens {name} threshold round trip", ours["threshold"], theirs["threshold"].numpy(),
              1e-6)
    cfg = json.loads((tmp_path / "back/cfg.json").read_text())
    assert (cfg["architecture"], cfg["apply_b_dec_to_input"], cfg["d_out"]) == (name, False, D)
    assert cfg["metadata"]["hook_name_out"] == "blocks.1.hook_mlp_out"


# ------------------------------------------------- saectl's transcoders into SAELens

TRAINED = {  # (arch, --skip) -> the SAELens class that runs it
    ("relu", True): "SkipTranscoder", ("jumprelu", False): "JumpReLUTranscoder",
    ("batchtopk", True): "JumpReLUSkipTranscoder", ("matryoshka", False): "JumpReLUTranscoder",
}


def _cli(capsys, *args) -> str:
    res = run_cli(capsys, *args)
    assert res.code == 0, res.err
    return res.out.strip()


def test_saectl_transcoders_load_in_saelens(tiny_model_dirs, tmp_path, capsys):
    common = ["--store", tmp_path, "--device", "cpu"]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts(100)))
    h = _cli(capsys, "harvest", "--model", tiny_model_dirs["gpt2"], "--dataset", corpus,
             "--hooks", "mlp_in.1,mlp_out.1", "--tokens", 4096, "--context-size", 32, *common)
    sh = _cli(capsys, "shuffle", h, "--store", tmp_path)
    x = arrays.read(store.open_complete(tmp_path, h).group()[layout.acts("mlp_in.1")])[:512]
    x = np.ascontiguousarray(x, dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    train = ["train", sh, "--hook", "mlp_in.1", "--target", "mlp_out.1", "--width", W, "--k", 4,
             "--tokens", 8192, "--batch-size", 512, "--no-lm-eval", *common]
    folders, saes = [], {}
    for (arch, skip), cls in TRAINED.items():
        r = _cli(capsys, *train, "--arch", arch, *(["--skip"] if skip else []))
        out = tmp_path / f"{arch}{'-skip' if skip else ''}"
        _cli(capsys, "export", r, "--format", "saelens", "--out", out, "--store", tmp_path)
        folders.append(out)
        saes[out.name] = (saectl_sae(tmp_path, r), cls)
    topk = _cli(capsys, *train, "--arch", "topk")
    res = run_cli(capsys, "export", topk, "--format", "saelens", "--out", tmp_path / "no",
                  "--store", tmp_path)
    assert_one_line_error(res, "SAELens has no topk transcoder", "batchtopk")
    assert not (tmp_path / "no").exists()
    loaded = [json.loads(line) for line in venv(LOAD, tmp_path / "x.npy", *folders).splitlines()
              if line.startswith("{")]
    assert len(loaded) == len(folders)
    for got in loaded:
        sae, cls = saes[got["folder"]]
        assert got["class"] == cls, got
        md = got["metadata"]
        assert (md["hook_name"], md["hook_name_out"]) == ("blocks.1.mlp.hook_in",
                                                          "blocks.1.hook_mlp_out"), md
        acts, out = predict(sae, x)
        assert (acts > 0).any(dim=1).float().mean() > 0.5, got["folder"]
        base = tmp_path / got["folder"]
        check(f"export {got['folder']} latents", acts, np.load(f"{base}.acts.npy"), 1e-5)
        check(f"export {got['folder']} output", out, np.load(f"{base}.out.npy"), 1e-5)


# ------------------------------------------------- circuit-tracer

CT_LOAD = r"""
import sys, json, yaml, numpy as np, torch
from pathlib import Path
from circuit_tracer.utils.hf_utils import load_transcoders
folder, x = Path(sys.argv[1]), torch.from_numpy(np.load(sys.argv[2]))
config = yaml.safe_load((folder / "config.yaml").read_text())
n = len(list(folder.glob("layer_*.safetensors")))
config["transcoders"] = [str(folder / f"layer_{i}.safetensors") for i in range(n)]
ts = load_transcoders(config, device=torch.device("cpu"), dtype=torch.float32)
with torch.no_grad():
    for i, t in enumerate(ts):
        np.save(folder.parent / f"ct{i}.out.npy", t(x).numpy())
        np.save(folder.parent / f"ct{i}.acts.npy", t.encode(x).numpy())
print(json.dumps({"class": type(ts).__name__, "n": len(ts), "skip": ts.skip_connection,
                  "hooks": [ts.feature_input_hook, ts.feature_output_hook]}))
"""


@needs_ct
def test_circuit_tracer_loads_the_exported_set(built, tmp_path, capsys):
    """Two layers exported one after the other into one folder make a set circuit-tracer
    loads; each layer computes what saectl computes."""
    root, x = built
    out, saes = tmp_path / "set", []
    for layer in (0, 1):
        r = import_sae(capsys, root, root / "lib" / f"jumprelu_skip_transcoder-{layer}")
        _cli(capsys, "export", r, "--format", "circuit-tracer", "--out", out, "--store", root)
        saes.append(saectl_sae(root, r))
    assert {p.name for p in out.iterdir()} == {"config.yaml", "layer_0.safetensors",
                                               "layer_1.safetensors"}
    res = run_cli(capsys, "export", r, "--format", "circuit-tracer", "--out", out, "--store", root)
    assert_one_line_error(res, "already has layer 1", "--force")
    sae_ref = import_sae(capsys, root, root / "lib" / "transcoder-1")  # another kind, same hooks
    _cli(capsys, "export", sae_ref, "--format", "circuit-tracer", "--out", tmp_path / "relu",
         "--store", root)
    np.save(tmp_path / "x.npy", x)
    p = subprocess.run([str(CT_PY), "-c", CT_LOAD, str(out), str(tmp_path / "x.npy")],
                                     check=False, capture_output=True, text=True, timeout=300,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got == {"class": "TranscoderSet", "n": 2, "skip": True,
                   "hooks": ["mlp.hook_in", "hook_mlp_out"]}, got
    for i, sae in enumerate(saes):
        acts, y = predict(sae, x)
        check(f"circuit-tracer layer {i} latents", acts, np.load(tmp_path / f"ct{i}.acts.npy"),
              1e-5)
        check(f"circuit-tracer layer {i} output", y, np.load(tmp_path / f"ct{i}.out.npy"), 1e-5)
    assert MEASURED


def _ct_model(tl_gpt2: Path, tmp_path: Path) -> None:
    """The tiny GPT-2 at tmp_path/ct/gpt2, where transformers 4 (circuit-tracer's) reads its
    tokenizer; circuit-tracer runs with that folder as its working directory."""
    shutil.copytree(tl_gpt2 / "gpt2", tmp_path / "ct/gpt2")
    tok_cfg = tmp_path / "ct/gpt2/tokenizer_config.json"
    tok_cfg.write_text(json.dumps({**json.loads(tok_cfg.read_text()),
                                   "tokenizer_class": "PreTrainedTokenizerFast"}))


CT_GRAPH = r"""
import sys, json, yaml, numpy as np, torch
from pathlib import Path
from transformers import AutoTokenizer, GPT2LMHeadModel
from circuit_tracer import attribute
from circuit_tracer.utils.hf_utils import load_transcoders
from circuit_tracer.replacement_model.replacement_model_transformerlens import (
    TransformerLensReplacementModel)
folder, tokens = Path(sys.argv[1]), torch.from_numpy(np.load(sys.argv[2])).long()
config = yaml.safe_load((folder / "config.yaml").read_text())
config["transcoders"] = [str(folder / f"layer_{i}.safetensors") for i in range(3)]
ts = load_transcoders(config, device=torch.device("cpu"), dtype=torch.float32)
# TransformerLens resolves "gpt2" to its own config, read from ./gpt2 (this cwd) when offline.
hf = GPT2LMHeadModel.from_pretrained("gpt2").eval()
model = TransformerLensReplacementModel.from_pretrained_and_transcoders(
    "gpt2", ts, hf_model=hf, tokenizer=AutoTokenizer.from_pretrained("gpt2"), device="cpu",
    dtype=torch.float32)
_, acts = model.get_activations(tokens[None])
np.save(folder.parent / "ct_model_acts.npy", acts.reshape(3, -1, acts.shape[-1]).numpy())
graph = attribute(tokens, model, max_n_logits=3, batch_size=32)
print(json.dumps({"adjacency": list(graph.adjacency_matrix.shape),
                  "features": int(graph.active_features.shape[0]),
                  "layers": sorted(set(graph.active_features[:, 0].tolist()))}))
"""


@needs_ct
def test_circuit_tracer_builds_an_attribution_graph(built, tl_gpt2, tmp_path, capsys):
    """On a local tiny GPT-2 (three layers, d_model 32), circuit-tracer's replacement model
    with saectl's exported set reads the same MLP inputs saectl harvests (its feature
    activations equal saectl's latents on saectl's mlp_in.L), and builds an attribution graph."""
    root, _ = built
    out = tmp_path / "set"
    saes = []
    for layer in range(3):
        r = import_sae(capsys, root, root / "lib" / f"jumprelu_skip_transcoder-{layer}")
        _cli(capsys, "export", r, "--format", "circuit-tracer", "--out", out, "--store", root)
        saes.append(saectl_sae(root, r))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts(20)))
    h = _cli(capsys, "harvest", "--model", tl_gpt2 / "gpt2", "--dataset", corpus, "--hooks",
             "mlp_in.0,mlp_in.1,mlp_in.2,mlp_out.2", "--tokens", 4 * 16, "--context-size", 16,
             "--dtype", "float32", "--store", tmp_path, "--device", "cpu")
    group = store.open_complete(tmp_path, h).group()
    tokens = np.asarray(group[layout.TOKENS][:])[0]
    np.save(tmp_path / "tokens.npy", tokens)
    _ct_model(tl_gpt2, tmp_path)
    p = subprocess.run([str(CT_PY), "-c", CT_GRAPH, str(out), str(tmp_path / "tokens.npy")],
                       check=False, capture_output=True, text=True, timeout=600,
                       cwd=tmp_path / "ct",
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])
    theirs = np.load(tmp_path / "ct_model_acts.npy")
    for layer, sae in enumerate(saes):
        x = arrays.read(group[layout.acts(f"mlp_in.{layer}")])[: len(tokens)].astype(np.float32)
        acts, _ = predict(sae, np.ascontiguousarray(x))
        # circuit-tracer zeroes the first position's features (BOS)
        check(f"circuit-tracer model layer {layer} latents", acts[1:], theirs[layer, 1:], 1e-4)
    assert got["features"] > 0 and got["adjacency"][0] == got["adjacency"][1] > got["features"]
    assert set(got["layers"]) <= {0, 1, 2}, got


CT_CLT = r"""
import sys, json, numpy as np, torch
from pathlib import Path
from transformers import AutoTokenizer, GPT2LMHeadModel
from circuit_tracer import attribute
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
from circuit_tracer.replacement_model.replacement_model_transformerlens import (
    TransformerLensReplacementModel)
folder, x, tokens = Path(sys.argv[1]), torch.from_numpy(np.load(sys.argv[2])), \
    torch.from_numpy(np.load(sys.argv[3])).long()
clt = load_clt(str(folder), feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out",
               device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
with torch.no_grad():
    np.save(folder.parent / "clt_acts.npy", clt.encode(x).numpy())   # (L, n, m)
    np.save(folder.parent / "clt_out.npy", clt(x).numpy())            # (L, n, d)
hf = GPT2LMHeadModel.from_pretrained("gpt2").eval()
model = TransformerLensReplacementModel.from_pretrained_and_transcoders(
    "gpt2", clt, hf_model=hf, tokenizer=AutoTokenizer.from_pretrained("gpt2"), device="cpu",
    dtype=torch.float32)
graph = attribute(tokens, model, max_n_logits=3, batch_size=32)
print(json.dumps({"n_layers": clt.n_layers, "features": int(graph.active_features.shape[0]),
                  "adjacency": list(graph.adjacency_matrix.shape)}))
"""


@needs_ct
def test_circuit_tracer_loads_an_exported_clt(tl_gpt2, tmp_path, capsys):
    """A JumpReLU cross-layer transcoder trained by saectl over all three layers of a local
    tiny GPT-2 loads in circuit-tracer's `load_clt`: same latents and same outputs at every
    layer, and its replacement model builds an attribution graph. A TopK CLT and SAELens's
    format are refused in one line."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts(60)))
    common = ["--store", tmp_path, "--device", "cpu"]
    h = _cli(capsys, "harvest", "--model", tl_gpt2 / "gpt2", "--dataset", corpus, "--hooks",
             "mlp_in.0..2,mlp_out.0..2", "--tokens", 1024, "--context-size", 16,
             "--dtype", "float32", *common)
    sh = _cli(capsys, "shuffle", h, "--store", tmp_path)
    train = ["train", sh, "--hook", "mlp_in.0..2", "--target", "mlp_out.0..2", "--width", "96",
             "--tokens", 2048, "--batch-size", 128, "--no-lm-eval", *common]
    ref = _cli(capsys, *train, "--arch", "jumprelu-clt", "--l0", "0.01")
    topk = _cli(capsys, *train, "--arch", "clt", "--k", "4")
    assert_one_line_error(run_cli(capsys, "export", topk, "--format", "circuit-tracer", "--out",
                                  tmp_path / "no", "--store", tmp_path), "jumprelu-clt")
    assert_one_line_error(run_cli(capsys, "export", ref, "--out", tmp_path / "no2", "--store",
                                  tmp_path), "circuit-tracer")
    out = tmp_path / "clt"
    _cli(capsys, "export", ref, "--format", "circuit-tracer", "--out", out, "--store", tmp_path)
    assert {p.name for p in out.iterdir()} == {"config.yaml"} | {
        f"W_{k}_{i}.safetensors" for k in ("enc", "dec") for i in range(3)}
    clt = load_sae(store.sae_dir(store.open_complete(tmp_path, ref)))
    group = store.open_complete(tmp_path, h).group()
    xs = np.stack([arrays.read(group[layout.acts(f"mlp_in.{i}")])[:64] for i in range(3)])
    np.save(tmp_path / "x.npy", xs.astype(np.float32))                  # (L, n, d)
    tokens = np.asarray(group[layout.TOKENS][:])[0]
    np.save(tmp_path / "tokens.npy", tokens)
    _ct_model(tl_gpt2, tmp_path)
    p = subprocess.run([str(CT_PY), "-c", CT_CLT, str(out), str(tmp_path / "x.npy"),
                        str(tmp_path / "tokens.npy")], check=False, capture_output=True,
                       text=True, timeout=600, cwd=tmp_path / "ct",
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])
    x = torch.from_numpy(np.ascontiguousarray(xs.transpose(1, 0, 2).reshape(64, -1)))
    with torch.no_grad():
        acts = clt.encode(x)
        y = clt.decode(acts)
    theirs_acts, theirs_out = np.load(tmp_path / "clt_acts.npy"), np.load(tmp_path / "clt_out.npy")
    check("circuit-tracer CLT latents", acts.reshape(64, 3, -1).transpose(0, 1),
          theirs_acts, 1e-4)
    check("circuit-tracer CLT outputs", y.reshape(64, 3, -1).transpose(0, 1), theirs_out, 1e-4)
    assert got["n_layers"] == 3 and got["features"] > 0, got
