"""Round trips against the real libraries (issue 17), run in their own environment
(`.venv-saelens`, which `make test` builds with sae-lens, transformer-lens and eai-sparsify
pinned to saectl's torch): SAEs built and saved by SAELens's and sparsify's own code, imported
by `saectl import-sae`, encode and decode as those libraries do; saectl's exports load back in
them; and SAEs trained on TransformerLens's processed activations give, on saectl's harvest of
the same model and text, the latents SAELens gives on TransformerLens's own activations.

Each test runs one process of that environment for all its library work (importing sae_lens
takes seconds); weights are random and sizes tiny. Differences are relative to the largest
reference value: max |saectl - library| / max |library|.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from saectl import arrays, layout, store
from saectl.sae import load_sae
from tests.helpers import REPO, assert_one_line_error, run_cli

SAELENS_PY = Path(os.environ.get("SAECTL_SAELENS_PYTHON", REPO / ".venv-saelens/bin/python"))
HAS_SPARSIFY = any((p / "sparsify").is_dir() for p in
                   SAELENS_PY.parent.parent.glob("lib/python*/site-packages"))
pytestmark = pytest.mark.skipif(not SAELENS_PY.exists(), reason=f"sae-lens is not installed at "
                                f"{SAELENS_PY} (`make test` builds it)")
needs_sparsify = pytest.mark.skipif(not HAS_SPARSIFY, reason="eai-sparsify is not installed in "
                                    f"{SAELENS_PY.parent.parent} (`make test` installs it)")

D_IN, D_SAE, K = 32, 64, 4
SAELENS_CASES = ("standard", "standard_no_b_dec", "topk", "topk_rescaled", "topk_training",
                 "jumprelu", "jumprelu_no_b_dec", "gated", "batchtopk", "matryoshka")
MEASURED: dict[str, float] = {}
"""Largest relative difference per check, printed at the end of the module (-s shows it)."""


def venv(script: str, *args, cwd: Path | None = None) -> str:
    """Run `script` in the libraries' environment, offline; its stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([str(SAELENS_PY), "-c", script, *map(str, args)], check=False,
                       capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def rel(ours: np.ndarray | torch.Tensor, ref: np.ndarray) -> float:
    ours = ours.numpy() if isinstance(ours, torch.Tensor) else ours
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def check(name: str, ours, ref: np.ndarray, tol: float) -> None:
    d = rel(ours, ref)
    MEASURED[name] = d
    assert d <= tol, f"{name}: relative difference {d:.2e} > {tol:.0e}"


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    for name, d in MEASURED.items():
        print(f"interop max relative difference {name}: {d:.2e}")


def import_sae(capsys, root: Path, source: Path, *flags) -> str:
    res = run_cli(capsys, "import-sae", source, "--store", root, *flags)
    assert res.code == 0, res.err
    return res.out.strip()


def saectl_sae(root: Path, ref: str):
    return load_sae(store.sae_dir(store.resolve(root, ref)))


