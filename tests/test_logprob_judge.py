"""Logprob-scored rubrics: against a real `rlft serve` of the tiny pretrained model (it answers with
digits), in-process with the same model, and the order-averaged pairwise preference against a
served judge with a planted position bias."""

import asyncio
import math
import re

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from rlft.engines.base import Sample  # noqa: E402
from rlft.renderer import Renderer  # noqa: E402
from rlft.rewards import score_group  # noqa: E402
from rlft.rewards.judge import JudgeError, Rubric  # noqa: E402
from rlft.rewards.logprob_judge import (  # noqa: E402
    LocalJudge,
    LogprobJudge,
    NoVerdictMassError,
    Verdicts,
    pairwise_scores,
    rubric_verdicts,
    score_verdict,
)
from rlft.serve import BackgroundServer, create_app  # noqa: E402
from rlft.testing.tokenizer import build_tiny_tokenizer  # noqa: E402
from rlft.types import Rollout  # noqa: E402

CORRECT = Rubric("Correct", "The answer is the largest number of the list.")


def rollout(answer, prompt="max of 3 8 1 5", truth="8"):
    return Rollout(example={"prompt": prompt, "ground_truth": truth},
                   messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])


# -- the scoring math -------------------------------------------------------------------------------

def test_verdict_score_is_the_renormalised_probability_weighted_mean_and_spaced_tokens_add_up():
    v = rubric_verdicts(Rubric("r", "d", score_map={"no": 0, "partly": 0.5, "yes": 1}))
    assert v.values == {"1": 0.0, "2": 0.5, "3": 1.0} and v.meanings["2"] == "partly"
    got = score_verdict([("1", math.log(0.1)), (" 3", math.log(0.3)), ("3", math.log(0.1)), ("x", math.log(0.5))], v)
    assert got.mass == pytest.approx(0.5)
    assert got.probs == pytest.approx({"1": 0.2, "2": 0.0, "3": 0.8})
    assert got.score == pytest.approx(0.8) and sum(got.probs.values()) == pytest.approx(1.0)
    levels = rubric_verdicts(Rubric("r", "d", score_map={"No": 0, "Yes": 1}), answer="level")
    assert score_verdict([(" yes", 0.0)], levels).score == 1.0
    scale = rubric_verdicts(Rubric("r", "d"))
    assert scale.values == {"1": 0.0, "2": 0.25, "3": 0.5, "4": 0.75, "5": 1.0}


def test_no_mass_on_any_verdict_token_is_a_named_error_listing_the_likely_tokens():
    with pytest.raises(NoVerdictMassError, match="'hello'"):
        score_verdict([("hello", -0.1), ("7", -3.0)], Verdicts({"1": 0.0, "2": 1.0}, {}))


