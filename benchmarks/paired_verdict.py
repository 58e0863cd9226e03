"""The pre-registered verdict on paired held-out rewards: rlft against TRL, seed by seed.

`bench_vs_trl.py --only rlft,trl-bf16 --seed S` gives, per seed, both trainers' held-out reward
after the same steps. The sessions' comparisons were written down before their seeds ran, with one
rule on the paired difference d_S = rlft - trl (mean and its 95 % Student-t interval):

    equal      the interval lies within +-margin
    not worse  its lower end is above -margin
    better     its lower end is above 0                     (margin = 0.05 reward)

This script keeps that arithmetic in the repository instead of in each session's scratch files
(`bench_vs_trl.py --seeds A-B` prints the same verdict through :func:`verdict`):

    .venv/bin/python benchmarks/paired_verdict.py                      # every batch, then pooled
    .venv/bin/python benchmarks/paired_verdict.py --batches 400,500    # some of them, pooled
    .venv/bin/python benchmarks/paired_verdict.py --from-logs 'seed*.log' --batch 500 --machine "..."

The last form reads bench_vs_trl logs and prints CSV rows for `rlft_vs_trl_seeds.csv` (the held-out
reward after the last eval step each arm logged). The CSV holds every pre-registered seed with the
machine it ran on; a pair always ran on one machine, so pooling pairs across machines is a paired
comparison still. Left out: any correction for looking at several comparisons (the README says
which figure was primary), and scipy (the t quantile is computed here, checked in the tests).
"""

from __future__ import annotations

import argparse
import ast
import csv
import glob
import math
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

CSV = Path(__file__).with_name("rlft_vs_trl_seeds.csv")
MARGIN = 0.05
LOW = 0.6  # a run ending below this held-out reward is counted as a collapse


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for 0 <= x <= 1."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The t with P(T <= t) = p, by bisection on :func:`t_cdf` (p in (0.5, 1))."""
    lo, hi = 0.0, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Verdict:
    n: int
    mean: float
    sd: float
    low: float   # the 95 % t-interval's ends
    high: float
    median: float
    ahead: int   # pairs where the first arm scored higher

    @property
    def word(self) -> str:
        """The pre-registered rule's reading: "better", "not worse", "equal", or "none"."""
        if self.low > 0:
            return "better"
        if self.low > -MARGIN:
            return "equal" if self.high < MARGIN else "not worse"
        return "none"


def verdict(diffs: list[float]) -> Verdict:
    """The paired differences' mean, SD, 95 % t-interval, median and sign count (n >= 2)."""
    n = len(diffs)
    if n < 2:
        raise ValueError(f"a t-interval needs at least 2 pairs, got {n}")
    m, sd = statistics.mean(diffs), statistics.stdev(diffs)
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    return Verdict(n, m, sd, m - half, m + half, statistics.median(diffs), sum(d > 0 for d in diffs))


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for i, r in enumerate(rows, 2):
        try:
            r["rlft"], r["trl"] = float(r["rlft"]), float(r["trl"])
        except (KeyError, ValueError) as e:
            raise SystemExit(f"{path}: row {i}: rlft and trl must be numbers ({e})") from None
    return rows


def from_logs(pattern: str, batch: str, machine: str) -> list[str]:
    """CSV rows from bench_vs_trl logs: the arms' evals after their last step, seed by seed."""
    line = re.compile(r"^(rlft|trl-bf16) \(seed (\d+)\): .*evals (\{.*?\})")
    found: dict[int, dict[str, float]] = {}
    for path in sorted(glob.glob(pattern)):
        for m in filter(None, map(line.match, Path(path).read_text().splitlines())):
            evals = ast.literal_eval(m.group(3))
            found.setdefault(int(m.group(2)), {})[m.group(1)] = evals[max(evals)]
    return [f"{batch},{machine},{s},{arms['rlft']:.4f},{arms['trl-bf16']:.4f}"
            for s, arms in sorted(found.items()) if len(arms) == 2]


def report(name: str, rows: list[dict]) -> str:
    v = verdict([r["rlft"] - r["trl"] for r in rows])
    collapsed = (sum(r["rlft"] < LOW for r in rows), sum(r["trl"] < LOW for r in rows))
    return (f"{name}: n {v.n}, rlft - trl {v.mean:+.3f} (SD {v.sd:.3f}), 95 % [{v.low:+.3f}, {v.high:+.3f}], "
            f"median {v.median:+.3f}, rlft ahead on {v.ahead}; means {statistics.mean(r['rlft'] for r in rows):.3f}"
            f" vs {statistics.mean(r['trl'] for r in rows):.3f}; below {LOW}: rlft {collapsed[0]}, trl {collapsed[1]}"
            f" -> {v.word}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--csv", type=Path, default=CSV)
    p.add_argument("--batches", default="", help="comma-separated batch names (default: all)")
    p.add_argument("--from-logs", default="", metavar="GLOB", help="print CSV rows from bench_vs_trl logs")
    p.add_argument("--batch", default="")
    p.add_argument("--machine", default="")
    a = p.parse_args(argv)
    if a.from_logs:
        print("\n".join(from_logs(a.from_logs, a.batch, a.machine)))
        return
    rows = read_csv(a.csv)
    wanted = a.batches.split(",") if a.batches else list(dict.fromkeys(r["batch"] for r in rows))
    missing = [b for b in wanted if not any(r["batch"] == b for r in rows)]
    if missing:
        sys.exit(f"{a.csv}: no rows for batch {', '.join(missing)}")
    for b in wanted:
        batch = [r for r in rows if r["batch"] == b]
        print(report(f"batch {b} ({batch[0]['machine']})", batch))
    if len(wanted) > 1:
        print(report("pooled " + "+".join(wanted), [r for r in rows if r["batch"] in wanted]))


if __name__ == "__main__":
    main()
