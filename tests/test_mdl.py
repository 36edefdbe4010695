"""Description length (saectl/mdl.py): hand-worked tiny SAEs, the choice of B and of the SAE,
streaming, and the properties that hold on random SAEs.

The hand-built SAEs are ReLU SAEs with d_in = 1 whose first latent is the identity
(W_enc = W_dec = 1, biases 0), so on inputs x ≥ 0 its acts are x and it fires where x > 0.
On X4 = [0, 0, 0, 0, 1, 2, 3, 4] it fires on half the tokens with 4 distinct values:
  total variance: Σx² − (Σx)²/n = 30 − 100/8 = 17.5
  B=2: range [1, 4] in bins of 1.5, centres 1.75, 3.25: errors .75 .25 .25 .75, Σe² = 1.25,
       FVU = 1.25/17.5 ≈ 0.071; q = {½, ½}: DL = H_b(½) + ½·1 = 1.5
  B=4: bins of 0.75, centres 1.375 2.125 2.875 3.625: Σe² = 0.3125, FVU ≈ 0.018;
       q uniform on 4 bins: DL = 1 + ½·2 = 2
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from saectl import mdl
from saectl.errors import ConfigError
from saectl.mdl import (
    BINS,
    DescriptionLength,
    binary_entropy,
    choose,
    description_length,
    entropy_bits,
    naive_bound,
    select_bins,
)
from saectl.sae import ARCHS, SAEConfig

X4 = torch.tensor([0.0, 0, 0, 0, 1, 2, 3, 4])[:, None]


def build_sae(W_enc, b_enc, W_dec, b_dec=None, arch="relu", **cfg):
    """An SAE with the given weights (lists or tensors, float64)."""
    W_enc = torch.as_tensor(W_enc, dtype=torch.float64)
    d_in, d_sae = W_enc.shape
    sae = ARCHS[arch](SAEConfig(arch=arch, d_in=d_in, d_sae=d_sae, dtype="float64", **cfg))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(torch.as_tensor(b_enc, dtype=torch.float64))
        sae.W_dec.copy_(torch.as_tensor(W_dec, dtype=torch.float64))
        sae.b_dec.copy_(torch.zeros(d_in) if b_dec is None else torch.as_tensor(b_dec))
    return sae


def once(x, size=None):
    """A `batches` callable over x, in chunks of `size` rows (one batch by default)."""
    return lambda: iter(x.split(size or len(x)))


def identity_sae():
    return build_sae([[1.0]], [0.0], [[1.0]])


def with_dead_and_constant():
    """Latent 0: identity; latent 1: never fires (pre = −1); latent 2: always 1 (pre = +1),
    with a zero decoder row so the reconstruction is latent 0's alone."""
    return build_sae([[1.0, 0.0, 0.0]], [0.0, -1.0, 1.0], [[1.0], [5.0], [0.0]])


# -- entropies --------------------------------------------------------------------------


def test_entropy_bits_known_values():
    assert entropy_bits([1, 1, 1, 1]) == pytest.approx(2.0)
    assert entropy_bits([2, 0, 2]) == pytest.approx(1.0)  # the empty bin is skipped
    assert entropy_bits([7]) == 0.0
    assert entropy_bits([0, 0]) == 0.0
    assert entropy_bits([1, 3]) == pytest.approx(-(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75)))


def test_binary_entropy_known_values():
    assert binary_entropy(0.5) == pytest.approx(1.0)
    assert binary_entropy(0.0) == 0.0 and binary_entropy(1.0) == 0.0
    assert binary_entropy(0.25) == pytest.approx(0.8112781244591328)
    arr = binary_entropy(np.array([0.0, 0.5, 1.0]))
    np.testing.assert_allclose(arr, [0.0, 1.0, 0.0])
    t = binary_entropy(torch.tensor([0.0, 0.25, 0.75, 1.0]))
    assert torch.allclose(t, torch.tensor([0.0, 0.811278, 0.811278, 0.0], dtype=torch.float64),
                          atol=1e-6)


# -- hand-worked DL -----------------------------------------------------------------------


def test_half_firing_four_equiprobable_values_costs_two_bits():
    r = description_length(identity_sae(), once(X4), tolerance=0.05)
    assert r.feasible and r.bins == 4  # B=2 has FVU 1.25/17.5 > 0.05
    assert r.by_bins[2]["fvu"] == pytest.approx(1.25 / 17.5)
    assert r.by_bins[4]["fvu"] == pytest.approx(0.3125 / 17.5)
    assert r.quantised_fvu == pytest.approx(0.3125 / 17.5)
    assert r.bits_per_token == pytest.approx(1 + 0.5 * 2)
    assert r.by_bins[2]["bits_per_token"] == pytest.approx(1 + 0.5 * 1)
    assert r.l0 == 0.5 and r.fvu == pytest.approx(0.0) and r.n_tokens == 8
    # a looser tolerance admits B=2, and its cheaper DL
    loose = description_length(identity_sae(), once(X4), tolerance=0.1)
    assert loose.bins == 2 and loose.bits_per_token == pytest.approx(1.5)


