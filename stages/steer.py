"""Steer: generate with and without SAE features pushed, side by side, and measure the change.

Modes, at the SAE's hook point (SAELens's steering hooks; Templeton et al. 2024, "Scaling
Monosemanticity", for clamping with the error term kept):

- **add**: x ← x + Σ s_f·d_f, with d_f = W_dec[f], the feature's decoder row.
- **clamp**: encode x, set a_f to s_f, decode, and add back the SAE's error x − x̂, so nothing
  but the feature moves: x ← x̂(a with a_f = s_f) + (x − x̂(a)) = x + (s_f − a_f)·d_f.
- **ablate**: clamp to 0.

Strengths are in units of each feature's typical maximum activation (`stats/max_act` of a
complete interpret artifact of this SAE) when one covers every feature, else in raw activation
units (s·d_f is what the feature writes when it fires at s); the output says which. Prompts
start with the BOS the harvest put first in every context; the BOS position is never steered
(training left it out). `--positions generated` steers only the positions that produce new
tokens: the last prompt position and every generated one.

Generation is greedy by default (with `--temperature`, sampled from a generator seeded per
prompt, so baseline and steered runs draw the same numbers and differ only by the
intervention). Figures, per prompt and averaged over prompts:

- `act[f]`: mean activation of f over the generated tokens, read at the hook by the SAE while
  the *unmodified* model runs over prompt + continuation: what the text evokes, not the pushed
  activation itself (which add mode would raise by construction).
- `dlogp[f]`: mean over generation steps of log P_steered(T_f) − log P_base(T_f), T_f the
  feature's top logit-lens tokens, both distributions on the same (steered) context.
- `kl`: mean over generation steps of KL(P_base ‖ P_steered), nats, on the steered context.
- `ppl`: perplexity of the continuation under the unmodified model (fluency).

`--strengths 0,2,4` runs each strength in turn (a feature's own `:S` is then a weight on it)
and plots effect against fluency in `report/strength_sweep.png`.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saectl import store
from saectl.config import opt
from saectl.console import console, info, progress
from saectl.errors import ArtifactError, ConfigError, NotFoundError

NAME = "steer"
MODES = ("add", "clamp", "ablate")
POSITIONS = ("all", "generated")
UNITS = ("auto", "raw", "max_act")
DEFAULT_STRENGTH = 1.0
LENS_K = 10
SWEEP_PLOT = "strength_sweep.png"
FIGURES = ("act_baseline", "act_steered", "kl", "ppl_baseline", "ppl")
"""Headline summary figures (`saectl run`'s table): the feature activation (averaged over the
features), KL and perplexity of the baseline and of the last steered run."""


@dataclass(frozen=True)
class SteerConfig:
    sae: str | None = opt(None, "The trained SAE to steer with (a train ref)")
    feature: list[str] | None = opt(None, "Feature to steer, F or F:S (its own strength, or its "
                                          "weight under --strengths); repeat for several")
    prompt: list[str] | None = opt(None, "Prompt to continue; repeat for several")
    prompts: str | None = opt(None, "File of prompts, one per line (blank lines skipped)",
                              address=False)
    mode: str = opt("add", "add (x + s·d_f), clamp (set the feature's activation to s, SAE "
                           "error kept) or ablate (clamp to 0)")
    strength: float | None = opt(None, f"Strength of features without :S (default "
                                       f"{DEFAULT_STRENGTH:g}); in max-activation units when an "
                                       "interpret artifact has them, else raw")
    strengths: str | None = opt(None, "Sweep: comma-separated strengths, e.g. 0,2,4,8,16; "
                                      "writes report/strength_sweep.png")
    units: str = opt("auto", "auto (max activation from interpret when it exists, else raw), "
                             "raw, or max_act")
    positions: str = opt("all", "all (every position but BOS) or generated (the positions "
                                "that produce new tokens)")
    max_new_tokens: int = opt(32, "Tokens to generate per prompt (fewer if EOS comes first)")
    temperature: float = opt(0.0, "0: greedy; above 0: sampled at this temperature")
    seed: int = opt(0, "Seed of sampling (with --temperature)")
    model: str | None = opt(None, "Where the SAE's model is, if it moved (checked against the "
                                  "harvest's content hash); needed for imported activations",
                            address=False)
    device: str = opt("auto", "auto, cpu, cuda, ...", address=False)
    store: str | None = opt(None, "Artifact store (default $SAECTL_STORE or ./artifacts)",
                            address=False)
    as_json: bool = opt(False, "Print settings, texts and figures as JSON on stdout (instead "
                               "of the ref)", address=False, flag="--json")
    no_wait: bool = opt(False, "Fail instead of waiting for another writer", address=False)

    def __post_init__(self):
        if not self.sae:
            raise ConfigError("give the SAE to steer with: saectl steer TRAIN_REF --feature 12 "
                              "--prompt 'I went to the'")
        for name, value, choices in (("mode", self.mode, MODES), ("units", self.units, UNITS),
                                     ("positions", self.positions, POSITIONS)):
            if value not in choices:
                raise ConfigError(f"--{name} {value!r} is not one of {', '.join(choices)}")
        if self.max_new_tokens < 1:
            raise ConfigError("--max-new-tokens must be at least 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"--temperature {self.temperature} must be 0 (greedy) or positive")
        for name in ("feature", "prompt"):  # YAML may give one value where flags give a list
            value = getattr(self, name)
            if value is not None and not isinstance(value, (list, tuple)):
                object.__setattr__(self, name, [value])
        if self.strength is not None:
            _finite(self.strength, "--strength")
        self.feature_specs()
        self.sweep()
        if self.mode == "ablate" and (self.strength is not None or self.strengths or any(
                s is not None for _, s in self.feature_specs())):
            raise ConfigError("--mode ablate sets features to 0; drop --strength, --strengths "
                              "and :S (or use --mode clamp)")

    def feature_specs(self) -> list[tuple[int, float | None]]:
        """[(feature, its own strength or None)] from `--feature F[:S]`."""
        if not self.feature:
            raise ConfigError("give at least one --feature F (or F:S), e.g. --feature 12:8")
        out: dict[int, float | None] = {}
        for spec in self.feature:
            f, _, s = str(spec).strip().partition(":")
            try:
                f, s = int(f), (float(s) if s else None)
            except ValueError:
                raise ConfigError(f"--feature {spec!r} must be F or F:S, e.g. 12 or 12:8 or "
                                  "40:-4") from None
            if f < 0:
                raise ConfigError(f"--feature {spec!r}: feature numbers start at 0")
            if f in out:
                raise ConfigError(f"feature {f} is given twice; give each feature once")
            out[f] = None if s is None else _finite(s, f"--feature {spec}")
        return list(out.items())

    def sweep(self) -> list[float] | None:
        """The values of --strengths, or None."""
        if not self.strengths:
            return None
        try:
            values = [float(v) for v in str(self.strengths).split(",") if v.strip()]
        except ValueError:
            values = []
        if not values:
            raise ConfigError(f"--strengths {self.strengths!r} must be comma-separated numbers, "
                              "e.g. 0,2,4,8,16")
        if self.strength is not None:
            raise ConfigError("give --strength or --strengths, not both")
        return [_finite(v, "--strengths") for v in values]


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise ConfigError(f"{what}: {value} is not a finite number; give a finite strength")
    return float(value)


# ---------------------------------------------------------------------------------------------
# The interventions


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
    >= `start` by `raw` (n_f,) strengths in activation units. Raises FloatingPointError when
    the result is not finite."""
    import torch

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


