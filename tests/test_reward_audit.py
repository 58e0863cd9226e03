"""The reward audit of ``rlft validate``: each flag fires on components that have the problem and
not on ones that do not (synthetic rollouts; the CLI prints it, tests/test_cli.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rlft.health.audit import audit_rewards, audit_table, reward_weights
from rlft.rewards import Reward


def ro(**rewards):
    return SimpleNamespace(rewards=rewards, reward=0.0)


def groups_of(rows, weights, size=2):
    for r in rows:
        r.reward = sum(weights.get(k, 1.0) * v for k, v in r.rewards.items())
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def audit(rows, weights, judges=()):
    a = audit_rewards(groups_of(rows, weights), weights, judges)
    return {c.name: c for c in a.components}, a


def test_constant_and_always_zero_components_are_flagged_and_a_varying_one_is_not():
    rows = [ro(correct=float(i % 2), fmt=1.0, bonus=0.0) for i in range(8)]
    c, a = audit(rows, {"correct": 1.0, "fmt": 0.2, "bonus": 0.5})
    assert c["fmt"].flags == ["constant"] and c["bonus"].flags == ["always zero"] and c["correct"].flags == []
    assert c["correct"].variance_share == pytest.approx(1.0) and c["correct"].corr_total == pytest.approx(1.0)
    assert len(a.warnings) == 2


def test_a_component_duplicating_another_is_flagged():
    vals = [0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    noise = [0.3, 0.1, 0.9, 0.5, 0.2, 0.8, 0.4, 0.6]
    rows = [ro(correct=v, format_ok=v, effort=n) for v, n in zip(vals, noise)]
    c, _ = audit(rows, {"correct": 1.0, "format_ok": 0.2, "effort": 0.5})
    assert "duplicate" in c["format_ok"].flags and c["format_ok"].corr["correct"] == pytest.approx(1.0)
    assert "duplicate" not in c["effort"].flags


def test_variance_shares_sum_to_one_and_a_tiny_share_is_flagged():
    rows = [ro(correct=float(i % 2), style=0.1 * ((i // 2) % 2)) for i in range(8)]
    c, _ = audit(rows, {"correct": 1.0, "style": 0.05})
    assert c["correct"].variance_share + c["style"].variance_share == pytest.approx(1.0)
    assert "small share" in c["style"].flags and "small share" not in c["correct"].flags


def test_a_penalty_with_a_positive_weight_is_flagged_and_a_negative_one_is_not():
    rows = [ro(correct=float(i % 2), length_penalty=0.1 * i) for i in range(8)]
    c, _ = audit(rows, {"correct": 1.0, "length_penalty": 0.5})
    assert "sign" in c["length_penalty"].flags
    c, _ = audit(rows, {"correct": 1.0, "length_penalty": -0.5})
    assert "sign" not in c["length_penalty"].flags


def test_a_judge_that_scores_siblings_alike_is_flagged():
    # the judge varies across prompts (0.2 vs 0.8) but never within a group: it cannot rank siblings
    rows = [ro(correct=float(i % 2), quality=0.2 if (i // 2) % 2 else 0.8) for i in range(8)]
    c, _ = audit(rows, {"correct": 1.0, "quality": 1.0}, judges={"quality"})
    assert "judge flat" in c["quality"].flags and c["quality"].judge_group_std == 0
    spread = [ro(correct=float(i % 2), quality=0.1 * i) for i in range(8)]
    c, _ = audit(spread, {"correct": 1.0, "quality": 1.0}, judges={"quality"})
    assert "judge flat" not in c["quality"].flags


def test_weights_come_from_the_rewards_and_a_dict_reward_gives_its_weight_to_its_keys():
    def correct(r):
        return 1.0

    def checks(r):
        return {"a": 1.0, "b": 0.0}

    rows = [ro(correct=1.0, a=1.0, b=0.0)]
    weights, judges = reward_weights([Reward(correct), Reward(checks, weight=0.3)], rows)
    assert weights == {"correct": 1.0, "checks": 0.3, "a": 0.3, "b": 0.3} and judges == set()


def test_the_table_has_a_row_per_component_with_its_flags():
    rows = [ro(correct=float(i % 2), fmt=1.0) for i in range(4)]
    headers, table = audit_table(audit_rewards(groups_of(rows, {}), {}))
    assert headers[0] == "component" and [r[0] for r in table] == ["correct", "fmt"]
    assert table[1][-1] == "constant" and table[0][-1] == "ok"
