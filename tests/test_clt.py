"""Cross-layer transcoders (issue 18): `saectl train --arch clt|jumprelu-clt --hook mlp_in.A..B
--target mlp_out.A..B`. A planted cross-layer feature (read at one layer, written to that layer
and later ones) is found, with its later-layer decoder blocks used; blocks to earlier layers
stay exactly zero; the replacement-model CE-loss score (every covered MLP replaced at once) is
1 for a CLT that is each MLP exactly and 0 for one that outputs zero; a layer range the
harvest does not cover, --skip, and mismatched ranges are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saectl import hooks, layout, metrics, models, store
from saectl.sae import ARCHS, SAEConfig, load_sae
from saectl.trainer import TrainConfig, Trainer
from tests.conftest import corpus_texts
from tests.helpers import assert_one_line_error, run_cli, tried

L, D, M, N_FEAT = 3, 16, 32, 18


def _planted(seed=0):
    """Features each read at one layer (a direction of that layer's input) and written to that
    layer and every later one (a direction per target layer)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.arange(N_FEAT) % L
    enc = torch.nn.functional.normalize(torch.randn(N_FEAT, D, generator=g), dim=1)
    dec = torch.randn(N_FEAT, L, D, generator=g)
    for i in range(N_FEAT):
        dec[i, :src[i]] = 0
    dec /= dec.flatten(1).norm(dim=1)[:, None, None]

    def batch(n):
        a = (torch.rand(n, N_FEAT, generator=g) < 0.08).float() * (1 + torch.rand(n, N_FEAT,
                                                                                 generator=g))
        x = torch.randn(n, L, D, generator=g) * 0.03
        for layer in range(L):
            x[:, layer] += a[:, src == layer] @ enc[src == layer]
        return x.reshape(n, -1), torch.einsum("nf,fld->nld", a, dec).reshape(n, -1)

    return src, dec, batch


# JumpReLU's thresholds learn slowly here: it reconstructs as well (FVU 0.002) with ~5 latents
# per token for the planted 1.4, so its best matches are split features (cosine ~0.82).
@pytest.mark.parametrize("arch,match", [("clt", 0.9), ("jumprelu-clt", 0.75)])
def test_a_planted_cross_layer_feature_is_found(arch, match):
    src, dec, batch = _planted()
    cfg = SAEConfig(arch=arch, d_in=L * D, d_sae=L * M, k=3, n_layers=L, transcoder=True,
                    l0_coefficient=0.05)
    x, y = batch(4096)
    tr = Trainer(cfg, TrainConfig(total_steps=700, lr=4e-3, lr_warmup_steps=30,
                                  sparsity_warmup_steps=100), x, target_sample=y)
    for _ in range(700):
        tr.step(*batch(256))
    clt = tr.export()
    W = clt.W_dec.detach()
    mask = clt.decoder_mask()
    assert float((W * (1 - mask)).abs().max()) == 0.0, "a latent wrote to an earlier layer"
    # every planted feature has a latent of its own layer whose decoder, across all the layers
    # it writes to, is the planted one
    rows = torch.nn.functional.normalize(W, dim=1)
    cos = torch.nn.functional.normalize(dec.flatten(1), dim=1) @ rows.T       # (N_FEAT, d_sae)
    best, which = cos.max(1)
    assert float(best.mean()) > match, best
    assert bool(((which // M) == src).float().mean() >= match - 0.05)
    # the layer-to-later blocks carry the features' later outputs: drop them, error grows
    x, y = batch(4096)
    acts = clt.encode(x).detach()
    full = ((y - clt.decode(acts).detach()) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    diagonal = W * (torch.arange(L * M)[:, None] // M == torch.arange(L * D)[None] // D)
    own = ((y - (acts @ diagonal + clt.b_dec.detach())) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert float(full) < 0.1 and float(own) > 3 * float(full), (float(full), float(own))
    # per layer (the replacement model's path) equals the whole
    by_layer = {layer: clt.encode_layer(x[:, layer * D:(layer + 1) * D], layer)
                for layer in range(L)}
    joined = torch.cat([clt.decode_layer(by_layer, layer) for layer in range(L)], -1)
    torch.testing.assert_close(joined, clt.decode(acts), atol=1e-4, rtol=1e-4)


def _relu_gpt2(src, out):
    """The tiny GPT-2 with ReLU MLPs, so a JumpReLU CLT with a vanishing threshold can be each
    MLP exactly."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(src)
    config.activation_function = "relu"
    model = AutoModelForCausalLM.from_pretrained(src, config=config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def test_replacement_ce_score_is_one_for_the_mlps_and_zero_for_nothing(tiny_model_dirs,
                                                                        tmp_path):
    model = models.load_model(models.resolve_model(str(_relu_gpt2(tiny_model_dirs["gpt2"],
                                                                   tmp_path / "relu"))), "cpu")
    blocks = model.transformer.h
    n, d = len(blocks), model.config.n_embd
    m = blocks[0].mlp.c_fc.weight.shape[1]
    clt = ARCHS["jumprelu-clt"](SAEConfig(arch="jumprelu-clt", d_in=n * d, d_sae=n * m,
                                          n_layers=n, transcoder=True))
    with torch.no_grad():
        clt.W_dec.zero_()
        for layer, block in enumerate(blocks):  # Conv1D weights are (in, out)
            clt.W_enc[layer] = block.mlp.c_fc.weight
            clt.b_enc[layer * m:(layer + 1) * m] = block.mlp.c_fc.bias
            clt.W_dec[layer * m:(layer + 1) * m, layer * d:(layer + 1) * d] = block.mlp.c_proj.weight
            clt.b_dec[layer * d:(layer + 1) * d] = block.mlp.c_proj.bias
        clt.log_threshold.fill_(-40.0)  # ReLU
    ids = torch.randint(2, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    hook, target = f"mlp_in.0..{n - 1}", f"mlp_out.0..{n - 1}"
    exact = metrics.spliced(model, clt, hook, target, ids, 1)
    assert exact["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert exact["kl_score"] == pytest.approx(1.0, abs=1e-4)
    with torch.no_grad():
        clt.W_dec.zero_()
        clt.b_dec.zero_()
    zero = metrics.spliced(model, clt, hook, target, ids, 1)
    assert zero["ce_loss_score"] == pytest.approx(0.0, abs=1e-6)
    assert zero["ce_zero"] > zero["ce_clean"]
    # the replacement is causal: layer 1's MLP input is read from the replaced layer 0
    reads = hooks.parse_hooks(model, ["mlp_in.0", "mlp_in.1"])
    assert reads[1].name == "mlp_in.1"


def _cli(capsys, *args):
    res = run_cli(capsys, *args)
    assert res.code == 0, res.err
    return res.out.strip()


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_clt_trains_evaluates_and_refuses_bad_input(family, tiny_model_dirs, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts()))
    common = ["--store", tmp_path, "--device", "cpu"]
    h = _cli(capsys, "harvest", "--model", tiny_model_dirs[family], "--dataset", corpus,
             "--hooks", "mlp_in.0..2,mlp_out.0..2", "--tokens", 2048, "--context-size", 16,
             *common)
    hooks_held = store.open_complete(tmp_path, h).manifest()["params"]["hooks"]
    assert hooks_held == sorted([f"mlp_in.{i}" for i in range(3)] +
                                [f"mlp_out.{i}" for i in range(3)])
    sh = _cli(capsys, "shuffle", h, "--store", tmp_path)
    arch = "clt" if family == "gpt_neox" else "jumprelu-clt"
    ref = _cli(capsys, "train", sh, "--arch", arch, "--hook", "mlp_in.0..2", "--target",
               "mlp_out.0..2", "--expansion", "2", "--k", "4", "--tokens", 8192,
               "--batch-size", 256, "--lm-eval-seqs", "4", *common)
    art = store.open_complete(tmp_path, ref)
    s = art.manifest()["summary"]
    assert s["hook"] == "mlp_in.0..2" and s["target"] == "mlp_out.0..2"
    assert np.isfinite(s["fvu"]) and s["fvu"] < 1 and np.isfinite(s["ce_loss_score"])
    clt = load_sae(store.sae_dir(art))
    d = clt.d_layer
    assert clt.cfg.n_layers == 3 and clt.cfg.d_in == 3 * d and clt.cfg.arch == arch
    assert float((clt.W_dec.detach() * (1 - clt.decoder_mask())).abs().max()) == 0.0
    # eval measures it as train did on the same split, and on the harvest (every layer read)
    ev = store.open_complete(tmp_path, _cli(capsys, "eval", ref, "--lm-eval-seqs", "4",
                                            *common)).manifest()["summary"]
    assert ev["fvu"] == pytest.approx(s["fvu"], rel=1e-4)
    assert ev["ce_loss_score"] == pytest.approx(s["ce_loss_score"], rel=1e-4, abs=1e-6)
    assert "dl" in ev and "naive_bound" in ev  # None where the tolerance is out of reach
    on_harvest = store.open_complete(tmp_path, _cli(capsys, "eval", ref, "--harvest", h,
                                                    "--no-lm-eval", *common))
    assert np.isfinite(on_harvest.manifest()["summary"]["fvu"])
    # interpret reads every layer of the range from the harvest; the lens is of the latent's
    # writes added up in the residual stream
    it = store.open_complete(tmp_path, _cli(capsys, "interpret", ref, "--no-explain", "--top",
                                            "4", *common))
    assert it.is_complete() and layout.LENS in it.group()
    # steer adds a latent's writes at every layer it writes to; clamp is for SAEs
    late = 2 * clt.m + 1  # a latent of the last layer: it writes to mlp_out.2 only
    st = store.open_complete(tmp_path, _cli(capsys, "steer", ref, "--feature", "0:4",
                                            "--feature", f"{late}:4", "--prompt", "The",
                                            "--max-new-tokens", "3", "--units", "raw",
                                            *common)).manifest()["summary"]
    assert st["hook"] == "mlp_out.0..2" and np.isfinite(st["runs"][0]["mean"]["kl"])
    assert_one_line_error(run_cli(capsys, "steer", ref, "--feature", "0", "--prompt", "The",
                                  "--mode", "clamp", *common), "--mode add", "mlp_out.0..2")
    # Bad input: one line each, nothing trained.
    base = ["train", sh, "--store", tmp_path, "--device", "cpu"]
    assert_one_line_error(run_cli(capsys, *base, "--arch", "clt", "--hook", "mlp_in.0..3",
                                  "--target", "mlp_out.0..3"),
                          "CLT layer range", "mlp_in.3", "harvest")
    assert_one_line_error(run_cli(capsys, *base, "--arch", "clt", "--hook", "mlp_in.0..2",
                                  "--target", "mlp_out.0..2", "--skip"), "--skip", "clt")
    assert_one_line_error(run_cli(capsys, *base, "--arch", "clt", "--hook", "mlp_in.0..2",
                                  "--target", "mlp_out.1..2"), "ranges", "differ")
    assert_one_line_error(run_cli(capsys, *base, "--arch", "topk", "--hook", "mlp_in.0..2",
                                  "--target", "mlp_out.0..2"), "layer range", "--arch clt")
    assert_one_line_error(run_cli(capsys, *base, "--arch", "clt", "--hook", "mlp_in.1",
                                  "--target", "mlp_out.1"), "layer range", "mlp_in.A..B")
    assert_one_line_error(run_cli(capsys, *base, "--arch", "clt", "--hook", "mlp_in.2..0",
                                  "--target", "mlp_out.2..0"), "backwards")
    tried("train", "bad input", 6)
    tried("steer", "bad input", 1)


def test_steering_a_clt_latent_adds_each_block_where_it_writes(tiny_model_dirs):
    """A CLT latent of layer 1 (of 0..2) steered by s adds s·(its block j) to mlp_out.j for
    j = 1, 2 and leaves mlp_out.0 alone; its `act` figure is read from the MLP inputs of the
    unmodified model, every layer side by side, as the CLT was trained."""
    from saectl import steering

    spec = models.resolve_model(str(tiny_model_dirs["gpt_neox"]))
    model = models.load_model(spec, device="cpu")
    tok = models.load_tokenizer(spec)
    ids = torch.tensor([[tok.bos_token_id, *tok("The cat sat on", add_special_tokens=False)
                         ["input_ids"]]])
    reads = hooks.parse_hooks(model, layout.layer_range("mlp_in.0..2"))
    writes = hooks.parse_hooks(model, layout.layer_range("mlp_out.0..2"))
    d, m = hooks.hook_dim(model, writes[0]), 8
    torch.manual_seed(0)
    clt = ARCHS["clt"](SAEConfig(arch="clt", d_in=3 * d, d_sae=3 * m, k=2, n_layers=3,
                                 transcoder=True))
    with torch.inference_mode():  # a layer-1 latent that fires on this text
        x = hooks.run_with_hooks(model, reads, ids)
        lat = clt.encode(torch.cat([x[h.name][0] for h in reads], -1))
    sites, f, s = steering.Sites(reads, writes), m + int(lat[1:, m:2 * m].sum(0).argmax()), 2.5
    edits = steering.interventions(clt, sites, [f], torch.tensor([s]), "add", 1)
    assert [h.name for h, _ in edits] == ["mlp_out.1", "mlp_out.2"]
    block = clt.W_dec.detach()[f].view(3, d)
    assert float(block[0].abs().max()) == 0.0 and float(block[1:].abs().min()) > 0

    def run(edit_hooks):
        seen = {}
        fns = [(h, lambda a, e=e: e(a, torch.arange(a.shape[1]))) for h, e in edits
               if h.name in edit_hooks]
        with torch.inference_mode(), hooks.editing(model, fns, writes, seen):
            hooks.forward_logits(model, ids)
        return seen

    clean, first, both = run(()), run(("mlp_out.1",)), run(("mlp_out.1", "mlp_out.2"))
    assert torch.equal(both["mlp_out.0"], clean["mlp_out.0"])
    for j, (before, after) in ((1, (clean, both)), (2, (first, both))):
        diff = after[f"mlp_out.{j}"] - before[f"mlp_out.{j}"]
        assert torch.equal(diff[:, :1], torch.zeros_like(diff[:, :1]))  # BOS is not steered
        torch.testing.assert_close(diff[:, 1:], (s * block[j]).expand_as(diff[:, 1:]),
                                   atol=1e-5, rtol=0)
    # the act figure: the CLT's latents of the unmodified model's MLP inputs
    new = torch.tensor([5, 6])
    lens = torch.zeros(1, 2, dtype=torch.long)
    figs = steering.Measure(model, sites, clt, [f], lens).baseline(ids[0].tolist(), new)
    with torch.inference_mode():
        seq = torch.cat([ids[0], new])[None]
        x = hooks.run_with_hooks(model, reads, seq)
        want = clt.encode(torch.cat([x[h.name][0] for h in reads], -1))[1:, f].max()
    assert float(want) > 0
    assert figs["act_max"][str(f)] == pytest.approx(float(want), abs=1e-6)


def test_topk_clt_sparse_backward_equals_dense_autograd():
    """The TopK CLT's gradient flows only through the chosen latents (`_Selected`); it equals
    plain autograd through the dense pre-activations, AuxK included."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    n_layers, d, m, k, n = 3, 8, 12, 3, 20
    clt = ARCHS["clt"](SAEConfig(arch="clt", d_in=n_layers * d, d_sae=n_layers * m, k=k,
                                 n_layers=n_layers, transcoder=True)).double()
    with torch.no_grad():
        clt.b_enc.normal_()
        clt.b_dec.normal_()
    x, y = torch.randn(n, n_layers * d).double(), torch.randn(n, n_layers * d).double()
    dead = torch.zeros(n_layers * m, dtype=torch.bool)
    dead[::3] = True
    clt(x, target=y, dead_mask=dead, auxk_coefficient=0.5).losses["loss"].backward()
    fast = {name: p.grad.clone() for name, p in clt.named_parameters()}
    for p in clt.parameters():
        p.grad = None
    pre = clt.layer_pre_acts(x).transpose(0, 1).reshape(n, -1)
    idx = (pre.detach().view(n, n_layers, m).topk(k, dim=-1).indices.reshape(n, -1)
           + torch.arange(n_layers).repeat_interleave(k) * m)
    y_hat = F.embedding_bag(idx, clt.W_dec, per_sample_weights=pre.gather(1, idx).relu(),
                            mode="sum") + clt.b_dec
    k_aux = min(n_layers * d // 2, int(dead.sum()))
    aux_idx = pre.detach().masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1).indices
    e_hat = F.embedding_bag(aux_idx, clt.W_dec, per_sample_weights=pre.gather(1, aux_idx).relu(),
                            mode="sum")
    scale = min(int(dead.sum()) / (n_layers * d // 2), 1.0)
    aux = 0.5 * scale * (e_hat - (y - y_hat).detach()).pow(2).sum(-1).mean()
    ((y_hat - y).pow(2).sum(-1).mean() + aux).backward()
    for name, p in clt.named_parameters():
        torch.testing.assert_close(fast[name], p.grad, atol=1e-10, rtol=1e-10, msg=name)
