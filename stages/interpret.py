"""Interpret: what each feature of a trained SAE means, and how sure we are.

Three phases, each resumable inside one interpret artifact:
1. *scan* (`saectl.scan`): the SAE over a harvest, streamed in blocks of whole sequences in
   bounded memory, keeping per feature its density, mean and max activation, a histogram of
   log activations, its top contexts and a uniform sample of the contexts it fires on; plus
   the logit lens of its decoder direction;
2. *windows*: a second pass that reads only the sequences chosen as examples, for the
   per-token activations the dashboard shades and the explainer reads;
3. *explain*: for a seeded sample of live features, an explainer model writes a one-sentence
   explanation from the top and quantile examples, and a scorer rates it by detection on
   held-out activating and non-activating contexts, beside a control (another feature's
   explanation on the same contexts). Answers are cached in the artifact (`responses.json`).

Then `report/index.html` (saectl.dashboard), written even when the explainer fails; the
artifact is complete only once every chosen feature is explained.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from saectl import faults, store
from saectl.config import address_params, opt, parse_image_shape
from saectl.console import info, progress
from saectl.errors import ConfigError, SaectlError

NAME = "interpret"
FIGURES = ("n_features", "dead_fraction", "n_explained", "mean_score", "mean_control_score")
EXPLANATIONS = "explanations.json"
RESPONSES = "responses.json"
DECODER_PNG = "decoder.png"
LENS_K = 10
EXPLAINER_TOP = 6  # top contexts shown to the explainer, beside one per quantile
SCANNED, WINDOWED = 1, 2  # progress units
KINDS = ("top", "quantile", "positive", "negative")


@dataclass(frozen=True)
class InterpretConfig:
    sae: str | None = opt(None, "The trained SAE (a train ref, e.g. the one sweep chose)")
    harvest: str | None = opt(None, "Harvest (or import) to scan; default: the SAE's own")
    features: str | None = opt(None, "Features to study, e.g. 0-99,512 (default: all)")
    sample: int | None = opt(None, "Study a seeded random sample of N features instead")
    seed: int = opt(0, "Seed of the feature sample, example draws and detection shuffles")
    tokens: int | None = opt(None, "Scan at most this many tokens (whole contexts) of the harvest")
    top: int = opt(20, "Top-activating contexts kept per feature (one per sequence)")
    quantiles: int = opt(4, "Activation quantiles that examples are drawn from")
    per_quantile: int = opt(3, "Examples shown per quantile")
    window: int = opt(32, "Tokens per context shown (the activating token ~3/4 along)")
    prompt_window: int = opt(16, "Tokens per context in the explainer's and scorer's prompts "
                                 "(the same cut; shorter prompts for small CPU models)")
    explain: bool = opt(True, "Explain and score features with a language model")
    explainer: str | None = opt(None, "HF model id or folder, or an OpenAI-compatible URL "
                                      "(http://host:port/v1); default: the packaged SmolLM2")
    explainer_model: str | None = opt(None, "Model name at the --explainer URL (key from "
                                            "$OPENAI_API_KEY)")
    explain_max: int = opt(50, "Explain at most N live features (a seeded sample)")
    detection: int = opt(10, "Held-out activating, and as many non-activating, contexts per score")
    dashboard_max: int = opt(2000, "Features whose examples the dashboard embeds (a seeded "
                                   "sample beyond that; every feature's statistics are listed)")
    image_shape: str | None = opt(None, "HxW: draw decoder directions as images (default: the "
                                        "import's --image-shape)")
    memory: str = opt("256MiB", "Working memory for SAE activations per block", address=False)
    open: bool = opt(False, "Open the dashboard in a browser where one exists", address=False)
    device: str = opt("auto", "auto, cpu, cuda, ...", address=False)
    store: str | None = opt(None, "Artifact store (default $SAECTL_STORE or ./artifacts)",
                            address=False)
    no_wait: bool = opt(False, "Fail instead of waiting for another writer", address=False)

    def __post_init__(self):
        if not self.sae:
            raise ConfigError("give the SAE to interpret: saectl interpret TRAIN_REF")
        for name in ("top", "quantiles", "per_quantile", "window", "prompt_window", "detection",
                     "dashboard_max"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.explain_max < 0:
            raise ConfigError("--explain-max must be at least 0")
        if self.sample is not None and self.sample < 1:
            raise ConfigError("--sample must be at least 1")
        if self.sample is not None and self.features:
            raise ConfigError("give --features or --sample, not both")
        if self.tokens is not None and self.tokens < 1:
            raise ConfigError("--tokens must be at least 1")
        self.image_hw()

    def image_hw(self) -> tuple[int, int] | None:
        return parse_image_shape(self.image_shape)


def parse_features(spec: str, d_sae: int) -> np.ndarray:
    """'0-99,512' → sorted unique indices, each checked against the SAE's width."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            lo, _, hi = part.partition("-")
            a, b = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise ConfigError(f"--features {spec!r}: cannot read {part!r}; write e.g. "
                              "0-99,512") from None
        if a > b or a < 0:
            raise ConfigError(f"--features {spec!r}: {part!r} is not a range of indices")
        if b >= d_sae:
            raise ConfigError(f"feature {b} is out of range: the SAE has {d_sae} features "
                              f"(0-{d_sae - 1})")
        out.update(range(a, b + 1))
    if not out:
        raise ConfigError(f"--features {spec!r} names no feature; write e.g. 0-99,512")
    return np.array(sorted(out), dtype=np.int64)


