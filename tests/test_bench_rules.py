"""`make bench`'s verdicts (benchmarks/run.py): a goal is "not measured: load" when others' work
took CPU the suite needed, never because of the suite's own threads; every goal of a suite that
ran is answered. Rules only: no timing is asserted (issue 22)."""

from __future__ import annotations

import os

from benchmarks.run import goal_coverage, judge_load, machine_use


def _row(goal=">= 1x", met=True):
    return {"benchmark": "shuffle MB/s in memory", "goal": goal, "met": met, "note": "n"}


def _use(own, others, cores=2):
    return {"cores": cores, "own": own, "others": others, "load_mean": 2.6, "load_max": 3.0}


def test_the_suites_own_load_is_not_contention(monkeypatch):
    monkeypatch.delenv("BENCH_IGNORE_LOAD", raising=False)
    # a sweep's two jobs keep both cores busy and the load average at 2.6: measured
    [r] = judge_load([_row()], _use(own=1.95, others=0.05))
    assert r["met"] is True and not r.get("unmeasured")
    assert "others 0.05" in r["load"] and "2 cores" in r["load"]
    # a one-thread suite beside another user's thread: each had a core, nothing saturated
    [r] = judge_load([_row()], _use(own=1.0, others=0.6))
    assert r["met"] is True


def test_others_on_saturated_cores_withhold_the_verdict(monkeypatch):
    monkeypatch.delenv("BENCH_IGNORE_LOAD", raising=False)
    rows = judge_load([_row(met=True), _row(met=False), _row(goal="", met=None)],
                      _use(own=1.3, others=0.7))
    assert [r["met"] for r in rows] == [None, None, None]
    assert [bool(r.get("unmeasured")) for r in rows] == [True, True, False]  # a row with no goal
    assert rows[0]["note"].startswith("not measured: load (others used 0.70 cores")
    # a goal "not measured: load" is answered (without a verdict), not missing
    assert "shuffle throughput >= 0.5x a sequential copy" not in goal_coverage(rows, ["shuffle"])
    assert "shuffle peak memory <= --memory" in goal_coverage(rows, ["shuffle"])
    monkeypatch.setenv("BENCH_IGNORE_LOAD", "0")  # only "1" judges anyway
    assert judge_load([_row()], _use(own=1.3, others=0.7))[0]["met"] is None
    monkeypatch.setenv("BENCH_IGNORE_LOAD", "1")
    assert judge_load([_row()], _use(own=1.3, others=0.7))[0]["met"] is True


def test_machine_use_reports_the_cores_and_cpu_shares():
    with machine_use(every=0.05) as use:
        sum(i * i for i in range(200_000))
    assert use["cores"] == len(os.sched_getaffinity(0))
    assert use["own"] >= 0 and use["others"] >= 0 and use["load_max"] >= use["load_mean"] >= 0
