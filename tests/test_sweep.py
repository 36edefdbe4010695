"""Sweep: the grid, the executors, cache and resume, the MDL choice, the report, bad input."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from saectl import store
from tests.helpers import assert_one_line_error, run_cli, run_subprocess, tried
from tests.test_train import synthetic

GRID = """
arch: topk
k: [3, 6]
width: [48, 96]
tokens: 40000
batch_size: 500
lr: 0.004
"""


def make_split(root, capsys):
    x, _ = synthetic(n=12000)
    np.save(root / "x.npy", x)
    imp = run_cli(capsys, "import", root / "x.npy", "--hook", "h", "--store", root)
    sh = run_cli(capsys, "shuffle", imp.out.strip(), "--store", root)
    assert sh.code == 0, sh.err
    return sh.out.strip()


@pytest.fixture
def split(tmp_path, capsys):
    root = tmp_path / "store"
    root.mkdir()
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID)
    return root, make_split(root, capsys), grid


def test_local_sweep_equals_training_each_point_alone(split, tmp_path, capsys):
    import torch

    root, sh, grid = split
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two threads, whatever the machine: the SAEs' steps side by side,
    try:                      # each on one thread, while the runs alone below step on two
        res = run_cli(capsys, "sweep", sh, "--grid", grid, "--store", root, "--tolerance",
                      "0.6", "--device", "cpu")
        assert res.code == 0, res.err
        assert torch.get_num_threads() == 2  # the sweep gave its threads back
    finally:
        torch.set_num_threads(threads)
    chosen = res.out.strip()
    assert chosen.startswith("train/") and len(res.out.splitlines()) == 1
    sweep = store.list_artifacts(root, "sweep")[0]
    s = sweep.manifest()["summary"]
    assert len(s["table"]) == 4 and s["chosen_ref"] == chosen
    # The choice respects ε and is the least DL among the SAEs that meet it.
    feasible = [r for r in s["table"] if r["quantised_fvu"] is not None
                and r["quantised_fvu"] <= 0.6]
    assert feasible and min(feasible, key=lambda r: r["dl"])["ref"] == chosen
    for r in s["table"]:
        if r["dl"] is not None:
            assert np.isfinite(r["dl"]) and r["dl"] >= 0
    for name in ("table.csv", "l0_fvu.png", "dl_width.png"):
        assert (sweep.report_dir / name).stat().st_size > 0
    with open(sweep.report_dir / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["ref"] for r in rows} == {r["ref"] for r in s["table"]}
    # Two points trained alone, in another store, give the same digests and weights.
    other = tmp_path / "alone"
    other.mkdir()
    assert make_split(other, capsys) == sh
    torch.set_num_threads(2)
    try:
        runs = [run_cli(capsys, "train", sh, "--store", other, "--arch", "topk", "--k", r["k"],
                        "--width", r["width"], "--tokens", "40000", "--batch-size", "500",
                        "--lr", "0.004", "--device", "cpu") for r in s["table"][:2]]
    finally:
        torch.set_num_threads(threads)
    for r, alone in zip(s["table"][:2], runs):
        assert alone.out.strip() == r["ref"]
        a = store.sae_dir(store.resolve(other, r["ref"])) / "sae_weights.safetensors"
        b = store.sae_dir(store.resolve(root, r["ref"])) / "sae_weights.safetensors"
        assert a.read_bytes() == b.read_bytes()
    again = run_cli(capsys, "sweep", sh, "--grid", grid, "--store", root, "--tolerance", "0.6")
    assert again.out == res.out and "cache hit" in again.err


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "jumprelu", "relu", "gated",
                                  "transcoder"])
def test_side_by_side_steps_give_the_bits_of_steps_in_turn(arch):
    """The local sweep steps its SAEs on one thread each, side by side (fitting._steps): every
    weight and Adam moment equals stepping them in turn on one thread, bit for bit (the steps
    share nothing); and, at a size where torch's kernels split work over threads, stepping them
    in turn on two threads up to the last bits (equal on some CPUs; on an AVX-512 Xeon the dense
    products' backward sums in another order on two threads, ~4e-8 of a weight)."""
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    import torch

    from saectl import threads
    from saectl.fitting import _steps
    from saectl.sae.config import SAEConfig
    from saectl.trainer import TrainConfig, Trainer

    d, n = 64, 2048
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8192, d, generator=gen), torch.randn(8192, d, generator=gen)
    tc = arch == "transcoder"
    batches = [(x[i:i + n], y[i:i + n]) if tc else x[i:i + n] for i in range(0, 3 * n, n)]

    def points():
        out = []
        for width in (d * 32, d * 16, d * 8):
            torch.manual_seed(0)
            cfg = SAEConfig(arch="topk" if tc else arch, d_in=d, d_sae=width, k=16,
                            transcoder=tc)
            out.append(SimpleNamespace(sae_cfg=cfg, trainer=Trainer(
                cfg, TrainConfig(total_steps=3), x, target_sample=y if tc else None)))
        return out

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        one, two, side = points(), points(), points()
        for b in batches:
            _steps(None, two, b)
        with threads.one_thread():
            for b in batches:
                _steps(None, one, b)
        with ThreadPoolExecutor(2) as pool, threads.one_thread():
            for b in batches:
                _steps(pool, side, b)
    finally:
        torch.set_num_threads(before)

    def tensors(p):
        opt = p.trainer.optimizer.state_dict()["state"]
        return {**p.trainer.sae.state_dict(),
                **{(i, k): v for i in opt for k, v in opt[i].items() if torch.is_tensor(v)}}

    for a, b, c in zip(one, side, two):
        assert a.trainer.state_dict()["step"] == b.trainer.state_dict()["step"] == 3
        ta, tb, tc = tensors(a), tensors(b), tensors(c)
        for k, v in ta.items():
            assert torch.equal(v, tb[k]), k
            if v.is_floating_point() and v.numel() > 1:
                assert (v - tc[k]).abs().max() <= 1e-5 * v.abs().max(), k


