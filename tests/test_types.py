"""Core types: termination reasons are one documented enum; rollout conveniences."""

from rlft.types import Rollout, Termination


def test_every_termination_reason_has_its_own_docstring():
    docs = [t.__doc__ for t in Termination]
    assert all(d and d != Termination.__doc__ for d in docs)
    assert len(set(docs)) == len(docs)
    assert Termination("finished") is Termination.FINISHED and str(Termination.LENGTH) == "length"


def test_rollout_completion_is_the_last_assistant_text():
    ro = Rollout(example={"prompt": "q", "ground_truth": 3}, messages=[
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "first"},
        {"role": "tool", "content": "r"}, {"role": "assistant", "content": "final"}])
    assert ro.completion == "final" and ro.ground_truth == 3 and len(ro.tool_messages) == 1
    assert Rollout(example={}).completion == ""
