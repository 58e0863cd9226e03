"""Judge calibration before training: can each judged rubric tell a good answer from a worse one?

For every reward of an environment that a judge scores (``judge.reward(rubric)``, JSON or logprob
mode: its function is a :class:`rlft.rewards.judge.JudgedRubric`), :func:`calibrate` scores
contrast pairs, a good answer and a worse one to the same prompt:

- from the dataset (:func:`contrast_pairs`): rows whose ``ground_truth`` (or ``reference``) is an
  answer of 3 words or more; the good answer is that reference, the worse one a corruption of it,
  in turn ``truncated`` (its first third), ``shuffled`` (its words in a seeded random order) and
  ``off_topic`` (another row's reference);
- or given by the user (:func:`load_examples`, config key ``judge_examples``): a JSONL file of
  ``{"prompt" or "messages", "good", "bad"}`` rows, optional ``"rubric"`` (a reward name: the row
  calibrates that rubric only) and ``"ground_truth"``.

Figures per rubric (:class:`Calibration`): ``agreement``, the share of pairs the judge orders the
expected way (the good answer scores higher on a positive rubric, lower on a negative one; a tie
counts half; chance = 0.5), per corruption too; ``spread``, the standard deviation of all its
scores; ``length_bias``, the mean score change when the good answer is said twice (twice as long,
nothing added; > 0: longer scores better on a positive rubric); ``position_bias`` for logprob
judges, from asking each pair in both orders (``judge.prefer``; > 0 favours the first shown).

A judge that cannot tell the pairs apart (agreement below ``min_agreement``, default 0.7, or a
spread below 0.01: all scores equal) fails with :class:`JudgeCalibrationError` naming the figures,
before any compute is spent on training. ``rlft validate`` runs this; ``rlft judge check
config.toml`` runs only this.

Left out: calibrating group rewards (rankings: the pairs above are single answers), statistical
tests beyond the agreement threshold (use more pairs to narrow it: ``pairs=``).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean, pstdev
from typing import Any

from rlft.errors import UserError
from rlft.rewards.judge import JudgedRubric, JudgeError
from rlft.types import Message, Rollout

__all__ = ["Calibration", "ContrastPair", "JudgeCalibrationError", "calibrate", "check_judges", "contrast_pairs",
           "judged_rubrics", "load_examples"]


class JudgeCalibrationError(UserError):
    """A judged rubric cannot tell good answers from corrupted ones (the message has the figures)."""


@dataclass
class ContrastPair:
    """A prompt's conversation (system prompt included), a good answer and a worse one."""

    messages: list[Message]
    good: str
    bad: str
    kind: str  # truncated | shuffled | off_topic | example
    ground_truth: Any = None
    rubric: str | None = None  # an example for this reward name only


@dataclass
class Calibration:
    name: str
    pairs: int
    agreement: float
    by_kind: dict[str, float]
    spread: float
    good_mean: float
    bad_mean: float
    length_bias: float
    position_bias: float | None = None
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in self.by_kind.items())
        pos = "" if self.position_bias is None else f", position bias {self.position_bias:+.3f}"
        return (f"{self.name}: agreement {self.agreement:.2f} over {self.pairs} pairs ({kinds}; chance 0.50), "
                f"good {self.good_mean:.3f} vs worse {self.bad_mean:.3f}, spread {self.spread:.3f}, "
                f"length bias {self.length_bias:+.3f}{pos}")


def judged_rubrics(rewards: Sequence[Any]) -> list[JudgedRubric]:
    """The judge-scored rubrics among an environment's ``Reward`` objects."""
    return [r.fn for r in rewards if isinstance(r.fn, JudgedRubric)]


def _reference(row: dict[str, Any]) -> str | None:
    ref = row.get("ground_truth", row.get("reference"))
    return ref if isinstance(ref, str) and len(ref.split()) >= 3 else None