# ---------------------------------------------------------------------------------------------
# Resolving the request


def _prompts(cfg: SteerConfig) -> list[str]:
    prompts = list(cfg.prompt or [])
    if cfg.prompts:
        path = Path(cfg.prompts).expanduser()
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise NotFoundError(f"cannot read --prompts {path}: {getattr(e, 'strerror', 0) or e}; "
                                "give a text file with one prompt per line") from None
        from_file = [ln for ln in lines if ln.strip()]
        if not from_file:
            raise ConfigError(f"--prompts {path} holds no prompt; write one prompt per line")
        prompts += from_file
    if not prompts:
        raise ConfigError("give a prompt to continue: --prompt 'I went to the' (repeatable) or "
                          "--prompts FILE")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ConfigError(f"prompt {i + 1} is empty; give text for the model to continue")
    return prompts


def _model_spec(lin, model: str | None):
    """The SAE's model: the harvest's, checked (lineage.harvest_model), or --model for an SAE
    of imported activations."""
    from saectl import models
    from saectl.lineage import harvest_model

    if lin.imported:
        if not model:
            raise ConfigError(f"{lin.sae.ref} was trained on imported activations, so saectl "
                              f"does not know their model; pass --model (it must have the hook "
                              f"{lin.hook} with width {lin.d_in})")
        return models.resolve_model(model)
    spec = harvest_model(lin.harvest, model)
    want = lin.harvest.manifest()["params"]["model"]
    have = models.model_identity(spec)
    if "sha256" not in want and "sha256" not in have and have != want:  # two hub ids
        raise ConfigError(f"--model {model} is not the model the SAE was trained on "
                          f"({want.get('model')}); pass --model {want.get('model')} or leave it "
                          "out")
    return spec


