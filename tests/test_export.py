"""Export to SAELens and sparsify, checked with the real sae_lens and sparsify (in their own
environment, `.venv-saelens`, which `make test` builds): the exported SAE loads with
`SAE.load_from_disk` / `SparseCoder.load_from_disk` and encodes and decodes as saectl does.
(tests/test_interop.py does the same for imported SAEs.)"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from saectl import store
from saectl.sae import load_sae
from tests.helpers import REPO, assert_one_line_error, run_cli, tried
from tests.test_train import synthetic

SAELENS_PY = Path(os.environ.get("SAECTL_SAELENS_PYTHON", REPO / ".venv-saelens/bin/python"))
HAS_SPARSIFY = any((p / "sparsify").is_dir() for p in
                   SAELENS_PY.parent.parent.glob("lib/python*/site-packages"))

ARCHS = ("topk", "relu", "jumprelu", "batchtopk", "gated", "matryoshka")

# One sae_lens process loads every exported SAE (importing sae_lens takes seconds).
LOAD = """
import sys, json, numpy as np, torch
from pathlib import Path
from sae_lens import SAE
x = torch.from_numpy(np.load(sys.argv[1]))
for folder in sys.argv[2:]:
    sae = SAE.load_from_disk(folder, device="cpu")
    with torch.no_grad():
        acts = sae.encode(x)
        np.save(Path(folder) / "sl_acts.npy", acts.numpy())
        np.save(Path(folder) / "sl_rec.npy", sae.decode(acts).numpy())
    print(json.dumps({"folder": Path(folder).name, "metadata": sae.cfg.metadata.to_dict()}))
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import contextlib
    import io

    from saectl.cli import main

    root = tmp_path_factory.mktemp("export")
    x, _ = synthetic(n=8000)
    np.save(root / "x.npy", x)

    def cli(*args):  # the real CLI in-process (capsys is per test, this fixture per module)
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            try:
                main([str(a) for a in args])
            except SystemExit as e:
                assert e.code in (0, None)
        return out.getvalue().strip()

    imp = cli("import", root / "x.npy", "--hook", "h", "--store", root)
    sh = cli("shuffle", imp, "--store", root)
    refs = {}
    for arch in ARCHS:
        refs[arch] = cli("train", sh, "--store", root, "--arch", arch, "--k", "3", "--width", "64",
                         "--tokens", "20000", "--batch-size", "500", "--device", "cpu")
    return root, refs, x[:200]


@pytest.mark.skipif(not SAELENS_PY.exists(),
                    reason=f"sae-lens is not installed at {SAELENS_PY} (`make test` builds it)")
