"""A tiny model that already half-knows a task: the smallest honest test that RL learns.

``build_pretrained_tiny(task="max")`` makes a small Llama-style model with the tiny ChatML
tokenizer (:mod:`rlft.testing.models`) and SFT-pretrains it in plain PyTorch on synthetic chats
rendered with the tokenizer's own chat template, through :class:`rlft.renderer.Renderer` (so it
learns exactly the tokens a rollout renders and samples). It returns a directory that
``AutoModelForCausalLM.from_pretrained`` and :func:`rlft.policy.load_policy` load.

The task (``TASKS["max"]``): "max of 3 8 1 5" -> "8", reward 1 when the last number of the
reply is the largest. The SFT runs in two phases: right answers only (the model learns the task
in a few dozen steps), then noisy answers, right with probability ``p_correct`` and otherwise
another number of the list. The saved model follows the chat format and answers with a number,
and is right about 30% of the time at temperature 1 while the right answer stays its most likely
one: GRPO on the final answer has a clear improvement to find in a few steps (measured with
``tests/test_learning.py``: held-out reward ~0.28 -> ~0.83 in 20 steps, seconds on a CPU).

``tools=True`` adds chats that offer a ``max_of`` tool and answer with a Hermes
``<tool_call>{json}</tool_call>``, a tool turn and the final answer, for tests of tool-calling
rollouts (see ``TOOLS_RECIPE`` for how well that is learned).

Deterministic in ``seed`` (data, initial weights, batch order). Built models are cached per
(task, seed, recipe, ``VERSION``, torch/transformers/tokenizers versions) under ``$RLFT_CACHE/tiny``
(default ``~/.cache/rlft/tiny``), so a test suite builds each once per machine and library
set. ``task_environment(task)`` gives the matching
``(Environment, rows)`` for ``train()``; RL rows never share a prompt with the SFT rows.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlft.env import Environment

__all__ = ["TASKS", "TinyTask", "build_pretrained_tiny", "task_environment", "cache_dir", "VERSION"]

VERSION = 1  # bump when the data, model shape or SFT recipe changes: invalidates the caches


# ---- the task ---------------------------------------------------------------------------------


def max_of(numbers: list[int]) -> int:
    """Return the largest of the numbers.

    Args:
        numbers: the numbers to compare.
    """
    return max(numbers)


def _last_int(text: str) -> str | None:
    found = re.findall(r"-?\d+", text or "")
    return found[-1] if found else None


def correct_answer(rollout) -> float:
    """1.0 when the last number of the final reply is the ground truth, else 0.0."""
    return float(_last_int(rollout.completion) == str(rollout.ground_truth))


@dataclass
class TinyTask:
    """A synthetic task: rows (``prompt``, ``ground_truth`` and extra fields), its reward, and
    the plausible wrong reply the noisy SFT data gives instead of the right one."""

    name: str
    system_prompt: str
    make_row: Callable[[random.Random], dict[str, Any]]
    wrong_answer: Callable[[dict[str, Any], random.Random], str]
    reward: Callable[[Any], float]
    tools: list[Callable[..., Any]] = field(default_factory=list)
    tool_answer: Callable[[dict[str, Any]], tuple[str, dict[str, Any], str]] | None = None  # (tool, args, result)
    max_tokens: int = 8  # rollout token budget without tools

    def rows(self, n: int, seed: int = 0, *, part: str = "rl") -> list[dict[str, Any]]:
        """``n`` distinct rows, deterministic in ``seed``. ``part="rl"`` rows (for training and
        evaluating with RL) and ``part="sft"`` rows (the pretraining data) never share a prompt."""
        if part not in ("rl", "sft"):
            raise ValueError(f"part must be 'rl' or 'sft', not {part!r}")
        if n > 10_000:
            raise ValueError(f"at most 10000 distinct rows, not {n}")
        rng, seen, out = random.Random(f"{self.name}-{part}-{seed}"), set(), []
        while len(out) < n:
            row = self.make_row(rng)
            p = row["prompt"]
            if p not in seen and (zlib.crc32(p.encode()) % 5 == 0) == (part == "rl"):
                seen.add(p)
                out.append(row)
        return out

    def noisy_answer(self, row: dict[str, Any], rng: random.Random, p_correct: float) -> str:
        return str(row["ground_truth"]) if rng.random() < p_correct else self.wrong_answer(row, rng)

    def environment(self, *, with_tools: bool = False, **kwargs: Any) -> Environment:
        opts = dict(system_prompt=self.system_prompt, rewards=[self.reward], max_tokens=self.max_tokens,
                    max_turns=1, name=f"tiny-{self.name}")
        if with_tools:
            opts.update(tools=list(self.tools), max_tokens=64, max_turns=3, max_tool_calls=2)
        opts.update(kwargs)
        return Environment(**opts)


def _max_row(rng: random.Random) -> dict[str, Any]:
    nums = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    return {"prompt": "max of " + " ".join(map(str, nums)), "numbers": nums, "ground_truth": str(max(nums))}


def _max_wrong(row: dict[str, Any], rng: random.Random) -> str:
    """Another number of the list (a plausible slip), or any other digit when all are equal."""
    top = max(row["numbers"])
    others = [x for x in row["numbers"] if x != top] or [x for x in range(10) if x != top]
    return str(rng.choice(others))


def _max_tool(row: dict[str, Any]) -> tuple[str, dict[str, Any], str]:
    return "max_of", {"numbers": list(row["numbers"])}, str(max(row["numbers"]))


TASKS: dict[str, TinyTask] = {
    "max": TinyTask(
        name="max", system_prompt="Reply with the largest number.", make_row=_max_row, wrong_answer=_max_wrong,
        reward=correct_answer, tools=[max_of], tool_answer=_max_tool),
}


def task_environment(task: str = "max", *, n: int = 512, seed: int = 0, with_tools: bool = False,
                     **env_kwargs: Any) -> tuple[Environment, list[dict[str, Any]]]:
    """``(Environment, rows)`` for ``train()``/``evaluate()``: ``n`` distinct rows (``prompt``,
    ``ground_truth``), none of them seen in pretraining. ``with_tools`` offers the task's tools
    (and allows 3 turns)."""
    t = _task(task)
    return t.environment(with_tools=with_tools, **env_kwargs), t.rows(n, seed)


def _task(task: str) -> TinyTask:
    if task not in TASKS:
        raise ValueError(f"unknown tiny task {task!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[task]


# ---- SFT data ---------------------------------------------------------------------------------


def _sft_chat(renderer, t: TinyTask, row: dict[str, Any], rng: random.Random, p_correct: float,
              schemas: list[dict] | None) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of one chat, rendered by :func:`rlft.sft.render_transcript` the way a
    rollout builds it: the rendered prompt, each assistant reply's tokens + end-of-turn token
    (mask 1), the rendered tool turn (mask 0). With ``schemas`` the reply is a tool call, and the
    answer after the tool turn is its result."""
    from rlft.sft import Transcript, render_transcript

    messages: list[dict[str, Any]] = [{"role": "system", "content": t.system_prompt},
                                      {"role": "user", "content": row["prompt"]}]
    if schemas:
        name, args, result = t.tool_answer(row)
        call = {"id": "call_0", "type": "function", "function": {"name": name, "arguments": args}}
        messages += [{"role": "assistant", "content": "", "tool_calls": [call]},
                     {"role": "tool", "content": result, "tool_call_id": "call_0", "name": name}]
        answer = result  # the tool is always right
    else:
        answer = t.noisy_answer(row, rng, p_correct)
    ex = render_transcript(renderer, Transcript(messages + [{"role": "assistant", "content": answer}], schemas))
    return ex.ids, ex.mask


