"""Demonstration-guided groups (LUFFY, arXiv 2504.14945): a group in which no rollout succeeded
gets its row's demonstration as one member, trained off-policy.

A group whose G rollouts all fail has equal (or nearly equal, failing) rewards: GRPO has nothing to
reinforce there, and a model that never calls its tools stays where it is. LUFFY mixes off-policy
traces into such groups, so the group's best member is one that solved the task. With
``guidance = "demonstrate"`` rlft does this with the environment's own ``demonstrate(example)``:

- after a step's sampling, each group with no success (every reward <= ``success_threshold``) gets its
  row's demonstration played through the environment (tools run on the scripted calls, rewards
  score the result: :func:`rlft.sft.demonstrations.play`). A demonstration that does not succeed
  itself, or whose row has none, is not used (its reason is logged);
- the played transcript becomes tokens exactly as the warm-up renders it (the rollouts' renderer,
  tool format and parser: :func:`rlft.sft.transcripts.render_transcript`) and replaces the group's
  last sampled member, keeping its ``group_index``: the group keeps G members and its advantages
  are computed with the demonstration in it, as LUFFY computes them over the mixed group;
- its tokens were not sampled, so they have no behaviour logprobs. The update takes their
  importance ratio as pi_theta itself (behaviour probability 1, as LUFFY does), shaped as
  f(p) = p / (p + gamma) and not clipped (:func:`rlft.training.grpo.shaped_objective`,
  ``guidance_gamma``, LUFFY's 0.1): the gradient goes to the demonstration tokens the policy finds
  unlikely, not to those it already takes;
- the demonstration is stored with the step's rollouts (``Rollout.demonstration``, and
  ``metrics["demonstration"] = 1`` in the store); the sample it replaced is not stored (it failed
  like its stored siblings). ``batch/guided_groups`` counts the guided groups of each step.

Only the step's own train groups are guided (the loop never guides eval groups), so held-out rows
never become demonstrations. Guidance fades by itself: a group with one success gets none.
Left out: several demonstrations per group (LUFFY's N_off > 1), demonstrations from a transcripts
file or a teacher (only ``demonstrate``), and a schedule that anneals the shaping.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rlft.config import ConfigError
from rlft.sft.transcripts import SFTExample
from rlft.types import Group, Rollout


@dataclass
class Guidance:
    """What guiding one step's groups did: groups that got a demonstration, and why others did not."""

    groups: int = 0
    problems: list[str] = field(default_factory=list)


def check_guidance(env: Any) -> None:
    """``guidance = "demonstrate"`` needs an environment that can demonstrate: said before step 1."""
    if env.demonstrate is None:
        raise ConfigError(f"guidance = \"demonstrate\": environment {env.name!r} has no demonstrate function; pass "
                          "Environment(..., demonstrate=fn), where fn(example) returns the assistant's turns")


def unsolved(groups: list[Group], success_threshold: float) -> list[Group]:
    """The groups in which no rollout succeeded (reward > ``success_threshold`` is a success)."""
    return [g for g in groups if g.rollouts and all(r.reward <= success_threshold for r in g.rollouts)]


async def guide_groups(env: Any, groups: list[Group], renderer: Any, *, success_threshold: float,
                       policy_version: int, max_concurrency: int = 16) -> Guidance:
    """Put a played demonstration into each unsolved group of ``groups`` (in place: it replaces the
    group's last member)."""
    from jinja2.exceptions import TemplateError

    from rlft.sft.demonstrations import play
    from rlft.sft.transcripts import NotPrefixStable, ToolCallsNotParsed, render_transcript

    out = Guidance()
    todo = unsolved(groups, success_threshold)
    if not todo:
        return out
    demos = await play(env, [g.example for g in todo], example_ids=[g.example_id for g in todo],
                       max_concurrency=max_concurrency)
    out.problems += demos.problems
    played = {t.meta["example_id"]: (t, ro) for t, ro in zip(demos.transcripts, demos.played)}
    for g in todo:
        if g.example_id not in played:
            continue
        transcript, episode = played[g.example_id]
        if episode.reward <= success_threshold:
            out.problems.append(f"demonstrate(example {g.example_id}): scored {episode.reward:.3f}, not above "
                                f"success_threshold {success_threshold:g}: not a success, not used as guidance")
            continue
        try:
            tokens = render_transcript(renderer, transcript, index=g.example_id)
        except (NotPrefixStable, ToolCallsNotParsed, TemplateError) as e:
            out.problems.append(f"demonstrate(example {g.example_id}): {e}")
            continue
        g.rollouts[-1] = as_member(episode, tokens, g.rollouts[-1], policy_version)
        out.groups += 1
    return out


def as_member(episode: Rollout, tokens: SFTExample, replaced: Rollout, policy_version: int) -> Rollout:
    """The played demonstration as a group member in ``replaced``'s place: its rendered tokens
    (prompt, then the conversation with the assistant tokens masked in), logprobs 0 (none sampled)."""
    p = tokens.prompt_len
    return dataclasses.replace(
        episode, example=replaced.example, example_id=replaced.example_id, group_index=replaced.group_index,
        prompt_ids=tokens.ids[:p], completion_ids=tokens.ids[p:], mask=tokens.mask[p:],
        logprobs=[0.0] * (len(tokens.ids) - p), policy_version=policy_version, demonstration=True,
        prompt_text=replaced.prompt_text, state={}, metrics={**episode.metrics, "demonstration": 1.0})


__all__ = ["Guidance", "as_member", "check_guidance", "guide_groups", "unsolved"]
