"""Latents sharded across ranks (tensor parallel) for SAEs too wide for one device: `saectl
train --shards S` under torchrun or srun (saectl.distributed), TopK and BatchTopK.

The ranks form a 2-D mesh (torch.distributed.device_mesh): `data` × `latents`, S ranks per
latent group. Each rank of a latent group holds latents [r·m/S, (r+1)·m/S): those columns of
W_enc and b_enc, those rows of W_dec, their Adam state; b_dec (and a skip transcoder's W_skip)
is held by every rank. The ranks of a latent group read the same rows; the data groups read
disjoint parts of each global batch, as in plain data parallelism.

One step, as Megatron-LM splits a two-matrix MLP:
- every rank computes its latents' pre-activations from the full input (`_CopyToShards`:
  identity forward; its backward sums the input's gradient over the shards, so b_dec, which
  the input is centred by, gets every shard's share); for TopK without gradient, the gradient
  then flowing only through the chosen latents (`_Selected`, `kernels.SparseDecode`: the TopK
  kernels' sparse backward), for BatchTopK (whose count per token varies) densely;
- TopK: each rank's k best per token are all-gathered and the k-th largest of the S·k is the
  token's cut, so the rank keeps exactly its latents among the global top k; BatchTopK: the
  k·B largest over the whole global batch and every shard (`distributed.keep_largest`);
- each rank decodes its own latents and the partial reconstructions are summed (`_SumShards`:
  all-reduce forward, identity backward: every rank holds the same loss, so the gradient of a
  partial sum is the gradient of the sum);
- AuxK the same way over the dead latents, with the k_aux cut taken across shards.
So a sharded run takes the steps an unsharded one takes (tests/test_distributed.py), up to the
order of floating-point sums. Checkpoints and the saved SAE are gathered into the unsharded
layout, so a run resumes with any number of ranks or shards and the address does not depend
on them. The full SAE exists on every rank only while the run starts (it is initialised
whole, from the seed, then cut) and while it is gathered for a checkpoint or the artifact.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from saectl import distributed
from saectl.errors import ConfigError
from saectl.sae import ARCHS, SAE, kernels
from saectl.sae.base import ForwardOutput
from saectl.sae.topk import top_k

ARCHS_SHARDED = ("topk", "batchtopk")

SAE_SHARD_DIM = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "threshold": 0}
"""The dimension of each of an SAE's tensors that runs over latents (the rest are whole on
every rank: b_dec, W_skip)."""


def check(arch: str, d_sae: int, shards: int, world: int) -> None:
    """One-line errors for a sharding the run cannot take."""
    if shards < 1:
        raise ConfigError(f"--shards {shards} must be at least 1")
    if shards == 1:
        return
    if arch not in ARCHS_SHARDED:
        raise ConfigError(f"--shards splits the latents of {' and '.join(ARCHS_SHARDED)} SAEs, "
                          f"not {arch}; drop --shards or use --arch topk")
    if world % shards:
        raise ConfigError(f"{world} ranks do not split into groups of {shards} shards; run a "
                          f"multiple of {shards} ranks (torchrun --nproc-per-node, srun -n)")
    if d_sae % shards:
        raise ConfigError(f"the width {d_sae} does not divide into {shards} shards; choose a "
                          f"--width divisible by {shards}")


class _CopyToShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _SumShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, part, group):  # type: ignore[override]
        out = part.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g, None


def _gather_cols(values: Tensor, group) -> Tensor:
    """(n, c) on each of S ranks → (n, S·c), in rank order."""
    parts = [torch.empty_like(values) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, values.contiguous(), group=group)
    return torch.cat(parts, 1)


@torch.no_grad()
def _candidates(pre: Tensor, k: int, group, x_c: Tensor, sae: SAE,
                allowed: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(idx, vals, keep), each (n, min(k, m_local)): this rank's best latents per row, their
    pre-activations in the weights' dtype, and which of them are among the row's global top k
    over every shard's columns; `allowed` restricts the candidates (AuxK's dead latents).

    Under bf16 autocast `pre` is a bf16 product: as the TopK kernel does, k + SELECT_MARGIN
    candidates are taken from it and their exact fp32 values recomputed, so the cut, the kept
    latents and their activations are fp32's (bf16 values tie often: a cut over them would keep
    more than k)."""
    if allowed is not None:
        pre = pre.masked_fill(~allowed, float("-inf"))
    m = pre.shape[1]
    if pre.dtype == sae.dtype:
        vals, idx = top_k(pre, min(k, m))
    else:
        idx = kernels.block_topk_indices(pre, min(k + kernels.SELECT_MARGIN, m))
        vals = kernels.exact_values(idx, x_c, sae.W_enc, sae.b_enc)
        vals = vals.masked_fill(pre.gather(1, idx) == float("-inf"), float("-inf"))
        vals, j = vals.topk(min(k, m), dim=-1, sorted=False)
        idx = idx.gather(1, j)
    cut = _gather_cols(vals, group).topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    return idx, vals, (vals >= cut) & torch.isfinite(vals)


