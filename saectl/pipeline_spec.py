"""`saectl run PIPELINE.yaml`: the stages a pipeline names, in order, each a cache hit when
nothing changed, with a named ref per step (`refs/<pipeline>/<step>`).

A pipeline file names its steps in the order they run:

    name: demo              # optional (default: the file's stem); refs go to refs/demo/<step>
    description: ...        # optional, free text
    steps:
      harvest:              # a step; its stage is its name unless `stage:` names one
        params: {hooks: resid_post.3, tokens: 65536}    # the stage's config fields (its flags)
      shuffle:
        input: harvest      # the harvest step's output goes into shuffle's positional field
      sweep:
        input: shuffle
        params:
          grid: {k: [16, 32], expansion: 8}  # a mapping for a file field becomes a YAML file
          tolerance: 0.2

`input: {field: step, ...}` wires several fields. A relative path written with a '/' or a file
extension (`./model`, `corpus.jsonl`) that exists next to the pipeline file is taken from
there; a list for a text field is joined with commas.

This module reads and validates the file (`load`, `select`, `config`); saectl/pipeline.py
runs it and saectl/pipeline_view.py shows it. The runner is generic over the stage table (`saectl.cli.STAGES`: name, config dataclass, run,
help, positional fields), so a new stage row works in a pipeline with no change here. A stage
module may also offer:
- `address(cfg) -> Artifact`: the artifact `run(cfg)` makes or finds, computed without writing.
  With it, `--dry-run` tells what is cached, and a run knows a cache hit before running the
  stage; without it, the dry run says "unknown" and a hit is told by what was complete before.
- `output(art) -> str | None`: what a complete artifact's run prints, when that is not the
  artifact itself (a sweep prints the SAE it chose).
- `FIGURES`: the summary keys the run's table shows (default: the first numbers it has).

Each step runs the stage in this process, exactly as `saectl STAGE` would, so caching, locks
and resume are the stages' own: a pipeline run again does no work, and one that died resumes
the step it was in. `--only/--from/--until` take the outputs of steps left out from the refs
an earlier run recorded.
"""

from __future__ import annotations

import re
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from saectl import store
from saectl.config import _base_type, build, fields
from saectl.errors import ConfigError, NotFoundError
from saectl.stage import Stage

TOP_KEYS = ("name", "description", "steps")
STEP_KEYS = ("stage", "input", "params")
RUN_WIDE = ("store",)  # set for the whole run (--store), never per step
_STEP_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Written like a file path: with a '/' or a file extension (`./model`, `corpus.jsonl`), so that
# words such as `slurm` or `train` never turn into folders that happen to sit beside the file.
_PATH_RE = re.compile(r"/|\.[A-Za-z][A-Za-z0-9]*$")


def stage_params(stage: Stage) -> list[str]:
    """The fields a step may set in `params:` (all but the run-wide ones)."""
    return [f.name for f in fields(stage.config) if f.name not in RUN_WIDE]


def stage_table(stages) -> dict[str, Stage]:
    """Stage values (cli.STAGES) → {name: Stage}."""
    return stages if isinstance(stages, dict) else {st.name: st for st in stages}


@dataclass(frozen=True)
class Step:
    name: str
    stage: Stage
    inputs: dict[str, str]
    """Config field → the step whose output fills it."""
    params: dict


@dataclass
class Pipeline:
    name: str
    path: Path
    steps: list[Step]
    stages: dict[str, Stage]
    changed: set[str] = field(default_factory=set)
    """Steps a --set changed."""
    files: Any = None
    """The temporary folder holding inline mappings written as YAML files."""

    def names(self) -> list[str]:
        return [s.name for s in self.steps]

    def ref_name(self, step: str) -> str:
        return f"{self.name}/{step}"


# ---------------------------------------------------------------------------------------------
# Reading and validating


class _DuplicateKey(Exception):
    pass


