"""`saectl`: the root command. It only registers the stages (one row each in `STAGES`) and the
store commands, and turns known errors into one line on stderr with exit status 1 (a
traceback only with `--debug`), as the `hf` CLI's `main()` does."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.pretty import pprint
from typer.exceptions import TyperException

from saectl import distributed
from saectl import pipeline as runner
from saectl import pipeline_spec, store
from saectl import pipeline_view as view
from saectl import stage as contract
from saectl.config import stage_command
from saectl.console import console, info, short_ref
from saectl.errors import ConfigError, SaectlError
from saectl.lineage import SAE_STAGES
from saectl.export import export as export_sae
from stages import eval as eval_stage
from stages import harvest, import_acts, import_sae, interpret, shuffle, steer, sweep, train

app = typer.Typer(name="saectl", no_args_is_help=True, add_completion=False,
                  help="Sparse autoencoders for language models: harvest → shuffle → train → "
                       "sweep → interpret → steer, each a content-addressed Zarr artifact.")

# The registration table: each stage module's `STAGE` (saectl/stage.py), one line each.
STAGES: dict[str, contract.Stage] = {}


def invoke(st: contract.Stage, cfg) -> str | None:
    """What `saectl STAGE` does with a config: the lifecycle, the stage's report, its ref."""
    out = contract.run(st, cfg)
    if distributed.rank() > 0:  # a torchrun follower: rank 0 reports and prints the ref
        return None
    if st.as_json is not None and getattr(cfg, "as_json", False):  # instead of report and ref
        return st.as_json(out)
    if st.report is not None:
        st.report(cfg, out)
    return st.printed(cfg, out)


def add_stage(st: contract.Stage) -> None:
    """Register a stage as `saectl NAME` (flags from its config dataclass) and for `saectl run`."""
    if STAGES.get(st.name) is st:
        return
    if st.name in STAGES:
        raise ValueError(f"a stage named {st.name!r} is already registered")
    STAGES[st.name] = st
    stage_command(app, st.config, st.name, st.help, st.positional)(
        lambda cfg, st=st: invoke(st, cfg))


for _st in (harvest.STAGE, shuffle.STAGE, train.STAGE, sweep.STAGE, interpret.STAGE,
            steer.STAGE, import_acts.STAGE, eval_stage.STAGE, import_sae.STAGE):
    add_stage(_st)

StoreOpt = Annotated[str | None, typer.Option("--store", help="Artifact store "
                                                 "(default $SAECTL_STORE or ./artifacts)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout")]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _state(a: store.Artifact) -> str:
    if a.is_complete():
        return "complete"
    return "writing" if store.is_locked(a) else "incomplete"


@app.command("ls")
def ls(stage: Annotated[str | None, typer.Argument(help="Only this stage")] = None,
       store_: StoreOpt = None, as_json: JsonOpt = False):
    """List artifacts: ref, state, size, created."""
    root = store.store_root(store_)
    rows = []
    for a in store.list_artifacts(root, stage):
        try:
            created = a.manifest().get("created", "")
        except SaectlError:
            created = "damaged"
        rows.append({"ref": a.ref, "state": _state(a), "bytes": store.size_bytes(a),
                     "created": created})
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    for r in rows:
        print(f"{short_ref(r['ref']):<24} {r['state']:<10} "
              f"{_human(r['bytes']):>10}  {r['created']}")


@app.command("show")
def show(ref: Annotated[str, typer.Argument(help="stage/digest, a digest prefix or a named ref")],
         store_: StoreOpt = None, as_json: JsonOpt = False):
    """Show an artifact's manifest: stage, params, inputs, summary figures."""
    a = store.resolve(store.store_root(store_), ref)
    manifest = dict(a.manifest(), ref=a.ref, state=_state(a), path=str(a.path))
    if as_json:
        print(json.dumps(manifest, indent=1, sort_keys=True))
        return
    for key in ("ref", "state", "path", "created", "saectl_version", "host", "inputs"):
        print(f"{key:<15} {manifest.get(key)}")
    print("params")
    pprint(manifest.get("params"), expand_all=False, max_length=12)
    print("summary (long lists cut; --json has everything)")
    pprint(manifest.get("summary"), expand_all=False, max_length=12)


@app.command("log")
def log_(ref: Annotated[str, typer.Argument(help="A complete train artifact")],
         to: Annotated[str, typer.Option("--to", help="wandb or tensorboard")] = "tensorboard",
         store_: StoreOpt = None):
    """Replay a trained SAE's stored training log and figures into W&B or TensorBoard."""
    from saectl import tracking

    a = store.resolve(store.store_root(store_), ref)
    info(f"log: wrote {a.ref} into {tracking.replay(a, to)}")


