"""Steer: generate with and without SAE features pushed, side by side, and measure the change.

Modes (add, clamp with the SAE's error term kept, ablate), the generation and the figures
(`act`, `dlogp`, `kl`, `ppl`) are saectl/steering.py's; this module turns a request into them
and stores the result. Strengths are in units of each feature's typical maximum activation
(`stats/max_act` of a complete interpret artifact of this SAE) when one covers every feature,
else in raw activation units; the output says which. Prompts start with the BOS the harvest put
first in every context; BOS is never steered. `--positions generated` steers only the positions
that produce new tokens. `--strengths 0,2,4` runs each strength in turn (a feature's own `:S`
is then a weight on it) and plots effect against fluency in `report/strength_sweep.png`.

The generation runs in `prepare`, before the write lock, so a failure (inf/NaN, a wrong model)
leaves the store as it was; `build` only writes what it made.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saectl import layout, store
from saectl.config import opt
from saectl.console import info
from saectl.data import bos_id
from saectl.errors import ConfigError
from saectl.lineage import Lineage, logit_lens, sae_lineage
from saectl.stage import DeviceOptions, Plan, Stage
from saectl.steer_inputs import interpret_units, model_spec, read_prompts
from saectl.steer_report import is_sweep, plot_sweep, show

NAME = "steer"
MODES = ("add", "clamp", "ablate")
POSITIONS = ("all", "generated")
UNITS = ("auto", "raw", "max_act")
DEFAULT_STRENGTH = 1.0
LENS_K = 10
SWEEP_PLOT = layout.STRENGTH_SWEEP_PNG
FIGURES = ("act_baseline", "act_steered", "kl", "ppl_baseline", "ppl")
"""Headline summary figures (`saectl run`'s table): the feature activation (averaged over the
features), KL and perplexity of the baseline and of the last steered run."""


@dataclass(frozen=True)
class SteerConfig(DeviceOptions):
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
    as_json: bool = opt(False, "Print settings, texts and figures as JSON on stdout (instead "
                               "of the ref)", address=False, flag="--json")

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
# Planning: the request, resolved without loading a model


@dataclass(frozen=True)
class Request:
    """The features, strengths and prompts of a steer config, resolved against the SAE."""

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


def _request(root: Path, cfg: SteerConfig, lin: Lineage) -> Request:
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
        found, interp, why = interpret_units(root, lin, features)
        if found is not None:
            unit, units = found, "max_act"
        elif cfg.units == "max_act":
            raise ConfigError(f"--units max_act: {why}; run `saectl interpret {lin.sae.ref[:18]}` "
                              "or use --units raw")
        else:
            info(f"steer: strengths are in raw activation units ({why})")
    return Request(features, weights, sweep, units, unit, interp,
                   read_prompts(cfg.prompt, cfg.prompts))


def _address_params(cfg: SteerConfig, r: Request, lin: Lineage, model_identity: dict) -> dict:
    return {"sae": lin.sae.ref, "hook": lin.target or lin.hook, "model": model_identity,
            "mode": cfg.mode,
            "features": [[f, w] for f, w in zip(r.features, r.weights)], "strengths": r.sweep,
            "units": r.units, "positions": cfg.positions, "prompts": r.prompts,
            "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
            "seed": cfg.seed if cfg.temperature > 0 else None}  # greedy: no draws


@dataclass
class Steering:
    """Plan's context: what planning found, and what `prepare` made for build to write."""

    lin: Lineage
    spec: object
    """The model (models.ModelSpec)."""
    request: Request
    summary: dict | None = None
    """Settings, texts and figures (the manifest's summary); set by prepare."""
    tokens: dict[str, np.ndarray] | None = None
    """Layout name → token ids, -1 padded; set by prepare."""


def plan(cfg: SteerConfig) -> Plan:
    from saectl import models  # deferred: torch and transformers

    root = store.store_root(cfg.store)
    lin = sae_lineage(root, cfg.sae)
    if lin.target and cfg.mode != "add":
        raise ConfigError(f"--mode {cfg.mode} sets a latent where it is read, and a transcoder "
                          f"reads {lin.hook} but writes {lin.target}: use --mode add (it adds to "
                          f"{lin.target})")
    request = _request(root, cfg, lin)
    spec = model_spec(lin, cfg.model)
    params = _address_params(cfg, request, lin, models.model_identity(spec))
    inputs = {"sae": lin.sae, **({"interpret": request.interpret} if request.interpret else {})}
    return Plan(store.artifact_for(root, NAME, params, inputs), params, inputs,
                origin={"model": {"name": spec.name, "source": spec.source}},
                context=Steering(lin, spec, request))


# ---------------------------------------------------------------------------------------------
# Running: generate and measure (before the lock), then write