def test_dead_and_constant_latents_cost_nothing():
    r = description_length(with_dead_and_constant(), once(X4), tolerance=0.05)
    assert r.bins == 4 and r.bits_per_token == pytest.approx(2.0)
    for b in BINS:  # at every B, the dead and the always-1 latents add 0 bits
        base = description_length(identity_sae(), once(X4), tolerance=0.05).by_bins[b]
        assert r.by_bins[b]["bits_per_token"] == pytest.approx(base["bits_per_token"])
        assert r.by_bins[b]["fvu"] == pytest.approx(base["fvu"])
    assert r.l0 == pytest.approx(1.5)


def test_single_valued_latent_is_exact_at_every_bin_count():
    x = torch.tensor([0.0, 0.0, 3.0, 3.0])[:, None]
    r = description_length(identity_sae(), once(x), tolerance=0.0)
    assert r.bins == 2 and r.quantised_fvu == 0.0  # the coarsest B, and exact
    assert all(e["fvu"] == 0.0 and e["bits_per_token"] == pytest.approx(1.0)
               for e in r.by_bins.values())  # H_b(½) = 1, H(q) = 0


def test_naive_bound():
    assert naive_bound(2.0, 1024, 16) == pytest.approx(2 * (10 + 4))
    r = description_length(with_dead_and_constant(), once(X4), tolerance=0.05)
    assert r.naive_bound == pytest.approx(1.5 * (math.log2(3) + math.log2(4)))
    for b in BINS:
        assert r.by_bins[b]["naive_bound"] == pytest.approx(1.5 * (math.log2(3) + math.log2(b)))


def test_infeasible_says_so():
    # FVU at B=256 is tiny but not 0; tolerance 0 is met by no B
    r = description_length(identity_sae(), once(X4), tolerance=0.0)
    assert not r.feasible
    assert r.bins is r.bits_per_token is r.quantised_fvu is r.naive_bound is None
    assert set(r.by_bins) == set(BINS)


def test_streaming_equals_one_batch():
    sae = with_dead_and_constant()
    one = description_length(sae, once(X4), 0.05)
    for size in (1, 3, 5):
        assert description_length(sae, once(X4, size), 0.05) == one
    torch.manual_seed(1)
    sae = ARCHS["topk"](SAEConfig(arch="topk", d_in=16, d_sae=64, k=4))
    x = torch.randn(600, 16) * 3 + 5  # off-centre, so the FVU's mean matters
    one = description_length(sae, once(x), 1.0)
    many = description_length(sae, once(x, 97), 1.0)
    assert many.l0 == one.l0 and many.bins == one.bins
    for b in BINS:
        for k in ("fvu", "bits_per_token"):
            assert many.by_bins[b][k] == pytest.approx(one.by_bins[b][k], rel=1e-6)


def test_user_errors():
    with pytest.raises(ConfigError, match="tolerance"):
        description_length(identity_sae(), once(X4), tolerance=-0.1)
    with pytest.raises(ConfigError, match="d_in=1"):
        description_length(identity_sae(), once(torch.zeros(4, 3)), tolerance=0.1)
    with pytest.raises(ValueError, match="no evaluation tokens"):
        description_length(identity_sae(), lambda: iter([]), tolerance=0.1)


def test_second_pass_must_see_the_same_tokens(monkeypatch):
    monkeypatch.setattr(mdl, "KEEP_BYTES", 0)  # pass 2 encodes again, so it reads again
    calls = iter([[X4], [X4[:4]]])
    with pytest.raises(ValueError, match="same tokens"):
        description_length(identity_sae(), lambda: iter(next(calls)), tolerance=0.1)


