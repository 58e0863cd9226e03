"""LLM judge rewards against a real ``rlft serve`` on 127.0.0.1 (the real openai client, no mocks):
scripted judges replying through HTTP, the tiny random model on the HF engine, and the failure
paths (garbage replies, server down, timeouts) scoring 0 with the error recorded."""

import asyncio
import json
import re
import socket
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

from rlft.env import Environment, Sampler
from rlft.renderer import Renderer
from rlft.rewards import Reward, score_group
from rlft.rewards.judge import Judge, JudgeParseError, Rubric, parse_ranking, parse_score
from rlft.serve import BackgroundServer, create_app
from rlft.testing import ScriptedPolicy
from rlft.testing.tokenizer import build_tiny_tokenizer
from rlft.types import Rollout, Termination

RENDERER = Renderer(build_tiny_tokenizer())
CORRECT = Rubric("Correct answer", "The final answer states the right result.")
RAMBLING = Rubric("Rambling / off-topic", "The answer wanders away from the question.", kind="negative")


def judge_script(prompt: str, turn: int) -> str:
    """The scripted judge. A ranking prompt: candidates ranked by the ``quality N`` they state. A
    rubric prompt: the ``verdict: ...`` line of the final answer, verbatim (``\\n`` unescaped)."""
    if "<candidates>" in prompt:
        found = re.findall(r"## Candidate (\d+)\n.*?quality (\d+)", prompt, re.S)
        order = [int(c) for c, _ in sorted(found, key=lambda cq: -int(cq[1]))]
        return json.dumps({"reasoning": "higher quality first", "ranking": order})
    m = re.search(r"<final_answer>\n.*?verdict: (.*?)\n</final_answer>", prompt, re.S)
    return m.group(1).replace("\\n", "\n") if m else '{"reasoning": "no verdict", "score": 0.5}'


class Counting:
    """A served scripted engine that counts requests and the most in flight at once; prompts
    containing ``slow_if`` are answered by ``ScriptedPolicy(delay=slow_delay)``."""

    def __init__(self, script, delay=0.0, slow_if=None, slow_delay=0.0):
        self.renderer = RENDERER
        self.fast = ScriptedPolicy(RENDERER, script, delay=delay)
        self.slow = ScriptedPolicy(RENDERER, script, delay=slow_delay)
        self.slow_if = slow_if
        self.reset()

    def reset(self):
        self.calls, self.active, self.max_active, self.prompts = 0, 0, 0, []

    async def generate(self, prompt_ids, params):
        self.calls += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            text = RENDERER.tokenizer.decode(prompt_ids, skip_special_tokens=False)
            self.prompts.append(text)
            slow = self.slow_if is not None and self.slow_if in text
            return await (self.slow if slow else self.fast).generate(prompt_ids, params)
        finally:
            self.active -= 1


ENGINES = {"judge": Counting(judge_script), "paced": Counting(judge_script, delay=0.2),
           "gated": Counting(judge_script, slow_if="dawdle", slow_delay=2.0),
           "slow": Counting(judge_script, delay=2.0)}


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(create_app(engines=ENGINES)) as srv:
        yield srv


@pytest.fixture
def engines():
    for e in ENGINES.values():
        e.reset()
    return ENGINES


def make_judge(server, model="judge", **kw):
    return Judge(model, server.url + "/v1", **{"retries": 0, "backoff": 0.01, "timeout": 10, **kw})


def rollout(verdict="", answer="The answer is 5.", group_index=0, **example):
    """A finished rollout whose final answer carries the judge's scripted reply (``verdict: ...``)."""
    text = answer + (f"\nverdict: {verdict.replace(chr(10), chr(92) + 'n')}" if verdict else "")
    ex = {"prompt": "What is 2+3?", **example}
    return Rollout(example=ex, messages=[{"role": "user", "content": ex["prompt"]},
                                         {"role": "assistant", "content": text}],
                   termination=Termination.FINISHED, group_index=group_index)


def score(rollouts, rewards, timeout=30.0):
    asyncio.run(score_group(rollouts, rewards, timeout))
    return rollouts


def errors(ro):
    return [(e.where, e.message) for e in ro.errors]


# -- parsing (no server) --------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, expected", [
    ('{"reasoning": "fine", "score": 0.8}', 0.8),
    ('Sure!\n```json\n{"reasoning": "fine", "score": "0.25"}\n```\nHope that helps.', 0.25),
    ('<think>score 0.1? {"score": 0.1}</think>Verdict: {"reasoning": "ok", "score": 0.7} (final)', 0.7),
    ('{"result": {"reasoning": "nested", "score": 0.5}}', 0.5),
    ("The answer is right.\nScore: 0.9", 0.9),
    ("The answer is right.\n**7/10**", 0.7),
    ("way too good\n1.7", 1.0),
    ('{"reasoning": "bad", "score": -2}', 0.0),
    ('{"reasoning": "pct", "score": "80%"}', 0.8),
])
def test_parse_score_finds_the_score_in_json_fences_or_the_last_line_and_clamps_it(reply, expected):
    assert parse_score(reply) == pytest.approx(expected)


