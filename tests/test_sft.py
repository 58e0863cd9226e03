"""rlft sft (the trainer half of issue #14) on the tiny models: the masked loss, accumulation,
a real learning test (demonstrations of a tool call teach the call), eval loss and early stopping,
checkpoints an RL run starts from, the run kind in the store, and the command line."""

import json
import sqlite3

import pytest
import torch

from rlft.cli import main
from rlft.sft.loss import collate, eval_loss, masked_loss_sum, micro_batches, train_step, trained_tokens
from rlft.sft.trainer import SFT_KEYS
from rlft.store import RunStore
from rlft.testing.pretrained import TASKS

TASK = TASKS["max"]


# tiny models on one thread (conftest.one_thread); tiny_model_dir: the random tiny model,
# pretrained_tiny_dir: the tiny model SFT-trained on the "max" task without tool calls
pytestmark = pytest.mark.usefixtures("one_thread")


def _schemas():
    from rlft.tools import tool

    return [tool(f).schema() for f in TASK.tools]


def tool_demo(row):
    """A transcript demonstrating the max_of tool call, its result and the final answer."""
    name, args, result = TASK.tool_answer(row)
    call = {"id": "call_0", "type": "function", "function": {"name": name, "arguments": args}}
    return {"messages": [{"role": "system", "content": TASK.system_prompt}, {"role": "user", "content": row["prompt"]},
                         {"role": "assistant", "content": "", "tool_calls": [call]},
                         {"role": "tool", "content": result, "tool_call_id": "call_0", "name": name},
                         {"role": "assistant", "content": result}],
            "tools": _schemas()}


def write_demos(path, rows):
    path.write_text("".join(json.dumps(tool_demo(r)) + "\n" for r in rows))
    return str(path)


def _policy(model, dtype="float32", lora=False):
    from rlft.policy import LoraSpec, load_policy

    return load_policy(model, dtype=dtype, lora=LoraSpec(rank=4) if lora else None)


def _seqs(policy, n=6, seed=0):
    """(ids, mask) of n rendered tool demonstrations, as the trainer sees them."""
    from rlft.renderer import Renderer
    from rlft.sft.transcripts import load_transcripts, render_transcripts

    examples, problems = render_transcripts(Renderer(policy.tokenizer),
                                            load_transcripts([tool_demo(r) for r in TASK.rows(n, seed, part="sft")]))
    assert not problems
    return [(e.ids, e.mask) for e in examples]


def _reference_loss_sum(policy, ids, mask):
    """Sum of -log p over mask-1 targets from the model's own full (L, V) logits."""
    with torch.no_grad():
        logits = policy.model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float(-(logp * torch.tensor(mask[1:], dtype=torch.float32)).sum())


# ---- the loss -----------------------------------------------------------------------------------


def test_loss_is_the_full_logits_cross_entropy_on_mask_1_tokens_only(tiny_model_dir):
    policy = _policy(tiny_model_dir)
    seqs = _seqs(policy, n=3)
    ids, mask = seqs[0]
    assert 0 < trained_tokens(mask) < len(ids) - 1
    with torch.no_grad():
        got = float(masked_loss_sum(policy, *collate([(ids, mask)], 0)))
    assert got == pytest.approx(_reference_loss_sum(policy, ids, mask), rel=1e-5)

    # a mask-0 token after the last trained one, and the padding of a longer row beside it: no effect
    last = max(i for i, m in enumerate(mask) if m)
    changed = list(ids)
    for i in range(last + 1, len(ids)):
        changed[i] = (ids[i] + 7) % len(policy.tokenizer)
    changed += [5, 6, 7]
    mask_more = list(mask) + [0, 0, 0]
    longer = ([1] * (len(ids) + 20), [0] * (len(ids) + 20))  # trains nothing, pads row 0 by 23 tokens
    with torch.no_grad():
        again = float(masked_loss_sum(policy, *collate([(changed, mask_more), longer], 0)))
    assert again == pytest.approx(got, rel=1e-5)
    # and a mask-0 token's *target* is not trained on: flipping mask on it changes the loss
    first_masked = mask.index(1)
    with torch.no_grad():
        more = float(masked_loss_sum(policy, *collate([(ids, [1 if i == first_masked - 1 else m
                                                               for i, m in enumerate(mask)])], 0)))
    assert more != pytest.approx(got, rel=1e-6)