def test_second_pass_keeps_the_first_passs_latents_or_encodes_again(monkeypatch, random_results):
    """Pass 2 reuses pass 1's fired latents while they fit mdl.KEEP_BYTES, reading the tokens
    once; with none kept, or when the budget runs out part-way, it reads and encodes them again.
    The figures are the same every way."""
    default = mdl.KEEP_BYTES
    for sae, x, r in random_results.values():
        for keep, reads in ((default, 1), (0, 2), (3 * 256 * 32 * 4, 2)):
            monkeypatch.setattr(mdl, "KEEP_BYTES", keep)
            calls = []

            def batches(calls=calls, x=x):
                calls.append(1)
                return iter(x.split(256))

            again = description_length(sae, batches, tolerance=2.0)
            assert len(calls) == reads, (keep, len(calls))
            assert again.as_dict() == r.as_dict()
        monkeypatch.setattr(mdl, "KEEP_BYTES", default)
        buf = torch.empty(256, x.shape[1])

        def refilled(x=x, buf=buf):  # one buffer, refilled in place for every batch
            for chunk in x.split(256):
                buf[:len(chunk)].copy_(chunk)
                yield buf[:len(chunk)]

        assert description_length(sae, refilled, tolerance=2.0).as_dict() == r.as_dict()


def test_as_dict_round_trips_through_json():
    r = description_length(with_dead_and_constant(), once(X4), tolerance=0.05)
    d = json.loads(json.dumps(r.as_dict(), allow_nan=False))
    assert DescriptionLength.from_dict(d) == r
    bad = description_length(identity_sae(), once(X4), tolerance=0.0)
    assert DescriptionLength.from_dict(json.loads(json.dumps(bad.as_dict()))) == bad


# -- the choice of B ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_results():
    """DL of random ReLU and TopK SAEs on random data, at a loose tolerance."""
    torch.manual_seed(0)
    x = torch.randn(2000, 32)
    out = {}
    for arch, extra in (("relu", {}), ("topk", {"k": 8})):
        sae = ARCHS[arch](SAEConfig(arch=arch, d_in=32, d_sae=128, **extra))
        out[arch] = (sae, x, description_length(sae, once(x, 256), tolerance=2.0))
    return out


def test_chosen_bins_is_the_coarsest_meeting_tolerance(random_results):
    for sae, x, r in random_results.values():
        fvus = sorted(e["fvu"] for e in r.by_bins.values())
        last = 0
        # from loose to strict: the chosen B never gets coarser
        for eps in [2.0, *reversed(fvus), fvus[0] - 1e-9]:
            b = select_bins(r.by_bins, eps)
            if b is None:
                assert all(e["fvu"] > eps for e in r.by_bins.values())
                last = math.inf
                continue
            assert r.by_bins[b]["fvu"] <= eps
            assert all(r.by_bins[c]["fvu"] > eps for c in BINS if c < b)
            assert b >= last
            last = b
        eps = fvus[3]
        again = description_length(sae, once(x, 256), tolerance=eps)
        assert again.bins == select_bins(r.by_bins, eps) and again.quantised_fvu <= eps


def test_random_sae_properties(random_results):
    for sae, x, r in random_results.values():
        bits = [r.by_bins[b]["bits_per_token"] for b in BINS]
        assert all(math.isfinite(v) and v >= 0 for v in bits)
        # B bins are unions of 2B bins, and a finer partition never has less entropy
        assert all(a <= b + 1e-9 for a, b in itertools.pairwise(bits))
        # each fired value moves at most span_i / 2B, so ‖decode(q) − decode(a)‖ per token is
        # at most Σ_fired span_i ‖W_dec,i‖ / 2B: √FVU_B is within that of √FVU (triangle ineq.)
        # (FVU_B itself need not fall monotonically: the quantisation error meets the SAE's
        # own residual in a cross term of either sign, and a value at a bin centre at B sits
        # on an edge at 2B)
        with torch.no_grad():
            acts = sae.encode(x).double()
            fired = acts > 0
            span = (acts.masked_fill(~fired, -math.inf).amax(0)
                    - acts.masked_fill(~fired, math.inf).amin(0)).nan_to_num(0, 0, 0).clamp_min(0)
            per_token = (fired.double() * span * sae.W_dec.double().norm(dim=1)).sum(1)
            var = float((x.double() - x.double().mean(0)).square().sum())
        for b in BINS:
            bound = math.sqrt(float((per_token / (2 * b)).square().sum()) / var)
            assert abs(math.sqrt(r.by_bins[b]["fvu"]) - math.sqrt(r.fvu)) <= bound + 1e-6