def encode(sae, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        acts = sae.encode(torch.from_numpy(x))
        return acts, sae.decode(acts)


# ------------------------------------------------- SAEs built and saved by the libraries

BUILD = r"""
import sys, numpy as np, torch
from pathlib import Path
from sae_lens import (SAE, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig, JumpReLUSAE,
    JumpReLUSAEConfig, GatedSAE, GatedSAEConfig, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig,
    MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig, TopKTrainingSAE,
    TopKTrainingSAEConfig)
from sae_lens.saes.sae import SAEMetadata
out, x = Path(sys.argv[1]), torch.from_numpy(np.load(sys.argv[2]))
d, w, k = x.shape[1], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
kw = lambda **more: dict(d_in=d, d_sae=w, metadata=SAEMetadata(
    model_name="tiny-gpt2", hook_name="blocks.1.hook_resid_post"), **more)

def rnd(sae):
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand_like(sae.threshold) * 0.5)
    return sae

def batchtopk(sae):
    sae.topk_threshold = torch.tensor(0.4, dtype=torch.double)
    return sae

inference = {
    "standard": lambda: StandardSAE(StandardSAEConfig(**kw())),
    "standard_no_b_dec": lambda: StandardSAE(StandardSAEConfig(**kw(apply_b_dec_to_input=False))),
    "topk": lambda: TopKSAE(TopKSAEConfig(**kw(k=k))),
    "topk_rescaled": lambda: TopKSAE(TopKSAEConfig(**kw(k=k, rescale_acts_by_decoder_norm=True))),
    "jumprelu": lambda: JumpReLUSAE(JumpReLUSAEConfig(**kw())),
    "jumprelu_no_b_dec": lambda: JumpReLUSAE(JumpReLUSAEConfig(**kw(apply_b_dec_to_input=False))),
    "gated": lambda: GatedSAE(GatedSAEConfig(**kw())),
}
training = {  # saved for inference as SAELens trainers do (norms folded, threshold kept)
    "topk_training": lambda: TopKTrainingSAE(TopKTrainingSAEConfig(**kw(k=k))),
    "batchtopk": lambda: batchtopk(BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**kw(k=k)))),
    "matryoshka": lambda: batchtopk(MatryoshkaBatchTopKTrainingSAE(
        MatryoshkaBatchTopKTrainingSAEConfig(**kw(k=k, matryoshka_widths=[w // 4, w])))),
}
refs = out / "refs"
refs.mkdir(parents=True)
for name, make in {**inference, **training}.items():
    folder = out / "saelens" / name
    sae = rnd(make())
    (sae.save_model if name in inference else sae.save_inference_model)(str(folder))
    back = SAE.load_from_disk(str(folder), device="cpu")
    with torch.no_grad():
        acts = back.encode(x)
        np.save(refs / f"{name}.acts.npy", acts.numpy())
        np.save(refs / f"{name}.rec.npy", back.decode(acts).numpy())
    print(name, type(back).__name__, float((acts > 0).float().mean()))
try:
    from sparsify import SparseCoder, SparseCoderConfig
except ImportError:
    sys.exit(0)
folder = out / "sparsify" / "layers.1"  # sparsify names the folder by the module path
rnd(SparseCoder(d, SparseCoderConfig(num_latents=w, k=k))).save_to_disk(folder)
back = SparseCoder.load_from_disk(folder)
with torch.no_grad():
    enc = back.encode(x)
    dense = torch.zeros(x.shape[0], w).scatter_(-1, enc.top_indices, enc.top_acts)
    np.save(refs / "sparsify.acts.npy", dense.numpy())
    np.save(refs / "sparsify.rec.npy", back.decode(enc.top_acts, enc.top_indices).numpy())
print("sparsify", type(back).__name__)
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """SAELens's and sparsify's SAEs, saved by their own code, with their own latents and
    reconstructions of `x`."""
    root = tmp_path_factory.mktemp("interop")
    x = np.random.default_rng(0).normal(size=(256, D_IN)).astype(np.float32)
    np.save(root / "x.npy", x)
    venv(BUILD, root / "lib", root / "x.npy", D_SAE, K)
    return root, x


def ref(root: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    return (np.load(root / "lib/refs" / f"{name}.acts.npy"),
            np.load(root / "lib/refs" / f"{name}.rec.npy"))


@pytest.mark.parametrize("name", SAELENS_CASES)
def test_saelens_sae_imports_exactly(built, name, capsys):
    root, x = built
    r = import_sae(capsys, root, root / "lib/saelens" / name)
    acts, rec = encode(saectl_sae(root, r), x)
    ref_acts, ref_rec = ref(root, name)
    assert (ref_acts > 0).any(axis=1).mean() > 0.5, name  # the check is not on zeros
    check(f"saelens {name} latents", acts, ref_acts, 1e-5)
    check(f"saelens {name} reconstruction", rec, ref_rec, 1e-5)
    manifest = store.resolve(root, r).manifest()["summary"]
    assert manifest["hook"] == "resid_post.1" and manifest["model"] == "tiny-gpt2"


@needs_sparsify
def test_sparsify_sae_imports_exactly(built, capsys):
    root, x = built
    r = import_sae(capsys, root, root / "lib/sparsify/layers.1")
    sae = saectl_sae(root, r)
    assert (sae.arch, sae.cfg.k) == ("topk", K)
    acts, rec = encode(sae, x)
    ref_acts, ref_rec = ref(root, "sparsify")
    check("sparsify latents", acts, ref_acts, 1e-5)
    check("sparsify reconstruction", rec, ref_rec, 1e-5)
    assert store.resolve(root, r).manifest()["summary"]["hook"] == "resid_post.1"


# ------------------------------------------------- saectl's exports, loaded by the libraries

LOAD = r"""
import sys, json, numpy as np, torch
from pathlib import Path
x = torch.from_numpy(np.load(sys.argv[1]))
for folder in map(Path, sys.argv[2:]):
    with torch.no_grad():
        if (folder / "sae.safetensors").exists():
            from sparsify import SparseCoder
            sae = SparseCoder.load_from_disk(folder)
            enc = sae.encode(x)
            acts = torch.zeros(x.shape[0], sae.num_latents).scatter_(-1, enc.top_indices,
                                                                     enc.top_acts)
            rec, meta = sae.decode(enc.top_acts, enc.top_indices), {}
        else:
            from sae_lens import SAE
            sae = SAE.load_from_disk(str(folder), device="cpu")
            acts = sae.encode(x)
            rec, meta = sae.decode(acts), sae.cfg.metadata.to_dict()
    np.save(folder.parent / f"{folder.name}.acts.npy", acts.numpy())
    np.save(folder.parent / f"{folder.name}.rec.npy", rec.numpy())
    print(json.dumps({"folder": folder.name, "class": type(sae).__name__, "metadata": meta}))
"""


@needs_sparsify
def test_exports_load_back_in_the_libraries(built, tmp_path, capsys):
    """Imported SAEs exported to SAELens's and sparsify's layouts load there and encode and
    decode as saectl does; SAELens keeps the metadata (hook in its own name)."""
    root, x = built
    jobs = {"gated": "saelens", "jumprelu_no_b_dec": "saelens", "topk_rescaled": "sparsify",
            "sparsify": "sparsify"}
    folders, saes = [], {}
    for name, fmt in jobs.items():
        src = root / "lib/sparsify/layers.1" if name == "sparsify" else root / "lib/saelens" / name
        r = import_sae(capsys, root, src)
        out = tmp_path / f"{name}-{fmt}"
        res = run_cli(capsys, "export", r, "--format", fmt, "--out", out, "--store", root)
        assert res.code == 0, res.err
        want = {"cfg.json", "sae.safetensors"} if fmt == "sparsify" else \
            {"cfg.json", "sae_weights.safetensors"}
        assert {p.name for p in out.iterdir()} == want
        folders.append(out)
        saes[out.name] = saectl_sae(root, r)
    np.save(tmp_path / "x.npy", x)
    loaded = [json.loads(line) for line in
              venv(LOAD, tmp_path / "x.npy", *folders).splitlines() if line.startswith("{")]
    assert len(loaded) == len(folders)
    for got in loaded:
        out = tmp_path / got["folder"]
        acts, rec = encode(saes[out.name], x)
        check(f"export {out.name} latents", acts, np.load(tmp_path / f"{out.name}.acts.npy"), 1e-5)
        check(f"export {out.name} reconstruction", rec, np.load(tmp_path / f"{out.name}.rec.npy"),
              1e-5)
        if out.name.endswith("saelens"):
            assert got["metadata"]["hook_name"] == "blocks.1.hook_resid_post", got
            assert got["metadata"]["model_name"] == "tiny-gpt2", got
    relu = import_sae(capsys, root, root / "lib/saelens/standard")
    res = run_cli(capsys, "export", relu, "--format", "sparsify", "--out", tmp_path / "no",
                  "--store", root)
    assert_one_line_error(res, "TopK", "--format saelens")
    assert not (tmp_path / "no").exists()


# ------------------------------------------------- the activation basis (TransformerLens)

TL = r"""
import sys, json, numpy as np, torch
from pathlib import Path
from transformers import GPT2LMHeadModel
from transformer_lens import HookedTransformer
from sae_lens import SAE, StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
# TransformerLens resolves "gpt2" to its own config, read from ./gpt2 (this cwd) when offline.
hf = GPT2LMHeadModel.from_pretrained("gpt2").eval()
model = HookedTransformer.from_pretrained("gpt2", hf_model=hf, tokenizer=None, device="cpu")
out, tokens, w = Path(sys.argv[1]), torch.from_numpy(np.load(sys.argv[2])).long(), int(sys.argv[3])
torch.manual_seed(0)
for tl_hook, hf_acts in zip(sys.argv[4::2], sys.argv[5::2]):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[tl_hook])
    x = cache[tl_hook].reshape(-1, model.cfg.d_model)
    s = float(x.std())
    md = SAEMetadata(model_name="gpt2", hook_name=tl_hook,
                     model_from_pretrained_kwargs={"center_writing_weights": True})
    sae = StandardSAE(StandardSAEConfig(d_in=x.shape[1], d_sae=w, metadata=md))
    with torch.no_grad():  # latents that follow x: pre-activations of order 1 either side of 0
        sae.W_enc.copy_(torch.randn_like(sae.W_enc) / (s * x.shape[1] ** 0.5))
        sae.b_enc.copy_(torch.randn_like(sae.b_enc) * 0.2)
        sae.W_dec.copy_(torch.randn_like(sae.W_dec) * s)
        sae.b_dec.copy_(torch.randn_like(sae.b_dec) * s * 0.3)
    folder = out / tl_hook
    sae.save_model(str(folder))
    sae = SAE.load_from_disk(str(folder), device="cpu")
    with torch.no_grad():
        np.save(out / f"{tl_hook}.tl.npy", sae.encode(x).numpy())
        # the same SAE on the model's own (HF) activations, unfolded: how far off that is
        np.save(out / f"{tl_hook}.hf.npy",
                sae.encode(torch.from_numpy(np.load(hf_acts))).numpy())
    print(tl_hook, x.shape, s)
