"""The slow half of `saectl serve`: an SAE's model loaded once, activation testing (a text →
the top latents at each token, as Neuronpedia's) and live steering (through
`saectl.steering`, the code `saectl steer` runs), each request a `Job` run on one worker
thread, with a progress line the page polls. The web server's event loop never waits for
them, so every other page answers while a model loads or a text is generated.

Errors a user can fix (a ref, a feature out of range, a model that cannot be loaded) end the
job with their one-line message, shown in the page and logged once; anything else is logged
as one line too, never sent to the browser as a traceback.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from saectl.errors import ConfigError, SaectlError
from saectl.lineage import Lineage, logit_lens, sae_lineage

log = logging.getLogger("saectl.serve")
MODES = ("add", "clamp", "ablate")
MAX_TEXT_TOKENS = 512
MAX_NEW_TOKENS = 128
LENS_K = 10


@dataclass
class Job:
    id: str
    kind: str
    state: str = "queued"
    """queued, running, done or error."""
    progress: str = "waiting for the worker"
    result: dict | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)

    def as_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "state": self.state,
                "progress": self.progress, "result": self.result, "error": self.error,
                "seconds": round(time.time() - self.started, 1)}


class Jobs:
    """Jobs run one at a time on a worker thread (one model in memory, one generation at a
    time); the last `keep` are remembered for their pages to poll."""

    def __init__(self, keep: int = 200):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="saectl-serve-work")
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.lock = threading.Lock()
        self.keep = keep

    def submit(self, kind: str, fn: Callable[[Callable[[str], None]], dict]) -> Job:
        job = Job(uuid.uuid4().hex[:16], kind)
        with self.lock:
            self.jobs[job.id] = job
            while len(self.jobs) > self.keep:
                self.jobs.popitem(last=False)

        def run():
            job.state = "running"

            def progress(msg: str) -> None:
                job.progress = msg

            try:
                job.result = _json_safe(fn(progress))
                job.state, job.progress = "done", "done"
            except SaectlError as e:
                job.error, job.state = str(e), "error"
                log.warning("%s job %s: %s", kind, job.id, e)
            except Exception as e:  # noqa: BLE001 -- reported in one line, never a traceback
                job.error, job.state = f"{type(e).__name__}: {e}".splitlines()[0][:300], "error"
                log.error("%s job %s failed: %s", kind, job.id, job.error)

        self.pool.submit(run)
        return job

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _json_safe(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


@dataclass
class Loaded:
    """An SAE and its model, ready to run."""

    lin: Lineage
    name: str
    model: object
    tok: object
    sae: object
    sites: object
    """Where the SAE reads and steering writes (`saectl.steering.Sites`): a transcoder's
    input and output, a cross-layer transcoder's every layer."""


class Models:
    """SAEs with their models, loaded on first use and kept (the last `keep`)."""

    def __init__(self, root: Path, device: str = "cpu", keep: int = 1):
        self.root, self.device, self.keep = root, device, keep
        self.loaded: OrderedDict[str, Loaded] = OrderedDict()

    def get(self, ref: str, progress: Callable[[str], None]) -> Loaded:
        # deferred: torch and transformers load only when a page asks for a model
        from saectl import models, steering, store
        from saectl.sae import load_sae
        from saectl.steer_inputs import model_spec

        lin = sae_lineage(self.root, ref)
        if lin.sae.ref in self.loaded:
            self.loaded.move_to_end(lin.sae.ref)
            return self.loaded[lin.sae.ref]
        spec = model_spec(lin, None)
        progress(f"loading {spec.name}")
        device = models.resolve_device(self.device)
        tok = models.load_tokenizer(spec)
        model = models.load_model(spec, device=device)
        sites = steering.sites_of(model, lin, spec.name)
        progress(f"loading the SAE {lin.sae.ref[:18]}")
        sae = load_sae(store.sae_dir(lin.sae), device)
        self.loaded[lin.sae.ref] = Loaded(lin, spec.name, model, tok, sae, sites)
        while len(self.loaded) > self.keep:
            self.loaded.popitem(last=False)
        return self.loaded[lin.sae.ref]


def _prompt_ids(tok, text: str, limit: int) -> list[int]:
    from saectl.data import bos_id  # deferred with the tokenizer

    if not text.strip():
        raise ConfigError("the text is empty; type some text to run through the model")
    ids = [bos_id(tok), *tok(text, add_special_tokens=False)["input_ids"]]
    return ids[:limit]