def test_processes_executor_gives_the_same_digests(split, capsys):
    root, sh, grid = split
    res = run_cli(capsys, "sweep", sh, "--grid", grid, "--store", root, "--tolerance", "0.6",
                  "--executor", "processes", "--jobs", "2", "--device", "cpu")
    assert res.code == 0, res.err
    refs = {r["ref"] for r in store.list_artifacts(root, "sweep")[0].manifest()["summary"]["table"]}
    assert refs == {a.ref for a in store.list_artifacts(root, "train")} and len(refs) == 4


def test_processes_start_the_largest_points_first(split):
    """--executor processes starts the points by their training's FLOPs, largest first, so
    the short ones run last; equal points keep the grid's order (k 3, then k 6)."""
    from stages import sweep

    root, sh, grid = split
    cfg = sweep.SweepConfig(shuffle=sh, grid=str(grid), store=str(root), device="cpu")
    points = sweep.plan(cfg).context.points
    order = [(p.sae_cfg.d_sae, p.sae_cfg.k) for p in sweep._largest_first(points)]
    assert order == [(96, 3), (96, 6), (48, 3), (48, 6)]


def test_killed_sweep_trains_only_the_missing_points(split):
    root, sh, grid = split
    args = ["sweep", sh, "--grid", grid, "--store", root, "--tolerance", "0.6", "--device", "cpu"]
    killed = run_subprocess(*args, env={"SAECTL_FAULTS": "store.before_complete:3"})
    assert killed.code == -9
    done = [a for a in store.list_artifacts(root, "train") if a.is_complete()]
    assert len(done) == 2
    again = run_subprocess(*args)
    assert again.code == 0, again.err
    assert "2 already trained, 2 to train" in again.err
    for a in done:  # the finished points were not retrained
        assert f"cache hit {a.ref}" in again.err or a.is_complete()
    tried("sweep", "kill")

def test_tolerance_no_sae_meets(split, capsys):
    root, sh, grid = split
    res = run_cli(capsys, "sweep", sh, "--grid", grid, "--store", root, "--tolerance", "0.001")
    assert_one_line_error(res, "no SAE meets tolerance 0.001", "closest")
    assert len([a for a in store.list_artifacts(root, "train") if a.is_complete()]) == 4


