"""Judge calibration (rlft judge check, rlft validate): contrast pairs catch a judge that answers at
random and pass one that tells good answers from corrupted ones. The judges are engines served by
a real `rlft serve` and reached through the official openai client (LogprobJudge)."""

import json
import math
import random
import re
import textwrap
import zlib

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

from rlft.cli.main import main
from rlft.engines.base import Sample
from rlft.renderer import Renderer
from rlft.rewards.calibration import JudgeCalibrationError, check_judges, contrast_pairs
from rlft.rewards.judge import Rubric
from rlft.rewards.logprob_judge import LogprobJudge
from rlft.serve import BackgroundServer, create_app
from rlft.testing.tokenizer import build_tiny_tokenizer

TOPICS = ["the moon", "coral reefs", "parrots", "tides", "whales", "ships", "storms", "maps", "stars", "islands",
          "sharks", "anchors", "sails", "knots", "compasses", "lighthouses", "crabs", "dolphins", "waves", "rope",
          "gulls", "harbours", "pearls", "seaweed"]
ROWS = [{"prompt": f"Tell me about {t}.", "ground_truth": f"Arr, {t} be a fine thing of the sea, matey, and I "
                                                          f"have seen {t} on many a long voyage."} for t in TOPICS]
RUBRIC = Rubric("Answers well", "The final answer says what the reference says, whole and in order.")


class ServedJudge:
    """A judge engine for `rlft serve`: its verdict is one token whose top logprobs are spread over
    the digits "1".."5" by ``verdict(prompt_text) -> {digit: probability}``."""

    def __init__(self, verdict):
        self.renderer = Renderer(build_tiny_tokenizer())
        self.verdict = verdict
        self.ids = {d: self.renderer.tokenizer.convert_tokens_to_ids(d) for d in "12345"}

    async def generate(self, prompt_ids, params):
        probs = self.verdict(self.renderer.tokenizer.decode(prompt_ids))
        top = sorted(((self.ids[d], math.log(p)) for d, p in probs.items()), key=lambda t: -t[1])
        return Sample([top[0][0]], [top[0][1]], "length", top_logprobs=[top[:params.top_logprobs]])


def at_random(text):
    rng = random.Random(zlib.crc32(text.encode()))
    w = [rng.random() for _ in range(5)]
    return {d: x / sum(w) for d, x in zip("12345", w)}


def discerning(text):
    """Prefers the answer that is the reference, word for word (pointwise and pairwise prompts)."""
    ref = re.search(r"<reference>\n(.*?)\n</reference>", text, re.S).group(1)
    final = re.search(r"<final_answer>\n(.*?)\n</final_answer>", text, re.S)
    if final is None:  # a pair: "1" when the first response is the reference
        first = re.search(r"<response_1>\n(.*?)\n</response_1>", text, re.S).group(1)
        return {"1": 0.85, "2": 0.1, "3": 0.02, "4": 0.02, "5": 0.01} if first == ref else \
               {"1": 0.1, "2": 0.85, "3": 0.02, "4": 0.02, "5": 0.01}
    return {"5": 0.8, "4": 0.1, "3": 0.05, "2": 0.03, "1": 0.02} if final.group(1) == ref else \
           {"1": 0.7, "2": 0.2, "3": 0.05, "4": 0.03, "5": 0.02}


@pytest.fixture(scope="module")
def judges():
    app = create_app(engines={"random": ServedJudge(at_random), "good": ServedJudge(discerning)})
    with BackgroundServer(app) as srv:
        yield srv.url + "/v1"


def test_contrast_pairs_corrupt_the_reference_three_ways():
    pairs = contrast_pairs(ROWS, "You are a pirate.", n=6)
    assert [p.kind for p in pairs] == ["truncated", "shuffled", "off_topic"] * 2
    for p in pairs:
        assert p.messages[0] == {"role": "system", "content": "You are a pirate."} and p.good != p.bad
        assert p.good == p.ground_truth
    trunc, shuf, off = pairs[:3]
    assert trunc.good.startswith(trunc.bad) and len(trunc.bad) < len(trunc.good) / 2
    assert sorted(shuf.bad.split()) == sorted(shuf.good.split())
    assert off.bad in [r["ground_truth"] for r in ROWS]


def test_calibration_catches_a_judge_that_answers_at_random(judges):
    judge = LogprobJudge("random", judges, api_key="x")
    with pytest.raises(JudgeCalibrationError) as e:
        check_judges([judge.reward(RUBRIC)], ROWS, None, pairs=24)
    msg = str(e.value)
    assert "answers_well: agreement" in msg and "chance is 0.50" in msg and "spread" in msg


def test_calibration_passes_a_judge_that_tells_the_pairs_apart_and_reports_its_figures(judges):
    judge = LogprobJudge("good", judges, api_key="x")
    [cal] = check_judges([judge.reward(RUBRIC)], ROWS, None, pairs=12)
    assert cal.agreement == 1.0 and set(cal.by_kind) == {"truncated", "shuffled", "off_topic"}
    assert cal.good_mean > 0.8 > 0.2 > cal.bad_mean and cal.spread > 0.3
    assert cal.length_bias < 0  # the answer said twice is not the reference: this judge does not reward length
    assert cal.position_bias == pytest.approx(0.0, abs=0.02)
    # a negative rubric expects the opposite order: the same judge then disagrees every time
    fault = Rubric("Wrong", "The answer is wrong.", kind="negative")
    with pytest.raises(JudgeCalibrationError, match=r"agreement 0\.00"):
        check_judges([judge.reward(fault)], ROWS, None, pairs=12)


def test_rlft_judge_check_cli_passes_or_fails_with_the_figures(judges, tmp_path, capsys, monkeypatch):
    (tmp_path / "env.py").write_text(textwrap.dedent("""
        import os
        from rlft import Environment
        from rlft.rewards.judge import Rubric
        from rlft.rewards.logprob_judge import LogprobJudge

        judge = LogprobJudge(os.environ["JUDGE_MODEL"], os.environ["JUDGE_URL"], api_key="x")
        env = Environment(system_prompt="You are a pirate.", rewards=[judge.reward(Rubric("Answers well", "ok"))])
    """))
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "config.toml").write_text('env = "env.py"\ndata = "data.jsonl"\njudge_pairs = 24\n')
    monkeypatch.setenv("JUDGE_URL", judges)
    monkeypatch.setenv("JUDGE_MODEL", "good")
    assert main(["judge", "check", str(tmp_path / "config.toml")]) == 0
    out = capsys.readouterr().out
    assert "answers_well: agreement 1.00" in out and "judge check passed" in out
    monkeypatch.setenv("JUDGE_MODEL", "random")
    assert main(["judge", "check", str(tmp_path / "config.toml")]) == 2
    err = capsys.readouterr().err
    assert "JudgeCalibrationError" not in err and "cannot tell good answers from corrupted ones" in err


def test_user_given_judge_examples_name_the_file_row_and_field(tmp_path):
    from rlft.errors import UserError
    from rlft.rewards.calibration import load_examples

    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "hi", "good": "hello there friend", "bad": "go away"}\n{"prompt": "x", "good": 3}\n')
    with pytest.raises(UserError, match=r"pairs.jsonl, row 2: field 'good'"):
        load_examples(path, None)
    path.write_text('{"prompt": "hi", "good": "hello there friend", "bad": "go away"}\n')
    [pair] = load_examples(path, "sys")
    assert pair.kind == "example" and pair.messages[-1] == {"role": "user", "content": "hi"}