def activations(m: Loaded, text: str, k: int = 5) -> dict:
    """The top `k` latents at every token of `text` (BOS first, which training leaves out),
    and the latents with the largest activation anywhere in it."""
    import torch  # deferred: only model work needs it

    from saectl.hooks import editing, forward_logits
    from saectl.steering import latents

    ids = _prompt_ids(m.tok, text, MAX_TEXT_TOKENS)
    seen = {}
    with torch.inference_mode(), editing(m.model, (), m.sites.reads, seen):
        forward_logits(m.model, torch.tensor([ids]))
        acts = latents(m.sae, [seen[h.name][0] for h in m.sites.reads]).float().cpu()
    k = max(1, min(int(k), acts.shape[1]))
    vals, idx = acts.topk(k, dim=-1)
    tokens = [m.tok.decode([i]) for i in ids]
    rows = [{"token": t, "top": [[int(f), float(v)] for f, v in zip(fi.tolist(), vi.tolist())
                                 if v > 0]}
            for t, fi, vi in zip(tokens, idx, vals)]
    peak, where = acts[1:].max(0) if len(ids) > 1 else (acts.max(0))
    order = torch.argsort(peak, descending=True)[:20]
    overall = [[int(f), float(peak[f]), int(where[f]) + 1] for f in order.tolist() if peak[f] > 0]
    return {"sae": m.lin.sae.ref, "hook": m.lin.hook, "model": m.name, "tokens": rows,
            "overall": overall, "truncated": len(ids) >= MAX_TEXT_TOKENS}


def parse_features(spec: str, d_sae: int) -> list[tuple[int, float]]:
    """'12:8, 40:-4' → [(12, 8.0), (40, -4.0)]; a feature without :S gets strength 1."""
    out: dict[int, float] = {}
    for part in str(spec).replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        f, _, s = part.partition(":")
        try:
            feat, strength = int(f), float(s) if s.strip() else 1.0
        except ValueError:
            raise ConfigError(f"feature {part!r} must be F or F:S, e.g. 12 or 12:8") from None
        if not 0 <= feat < d_sae:
            raise ConfigError(f"feature {feat} is out of range: the SAE has {d_sae} features "
                              f"(0-{d_sae - 1})")
        if not math.isfinite(strength):
            raise ConfigError(f"feature {part!r}: the strength must be a finite number")
        out[feat] = strength
    if not out:
        raise ConfigError("give at least one feature to steer, e.g. 12:8")
    return list(out.items())


def steer(m: Loaded, root: Path, prompt: str, features: str, mode: str = "add",
          max_new_tokens: int = 24, units: str = "raw",
          progress: Callable[[str], None] = lambda _: None) -> dict:
    """One prompt continued without and with the features pushed: both texts and the
    figures of `saectl.steering.Measure` (act, dlogp, kl, ppl)."""
    import torch  # deferred: only model work needs it

    from saectl import steering
    from saectl.steer_inputs import interpret_units

    if mode not in MODES:
        raise ConfigError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if m.lin.target and mode != "add":
        raise ConfigError(f"a transcoder reads {m.lin.hook} but writes {m.lin.target}: use "
                          "mode add")
    n_new = int(max_new_tokens)
    if not 1 <= n_new <= MAX_NEW_TOKENS:
        raise ConfigError(f"max new tokens must be 1 to {MAX_NEW_TOKENS}")
    specs = parse_features(features, m.lin.d_sae)
    feats = [f for f, _ in specs]
    strengths = torch.tensor([0.0 if mode == "ablate" else s for _, s in specs])
    unit = torch.ones(len(feats))
    if units == "max_act" and mode != "ablate":
        found, _, why = interpret_units(root, m.lin, feats)
        if found is None:
            raise ConfigError(f"units max_act: {why}; use raw units")
        unit = torch.tensor(found, dtype=torch.float32)
    ids = _prompt_ids(m.tok, prompt, MAX_TEXT_TOKENS)
    if len(ids) < 2:
        raise ConfigError("the prompt has no tokens; type text for the model to continue")
    device = m.sae.W_dec.device
    writes = steering.decoder_writes(m.sae.W_dec.detach(), feats, len(m.sites.writes)).sum(0)
    lens = logit_lens(writes, m.model, LENS_K)[0].cpu()  # a CLT's writes added up
    stop = {m.tok.eos_token_id, *_as_list(getattr(m.model.generation_config, "eos_token_id",
                                                  None))} - {None}
    progress(f"generating {n_new} tokens, without and with steering")
    try:
        out = steering.steer_prompts(m.model, m.sites, m.sae, feats, lens, [ids],
                                     [(strengths * unit).to(device)], mode=mode,
                                     generated_only=False, max_new_tokens=n_new, stop_ids=stop)
    except steering.Overflow as e:
        raise ConfigError(f"these strengths drive the model to inf/NaN ({e}); use smaller "
                          "ones") from None

    def text(new) -> str:
        return m.tok.decode(new, skip_special_tokens=True)

    return {"sae": m.lin.sae.ref, "model": m.name, "mode": mode, "units": units,
            "prompt": prompt, "features": [{"feature": f, "strength": s, "raw": float(s * u),
                                            "logit_lens": [m.tok.decode([t]) for t in lens[j]]}
                                           for j, ((f, s), u) in enumerate(zip(specs,
                                                                               unit.tolist()))],
            "baseline": text(out.baseline[0]), "steered": text(out.steered[0][0]),
            "baseline_figures": out.baseline_figures[0],
            "steered_figures": out.steered_figures[0][0]}


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple, set)) else [x]
