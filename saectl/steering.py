"""Steering a model with SAE features, and measuring what it did (the maths of `saectl steer`,
stages/steer.py; docs/architecture.md).

Interventions at the SAE's hook point (SAELens's steering hooks; Templeton et al. 2024,
"Scaling Monosemanticity", for clamping with the error term kept):

- **add**: x ← x + Σ s_f·d_f, with d_f = W_dec[f], the feature's decoder row.
- **clamp**: encode x, set a_f to s_f, decode, and add back the SAE's error x − x̂, so nothing
  but the feature moves: x ← x̂(a with a_f = s_f) + (x − x̂(a)) = x + (s_f − a_f)·d_f.
- **ablate**: clamp to 0.

A transcoder reads one hook and writes another: its latents are read at its input (an MLP's),
and add mode adds s_f·d_f to its output (the MLP's). A cross-layer transcoder's latent f writes
to its own layer's MLP output and every later one: add mode adds each block of d_f at the layer
it belongs to, as the replacement model would (`Sites`). Clamp needs the latent read and written
at one place, so it is for SAEs only.

Strengths here are raw activation units (s·d_f is what the feature writes when it fires at s).
Generation is greedy, or sampled from a generator seeded per prompt, so baseline and steered
runs draw the same numbers and differ only by the intervention. Figures of one continuation
(`Measure`), per prompt and averaged over prompts (`mean_figures`):

- `act[f]`: mean activation of f over the generated tokens, read where the SAE reads while
  the *unmodified* model runs over prompt + continuation: what the text evokes, not the pushed
  activation itself (which add mode would raise by construction).
- `dlogp[f]`: mean over generation steps of log P_steered(T_f) − log P_base(T_f), T_f the
  feature's top logit-lens tokens, both distributions on the same (steered) context.
- `kl`: mean over generation steps of KL(P_base ‖ P_steered), nats, on the steered context.
- `ppl`: perplexity of the continuation under the unmodified model (fluency).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch

from saectl.console import progress
from saectl.errors import ConfigError
from saectl.hooks import HookPoint, editing, forward_logits, generate, hook_dim, parse_hooks
from saectl.layout import layer_range


@dataclass(frozen=True)
class Sites:
    """Where an SAE's latents read and where its decoder writes, in the model: one hook for an
    SAE; the input and the output hook for a transcoder; each covered layer's MLP input and
    output for a cross-layer transcoder (whose decoder row is one block of d per written layer,
    zero for the layers before the latent's own)."""

    reads: list[HookPoint]
    writes: list[HookPoint]


def sites_of(model, lin, name: str) -> Sites:
    """Where the SAE of lineage `lin` reads and writes in `model` (named `name` in errors): its
    hook; a transcoder's input and target; each layer of a cross-layer transcoder's ranges.
    Raises ConfigError where the model's widths are not the SAE's."""
    reads = parse_hooks(model, layer_range(lin.hook) or [lin.hook])
    writes = parse_hooks(model, layer_range(lin.target) or [lin.target]) if lin.target else reads
    for hook in {*reads, *writes}:
        width = hook_dim(model, hook)
        if width * len(reads) != lin.d_in:
            raise ConfigError(f"{name} has width {width} at {hook.name} but the SAE takes "
                              f"{lin.d_in // len(reads)}; pass the model the SAE was trained on")
    return Sites(reads, writes)


def latents(sae, acts: list[torch.Tensor]) -> torch.Tensor:
    """The SAE's latents (..., d_sae) from the activations at `Sites.reads` (a CLT's layers
    side by side, as it was trained)."""
    x = acts[0] if len(acts) == 1 else torch.cat(acts, -1)
    return sae.encode(x.float())


def decoder_writes(W_dec, features: list[int], n_writes: int) -> torch.Tensor:
    """(n_writes, n_f, d): each feature's decoder row cut into what it writes at each hook."""
    rows = W_dec[features]
    return rows.view(len(features), n_writes, -1).transpose(0, 1)


def clamp(sae, x, features: list[int], targets):
    """(x with each feature's activation set to its target and the SAE's error term kept, the
    clamped activations). x (..., d_in); targets (n_f,). Computed as x + (t − a_f)·d_f, which is
    x̂(clamped) + (x − x̂) exactly, without the rounding of adding the error back."""
    acts = sae.encode(x.float())
    clamped = acts.clone()
    clamped[..., features] = targets.to(acts.dtype)
    delta = (clamped[..., features] - acts[..., features]) @ sae.W_dec[features]
    return (x + delta.to(x.dtype)), clamped


def _from(start: int, change):
    """edit(act, positions) that applies change(x) to the positions >= `start` only. Raises
    FloatingPointError when the result is not finite."""

    def edit(act, positions):
        mask = positions >= start
        if not bool(mask.any()):
            return act
        new = change(act[..., mask, :])
        if not bool(torch.isfinite(new).all()):
            raise FloatingPointError("the steered activations are inf/NaN")
        out = act.clone()
        out[..., mask, :] = new
        return out

    return edit


def intervention(sae, features: list[int], raw, mode: str, start: int):
    """edit(act, positions) at the SAE's one hook, for hooks.generate and teacher-forced
    passes: steers the positions >= `start` by `raw` (n_f,) strengths in activation units
    (ablate is clamp to 0)."""
    if mode == "add":
        with torch.no_grad():
            push = raw.to(sae.dtype) @ sae.W_dec[features]  # Σ s_f·d_f
        return _from(start, lambda x: x + push.to(x.dtype))
    return _from(start, lambda x: clamp(sae, x, features, raw)[0])


def interventions(sae, sites: Sites, features: list[int], raw, mode: str, start: int):
    """[(hook, edit)] for `hooks.generate`: `intervention` at an SAE's or a transcoder's one
    hook; for a cross-layer transcoder (add mode only) each written hook gets Σ s_f·d_f of the
    features' blocks there, and hooks they do not write to are left alone."""
    if len(sites.writes) == 1:
        return [(sites.writes[0], intervention(sae, features, raw, mode, start))]
    assert mode == "add", "a cross-layer transcoder is steered by adding its writes"
    with torch.no_grad():
        pushes = (raw.to(sae.dtype)[None, None] @ decoder_writes(sae.W_dec, features,
                                                                  len(sites.writes)))[:, 0]
    return [(hook, _from(start, lambda x, p=push: x + p.to(x.dtype)))
            for hook, push in zip(sites.writes, pushes) if bool(push.ne(0).any())]


class Measure:
    """The effect figures of one continuation (module docstring): one pass of the unmodified
    model over prompt + continuation (the activations the latents read, and next-token
    distributions), and for a steered run one teacher-forced pass with the interventions."""

    def __init__(self, model, sites: Sites, sae, features: list[int], lens):
        self.model, self.sites, self.sae, self.features, self.lens = (model, sites, sae,
                                                                      features, lens)

    def _pass(self, seq, edits=()):
        """(log-probabilities (seq, vocab), the activations at the read hooks (seq, d) of an
        unmodified pass; none for an edited one)."""
        fns = [(hook, lambda a, e=e: e(a, torch.arange(a.shape[1], device=a.device)))
               for hook, e in edits]
        reads, seen = ([] if edits else self.sites.reads), {}
        with torch.inference_mode(), editing(self.model, fns, reads, seen):
            logits = forward_logits(self.model, seq)[0].float()
        if not bool(torch.isfinite(logits).all()):
            raise FloatingPointError("the logits are inf/NaN")
        return logits.log_softmax(-1), [seen[h.name][0] for h in reads]

    def _clean(self, ids, new):
        seq = torch.tensor([list(ids) + new.tolist()])
        P, n = len(ids), len(new)
        logp, read = self._pass(seq)
        with torch.inference_mode():
            acts = latents(self.sae, read)[:, self.features].cpu()
        logp = logp[P - 1:P + n - 1]  # the distributions the new tokens were drawn from
        nll = -logp.gather(1, new.view(-1, 1).to(logp.device)).mean()
        return seq, logp, acts, {"tokens": n, "ppl": float(nll.exp()),
                                 "act": self._per_feature(acts[P:P + n].mean(0))}

    def _per_feature(self, values) -> dict:
        return {str(f): float(v) for f, v in zip(self.features, values.tolist())}

    def baseline(self, ids, new) -> dict:
        _, _, acts, figs = self._clean(ids, new)
        figs["act_max"] = self._per_feature(acts[1:].max(0).values)  # all but BOS
        return figs

    def steered(self, ids, new, edits) -> dict:
        seq, logp_u, _, figs = self._clean(ids, new)
        P, n = len(ids), len(new)
        logp_s = self._pass(seq, edits)[0][P - 1:P + n - 1]
        kl = (logp_u.exp() * (logp_u - logp_s)).sum(-1).mean()
        lens = self.lens.to(logp_u.device)
        dlogp = [(logp_s[:, lens[j]].logsumexp(-1) - logp_u[:, lens[j]].logsumexp(-1)).mean()
                 for j in range(len(self.features))]
        figs.update(kl=float(kl), dlogp=self._per_feature(np.array([float(d) for d in dlogp])))
        return figs


def mean_figures(per_prompt: list[dict]) -> dict:
    """`Measure`'s figures over several prompts: means, except the largest activation over all
    prompts, the token count summed and the perplexity of all continuations together."""
    out = {}
    for key, value in per_prompt[0].items():
        if isinstance(value, dict):  # per feature; the largest activation over all prompts
            agg = np.max if key == "act_max" else np.mean
            out[key] = {f: float(agg([d[key][f] for d in per_prompt])) for f in value}
        elif key == "tokens":
            out[key] = sum(d[key] for d in per_prompt)
        elif key == "ppl":  # the perplexity of all continuations together
            n = sum(d["tokens"] for d in per_prompt)
            out[key] = float(math.exp(sum(d["tokens"] * math.log(d["ppl"])
                                          for d in per_prompt) / n))
        else:
            out[key] = float(np.mean([d[key] for d in per_prompt]))
    return out


class Overflow(FloatingPointError):
    """A steered run drove the activations or logits to inf/NaN: which run, which prompt."""

    def __init__(self, run: int, prompt: int, why: str):
        super().__init__(why)
        self.run, self.prompt = run, prompt


@dataclass
class Generated:
    """New token ids (n,) per prompt and their figures, of the baseline and of every run."""

    baseline: list[torch.Tensor]
    baseline_figures: list[dict]
    steered: list[list[torch.Tensor]]
    """[run][prompt]"""
    steered_figures: list[list[dict]]


def steer_prompts(model, sites: Sites, sae, features: list[int], lens,
                  prompt_ids: list[list[int]], raw_runs: list[torch.Tensor], *, mode: str,
                  generated_only: bool, max_new_tokens: int, temperature: float = 0.0,
                  seed: int = 0, stop_ids: Collection[int] = ()) -> Generated:
    """Continue every prompt without steering, then with each run's raw strengths (n_f,), and
    measure each continuation. Prompts start with BOS, which is never steered (training left
    it out); with `generated_only`, only the positions that produce new tokens are (the last
    prompt position and every generated one). Raises `Overflow` on inf/NaN."""
    m = Measure(model, sites, sae, features, lens)

    def continuation(i, ids, edits=()):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        return generate(model, torch.tensor([ids]), max_new_tokens, edits=edits,
                        temperature=temperature, generator=g, stop_ids=stop_ids)

    out = Generated([], [], [[] for _ in raw_runs], [[] for _ in raw_runs])
    with progress("steer", len(prompt_ids) * (1 + len(raw_runs)), "generations") as bar:
        for i, ids in enumerate(prompt_ids):
            new = continuation(i, ids)
            out.baseline.append(new)
            out.baseline_figures.append(m.baseline(ids, new))
            bar.advance(1)
            start = len(ids) - 1 if generated_only else 1
            for r, raw in enumerate(raw_runs):
                edits = interventions(sae, sites, features, raw, mode, start)
                try:
                    new = continuation(i, ids, edits)
                    out.steered[r].append(new)
                    out.steered_figures[r].append(m.steered(ids, new, edits))
                except FloatingPointError as e:
                    raise Overflow(r, i, str(e)) from None
                bar.advance(1)
    return out