def select_features(cfg: InterpretConfig, d_sae: int) -> np.ndarray:
    if cfg.features:
        return parse_features(cfg.features, d_sae)
    if cfg.sample is not None:
        rng = np.random.default_rng(cfg.seed)
        return np.sort(rng.choice(d_sae, min(cfg.sample, d_sae), replace=False)).astype(np.int64)
    return np.arange(d_sae, dtype=np.int64)


@dataclass
class _Plan:
    art: store.Artifact
    params: dict
    inputs: dict
    lin: object
    harvest: store.Artifact
    feats: np.ndarray
    client: object
    n_seq: int
    C: int
    hw: tuple[int, int] | None


def plan(cfg: InterpretConfig) -> _Plan:
    """Everything `cfg` resolves to, and the artifact it names; writes nothing."""
    from saectl.lineage import check_activations, sae_lineage

    root = store.store_root(cfg.store)
    lin = sae_lineage(root, cfg.sae)
    harvest = store.open_complete(root, cfg.harvest) if cfg.harvest else lin.harvest
    check_activations(lin, harvest)
    feats = select_features(cfg, lin.d_sae)
    client = None
    if cfg.explain and cfg.explain_max > 0:
        from saectl.explain import make_client

        client = make_client(cfg.explainer, cfg.explainer_model)
    hsum = harvest.manifest()["summary"]
    C = int(hsum["context_size"])
    n_seq = int(hsum["n_seq"]) if cfg.tokens is None else min(int(hsum["n_seq"]),
                                                               math.ceil(cfg.tokens / C))
    hw = cfg.image_hw() or (tuple(hsum["image_shape"]) if hsum.get("image_shape") else None)
    if hw and hw[0] * hw[1] != lin.d_in:
        raise ConfigError(f"--image-shape {hw[0]}x{hw[1]} has {hw[0] * hw[1]} pixels but the "
                          f"SAE's inputs have {lin.d_in} values")
    params = address_params(cfg)
    params.update(n_seq=n_seq, image_shape=list(hw) if hw else None,
                  explainer=client.identity if client else None)
    del params["explainer_model"], params["tokens"]
    inputs = {"sae": lin.sae, "harvest": harvest}
    art = store.artifact_for(root, NAME, params, inputs)
    return _Plan(art, params, inputs, lin, harvest, feats, client, n_seq, C, hw)


def address(cfg: InterpretConfig) -> store.Artifact:
    """The artifact `run(cfg)` makes (for `saectl run --dry-run`)."""
    return plan(cfg).art


def run(cfg: InterpretConfig) -> store.Artifact:
    p = plan(cfg)
    art = p.art
    if art.is_complete():
        info(f"interpret: cache hit {art.ref}")
        _announce(art, cfg.open)
        return art
    with store.writing(art, p.params, p.inputs, wait=not cfg.no_wait):
        if art.is_complete():
            return art
        job = _Job(cfg, p.lin, p.harvest, p.feats, p.n_seq, p.C, p.hw, art)
        job.run_phases()
        error = job.explain_all(p.client) if p.client else None
        job.write_dashboard()
        if error is not None:
            raise error
        store.mark_complete(art, job.summary())
    info(f"interpret: wrote {art.ref}")
    _announce(art, cfg.open)
    return art