"""


@pytest.fixture(scope="module")
def tl_gpt2(tiny_model_dirs, tmp_path_factory):
    """The tiny GPT-2, its norms' weights and biases and its residual writes' biases made
    non-trivial (so centring and the norm's affine matter), in a folder named `gpt2`: what
    TransformerLens loads offline as "gpt2" (with n_ctx, which it reads)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_model_dirs["gpt2"]
    model = AutoModelForCausalLM.from_pretrained(src)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.3)
            elif name.endswith("c_proj.bias"):  # mean-carrying writes to the residual
                p.add_(0.5 + torch.randn_like(p) * 0.1)
    model.config.n_ctx = model.config.n_positions
    cwd = tmp_path_factory.mktemp("tl")
    model.save_pretrained(cwd / "gpt2")
    AutoTokenizer.from_pretrained(src).save_pretrained(cwd / "gpt2")
    return cwd


def test_transformer_lens_basis_is_folded(tl_gpt2, tmp_path, capsys):
    """SAEs trained on TransformerLens's default processing (centred writing weights; its
    ln2.hook_normalized before the norm's weight and bias), imported with --model, give on
    saectl's harvest of the same text the latents SAELens gives on TransformerLens's own
    activations."""
    from tests.conftest import corpus_texts

    folder = tl_gpt2 / "gpt2"
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts(40)))
    hooks = {"resid_post.1": "blocks.1.hook_resid_post", "ln2.1": "blocks.1.ln2.hook_normalized"}
    res = run_cli(capsys, "harvest", "--model", folder, "--dataset", corpus, "--hooks",
                  ",".join(hooks), "--tokens", 16 * 16, "--context-size", 16, "--dtype",
                  "float32", "--store", tmp_path, "--device", "cpu")
    assert res.code == 0, res.err
    group = store.open_complete(tmp_path, res.out.strip()).group()
    np.save(tmp_path / "tokens.npy", np.asarray(group[layout.TOKENS][:]))
    hf = {}
    for ours in hooks:
        hf[ours] = arrays.read(group[layout.acts(ours)]).astype(np.float32)
        np.save(tmp_path / f"{ours}.npy", hf[ours])
    venv(TL, tmp_path / "lib", tmp_path / "tokens.npy", D_SAE,
         *[a for ours, tl in hooks.items() for a in (tl, tmp_path / f"{ours}.npy")], cwd=tl_gpt2)
    for ours, tl in hooks.items():
        r = import_sae(capsys, tmp_path, tmp_path / "lib" / tl, "--model", folder)
        manifest = store.resolve(tmp_path, r).manifest()["summary"]
        assert manifest["hook"] == ours
        assert manifest["basis"] == ("center" if ours.startswith("resid") else "unfold_norm")
        acts, _ = encode(saectl_sae(tmp_path, r), hf[ours])
        want = np.load(tmp_path / "lib" / f"{tl}.tl.npy")
        assert (want > 0).any(axis=1).mean() > 0.9 and (want > 0).mean() > 0.2, ours
        check(f"TransformerLens basis {tl} latents", acts, want, 1e-4)
        unfolded = np.load(tmp_path / "lib" / f"{tl}.hf.npy")
        MEASURED[f"TransformerLens basis {tl}, unfolded (for scale)"] = rel(unfolded, want)
        assert rel(unfolded, want) > 1e-2, "the basis makes no difference: the test is blind"