def prepare(cfg: SteerConfig, p: Plan) -> None:
    """Generate the baseline and every steered run and measure them into `p.context`; nothing
    is written here, so a failure leaves the store as it was."""
    # deferred: torch and transformers (these modules import them) load only to generate
    import torch

    from saectl import models, steering
    from saectl.sae import load_sae

    ctx: Steering = p.context
    lin, spec, r = ctx.lin, ctx.spec, ctx.request
    device = models.resolve_device(cfg.device)
    info(f"steer: loading {spec.name} on {device}")
    tok = models.load_tokenizer(spec)
    model = models.load_model(spec, device=device)
    sites = steering.sites_of(model, lin, spec.name)
    sae = load_sae(store.sae_dir(lin.sae), device)
    # the logit lens of what a feature writes, added up over the layers it writes to (a CLT)
    writes = steering.decoder_writes(sae.W_dec.detach(), r.features, len(sites.writes)).sum(0)
    lens = logit_lens(writes, model, LENS_K)[0].cpu()
    stop = {tok.eos_token_id, *_as_list(getattr(model.generation_config, "eos_token_id", None))}
    stop.discard(None)
    prompt_ids = [[bos_id(tok), *tok(t, add_special_tokens=False)["input_ids"]]
                  for t in r.prompts]
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 1:
            raise ConfigError(f"prompt {i + 1} has no tokens; give text for the model to continue")
        if limit and len(ids) + cfg.max_new_tokens > limit:
            raise ConfigError(f"prompt {i + 1} ({len(ids)} tokens) plus --max-new-tokens "
                              f"{cfg.max_new_tokens} exceeds the model's {limit} positions")
    runs = r.runs()
    unit = torch.tensor(r.unit, dtype=torch.float32, device=device)
    raw = [torch.tensor(s, dtype=torch.float32, device=device) * unit for _, s in runs]
    try:
        out = steering.steer_prompts(
            model, sites, sae, r.features, lens, prompt_ids, raw, mode=cfg.mode,
            generated_only=cfg.positions == "generated", max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, seed=cfg.seed, stop_ids=stop)
    except steering.Overflow as e:
        what = _label(r.features, runs[e.run][1], r.units)
        raise ConfigError(f"steering {what} drives the model to inf/NaN ({e}, prompt "
                          f"{e.prompt + 1}); use a smaller strength") from None
    baseline = (out.baseline, out.baseline_figures, steering.mean_figures(out.baseline_figures))
    steered = [(run, new, figs, steering.mean_figures(figs))
               for run, new, figs in zip(runs, out.steered, out.steered_figures)]
    ctx.summary = summary(cfg, ctx, tok, lens, baseline, steered)
    ctx.tokens = {
        layout.PROMPT_TOKENS: _pad(prompt_ids),
        layout.BASELINE_TOKENS: _pad(out.baseline, cfg.max_new_tokens),
        layout.STEERED_TOKENS: np.stack([_pad(n, cfg.max_new_tokens) for n in out.steered])}


def build(cfg: SteerConfig, p: Plan, writer: store.Writing) -> None:
    """Write what prepare made: the token arrays, the sweep's figure, then COMPLETE."""
    ctx: Steering = p.context
    group = p.art.group("r+")
    for name, data in ctx.tokens.items():
        group.create_array(name, data=data, overwrite=True)
    if is_sweep(ctx.summary):
        plot_sweep(ctx.summary, layout.report(p.art.path, SWEEP_PLOT))
    store.mark_complete(p.art, ctx.summary)
    info(f"steer: wrote {p.art.ref}")


def summary(cfg: SteerConfig, ctx: Steering, tok, lens, baseline, runs) -> dict:
    """Settings, texts and figures, as stored in the manifest (and printed by --json).
    `baseline`: (new ids per prompt, figures per prompt, their mean); `runs`: per run
    ((sweep value, strengths), new ids, figures, mean)."""
    r = ctx.request

    def text(ids) -> str:
        return tok.decode(ids, skip_special_tokens=True)

    base_new, base_figs, base_mean = baseline
    out = {
        "sae": ctx.lin.sae.ref, "hook": ctx.lin.target or ctx.lin.hook, "model": ctx.spec.name,
        "mode": cfg.mode,
        "positions": cfg.positions, "units": r.units,
        "units_from": r.interpret.ref if r.interpret else None,
        "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "seed": cfg.seed,
        "features": [{"feature": f, "strength": w, "unit": float(u),
                      "logit_lens": [tok.decode([t]) for t in lens[j].tolist()]}
                     for j, (f, w, u) in enumerate(zip(r.features, r.weights, r.unit))],
        "prompts": r.prompts,
        "baseline": {"texts": [text(n) for n in base_new], "per_prompt": base_figs,
                     "mean": base_mean},
        "runs": [{"sweep": value, "label": _label(r.features, s, r.units),
                  "strengths": {str(f): float(v) for f, v in zip(r.features, s)},
                  "raw_strengths": {str(f): float(v * u)
                                    for f, v, u in zip(r.features, s, r.unit)},
                  "texts": [text(n) for n in new], "per_prompt": figs, "mean": mean}
                 for (value, s), new, figs, mean in runs],
    }
    base, last = out["baseline"]["mean"], out["runs"][-1]["mean"]
    # Headline figures (FIGURES): averaged over the features, of the last run.
    out.update(act_baseline=float(np.mean(list(base["act"].values()))),
               act_steered=float(np.mean(list(last["act"].values()))), kl=last["kl"],
               ppl_baseline=base["ppl"], ppl=last["ppl"])
    return out


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def _label(features, strengths, units: str) -> str:
    suffix = "×max" if units == "max_act" else ""
    return ", ".join(f"{f}:{float(s):+g}{suffix}" for f, s in zip(features, strengths))


def _pad(rows, width: int | None = None) -> np.ndarray:
    width = width or max(len(r) for r in rows)
    out = np.full((len(rows), width), -1, dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = np.asarray(r, dtype=np.int32)
    return out


# ---------------------------------------------------------------------------------------------
# Showing


def report(cfg: SteerConfig, art: store.Artifact) -> None:
    """The texts side by side and the figures (saectl/steer_report.py)."""
    show(art.manifest()["summary"], layout.report(art.path, SWEEP_PLOT))


def as_json(art: store.Artifact) -> str:
    """--json: the ref and the summary (settings, texts, figures)."""
    return json.dumps({"ref": art.ref, **art.manifest()["summary"]}, indent=1,
                      ensure_ascii=False)


STAGE = Stage(NAME, SteerConfig,
              "Generate with and without SAE features pushed, side by side, with measured effect.",
              plan, build, positional=("sae",), figures=FIGURES, report=report, prepare=prepare,
              as_json=as_json)