def _announce(art: store.Artifact, want_open: bool) -> None:
    from saectl.dashboard import open_in_browser

    page = art.path / store.REPORT / "index.html"
    info(f"interpret: dashboard {page}")
    if want_open and not open_in_browser(page):
        info("interpret: no graphical browser here; open the file above on your machine")


class _Job:
    """The state of one interpret run: inputs, and the arrays the phases leave in the artifact."""

    def __init__(self, cfg, lin, harvest, feats, n_seq, C, hw, art):
        from saectl.models import resolve_device
        from saectl.sae import load_sae

        self.cfg, self.lin, self.harvest, self.feats = cfg, lin, harvest, feats
        self.n_seq, self.C, self.hw, self.art = n_seq, C, hw, art
        self.device = resolve_device(cfg.device)
        self.sae = load_sae(store.sae_dir(lin.sae), self.device)
        hg = harvest.group()
        self.acts = hg[f"acts/{lin.hook}"]
        self.token_ids = hg["tokens"] if "tokens" in hg else None
        self.skip_bos = bool(harvest.manifest()["summary"].get("bos")) and C > 1
        self.W = min(cfg.window, C - self.skip_bos) if self.token_ids is not None else 1
        from saectl.config import parse_bytes

        per_token = 4 * (lin.d_sae + 4 * len(feats))  # encode output + per-feature working set
        self.seqs_per_block = max(1, parse_bytes(cfg.memory) // (per_token * C))
        self.pool = 2 * (cfg.quantiles * cfg.per_quantile + cfg.detection) + cfg.top
        self.explained: dict[int, dict] = {}
        self.n_unexplained = 0

    # -- reading ------------------------------------------------------------------------

    def read(self, lo: int, hi: int):
        import torch

        from saectl import arrays

        x = arrays.read(self.acts, slice(lo * self.C, hi * self.C), artifact=self.harvest.ref)
        return torch.from_numpy(np.ascontiguousarray(x)).view(hi - lo, self.C, -1)

    def blocks(self):
        for lo in range(0, self.n_seq, self.seqs_per_block):
            yield lo, self.read(lo, min(lo + self.seqs_per_block, self.n_seq))

    def encode_all(self, x):
        import torch

        with torch.inference_mode():
            return self.sae.encode(x.to(self.device))

    def encode_selected(self, x):
        a = self.encode_all(x)
        if len(self.feats) == self.lin.d_sae:
            return a
        import torch

        return a.index_select(1, torch.from_numpy(self.feats).to(a.device))

    # -- phases -------------------------------------------------------------------------

    def run_phases(self) -> None:
        done = store.read_progress(self.art)
        if SCANNED not in done:
            self._scan()
            done.add(SCANNED)
            store.record_progress(self.art, "main", done)
            faults.point("interpret.scanned")
        if WINDOWED not in done:
            self._windows()
            done.add(WINDOWED)
            store.record_progress(self.art, "main", done)
        g = self.art.group()
        self.stats = {k: g[k][:] for k in ("features", "stats/fired", "stats/act_sum",
                                           "stats/max_act", "stats/hist", "top/act", "top/seq")}
        self.n_tokens = int(g.attrs["n_tokens"])
        self.win = {k: g[f"windows/{k}"][:] for k in ("slot", "kind", "quantile", "seq",
                                                      "start", "acts")}
        self.win_tokens = g["windows/tokens"][:] if "windows/tokens" in g else None
        order = np.argsort(self.win["slot"], kind="stable")
        slots, first = np.unique(self.win["slot"][order], return_index=True)
        self.by_slot = dict(zip(slots.tolist(), np.split(order, first[1:])))
        self.lens = {k: g[f"lens/{k}"][:] for k in ("pos_ids", "pos_vals", "neg_ids",
                                                    "neg_vals")} if "lens/pos_ids" in g else None

    def _scan(self) -> None:
        from saectl.scan import HIST_EDGES, scan

        n_tok = self.n_seq * self.C
        info(f"interpret: scanning {n_tok:,} tokens of {self.harvest.ref} through "
             f"{len(self.feats):,} features")
        with progress("interpret scan", n_tok, "tokens") as bar:
            st = scan(self.blocks(), self.encode_selected, self.feats, top=self.cfg.top,
                      pool=self.pool, seed=self.cfg.seed, skip_first=self.skip_bos,
                      on_block=bar.advance)
        g = self.art.group("r+")
        g.attrs["n_tokens"] = st.n_tokens
        for name, arr in (("features", st.features), ("stats/fired", st.fired),
                          ("stats/act_sum", st.act_sum), ("stats/max_act", st.max_act),
                          ("stats/density", st.density.astype(np.float64)),
                          ("stats/hist", st.hist), ("top/act", st.top_act),
                          ("top/seq", st.top_seq), ("top/pos", st.top_pos),
                          ("pool/act", st.pool_act), ("pool/seq", st.pool_seq),
                          ("pool/pos", st.pool_pos)):
            g.create_array(name, data=np.ascontiguousarray(arr), overwrite=True)
        g["stats/hist"].attrs["log10_edges"] = HIST_EDGES.tolist()
        lens = self._logit_lens()
        if lens is not None:
            for name, arr in zip(("pos_ids", "pos_vals", "neg_ids", "neg_vals"), lens):
                g.create_array(f"lens/{name}", data=arr.cpu().numpy(), overwrite=True)

    def _model(self):
        from saectl.lineage import harvest_model
        from saectl.models import load_model

        return load_model(harvest_model(self.harvest), "cpu")  # the unembedding, on any machine

    def _tokenizer(self):
        from saectl.lineage import harvest_model
        from saectl.models import load_tokenizer

        return load_tokenizer(harvest_model(self.harvest))

    def _logit_lens(self):
        if self.harvest.stage != "harvest":
            return None
        from saectl.lineage import logit_lens

        import torch

        model = self._model()
        rows = self.sae.W_dec.detach()[torch.from_numpy(self.feats).to(self.sae.device)]
        return logit_lens(rows.cpu(), model, LENS_K)

    def _requests(self):
        """Which windows to read: (slot, kind, quantile, seq, start) for every example."""
        from saectl.scan import NO_SEQ, hash_keys

        g = self.art.group()
        top_seq, top_pos = g["top/seq"][:], g["top/pos"][:]
        pool_act, pool_seq, pool_pos = g["pool/act"][:], g["pool/seq"][:], g["pool/pos"][:]
        fired = g["stats/fired"][:]
        rows: list[tuple] = []
        cfg, C = self.cfg, self.C
        lo_tok = 1 if self.skip_bos else 0
        embedded = self._embedded(fired)
        for j in embedded:
            for s, p in zip(top_seq[j], top_pos[j]):
                if s != NO_SEQ:
                    rows.append((j, 0, -1, s, self._start(p)))
            shown = set(top_seq[j][top_seq[j] != NO_SEQ].tolist())
            ok = pool_seq[j] != NO_SEQ
            cand = [(a, s, p) for a, s, p in zip(pool_act[j][ok], pool_seq[j][ok], pool_pos[j][ok])
                    if s not in shown]
            cand.sort(key=lambda t: (t[0], t[1]))  # by activation: quantiles are slices
            groups = np.array_split(np.arange(len(cand)), cfg.quantiles)
            held = []
            for q, idx in enumerate(groups):
                pick = idx[:: max(1, len(idx) // cfg.per_quantile)][: cfg.per_quantile]
                for i in pick:
                    rows.append((j, 1, q, cand[i][1], self._start(cand[i][2])))
                held += [i for i in idx if i not in set(pick.tolist())]
            for i in held[:: max(1, len(held) // cfg.detection)][: cfg.detection]:
                rows.append((j, 2, -1, cand[i][1], self._start(cand[i][2])))
            # Non-activating candidates: random sequences (checked in the windows pass).
            f = self.feats[j]
            keys = hash_keys(cfg.seed + 1, np.arange(min(self.n_seq, 4096)), np.array([f]))[:, 0]
            for s in np.argsort(keys)[: 3 * cfg.detection]:
                if s in shown:
                    continue
                span = max(1, C - lo_tok - self.W + 1)
                start = lo_tok + int(hash_keys(cfg.seed, np.array([s]), np.array([f]))[0, 0] * span)
                rows.append((j, 3, -1, int(s), start))
        return np.array(rows, dtype=np.int64).reshape(-1, 5)

    def _start(self, pos: int) -> int:
        if self.W == 1:
            return int(pos)
        lo = 1 if self.skip_bos else 0
        return int(min(max(pos - (3 * self.W) // 4, lo), self.C - self.W))

    def _embedded(self, fired: np.ndarray) -> list[int]:
        """Slots whose examples the dashboard embeds: all live ones, or a seeded sample."""
        live = np.flatnonzero(fired > 0)
        if len(live) <= self.cfg.dashboard_max:
            return live.tolist()
        rng = np.random.default_rng(self.cfg.seed)
        return np.sort(rng.choice(live, self.cfg.dashboard_max, replace=False)).tolist()

    def _windows(self) -> None:
        from saectl.scan import windows

        req = self._requests()
        feature = self.feats[req[:, 0]] if len(req) else np.zeros(0, np.int64)
        with progress("interpret examples", len(req), "windows") as bar:
            acts = windows(self.read, self.encode_all, req[:, 3], req[:, 4], feature, self.W,
                           self.seqs_per_block, self.n_seq, on_block=bar.advance)
        # A "non-activating" context must not activate anywhere in what is shown.
        keep = ~((req[:, 1] == 3) & (acts > 0).any(1))
        req, acts = req[keep], acts[keep]
        neg = np.flatnonzero(req[:, 1] == 3)
        slot_neg = req[neg, 0]
        first = np.concatenate([[True], slot_neg[1:] != slot_neg[:-1]]) if len(neg) else []
        rank = np.zeros(len(neg), dtype=np.int64)  # keep `detection` negatives per feature
        for i in range(1, len(neg)):
            rank[i] = 0 if first[i] else rank[i - 1] + 1
        drop = neg[rank >= self.cfg.detection]
        keep = np.ones(len(req), dtype=bool)
        keep[drop] = False
        req, acts = req[keep], acts[keep]
        g = self.art.group("r+")
        for k, col in zip(("slot", "kind", "quantile", "seq", "start"), req.T):
            g.create_array(f"windows/{k}", data=np.ascontiguousarray(col), overwrite=True)
        g.create_array("windows/acts", data=acts.reshape(-1, self.W), overwrite=True)
        if self.token_ids is not None:
            seqs, where = np.unique(req[:, 3], return_inverse=True)
            rows = np.asarray(self.token_ids.get_orthogonal_selection(
                (seqs, slice(None)))).reshape(len(seqs), -1)
            cols = req[:, 4, None] + np.arange(self.W)
            g.create_array("windows/tokens", data=rows[where[:, None], cols].astype(np.int32),
                           overwrite=True)

    # -- text ---------------------------------------------------------------------------

    def vocab(self, ids) -> dict[int, str]:
        tok = self._tokenizer()
        return {int(i): tok.decode([int(i)]) for i in np.unique(np.asarray(ids))}

    def examples(self, slot: int, kind: int, strings: dict[int, str] | None):
        """[(quantile, Example)] of one slot and kind, in stored order."""
        from saectl.explain import Example

        idx = self.by_slot.get(slot, np.zeros(0, np.int64))
        idx = idx[self.win["kind"][idx] == kind]
        out = []
        for i in idx:
            acts = self.win["acts"][i].tolist()
            if self.win_tokens is not None:
                tokens = [strings[int(t)] for t in self.win_tokens[i]]
            else:
                tokens = [f"row {int(self.win['seq'][i]) * self.C + int(self.win['start'][i])}"]
            out.append((int(self.win["quantile"][i]), Example(tokens, acts)))
        return out

    def strings(self) -> dict[int, str] | None:
        if self.win_tokens is None:
            return None
        ids = [self.win_tokens.ravel()]
        if self.lens is not None:
            ids += [self.lens["pos_ids"].ravel(), self.lens["neg_ids"].ravel()]
        if not hasattr(self, "_strings"):
            self._strings = self.vocab(np.concatenate(ids))
        return self._strings

    # -- explanations -------------------------------------------------------------------

    def explain_all(self, client) -> SaectlError | None:
        """Explain and score a seeded sample of live features; returns the explainer's error
        (after writing what was done) instead of raising it, so the dashboard is still written."""
        from saectl.explain import ExplainerError, ResponseCache, detection_score, explain

        fired = self.stats["stats/fired"]
        live = [j for j in np.flatnonzero(fired > 0).tolist()
                if (self.win["kind"][self.by_slot.get(j, [])] == 2).any()]
        rng = np.random.default_rng(self.cfg.seed)
        chosen = sorted(rng.choice(live, min(len(live), self.cfg.explain_max), replace=False)
                        .tolist()) if live else []
        cache = ResponseCache(self.art.path / RESPONSES)
        strings = self.strings()
        info(f"interpret: explaining {len(chosen)} features with {_client_name(client)}")
        error = None
        batch = 16
        with progress("interpret explain", len(chosen), "features") as bar:
            for b in range(0, len(chosen), batch):
                part = chosen[b:b + batch]
                cut = self._cut
                shown = [[cut(ex) for _, ex in self.examples(j, 0, strings)[:EXPLAINER_TOP]]
                         + [cut(ex) for ex in self._per_quantile(j, strings)] for j in part]
                try:
                    texts = explain(client, shown, cache)
                    for i, (j, text) in enumerate(zip(part, texts)):
                        entry = {"explanation": text}
                        if text:
                            control = _control(texts, i) or _control(
                                [e["explanation"] for e in self.explained.values()], -1)
                            pos = [cut(ex) for _, ex in self.examples(j, 2, strings)]
                            neg = [cut(ex) for _, ex in self.examples(j, 3, strings)]
                            entry.update(detection_score(client, text, pos, neg,
                                                         seed=self.cfg.seed + j,
                                                         control=control, cache=cache))
                        self.explained[j] = entry
                except ExplainerError as e:
                    error = e
                    break
                bar.advance(len(part))
                faults.point("interpret.explained")
        self.n_unexplained = len(chosen) - len(self.explained)
        self.n_chosen = len(chosen)
        from saectl.store import atomic_write

        atomic_write(self.art.path / EXPLANATIONS, json.dumps(
            {str(int(self.feats[j])): e for j, e in self.explained.items()}, indent=1,
            allow_nan=False, default=float).encode())
        if error is None:
            return None
        return ExplainerError(f"{error}; {self.n_unexplained} of {len(chosen)} features left "
                              f"unexplained (statistics and dashboard are in {self.art.path}); "
                              "re-run the same command to retry, answers already received are kept")

    def _cut(self, ex):
        """The prompt's part of a context: `prompt_window` tokens placed as in the window,
        the maximum ~3/4 along (a non-activating context keeps its end)."""
        from saectl.explain import Example

        n = self.cfg.prompt_window
        if len(ex.tokens) <= n:
            return ex
        peak = int(np.argmax(ex.acts)) if max(ex.acts) > 0 else len(ex.tokens) - 1
        lo = min(max(peak - (3 * n) // 4, 0), len(ex.tokens) - n)
        return Example(ex.tokens[lo:lo + n], ex.acts[lo:lo + n])

    def _per_quantile(self, j: int, strings) -> list:
        seen, out = set(), []
        for q, ex in self.examples(j, 1, strings):
            if q not in seen:
                seen.add(q)
                out.append(ex)
        return out

    # -- outputs ------------------------------------------------------------------------

    def write_dashboard(self) -> None:
        from saectl.dashboard import write_dashboard

        write_dashboard(self.art.path / store.REPORT / "index.html", self.dashboard_data())
        if self.hw:
            self.write_decoder_images(self.art.path / store.REPORT / DECODER_PNG)

    def write_decoder_images(self, path, n_max: int = 64) -> None:
        """The decoder rows of the most often firing live features, drawn as images (blue
        negative, red positive, each on its own symmetric scale), in a square grid."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from saectl.store import atomic_write

        fired = self.stats["stats/fired"]
        order = [j for j in np.argsort(-fired, kind="stable") if fired[j] > 0][:n_max]
        W = self.sae.W_dec.detach().float().cpu().numpy()
        cols = max(1, math.ceil(math.sqrt(len(order))))
        rows = max(1, math.ceil(len(order) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.3 * rows + 0.5), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for ax, j in zip(axes.ravel(), order):
            img = W[self.feats[j]].reshape(self.hw)
            lim = float(np.abs(img).max()) or 1.0
            ax.imshow(img, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            ax.set_title(f"#{self.feats[j]} {fired[j] / max(self.n_tokens, 1):.1%}", fontsize=6)
        fig.suptitle(f"{self.lin.sae.ref[:18]}: {self.sae.cfg.arch}, {self.lin.d_sae} latents"
                     + (f", k={self.sae.cfg.k}" if self.sae.cfg.arch in ("topk", "batchtopk") else "")
                     + f"; the {len(order)} most often firing", fontsize=8)
        fig.tight_layout()
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        atomic_write(path, buf.getvalue())

    def dashboard_data(self) -> dict:
        from saectl.scan import HIST_EDGES

        st, strings = self.stats, self.strings()
        fired, n = st["stats/fired"], max(self.n_tokens, 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(fired > 0, st["stats/act_sum"] / np.maximum(fired, 1), np.nan)
        has_examples = self.by_slot
        W_dec = self.sae.W_dec.detach().float().cpu().numpy() if self.hw else None
        feats = []
        for j, f in enumerate(st["features"].tolist()):
            row = {"index": f, "density": fired[j] / n, "max_act": float(st["stats/max_act"][j]),
                   "mean_act": float(mean[j])}
            e = self.explained.get(j, {})
            row.update(explanation=e.get("explanation") or None, score=e.get("balanced_accuracy"),
                       control_score=e.get("control_balanced_accuracy"))
            h = st["stats/hist"][j]
            nz = np.flatnonzero(h)
            if len(nz):
                a, b = nz[0], nz[-1] + 1
                row["hist"] = {"edges": HIST_EDGES[a:b + 1].tolist(), "counts": h[a:b].tolist(),
                               "label": "log10 activation"}
            if j in has_examples:
                row["top"] = [_ex(ex) for _, ex in self.examples(j, 0, strings)]
                qs = self.examples(j, 1, strings)
                row["quantiles"] = [
                    {"label": f"quantile {q + 1} of {self.cfg.quantiles}",
                     "examples": [_ex(ex) for qq, ex in qs if qq == q]}
                    for q in range(self.cfg.quantiles) if any(qq == q for qq, _ in qs)]
            if self.lens is not None:
                row["logits_pos"] = [[strings[int(i)], float(v)] for i, v in
                                     zip(self.lens["pos_ids"][j], self.lens["pos_vals"][j])]
                row["logits_neg"] = [[strings[int(i)], float(v)] for i, v in
                                     zip(self.lens["neg_ids"][j], self.lens["neg_vals"][j])]
            if W_dec is not None:
                row["image"] = W_dec[f].reshape(self.hw).tolist()
            feats.append(row)
        s = self.summary()
        meta = {"sae": self.lin.sae.ref, "hook": self.lin.hook, "harvest": self.harvest.ref,
                "model": self.harvest.manifest().get("origin", {}).get("model", {}).get("name"),
                "architecture": self.sae.cfg.arch, "d_sae": self.lin.d_sae,
                "tokens scanned": self.n_tokens, "explained": s["n_explained"],
                "mean score": s["mean_score"], "mean control score": s["mean_control_score"]}
        return {"title": f"saectl · {self.lin.sae.ref[:18]} · {self.lin.hook}",
                "meta": meta, "features": feats}

    def summary(self) -> dict:
        st = self.stats
        fired = st["stats/fired"]
        scores = [e["balanced_accuracy"] for e in self.explained.values()
                  if e.get("balanced_accuracy") is not None]
        controls = [e["control_balanced_accuracy"] for e in self.explained.values()
                    if e.get("control_balanced_accuracy") is not None]
        return {"sae": self.lin.sae.ref, "hook": self.lin.hook, "harvest": self.harvest.ref,
                "n_features": int(len(fired)), "n_tokens": self.n_tokens,
                "dead_fraction": float((fired == 0).mean()) if len(fired) else 0.0,
                "mean_density": float((fired / max(self.n_tokens, 1)).mean()) if len(fired) else 0.0,
                "n_explained": sum(1 for e in self.explained.values() if e.get("explanation")),
                "mean_score": float(np.mean(scores)) if scores else None,
                "mean_control_score": float(np.mean(controls)) if controls else None,
                "dashboard": f"{store.REPORT}/index.html"}


def _ex(ex) -> dict:
    return {"tokens": ex.tokens, "acts": ex.acts}


def _control(texts: list[str], i: int) -> str | None:
    """Another feature's explanation: the next non-empty one after position i, wrapping."""
    n = len(texts)
    for step in range(1, n + 1):
        t = texts[(i + step) % n] if n else ""
        if t and (i < 0 or (i + step) % n != i):
            return t
    return None


def _client_name(client) -> str:
    ident = client.identity
    return ident.get("endpoint", "") + (" " if "endpoint" in ident else "") + str(ident.get("model"))


# TRANSITIONAL (issue 14): the old run wrapped until this module defines plan and build.
from saectl import stage as _contract  # noqa: E402

STAGE = _contract.legacy('interpret', InterpretConfig, run, "Explain an SAE's features: statistics, examples, logit lens, explanations with detection scores, and a dashboard (report/index.html).",
                         ('sae',), address=address, output=None,
                         figures=FIGURES)