def contrast_pairs(rows: Sequence[dict[str, Any]], system_prompt: str | None, n: int = 12,
                   seed: int = 0) -> list[ContrastPair]:
    """Up to ``n`` pairs from rows with a reference answer (module docstring), corruptions in turn."""
    from rlft.data import initial_messages

    usable = [r for r in rows if _reference(r)]
    rng = random.Random(seed)
    rng.shuffle(usable)
    kinds = ("truncated", "shuffled", "off_topic")
    out = []
    for k, row in enumerate(usable[:n]):
        good, kind = _reference(row), kinds[k % len(kinds)]
        words = good.split()  # type: ignore[union-attr]
        if kind == "truncated":
            bad = " ".join(words[:max(1, len(words) // 3)])
        elif kind == "shuffled":
            bad = good
            for _ in range(10):
                bad = " ".join(rng.sample(words, len(words)))
                if bad != good:
                    break
        else:
            others = [_reference(r) for r in usable if _reference(r) != good]
            if not others:
                continue
            bad = rng.choice(others)
        if bad != good:
            out.append(ContrastPair(initial_messages(row, system_prompt), good, bad, kind, row.get("ground_truth")))
    return out


def load_examples(path: str | Path, system_prompt: str | None) -> list[ContrastPair]:
    """``judge_examples``: JSONL rows ``{"prompt" or "messages", "good", "bad"}`` (module docstring)."""
    from rlft.data import initial_messages

    out = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise UserError(f"judge_examples {path}: {e.strerror or e}") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise UserError(f"judge_examples {path}, row {i}: not JSON ({e})") from None
        for key in ("good", "bad"):
            if not isinstance(row.get(key) if isinstance(row, dict) else None, str):
                raise UserError(f"judge_examples {path}, row {i}: field {key!r} must be a string (the {key} answer)")
        if not ("prompt" in row or "messages" in row):
            raise UserError(f"judge_examples {path}, row {i}: field 'prompt' (or 'messages') is missing")
        out.append(ContrastPair(initial_messages(row, system_prompt), row["good"], row["bad"], "example",
                                row.get("ground_truth"), row.get("rubric")))
    if not out:
        raise UserError(f"judge_examples {path}: no rows")
    return out


def _rollout(pair: ContrastPair, answer: str) -> Rollout:
    return Rollout(example={"ground_truth": pair.ground_truth}, messages=[
        *pair.messages, {"role": "assistant", "content": answer}])


async def calibrate(judged: JudgedRubric, pairs: Sequence[ContrastPair], min_agreement: float = 0.7,
                    min_spread: float = 0.01) -> Calibration:
    """Score the pairs with one judged rubric and judge the judge (module docstring)."""
    from rlft.rewards.logprob_judge import LogprobJudge

    pairs = [p for p in pairs if p.rubric in (None, judged.name)]
    if not pairs:
        raise UserError(f"judge calibration of {judged.name!r}: no contrast pairs (the data has no reference "
                        "answers: give judge_examples)")
    judge, rubric = judged.judge, judged.rubric

    async def score(p: ContrastPair, answer: str) -> float:
        return await judge.score(rubric, _rollout(p, answer), judged.name)

    good = await asyncio.gather(*(score(p, p.good) for p in pairs))
    bad = await asyncio.gather(*(score(p, p.bad) for p in pairs))
    padded = await asyncio.gather(*(score(p, p.good + " " + p.good) for p in pairs))
    sign = 1.0 if rubric.kind == "positive" else -1.0
    right = [1.0 if sign * (g - b) > 0 else 0.5 if g == b else 0.0 for g, b in zip(good, bad)]
    by_kind = {k: fmean(r for r, p in zip(right, pairs) if p.kind == k) for k in dict.fromkeys(p.kind for p in pairs)}
    position = None
    if isinstance(judge, LogprobJudge):
        firsts = await asyncio.gather(*(judge.prefer(rubric, _rollout(p, p.good), _rollout(p, p.bad)) for p in pairs))
        seconds = await asyncio.gather(*(judge.prefer(rubric, _rollout(p, p.bad), _rollout(p, p.good)) for p in pairs))
        position = fmean((a + b - 1) / 2 for a, b in zip(firsts, seconds))
    cal = Calibration(judged.name, len(pairs), fmean(right), by_kind, pstdev(good + bad), fmean(good), fmean(bad),
                      sign * fmean(p - g for p, g in zip(padded, good)), position)
    if cal.agreement < min_agreement:
        cal.problems.append(f"agreement {cal.agreement:.2f} is below {min_agreement:.2f} (chance is 0.50)")
    if cal.spread < min_spread:
        cal.problems.append(f"all scores are (nearly) equal: spread {cal.spread:.4f}")
    return cal


def check_judges(rewards: Sequence[Any], rows: Sequence[dict[str, Any]], system_prompt: str | None, *,
                 examples: str | Path | None = None, pairs: int = 12, min_agreement: float = 0.7,
                 seed: int = 0) -> list[Calibration]:
    """Calibrate every judged rubric among ``rewards``; raises JudgeCalibrationError when one
    cannot tell the pairs apart (or its judge fails), with every rubric's figures in the message.
    [] when there is no judged rubric, or no pair to calibrate on (no reference answers in
    ``rows`` and no ``examples``)."""
    judged = judged_rubrics(rewards)
    contrast = load_examples(examples, system_prompt) if examples else contrast_pairs(rows, system_prompt, pairs, seed)
    if not judged or not contrast:
        return []  # no judge, or nothing to calibrate it on (no reference answers, no judge_examples)

    async def run() -> list[Calibration]:
        out = []
        for j in judged:
            try:
                out.append(await calibrate(j, contrast, min_agreement))
            except JudgeError as e:
                raise JudgeCalibrationError(f"judge calibration of {j.name!r}: the judge failed: {e}") from e
        return out

    results = asyncio.run(run())
    bad = [c for c in results if c.problems]
    if bad:
        raise JudgeCalibrationError(
            "the judge cannot tell good answers from corrupted ones: "
            + "; ".join(f"{c.name}: {', '.join(c.problems)}" for c in bad)
            + ". Figures: " + " | ".join(c.summary() for c in results)
            + ". Use a stronger judge, reword the rubric, or give judge_examples.")
    return results
