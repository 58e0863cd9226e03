"""Every threshold of the training-health diagnoses, in one place, with what it means.

Values are on the scale of the stored metrics: rewards and shares in [0, 1] (a reward on another
scale makes the absolute reward thresholds too strict or too loose; docs/health.md says so),
entropy in nats per sampled token, logprob differences in nats per token. Windows: a diagnosis
that compares "early" with "late" takes the first and last ``WINDOW_FRACTION`` of the steps (at
least ``WINDOW_MIN`` points each). ``docs/health.md`` documents each finding with these numbers
(a test checks that every value below is named there). Left out: the diagnoses
(``rlft.health.diagnoses``).
"""

from __future__ import annotations

MIN_STEPS = 5  # trend diagnoses stay silent before this many training steps
WINDOW_FRACTION = 0.25  # early/late windows: this share of the steps...
WINDOW_MIN = 2  # ...but at least this many points

THRESHOLDS: dict[str, dict[str, float]] = {
    # reward and pass@k both move less than flat_range over the whole run, and at least tied_share
    # of the groups (on average) have identical rewards for every rollout: GRPO gets no gradient
    "no_signal": {"flat_range": 0.05, "tied_share": 0.5},
    # late-minus-early mean reward >= reward_rise (0.1 is within the noise of a 4 x 4 batch) while
    # pass@k moves <= pass_flat and stays below pass_ceiling (above it most prompts are within reach,
    # and reward rising with pass@k flat is the healthy sharpening of pass@k into pass@1: the tiny
    # run that learns has pass@8 0.85-0.95)
    "exploiting_subset": {"reward_rise": 0.2, "pass_flat": 0.02, "pass_ceiling": 0.7},
    # one reward component rises >= component_rise while another falls >= component_fall; or train
    # reward rises >= train_rise while the held-out reward falls >= eval_fall (first to last eval)
    "reward_hacking": {"component_rise": 0.1, "component_fall": 0.05, "train_rise": 0.1, "eval_fall": 0.1},
    # late entropy <= ratio x early entropy while the reward gained < reward_gain (a policy that gets
    # sure of itself *as it gets right* is learning, not collapsing: the healthy tiny run goes
    # 0.80 -> 0.25 nats with reward 0.2 -> 0.9); or late entropy <= floor nats/token whatever the reward
    "entropy_collapse": {"ratio": 0.4, "reward_gain": 0.1, "floor": 0.02},
    # late truncated share >= share and risen >= rise since the start; or late share >= high
    "truncation": {"share": 0.2, "rise": 0.1, "high": 0.5},
    # late share of rollouts with errors (or a failure termination) >= share and risen >= rise; or >= high
    "errors": {"share": 0.1, "rise": 0.05, "high": 0.5},
    # late sampler/trainer logprob difference >= level; or >= min_level and >= growth x the early one
    "logprob_mismatch": {"level": 0.1, "min_level": 0.02, "growth": 3.0},
    # the mean reward of the last flat_steps steps is at most flat_delta above that of the flat_steps
    # before them, after it rose >= rise from the first window to those, and is below ceiling x the
    # best reward/max (a plateau at the top is done, not stalled); needs 2 x flat_steps steps
    "learning_stalled": {"flat_steps": 10, "flat_delta": 0.03, "rise": 0.1, "ceiling": 0.9},
    # the environment offers tools, after min_steps steps the mean of valid tool calls per rollout is
    # <= max_calls; critical when the reward rose >= rise meanwhile (partial credit without tools)
    "tools_never_used": {"min_steps": 3, "max_calls": 0.0, "rise": 0.1},
    # share of steps whose update trained on no sequence at all (every group tied) >= share
    "trained_on_nothing": {"share": 0.2, "min_steps": 5},
}

__all__ = ["MIN_STEPS", "THRESHOLDS", "WINDOW_FRACTION", "WINDOW_MIN"]
