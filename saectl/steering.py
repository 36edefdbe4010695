"""Steering a model with SAE features, and measuring what it did (the maths of `saectl steer`,
stages/steer.py; docs/architecture.md).

Interventions at the SAE's hook point (SAELens's steering hooks; Templeton et al. 2024,
"Scaling Monosemanticity", for clamping with the error term kept):

- **add**: x ← x + Σ s_f·d_f, with d_f = W_dec[f], the feature's decoder row.
- **clamp**: encode x, set a_f to s_f, decode, and add back the SAE's error x − x̂, so nothing
  but the feature moves: x ← x̂(a with a_f = s_f) + (x − x̂(a)) = x + (s_f − a_f)·d_f.
- **ablate**: clamp to 0.

Strengths here are raw activation units (s·d_f is what the feature writes when it fires at s).
Generation is greedy, or sampled from a generator seeded per prompt, so baseline and steered
runs draw the same numbers and differ only by the intervention. Figures of one continuation
(`Measure`), per prompt and averaged over prompts (`mean_figures`):

- `act[f]`: mean activation of f over the generated tokens, read at the hook by the SAE while
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
from saectl.hooks import HookPoint, generate, run_with_replacement


def clamp(sae, x, features: list[int], targets):
    """(x with each feature's activation set to its target and the SAE's error term kept, the
    clamped activations). x (..., d_in); targets (n_f,). Computed as x + (t − a_f)·d_f, which is
    x̂(clamped) + (x − x̂) exactly, without the rounding of adding the error back."""
    acts = sae.encode(x.float())
    clamped = acts.clone()
    clamped[..., features] = targets.to(acts.dtype)
    delta = (clamped[..., features] - acts[..., features]) @ sae.W_dec[features]
    return (x + delta.to(x.dtype)), clamped


def intervention(sae, features: list[int], raw, mode: str, start: int):
    """edit(act, positions) for hooks.generate and teacher-forced passes: steers the positions
    >= `start` by `raw` (n_f,) strengths in activation units (ablate is clamp to 0). Raises
    FloatingPointError when the result is not finite."""
    with torch.no_grad():
        push = raw.to(sae.dtype) @ sae.W_dec[features]  # add mode: Σ s_f·d_f

    def edit(act, positions):
        mask = positions >= start
        if not bool(mask.any()):
            return act
        x = act[..., mask, :]
        if mode == "add":
            new = x + push.to(x.dtype)
        else:
            new = clamp(sae, x, features, raw)[0]
        if not bool(torch.isfinite(new).all()):
            raise FloatingPointError("the steered activations are inf/NaN")
        out = act.clone()
        out[..., mask, :] = new
        return out

    return edit


class Measure:
    """The effect figures of one continuation (module docstring): one pass of the unmodified
    model over prompt + continuation (activations at the hook and next-token distributions),
    and for a steered run one teacher-forced pass with the intervention."""

    def __init__(self, model, hook: HookPoint, sae, features: list[int], lens):
        self.model, self.hook, self.sae, self.features, self.lens = (model, hook, sae, features,
                                                                     lens)

    def _pass(self, seq, edit=None):
        seen = []

        def fn(act):
            out = act if edit is None else edit(act, torch.arange(act.shape[1],
                                                                  device=act.device))
            seen.append(act)
            return out

        with torch.inference_mode():
            logits = run_with_replacement(self.model, self.hook, fn, seq)[0].float()
        if not bool(torch.isfinite(logits).all()):
            raise FloatingPointError("the logits are inf/NaN")
        return logits.log_softmax(-1), seen[0][0]

    def _clean(self, ids, new):
        seq = torch.tensor([list(ids) + new.tolist()])
        P, n = len(ids), len(new)
        logp, act = self._pass(seq)
        with torch.inference_mode():
            acts = self.sae.encode(act.float())[:, self.features].cpu()
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

    def steered(self, ids, new, edit) -> dict:
        seq, logp_u, _, figs = self._clean(ids, new)
        P, n = len(ids), len(new)
        logp_s = self._pass(seq, edit)[0][P - 1:P + n - 1]
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


def steer_prompts(model, hook: HookPoint, sae, features: list[int], lens,
                  prompt_ids: list[list[int]], raw_runs: list[torch.Tensor], *, mode: str,
                  generated_only: bool, max_new_tokens: int, temperature: float = 0.0,
                  seed: int = 0, stop_ids: Collection[int] = ()) -> Generated:
    """Continue every prompt without steering, then with each run's raw strengths (n_f,), and
    measure each continuation. Prompts start with BOS, which is never steered (training left
    it out); with `generated_only`, only the positions that produce new tokens are (the last
    prompt position and every generated one). Raises `Overflow` on inf/NaN."""
    m = Measure(model, hook, sae, features, lens)

    def continuation(i, ids, edit=None):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        return generate(model, torch.tensor([ids]), max_new_tokens, hook=hook, edit=edit,
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
                edit = intervention(sae, features, raw, mode, start)
                try:
                    new = continuation(i, ids, edit)
                    out.steered[r].append(new)
                    out.steered_figures[r].append(m.steered(ids, new, edit))
                except FloatingPointError as e:
                    raise Overflow(r, i, str(e)) from None
                bar.advance(1)
    return out
