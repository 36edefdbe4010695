"""Sparse TopK autoencoder kernels: the whole TopK SAE forward and backward as one autograd
Function that never materialises a dense (n, d_sae) activation or gradient.

Follows sparsify's `fused_encoder.py` (a custom Function whose backward scatters instead of
doing dense matmuls) and `utils.py:eager_decode` (decode with `F.embedding_bag`), and goes
further on CPU:

- The encoder matmul is the only O(n·d_sae·d_in) work. Rows are processed in chunks and the
  top k of each chunk found with a recursive block-max pre-selection (the top k entries of a
  row lie in the k blocks with the largest maxima), cheaper than `torch.topk` over d_sae.
- Where bfloat16 matmuls are fast (CPUs with avx512_bf16/amx, CUDA) the candidates are found
  from a bfloat16 matmul, k + 8 per row, and their exact float32 values recomputed with a
  sampled matmul (SDDMM); the top k of those is the float32 top k unless bfloat16 rounding
  moves a true top-k latent below rank k + 8. Values, reconstructions and gradients are
  float32. sparsify uses bf16 autocast for the same matmul on GPU.
- Decoding is `embedding_bag`: O(n·k·d_in). The backward is O(n·k·d_in) as well: grad of the
  selected activations by SDDMM, grad W_dec and grad W_enc as one sort of the selected
  (token, latent) pairs by latent and two `embedding_bag` segment sums (`per_latent_sums`,
  shared with the CLT's and the shards' sparse backwards; no (n·k, d_in) intermediate as
  index_add_ would need), grad b_dec through the encoder as W_enc @ grad b_enc.
- AuxK (the top k_aux = d_in/2 dead latents reconstruct the residual) rides along: its pairs
  join the same sort, or, when there are at most 2·k_aux dead latents, it runs as small dense
  matmuls over the dead columns. Unlike sparsify (whose fused encoder drops the pre-activation
  gradient), AuxK's gradient reaches W_enc and b_enc, as in the eager reference and SAELens.
- W_enc is stored transposed (`SAE` docstring), so latent columns are contiguous rows for the
  SDDMM and the gradient of W_enc is returned in the parameter's own layout, without a copy.

`topk_autoencode_eager` is the reference the tests compare against (dense, plain autograd).
`SAECTL_EAGER=1` makes the TopK SAE use it; `SAECTL_BF16_SELECT=0/1` forces the bfloat16
candidate selection off or on (default: on where the hardware has fast bfloat16). Training
with `--autocast bfloat16` turns it on whatever the size and the hardware (saectl.precision):
the selection is this kernel's only dense product, so it is what bf16 training means here.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from saectl.precision import active_bf16, cpu_has_native_bf16

FAST = os.environ.get("SAECTL_EAGER", "").lower() not in ("1", "true", "yes")
"""Use the sparse kernels (chosen once at import; SAECTL_EAGER=1 turns them off)."""

SELECT_MARGIN = 8
"""Extra candidates per row kept from the bfloat16 pre-selection."""

BF16_MIN_NUMEL = 1 << 20
"""Encoders smaller than this (d_in·d_sae) select in float32 even where bfloat16 is fast."""

CHUNK_BYTES = 24 << 20
"""Budget for the chunk of (n, d_sae) pre-activations held at once: under glibc's largest mmap
threshold (32 MiB), so the buffer is recycled by malloc instead of page-faulted in anew."""


def _row_chunk(width: int, dtype: torch.dtype) -> int:
    rows = CHUNK_BYTES // (width * torch.finfo(dtype).bits // 8)
    return max(64, min(1024, 1 << max(rows, 1).bit_length() - 1))


_BF16_ENV = os.environ.get("SAECTL_BF16_SELECT")
_CPU_BF16 = cpu_has_native_bf16()


def bf16_select(device: torch.device, encoder_numel: int) -> bool:
    """Whether candidate selection runs in bfloat16: SAECTL_BF16_SELECT if set, else where the
    device has fast bfloat16 and the encoder is large enough to gain from it."""
    if _BF16_ENV is not None:
        return _BF16_ENV == "1"
    if encoder_numel < BF16_MIN_NUMEL:
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _CPU_BF16


# -- selection -----------------------------------------------------------------------------


def block_topk_indices(pre: Tensor, k: int, s: int = 8) -> Tensor:
    """Indices (c, k) of the k largest entries of each row of pre (c, F), unordered.

    Splits each row into F/s strided blocks of s entries ({b, b + F/s, ...}); the top k entries
    lie in the k blocks with the largest maxima, so the top k among those blocks' k·s entries
    are the answer (exact up to ties). The k blocks are found the same way, recursively; only
    short rows reach `torch.topk`, whose CPU cost per entry is ~20x that of `amax`.
    """
    pre = pre.contiguous()
    c, width = pre.shape
    if width % s or width // s < 2 * k:
        return pre.topk(k, dim=-1, sorted=False).indices
    nb = width // s
    blocks = pre.view(c, s, nb)
    block_ids = block_topk_indices(blocks.amax(1), k, s)  # (c, k)
    cand = blocks.gather(2, block_ids[:, None, :].expand(c, s, k)).reshape(c, s * k)
    j = cand.topk(k, dim=-1, sorted=False).indices  # into (s, k)
    return block_ids.gather(1, j % k) + (j // k) * nb


def _sddmm(cols: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """out[t, j] = A[t] · B[:, cols[t, j]] for cols (n, m): a sampled matmul (SDDMM)."""
    n, m = cols.shape
    if m == 0:
        return A.new_zeros(n, 0)
    if A.device.type in ("cpu", "cuda"):
        crow = torch.arange(0, n * m + 1, m, device=A.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(crow, cols.reshape(-1), A.new_zeros(n * m),
                                              size=(n, B.shape[1]), check_invariants=False)
            out = torch.sparse.sampled_addmm(pattern, A, B)
        return out.values().view(n, m)
    return torch.einsum("nd,nmd->nm", A, B.t()[cols])  # pragma: no cover - other devices


def exact_values(idx: Tensor, x_c: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    """pre[t, idx[t, j]] = x_c[t] · W_enc[:, idx[t, j]] + b_enc[idx[t, j]] in x_c's dtype: the
    exact values of candidates found from a bf16 product (also the sharded TopK's)."""
    return _sddmm(idx, x_c, W_enc) + b_enc[idx]


def _augmented(x_c: Tensor, W_enc: Tensor, b_enc: Tensor,
               dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """[x_c, 1] (n, d+1) and [W_enc; b_enc] (d+1, F), column-major like W_enc, in `dtype`:
    their product is pre with the bias added inside the matmul (no extra pass over (n, F))."""
    n, d = x_c.shape
    x_aug = x_c.new_empty(n, d + 1, dtype=dtype)
    x_aug[:, :d] = x_c
    x_aug[:, d] = 1
    W_aug_t = W_enc.new_empty(W_enc.shape[1], d + 1, dtype=dtype)
    W_aug_t[:, :d] = W_enc.t()
    W_aug_t[:, d] = b_enc
    return x_aug, W_aug_t.t()


def select_topk(x_c: Tensor, W_enc: Tensor, b_enc: Tensor, k: int,
                dead_idx: Tensor | None = None, k_aux: int = 0,
                bf16: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-k latents of pre = x_c @ W_enc + b_enc per row, without keeping pre.

    Returns (values, indices) of the top k (values ReLU'd), and (aux_values, aux_indices) of
    the top k_aux among the latents dead_idx (AuxK). Indices are sorted within each row.
    """
    n, width = x_c.shape[0], W_enc.shape[1]
    margin = SELECT_MARGIN if bf16 else 0
    kk = min(k + margin, width)
    n_dead = 0 if dead_idx is None else dead_idx.numel()
    k_aux = min(k_aux, n_dead)
    kk_aux = min(k_aux + margin, n_dead) if k_aux else 0
    idx = torch.empty(n, kk, dtype=torch.long, device=x_c.device)
    aux_idx = torch.empty(n, kk_aux, dtype=torch.long, device=x_c.device)
    x_aug, W_aug = _augmented(x_c, W_enc, b_enc, torch.bfloat16 if bf16 else x_c.dtype)
    chunk = _row_chunk(width, x_aug.dtype)
    buf = x_aug.new_empty(min(n, chunk), width)  # one buffer for all chunks
    vals = None if bf16 else torch.empty(n, kk, dtype=x_c.dtype, device=x_c.device)
    aux_vals = None if bf16 else torch.empty(n, kk_aux, dtype=x_c.dtype, device=x_c.device)
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        pre = torch.mm(x_aug[rows], W_aug, out=buf[: rows.stop - start])
        idx[rows] = block_topk_indices(pre, kk)
        if not bf16:
            vals[rows] = pre.gather(1, idx[rows])  # type: ignore[index]
        if kk_aux:
            local = block_topk_indices(pre.index_select(1, dead_idx), kk_aux)
            aux_idx[rows] = dead_idx[local]  # type: ignore[index]
            if not bf16:
                aux_vals[rows] = pre.gather(1, aux_idx[rows])  # type: ignore[index]
    del buf, pre
    if bf16:  # exact float32 values of the candidates, then the exact top k among them
        vals = exact_values(idx, x_c, W_enc, b_enc)
        vals, j = vals.topk(k, dim=-1, sorted=False)
        idx = idx.gather(1, j)
        if kk_aux:
            aux_vals = exact_values(aux_idx, x_c, W_enc, b_enc)
            aux_vals, j = aux_vals.topk(k_aux, dim=-1, sorted=False)
            aux_idx = aux_idx.gather(1, j)
        else:
            aux_vals = x_c.new_zeros(n, 0)
    assert vals is not None and aux_vals is not None
    idx, order = idx.sort(dim=-1)
    vals = vals.gather(1, order).relu_()
    if aux_idx.shape[1]:
        aux_idx, order = aux_idx.sort(dim=-1)
        aux_vals = aux_vals.gather(1, order).relu_()
    return vals, idx, aux_vals, aux_idx


# -- the autograd Function -------------------------------------------------------------------

DENSE_AUX_FACTOR = 2
"""AuxK over at most this many × k_aux dead latents runs as dense matmuls over the dead
columns (cheaper than sparse bookkeeping when nearly all of them are selected anyway)."""


def _decode(idx: Tensor, vals: Tensor, W_dec: Tensor) -> Tensor:
    return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")


def token_ids(idx: Tensor) -> Tensor:
    """The token (row) of each entry of idx (n, s), flattened: 0 s times, 1 s times, ..."""
    return torch.arange(idx.shape[0], device=idx.device).repeat_interleave(idx.shape[1])


def per_latent_sums(latents: Tensor, n_latents: int,
                    *sums: tuple[Tensor, Tensor, Tensor]) -> list[Tensor]:
    """Segment sums by latent: for each (rows, weights, table) in `sums`, the (n_latents, d)
    tensor whose row l is Σ_{i: latents[i] = l} weights[i] · table[rows[i]].

    The gradient of W_dec or W_enc at the selected (token, latent) pairs: one stable sort of the
    pairs by latent, shared by every sum, then one `embedding_bag` each, never an (n·k, d)
    intermediate as `index_add_` of the scaled rows would need. Latents never selected get 0.
    """
    order = torch.argsort(latents, stable=True)
    counts = torch.bincount(latents, minlength=n_latents)
    offsets = counts.cumsum(0) - counts
    return [F.embedding_bag(rows[order], table, offsets, per_sample_weights=weights[order],
                            mode="sum") for rows, weights, table in sums]


def _dense_aux(x_c: Tensor, W_enc: Tensor, b_enc: Tensor, dead_idx: Tensor,
               k_aux: int) -> Tensor:
    """ReLU'd top-k_aux of the exact pre-activations of the dead latents, dense (n, n_dead)."""
    pre = torch.addmm(b_enc[dead_idx], x_c, W_enc.t()[dead_idx].t())
    if k_aux < dead_idx.numel():
        keep = torch.zeros_like(pre, dtype=torch.bool)
        keep.scatter_(1, block_topk_indices(pre, k_aux), True)
        pre = pre * keep
    return pre.relu_()


class _TopKAutoencode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, k, dead_idx, k_aux, bf16):  # type: ignore[override]
        x_c = (x - b_dec).contiguous()
        n_dead = 0 if dead_idx is None or k_aux == 0 else dead_idx.numel()
        dense_aux = 0 < n_dead <= DENSE_AUX_FACTOR * k_aux
        vals, idx, aux_vals, aux_idx = select_topk(
            x_c, W_enc, b_enc, k, None if dense_aux else dead_idx, k_aux, bf16)
        x_hat = _decode(idx, vals, W_dec) + b_dec
        aux_hat, aux_acts = x.new_zeros(0), x.new_zeros(0)
        if dense_aux:
            aux_acts = _dense_aux(x_c, W_enc, b_enc, dead_idx, k_aux)
            aux_hat = aux_acts @ W_dec[dead_idx]
        elif aux_idx.shape[1]:
            aux_hat = _decode(aux_idx, aux_vals, W_dec)
        ctx.save_for_backward(x_c, W_enc, W_dec, vals, idx, aux_vals, aux_idx, aux_acts,
                              dead_idx if dense_aux else None)
        ctx.mark_non_differentiable(idx)
        return x_hat, vals, idx, aux_hat

    @staticmethod
    def backward(ctx, g_hat, g_vals, _g_idx, g_aux):  # type: ignore[override]
        x_c, W_enc, W_dec, vals, idx, aux_vals, aux_idx, aux_acts, dead_idx = ctx.saved_tensors
        n, width = x_c.shape[0], W_enc.shape[1]
        has_aux = g_aux is not None and g_aux.numel() > 0
        sparse_aux = has_aux and aux_idx.shape[1] > 0
        dense_aux = has_aux and dead_idx is not None
        g_hat = g_hat.contiguous()
        # grad of the selected activations (through the decoder), then through the ReLU
        gv = _sddmm(idx, g_hat, W_dec.t())
        if g_vals is not None:
            gv = gv + g_vals
        gpre = gv * (vals > 0)
        # one sort of all (token, latent) pairs by latent, then segment sums per latent
        lat, tok = [idx.reshape(-1)], [token_ids(idx)]
        dec_tok, dec_w, enc_w = [tok[0]], [vals.reshape(-1)], [gpre.reshape(-1)]
        if sparse_aux:
            g_aux = g_aux.contiguous()
            ga = _sddmm(aux_idx, g_aux, W_dec.t()) * (aux_vals > 0)
            aux_tok = token_ids(aux_idx)
            lat.append(aux_idx.reshape(-1))
            tok.append(aux_tok)
            dec_tok.append(aux_tok + n)  # rows of g_aux in the stacked table below
            dec_w.append(aux_vals.reshape(-1))
            enc_w.append(ga.reshape(-1))
        latents, enc_weights = torch.cat(lat), torch.cat(enc_w)
        dec_table = torch.cat([g_hat, g_aux]) if sparse_aux else g_hat
        grad_W_dec, grad_W_enc_t = per_latent_sums(
            latents, width, (torch.cat(dec_tok), torch.cat(dec_w), dec_table),
            (torch.cat(tok), enc_weights, x_c))
        grad_b_enc = torch.zeros(width, dtype=x_c.dtype, device=x_c.device)
        grad_b_enc.index_add_(0, latents, enc_weights)
        if dense_aux:
            g_aux = g_aux.contiguous()
            ga_dense = (g_aux @ W_dec[dead_idx].t()) * (aux_acts > 0)  # (n, n_dead)
            grad_W_dec.index_add_(0, dead_idx, aux_acts.t() @ g_aux)
            grad_W_enc_t.index_add_(0, dead_idx, ga_dense.t() @ x_c)
            grad_b_enc.index_add_(0, dead_idx, ga_dense.sum(0))
        grad_b_dec = g_hat.sum(0) - W_enc @ grad_b_enc
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _decode(idx, gpre, W_enc.t())
            if sparse_aux:
                grad_x = grad_x + _decode(aux_idx, ga, W_enc.t())
            if dense_aux:
                grad_x = grad_x + ga_dense @ W_enc.t()[dead_idx]
        return (grad_x, grad_W_enc_t.t(), grad_b_enc, grad_W_dec, grad_b_dec,
                None, None, None, None)


def topk_autoencode(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor,
                    k: int, dead_idx: Tensor | None = None, k_aux: int = 0, *,
                    bf16: bool | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """TopK SAE forward with a sparse backward.

    Returns x_hat (n, d_in) = decode(topk acts) + b_dec, the top-k values and indices (n, k)
    (indices sorted within rows), and aux_hat (n, d_in) = decode of the top-k_aux latents
    among dead_idx without b_dec (an empty tensor when k_aux == 0 or no dead latents).
    bf16: select candidates in bfloat16 (module docstring); None decides by the hardware and
    the size (small encoders gain nothing from it). Under bf16 autocast (`saectl train
    --autocast bfloat16`) it is always on.
    """
    if active_bf16(x.device):  # `--autocast bfloat16` (saectl.precision): always select in bf16
        bf16 = True
    elif bf16 is None:
        bf16 = x.dtype == torch.float32 and bf16_select(x.device, W_enc.numel())
    # Autocast off inside: the one bf16 product is the selection's, chosen above; the exact
    # values, the sparse decode, the dense AuxK and the backward stay fp32 (precision.py).
    with torch.autocast(x.device.type, enabled=False):
        return _TopKAutoencode.apply(x, W_enc, b_enc, W_dec, b_dec, k, dead_idx, k_aux, bf16)


def topk_autoencode_eager(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor,
                          b_dec: Tensor, k: int, dead_idx: Tensor | None = None,
                          k_aux: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference for `topk_autoencode`: dense matmuls, torch.topk, plain autograd."""
    pre = (x - b_dec) @ W_enc + b_enc
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    idx, order = idx.sort(dim=-1)
    vals = vals.gather(1, order).relu()
    acts = torch.zeros_like(pre).scatter(1, idx, vals)
    x_hat = acts @ W_dec + b_dec
    n_dead = 0 if dead_idx is None else dead_idx.numel()
    k_aux = min(k_aux, n_dead)
    if k_aux == 0:
        return x_hat, vals, idx, x.new_zeros(0)
    assert dead_idx is not None
    aux_vals, local = pre[:, dead_idx].topk(k_aux, dim=-1, sorted=False)
    aux_acts = torch.zeros_like(pre).scatter(1, dead_idx[local], aux_vals.relu())
    return x_hat, vals, idx, aux_acts @ W_dec


class SparseDecode(torch.autograd.Function):
    """Σ_j vals[t, j] · W_dec[idx[t, j]] (n, d_out) for latents idx (n, s) chosen elsewhere (a
    CLT's, a shard's), with the TopK kernels' backward: a sampled matmul for the values'
    gradient and one sort by latent for W_dec's."""

    @staticmethod
    def forward(ctx, idx, vals, W_dec):  # type: ignore[override]
        ctx.save_for_backward(idx, vals, W_dec)
        return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        idx, vals, W_dec = ctx.saved_tensors
        g = g.contiguous()
        g_vals = _sddmm(idx, g, W_dec.t())
        (grad_W_dec,) = per_latent_sums(idx.reshape(-1), W_dec.shape[0],
                                        (token_ids(idx), vals.reshape(-1), g))
        return None, g_vals, grad_W_dec