def test_parse_score_snaps_to_score_map_levels_and_rejects_replies_without_a_score():
    levels = Rubric("t", "d", score_map={"poor": 0, "ok": 0.5, "great": 1}).score_map
    assert parse_score('{"score": "Great"}', levels) == 1.0
    assert parse_score('{"score": 0.6}', levels) == 0.5
    assert parse_score("reasoning...\nok", levels) == 0.5
    assert Rubric("t", "d", score_map=[0, 0.3, 1]).score_map == {"0": 0.0, "0.3": 0.3, "1": 1.0}
    for bad in ["", "I cannot grade this.", '{"reasoning": "no score here"}', '{"score": true}', '{"score": "nan"}']:
        with pytest.raises(JudgeParseError):
            parse_score(bad)


def test_parse_ranking_needs_every_candidate_once():
    assert parse_ranking('ok ```json\n{"reasoning": "r", "ranking": [2, "3", 1]}\n```', 3) == [2, 3, 1]
    assert parse_ranking("so the order is\n3 > 1 > 2", 3) == [3, 1, 2]
    for bad in ['{"ranking": [1, 1, 2]}', '{"ranking": [1, 2]}', '{"ranking": [1, 2, 4]}', "no idea"]:
        with pytest.raises(JudgeParseError):
            parse_ranking(bad, 3)


def test_rubric_names_weights_and_signs_are_checked():
    judge = Judge("m", "http://127.0.0.1:9/v1")
    pos, neg = judge.rewards([CORRECT, RAMBLING])
    assert (pos.name, pos.weight, neg.name, neg.weight) == ("correct_answer", 1.0, "rambling_off_topic", -1.0)
    assert judge.reward(RAMBLING, 0).weight == 0  # logged only
    with pytest.raises(ValueError, match="negative"):
        judge.reward(RAMBLING, 0.5)
    with pytest.raises(ValueError, match="distinct"):
        judge.rewards([CORRECT, Rubric("Correct  answer!", "again")])
    with pytest.raises(ValueError):
        Rubric("t", "d", kind="neutral")


# -- a scripted judge behind rlft serve --------------------------------------------------------------------

def test_scores_come_from_the_servers_json_replies_clamped_with_usage_and_latency_metrics(server, engines):
    judge = make_judge(server)
    ros = score([rollout('{"reasoning": "good", "score": 0.8}'),
                 rollout('```json\n{"reasoning": "too generous", "score": 1.7}\n```\ntrailing words'),
                 rollout("Not great.\nScore: -2")], [judge.reward(CORRECT)])
    assert [r.rewards["correct_answer"] for r in ros] == pytest.approx([0.8, 1.0, 0.0])
    assert all(not r.errors and r.termination == Termination.FINISHED for r in ros)
    prompt = engines["judge"].prompts[0]
    for part in ("<conversation>", "[user]\nWhat is 2+3?", "<final_answer>\nThe answer is 5.", "Correct answer",
                 '"score"'):
        assert part in prompt
    m = ros[0].metrics
    assert m["judge/requests"] == 1 and m["judge/prompt_tokens"] > 0 and m["judge/completion_tokens"] > 0
    assert m["judge/latency"] > 0
    st = judge.stats()
    assert (st["calls"], st["requests"], st["errors"], st["cache_hits"]) == (3, 3, 0, 0)
    assert st["prompt_tokens"] == sum(r.metrics["judge/prompt_tokens"] for r in ros)
    assert 0 < st["latency_mean"] <= st["latency_max"]


def test_score_map_levels_are_listed_in_the_prompt_and_replies_snap_to_them(server, engines):
    judge = make_judge(server)
    graded = Rubric("Quality", "How good is it?", score_map={"poor": 0, "ok": 0.5, "great": 1})
    ros = score([rollout('{"reasoning": "r", "score": "great"}'), rollout('{"reasoning": "r", "score": 0.6}'),
                 rollout('{"reasoning": "r", "score": 0.2}')], [judge.reward(graded)])
    assert [r.rewards["quality"] for r in ros] == [1.0, 0.5, 0.0]
    assert '"ok" (0.5)' in engines["judge"].prompts[0]