def _interpret_units(root: Path, lin, features: list[int]):
    """(typical max activation per feature, the interpret artifact, "") from the newest
    complete interpret artifact of this SAE that covers every feature, or (None, None, why
    not)."""
    from saectl import arrays

    found = []
    for art in store.list_artifacts(root, "interpret"):
        if not art.is_complete():
            continue
        try:
            m = art.manifest()
        except ArtifactError:
            continue
        if m.get("inputs", {}).get("sae") == lin.sae.ref:
            found.append((m.get("completed", ""), art.ref, art))
    if not found:
        return None, None, "no interpret artifact of this SAE"
    for *_, art in sorted(found, key=lambda t: t[:2], reverse=True):
        g = art.group()
        if "features" not in g or "stats/max_act" not in g:
            continue
        index = {int(f): i for i, f in enumerate(g["features"][:])}
        if not all(f in index for f in features):
            continue
        max_act = arrays.read(g["stats/max_act"], artifact=art.ref)
        unit = np.array([max_act[index[f]] for f in features], dtype=np.float64)
        if not (np.isfinite(unit).all() and (unit > 0).all()):
            bad = [f for f, u in zip(features, unit) if not (np.isfinite(u) and u > 0)]
            return None, None, f"feature {bad[0]} never fired in {art.ref[:18]}"
        return unit, art, ""
    return None, None, ("no interpret artifact of this SAE covers feature(s) "
                        f"{', '.join(map(str, features))}")


@dataclass(frozen=True)
class Plan:
    features: list[int]
    weights: list[float]
    """Each feature's strength (no sweep) or its weight under the sweep, in `units`."""
    sweep: list[float] | None
    units: str
    unit: np.ndarray
    """Raw activation per unit of strength, per feature (1 for raw units)."""
    interpret: store.Artifact | None
    prompts: list[str]

    def runs(self) -> list[tuple[float | None, np.ndarray]]:
        """(sweep value or None, strengths in `units` per feature) for every steered run."""
        w = np.asarray(self.weights, dtype=np.float64)
        return [(v, v * w) for v in self.sweep] if self.sweep else [(None, w)]


