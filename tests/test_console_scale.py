"""rlft console at scale, over a real SQLite run store written through RunStore: the heatmap is
aggregated in SQL to the cells asked for (binned steps, a page of examples, newer columns only),
metric series are downsampled keeping each bucket's min and max, ``after_step`` and ranges return
only what was asked, and the run's kept rollout counts follow new and truncated rollouts.
``build_scale_store`` is shared with test_console_browser.py. No timings here
(benchmarks/bench_console.py has them)."""

import json
import math
import random
from collections import defaultdict
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from rlft.console.app import create_app
from rlft.health.source import run_findings
from rlft.store import RunStore
from rlft.types import Rollout, RolloutError, Termination

STEPS, EXAMPLES, GROUP, DATASET = 300, 6, 4, 150


def step_rollouts(rng: random.Random, step: int, examples: list[int]) -> list[Rollout]:
    return [Rollout(example={"prompt": f"p{e}"}, messages=[{"role": "user", "content": f"p{e}"},
                                                           {"role": "assistant", "content": f"answer {step} {e} {g}"}],
                    reward=round(rng.random(), 3), rewards={"correct": float(g % 2)}, example_id=e, group_index=g,
                    termination=Termination.REWARD_ERROR if (step + e + g) % 97 == 0 else Termination.FINISHED,
                    errors=[RolloutError("reward:correct", "boom")] if (step + e + g) % 97 == 0 else [])
            for e in examples for g in range(GROUP)]


def build_scale_store(d, steps: int = STEPS, planned: int = 1000) -> SimpleNamespace:
    """A running run of ``steps`` steps (``planned`` in its config): EXAMPLES prompts x GROUP
    samples a step drawn from DATASET, an eval of 5 prompts x 2 every 50 steps, and two metrics
    a step, one of them with a spike every 37 steps."""
    rng = random.Random(0)
    store = RunStore(d)
    run_id = store.create_run("scale", config={"steps": planned, "batch_size": EXAMPLES, "group_size": GROUP})
    store.set_status(run_id, "running")
    for step in range(steps + 1):
        if step % 50 == 0:
            evals = [r for r in step_rollouts(rng, step, list(range(5))) if r.group_index < 2]
            store.add_rollouts(run_id, step, evals, split="eval")
        if step == 0:
            continue
        store.add_rollouts(run_id, step, step_rollouts(rng, step, sorted(rng.sample(range(DATASET), EXAMPLES))))
        store.log_metrics(run_id, step, {"reward/mean": rng.random(),
                                         "optim/grad_norm": 50.0 if step % 37 == 0 else rng.random()})
        store.update_run(run_id, step=step)
    return SimpleNamespace(store=store, run_id=run_id, dir=d)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return build_scale_store(tmp_path_factory.mktemp("console-scale"))


@pytest.fixture(scope="module")
def client(big):
    with TestClient(create_app(big.dir), base_url="http://127.0.0.1") as c:
        yield c


