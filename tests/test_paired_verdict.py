"""benchmarks/paired_verdict.py: the t quantile matches printed tables, the rule reads as written,
and the committed seeds reproduce the verdicts the README reports."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("paired_verdict", ROOT / "benchmarks" / "paired_verdict.py")
pv = importlib.util.module_from_spec(_spec)
sys.modules["paired_verdict"] = pv  # dataclasses look their module up there
_spec.loader.exec_module(pv)


@pytest.mark.parametrize("df,expected", [(1, 12.706), (2, 4.303), (5, 2.571), (10, 2.228), (23, 2.069),
                                         (33, 2.035), (57, 2.002), (120, 1.980)])
def test_t_quantile_matches_the_printed_table(df, expected):
    assert pv.t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)


def test_t_cdf_is_symmetric_and_tends_to_the_normal():
    assert pv.t_cdf(0.0, 7) == pytest.approx(0.5)
    assert pv.t_cdf(-1.3, 7) == pytest.approx(1 - pv.t_cdf(1.3, 7))
    assert pv.t_cdf(1.959964, 100_000) == pytest.approx(0.975, abs=1e-5)


def test_the_interval_is_mean_plus_minus_t_times_standard_error():
    d = [0.1, -0.05, 0.02, 0.07]
    v = pv.verdict(d)
    half = 3.182446 * v.sd / 2  # t(0.975, 3), sqrt(4) = 2
    assert (v.low, v.high) == (pytest.approx(v.mean - half, abs=1e-6), pytest.approx(v.mean + half, abs=1e-6))
    assert (v.n, v.ahead) == (4, 3)


@pytest.mark.parametrize("low,high,word", [(0.01, 0.2, "better"), (-0.04, 0.04, "equal"),
                                           (-0.04, 0.09, "not worse"), (-0.06, 0.01, "none")])
def test_the_rule_reads_the_interval_as_preregistered(low, high, word):
    assert pv.Verdict(10, (low + high) / 2, 0.1, low, high, 0.0, 5).word == word


def test_one_pair_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        pv.verdict([0.1])


def test_the_committed_seeds_give_the_reported_figures(capsys):
    """The batches and pools as benchmarks/README.md reports them."""
    pv.main(["--batches", "300,400"])
    out = capsys.readouterr().out
    assert "batch 400 (AMD EPYC (twenty-first session)): n 24, rlft - trl +0.055" in out
    assert "pooled 300+400: n 58, rlft - trl +0.011 (SD 0.234), 95 % [-0.051, +0.072]" in out
    pv.main([])  # every batch, then the twenty-second session's pre-registered primary figure
    out = capsys.readouterr().out
    assert "pooled 300+400+500: n 97, rlft - trl +0.035 (SD 0.207), 95 % [-0.007, +0.077]" in out
    assert out.rstrip().endswith("-> not worse")


def test_logs_become_csv_rows_with_the_last_eval(tmp_path):
    log = tmp_path / "seed7.log"
    log.write_text("noise\n"
                   "rlft (seed 7): step s [5.1], evals {0: 0.2, 3: 0.8125}, peak RSS 2.1 GB\n"
                   "trl-bf16 (seed 7): step s [30.0], evals {0: 0.2, 3: 0.75}, peak RSS 8.5 GB\n"
                   "rlft (seed 8): step s [5.1], evals {0: 0.2, 3: 0.5}, peak RSS 2.1 GB\n")  # no TRL arm: left out
    assert pv.from_logs(str(tmp_path / "seed*.log"), "9", "box") == ["9,box,7,0.8125,0.7500"]


def test_a_bad_csv_value_names_the_file_and_row(tmp_path):
    f = tmp_path / "s.csv"
    f.write_text("batch,machine,seed,rlft,trl\n1,m,1,0.5,0.4\n1,m,2,oops,0.4\n")
    with pytest.raises(SystemExit, match=r"s\.csv: row 3"):
        pv.read_csv(f)
