"""The minimal loop (rlft.training.minimal) learns: held-out reward of the pretrained tiny model
rises by the same margin the full loop's learning test asks for (tests/test_learning.py)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

MARGIN = 0.25


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_minimal_loop_improves_heldout_reward_of_the_pretrained_tiny_model(one_thread):
    from rlft.testing.pretrained import build_pretrained_tiny, task_environment
    from rlft.training.minimal import minimal_train

    env, rows = task_environment("max", n=512)
    result = minimal_train(env, rows[128:], rows[:128], model=build_pretrained_tiny(task="max", seed=0),
                           steps=20, max_seq_len=128, log=lambda line: None)
    before, after = result.eval_before["reward/mean"], result.eval_after["reward/mean"]
    print(f"\nminimal loop: held-out reward {before:.3f} -> {after:.3f}")
    assert after - before >= MARGIN, f"held-out reward {before:.3f} -> {after:.3f}"
    assert len(result.steps) == 20 and sum(m["optim/grad_norm"] > 0 for m in result.steps) >= 15