# -- against rlft serve -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(pretrained_tiny_dir):
    app = create_app(pretrained_tiny_dir, dtype="float32", device="cpu", max_batch_size=8)
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def direct(pretrained_tiny_dir):
    """The tiny judge's own next-token log-softmax after a judge prompt (fp32 forward pass)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(pretrained_tiny_dir, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(pretrained_tiny_dir)
    renderer = Renderer(tok)

    def logprobs(messages):
        with torch.no_grad():
            logits = model(torch.tensor([renderer.render_prompt(messages)])).logits[0, -1].float()
        return torch.log_softmax(logits, -1), tok

    return logprobs


def test_logprob_judge_against_rlft_serve_scores_the_models_real_verdict_distribution(served, direct,
                                                                                       pretrained_tiny_dir):
    judge = LogprobJudge(pretrained_tiny_dir, served.url + "/v1", api_key="x")
    ro = rollout("8")
    score = asyncio.run(judge.score(CORRECT, ro))
    # the same figures from a direct forward pass: the top 20, digits 1..5 renormalised
    logp, tok = direct(judge.rubric_messages(CORRECT, ro))
    vals, ids = logp.topk(20)
    probs = {d: 0.0 for d in "12345"}
    for i, v in zip(ids.tolist(), vals.tolist()):
        t = tok.decode([i]).strip()
        if t in probs:
            probs[t] += math.exp(v)
    mass = sum(probs.values())
    assert 0.1 < mass <= 1.0  # this judge answers with digits
    want = sum(p * (int(d) - 1) / 4 for d, p in probs.items()) / mass
    assert score == pytest.approx(want, abs=1e-4)
    assert ro.metrics["judge/mass_correct"] == pytest.approx(mass, abs=1e-4)
    assert ro.metrics["judge/requests"] == 1 and ro.metrics["judge/prompt_tokens"] > 0
    assert ro.metrics["judge/completion_tokens"] == 1 and ro.metrics["judge/seconds"] > 0


def test_identical_judge_prompts_in_one_step_cost_one_request(served, pretrained_tiny_dir):
    judge = LogprobJudge(pretrained_tiny_dir, served.url + "/v1", api_key="x")
    group = [rollout("8") for _ in range(4)]

    async def step():
        await score_group(group, [judge.reward(CORRECT)])

    asyncio.run(step())
    stats = judge.stats()
    assert stats["requests"] == 1 and stats["cache_hits"] == 3
    assert len({ro.rewards["correct"] for ro in group}) == 1 and sum(ro.metrics.get("judge/requests", 0) for ro in group) == 1


def test_a_rubric_whose_verdict_tokens_get_no_mass_raises_a_named_error(served, pretrained_tiny_dir):
    judge = LogprobJudge(pretrained_tiny_dir, served.url + "/v1", api_key="x", answer="level")
    never = Rubric("Tone", "Warm and polite.", score_map={"splendid": 1.0, "dreadful": 0.0})
    with pytest.raises(NoVerdictMassError, match="splendid"):
        asyncio.run(judge.score(never, rollout("8")))
    # the failure is one component's error, recorded on the rollout, not the step's
    ro = rollout("8")
    asyncio.run(score_group([ro], [judge.reward(never)]))
    assert ro.rewards["tone"] == 0.0 and "NoVerdictMassError" in ro.errors[0].message


def test_local_judge_matches_the_served_judge_and_batches_the_step_in_one_forward(served, direct,
                                                                                  pretrained_tiny_dir):
    local = LocalJudge(pretrained_tiny_dir)
    assert local.lm is None  # built from a path, it loads the model at its first verdict, not here
    remote = LogprobJudge(pretrained_tiny_dir, served.url + "/v1", api_key="x")
    answers = ["8", "3", "5", "1", "eight", "8 is the largest"]

    async def both():
        a = await asyncio.gather(*(local.score(CORRECT, rollout(x)) for x in answers))
        b = await asyncio.gather(*(remote.score(CORRECT, rollout(x)) for x in answers))
        return a, b

    mine, theirs = asyncio.run(both())
    stats = local.stats()
    assert stats["forward_passes"] == 1 and stats["requests"] == len(answers)
    # local: exact over every digit token; served: its top 20 (this judge puts its mass on digits, so they agree)
    assert mine == pytest.approx(theirs, abs=2e-3)
    logp, tok = direct(local.rubric_messages(CORRECT, rollout("3")))
    p = {d: math.exp(float(logp[tok.convert_tokens_to_ids(d)])) for d in "12345"}
    assert mine[1] == pytest.approx(sum(p[d] * (int(d) - 1) / 4 for d in p) / sum(p.values()), abs=1e-4)


# -- pairwise: a served judge with a planted position bias -------------------------------------------

class PlantedJudge:
    """A judge engine for `rlft serve`: reads the two responses of a pairwise prompt, prefers the one
    with more 'good' words, and adds ``bias`` to P("1") (the first position). Its verdict comes back
    as top logprobs over the tokens "1" and "2"."""

    def __init__(self, bias):
        self.renderer = Renderer(build_tiny_tokenizer())
        self.bias = bias
        tok = self.renderer.tokenizer
        self.one, self.two = tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("2")

    def p_first(self, q1, q2):
        return 0.5 + 0.3 * math.tanh(q1 - q2) + self.bias

    async def generate(self, prompt_ids, params):
        text = self.renderer.tokenizer.decode(prompt_ids)
        q = [len(re.findall(r"good", m)) for m in re.findall(r"<response_\d>\n(.*?)\n</response", text, re.S)]
        p = self.p_first(*q)
        top = [(self.one, math.log(p)), (self.two, math.log(1 - p))][:max(params.top_logprobs, 1)]
        return Sample([self.one], [top[0][1]], "length", top_logprobs=[top] if params.top_logprobs else None)


def test_order_averaging_removes_a_planted_position_bias():
    group = [rollout(x) for x in ["good", "meh", "good good good", "good good"]]
    quality = [1, 0, 3, 2]
    results = {}
    for bias in (0.0, 0.15):
        app = create_app(engines={"planted": PlantedJudge(bias)})
        with BackgroundServer(app) as srv:
            judge = LogprobJudge("planted", srv.url + "/v1", api_key="x")
            reward = judge.pairwise(Rubric("Good", "Uses the word good more."))
            ros = [rollout(r.messages[-1]["content"]) for r in group]
            asyncio.run(score_group(ros, [reward]))
            results[bias] = ([r.rewards["good"] for r in ros], ros[0].metrics["judge/position_bias_good"],
                             judge.stats()["requests"])
    unbiased, biased = results[0.0], results[0.15]
    assert biased[0] == pytest.approx(unbiased[0], abs=1e-4)  # the bias is gone from the scores
    assert biased[1] == pytest.approx(0.15, abs=1e-4) and unbiased[1] == pytest.approx(0.0, abs=1e-4)
    assert sorted(range(4), key=lambda i: biased[0][i]) == sorted(range(4), key=lambda i: quality[i])
    assert biased[2] == 4 * 3  # every ordered pair once
    # one order only would have kept it: the pure function shows what averaging removes
    p = [[PlantedJudge(0.15).p_first(quality[i], quality[j]) if i != j else None for j in range(4)] for i in range(4)]
    one_order = [sum(p[i][j] if i < j else 1 - p[j][i] for j in range(4) if j != i) / 3 for i in range(4)]
    assert max(abs(a - b) for a, b in zip(one_order, unbiased[0])) > 0.05
    assert pairwise_scores(p)[0] == pytest.approx(unbiased[0], abs=1e-4)


def test_an_endpoint_without_top_logprobs_is_a_judge_error_saying_so():
    class NoTop(PlantedJudge):
        async def generate(self, prompt_ids, params):
            return Sample([self.one], [-0.1], "length")

    app = create_app(engines={"plain": NoTop(0.0)})
    with BackgroundServer(app) as srv:
        judge = LogprobJudge("plain", srv.url + "/v1", api_key="x", retries=0)
        with pytest.raises(JudgeError, match="does not return top logprobs"):
            asyncio.run(judge.score(CORRECT, rollout("8")))
    assert judge.stats()["errors"] == 1