def test_saelens_loads_and_encodes_the_same(trained, tmp_path, capsys):
    root, refs, x = trained
    folders = []
    for arch in ARCHS:
        out = tmp_path / arch
        res = run_cli(capsys, "export", refs[arch], "--format", "saelens", "--out", out,
                      "--store", root)
        assert res.code == 0, res.err
        assert {p.name for p in out.iterdir()} >= {"cfg.json", "sae_weights.safetensors",
                                                    "sparsity.safetensors"}
        folders.append(out)
    np.save(tmp_path / "x.npy", x)
    p = subprocess.run([str(SAELENS_PY), "-c", LOAD, tmp_path / "x.npy", *folders],
                       check=False, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    for line in p.stdout.splitlines():  # the nested metadata survives SAELens's loading
        if line.startswith("{"):
            meta = json.loads(line)["metadata"]
            assert meta["sae_lens_version"] == "6.0.0" and meta["saectl_ref"] in refs.values()
    for out in folders:
        ours = load_sae(out)
        with torch.no_grad():
            acts = ours.encode(torch.from_numpy(x))
            rec = ours.decode(acts)
        np.testing.assert_allclose(np.load(out / "sl_acts.npy"), acts.numpy(), rtol=1e-5,
                                   atol=1e-5, err_msg=out.name)
        np.testing.assert_allclose(np.load(out / "sl_rec.npy"), rec.numpy(), rtol=1e-5,
                                   atol=1e-5, err_msg=out.name)
        assert (acts > 0).any(), out.name


SPARSIFY_LOAD = """
import sys, numpy as np, torch
from sparsify import SparseCoder
x = torch.from_numpy(np.load(sys.argv[1]))
sae = SparseCoder.load_from_disk(sys.argv[2])
with torch.no_grad():
    enc = sae.encode(x)
    acts = torch.zeros(x.shape[0], sae.num_latents).scatter_(-1, enc.top_indices, enc.top_acts)
    np.save(sys.argv[3], acts.numpy())
    np.save(sys.argv[4], sae.decode(enc.top_acts, enc.top_indices).numpy())
"""


@pytest.mark.skipif(not HAS_SPARSIFY, reason=f"eai-sparsify is not installed beside "
                    f"{SAELENS_PY} (`make test` installs it)")
def test_sparsify_loads_a_trained_topk_and_encodes_the_same(trained, tmp_path, capsys):
    root, refs, x = trained
    out = tmp_path / "layers.1"
    res = run_cli(capsys, "export", refs["topk"], "--format", "sparsify", "--out", out,
                  "--store", root)
    assert res.code == 0, res.err
    assert {p.name for p in out.iterdir()} == {"cfg.json", "sae.safetensors"}
    np.save(tmp_path / "x.npy", x)
    p = subprocess.run([str(SAELENS_PY), "-c", SPARSIFY_LOAD, tmp_path / "x.npy", out,
                        tmp_path / "acts.npy", tmp_path / "rec.npy"],
                       check=False, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    ours = load_sae(store.sae_dir(store.resolve(root, refs["topk"])))
    with torch.no_grad():
        acts = ours.encode(torch.from_numpy(x))
        rec = ours.decode(acts)
    np.testing.assert_allclose(np.load(tmp_path / "acts.npy"), acts.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "rec.npy"), rec.numpy(), rtol=1e-5, atol=1e-5)
    assert (acts > 0).any()


def test_sparsify_export_refuses_what_sparsify_cannot_run(trained, tmp_path, capsys):
    """sparsify runs only TopK: every other architecture is refused in one line naming
    --format saelens, and nothing is written."""
    root, refs, _ = trained
    for arch in ARCHS:
        if arch == "topk":
            continue
        res = run_cli(capsys, "export", refs[arch], "--format", "sparsify", "--out",
                      tmp_path / arch, "--store", root)
        assert_one_line_error(res, arch, "TopK", "--format saelens")
        assert not (tmp_path / arch).exists()
    assert not list(tmp_path.iterdir())  # no temporaries left either
    tried("export", "bad input", len(ARCHS) - 1)


def test_export_bad_input(trained, tmp_path, capsys):
    root, refs, _ = trained
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    res = run_cli(capsys, "export", refs["topk"], "--out", busy, "--store", root)
    assert_one_line_error(res, "not empty")
    assert (busy / "keep.txt").read_text() == "mine"
    assert_one_line_error(run_cli(capsys, "export", refs["topk"], "--out", tmp_path / "x",
                                  "--format", "onnx", "--store", root), "saelens")
    imp = store.list_artifacts(root, "import")[0]
    assert_one_line_error(run_cli(capsys, "export", imp.ref, "--out", tmp_path / "y",
                                  "--store", root), "train")


# ---------------------------------------------------------------- written whole (issue 15)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_export_out_that_is_a_file_is_one_line(trained, tmp_path, capsys):
    root, refs, _ = trained
    f = tmp_path / "model.bin"
    f.write_text("mine")
    for extra in ((), ("--force",)):
        assert_one_line_error(run_cli(capsys, "export", refs["topk"], "--out", f, "--store", root,
                                      *extra), "is a file")
    assert f.read_text() == "mine"
    tried("export", "bad input")


def test_export_never_writes_through_a_symlink(trained, tmp_path, capsys):
    """`--out` a link to someone's folder: refused in one line, with or without --force,
    and nothing written where it points."""
    root, refs, _ = trained
    target = tmp_path / "theirs"
    target.mkdir()
    (target / "cfg.json").write_text("their cfg")
    link = tmp_path / "link"
    link.symlink_to(target)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    for out in (link, dangling):
        for extra in ((), ("--force",)):
            res = run_cli(capsys, "export", refs["topk"], "--out", out, "--store", root, *extra)
            assert_one_line_error(res, "symbolic link")
    assert _files(target) == {"cfg.json": b"their cfg"} and not (tmp_path / "nowhere").exists()
    tried("export", "planted file")


def test_export_force_replaces_an_earlier_export_whole(trained, tmp_path, capsys):
    """--force over an earlier export leaves exactly the new files (none stale), byte for
    byte the SAE's; a folder that is not an export is refused even with --force."""
    root, refs, _ = trained
    out = tmp_path / "sae"
    assert run_cli(capsys, "export", refs["relu"], "--out", out, "--store", root).code == 0
    (out / "stale.safetensors").write_bytes(b"from an older export")
    res = run_cli(capsys, "export", refs["topk"], "--out", out, "--store", root, "--force")
    assert res.code == 0, res.err
    sae = store.sae_dir(store.resolve(root, refs["topk"]))
    assert _files(out) == _files(sae)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    res = run_cli(capsys, "export", refs["topk"], "--out", mine, "--store", root, "--force")
    assert_one_line_error(res, "earlier export")
    assert _files(mine) == {"thesis.tex": b"years of work"}
    tried("export", "bad input")


# ---------------------------------------------------------------- transcoders (issue 18)


def test_circuit_tracer_export_refuses_an_sae(trained, tmp_path, capsys):
    root, refs, _ = trained
    res = run_cli(capsys, "export", refs["relu"], "--format", "circuit-tracer", "--out",
                  tmp_path / "ct", "--store", root)
    assert_one_line_error(res, "circuit-tracer runs transcoders", "--format saelens")
    assert not (tmp_path / "ct").exists()


def test_transcoder_saved_before_the_saelens_layout_loads_and_exports(tmp_path):
    """A skip transcoder written before W_skip was saved as SAELens's (d_out, d_in) (no d_out in
    its cfg.json) loads unchanged, and export rewrites it in SAELens's layout."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    from saectl.export import _saelens_files
    from saectl.sae import ARCHS, SAEConfig, load_sae

    sae = ARCHS["relu"](SAEConfig(arch="relu", d_in=8, d_sae=16, transcoder=True, skip=True))
    with torch.no_grad():
        sae.W_skip.copy_(torch.randn(8, 8))
    meta = {"hook_name": "mlp_in.1", "target_hook": "mlp_out.1"}
    sae.save(tmp_path / "new", metadata=meta)
    old = tmp_path / "old"
    old.mkdir()
    cfg = json.loads((tmp_path / "new/cfg.json").read_text())
    del cfg["d_out"]
    cfg.update(apply_b_dec_to_input=True, architecture="skip_transcoder")
    (old / "cfg.json").write_text(json.dumps(cfg))
    t = load_file(str(tmp_path / "new/sae_weights.safetensors"))
    save_file({**t, "W_skip": t["W_skip"].T.contiguous()}, str(old / "sae_weights.safetensors"))
    assert torch.equal(load_sae(old).W_skip, sae.W_skip)
    (tmp_path / "out").mkdir()
    _saelens_files(old, tmp_path / "out")
    for name in ("cfg.json", "sae_weights.safetensors"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "new" / name).read_bytes()