class _Loader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice (plain YAML keeps the last one silently)."""


def _mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor`; keys written beside it override the merged ones
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, typing.Hashable):
            continue  # construct_mapping reports it
        if key in seen:
            raise _DuplicateKey(f"line {key_node.start_mark.line + 1}: '{key}' appears twice")
        seen.add(key)
    return loader.construct_mapping(node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _read(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise NotFoundError(f"pipeline {path} does not exist; give a YAML file such as "
                            "pipelines/pythia-70m.yaml") from None
    except OSError as e:
        raise ConfigError(f"cannot read pipeline {path}: {e.strerror or e}") from None
    try:
        doc = yaml.load(text, Loader=_Loader)
    except _DuplicateKey as e:
        raise ConfigError(f"{path} {e}; give each step and key once") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}; fix the file") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} must be a mapping with `steps:` (see pipelines/ for examples)")
    return doc


def _one_of(keys, valid, what: str) -> None:
    bad = sorted(str(k) for k in keys if k not in valid)
    if bad:
        raise ConfigError(f"{what}: unknown key(s) {', '.join(bad)}; valid keys are "
                          f"{', '.join(valid)}")


def _check_params(where: str, stage: Stage, params: dict) -> None:
    for k in params:
        if k in RUN_WIDE:
            raise ConfigError(f"{where}: `{k}` is set for the whole run; pass --store or set "
                              f"{store.STORE_ENV} instead")
    bad = sorted(str(k) for k in params if k not in stage_params(stage))
    if bad:
        raise ConfigError(f"{where}: {stage.name} has no param(s) {', '.join(bad)}; valid params "
                          f"are {', '.join(stage_params(stage))}")


def _scalar(text: str):
    """A --set value read as YAML: 16 → int, true → bool, [8, 16] → list, else the text."""
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text


def _apply_sets(where: Path, raw: dict, sets) -> set[str]:
    """Apply `STEP.PARAM=VALUE` (or STEP.PARAM.KEY=VALUE into a mapping param) in place."""
    changed = set()
    for s in sets:
        lhs, eq, value = s.partition("=")
        keys = lhs.strip().split(".")
        if not eq or len(keys) < 2 or not all(keys):
            raise ConfigError(f"--set {s!r} must look like STEP.PARAM=VALUE, e.g. "
                              "--set train.k=16")
        step, param = keys[0], keys[1]
        if step not in raw:
            raise ConfigError(f"--set {s}: {where} has no step {step!r}; its steps are "
                              f"{', '.join(raw)}")
        stage, _, params = raw[step]
        _check_params(f"--set {s}", stage, {param: None})
        target, path = params, keys[1:]
        for k in path[:-1]:
            if not isinstance(target.get(k, {}), dict):
                raise ConfigError(f"--set {s}: {'.'.join(path[:path.index(k) + 1])} is not a "
                                  "mapping; set it whole (--set STEP.PARAM=VALUE)")
            target = target.setdefault(k, {})
        target[path[-1]] = _scalar(value)
        changed.add(step)
    return changed


def _inputs(where: str, stage: Stage, spec) -> dict[str, str]:
    if spec is None:
        return {}
    if isinstance(spec, str):
        if not stage.positional:
            raise ConfigError(f"{where}: {stage.name} takes no input; remove `input:`")
        if len(stage.positional) > 1:
            raise ConfigError(f"{where}: {stage.name} takes several inputs; write `input: "
                              f"{{{', '.join(f'{p}: STEP' for p in stage.positional)}}}`")
        return {stage.positional[0]: spec}
    if isinstance(spec, dict) and all(isinstance(v, str) for v in spec.values()):
        _check_params(where + " input", stage, spec)
        return dict(spec)
    raise ConfigError(f"{where}: `input` must name a step (input: harvest) or map fields to "
                      "steps (input: {sae: sweep})")


def _check_graph(path: Path, steps: dict[str, tuple]) -> None:
    """Every input names an earlier step; a forward reference that loops back is a cycle."""
    order = list(steps)

    def cycle(start: str, goal: str, seen: tuple) -> tuple | None:
        for up in steps[start][1].values():
            if up == goal:
                return seen + (up,)
            if up in steps and up not in seen:
                found = cycle(up, goal, seen + (up,))
                if found:
                    return found
        return None

    for name, (_, inputs, _) in steps.items():
        for fld, up in inputs.items():
            if up not in steps:
                raise ConfigError(f"{path} step {name}: input {up!r} is not a step; the steps "
                                  f"are {', '.join(order)}")
            if up == name:
                raise ConfigError(f"{path} step {name} takes its own output as input (a cycle); "
                                  "name an earlier step")
            if order.index(up) > order.index(name):
                loop = cycle(up, name, (name, up))
                if loop:
                    raise ConfigError(f"{path}: steps {' → '.join(loop)} form a cycle; a step can "
                                      "only take the output of an earlier one")
                raise ConfigError(f"{path} step {name}: input {up} comes later in the file; steps "
                                  f"run in file order, so move {up} above {name}")


def _prepare(value, ftype, base: Path, files: Path, label: str):
    """Paths next to the pipeline file, lists for text fields, mappings for file fields."""
    if ftype is str and isinstance(value, dict):
        out = files / f"{label}.yaml"
        out.write_text(yaml.safe_dump(value, sort_keys=False))
        return str(out)
    if ftype is str and isinstance(value, list):
        return ",".join(str(v) for v in value)
    if ftype in (int, float) and isinstance(value, str):  # YAML reads 1e-3 as text
        try:
            num = float(value.replace("_", ""))
            return int(num) if ftype is int and num.is_integer() else num
        except ValueError:
            return value
    if isinstance(value, str) and _PATH_RE.search(value) and not Path(value).is_absolute():
        candidate = base / value
        if candidate.exists():
            return str(candidate.resolve())
    return value


def load(path: str | Path, stage_rows, sets=()) -> Pipeline:
    """Read and validate a pipeline file, with `--set` overrides applied: every step's config is
    built (with its inputs standing in as named refs), so bad params fail before anything runs."""
    path = Path(path)
    stages = stage_table(stage_rows)
    doc = _read(path)
    _one_of(doc, TOP_KEYS, str(path))
    name = doc.get("name", path.stem)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"{path}: name {name!r} must be letters, digits, '.', '_' or '-' "
                          "(it names the folder refs/<name>/)")
    steps_doc = doc.get("steps")
    if steps_doc is not None and not isinstance(steps_doc, dict):
        raise ConfigError(f"{path}: `steps` must be a mapping of step name: {{stage, input, "
                          "params}, not a list")
    if not steps_doc:
        raise ConfigError(f"{path} has no steps; add `steps:` mapping step names to "
                          "{stage, input, params}")
    raw: dict[str, tuple] = {}
    for sname, sdoc in steps_doc.items():
        where = f"{path} step {sname}"
        if not isinstance(sname, str) or not _STEP_RE.match(sname):
            raise ConfigError(f"{path}: step name {sname!r} must be lowercase letters, digits, "
                              "'_' or '-', starting with a letter")
        sdoc = {} if sdoc is None else sdoc
        if not isinstance(sdoc, dict):
            raise ConfigError(f"{where} must be a mapping of {', '.join(STEP_KEYS)}")
        _one_of(sdoc, STEP_KEYS, where)
        kind = sdoc.get("stage", sname)
        if kind not in stages:
            raise ConfigError(f"{where}: unknown stage {kind!r}; stages are "
                              f"{', '.join(stages)} (name one with `stage:`)")
        params = sdoc.get("params") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{where}: `params` must be a mapping of the stage's fields")
        raw[sname] = (stages[kind], sdoc.get("input"), dict(params))
    changed = _apply_sets(path, raw, sets)
    wired = {}
    for sname, (stage, spec, params) in raw.items():
        where = f"{path} step {sname}"
        _check_params(where, stage, params)
        inputs = _inputs(where, stage, spec)
        for fld in inputs:
            if fld in params:
                raise ConfigError(f"{where}: {fld} comes from `input:`; remove it from params")
        for fld in stage.positional:
            if fld not in inputs and params.get(fld) is None:
                raise ConfigError(f"{where}: {stage.name} needs its {fld}; add `input: STEP` "
                                  f"naming the step whose output it takes (or params.{fld})")
        wired[sname] = (stage, inputs, params)
    _check_graph(path, wired)
    files = tempfile.TemporaryDirectory(prefix="saectl-run-")
    steps = []
    for sname, (stage, inputs, params) in wired.items():
        hints = typing.get_type_hints(stage.config)
        ready = {k: _prepare(v, _base_type(hints[k]), path.parent.absolute(), Path(files.name),
                             f"{sname}.{k}") for k, v in params.items()}
        steps.append(Step(sname, stage, inputs, ready))
    p = Pipeline(name, path, steps, stages, changed, files)
    for step in steps:  # validate every config now; inputs stand in as their named refs
        try:
            config(p, step, {f: f"{store.REFS}/{p.ref_name(up)}" for f, up in step.inputs.items()})
        except ConfigError as e:  # the stage's own checks name flags, not the step
            if str(e).startswith(f"{path} step "):
                raise
            raise ConfigError(f"{path} step {step.name}: {e}") from None
    return p


def config(p: Pipeline, step: Step, refs: dict[str, str], root: Path | None = None):
    """The stage's config for `step`, its input fields filled with `refs`."""
    values = {**step.params, **refs}
    if root is not None and "store" in {f.name for f in fields(step.stage.config)}:
        values["store"] = str(root)
    return build(step.stage.config, values, f"{p.path} step {step.name}")


def select(p: Pipeline, only=(), start: str | None = None, until: str | None = None) -> list[Step]:
    """The steps --only / --from / --until leave in, in file order."""
    names = p.names()
    for flag, n in [("--only", n) for n in only] + [("--from", start), ("--until", until)]:
        if n is not None and n not in names:
            raise ConfigError(f"{flag} {n}: {p.path} has no such step; its steps are "
                              f"{', '.join(names)}")
    if only and (start or until):
        raise ConfigError("--only cannot be combined with --from or --until; use one or the other")
    if only:
        chosen = [s for s in p.steps if s.name in only]
    else:
        lo = names.index(start) if start else 0
        hi = names.index(until) if until else len(names) - 1
        if lo > hi:
            raise ConfigError(f"--from {start} comes after --until {until} in {p.path}; swap them")
        chosen = p.steps[lo:hi + 1]
    left_out = sorted(p.changed - {s.name for s in chosen})
    if left_out:
        raise ConfigError(f"--set changes step {', '.join(left_out)}, which this run leaves out; "
                          "include it (--from/--only) or drop the --set")
    return chosen