class _Selected(torch.autograd.Function):
    """The pre-activations `vals` (n, s) of latents `idx` (n, s), computed without gradient,
    with a sparse backward as the TopK kernels': W_enc, b_enc and the input x_c get gradient
    only through those latents, never through a dense (n, m) product."""

    @staticmethod
    def forward(ctx, vals, x_c, W_enc, b_enc, idx):  # type: ignore[override]
        ctx.save_for_backward(x_c, W_enc, idx)
        return vals.clone()

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x_c, W_enc, idx = ctx.saved_tensors
        g = g.contiguous()
        latents, weights = idx.reshape(-1), g.reshape(-1)
        (grad_t,) = kernels.per_latent_sums(latents, W_enc.shape[1],
                                            (kernels.token_ids(idx), weights, x_c))  # (m, d)
        grad_b = torch.zeros(W_enc.shape[1], dtype=g.dtype, device=g.device).index_add_(
            0, latents, weights)
        grad_x = F.embedding_bag(idx, W_enc.t(), per_sample_weights=g, mode="sum")
        return None, grad_x, grad_t.t(), grad_b, None


def _pick(x_c: Tensor, sae: SAE, vals: Tensor, idx: Tensor, keep: Tensor) -> Tensor:
    """The kept latents' activations (n, s), differentiable through `_Selected`."""
    vals = _Selected.apply(vals.masked_fill(~keep, 0), x_c, sae.W_enc, sae.b_enc, idx)
    return vals.relu() * keep


