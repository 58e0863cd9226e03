"""ScriptedPolicy: an Engine that replays scripted assistant turns, for tests with no model.

``ScriptedPolicy`` is an Engine that replays assistant messages you write, so an environment's
tools, rewards and multi-turn control can be unit-tested with no model at all. Its tokens are
real tokens of the given tokenizer (the text plus the end-of-turn token), so everything
downstream (parsing, token masks, the run store) runs exactly as in training.
Left out: real models (``rlft.testing.models`` and ``rlft.testing.pretrained`` build tiny ones).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from rlft.engines.base import Sample, SamplingParams
from rlft.renderer import Renderer

Script = Sequence[str] | Callable[[str, int], str]


class ScriptedPolicy:
    """Replays scripted assistant turns.

    ``script`` is a list (turn i of every rollout answers with ``script[i]``; the last entry
    repeats) or a function ``(prompt_text, turn) -> str`` for replies that depend on the prompt.
    Every reply ends with the end-of-turn token, as a real model's would; ``max_new_tokens``
    truncates it (finish_reason "length"). ``delay`` seconds simulate generation latency.
    """

    def __init__(self, renderer: Renderer, script: Script, *, logprob: float = -1.0, delay: float = 0.0):
        self.renderer = renderer
        self.script = script
        self.logprob = logprob
        self.delay = delay
        self.policy_version = 0
        self.calls = 0
        gen = renderer.render_text([{"role": "user", "content": "x"}], add_generation_prompt=True)
        plain = renderer.render_text([{"role": "user", "content": "x"}])
        self._gen_prompt = gen[len(plain):] if gen.startswith(plain) else gen[-20:]

    def _turn(self, prompt_text: str) -> int:
        return max(prompt_text.count(self._gen_prompt) - 1, 0) if self._gen_prompt else 0

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Sample:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        prompt_text = self.renderer.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        turn = self._turn(prompt_text)
        if callable(self.script):
            text = self.script(prompt_text, turn)
        else:
            text = self.script[min(turn, len(self.script) - 1)]
        tokens = self.renderer.encode(text) + self.renderer.eos_token_ids[:1]
        finish = "stop"
        if len(tokens) > params.max_new_tokens:
            tokens, finish = tokens[: params.max_new_tokens], "length"
        return Sample(tokens=tokens, logprobs=[self.logprob] * len(tokens), finish_reason=finish,
                      policy_version=self.policy_version)


__all__ = ["ScriptedPolicy"]