def test_a_bf16_step_runs_the_packed_rows_kernel_and_gives_the_dense_attention_loss_and_gradients(tiny_model_dir,
                                                                                                   monkeypatch):
    """bf16 on the CPU: right-padded rows go through rlft.packed_attention (each token sees its row
    up to itself) in every layer; the loss and LoRA gradients equal those of the dense causal mask
    (the kernel refused) within bf16 noise."""
    from rlft import packed_attention
    from rlft.policy import LoraSpec, load_policy

    if packed_attention.packed_attention_kernel() is None:
        pytest.skip("the packed-attention kernel does not build here (rlft doctor says why)")
    policy = load_policy(tiny_model_dir, dtype="bfloat16", lora=LoraSpec(rank=4))
    with torch.no_grad():  # non-zero adapters: the LoRA gradient of A is 0 while B is 0
        gen = torch.Generator().manual_seed(0)
        for p in policy.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    seqs = _seqs(policy, n=3)
    ids, attn, mask = collate(seqs, 0)
    assert (attn == 0).any()  # rows of different lengths: right padding
    from rlft.training.update import training_precision

    calls = []
    real = packed_attention._PackedAttention.apply
    monkeypatch.setattr(packed_attention._PackedAttention, "apply", lambda *a: calls.append(1) or real(*a))
    results = {}
    for kernel in (True, False):
        if not kernel:  # the kernel refused: rlft attention's dense causal path
            monkeypatch.setattr(packed_attention, "packed_attention_kernel", lambda: None)
        policy.model.zero_grad(set_to_none=True)
        with training_precision(policy, True):
            loss = masked_loss_sum(policy, ids, attn, mask)
        loss.backward()
        results[kernel] = (float(loss), [p.grad.float().clone() for p in policy.trainable_parameters()])
    assert len(calls) == policy.base_model.config.num_hidden_layers
    assert results[True][0] == pytest.approx(results[False][0], rel=2e-2)
    for a, b in zip(results[True][1], results[False][1]):  # bf16 noise of two summation orders
        assert float((a - b).abs().max()) <= 0.03 * float(b.abs().max()) + 1e-6


def test_micro_batches_cover_every_sequence_once_within_the_token_budget():
    lengths = [5, 40, 12, 12, 90, 3, 33, 8, 8, 8]
    groups = micro_batches(lengths, 64)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 64
    assert [lengths[g[0]] for g in groups] == sorted((lengths[g[0]] for g in groups), reverse=True)  # longest first


class _Capture(torch.optim.Optimizer):
    """An optimizer that changes nothing and records the gradients it is stepped with."""

    def __init__(self, params):
        super().__init__(params, {})
        self.grads = None

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]


def test_accumulated_micro_batches_give_the_one_batch_gradient(tiny_model_dir):
    policy = _policy(tiny_model_dir)
    seqs = _seqs(policy, n=6)
    lengths = [len(i) for i, _ in seqs]
    small = max(lengths)  # one sequence per micro-batch
    assert len(micro_batches(lengths, small)) == len(seqs)
    results = []
    for budget, chunk in ((10 ** 6, 10 ** 6), (small, 10 ** 6), (small, 7)):  # one batch; accumulated; + chunked head
        opt = _Capture(policy.trainable_parameters())
        st = train_step(policy, seqs, opt, micro_batch_tokens=budget, max_grad_norm=0, bf16=False, chunk_tokens=chunk)
        results.append((st, opt.grads))
    (one, g_one), *others = results
    ref = sum(_reference_loss_sum(policy, i, m) for i, m in seqs) / sum(trained_tokens(m) for _, m in seqs)
    assert one["loss"] == pytest.approx(ref, rel=1e-5)
    assert one["trained_tokens"] == sum(trained_tokens(m) for _, m in seqs)
    for st, grads in others:
        assert st["loss"] == pytest.approx(one["loss"], rel=1e-5)
        for a, b in zip(grads, g_one):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert max(float(g.abs().max()) for g in g_one) > 0


