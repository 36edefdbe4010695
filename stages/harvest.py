"""Harvest: run a language model over packed text and store its activations at hook points.

Writes `tokens` (n_seq × C, int32) and `acts/<hook>` (n_seq·C × d), 16-bit by default,
compressed and checksummed. Several hooks come from one forward pass, which stops after the
deepest hook. A background thread writes while the model computes.

Work is cut into *groups* of whole chunks, aligned from row 0, so the batches a sequence is
computed in never depend on sharding or on where a killed run stopped: a resumed or sharded
harvest is bit-identical to an uninterrupted one with the same --batch-size. Progress is one
set of done chunks per writer (`progress/<writer>.json`); a re-run skips groups already done.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from dataclasses import dataclass

from saectl import arrays, faults, store
from saectl.config import address_params, opt
from saectl.console import info, progress
from saectl.errors import ArtifactError, ConfigError, SaectlError

NAME = "harvest"
FIGURES = ("n_tokens", "bytes_per_value")  # summary figures `saectl run` shows
AUTOCAST = (None, "bfloat16")  # --autocast choices; None: the model's own float32


@dataclass(frozen=True)
class HarvestConfig:
    hooks: str | None = opt(None, "Hook points, comma-separated: resid_post.3,mlp_out.3 "
                                  "(sites resid_pre, resid_post, mlp_out, attn_out) or module paths")
    model: str | None = opt(None, "HF model id, local folder, or alias (pythia-70m, gpt2, "
                                  "smollm2-135m); default: the packaged SmolLM2-135M-Instruct")
    dataset: str | None = opt(None, "HF dataset id, local .txt/.jsonl/.parquet file or folder; "
                                    "default: the packaged English Wikipedia summaries")
    text_column: str = opt("text", "Text field of .jsonl/.parquet/HF datasets")
    split: str = opt("train", "Split of a HF dataset")
    tokens: int = opt(100_000, "Tokens to harvest (rounded up to whole contexts)")
    context_size: int = opt(128, "Tokens per context; the first is BOS")
    dtype: str = opt("float16", "Storage dtype: float16, bfloat16 or float32")
    autocast: str | None = opt(None, "Run the forward pass under torch.autocast in this dtype: "
                                     "bfloat16 (faster on GPUs and on CPUs with AVX-512 bf16 or "
                                     "AMX; activations differ from float32's by ~0.5% "
                                     "per token, a few tokens by more)")
    batch_size: int = opt(8, "Contexts per forward pass", address=False)
    shard: str | None = opt(None, "I/N: this process fills shard I of N (e.g. a SLURM array "
                                  "task); the artifact completes when all have", address=False)
    device: str = opt("auto", "auto, cpu, cuda, cuda:1, ...", address=False)
    store: str | None = opt(None, "Artifact store (default $SAECTL_STORE or ./artifacts)",
                            address=False)
    no_wait: bool = opt(False, "Fail instead of waiting when another process writes this "
                               "artifact", address=False)

    def __post_init__(self):
        if not self.hooks or not self.hook_list:
            raise ConfigError("give --hooks, e.g. --hooks resid_post.3 (sites: resid_pre, "
                              "resid_post, mlp_out, attn_out)")
        for name, v in (("tokens", self.tokens), ("context_size", self.context_size),
                        ("batch_size", self.batch_size)):
            if v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
        if self.context_size < 2:
            raise ConfigError("--context-size must be at least 2 (BOS and one token)")
        if self.dtype not in arrays.STORAGE_DTYPES:
            raise ConfigError(f"--dtype {self.dtype} is not one of "
                              f"{', '.join(arrays.STORAGE_DTYPES)}")
        if self.autocast not in AUTOCAST:
            raise ConfigError(f"--autocast {self.autocast} is not supported; use --autocast "
                              f"{' or '.join(a for a in AUTOCAST if a)}, or leave it out")
        self.shard_index()  # validates

    @property
    def hook_list(self) -> list[str]:
        return sorted({h.strip() for h in (self.hooks or "").split(",") if h.strip()})

    @property
    def n_seq(self) -> int:
        return math.ceil(self.tokens / self.context_size)

    def shard_index(self) -> tuple[int, int] | None:
        if self.shard is None:
            return None
        try:
            i, n = (int(p) for p in self.shard.split("/"))
        except ValueError:
            raise ConfigError(f"--shard {self.shard!r} must look like I/N, e.g. 0/4") from None
        if not (n >= 1 and 0 <= i < n):
            raise ConfigError(f"--shard {self.shard}: need 0 <= I < N")
        return i, n


def resolved_params(cfg: HarvestConfig, model_spec, data_spec) -> dict:
    """What the artifact's address is made of: the identities of model and data, not names."""
    from saectl import data, models

    params = address_params(cfg)
    params.update(model=models.model_identity(model_spec), dataset=data.dataset_identity(data_spec),
                  hooks=cfg.hook_list, n_seq=cfg.n_seq)
    del params["tokens"]  # n_seq × context_size is what is stored
    if params["autocast"] is None:  # absent, so addresses made before the option stay valid
        del params["autocast"]
    return params