def test_quantised_fvu_is_the_definitions_dense_decode(random_results):
    """The quantised FVU at every B equals the definition computed the plain way: every fired
    value moved to its bin centre in a dense latent matrix, decoded by the dense product. The
    TopK SAE (8 of 128 fire) goes through mdl's per-fired-value decode, the random ReLU SAE
    (about half fire) through the dense one."""
    for sae, x, r in random_results.values():
        with torch.no_grad():
            acts = sae.encode(x).double()
            fired = acts > 0
            lo = acts.masked_fill(~fired, math.inf).amin(0)
            span = (acts.masked_fill(~fired, -math.inf).amax(0) - lo).nan_to_num(0, 0, 0)
            u = ((acts - lo) / torch.where(span > 0, span, torch.ones_like(span))).nan_to_num(0)
            var = float((x.double() - x.double().mean(0)).square().sum())
            for b in BINS:
                idx = (u * 256).floor().clamp(0, 255).long() >> int(math.log2(256 // b))
                q = torch.where(fired, lo + (idx + 0.5) * span / b, torch.zeros_like(acts))
                x_hat = q.float() @ sae.W_dec + sae.b_dec
                fvu = float((x.double() - x_hat.double()).square().sum()) / var
                assert r.by_bins[b]["fvu"] == pytest.approx(fvu, rel=1e-5), b


def test_fvu_falls_with_bins_when_quantisation_is_the_only_error():
    """A 'trained' SAE that reconstructs its data exactly (orthonormal decoder, encoder its
    transpose, data = sparse non-negative codes through the decoder): the quantised FVU falls as
    B doubles, towards 0."""
    torch.manual_seed(0)
    W_dec = torch.linalg.qr(torch.randn(32, 24, dtype=torch.float64))[0].T  # 24 orthonormal rows
    sae = build_sae(W_dec.T, torch.zeros(24), W_dec, b_dec=torch.randn(32, dtype=torch.float64))
    codes = torch.rand(4000, 24, dtype=torch.float64) * (torch.rand(4000, 24) < 0.2)
    x = codes @ W_dec + sae.b_dec.detach()
    r = description_length(sae, once(x, 500), tolerance=1e-3)
    fvus = [r.by_bins[b]["fvu"] for b in BINS]
    assert r.fvu < 1e-10
    assert all(a > b for a, b in itertools.pairwise(fvus))
    assert r.bins == select_bins(r.by_bins, 1e-3) and r.quantised_fvu <= 1e-3
    assert r.by_bins[r.bins // 2]["fvu"] > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(random_results):
    sae, x, r = random_results["topk"]
    g = description_length(sae.cuda(), once(x, 256), tolerance=2.0)  # CPU batches moved
    sae.cpu()
    assert g.l0 == r.l0 and g.bins == r.bins
    for b in BINS:
        for k in ("fvu", "bits_per_token"):
            assert g.by_bins[b][k] == pytest.approx(r.by_bins[b][k], rel=1e-4)


# -- choosing among SAEs ---------------------------------------------------------------------


def result(fvus, bits, l0=4.0, d_sae=1024, fvu=None):
    """A DescriptionLength from per-B quantised FVUs and DLs (lists over BINS[:len])."""
    by = {b: {"fvu": f, "bits_per_token": d, "naive_bound": naive_bound(l0, d_sae, b)}
          for b, f, d in zip(BINS, fvus, bits)}
    return DescriptionLength(None, None, None, None, l0=l0, fvu=fvu or min(fvus),
                             feasible=False, by_bins=by)


def test_choose_least_dl_among_feasible():
    results = {
        "narrow": result([0.30, 0.20, 0.15], [5.0, 6.0, 7.0]),  # infeasible at 0.1
        "wide": result([0.12, 0.09, 0.08], [9.0, 12.0, 14.0]),  # feasible at B=4: 12 bits
        "mid": result([0.11, 0.095, 0.09], [8.0, 10.0, 11.0]),  # feasible at B=4: 10 bits
    }
    key, msg = choose(results, 0.1)
    assert key == "mid" and "B=4" in msg and "2 of 3" in msg
    # tighter: only wide meets 0.085 (at B=8)
    assert choose(results, 0.085)[0] == "wide"
    # looser: narrow's B=2 is feasible at 0.3 with the least DL of all
    assert choose(results, 0.3)[0] == "narrow"


def test_choose_breaks_ties_by_naive_bound_then_key():
    a = result([0.05], [3.0], l0=8.0)
    b = result([0.05], [3.0], l0=4.0)
    assert choose({"a": a, "b": b}, 0.1)[0] == "b"  # lower naive bound
    assert choose({"z": b, "y": b}, 0.1)[0] == "y"  # then sorted key order


def test_choose_names_the_closest_when_none_is_feasible():
    results = {"a": result([0.4, 0.3, 0.25], [1, 2, 3]),
               "b": result([0.3, 0.2, 0.21], [1, 2, 3])}
    key, msg = choose(results, 0.1)
    assert key is None
    assert "no SAE meets tolerance 0.1" in msg and "closest is b" in msg
    assert "0.2 at B=4" in msg and "a tolerance of 0.2 or more" in msg
    assert choose({}, 0.1) == (None, "no SAEs to choose from")