def _mixed_seqs(policy):
    """Tool demonstrations (one system prompt with the tool schemas), the same task without tools
    (another prefix), one transcript twice (a shared prefix reaching into the trained tokens) and
    one with nothing to train: what a step's batch can hold."""
    seqs = _seqs(policy, n=5)
    other = policy.tokenizer.encode("another system prompt entirely")
    plain = [(other + ids, [0] * (len(other) + len(ids) - 6) + [1] * 6) for ids, _ in _seqs(policy, n=2, seed=1)]
    return seqs + [seqs[0]] + plain + [(seqs[1][0], [0] * len(seqs[1][0]))]


def test_packed_shared_prefix_steps_give_the_plain_loss_and_gradients_and_forward_fewer_tokens(tiny_model_dir):
    policy = _policy(tiny_model_dir, lora=True)
    with torch.no_grad():  # non-zero adapters: the LoRA gradient of A is 0 while B is 0
        gen = torch.Generator().manual_seed(0)
        for p in policy.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    seqs = _mixed_seqs(policy)
    results = {}
    for shared, budget in (("false", 10 ** 6), ("true", 10 ** 6), ("true", 400)):  # 400: rows split, several micro-batches
        opt = _Capture(policy.trainable_parameters())
        st = train_step(policy, seqs, opt, micro_batch_tokens=budget, max_grad_norm=0, bf16=False, shared_prefix=shared)
        ev = eval_loss(policy, seqs, micro_batch_tokens=budget, bf16=False, shared_prefix=shared)
        results[shared, budget] = (st, opt.grads, ev)
    plain, plain_grads, plain_eval = results["false", 10 ** 6]
    ref = sum(_reference_loss_sum(policy, i, m) for i, m in seqs) / sum(trained_tokens(m) for _, m in seqs)
    assert plain["loss"] == pytest.approx(ref, rel=1e-5)
    for key in (("true", 10 ** 6), ("true", 400)):
        st, grads, ev = results[key]
        assert st["loss"] == pytest.approx(plain["loss"], rel=1e-5) and ev == pytest.approx(plain_eval, rel=1e-5)
        assert st["trained_tokens"] == plain["trained_tokens"] and st["tokens"] == plain["tokens"]
        for a, b in zip(grads, plain_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert max(float(g.abs().max()) for g in plain_grads) > 0
    # the tool demonstrations' common prompt forwarded once per row, not once per transcript
    assert results["true", 10 ** 6][0]["forward_tokens"] < 0.6 * plain["forward_tokens"]


def test_packed_micro_batches_group_transcripts_by_their_first_tokens_and_skip_those_without_loss(tiny_model_dir):
    from rlft.sft.loss import GROUP_KEY_TOKENS, packed_micro_batches

    policy = _policy(tiny_model_dir)
    seqs = _mixed_seqs(policy)
    batches = packed_micro_batches(seqs, 10 ** 6)
    order = [i for idx, _ in batches for i in idx]
    assert sorted(order) == list(range(len(seqs) - 1))  # every transcript with loss once; the last has none
    for idx, rows in batches:
        for row in rows:
            members = [seqs[idx[n]][0] for n in row.members]
            assert len({tuple(m[:GROUP_KEY_TOKENS]) for m in members}) == 1
            assert row.shared > GROUP_KEY_TOKENS or len(members) == 1
    multi = [len(r.members) for _, rows in batches for r in rows if len(r.members) > 1]
    assert sorted(multi) == [2, 6]  # the 5 demos and the repeat; the two under the other system prompt


# ---- runs ---------------------------------------------------------------------------------------


def _generate_calls(model_dir, rows):
    """For each row: the tool calls the model makes at temperature 0 (hermes parser)."""
    from rlft.renderer import Renderer

    policy = _policy(model_dir)
    renderer = Renderer(policy.tokenizer)
    out = []
    for r in rows:
        msgs = [{"role": "system", "content": TASK.system_prompt}, {"role": "user", "content": r["prompt"]}]
        ids = torch.tensor([renderer.render_prompt(msgs, _schemas())])
        with torch.no_grad():
            gen = policy.model.generate(ids, max_new_tokens=48, do_sample=False, eos_token_id=renderer.eos_token_ids)
        _, calls = renderer.parse(renderer.decode(gen[0, ids.shape[1]:].tolist()))
        out.append([c for c in calls if c.error is None])
    return out


def test_sft_on_a_handful_of_demonstrations_teaches_the_tool_call(pretrained_tiny_dir, tmp_path):
    """The base model calls the tool on none of the held-out prompts; after 100 SFT steps on 16
    demonstrations it does on half of them or more, over two seeds together. One trajectory is
    not enough: measured on 2026-12-07 (seeds 0-3, 100 steps), the share varied with the seed and
    with nothing but float rounding: one thread, plain rows 14/16/15/13 of 16, packed shared-prefix
    rows (the same loss and gradients within float32 noise) 5/14/13/11; two threads, plain
    9/14/9/12, packed 15/13/15/12 (benchmarks/README.md, twentieth session)."""
    from rlft.sft.trainer import best_checkpoint, sft

    rows = TASK.rows(32, 0, part="rl")
    demos, held_out = rows[:16], rows[16:]
    assert not any(_generate_calls(pretrained_tiny_dir, held_out[:8])), "the base model already calls the tool"
    made = []
    for seed in (0, 1):
        runs = tmp_path / f"runs{seed}"
        run_id = sft(model=pretrained_tiny_dir, data=write_demos(tmp_path / "demos.jsonl", demos), runs_dir=str(runs),
                     lora=False, dtype="float32", steps=100, batch_size=8, learning_rate=3e-3, lr_schedule="constant",
                     eval_fraction=0, progress=False, seed=seed)
        with RunStore(runs) as store:
            run = store.get_run(run_id)
            assert (run["kind"], run["status"], run["step"]) == ("sft", "completed", 100)
            losses = [v for _, v in store.metrics(run_id, ["sft/loss"])["sft/loss"]]
            _, path = best_checkpoint(store, run_id)
        assert losses[-1] < 0.25 * losses[0]
        calls = _generate_calls(str(path), held_out)
        made += [c[0] for c in calls if c and c[0].name == "max_of" and isinstance(c[0].arguments.get("numbers"), list)]
    print(f"\nheld-out prompts answered with a max_of(numbers=[...]) call over two seeds: {len(made)}/"
          f"{2 * len(held_out)}: {[c.arguments for c in made][:4]}")
    assert len(made) >= len(held_out)


def test_eval_loss_is_recorded_and_early_stopping_ends_on_the_best_checkpoint(tiny_model_dir, tmp_path):
    from rlft.sft.trainer import sft

    data = write_demos(tmp_path / "demos.jsonl", TASK.rows(12, 0, part="sft"))
    runs = tmp_path / "runs"
    # learning rate 0: the eval loss never improves after the first eval, so patience 2 stops at step 3
    run_id = sft(model=tiny_model_dir, data=data, runs_dir=str(runs), dtype="float32", lora=False, learning_rate=0.0,
                 steps=50, batch_size=4, eval_size=4, eval_every=1, patience=2, checkpoint_every=2, progress=False)
    with RunStore(runs) as store:
        run = store.get_run(run_id)
        ev = store.metrics(run_id, ["eval/loss"])["eval/loss"]
        ckpts = store.checkpoints(run_id)
        logs = " ".join(r["message"] for r in store.logs(run_id))
    assert (run["status"], run["step"]) == ("completed", 3)
    assert [s for s, _ in ev] == [0, 1, 2, 3] and len({round(v, 5) for _, v in ev}) == 1
    assert "early stop at step 3" in logs
    assert [(c["step"], c["metrics"].get("best")) for c in ckpts] == [(1, True)]  # step 2's periodic one removed
    assert [p.name for p in (runs / run_id / "checkpoints").iterdir()] == ["step-000001"]


def test_an_rl_run_starts_from_the_sft_checkpoint(pretrained_tiny_dir, tmp_path):
    from rlft.sft.prepare import prepare
    from rlft.sft.trainer import _load, as_sft_config, best_checkpoint, sft
    from rlft.testing.pretrained import task_environment
    from rlft.training.loop import train

    runs = str(tmp_path / "runs")
    cfg = dict(model=pretrained_tiny_dir, data=write_demos(tmp_path / "demos.jsonl", TASK.rows(12, 0, part="sft")),
               runs_dir=runs, lora=True, lora_rank=4, dtype="bfloat16", steps=4, batch_size=4, eval_size=4,
               learning_rate=1e-2, progress=False)
    sft_id = sft(cfg)
    with RunStore(runs) as store:
        step, path = best_checkpoint(store, sft_id)
        recorded = dict(store.metrics(sft_id, ["eval/loss"])["eval/loss"])[step]
        assert recorded < dict(store.metrics(sft_id, ["eval/loss"])["eval/loss"])[0]
    # the checkpoint holds the trained adapter: loaded on its own it gives the recorded eval loss
    from rlft.policy import load_policy

    policy = load_policy(str(path), dtype="bfloat16")
    assert policy.is_lora
    _, renderer = _load(as_sft_config(cfg))
    data = prepare(as_sft_config(cfg), renderer)
    assert eval_loss(policy, data.eval, micro_batch_tokens=4096, bf16=True) == pytest.approx(recorded, rel=1e-3)
    env, rows = task_environment("max", n=24)
    rl_id = train(environment=env, dataset=rows, model=str(path), runs_dir=runs, steps=1, batch_size=2, group_size=2,
                  eval_size=4, eval_max_examples=4, eval_k=1, max_seq_len=128, validate=False, progress=False)
    with RunStore(runs) as store:
        rl = store.get_run(rl_id)
        assert (rl["kind"], rl["status"], rl["model"]) == ("rl", "completed", str(path))
        assert [r["kind"] for r in store.list_runs()] == ["rl", "sft"]


def test_overlong_transcripts_are_dropped_or_truncated_and_reported():
    from rlft.sft.prepare import fit_length, split_indices
    from rlft.sft.transcripts import SFTExample

    exs = [SFTExample([1] * 10, [0] * 5 + [1] * 5, 0), SFTExample([1] * 4, [0, 1, 1, 1], 1),
           SFTExample([1] * 10, [0] * 8 + [1] * 2, 2)]
    kept, problems = fit_length(exs, 6, "drop", "d.jsonl", [3, 4, 5])
    assert kept == [([1] * 4, [0, 1, 1, 1])]
    assert len(problems) == 2 and problems[0].startswith("d.jsonl row 4: 10 tokens > max_seq_len 6: dropped")
    kept, problems = fit_length(exs, 6, "truncate", "d.jsonl")
    assert kept == [([1] * 6, [0] * 5 + [1]), ([1] * 4, [0, 1, 1, 1])]
    assert "truncated" in problems[0] and "no trained (assistant) tokens left after truncation" in problems[-1]
    train, held = split_indices(20, eval_size=0, eval_fraction=0.2, seed=3)
    assert len(held) == 4 and sorted(train + held) == list(range(20))
    assert split_indices(20, eval_size=0, eval_fraction=0.2, seed=3) == (train, held)


# ---- the store and the command line --------------------------------------------------------------


def test_store_migration_makes_existing_runs_rl_and_records_sft_runs(tmp_path):
    from rlft.store import run_store

    db = tmp_path / "rlft.db"
    conn = sqlite3.connect(db)  # a workspace written before the run kind existed (schema 1)
    for stmt in run_store.MIGRATIONS[1]:
        conn.execute(stmt)
    conn.execute("INSERT INTO runs (id, name, created_at, updated_at) VALUES ('old-1', 'old', 1, 1)")
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()
    readonly = RunStore(tmp_path, readonly=True)  # the console: never migrates, still reads
    assert [r["kind"] for r in readonly.list_runs()] == ["rl"]
    with RunStore(tmp_path) as store:
        assert store._conn().execute("PRAGMA user_version").fetchone()[0] == run_store.SCHEMA_VERSION
        new = store.create_run(name="warmup", kind="sft")
        assert store.get_run("old-1")["kind"] == "rl" and store.get_run(new)["kind"] == "sft"
        assert {r["id"]: r["kind"] for r in store.list_runs()} == {"old-1": "rl", new: "sft"}
        with pytest.raises(ValueError, match="kind"):
            store.create_run(kind="dpo")
    readonly.close()


def test_cli_sft_trains_from_flags_and_runs_list_shows_the_kind(tiny_model_dir, tmp_path, capsys):
    data = write_demos(tmp_path / "demos.jsonl", TASK.rows(8, 0, part="sft"))
    runs = str(tmp_path / "runs")
    assert main(["sft", "--data", data, "--model", tiny_model_dir, "--runs", runs, "--steps", "2",
                 "--set", "dtype=float32", "--set", "batch_size=4", "--set", "eval_size=2", "--set", "progress=false"]) == 0
    assert "sft run" in capsys.readouterr().out
    assert main(["runs", "list", "--runs", runs, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["kind"], row["status"], row["step"]) == ("sft", "completed", 2)
    with RunStore(runs) as store:
        assert set(store.metric_keys(row["id"])) == set(SFT_KEYS)
    assert main(["runs", "metrics", row["id"], "--runs", runs]) == 0
    out = capsys.readouterr().out
    assert "sft/loss" in out and "eval/loss" in out


@pytest.mark.parametrize("argv,message", [
    (["--data", "missing.jsonl", "--set", "learning_rat=1"], "Did you mean 'learning_rate'"),
    (["--set", "steps=3"], "no training data"),
    (["--data", "{data}", "--model", "/nonexistent/model"], "Could not load model"),
    (["--data", "{data}", "--model", "{model}", "--set", "patience=2"], "patience = 2 needs eval_every"),
])
def test_cli_sft_user_errors_exit_2_with_one_message(argv, message, tiny_model_dir, tmp_path, capsys):
    data = write_demos(tmp_path / "demos.jsonl", TASK.rows(4, 0, part="sft"))
    argv = [a.format(data=data, model=tiny_model_dir) for a in argv]
    assert main(["sft", *argv, "--runs", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("rlft sft: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "rlft.db").exists() or not RunStore(tmp_path / "runs").list_runs()


def test_sft_config_reads_toml_tables_relative_paths_and_set_overrides(tmp_path, capsys):
    from rlft.config import ConfigError
    from rlft.sft.config import FIELDS, load_sft_config

    (tmp_path / "demos.jsonl").write_text("{}\n")
    (tmp_path / "sft.toml").write_text('data = "demos.jsonl"\nsteps = 7\n[lora]\nrank = 8\n')
    cfg = load_sft_config(tmp_path / "sft.toml", ["steps=9", "keep_best=false"]).resolved()
    assert (cfg.data, cfg.steps, cfg.lora_rank, cfg.keep_best) == (str(tmp_path / "demos.jsonl"), 9, 8, False)
    with pytest.raises(ConfigError, match="expects int"):
        load_sft_config(None, ["steps=many"])
    with pytest.raises(ConfigError, match="overlong"):
        load_sft_config(None, {"data": "x", "overlong": "wrap"}).resolved()
    assert main(["sft", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(k in out for k in FIELDS)