def raw_cells(store, run_id, width, split="train"):
    """{(example, column's first step): [rewards]} computed directly from the stored rollouts."""
    cells = defaultdict(list)
    for r in store.rollouts(run_id, split=split, limit=10**6):
        cells[(r["example_id"], r["step"] // width * width)].append(r["reward"])
    return cells


def test_the_heatmap_bins_steps_to_max_cols_and_each_cell_is_the_mean_of_its_raw_rewards(client, big):
    h = client.get(f"/api/runs/{big.run_id}/heatmap",
                   params={"split": "train", "max_cols": 25, "examples_offset": 3, "examples_limit": 7}).json()
    assert h["bin"] == math.ceil((STEPS + 1) / 25) and 0 < len(h["steps"]) <= 25
    assert all(s % h["bin"] == 0 for s in h["steps"])
    every = sorted({r["example_id"] for r in big.store.rollouts(big.run_id, limit=10**6)})
    assert h["examples"] == every[3:10] and h["examples_total"] == len(every)
    assert len(h["values"]) == len(h["counts"]) == 7 and all(len(row) == len(h["steps"]) for row in h["values"])
    raw = raw_cells(big.store, big.run_id, h["bin"])
    filled = 0
    for i, e in enumerate(h["examples"]):
        for j, s in enumerate(h["steps"]):
            rewards = raw.get((e, s), [])
            assert h["counts"][i][j] == len(rewards)
            if rewards:
                filled += 1
                assert h["values"][i][j] == pytest.approx(sum(rewards) / len(rewards), abs=1e-4)
            else:
                assert h["values"][i][j] is None
    assert filled > 7  # the page's examples were each drawn at several steps


def test_the_heatmap_keeps_one_column_per_step_when_they_fit(client, big):
    h = client.get(f"/api/runs/{big.run_id}/heatmap", params={"split": "eval"}).json()
    assert h["bin"] == 1 and h["steps"] == list(range(0, STEPS + 1, 50)) and h["examples"] == [0, 1, 2, 3, 4]
    assert all(None not in row for row in h["values"])


def test_heatmap_since_step_sends_only_the_newer_columns_and_merges_to_the_full_grid(tmp_path):
    live = build_scale_store(tmp_path, steps=120, planned=1000)
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1") as c:
        q = {"split": "train", "max_cols": 30, "examples_limit": 500}
        url = f"/api/runs/{live.run_id}/heatmap"
        old = c.get(url, params=q).json()
        rng = random.Random(1)
        live.store.add_rollouts(live.run_id, 121, step_rollouts(rng, 121, old["examples"][:3]))
        live.store.update_run(live.run_id, step=121)
        new = c.get(url, params=q | {"since_step": old["last_step"], "bin": old["bin"]}).json()
        full = c.get(url, params=q).json()
        stale = c.get(url, params=q | {"since_step": 120, "bin": old["bin"] + 1}).json()
    assert new["since_step"] == 120 and new["last_step"] == 121 and new["bin"] == old["bin"] == full["bin"]
    assert new["steps"] and min(new["steps"]) == 120 // new["bin"] * new["bin"] and len(new["steps"]) < len(old["steps"])
    keep = len([s for s in old["steps"] if s < new["since_step"] // new["bin"] * new["bin"]])
    assert old["steps"][:keep] + new["steps"] == full["steps"]
    assert [a[:keep] + b for a, b in zip(old["values"], new["values"])] == full["values"]
    # a caller whose column width is out of date gets the whole grid
    assert "since_step" not in stale and stale["steps"] == full["steps"] and stale["values"] == full["values"]


def test_downsampled_metrics_keep_each_buckets_min_and_max(client, big):
    raw = client.get(f"/api/runs/{big.run_id}/metrics", params={"keys": "optim/grad_norm"}).json()["optim/grad_norm"]
    assert len(raw) == STEPS and all(len(p) == 2 for p in raw)
    pts = client.get(f"/api/runs/{big.run_id}/metrics", params={"keys": "optim/grad_norm", "max_points": 40}).json()
    pts = pts["optim/grad_norm"]
    width = math.ceil((1000 + 1) / 40)  # the run's planned 1000 steps in 40 points
    assert len(pts) <= 40 and all(len(p) == 4 for p in pts)
    buckets = defaultdict(list)
    for s, v in raw:
        buckets[s // width].append((s, v))
    assert len(pts) == len(buckets)
    for step, mean, lo, hi in pts:
        members = buckets[step // width]
        values = [v for _, v in members]
        assert step == min(s for s, _ in members)
        assert (lo, hi) == (min(values), max(values)) and mean == pytest.approx(sum(values) / len(values))
    assert max(p[3] for p in pts) == 50.0  # the spikes survive downsampling


def test_metrics_after_step_and_a_zoomed_range_return_only_what_was_asked(client, big):
    url = f"/api/runs/{big.run_id}/metrics"
    newer = client.get(url, params={"after_step": STEPS - 3}).json()
    assert {k: [p[0] for p in pts] for k, pts in newer.items()} == {k: [STEPS - 2, STEPS - 1, STEPS] for k in newer}
    bucketed = client.get(url, params={"bucket": 10, "after_step": 279, "keys": "reward/mean"}).json()["reward/mean"]
    assert [p[0] for p in bucketed] == [280, 290, 300]
    zoom = client.get(url, params={"first_step": 100, "last_step": 150, "max_points": 400, "keys": "reward/mean"}).json()
    assert [p[0] for p in zoom["reward/mean"]] == list(range(100, 151)) and all(len(p) == 2 for p in zoom["reward/mean"])
    cmp = client.get("/api/compare", params={"runs": big.run_id, "max_points": 20}).json()
    assert 0 < len(cmp["metrics"][big.run_id]["reward/mean"]) <= 20


def test_kept_rollout_counts_follow_new_and_truncated_rollouts(tmp_path):
    live = build_scale_store(tmp_path, steps=20, planned=20)
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1") as c:
        def counts():
            d = c.get(f"/api/runs/{live.run_id}").json()["rollouts"]
            terms = c.get(f"/api/runs/{live.run_id}/logs").json()["terminations"]["train"]
            bad = c.get(f"/api/runs/{live.run_id}/rollouts", params={"split": "all", "errors": "true"}).json()["total"]
            return d["train"], d["eval"], sum(terms.values()), bad

        def truth():
            s = live.store
            return (s.count_rollouts(live.run_id, split="train"), s.count_rollouts(live.run_id, split="eval"),
                    sum(s.termination_counts(live.run_id).values()),
                    len(s.rollout_errors(live.run_id, split=None)))

        assert counts() == truth() == (20 * EXAMPLES * GROUP, 10, 20 * EXAMPLES * GROUP, truth()[3])
        live.store.add_rollouts(live.run_id, 21, step_rollouts(random.Random(2), 21, [1, 2]))
        assert counts() == truth() and truth()[0] == 21 * EXAMPLES * GROUP - (EXAMPLES - 2) * GROUP
        live.store.truncate_after(live.run_id, 15)  # a resume from step 15
        assert counts() == truth() and truth()[0] == 15 * EXAMPLES * GROUP
        live.store.add_rollouts(live.run_id, 16, step_rollouts(random.Random(3), 16, [1, 2, 3]))
        assert counts() == truth()
        # a resume between two requests: truncated, then rewritten past where it was (SQLite
        # gives the new rows the ids the deleted ones had)
        live.store.truncate_after(live.run_id, 10)
        for step in range(11, 23):
            live.store.add_rollouts(live.run_id, step, step_rollouts(random.Random(step), step, [1, 5, 7, 9]))
        assert counts() == truth() and truth()[0] == 10 * EXAMPLES * GROUP + 12 * 4 * GROUP
        steps = c.get(f"/api/runs/{live.run_id}/steps").json()
        assert steps == list(range(1, 23))
        assert c.get(f"/api/runs/{live.run_id}/steps", params={"split": "eval"}).json() == [0]
        # an eval of an older checkpoint, written later: its step joins the list
        live.store.add_rollouts(live.run_id, 5, step_rollouts(random.Random(4), 5, [0]), split="eval")
        assert c.get(f"/api/runs/{live.run_id}/steps", params={"split": "eval"}).json() == [0, 5]
        assert counts() == truth()


def test_component_and_error_filters_run_in_sql_with_their_totals(client, big):
    url = f"/api/runs/{big.run_id}/rollouts"
    page = client.get(url, params={"component": "correct", "cmin": 1, "step": 7}).json()
    assert page["total"] == EXAMPLES * GROUP // 2 and all(r["rewards"]["correct"] == 1 for r in page["items"])
    bad = client.get(url, params={"split": "all", "errors": "true", "limit": 5}).json()
    assert bad["total"] == len(big.store.rollout_errors(big.run_id, split=None)) and len(bad["items"]) == 5
    assert all(r["errors"] for r in bad["items"])
    good = client.get(url, params={"split": "train", "errors": "false", "limit": 1}).json()
    assert good["total"] == big.store.count_rollouts(big.run_id, split="train") - len(big.store.rollout_errors(big.run_id))


def test_the_first_tally_reads_indexes_not_rollout_rows_and_later_ones_only_newer_rows(big):
    """A run's first count in a console reads the v6 indexes (a 250k-rollout run's rows are
    800 MB); later counts read the rows above the last id seen, by id."""
    from rlft.store import aggregates as agg

    conn = big.store._conn()
    executed: list[str] = []
    conn.set_trace_callback(executed.append)
    try:
        rows, errors, top = agg.rollout_tally(big.store, big.run_id)
        first = list(executed)
        executed.clear()
        agg.rollout_tally(big.store, big.run_id, after_id=top - 10)
        later = list(executed)
    finally:
        conn.set_trace_callback(None)

    def plan(sql: str) -> str:
        return " | ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql))

    assert [plan(s) for s in first] == ["SEARCH rollouts USING COVERING INDEX rollouts_tally (run_id=?)",
                                        "SEARCH rollouts USING INDEX rollouts_errors (run_id=?)"]
    assert len(later) == 1 and plan(later[0]).startswith("SEARCH rollouts USING INTEGER PRIMARY KEY (rowid>?)")
    assert sum(n for _, _, n, _ in rows) == big.store.count_rollouts(big.run_id, split=None)
    assert sum(errors.values()) == len(big.store.rollout_errors(big.run_id, split=None)) > 0


def fresh_json(store, run_id, **kw) -> str:
    """What the no-option metrics route must return: the store's series read now."""
    data = {k: [[s, v] for s, v in pts] for k, pts in store.metrics(run_id, **kw).items()}
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def buckets_of(series: dict, width: int) -> dict:
    """{key: [[first step, mean, min, max], ...]} of buckets of ``width`` steps, from raw points."""
    out = {}
    for key, pts in series.items():
        groups = defaultdict(list)
        for s, v in pts:
            groups[s // width].append((s, v))
        out[key] = []
        for b in sorted(groups):
            vals = [v for _, v in groups[b] if v is not None]
            stats = [sum(vals) / len(vals), min(vals), max(vals)] if vals else [None, None, None]
            out[key].append([groups[b][0][0], *stats])
    return out


def test_kept_metric_series_equal_a_fresh_read_as_rows_are_added_rewritten_and_truncated(tmp_path):
    live = build_scale_store(tmp_path, steps=40, planned=40)
    store, run_id = live.store, live.run_id
    with TestClient(create_app(tmp_path), base_url="http://127.0.0.1") as c:
        url = f"/api/runs/{run_id}/metrics"

        def check() -> None:
            assert c.get(url).text == fresh_json(store, run_id)
            newer = [[s, v] for s, v in store.metrics(run_id, ["reward/mean"]).get("reward/mean", []) if s > 30]
            assert c.get(url, params={"keys": "reward/mean", "after_step": 30}).json() == \
                ({"reward/mean": newer} if newer else {})  # a key with no point in the range is left out
            cmp = c.get("/api/compare", params={"runs": run_id}).json()
            assert cmp["metrics"][run_id] == json.loads(fresh_json(store, run_id))
            assert cmp["keys"][run_id] == store.metric_keys(run_id)
            assert c.get(url, params={"bucket": 3}).json() == buckets_of(store.metrics(run_id), 3)
            findings = json.loads(json.dumps([f.to_dict() for f in run_findings(store, run_id)]))
            assert c.get(f"/api/runs/{run_id}/health").json()["findings"] == findings

        check()
        for step in (41, 42, 43, 44):  # new steps, filling the last bucket of 3 and starting the next
            store.log_metrics(run_id, step, {"reward/mean": step / 160, "optim/grad_norm": 2.0})
            check()
        assert c.get(url).json()["reward/mean"][-1] == [44, 0.275]
        store.log_metrics(run_id, 44, {"reward/mean": 0.5})  # the last step rewritten (a weight push, an eval)
        check()
        store.log_metrics(run_id, 7, {"reward/mean": -1.0})  # an older step rewritten in place
        store.log_metrics(run_id, 0, {"sync/ok": 1.0, "reward/mean": float("nan")})  # a new key, a null value
        check()
        assert c.get(url).json()["reward/mean"][:2] == [[0, None], [1, c.get(url).json()["reward/mean"][1][1]]]
        store.truncate_after(run_id, 30)  # a resume from step 30
        check()
        assert max(p[0] for p in c.get(url).json()["reward/mean"]) == 30
        # truncated and written again past where it was, between two requests
        store.truncate_after(run_id, 20)
        for step in range(21, 45):
            store.log_metrics(run_id, step, {"reward/mean": step / 100})
        check()
        store.truncate_after(run_id, -1)  # every row gone
        check()
        assert c.get(url).json() == {}


def test_kept_series_bucket_negative_steps_by_floor_like_the_documented_buckets():
    from rlft.console.series import MetricSeries

    series = MetricSeries()
    series.apply([("loss", s, float(s), 1.0) for s in range(-7, 8)])  # warm-up steps are negative
    assert series.select(bucket=5)["loss"] == [[-7, -6.5, -7.0, -6.0], [-5, -3.0, -5.0, -1.0],
                                               [0, 2.0, 0.0, 4.0], [5, 6.0, 5.0, 7.0]]