def test_bad_grids(split, tmp_path, capsys):
    root, sh, _ = split
    cases = [("arch: topk\nbanana: [1, 2]\n", ["banana", "valid keys", "expansion"]),
             ("k: []\n", ["empty list"]),
             ("arch: topk\n", ["grid is empty"]),
             ("k: [8, 8]\n", ["same SAE"]),
             ("k: [3\n", ["not valid YAML"]),
             ("points: [1, 2]\n", ["list of mappings"])]
    for text, needles in cases:
        g = tmp_path / "bad.yaml"
        g.write_text(text)
        assert_one_line_error(run_cli(capsys, "sweep", sh, "--grid", g, "--store", root), *needles)
    good = tmp_path / "good.yaml"
    good.write_text(GRID)
    assert_one_line_error(run_cli(capsys, "sweep", sh, "--grid", good, "--store", root,
                                  "--executor", "cluster"), "executor")
    for flags, needles in ((["--jobs", "0"], ["--jobs", "at least 1"]),
                           (["--threads", "0"], ["--threads", "at least 1"]),
                           (["--executor", "slurm", "--threads", "2"],
                            ["--threads", "--cpus-per-task"])):
        assert_one_line_error(run_cli(capsys, "sweep", sh, "--grid", good, "--store", root,
                                      "--executor", "processes", *flags), *needles)
    env_path = os.environ["PATH"]
    try:
        os.environ["PATH"] = "/nonexistent"
        res = run_cli(capsys, "sweep", sh, "--grid", good, "--store", root, "--executor", "slurm")
    finally:
        os.environ["PATH"] = env_path
    assert_one_line_error(res, "sbatch")


def test_slurm_sweep_no_wait_then_collect(split, slurm_cluster, monkeypatch, capsys, tmp_path):
    """Through a real single-node SLURM cluster: --no-wait submits, a later run collects; the
    digests are the ones the local executor gives."""
    root, sh, grid = split
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    args = ["sweep", sh, "--grid", grid, "--store", root, "--tolerance", "0.6",
            "--executor", "slurm", "--device", "cpu"]
    first = run_cli(capsys, *args, "--no-wait")
    assert first.code == 0 and first.out == "" and "submitted 4 array tasks" in first.err, first.err
    res = run_cli(capsys, *args)
    assert res.code == 0, res.err
    slurm_refs = {r["ref"] for r in
                  store.list_artifacts(root, "sweep")[0].manifest()["summary"]["table"]}
    other = tmp_path / "local"
    other.mkdir()
    make_split(other, capsys)
    local = run_cli(capsys, "sweep", sh, "--grid", grid, "--store", other, "--tolerance", "0.6",
                    "--device", "cpu")
    assert local.out == res.out
    assert slurm_refs == {r["ref"] for r in
                          store.list_artifacts(other, "sweep")[0].manifest()["summary"]["table"]}


def test_slurm_sweep_gives_each_point_several_ranks(split, slurm_cluster, monkeypatch, capsys,
                                                    tmp_path):
    """--ntasks 2: each array task is one point trained data-parallel by 2 srun ranks; the
    addresses are those of one-process training, and an uneven batch is refused in planning."""
    root, sh, _ = split
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    small = tmp_path / "two.yaml"
    small.write_text(GRID.replace("k: [3, 6]", "k: [3]").replace("width: [48, 96]", "width: 48"))
    args = ["sweep", sh, "--grid", small, "--store", root, "--tolerance", "0.9", "--executor",
            "slurm", "--device", "cpu", "--ntasks", "2", "--cpus-per-task", "1"]
    res = run_cli(capsys, *args)
    assert res.code == 0, res.err + slurm_cluster.logs()
    logs = list(root.glob("sweep/*/work/logs/*.log")) or list(root.rglob("*.log"))
    assert any("data-parallel over 2 ranks" in f.read_text() for f in logs), [
        f.read_text()[-500:] for f in logs]
    other = tmp_path / "one"
    other.mkdir()
    local = run_cli(capsys, "sweep", make_split(other, capsys), "--grid", small, "--store",
                    other, "--tolerance", "0.9", "--device", "cpu")
    assert local.out == res.out  # the same point, whatever the number of ranks
    odd = tmp_path / "odd.yaml"
    odd.write_text(small.read_text().replace("batch_size: 500", "batch_size: 501"))
    assert_one_line_error(run_cli(capsys, *[a if a != small else odd for a in args]),
                          "batch_size 501", "2 ranks")