def sft_data(task: str, n: int, seed: int, tokenizer, *, p_correct: float = 1.0,
             with_tools: bool = False) -> list[tuple[list[int], list[int]]]:
    """``n`` SFT chats as (ids, loss mask) on ``part="sft"`` rows: plain chats whose answer is
    right with probability ``p_correct``, or (``with_tools``) tool-call chats."""
    from rlft.renderer import Renderer
    from rlft.tools import tool

    t = _task(task)
    renderer = Renderer(tokenizer)
    schemas = [tool(f).schema() for f in t.tools] if with_tools else None
    if with_tools and not schemas:
        raise ValueError(f"task {task!r} has no tools")
    rng = random.Random(f"{task}-sft-{seed}-{p_correct}-{with_tools}")
    return [_sft_chat(renderer, t, row, rng, p_correct, schemas) for row in t.rows(n, seed, part="sft")]


# ---- build + cache ----------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where built models are cached: ``$RLFT_CACHE/tiny``, default ``~/.cache/rlft/tiny``."""
    root = os.environ.get("RLFT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "rlft") / "tiny"


# The recipe. Phase 1 (``clean_steps``): right answers only, so that the model learns the task
# fast (a clean signal; noisy labels from the start learn it several times slower). Phase 2
# (the remaining steps): answers right with probability ``p_correct``, otherwise another number
# of the list, which makes the model unsure: right ~30% of the time at temperature 1 while the
# right answer is still its most likely one. Tool chats are ~10x longer than plain ones, so they
# get their own smaller batches (every ``tool_every``-th step) instead of padding every batch.
SFT_DEFAULTS: dict[str, Any] = dict(
    hidden=128, layers=2, heads=4, kv_heads=2, steps=140, clean_steps=60, batch_size=64, lr=3e-3,
    examples=4000, p_correct=0.35, tool_every=0, tool_examples=1000, tool_batch_size=16)
# tools=True: a third of the steps are tool chats, and more steps (~60 s instead of ~20 s).
# Measured on seed 0 with the tool offered: 73% of rollouts open with a well-formed max_of call,
# but its arguments are mostly not the prompt's list (25% of rollouts get the right maximum
# back): enough to exercise tool-call plumbing, not a tool-use skill to learn from.
TOOLS_RECIPE: dict[str, Any] = dict(tool_every=3, steps=240, clean_steps=160)


def build_pretrained_tiny(out_dir: str | os.PathLike | None = None, *, task: str = "max", seed: int = 0,
                          tools: bool = False, cache: bool = True, verbose: bool = False, **recipe: Any) -> str:
    """Build (or take from the cache) the SFT-pretrained tiny model for ``task``; returns its dir.

    Loadable with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` and
    :func:`rlft.policy.load_policy`. Without ``out_dir`` the cached directory itself is returned
    (treat it as read-only); with it, the model is copied there. ``tools=True`` also teaches tool
    calls (see ``TOOLS_RECIPE``). ``recipe`` overrides ``SFT_DEFAULTS``; every distinct recipe is
    cached under its own key. ``cache=False`` builds straight into ``out_dir``."""
    _task(task)
    changes = {**(TOOLS_RECIPE if tools else {}), **recipe}
    unknown = sorted(set(changes) - set(SFT_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown recipe keys {unknown}; valid: {', '.join(SFT_DEFAULTS)}")
    full = {**SFT_DEFAULTS, **changes}
    recipe_tag = "".join(f"-{k}{v}" for k, v in sorted(changes.items()) if SFT_DEFAULTS[k] != v)
    key = f"{task}-s{seed}-v{VERSION}{recipe_tag}-{_libraries_tag()}"
    if not cache:
        if out_dir is None:
            raise ValueError("build_pretrained_tiny(cache=False) needs out_dir")
        _build(Path(out_dir), task, seed, full, verbose)
        return os.fspath(out_dir)
    target = cache_dir() / key
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
        try:
            _build(tmp, task, seed, full, verbose)
            os.replace(tmp, target)  # atomic; if a concurrent build won the race, ours is dropped
        except OSError:
            if not (target / "config.json").exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if out_dir is None:
        return str(target)
    shutil.copytree(target, out_dir, dirs_exist_ok=True)
    return os.fspath(out_dir)


def _libraries_tag() -> str:
    """A short hash of the library versions a build depends on. Another torch, transformers or
    tokenizers trains another model from the same recipe (different kernels and defaults), so a
    model cached under older versions is not the one a fresh clone would build: tests calibrated
    on such a stale model once passed here and failed from a clean machine."""
    import tokenizers
    import torch
    import transformers

    versions = f"torch{torch.__version__}-transformers{transformers.__version__}-tokenizers{tokenizers.__version__}"
    return f"{zlib.crc32(versions.encode()):08x}"


def _build(out: Path, task: str, seed: int, recipe: dict[str, Any], verbose: bool) -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from intra-op threads, and on busy shared
    try:                      # cores two spinning threads were measured ~20x slower than one
        _sft(out, task, seed, recipe, verbose)
    finally:
        torch.set_num_threads(threads)


def _sft(out: Path, task: str, seed: int, r: dict[str, Any], verbose: bool) -> None:
    import torch

    from rlft.testing.models import build_tiny_model

    t0 = time.perf_counter()
    model, tokenizer = build_tiny_model(seed=seed, hidden=r["hidden"], layers=r["layers"], heads=r["heads"],
                                        kv_heads=r["kv_heads"], max_positions=512)
    clean = sft_data(task, r["examples"], seed, tokenizer, p_correct=1.0)
    noisy = sft_data(task, r["examples"], seed + 1, tokenizer, p_correct=r["p_correct"])
    tool_chats = sft_data(task, r["tool_examples"], seed, tokenizer, with_tools=True) if r["tool_every"] else []
    pad = tokenizer.pad_token_id
    steps, warmup = r["steps"], max(1, r["steps"] // 20)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG is left alone
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], betas=(0.9, 0.98), weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / steps))
        model.train()
        for step in range(steps):
            data, size = (clean if step < r["clean_steps"] else noisy), r["batch_size"]
            if tool_chats and step % r["tool_every"] == 1:
                data, size = tool_chats, r["tool_batch_size"]
            batch = [data[i] for i in torch.randint(len(data), (size,), generator=gen).tolist()]
            L = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), L), pad, dtype=torch.long)
            attn = torch.zeros((len(batch), L), dtype=torch.long)
            labels = torch.full((len(batch), L), -100, dtype=torch.long)  # right-padded; loss on replies only
            for b, (x, m) in enumerate(batch):
                ids[b, : len(x)] = torch.tensor(x)
                attn[b, : len(x)] = 1
                labels[b, : len(x)] = torch.tensor([tok if keep else -100 for tok, keep in zip(x, m)])
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if verbose and (step % 20 == 0 or step == steps - 1):
                print(f"sft step {step + 1}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - t0:.1f}s)",
                      flush=True)
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "rlft_tiny.json").write_text(json.dumps(
        {"task": task, "seed": seed, "version": VERSION, "recipe": r,
         "build_s": round(time.perf_counter() - t0, 1)}) + "\n")