def _plan(cfg: HarvestConfig):
    from saectl import data, models

    model_spec = models.resolve_model(cfg.model)
    data_spec = data.resolve_dataset(cfg.dataset, cfg.text_column, cfg.split)
    params = resolved_params(cfg, model_spec, data_spec)
    art = store.artifact_for(store.store_root(cfg.store), NAME, params)
    return model_spec, data_spec, params, art


def address(cfg: HarvestConfig) -> store.Artifact:
    """The artifact `run(cfg)` makes or finds, without loading the model or writing anything
    (`saectl run --dry-run` asks every stage this)."""
    return _plan(cfg)[3]


def run(cfg: HarvestConfig) -> store.Artifact:
    from saectl import data, hooks as hookpoints, models

    model_spec, data_spec, params, art = _plan(cfg)
    if art.is_complete():
        info(f"harvest: cache hit {art.ref}")
        return art

    device = models.resolve_device(cfg.device)
    info(f"harvest: loading {model_spec.name} on {device}")
    tokenizer = models.load_tokenizer(model_spec)
    model = models.load_model(model_spec, device=device)
    hooks = hookpoints.parse_hooks(model, cfg.hook_list)
    dims = {h.name: hookpoints.hook_dim(model, h) for h in hooks}

    info(f"harvest: tokenizing {data_spec.name} into {cfg.n_seq:,} contexts of {cfg.context_size}")
    tokens = data.pack_tokens(tokenizer, data.iter_texts(data_spec), cfg.context_size, cfg.n_seq)

    shard = cfg.shard_index()
    origin = {"model": {"name": model_spec.name, "source": model_spec.source,
                        "gguf_file": model_spec.gguf_file, "local": model_spec.local},
              "dataset": data_spec.name}
    with store.writing(art, params, shard=None if shard is None else f"{shard[0]}-of-{shard[1]}",
                       wait=not cfg.no_wait, origin=origin) as w:
        if art.is_complete():  # finished by another process while we waited for the lock
            return art
        layout = make_layout(cfg, dims)
        with w.exclusive():  # shards racing to create arrays: one creates, the others reopen
            group = _create_arrays(art, layout, dims, cfg)
        _harvest(art, group, layout, model, hooks, tokens, device, cfg, shard)
        with w.exclusive():
            done = store.read_progress(art)
            if art.is_complete():
                return art
            if len(done) < layout.n_chunks:
                info(f"harvest: shard {cfg.shard} finished; {layout.n_chunks - len(done)} of "
                     f"{layout.n_chunks} chunks wait for other shards")
                return art
            store.mark_complete(art, _summary(art, group, cfg, dims))
    info(f"harvest: wrote {art.ref}")
    return art


@dataclass(frozen=True)
class _Layout:
    """Chunks of `seqs` sequences; forward groups of `group` chunks (B ≥ chunk) or sub-batches
    of `batch` sequences inside one chunk (B < chunk). All aligned from sequence 0."""

    n_seq: int
    seqs: int
    group: int
    batch: int

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_seq / self.seqs)

    @property
    def n_groups(self) -> int:
        return math.ceil(self.n_chunks / self.group)

    def chunks_of(self, g: int) -> range:
        return range(g * self.group, min((g + 1) * self.group, self.n_chunks))

    def rows_of(self, g: int) -> tuple[int, int]:
        c = self.chunks_of(g)
        return c.start * self.seqs, min(c.stop * self.seqs, self.n_seq)

    def batches_of(self, g: int) -> list[tuple[int, int]]:
        lo, hi = self.rows_of(g)
        if self.group > 1:
            return [(lo, hi)]
        return [(s, min(s + self.batch, hi)) for s in range(lo, hi, self.batch)]