def test_slurm_options_are_checked_before_anything_runs(split, tmp_path, capsys):
    """Issue 15.7: a line break in a SLURM option (flag or the grid's `slurm:` section) went
    into the job script as a command of its own. It is refused while planning, in one line
    naming the option, before a lock, an artifact or a job."""
    root, sh, _ = split
    grid = tmp_path / "slurm-grid.yaml"
    grid.write_text(GRID + 'slurm:\n  partition: "gpu\\necho pwned > /tmp/pwned"\n')
    res = run_cli(capsys, "sweep", sh, "--grid", grid, "--store", root, "--executor", "slurm")
    assert_one_line_error(res, "--partition", "whitespace or control characters")
    tried("sweep", "injection")
    good = tmp_path / "good.yaml"
    good.write_text(GRID)
    for flag in ("--mem", "--time", "--gres", "--partition"):
        res = run_cli(capsys, "sweep", sh, "--grid", good, "--store", root, "--executor",
                      "slurm", flag, "16G\nrm -rf ~")
        assert_one_line_error(res, flag, "whitespace or control characters")
        tried("sweep", "injection")
    assert store.list_artifacts(root, "sweep") == [] and store.list_artifacts(root, "train") == []


def test_a_damaged_slurm_record_is_one_line(split, monkeypatch, capsys):
    """Issue 15.4: the sweep's work/slurm.json cut short gave a JSONDecodeError traceback; now
    one line naming the file and what to do."""
    from saectl import layout
    from stages import sweep

    root, sh, grid = split
    args = ["sweep", sh, "--grid", grid, "--store", root, "--executor", "slurm"]
    cfg = sweep.SweepConfig(shuffle=sh, grid=str(grid), store=str(root), executor="slurm")
    monkeypatch.setenv("PATH", "/nonexistent")  # no sbatch: the sweep's artifact, no job
    assert_one_line_error(run_cli(capsys, *args), "sbatch")
    record = layout.work(sweep.STAGE.address(cfg).path, "slurm.json")
    record.write_text('{"job": "12')
    res = run_cli(capsys, *args)
    assert_one_line_error(res, str(record), "damaged", "delete it")
    tried("sweep", "corruption")


