"""`saectl run`: the steps of a pipeline file (saectl/pipeline_spec.py), in order, each
through the stage contract (saectl/stage.py), so caching, locks and resume are the same as for
`saectl STAGE`: a pipeline run again does no work, and one that died resumes the step it was
in. Each step's output is recorded as a named ref (`refs/<pipeline>/<step>`); `--only/--from/
--until` take the outputs of steps left out from the refs an earlier run recorded.

`plan` answers `--dry-run` from addresses alone; `execute` runs. What they return is shown by
saectl/pipeline_view.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from saectl import stage as contract
from saectl import store
from saectl.console import info
from saectl.errors import ConfigError, HubUnreachableError, SaectlError
from saectl.pipeline_spec import Pipeline, Step, config
from saectl.pipeline_view import duration
from saectl.stage import Stage


def _recorded(p: Pipeline, root: Path, up: str, needed_by: str) -> str:
    """The output an earlier run recorded for step `up` (must be complete)."""
    name = p.ref_name(up)
    target = store.list_refs(root).get(name)
    if target is None:
        raise ConfigError(f"step {needed_by} takes the output of {up}, which this run leaves out, "
                          f"and {root} has no ref {store.REFS}/{name}; run it first "
                          f"(saectl run {p.path} --until {up})")
    return store.open_complete(root, target).ref


def _step_error(step: Step, e: SaectlError) -> SaectlError:
    """The same error, naming the step it happened in."""
    return type(e)(f"step {step.name}: {e}")


# ---------------------------------------------------------------------------------------------
# The plan (--dry-run)


@dataclass
class Planned:
    step: str
    stage: str
    status: str
    """cached, run, resume (incomplete artifact), after <step> (known once it has run)."""
    artifact: str | None
    output: str | None


def plan(p: Pipeline, root: Path, chosen: list[Step]) -> list[Planned]:
    """What a run would do, computed from addresses without writing anything."""
    outputs: dict[str, str | None] = {}
    selected = {s.name for s in chosen}
    rows = []
    for step in chosen:
        refs, waiting = {}, None
        for fld, up in step.inputs.items():
            if up in selected:
                if outputs.get(up) is None:
                    waiting = up
                    break
                refs[fld] = outputs[up]
            else:
                refs[fld] = _recorded(p, root, up, step.name)
        outputs[step.name] = None
        if waiting:
            rows.append(Planned(step.name, step.stage.name, f"after {waiting}", None, None))
            continue
        cfg = config(p, step, refs, root)
        try:
            art = step.stage.address(cfg)
        except HubUnreachableError:  # its commit pins the address; a run would ask the hub
            rows.append(Planned(step.name, step.stage.name, "run", None, None))
            continue
        except SaectlError as e:
            raise _step_error(step, e) from e
        if art.is_complete():
            outputs[step.name] = step.stage.printed(cfg, art)
            status = "cached"
        else:
            status = "resume" if art.exists() else "run"
        rows.append(Planned(step.name, step.stage.name, status, art.ref, outputs[step.name]))
    return rows


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class Ran:
    step: str
    stage: str
    status: str
    """cached, ran, partial (e.g. one shard of a harvest; the rest are other processes'), or
    submitted (a sweep submitted with --no-wait)."""
    output: str | None
    """What the stage printed (and later steps take): its ref, recorded as refs/<p>/<step>."""
    artifact: str | None
    """The stage's own artifact where that differs (a sweep; recorded as <step>.<stage>)."""
    seconds: float
    figures: dict = field(default_factory=dict)
    reports: list[str] = field(default_factory=list)


def _figures(stages: dict[str, Stage], art: store.Artifact) -> dict:
    summary = art.manifest().get("summary", {})
    keys = stages[art.stage].figures if art.stage in stages else None
    if not keys:
        keys = [k for k in sorted(summary) if isinstance(summary[k], (int, float))
                and not isinstance(summary[k], bool)][:4]
    return {k: summary[k] for k in keys if isinstance(summary.get(k), (int, float, str))}


def _reports(art: store.Artifact) -> list[str]:
    d = art.report_dir
    if not d.is_dir():
        return []
    index = d / "index.html"
    return [str(index if index.is_file() else d)]


def _run_step(p: Pipeline, step: Step, cfg, root: Path) -> Ran:
    stage = step.stage
    own = stage.address(cfg)
    before = own.is_complete()
    t0 = time.perf_counter()
    out, did = contract.run_built(stage, cfg)
    before = before or did == "cached"  # finished by another process while this one waited
    seconds = time.perf_counter() - t0
    if stage.report is not None:
        stage.report(cfg, out)
    ref = stage.printed(cfg, out)
    if ref is None:
        return Ran(step.name, stage.name, "submitted", None, own.ref, seconds)
    out_art = store.resolve(root, ref)
    if did == "partial" or not out_art.is_complete():
        return Ran(step.name, stage.name, "partial", out_art.ref, None, seconds)
    arts = [own] if out_art == own else [own, out_art]
    figures = {}
    for a in arts:
        figures.update(_figures(p.stages, a))
    reports = [r for a in arts for r in _reports(a)]
    return Ran(step.name, stage.name, "cached" if before else "ran", out_art.ref,
               own.ref if own != out_art else None, seconds, figures, reports)


def execute(p: Pipeline, root: Path, chosen: list[Step]) -> list[Ran]:
    """Run the chosen steps in order, recording each step's refs as soon as it completes. Stops
    after a step that did not complete here (a shard of a harvest, a sweep submitted with
    --no-wait): the steps after it need its output."""
    outputs: dict[str, str] = {}
    done: list[Ran] = []
    for i, step in enumerate(chosen):
        try:
            refs = {fld: outputs[up] if up in outputs else _recorded(p, root, up, step.name)
                    for fld, up in step.inputs.items()}
            cfg = config(p, step, refs, root)
            info(f"run {p.name}: step {i + 1}/{len(chosen)} {step.name} ({step.stage.name})")
            r = _run_step(p, step, cfg, root)
        except SaectlError as e:
            raise _step_error(step, e) from e
        done.append(r)
        info(f"run {p.name}: {step.name} {r.status} {r.output or ''} ({duration(r.seconds)})")
        if r.status in ("partial", "submitted"):
            rest = [s.name for s in chosen[i + 1:]]
            what = ("its artifact completes when every shard has run (the last shard to finish "
                    "completes it and goes on)" if r.status == "partial"
                    else "its work was submitted")
            info(f"run {p.name}: {step.name}: {what}; run the pipeline again afterwards"
                 + (f" for {', '.join(rest)}" if rest else ""))
            break
        outputs[step.name] = r.output
        store.write_ref(root, p.ref_name(step.name), store.resolve(root, r.output))
        if r.artifact:
            art = store.resolve(root, r.artifact)
            store.write_ref(root, f"{p.ref_name(step.name)}.{art.stage}", art)
    return done