def plan(root: Path, cfg: SteerConfig, lin) -> Plan:
    specs = cfg.feature_specs()
    features = [f for f, _ in specs]
    bad = [f for f in features if f >= lin.d_sae]
    if bad:
        raise ConfigError(f"feature {bad[0]} is out of range: the SAE has {lin.d_sae} features "
                          f"(0-{lin.d_sae - 1})")
    sweep = cfg.sweep()
    default = 0.0 if cfg.mode == "ablate" else 1.0 if sweep else (
        cfg.strength if cfg.strength is not None else DEFAULT_STRENGTH)
    weights = [default if s is None else s for _, s in specs]
    unit, interp, units = np.ones(len(features)), None, "raw"
    if cfg.mode != "ablate" and cfg.units != "raw":
        found, interp, why = _interpret_units(root, lin, features)
        if found is not None:
            unit, units = found, "max_act"
        elif cfg.units == "max_act":
            raise ConfigError(f"--units max_act: {why}; run `saectl interpret {lin.sae.ref[:18]}` "
                              "or use --units raw")
        else:
            info(f"steer: strengths are in raw activation units ({why})")
    return Plan(features, weights, sweep, units, unit, interp, _prompts(cfg))


def address_params(cfg: SteerConfig, p: Plan, lin, model_identity: dict) -> dict:
    return {"sae": lin.sae.ref, "hook": lin.hook, "model": model_identity, "mode": cfg.mode,
            "features": [[f, w] for f, w in zip(p.features, p.weights)], "strengths": p.sweep,
            "units": p.units, "positions": cfg.positions, "prompts": p.prompts,
            "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
            "seed": cfg.seed if cfg.temperature > 0 else None}  # greedy: no draws


# ---------------------------------------------------------------------------------------------
# Running


@dataclass(frozen=True)
class Resolved:
    """What a steer request resolves to before any model is loaded."""

    lin: object
    plan: Plan
    spec: object
    params: dict
    inputs: dict
    art: store.Artifact


def resolve(cfg: SteerConfig) -> Resolved:
    from saectl import models
    from saectl.lineage import sae_lineage

    root = store.store_root(cfg.store)
    lin = sae_lineage(root, cfg.sae)
    p = plan(root, cfg, lin)
    spec = _model_spec(lin, cfg.model)
    params = address_params(cfg, p, lin, models.model_identity(spec))
    inputs = {"sae": lin.sae, **({"interpret": p.interpret} if p.interpret else {})}
    return Resolved(lin, p, spec, params, inputs, store.artifact_for(root, NAME, params, inputs))


def address(cfg: SteerConfig) -> store.Artifact:
    """The artifact `run(cfg)` makes or finds, computed without writing (for `saectl run`)."""
    return resolve(cfg).art


def run(cfg: SteerConfig):
    """The steer artifact (its texts and figures shown), or with --json its summary as JSON."""
    r = resolve(cfg)
    art = r.art
    if art.is_complete():
        info(f"steer: cache hit {art.ref}")
    else:
        summary, tokens = _steer(cfg, r.plan, r.lin, r.spec)
        origin = {"model": {"name": r.spec.name, "source": r.spec.source}}
        with store.writing(art, r.params, r.inputs, wait=not cfg.no_wait, origin=origin):
            if not art.is_complete():  # else finished by another process while we waited
                _write(art, summary, tokens)
        info(f"steer: wrote {art.ref}")
    summary = art.manifest()["summary"]
    if cfg.as_json:
        return json.dumps({"ref": art.ref, **summary}, indent=1, ensure_ascii=False)
    show(summary, art)
    return art