def test_negative_rubric_scores_the_fault_and_is_subtracted_from_the_total(server, engines):
    judge = make_judge(server)
    ro = rollout('{"reasoning": "it wanders", "score": 0.75}', ground_truth=5)
    score([ro], judge.rewards([RAMBLING]) + [Reward(lambda r: 1.0, name="format")])
    assert ro.rewards == {"rambling_off_topic": 0.75, "format": 1.0}
    assert ro.reward == pytest.approx(1.0 - 0.75)
    prompt = engines["judge"].prompts[0]
    assert 'kind="negative"' in prompt and "the fault is clearly present" in prompt
    assert "<reference>\n5\n</reference>" in prompt


def test_ranking_of_4_siblings_maps_best_to_1_and_worst_to_0_in_one_call(server, engines):
    judge = make_judge(server)
    ros = [rollout(answer=f"Answer with quality {q}.", group_index=i) for i, q in enumerate([2, 9, 5, 0])]
    score(ros, [judge.ranking("Helpfulness", "Which answer helps most?")])
    assert [r.rewards["helpfulness"] for r in ros] == pytest.approx([1 / 3, 1.0, 2 / 3, 0.0])
    assert engines["judge"].calls == 1 and judge.stats()["requests"] == 1
    assert all(r.metrics["judge/requests"] == 0.25 for r in ros)  # one shared call, a quarter each
    assert "## Candidate 4\n[assistant]\nAnswer with quality 0." in engines["judge"].prompts[0]


def test_identical_calls_reach_the_server_once_until_the_cache_is_cleared(server, engines):
    judge = make_judge(server)
    reward = judge.reward(CORRECT)
    reply = '{"reasoning": "good", "score": 0.9}'
    twins = score([rollout(reply, group_index=0), rollout(reply, group_index=1)], [reward])  # in flight together
    again = score([rollout(reply)], [reward])  # another event loop, same cache
    assert [r.rewards["correct_answer"] for r in twins + again] == [0.9, 0.9, 0.9]
    assert engines["judge"].calls == 1
    st = judge.stats()
    assert (st["calls"], st["cache_hits"]) == (1, 2)
    assert sum(r.metrics.get("judge/cache_hits", 0) for r in twins) == 1 and again[0].metrics["judge/cache_hits"] == 1
    judge.clear_cache()
    score([rollout(reply)], [reward])
    assert engines["judge"].calls == 2
    judge.cache_ttl = 1e-9  # entries older than the TTL are asked again
    score([rollout(reply)], [reward])
    assert engines["judge"].calls == 3


def test_max_concurrency_bounds_the_requests_in_flight(server, engines):
    judge = make_judge(server, "paced", max_concurrency=2)
    ros = [rollout(f'{{"reasoning": "r{i}", "score": 0.5}}', group_index=i) for i in range(6)]
    t0 = time.perf_counter()
    score(ros, [judge.reward(CORRECT)])
    assert all(r.rewards["correct_answer"] == 0.5 for r in ros)
    assert engines["paced"].max_active == 2 and engines["paced"].calls == 6
    assert time.perf_counter() - t0 >= 3 * 0.2


# -- failures score 0, are recorded, and leave the rest alone ---------------------------------------------

def test_unparsable_reply_is_retried_then_scores_0_with_the_error_and_siblings_scored(server, engines):
    judge = make_judge(server, retries=2)
    bad, good = rollout("I would rather not say."), rollout('{"reasoning": "fine", "score": 0.6}', group_index=1)
    score([bad, good], [judge.reward(CORRECT), Reward(lambda r: 1.0, name="format")])
    assert bad.rewards == {"correct_answer": 0.0, "format": 1.0} and bad.termination == Termination.REWARD_ERROR
    (where, message), = errors(bad)
    assert where == "reward:correct_answer" and "JudgeError" in message and "no score" in message
    assert engines["judge"].calls == 4  # 3 attempts for the bad reply, 1 for the good one
    assert bad.metrics["judge/errors"] == 1 and bad.metrics["judge/requests"] == 3
    assert good.rewards["correct_answer"] == 0.6 and not good.errors and good.termination == Termination.FINISHED
    st = judge.stats()
    assert (st["errors"], st["retries"]) == (1, 2)


def test_unknown_judge_model_fails_at_once_without_retries(server, engines):
    judge = make_judge(server, "no-such-model", retries=3)
    ro, = score([rollout('{"score": 1}')], [judge.reward(CORRECT)])
    assert ro.rewards["correct_answer"] == 0.0 and "NotFoundError" in errors(ro)[0][1]
    assert judge.stats()["requests"] == 1