def make_layout(cfg: HarvestConfig, dims: dict[str, int]) -> _Layout:
    """Chunk rows follow from the address (context size, widest hook, dtype); only the grouping
    follows from --batch-size."""
    itemsize = arrays.numpy_dtype(cfg.dtype).itemsize
    seqs = arrays.rows_per_chunk(cfg.context_size * max(dims.values()) * itemsize)
    return _Layout(cfg.n_seq, seqs, max(1, cfg.batch_size // seqs), min(cfg.batch_size, seqs))


def _create_arrays(art, layout: _Layout, dims: dict[str, int], cfg: HarvestConfig):
    group = art.group("r+")
    C = cfg.context_size
    arrays.create(group, "tokens", (cfg.n_seq, C), (layout.seqs, C), "int32")
    for hook, d in dims.items():
        arrays.create(group, f"acts/{hook}", (cfg.n_seq * C, d), (layout.seqs * C, d), cfg.dtype,
                      attrs={"hook": hook, "d": d})
    return group


def _harvest(art, group, layout: _Layout, model, hooks, tokens, device, cfg, shard) -> None:
    import torch

    from saectl.hooks import run_with_hooks

    i, n = shard or (0, 1)
    mine = range(i * layout.n_groups // n, (i + 1) * layout.n_groups // n)
    done = store.read_progress(art)
    todo = [g for g in mine if not set(layout.chunks_of(g)) <= done]
    writer_id = f"shard-{i}-of-{n}" if shard else "main"
    my_done = {c for g in mine for c in layout.chunks_of(g)} & done
    C = cfg.context_size
    total = sum(layout.rows_of(g)[1] - layout.rows_of(g)[0] for g in mine) * C
    remaining = sum(layout.rows_of(g)[1] - layout.rows_of(g)[0] for g in todo) * C
    if remaining < total:
        info(f"harvest: resuming, {total - remaining:,} of {total:,} tokens already stored")

    writer = _Writer(art, group, cfg, writer_id, my_done)
    dev_type = torch.device(device).type

    def autocast():
        if cfg.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(dev_type, dtype=getattr(torch, cfg.autocast))

    t0 = time.perf_counter()
    with progress("harvest", total, "tokens", done=total - remaining) as bar:
        try:
            for g in todo:
                lo, hi = layout.rows_of(g)
                outs: dict[str, list] = {h.name: [] for h in hooks}
                for s, e in layout.batches_of(g):
                    ids = torch.from_numpy(tokens[s:e]).long().to(device)
                    with autocast():
                        acts = run_with_hooks(model, hooks, ids)
                    for h in hooks:
                        x = acts[h.name].reshape(-1, acts[h.name].shape[-1])
                        outs[h.name].append(_checked(x, h.name, cfg.dtype))
                    bar.advance((e - s) * C)
                writer.put(g, lo, hi, tokens[lo:hi], {k: torch.cat(v) for k, v in outs.items()},
                           set(layout.chunks_of(g)))
        finally:
            writer.close()
    dt = time.perf_counter() - t0
    if remaining:
        info(f"harvest: {remaining:,} tokens in {dt:.1f}s ({remaining / dt:,.0f} tokens/s)")


def _checked(x, hook: str, storage: str):
    """The storage-dtype tensor, refusing values it cannot hold (fp16 overflows to inf)."""
    import torch

    y = x.to(torch.bfloat16 if storage == "bfloat16" else getattr(torch, storage))
    if not bool(torch.isfinite(y).all()):
        if bool(torch.isfinite(x).all()):
            big = float(x.abs().max())
            raise SaectlError(f"activations at {hook} reach {big:.3g}, beyond {storage}; "
                              "re-run with --dtype bfloat16 or --dtype float32")
        raise SaectlError(f"the model produced NaN or inf at {hook}; check the model weights "
                          "and --device")
    return y.cpu()


class _Writer:
    """Writes finished groups on a background thread (bounded queue, so memory stays flat);
    after a group's arrays are written, records its chunks as done. Errors reach the caller."""

    def __init__(self, art, group, cfg: HarvestConfig, writer_id: str, done: set[int]):
        self.art, self.group, self.cfg, self.writer_id, self.done = art, group, cfg, writer_id, done
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="saectl-writer", daemon=True)
        self.thread.start()

    def put(self, *item) -> None:
        while True:
            if self.error:
                raise self.error
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _loop(self) -> None:
        C = self.cfg.context_size
        while (item := self.q.get()) is not None:
            if self.error:
                continue
            g, lo, hi, toks, acts, chunks = item
            try:
                self.group["tokens"][lo:hi] = toks
                for hook, x in acts.items():
                    faults.point("harvest.mid_group")
                    self.group[f"acts/{hook}"][lo * C:hi * C] = arrays.to_storage(x, self.cfg.dtype)
                self.done |= chunks
                store.record_progress(self.art, self.writer_id, self.done)
                faults.point("harvest.group_written")
            except BaseException as e:  # surfaced to the main thread on its next put/close
                self.error = e

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error:
            err = self.error
            if isinstance(err, OSError):
                raise ArtifactError(f"writing {self.art.ref} failed ({err.strerror or err}); "
                                    "free space or fix permissions, then re-run to resume") from err
            raise err


def _summary(art, group, cfg: HarvestConfig, dims: dict[str, int]) -> dict:
    """Figures computed from what is on disk."""
    n_tokens = cfg.n_seq * cfg.context_size
    hooks = {}
    total_values = total_bytes = 0
    for hook, d in dims.items():
        path = art.path / "acts" / hook
        nbytes = sum(p.stat().st_size for p in path.rglob("c/**/*") if p.is_file())
        values = n_tokens * d
        hooks[hook] = {"d": d, "bytes": nbytes, "bytes_per_value": nbytes / values}
        total_values += values
        total_bytes += nbytes
    return {"n_seq": cfg.n_seq, "context_size": cfg.context_size, "n_tokens": n_tokens, "bos": True,
            "dtype": cfg.dtype, "hooks": hooks, "bytes_per_value": total_bytes / total_values}


# TRANSITIONAL (issue 14): the old run wrapped until this module defines plan and build.
from saectl import stage as _contract  # noqa: E402

STAGE = _contract.legacy('harvest', HarvestConfig, run, 'Run a model over text and store activations at hook points.',
                         (), address=address, output=None,
                         figures=FIGURES)
