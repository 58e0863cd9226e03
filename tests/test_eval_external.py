"""rlft eval against an external OpenAI-compatible model: a real rlft serve on 127.0.0.1 with a
scripted engine behind it; tool calls come back natively, usage and cost are recorded."""

import json
import re
import textwrap

import pytest

from rlft.cli import main
from rlft.testing import ScriptedPolicy

pytest.importorskip("fastapi")
pytest.importorskip("openai")

ENV = textwrap.dedent('''
    from rlft.env import Environment
    from rlft.tools import tool

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    def correct(ro):
        return float(ro.completion.strip() == str(ro.ground_truth))

    env = Environment(tools=[add], rewards=[correct], max_turns=3)
    dataset = [{"prompt": f"what is {i} + 2?", "ground_truth": i + 2} for i in range(10)]
''')


def test_external_model_eval_runs_tools_and_records_cost(tmp_path, tiny_renderer, capsys):
    from rlft.serve import BackgroundServer, create_app

    renderer = tiny_renderer

    def script(prompt, turn):
        if turn == 0:
            n = int(prompt.split("what is ")[-1].split(" ")[0])
            return '<tool_call>{"name": "add", "arguments": {"a": %d, "b": 2}}</tool_call>' % n
        return prompt.split("<|im_start|>tool\n")[-1].split("<|im_end|>")[0]  # repeat the tool result

    (tmp_path / "env.py").write_text(ENV)
    def no_tools(prompt, turn):  # answers at once, never calling the tool: a guess
        return "5"

    app = create_app(engines={"scripted-gpt": (ScriptedPolicy(renderer, script), renderer),
                              "guessing-gpt": (ScriptedPolicy(renderer, no_tools), renderer)})
    with BackgroundServer(app) as srv:
        code = main(["eval", "--set", f"env={tmp_path / 'env.py'}", "--set", f"runs_dir={tmp_path / 'runs'}",
                     "--set", "eval_size=3", "--base-url", srv.url + "/v1", "--model", "scripted-gpt",
                     "--price", "1.0,2.0", "--k", "2", "--json"])
        out = json.loads(capsys.readouterr().out)
        # the health checks that apply to one eval (#17 point 4): the guesser never uses the tool
        assert main(["eval", "--set", f"env={tmp_path / 'env.py'}", "--set", f"runs_dir={tmp_path / 'runs'}",
                     "--set", "eval_size=3", "--base-url", srv.url + "/v1", "--model", "guessing-gpt", "--k", "2",
                     "--json"]) == 0
        guess = json.loads(capsys.readouterr().out)
        # the table a person reads: the cost per request in readable dollars, not rounded to 0.0000
        assert main(["eval", "--set", f"env={tmp_path / 'env.py'}", "--set", f"runs_dir={tmp_path / 'runs'}",
                     "--set", "eval_size=3", "--base-url", srv.url + "/v1", "--model", "scripted-gpt",
                     "--price", "1.0,2.0", "--k", "2"]) == 0
        table = capsys.readouterr().out
    assert "tools_never_used" in [f["name"] for f in guess["findings"]]
    # every sample of the tool user is right: as training data, nothing to learn from (and it uses its tool)
    assert [f["name"] for f in out["findings"]] == ["no_signal"]
    assert code == 0 and out["model"].startswith("scripted-gpt@")
    m = out["metrics"]
    assert m["reward/mean"] == 1.0 and m["rollout/tool_calls"] == 1.0 and m["pass@k"] == 1.0
    assert m["tokens/prompt"] > 0 and m["tokens/completion"] > 0
    expected = (m["tokens/prompt"] * 1.0 + m["tokens/completion"] * 2.0) / 1e6
    assert m["cost/total_usd"] == pytest.approx(expected) and m["cost/per_request_usd"] == pytest.approx(expected / 12)

    per_request = next(line for line in table.splitlines() if "cost/per_request_usd" in line)
    shown = float(re.search(r"\$(0\.0+[1-9]\d\d)\b", per_request).group(1))  # three significant digits
    assert shown == pytest.approx(m["cost/per_request_usd"], rel=5e-3) and shown > 0
    assert "no price set" not in table
    # response length from the API's usage (an external model has no sampled tokens of ours)
    assert m["response/length"] == pytest.approx(m["tokens/completion"] / 6)
    # no price for the guesser: its cost is unknown, not 0, and the table says so
    assert guess["metrics"]["response/length"] > 0
    assert not any(key.startswith("cost/") or key == "usage/cost" for key in guess["metrics"])


def test_eval_without_a_price_says_the_cost_is_not_computed(tmp_path, tiny_renderer, capsys):
    from rlft.serve import BackgroundServer, create_app

    (tmp_path / "env.py").write_text(ENV)
    app = create_app(engines={"local-gpt": (ScriptedPolicy(tiny_renderer, lambda prompt, turn: "4"), tiny_renderer)})
    with BackgroundServer(app) as srv:
        assert main(["eval", "--set", f"env={tmp_path / 'env.py'}", "--set", f"runs_dir={tmp_path / 'runs'}",
                     "--set", "eval_size=2", "--base-url", srv.url + "/v1", "--model", "local-gpt", "--k", "1"]) == 0
    out = capsys.readouterr().out
    assert "no price set for local-gpt: cost not computed" in out and "cost/per_request_usd" not in out