def test_server_down_scores_0_with_the_error_quickly():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = Judge("judge", f"http://127.0.0.1:{port}/v1", timeout=1.0, retries=1, backoff=0.01)
    t0 = time.perf_counter()
    ros = score([rollout('{"score": 1}'), rollout('{"score": 1}', answer="6")],
                [judge.reward(CORRECT), judge.ranking("Best", "Which is best?"), Reward(lambda r: 1.0, name="format")])
    assert time.perf_counter() - t0 < 5
    for ro in ros:
        assert ro.rewards == {"correct_answer": 0.0, "best": 0.0, "format": 1.0}
        assert {w for w, _ in errors(ro)} == {"reward:correct_answer", "reward:best"}
        assert all("APIConnectionError" in m for _, m in errors(ro))
    assert judge.stats()["errors"] == 3 and judge.stats()["requests"] == 6


def test_slow_judge_times_out_to_0_after_timeout_not_after_the_reply(server, engines):
    judge = make_judge(server, "slow", timeout=0.3, retries=1)
    t0 = time.perf_counter()
    ro, = score([rollout('{"score": 1}')], [judge.reward(CORRECT)])
    assert time.perf_counter() - t0 < 1.8  # the reply would take 2 s
    assert ro.rewards["correct_answer"] == 0.0 and "no reply within 0.3s" in errors(ro)[0][1]
    assert judge.stats()["requests"] == 2


def test_reward_timeout_on_a_shared_in_flight_call_fails_both_twins_without_hanging(server, engines):
    judge = make_judge(server, "slow", timeout=5)
    reply = '{"reasoning": "r", "score": 1}'
    t0 = time.perf_counter()
    twins = score([rollout(reply), rollout(reply, group_index=1)], [judge.reward(CORRECT, timeout=0.3)])
    assert time.perf_counter() - t0 < 1.8  # the reply would take 2 s
    for ro in twins:
        assert ro.rewards["correct_answer"] == 0.0 and ro.termination == Termination.REWARD_ERROR
        assert ro.errors[0].where == "reward:correct_answer"
    assert judge.stats()["calls"] == 1 and judge._inflight == {}


def test_a_timed_out_judge_in_run_groups_zeroes_only_that_siblings_component(server, engines):
    answers = iter(["5\nverdict: {\"reasoning\": \"right\", \"score\": 0.9}",
                    "5 dawdle\nverdict: {\"reasoning\": \"right\", \"score\": 0.9}",
                    "6\nverdict: {\"reasoning\": \"wrong\", \"score\": 0.1}"])
    judge = make_judge(server, "gated", timeout=0.3)
    env = Environment(rewards=[judge.reward(CORRECT), Reward(lambda r: float(bool(r.completion)), name="answered")])
    sampler = Sampler(ScriptedPolicy(RENDERER, lambda prompt, turn: next(answers)), RENDERER)
    t0 = time.perf_counter()
    group, = asyncio.run(env.run_groups([{"prompt": "What is 2+3?", "ground_truth": "5"}], sampler, 3))
    assert time.perf_counter() - t0 < 1.8  # the reply would take 2 s
    by = {ro.completion.split("\n")[0]: ro for ro in group.rollouts}
    slow = by["5 dawdle"]
    assert slow.rewards == {"correct_answer": 0.0, "answered": 1.0} and slow.termination == Termination.REWARD_ERROR
    assert "TimeoutError" in errors(slow)[0][1]
    assert (by["5"].rewards["correct_answer"], by["6"].rewards["correct_answer"]) == (0.9, 0.1)
    assert all(not by[k].errors and by[k].termination == Termination.FINISHED for k in ("5", "6"))


# -- the tiny random model on the real HF engine ----------------------------------------------------------

@pytest.fixture(scope="module")
def hf_server(tiny_model_dir):
    try:
        import rlft.engines.hf  # noqa: F401
    except Exception as e:  # noqa: BLE001 - being finalized elsewhere
        pytest.skip(f"rlft.engines.hf is not importable: {type(e).__name__}: {e}")
    path = tiny_model_dir
    with BackgroundServer(create_app(path, dtype="float32", device="cpu", preload=True)) as srv:
        yield srv, path


def test_tiny_random_model_replies_are_unparsable_so_its_component_is_0_and_the_step_goes_on(hf_server):
    srv, path = hf_server
    judge = Judge(path, srv.url + "/v1", max_tokens=16, retries=0, timeout=60)
    ros = score([rollout(), rollout(answer="The answer is 6.", group_index=1)],
                [judge.reward(CORRECT), Reward(lambda r: 1.0, name="format")])
    for ro in ros:
        assert ro.rewards == {"correct_answer": 0.0, "format": 1.0}
        (where, message), = errors(ro)
        assert where == "reward:correct_answer" and "no score in the judge's reply" in message
        assert ro.metrics["judge/completion_tokens"] > 0
    assert judge.stats()["errors"] == 2