def test_table_shows_per_token_figures_and_eval_keeps_addresses(split, tmp_path, capsys,
                                                                 tiny_model_dirs):
    """The table carries the per-token figures from each point's summary; --eval evaluates every
    point (probing in the table and probe_k.png) and only then changes the sweep's address."""
    import json

    from stages import sweep as sweep_stage

    root, sh, grid = split
    plain = sweep_stage.STAGE.plan(sweep_stage.SweepConfig(shuffle=sh, grid=str(grid),
                                                           store=str(root), tolerance=0.6))
    assert set(plain.params) == {"points", "tolerance"}  # as before --eval existed
    res = run_cli(capsys, "sweep", sh, "--grid", grid, "--store", root, "--tolerance", "0.6",
                  "--device", "cpu")
    assert res.code == 0, res.err
    sweep = store.list_artifacts(root, "sweep")[0]
    assert sweep.digest == plain.art.digest and "EV/token" in res.err
    with open(sweep.report_dir / "table.csv") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        assert 0 < float(r["worst_error_share"]) <= 1
        assert np.isfinite(float(r["explained_variance_per_token"]))

    # --eval on a tiny model's harvest, with eval's flags from the grid's `eval:`.
    from tests.conftest import corpus_texts

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts()))
    h = run_cli(capsys, "harvest", "--model", tiny_model_dirs["gpt_neox"], "--dataset", corpus,
                "--hooks", "resid_post.1", "--tokens", 64 * 16, "--context-size", 16,
                "--store", root, "--device", "cpu")
    lm_sh = run_cli(capsys, "shuffle", h.out.strip(), "--store", root, "--eval-fraction", "0.2")
    probes = tmp_path / "probes.jsonl"
    words = {"sport": "The team won the match", "music": "The band played a song"}
    probes.write_text("".join(json.dumps({"text": f"{w} {i}.", "label": c})
                              + "\n" for c, w in words.items() for i in range(12)))
    lm_grid = tmp_path / "lm_grid.yaml"
    lm_grid.write_text("arch: topk\nk: [2, 4]\nexpansion: 2\ntokens: 2048\nbatch_size: 256\n"
                       "lm_eval_seqs: 2\n"
                       f"eval: {{probe_data: {probes}, lm_eval_seqs: 2}}\n")
    args = ["sweep", lm_sh.out.strip(), "--grid", lm_grid, "--store", root, "--tolerance",
            "0.9", "--device", "cpu"]
    res = run_cli(capsys, *args)
    assert res.code == 0, res.err
    lm_sweep = next(a for a in store.list_artifacts(root, "sweep") if a.digest != sweep.digest)
    s = lm_sweep.manifest()["summary"]
    assert "eval" in lm_sweep.manifest()["params"] and "probe@1" in res.err
    assert all(0 <= r["probe_top_1"] <= 1 and r["eval_ref"].startswith("eval/")
               for r in s["table"])
    assert (lm_sweep.report_dir / "probe_k.png").stat().st_size > 0
    # Each point's eval is an ordinary eval artifact: the same flags are a cache hit.
    again = run_cli(capsys, "eval", s["table"][0]["ref"], "--store", root, "--probe-data",
                    probes, "--lm-eval-seqs", "2", "--tolerance", "0.9", "--device", "cpu")
    assert again.out.strip() == s["table"][0]["eval_ref"] and "cache hit" in again.err


LM_GRID = ("arch: topk\nk: [2, 4]\nexpansion: 2\ntokens: 2048\nbatch_size: 256\n"
           "lm_eval_seqs: 4\n")
"""Two points on `_tiny_lm_shuffle`, scored spliced into the model on 4 held-out sequences."""


def _tiny_lm_shuffle(capsys, model_dir, corpus, root) -> str:
    """A tiny model's resid_post.1 harvested (64 sequences of 16) and shuffled, 20% eval."""
    h = run_cli(capsys, "harvest", "--model", model_dir, "--dataset", corpus, "--hooks",
                "resid_post.1", "--tokens", 64 * 16, "--context-size", 16, "--store", root,
                "--device", "cpu")
    return run_cli(capsys, "shuffle", h.out.strip(), "--store", root, "--eval-fraction",
                   "0.2").out.strip()