def _steer(cfg: SteerConfig, p: Plan, lin, spec) -> tuple[dict, dict]:
    """Generate the baseline and every steered run, measure them; nothing is written here, so
    a failure (inf/NaN, a bad model) leaves the store as it was."""
    import torch

    from saectl import hooks, models
    from saectl.data import bos_id
    from saectl.lineage import logit_lens
    from saectl.sae import load_sae

    device = models.resolve_device(cfg.device)
    info(f"steer: loading {spec.name} on {device}")
    tok = models.load_tokenizer(spec)
    model = models.load_model(spec, device=device)
    hook = hooks.parse_hooks(model, [lin.hook])[0]
    width = hooks.hook_dim(model, hook)
    if width != lin.d_in:
        raise ConfigError(f"{spec.name} has width {width} at {lin.hook} but the SAE takes "
                          f"{lin.d_in}; pass the model the SAE was trained on")
    sae = load_sae(store.sae_dir(lin.sae), device)
    lens = logit_lens(sae.W_dec.detach()[p.features], model, LENS_K)[0].cpu()
    stop = {tok.eos_token_id, *_as_list(getattr(model.generation_config, "eos_token_id", None))}
    stop.discard(None)
    prompt_ids = [[bos_id(tok), *tok(t, add_special_tokens=False)["input_ids"]]
                  for t in p.prompts]
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 1:
            raise ConfigError(f"prompt {i + 1} has no tokens; give text for the model to continue")
        if limit and len(ids) + cfg.max_new_tokens > limit:
            raise ConfigError(f"prompt {i + 1} ({len(ids)} tokens) plus --max-new-tokens "
                              f"{cfg.max_new_tokens} exceeds the model's {limit} positions")
    runs = p.runs()
    unit = torch.tensor(p.unit, dtype=torch.float32, device=device)
    m = Measure(model, hook, sae, p.features, lens)

    def generate(i, ids, edit=None):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
        return hooks.generate(model, torch.tensor([ids]), cfg.max_new_tokens, hook=hook,
                               edit=edit, temperature=cfg.temperature, generator=g,
                               stop_ids=stop)

    base_new, base_figs = [], []
    steered_new = [[] for _ in runs]
    steered_figs = [[] for _ in runs]
    with progress("steer", len(p.prompts) * (1 + len(runs)), "generations") as bar:
        for i, ids in enumerate(prompt_ids):
            new = generate(i, ids)
            base_new.append(new)
            base_figs.append(m.baseline(ids, new))
            bar.advance(1)
            start = 1 if cfg.positions == "all" else len(ids) - 1
            for r, (_, strengths) in enumerate(runs):
                raw = torch.tensor(strengths, dtype=torch.float32, device=device) * unit
                edit = intervention(sae, p.features, raw, cfg.mode, start)
                try:
                    new = generate(i, ids, edit)
                    steered_new[r].append(new)
                    steered_figs[r].append(m.steered(ids, new, edit))
                except FloatingPointError as e:
                    what = _label(p.features, strengths, p.units)
                    raise ConfigError(f"steering {what} drives the model to inf/NaN ({e}, "
                                      f"prompt {i + 1}); use a smaller strength") from None
                bar.advance(1)

    summary = _summary(cfg, p, lin, spec, tok, lens, (base_new, base_figs),
                       list(zip(runs, steered_new, steered_figs)))
    tokens = {"prompt_tokens": _pad([torch.tensor(t) for t in prompt_ids]),
              "baseline/tokens": _pad(base_new, cfg.max_new_tokens),
              "steered/tokens": np.stack([_pad(n, cfg.max_new_tokens) for n in steered_new])}
    return summary, tokens


def _summary(cfg, p: Plan, lin, spec, tok, lens, baseline, runs) -> dict:
    """Settings, texts and figures, as stored in the manifest (and printed by --json)."""

    def text(ids) -> str:
        return tok.decode(ids, skip_special_tokens=True)

    base_new, base_figs = baseline
    summary = {
        "sae": lin.sae.ref, "hook": lin.hook, "model": spec.name, "mode": cfg.mode,
        "positions": cfg.positions, "units": p.units,
        "units_from": p.interpret.ref if p.interpret else None,
        "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "seed": cfg.seed,
        "features": [{"feature": f, "strength": w, "unit": float(u),
                      "logit_lens": [tok.decode([t]) for t in lens[j].tolist()]}
                     for j, (f, w, u) in enumerate(zip(p.features, p.weights, p.unit))],
        "prompts": p.prompts,
        "baseline": {"texts": [text(n) for n in base_new], "per_prompt": base_figs,
                     "mean": _mean(base_figs)},
        "runs": [{"sweep": value, "label": _label(p.features, s, p.units),
                  "strengths": {str(f): float(v) for f, v in zip(p.features, s)},
                  "raw_strengths": {str(f): float(v * u)
                                    for f, v, u in zip(p.features, s, p.unit)},
                  "texts": [text(n) for n in new], "per_prompt": figs, "mean": _mean(figs)}
                 for (value, s), new, figs in runs],
    }
    base, last = summary["baseline"]["mean"], summary["runs"][-1]["mean"]
    # Headline figures (FIGURES): averaged over the features, of the last run.
    summary.update(act_baseline=float(np.mean(list(base["act"].values()))),
                   act_steered=float(np.mean(list(last["act"].values()))), kl=last["kl"],
                   ppl_baseline=base["ppl"], ppl=last["ppl"])
    return summary


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


