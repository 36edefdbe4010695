"""`saectl export`: an SAE (trained or imported) in another tool's layout, written whole or
not at all.

- `saelens`: a train or import-sae artifact already keeps its SAE in SAELens's layout (`sae/`:
  cfg.json, sae_weights.safetensors, sparsity.safetensors), which
  `sae_lens.SAE.load_from_disk` loads; export copies those files byte for byte.
- `sparsify`: `cfg.json` + `sae.safetensors` as `sparsify.SparseCoder.save_to_disk` writes them,
  which `SparseCoder.load_from_disk` loads (strictly: exactly encoder.weight (d_sae, d_in),
  encoder.bias, W_dec, b_dec). sparsify's only inference activation is TopK, and its
  relu-then-topk gives what saectl's topk-then-relu gives, so only topk SAEs go there; name the
  folder by the HF module path (`layers.6`) for `SparseCoder.load_many`.

- transcoders (`--format saelens`): SAELens's Transcoder, SkipTranscoder, JumpReLUTranscoder
  and JumpReLUSkipTranscoder (batchtopk and matryoshka as the JumpReLU ones, with their
  thresholds); SAELens has no TopK or gated transcoder, so those are refused.
- `circuit-tracer`: one transcoder as a layer of circuit-tracer's transcoder set:
  `layer_L.safetensors` (W_enc (d_sae, d_in), W_dec, b_enc, b_dec, activation_function.threshold
  for JumpReLU, W_skip (d_out, d_in)) and `config.yaml` (model_kind transcoder_set, the input
  and output hooks as block-relative TransformerLens names). Exporting the transcoders of other
  layers into the same `--out` adds them to the set; circuit-tracer needs every layer 0..n-1.
  A cross-layer transcoder (`jumprelu-clt` over layers 0..B) goes whole, in the layout
  circuit-tracer's `load_clt` reads: `W_enc_i.safetensors` (W_enc_i (m, d), b_enc_i, b_dec_i,
  threshold_i) and `W_dec_i.safetensors` (W_dec_i (m, L - i, d)) per layer, and `config.yaml`
  (model_kind cross_layer_transcoder).

The files go to a temporary folder beside `--out`, each fsynced, and it is renamed into place,
so `--out` holds either the old export or the new one, never a mix and never stale files. A
symbolic link at `--out` is refused (never written through), and so is a folder that is not a
previous export, even with `--force`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from saectl import layout
from saectl.errors import ConfigError, SaectlError
from saectl.store import Artifact

FORMATS = ("saelens", "sparsify", "circuit-tracer")
MARKER = "cfg.json"
"""What every export holds: a non-empty folder without it is not one, and --force keeps off."""
CT_CONFIG = "config.yaml"
"""What a circuit-tracer set holds instead."""
_CT_HOOKS = {"mlp_in": "mlp.hook_in", "resid_mid": "hook_resid_mid", "resid_pre": "hook_resid_pre",
             "mlp_out": "hook_mlp_out"}
"""saectl's site → circuit-tracer's block-relative TransformerLens hook (its ReplacementMLP's
`mlp.hook_in` is what the MLP reads, after the norm, as saectl's mlp_in)."""


def _check_out(out: Path, force: bool) -> None:
    if out.is_symlink():
        raise ConfigError(f"--out {out} is a symbolic link; export never writes through one: "
                          "pass the folder it points to, or another path")
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; choose another --out")
    if not any(out.iterdir()):
        return
    if not force:
        raise ConfigError(f"{out} is not empty; choose another --out or pass --force")
    if not ((out / MARKER).is_file() or (out / CT_CONFIG).is_file()):
        raise ConfigError(f"--force replaces only an earlier export (a folder with {MARKER} "
                          f"or {CT_CONFIG}); {out} holds other files: choose another --out")


def _copy_into(src: Path, dest: Path) -> None:
    """Copy the SAE's regular files (links are not followed) and fsync each one."""
    for f in sorted(src.iterdir()):
        if f.is_symlink() or not f.is_file():
            continue
        shutil.copyfile(f, dest / f.name, follow_symlinks=False)
        fd = os.open(dest / f.name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(dest / f.name, 0o644)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o644)


def _sparsify_sae(src: Path):
    """The SAE in `src`, refused in one line unless sparsify can run it (TopK)."""
    from saectl.sae import load_sae  # deferred: torch

    sae = load_sae(src)
    if sae.cfg.transcoder:
        raise ConfigError("saectl exports transcoders to SAELens and circuit-tracer; pass "
                          "--format saelens or --format circuit-tracer")
    if sae.arch != "topk":
        raise ConfigError(f"sparsify runs only TopK SAEs (its activation keeps the k largest "
                          f"latents per token) and this one is {sae.arch}; export it with "
                          "--format saelens")
    return sae


def _write_sparsify(sae, dest: Path) -> None:
    """cfg.json and sae.safetensors exactly as `SparseCoder.save_to_disk` writes them."""
    from safetensors.torch import save as st_save  # deferred: torch

    cfg = {"activation": "topk", "expansion_factor": max(sae.d_sae // sae.d_in, 1),
           "normalize_decoder": True, "num_latents": sae.d_sae, "k": sae.cfg.k,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": sae.d_in}
    tensors = {"encoder.weight": sae.W_enc.detach().T, "encoder.bias": sae.b_enc.detach(),
               "W_dec": sae.W_dec.detach(), "b_dec": sae.b_dec.detach()}
    _write(dest / "sae.safetensors",
           st_save({k: v.cpu().contiguous() for k, v in tensors.items()}))
    _write(dest / MARKER, (json.dumps(cfg, indent=2) + "\n").encode())


def _saelens_files(src: Path, dest: Path) -> None:
    """The SAE folder as SAELens loads it: copied byte for byte, except a transcoder SAELens
    has no class for (refused) or one saved before transcoders had SAELens's layout
    (rewritten in it)."""
    cfg = json.loads((src / MARKER).read_text())
    ours = cfg.get("saectl", {})
    if ours.get("n_layers", 1) > 1:
        raise ConfigError("SAELens has no cross-layer transcoder class (it loads a CLT's layer "
                          "only with its decoders summed, for activations): export it with "
                          "--format circuit-tracer")
    if not ours.get("transcoder"):
        _copy_into(src, dest)
        return
    from saectl.sae import files, load_sae  # deferred: torch

    sae = load_sae(src)
    if files.saelens_architecture(sae) is None:
        raise ConfigError(f"SAELens has no {sae.arch} transcoder (it runs ReLU and JumpReLU "
                          "transcoders, with or without skip); train with --arch batchtopk, "
                          "jumprelu or relu to export this one")
    if "d_out" in cfg:
        _copy_into(src, dest)
        return
    meta = dict(cfg.get("metadata") or {})
    meta["hook_name"] = meta.pop("saectl_hook", meta.get("hook_name"))
    for key in ("sae_lens_version", "model_from_pretrained_kwargs"):
        meta.pop(key, None)
    files.save(sae, dest, metadata=meta)
    if (src / files.SPARSITY_FILENAME).is_file():
        _copy_into_one(src / files.SPARSITY_FILENAME, dest / files.SPARSITY_FILENAME)


def _copy_into_one(f: Path, target: Path) -> None:
    shutil.copyfile(f, target, follow_symlinks=False)
    os.chmod(target, 0o644)


def _ct_hooks(cfg: dict) -> tuple[int, str, str]:
    """(layer, input hook, output hook) in circuit-tracer's names, or a one-line refusal."""
    meta = cfg.get("metadata") or {}
    hook, target = meta.get("saectl_hook") or meta.get("hook_name"), meta.get("target_hook")
    if not cfg.get("saectl", {}).get("transcoder") or not target:
        raise ConfigError("circuit-tracer runs transcoders (an MLP's input to its output); "
                          "this is an SAE: export it with --format saelens")
    (site, layer), (out_site, out_layer) = (str(h).rsplit(".", 1) for h in (hook, target))
    if site not in _CT_HOOKS or out_site != "mlp_out" or layer != out_layer:
        raise ConfigError(f"circuit-tracer replaces each block's MLP: it takes a transcoder from "
                          f"mlp_in.L, resid_mid.L or resid_pre.L to mlp_out.L of the same block, "
                          f"not {hook} -> {target}")
    return int(layer), _CT_HOOKS[site], _CT_HOOKS[out_site]


def _write_circuit_tracer(src: Path, dest: Path, out: Path, force: bool) -> None:
    """layer_L.safetensors + config.yaml; the layers of an existing set at `out` are kept."""
    from safetensors.torch import save as st_save  # deferred: torch

    from saectl.sae import load_sae

    cfg = json.loads((src / MARKER).read_text())
    if cfg.get("saectl", {}).get("n_layers", 1) > 1:
        return _write_clt(src, cfg, dest)
    layer, hook_in, hook_out = _ct_hooks(cfg)
    sae = load_sae(src)
    if sae.arch not in ("relu", "jumprelu", "batchtopk", "matryoshka"):
        raise ConfigError(f"circuit-tracer runs ReLU and JumpReLU transcoders; a {sae.arch} one "
                          "has no equivalent there: train with --arch batchtopk, jumprelu or relu")
    t = sae.saved_tensors()  # SAELens's names and shapes
    tensors = {"W_enc": t["W_enc"].T, "W_dec": t["W_dec"], "b_enc": t["b_enc"],
               "b_dec": t["b_dec"]}
    if "threshold" in t:  # batchtopk's relu(pre)·(pre > θ) is circuit-tracer's pre·(pre > θ), θ ≥ 0
        tensors["activation_function.threshold"] = t["threshold"]
    if "W_skip" in t:
        tensors["W_skip"] = t["W_skip"]
    config = {"model_kind": "transcoder_set", "feature_input_hook": hook_in,
              "feature_output_hook": hook_out, "model_name": cfg["metadata"].get("model_name"),
              "scan": None, "saectl_refs": {}}
    name = f"layer_{layer}.safetensors"
    if (out / CT_CONFIG).is_file():  # add to the set there
        old = json.loads((out / CT_CONFIG).read_text())
        if (old.get("feature_input_hook"), old.get("feature_output_hook")) != (hook_in, hook_out):
            raise ConfigError(f"{out} holds a set from {old.get('feature_input_hook')} to "
                              f"{old.get('feature_output_hook')}; this transcoder reads "
                              f"{hook_in}: choose another --out")
        if (out / name).is_file() and not force:
            raise ConfigError(f"{out} already has layer {layer}; pass --force to replace it")
        config["saectl_refs"] = old.get("saectl_refs", {})
        for f in sorted(out.glob("layer_*.safetensors")):
            if f.name != name and not f.is_symlink():
                _copy_into_one(f, dest / f.name)
    config["saectl_refs"][str(layer)] = cfg["metadata"].get("saectl_ref")
    config["scan"] = config["model_name"] or "saectl"
    _write(dest / name, st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))
    # JSON is YAML: circuit-tracer reads it with yaml.safe_load
    _write(dest / CT_CONFIG, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


def _write_clt(src: Path, cfg: dict, dest: Path) -> None:
    """A cross-layer transcoder in circuit-tracer's CLT layout (module docstring)."""
    from safetensors.torch import save as st_save  # deferred: torch

    from saectl.layout import layer_range
    from saectl.sae import load_sae

    meta = cfg.get("metadata") or {}
    hooks_in, hooks_out = (layer_range(str(meta.get(k))) or [] for k in ("hook_name", "target_hook"))
    sites = {h.rpartition(".")[0] for h in hooks_in} | {h.rpartition(".")[0] for h in hooks_out}
    if not hooks_in or hooks_in[0].rpartition(".")[2] != "0" or \
            {h.rpartition(".")[0] for h in hooks_out} != {"mlp_out"} or not sites <= set(_CT_HOOKS):
        raise ConfigError(f"circuit-tracer's CLT covers the model's layers from 0, reading "
                          f"mlp_in or resid_mid and writing mlp_out; this one maps "
                          f"{meta.get('hook_name')} to {meta.get('target_hook')}: train over "
                          "--hook mlp_in.0..B --target mlp_out.0..B")
    clt = load_sae(src)
    if clt.arch != "jumprelu-clt":
        raise ConfigError(f"circuit-tracer runs JumpReLU and ReLU CLTs; a {clt.arch} one (TopK per "
                          "layer) has no equivalent there: train with --arch jumprelu-clt")
    L, d, m = clt.n_layers, clt.d_layer, clt.m
    W_dec, thr = clt.W_dec.detach(), clt.threshold.detach()
    for i in range(L):
        rows = slice(i * m, (i + 1) * m)
        enc = {f"W_enc_{i}": clt.W_enc[i].detach().T, f"b_enc_{i}": clt.b_enc[rows].detach(),
               f"b_dec_{i}": clt.b_dec[i * d:(i + 1) * d].detach(), f"threshold_{i}": thr[rows]}
        dec = {f"W_dec_{i}": W_dec[rows, i * d:].reshape(m, L - i, d)}
        for name, tensors in ((f"W_enc_{i}", enc), (f"W_dec_{i}", dec)):
            _write(dest / f"{name}.safetensors",
                   st_save({k: v.cpu().contiguous() for k, v in tensors.items()}))
    site = hooks_in[0].rpartition(".")[0]
    config = {"model_kind": "cross_layer_transcoder", "feature_input_hook": _CT_HOOKS[site],
              "feature_output_hook": _CT_HOOKS["mlp_out"], "model_name": meta.get("model_name"),
              "scan": meta.get("model_name") or "saectl", "n_layers": L,
              "saectl_ref": meta.get("saectl_ref")}
    _write(dest / CT_CONFIG, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


def _put_in_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` (checked by `_check_out`) is first renamed
    aside and deleted after, so `out` is never a mix of two exports."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export(art: Artifact, out: Path, fmt: str = "saelens", force: bool = False) -> Path:
    """Write the SAE of the complete train or import-sae artifact `art` to `out` in format
    `fmt`."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not supported; use --format "
                          f"{' or --format '.join(FORMATS)}")
    out = Path(os.path.abspath(out))  # `a/..` resolved by name, never through a link at `out`
    adding = (fmt == "circuit-tracer" and (out / CT_CONFIG).is_file() and not out.is_symlink()
              and not (out / "W_enc_0.safetensors").exists())  # a CLT export is replaced whole
    _check_out(out, force or adding)
    src = layout.sae_dir(art.path)
    sae = _sparsify_sae(src) if fmt == "sparsify" else None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.export-"))
    except OSError as e:
        raise SaectlError(f"cannot write beside {out} ({e.strerror or e}); choose another "
                          "--out") from None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; an export is for others to load
        if sae is not None:
            _write_sparsify(sae, tmp)
        elif fmt == "circuit-tracer":
            _write_circuit_tracer(src, tmp, out, force)
        else:
            _saelens_files(src, tmp)
        _check_out(out, force or adding)  # again: something may have appeared there meanwhile
        _put_in_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