def test_sweep_points_share_the_lm_eval_and_score_as_alone(tiny_model_dirs, tiny_corpus,
                                                           tmp_path, capsys):
    """A local sweep splices its points into the model with one clean and one zero-ablated
    pass a batch for all of them; each point's CE-loss and KL figures are still those of
    training and evaluating it alone (issue 22)."""
    import shutil

    import torch

    sh = _tiny_lm_shuffle(capsys, tiny_model_dirs["gpt_neox"], tiny_corpus, tmp_path)
    grid = tmp_path / "grid.yaml"
    grid.write_text(LM_GRID)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the steps in turn, as alone: the same weights, bit for bit
    try:
        res = run_cli(capsys, "sweep", sh, "--grid", grid, "--store", tmp_path, "--tolerance",
                      "0.99", "--device", "cpu")
        assert res.code == 0, res.err
        table = store.list_artifacts(tmp_path, "sweep")[0].manifest()["summary"]["table"]
        assert len(table) == 2
        swept = {r["ref"]: store.resolve(tmp_path, r["ref"]).manifest()["summary"]
                 for r in table}
        k2 = next(ref for ref, s in swept.items() if s["k"] == 2)
        shutil.rmtree(store.resolve(tmp_path, k2).path)
        alone = run_cli(capsys, "train", sh, "--store", tmp_path, "--arch", "topk", "--k", "2",
                        "--expansion", "2", "--tokens", "2048", "--batch-size", "256",
                        "--lm-eval-seqs", "4", "--device", "cpu")
    finally:
        torch.set_num_threads(threads)
    assert alone.code == 0 and alone.out.strip() == k2, alone.err
    again = store.resolve(tmp_path, k2).manifest()["summary"]
    for key in ("ce_clean", "ce_zero", "ce_sae", "ce_loss_score", "kl_zero", "kl_sae",
                "kl_score", "lm_eval_tokens", "fvu"):
        assert again[key] == swept[k2][key], key
    (k4,) = set(swept) - {k2}
    assert swept[k4]["ce_clean"] == swept[k2]["ce_clean"]
    assert swept[k4]["ce_sae"] != swept[k2]["ce_sae"]
    assert np.isfinite(swept[k4]["ce_loss_score"]) and swept[k4]["lm_eval_tokens"] == 4 * 15


@pytest.mark.parametrize("data", ["shuffle", "harvest"])
def test_sweep_eval_shares_the_lm_passes_and_scores_as_alone(tiny_model_dirs, tiny_corpus,
                                                            tmp_path, capsys, data):
    """`sweep --eval` splices its points into the model together, as train's figures do: a clean
    and a zero-ablated pass a batch for all points, and one each; each point's eval artifact
    holds the figures `saectl eval` gives it alone (issue 22). On the shuffle's eval split (the
    default) and on a harvest, whose outliers (a low norm multiple: many) pass through."""
    import shutil

    import torch

    sh = _tiny_lm_shuffle(capsys, tiny_model_dirs["gpt_neox"], tiny_corpus, tmp_path)
    flags = ["--no-probe", "--lm-eval-seqs", "4"]
    if data == "harvest":
        href = store.list_artifacts(tmp_path, "harvest")[0].ref
        flags += ["--harvest", href, "--max-activation-norm-multiple", "1.2"]
    opts = {"probe": False, "lm_eval_seqs": 4,
            **({"harvest": href, "max_activation_norm_multiple": 1.2} if data == "harvest" else {})}
    grid = tmp_path / "grid.yaml"
    grid.write_text(LM_GRID + f"eval: {json.dumps(opts)}\n")
    passes = []

    def count(module, args, output):  # every forward pass of the whole model, wherever run
        if type(module).__name__ == "GPTNeoXForCausalLM":
            passes.append(module)

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        res = run_cli(capsys, "sweep", sh, "--grid", grid, "--store", tmp_path, "--tolerance",
                      "0.99", "--device", "cpu")
    finally:
        handle.remove()
    assert res.code == 0, res.err
    # 4 sequences are one batch; train's figures and eval's each take 2 + 2 passes (not 3 · 2)
    assert len(passes) == 2 * (2 + 2), len(passes)
    row = store.list_artifacts(tmp_path, "sweep")[0].manifest()["summary"]["table"][0]
    ev = store.resolve(tmp_path, row["eval_ref"])
    swept = ev.manifest()["summary"]
    shutil.rmtree(ev.path)
    alone = run_cli(capsys, "eval", row["ref"], "--store", tmp_path, *flags, "--tolerance",
                    "0.99", "--device", "cpu")
    assert alone.code == 0 and alone.out.strip() == row["eval_ref"], alone.err
    again = store.resolve(tmp_path, row["eval_ref"]).manifest()["summary"]
    for key in ("ce_clean", "ce_zero", "ce_sae", "ce_loss_score", "kl_zero", "kl_sae",
                "kl_score", "lm_eval_tokens", "outliers_passed_through", "fvu", "dl"):
        assert again[key] == swept[key], key
    assert swept["data_stage"] == data and np.isfinite(swept["ce_loss_score"])
    if data == "harvest":
        assert 0 < swept["outliers_passed_through"] < 4 * 16