@app.command("gc")
def gc(store_: StoreOpt = None,
       dry_run: Annotated[bool, typer.Option("--dry-run", help="List, remove nothing")] = False,
       everything: Annotated[bool, typer.Option("--all", help="Also remove inputs of complete "
                                                "artifacts that no ref names")] = False):
    """Remove artifacts no named ref keeps (never one being written)."""
    root = store.store_root(store_)
    remove, busy = store.gc_plan(root, everything)
    if not dry_run:
        store.sweep_leftovers(root)  # what an interrupted gc left half-deleted
    for a in remove:
        if dry_run or store.remove(a):
            print(f"{'would remove' if dry_run else 'removed'} {a.ref}")
        else:  # a writer (a harvest shard) started after the plan: its lock is checked again
            busy.append(a)
    for a in busy:
        print(f"keep {a.ref} (being written)", file=sys.stderr)


@app.command("run")
def run_pipeline(
        pipeline: Annotated[Path, typer.Argument(help="A pipeline YAML file (see pipelines/)")],
        store_: StoreOpt = None,
        only: Annotated[list[str] | None, typer.Option(
            "--only", help="Run only this step (repeatable); the steps it takes outputs from "
                           "must have run before (their refs are used)")] = None,
        start: Annotated[str | None, typer.Option("--from", help="Start at this step")] = None,
        until: Annotated[str | None, typer.Option("--until", help="Stop after this step")] = None,
        sets: Annotated[list[str] | None, typer.Option(
            "--set", help="Override a param: STEP.PARAM=VALUE (repeatable)")] = None,
        dry_run: Annotated[bool, typer.Option(
            "--dry-run", help="Print the plan and what is cached; run nothing")] = False,
        as_json: JsonOpt = False):
    """Run a pipeline's steps in order, each a cache hit when nothing changed, recording a ref
    per step (refs/<pipeline>/<step>); prints the last step's ref."""
    p = pipeline_spec.load(pipeline, STAGES, sets or ())
    steps = pipeline_spec.select(p, only or (), start, until)
    root = store.store_root(store_)
    if dry_run:
        rows = runner.plan(p, root, steps)
        print(json.dumps(view.as_dicts(rows), indent=1) if as_json
              else "\n".join(view.plan_lines(p, rows)))
        return
    results = runner.execute(p, root, steps)
    console.print(view.summary_table(p, results))
    for line in view.report_lines(p, results):
        info(line)
    if as_json:
        print(json.dumps(view.as_dicts(results), indent=1))
    elif results and results[-1].status in ("cached", "ran"):
        print(results[-1].output)


@app.command("export")
def export(ref: Annotated[str, typer.Argument(help="A train or import-sae artifact")],
           out: Annotated[Path, typer.Option("--out", help="Folder to write")],
           fmt: Annotated[str, typer.Option(
               "--format", help="saelens, sparsify or circuit-tracer")] = "saelens",
           store_: StoreOpt = None,
           force: Annotated[bool, typer.Option("--force", help="Replace an earlier export "
                                               "in --out")] = False):
    """Write an SAE in another tool's layout, whole or not at all: SAELens (cfg.json,
    sae_weights.safetensors, sparsity.safetensors; sae_lens.SAE.load_from_disk) or, for TopK
    SAEs, sparsify (cfg.json, sae.safetensors; sparsify.SparseCoder.load_from_disk)."""
    art = store.open_complete(store.store_root(store_), ref)
    if art.stage not in SAE_STAGES:
        raise ConfigError(f"{art.ref} is a {art.stage} artifact; export takes an SAE (a train "
                          "or import-sae ref)")
    export_sae(art, out, fmt, force)
    print(out)


@app.command("serve")
def serve(store_: StoreOpt = None,
          port: Annotated[int, typer.Option("--port", help="Port to listen on")] = 8765,
          host: Annotated[str, typer.Option("--host", help="Address to listen on")] = "127.0.0.1",
          allow_remote: Annotated[bool, typer.Option(
              "--allow-remote", help="Listen on an address other machines reach (no login: "
                                     "anyone who reaches it reads the store)")] = False,
          device: Annotated[str, typer.Option("--device", help="Device for activation testing "
                                              "and steering")] = "cpu"):
    """A local Neuronpedia over the store: artifacts and lineage, dashboards, activation
    testing, live steering, sweep tables (http://127.0.0.1:8765/)."""
    from saectl.serve import serve as run_server  # starlette, uvicorn: only this command

    run_server(store.store_root(store_), host, port, allow_remote, device)


# A full disk, a file-size limit, a quota, a read-only or forbidden store: the user's to fix,
# and the artifact stays incomplete and resumable.
_DISK_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("SAECTL_DEBUG"))
    argv = [a for a in argv if a != "--debug"]
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="saectl", standalone_mode=False)
    except SaectlError as e:
        if debug:
            raise
        print(f"saectl: error: {e}", file=sys.stderr)
        sys.exit(1)
    except TyperException as e:  # usage errors: unknown flag, bad value, missing argument
        if debug:
            raise
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        print(f"saectl: error: {e.format_message()}{hint}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        if debug or e.errno not in _DISK_ERRNOS:
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(f"saectl: error: {e.strerror or e}{where}; free space (or fix permissions) and run "
              "the same command again to resume", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("saectl: interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