class Sharded(nn.Module):
    """This rank's slice of a TopK or BatchTopK SAE (module docstring): trains like the SAE."""

    def __init__(self, full: SAE, shard: int, shards: int, group):
        super().__init__()
        self.cfg, self.shard, self.shards, self.group = full.cfg, shard, shards, group
        m = full.d_sae // shards
        self.lo, self.hi = shard * m, (shard + 1) * m
        local_cfg = dataclasses.replace(full.cfg, d_sae=m)
        self.local = ARCHS[full.cfg.arch](local_cfg)
        self.local.load_state_dict(self.slice_state(full.state_dict()))
        self.local.to(full.device).train()

    # what the trainer asks of an SAE
    uses_auxk = True
    unit_norm_decoder = True

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def W_dec(self) -> nn.Parameter:
        return self.local.W_dec

    def slice_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """This shard's part of a whole SAE's state dict."""
        return {k: (v.narrow(SAE_SHARD_DIM[k], self.lo, self.hi - self.lo).clone()
                    if k in SAE_SHARD_DIM else v.clone()) for k, v in state.items()}

    def full_state(self) -> dict[str, Tensor]:
        """The whole SAE's state dict, gathered from every shard (a collective)."""
        out = {}
        for k, v in self.local.state_dict().items():
            if k not in SAE_SHARD_DIM:
                out[k] = v.detach().clone()
                continue
            parts = [torch.empty_like(v) for _ in range(self.shards)]
            dist.all_gather(parts, v.detach().contiguous(), group=self.group)
            out[k] = torch.cat(parts, SAE_SHARD_DIM[k])
        return out

    def forward(self, x: Tensor, *, target: Tensor | None = None,
                dead_mask: Tensor | None = None, auxk_coefficient: float = 0.0,
                sparsity_scale: float = 1.0) -> ForwardOutput:
        sae, k = self.local, self.cfg.k
        x = x.to(sae.dtype)
        y = sae.target_of(x, target)
        x_c = _CopyToShards.apply(sae.encoder_input(x), self.group)
        if self.cfg.arch == "topk":  # the one dense product, without gradient (TopK kernels)
            with torch.no_grad():
                pre = torch.addmm(sae.b_enc, x_c, sae.W_enc)  # (n, m/S)
            idx, vals, keep = _candidates(pre, k, self.group, x_c, sae)
            vals = _pick(x_c, sae, vals, idx, keep)
            part = kernels.SparseDecode.apply(idx, vals, sae.W_dec)
        else:  # batchtopk: the k·B largest of the global batch over every shard, dense
            pre = torch.addmm(sae.b_enc, x_c, sae.W_enc)
            n_global = pre.shape[0] * distributed.data_part()[1]
            flat = pre.relu().flatten()
            keep = distributed.keep_largest(flat.detach(), k * n_global)
            acts = flat.mul(keep & (flat > 0)).view_as(pre)
            sae.update_threshold(acts.detach())
            idx, vals, part = None, acts, acts @ sae.W_dec
        x_hat = _SumShards.apply(part, self.group) + sae.b_dec
        terms = {}
        if dead_mask is not None and auxk_coefficient > 0 and bool(dead_mask.any()):
            num_dead = int(dead_mask.sum())  # over every shard: the mask is the whole SAE's
            k_aux = min(self.cfg.d_in // 2, num_dead)
            mine = dead_mask[self.lo:self.hi].expand_as(pre)
            a_idx, a_vals, a_keep = _candidates(pre.detach(), k_aux, self.group, x_c, sae, mine)
            e_part = kernels.SparseDecode.apply(a_idx, _pick(x_c, sae, a_vals, a_idx, a_keep),
                                                sae.W_dec)
            e_hat = _SumShards.apply(e_part, self.group)
            auxk = (e_hat - (y - x_hat).detach()).pow(2).sum(-1).mean()
            terms["auxk_loss"] = auxk_coefficient * min(num_dead / (self.cfg.d_in // 2), 1.0) * auxk
        mse = (x_hat - y).pow(2).sum(-1).mean()
        losses = {"mse": mse, **terms, "loss": sum(terms.values(), mse)}
        with torch.no_grad():
            active = vals > 0
            counts = torch.stack([active.sum().to(torch.float64)])
            dist.all_reduce(counts, group=self.group)
            l0 = (counts[0] / max(x.shape[0], 1)).to(torch.float32)
            fired = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=x.device)
            fired[self.lo:self.hi] = (active.any(0) if idx is None else
                                      torch.zeros(self.hi - self.lo, dtype=torch.bool,
                                                  device=x.device).index_fill_(0, idx[active], True))
            acts = vals.detach()  # this shard's latents: (n, m/S) dense, or as sparse COO
            if idx is not None:
                acts = torch.sparse_coo_tensor(torch.stack([kernels.token_ids(idx),
                                                            idx.reshape(-1) + self.lo]),
                                               acts.reshape(-1), (idx.shape[0], self.cfg.d_sae))
        return ForwardOutput(x_hat, acts, losses, l0, fired)


# -- the trainer's state: Adam's moments cut and gathered like the parameters ------------------


def param_shard_dims(trainer) -> list[int | None]:
    """For each tensor the optimizer steps (the trainer's contiguous aliases, in its order), the
    dimension that runs over latents, or None for a tensor every rank holds whole."""
    sae = trainer.sae
    local = sae.local if isinstance(sae, Sharded) else sae
    dims = {id(local.W_dec): 0, id(local.b_enc): 0, id(local.W_enc): 1}
    of_alias = {}
    for p, alias in trainer._aliases:
        d = dims.get(id(p))
        of_alias[id(alias)] = d if d is None or alias is p else 1 - d  # W_enc's alias: W_encᵀ
    return [of_alias[id(a)] for group in trainer.optimizer.param_groups for a in group["params"]]


def slice_optimizer_state(state: dict, dims: list[int | None], lo: int, hi: int) -> dict:
    """A whole SAE's optimizer state dict → one shard's (moments narrowed to [lo, hi))."""
    out = {"param_groups": state["param_groups"], "state": {}}
    for i, s in state["state"].items():
        d = dims[int(i)]
        out["state"][i] = {k: (v.narrow(d, lo, hi - lo).clone()
                               if d is not None and torch.is_tensor(v) and v.dim() > 0 else v)
                           for k, v in s.items()}
    return out


def gather_optimizer_state(state: dict, dims: list[int | None], group, shards: int) -> dict:
    """One shard's optimizer state dict → the whole SAE's (a collective)."""
    out = {"param_groups": state["param_groups"], "state": {}}
    for i in sorted(state["state"], key=int):
        s, d = state["state"][i], dims[int(i)]
        full = {}
        for k, v in s.items():
            if d is None or not torch.is_tensor(v) or v.dim() == 0:
                full[k] = v
                continue
            parts = [torch.empty_like(v) for _ in range(shards)]
            dist.all_gather(parts, v.contiguous(), group=group)
            full[k] = torch.cat(parts, d)
        out["state"][i] = full
    return out