class Measure:
    """The effect figures of one continuation (module docstring): one pass of the unmodified
    model over prompt + continuation (activations at the hook and next-token distributions),
    and for a steered run one teacher-forced pass with the intervention."""

    def __init__(self, model, hook, sae, features: list[int], lens):
        self.model, self.hook, self.sae, self.features, self.lens = (model, hook, sae, features,
                                                                     lens)

    def _pass(self, seq, edit=None):
        import torch

        from saectl.hooks import run_with_replacement

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
        import torch

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


def _mean(per_prompt: list[dict]) -> dict:
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


def _label(features, strengths, units: str) -> str:
    suffix = "×max" if units == "max_act" else ""
    return ", ".join(f"{f}:{float(s):+g}{suffix}" for f, s in zip(features, strengths))


def _pad(rows, width: int | None = None) -> np.ndarray:
    width = width or max(len(r) for r in rows)
    out = np.full((len(rows), width), -1, dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = np.asarray(r, dtype=np.int32)
    return out


def _write(art: store.Artifact, summary: dict, tokens: dict) -> None:
    group = art.group("r+")
    for name, data in tokens.items():
        group.create_array(name, data=data, overwrite=True)
    if summary["runs"][0]["sweep"] is not None and len(summary["runs"]) > 1:
        art.report_dir.mkdir(parents=True, exist_ok=True)
        _plot_sweep(summary, art.report_dir / SWEEP_PLOT)
    store.mark_complete(art, summary)


def _plot_sweep(summary: dict, path: Path) -> None:
    """Effect (mean feature activation on the generated text) against fluency (perplexity
    under the unmodified model), one line per feature through the strengths."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, base = summary["runs"], summary["baseline"]["mean"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    values = [r["sweep"] for r in runs]
    unit = "× max activation" if summary["units"] == "max_act" else "(raw)"
    for feat in summary["features"]:
        f = str(feat["feature"])
        acts = [r["mean"]["act"][f] for r in runs]
        ppl = [r["mean"]["ppl"] for r in runs]
        line, = ax1.plot(values, acts, "o-", label=f"feature {f}")
        ax1.axhline(base["act"][f], color=line.get_color(), ls=":", lw=1)
        ax2.plot(ppl, acts, "o-", color=line.get_color(), label=f"feature {f}")
        for v, x, y in zip(values, ppl, acts):
            ax2.annotate(f"{v:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax2.scatter([base["ppl"]], [base["act"][f]], marker="*", s=120, color=line.get_color())
    ax1.set(xlabel=f"strength {unit}", ylabel="mean feature activation on generated text",
            title="Effect (dotted: baseline)")
    ax1b = ax1.twinx()
    ax1b.plot(values, [r["mean"]["ppl"] for r in runs], "k--", lw=1)
    ax1b.set(ylabel="perplexity under the unsteered model (dashed)")
    ax2.set(xlabel="perplexity under the unsteered model (fluency; ★ baseline)",
            ylabel="mean feature activation", title="Effect against fluency")
    ax1.legend(fontsize=7)
    fig.suptitle(f"{summary['mode']} at {summary['hook']} ({summary['sae'][:18]})", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    store.atomic_write(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# Showing


def show(summary: dict, art: store.Artifact) -> None:
    """Texts side by side and the figures: on stdout when it is a terminal (the ref follows),
    else on stderr, so `REF=$(saectl steer ...)` still gets one line."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    out = Console(highlight=False) if sys.stdout.isatty() else console
    units = ("strengths in units of each feature's max activation "
             f"({summary['units_from'][:18]})" if summary["units"] == "max_act"
             else "strengths in raw activation units")
    out.print(Text(f"steer {summary['sae'][:18]} at {summary['hook']} of {summary['model']}: "
                   f"{summary['mode']}, positions {summary['positions']}, {units}"))
    base = summary["baseline"]["mean"]
    for feat in summary["features"]:
        f = str(feat["feature"])
        out.print(Text(f"feature {f}: logit lens {', '.join(map(repr, feat['logit_lens'][:6]))}; "
                       f"baseline activation mean {base['act'][f]:.3g}, max "
                       f"{base['act_max'][f]:.3g} (raw)"))
    runs = summary["runs"]

    def shown(s: str) -> Text:
        return Text(s.replace("\n", "⏎"))

    if len(runs) == 1:
        table = Table(show_lines=True)
        for col in ("prompt", "baseline", f"steered ({runs[0]['label']})"):
            table.add_column(col, ratio=1 if col == "prompt" else 2)
        for i, prompt in enumerate(summary["prompts"]):
            table.add_row(shown(prompt), shown(summary["baseline"]["texts"][i]),
                          shown(runs[0]["texts"][i]))
        out.print(table)
    else:
        for i, prompt in enumerate(summary["prompts"]):
            table = Table(title=Text(prompt), show_lines=False, title_justify="left")
            table.add_column("strength", no_wrap=True, justify="right")
            table.add_column("continuation")
            table.add_row("baseline", shown(summary["baseline"]["texts"][i]))
            for r in runs:
                table.add_row(f"{r['sweep']:g}", shown(r["texts"][i]))
            out.print(table)
    table = Table(title=f"effect, mean over {len(summary['prompts'])} prompt(s)",
                  title_justify="left")
    table.add_column("run", no_wrap=True)
    feats = [str(f["feature"]) for f in summary["features"]]
    for f in feats:
        table.add_column(f"act {f}", justify="right")
    for f in feats:
        table.add_column(f"Δlogp {f}", justify="right")
    table.add_column("KL", justify="right")
    table.add_column("ppl", justify="right")
    table.add_row("baseline", *[f"{base['act'][f]:.3g}" for f in feats], *["-" for _ in feats],
                  "-", f"{base['ppl']:.3g}")
    for r in runs:
        m = r["mean"]
        table.add_row(r["label"] if r["sweep"] is None else f"{r['sweep']:g}",
                      *[f"{m['act'][f]:.3g}" for f in feats],
                      *[f"{m['dlogp'][f]:+.3g}" for f in feats], f"{m['kl']:.3g}",
                      f"{m['ppl']:.3g}")
    out.print(table)
    out.print(Text("act: the feature's mean activation on the generated tokens (unsteered model "
                   "re-reading the text); Δlogp: change in log-probability of its top logit-lens "
                   "tokens; KL: from the baseline's next-token distribution, nats/token; ppl: "
                   "perplexity of the text under the unsteered model"))
    if summary["runs"][0]["sweep"] is not None and len(runs) > 1:
        out.print(Text(f"plot: {art.report_dir / SWEEP_PLOT}"))


# TRANSITIONAL (issue 14): the old run wrapped until this module defines plan and build.
from saectl import stage as _contract  # noqa: E402

STAGE = _contract.legacy('steer', SteerConfig, run, 'Generate with and without SAE features pushed, side by side, with measured effect.',
                         ('sae',), address=address, output=None,
                         figures=FIGURES)
