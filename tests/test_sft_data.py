"""SFT transcripts: loading and validation, and rendering to (ids, mask) exactly as RL rollouts do."""

import asyncio
import csv
import hashlib
import json

import pytest

from rlft.data import DatasetError
from rlft.env import Environment, Sampler
from rlft.renderer import Renderer
from rlft.sft import (
    NotPrefixStable,
    ToolCallsNotParsed,
    Transcript,
    load_transcripts,
    render_transcript,
    render_transcripts,
    write_transcripts,
)
from rlft.testing import ScriptedPolicy, build_tiny_tokenizer
from rlft.testing.tokenizer import CHATML_TOOLS_TEMPLATE
from rlft.tools import tool


@tool
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: first addend
        b: second addend
    """
    return a + b


TOOLS = [add.schema()]


def call(id_, a, b):
    return {"id": id_, "type": "function", "function": {"name": "add", "arguments": json.dumps({"a": a, "b": b})}}


def chat(weights=(1, 1, 1)):
    """Three assistant turns: a tool call, two parallel calls, a plain answer."""
    msgs = [
        {"role": "system", "content": "You add numbers."},
        {"role": "user", "content": "what is 2 plus 3 plus 4"},
        {"role": "assistant", "content": None, "tool_calls": [call("c1", 2, 3)]},
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
        {"role": "assistant", "content": "", "tool_calls": [call("c2", 5, 4), call("c3", 4, 5)]},
        {"role": "tool", "tool_call_id": "c2", "content": "9"},
        {"role": "tool", "tool_call_id": "c3", "content": "9"},
        {"role": "assistant", "content": "the sum is 9"},
    ]
    for m, w in zip([m for m in msgs if m["role"] == "assistant"], weights):
        if w != 1:
            m["weight"] = w
    return Transcript(msgs, TOOLS, {"id": "ex1"})


HERMES_TEXTS = ['<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>',
                ('<tool_call>{"name": "add", "arguments": {"a": 5, "b": 4}}</tool_call>'
                 '<tool_call>{"name": "add", "arguments": {"a": 4, "b": 5}}</tool_call>'),
                "the sum is 9"]
SYSTEM_TEXTS = [HERMES_TEXTS[0], HERMES_TEXTS[1].replace("</tool_call><", "</tool_call>\n<"), HERMES_TEXTS[2]]

# Llama-3 style: calls as bare {"name", "parameters"} JSON, tool results in an "ipython" turn.
LLAMA_STYLE = (
    "{%- if tools %}{{- '<|im_start|>system\\nTools: ' + (tools | tojson) + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + ('ipython' if m['role'] == 'tool' else m['role']) + '\\n' }}"
    "{%- if m['tool_calls'] is defined and m['tool_calls'] %}"
    "{%- for tc in m['tool_calls'] %}{{- ('; ' if not loop.first else '') + '{\"name\": \"' + tc['function']['name'] "
    "+ '\", \"parameters\": ' + (tc['function']['arguments'] | tojson) + '}' }}{%- endfor %}"
    "{%- else %}{{- m['content'] }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Mistral style: [TOOL_CALLS] followed by a JSON list of calls.
MISTRAL_STYLE = LLAMA_STYLE.replace(
    "{%- for tc in m['tool_calls'] %}{{- ('; ' if not loop.first else '') + '{\"name\": \"' + tc['function']['name'] "
    "+ '\", \"parameters\": ' + (tc['function']['arguments'] | tojson) + '}' }}{%- endfor %}",
    "{{- '[TOOL_CALLS][' }}{%- for tc in m['tool_calls'] %}{{- (', ' if not loop.first else '') + '{\"name\": \"' "
    "+ tc['function']['name'] + '\", \"arguments\": ' + (tc['function']['arguments'] | tojson) + '}' }}{%- endfor %}"
    "{{- ']' }}")
# Drops the content of every assistant turn but the last message, as reasoning-stripping templates do.
FORGETFUL = CHATML_TOOLS_TEMPLATE.replace(
    "{%- if m['content'] %}{{- m['content'] }}{%- endif %}",
    "{%- if m['content'] and (m['role'] != 'assistant' or loop.last) %}{{- m['content'] }}{%- endif %}")


def renderer(template=None, **kw):
    tok = build_tiny_tokenizer()
    if template:
        tok.chat_template = template
    return Renderer(tok, **kw)


@pytest.fixture(scope="module")
def hermes():
    return renderer()


def spans(ex, value=1):
    """Contiguous runs of ids where mask == value."""
    out, cur = [], []
    for i, m in zip(ex.ids, ex.mask):
        if m == value:
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def rendered_calls(r, text):
    return [(c.name, c.arguments) for c in r.assistant_message(text)[1]]


EXPECTED_CALLS = [[("add", {"a": 2, "b": 3})], [("add", {"a": 5, "b": 4}), ("add", {"a": 4, "b": 5})], []]


@pytest.mark.parametrize("fmt,texts", [("template", HERMES_TEXTS), ("system", SYSTEM_TEXTS)])
def test_mask_covers_exactly_the_assistant_turns_and_their_end_of_turn(fmt, texts):
    r = renderer(tool_format=fmt)
    ex = render_transcript(r, chat(), index=3)
    assert ex.source_index == 3 and len(ex.ids) == len(ex.mask)
    trained = [r.tokenizer.decode(s) for s in spans(ex)]
    assert trained == [t + "<|im_end|>" for t in texts]
    # and the whole sequence is the template's own rendering of the chat (minus the final glue)
    full = r.render_text([{k: v for k, v in m.items() if k != "weight"} for m in chat().messages], TOOLS)
    assert r.tokenizer.decode(ex.ids) + r.glue == full


@pytest.mark.parametrize("template,parser,fmt", [(None, "hermes", "template"), (None, "hermes", "system"),
                                                 (LLAMA_STYLE, "llama3", "template"),
                                                 (MISTRAL_STYLE, "mistral", "template")])
def test_trained_tool_calls_parse_back_to_the_same_calls_with_the_configured_parser(template, parser, fmt):
    r = renderer(template, tool_parser=parser, tool_format=fmt)
    ex = render_transcript(r, chat())
    texts = [r.decode(s) for s in spans(ex)]  # decode drops the end-of-turn token, as the rollout does
    assert [rendered_calls(r, t) for t in texts] == EXPECTED_CALLS
    if parser != "hermes":
        assert "<tool_call>" not in r.tokenizer.decode(ex.ids)


@pytest.mark.parametrize("template,parser,fmt,script", [
    (None, "hermes", "template", [HERMES_TEXTS[0], "the sum is 5"]),
    (None, "hermes", "system", [HERMES_TEXTS[0], "the sum is 5"]),
    (LLAMA_STYLE, "llama3", "template", ['{"name": "add", "parameters": {"a": 2, "b": 3}}', "the sum is 5"]),
])
def test_a_rollouts_own_messages_render_to_the_rollouts_exact_tokens_and_mask(template, parser, fmt, script):
    r = renderer(template, tool_parser=parser, tool_format=fmt)
    env = Environment(system_prompt="You add numbers.", tools=[add], max_turns=3)
    ro = asyncio.run(env.rollout({"prompt": "2 plus 3?"}, Sampler(ScriptedPolicy(r, script), r)))
    assert [m["role"] for m in ro.messages] == ["system", "user", "assistant", "tool", "assistant"]
    ex = render_transcript(r, Transcript(ro.messages, TOOLS))
    assert ex.ids == ro.prompt_ids + ro.completion_ids
    assert ex.mask == [0] * len(ro.prompt_ids) + ro.mask


def test_weight_zero_turns_are_in_the_sequence_but_not_trained(hermes):
    full, partial = render_transcript(hermes, chat()), render_transcript(hermes, chat(weights=(0, 1, 0)))
    assert partial.ids == full.ids
    assert [hermes.tokenizer.decode(s) for s in spans(partial)] == [HERMES_TEXTS[1] + "<|im_end|>"]


def test_messages_after_the_last_assistant_turn_are_not_rendered(hermes):
    t = chat()
    longer = Transcript(t.messages + [{"role": "user", "content": "thanks"}], t.tools)
    assert render_transcript(hermes, longer) == render_transcript(hermes, t)


def test_a_template_that_rewrites_earlier_turns_is_reported_not_trained():
    r = renderer(FORGETFUL)
    single = Transcript([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    double = Transcript(single.messages + [{"role": "user", "content": "again"}, {"role": "assistant", "content": "bye"}])
    with pytest.raises(NotPrefixStable) as e:
        render_transcript(r, double, index=7)
    assert (e.value.index, e.value.message_index, e.value.turn) == (7, 3, 2)
    assert "row 7" in str(e.value) and "messages[3]" in str(e.value)
    examples, problems = render_transcripts(r, [double, single])
    assert [ex.source_index for ex in examples] == [1]
    assert len(problems) == 1 and problems[0].startswith("row 0 (0-based): not prefix-stable at messages[3]")
    assert render_transcript(renderer(), double).ids  # the same chat is fine under a prefix-stable template


def test_tool_calls_the_configured_parser_cannot_read_back_are_reported(hermes):
    r = renderer(tool_parser="llama3")  # the template writes Hermes <tool_call> tags
    with pytest.raises(ToolCallsNotParsed, match=r"messages\[2\].*'llama3' parser"):
        render_transcript(r, chat())
    examples, problems = render_transcripts(r, [chat()])
    assert examples == [] and "messages[2]" in problems[0]


def test_pretrained_tiny_sft_data_is_unchanged_by_rendering_through_render_transcript():
    # Frozen from the hand-written _sft_chat this replaced: cached tiny models must not change.
    from rlft.testing.pretrained import sft_data

    tok = build_tiny_tokenizer()
    digest = hashlib.sha256()
    for tools in (False, True):
        for ids, mask in sft_data("max", 20, 0, tok, p_correct=0.35, with_tools=tools):
            digest.update(json.dumps([ids, mask]).encode())
    assert digest.hexdigest() == PRETRAINED_DIGEST


PRETRAINED_DIGEST = "17a7ab5f902e8ff3f7c4cf46deefc529f8e16da850adaa8a699bc17efc1ea30d"

# -- loading ----------------------------------------------------------------------------------


def rows():
    return [chat().to_row(), {**chat(weights=(0, 1, 1)).to_row(), "id": "ex2", "score": 0.5}]


def test_jsonl_csv_parquet_json_list_and_datasets_load_the_same_transcripts(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_transcripts(tmp_path / "t.jsonl", [Transcript(r["messages"], r["tools"], {k: r[k] for k in ("id",)}) for r in rows()])
    (tmp_path / "t.json").write_text(json.dumps(rows()))
    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["messages", "tools", "id"])
        w.writeheader()
        for r in rows():
            w.writerow({"messages": json.dumps(r["messages"]), "tools": json.dumps(r["tools"]), "id": r["id"]})
    # Parquet: messages as structs (absent keys come back as nulls), tools as JSON text
    pq.write_table(pa.Table.from_pylist([{"messages": r["messages"], "tools": json.dumps(r["tools"]), "id": r["id"]}
                                         for r in rows()]), tmp_path / "t.parquet")
    # a null field counts as absent (Parquet structs fill absent keys with nulls)
    want = [([{k: v for k, v in m.items() if v is not None} for m in r["messages"]], r["tools"], r["id"]) for r in rows()]
    sources = [tmp_path / "t.jsonl", tmp_path / "t.json", tmp_path / "t.csv", tmp_path / "t.parquet", rows(),
               datasets.Dataset.from_list([{**r, "messages": json.dumps(r["messages"]), "tools": json.dumps(r["tools"]),
                                            "score": None} for r in rows()])]
    for source in sources:
        got = load_transcripts(source)
        assert [(t.messages, t.tools, t.meta["id"]) for t in got] == want, source
    assert load_transcripts(rows())[1].meta == {"id": "ex2", "score": 0.5}


def test_bad_rows_fail_with_the_file_row_and_field_of_every_problem(tmp_path):
    good = chat().to_row()
    bad_args = json.loads(json.dumps(good))
    bad_args["messages"][2]["tool_calls"][0]["function"]["arguments"] = '{"a": 2,'
    bad_many = json.loads(json.dumps(good))
    bad_many["messages"][0]["role"] = "robot"
    bad_many["messages"][1]["weight"] = 1
    bad_many["messages"][3]["tool_call_id"] = "nope"
    bad_many["messages"][4]["tool_calls"][0]["function"]["name"] = "mul"
    bad_many["messages"][7]["weight"] = 2
    untrained = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 0}]}
    path = tmp_path / "demos.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good, bad_args, bad_many, untrained]) + "\n{oops\n")
    with pytest.raises(DatasetError) as e:
        load_transcripts(path)
    msg = str(e.value)
    assert str(path) in msg and "8 problems" in msg
    for expected in [
        "line 2, field 'messages[2].tool_calls[0].function.arguments': not valid JSON",
        "line 3, field 'messages[0].role': 'robot' is not one of",
        "line 3, field 'messages[1].weight': only assistant messages",
        "line 3, field 'messages[3].tool_call_id': 'nope' answers no earlier tool call",
        "line 3, field 'messages[4].tool_calls[0].function.name': 'mul' is not one of the row's tools",
        "line 3, field 'messages[7].weight': must be 0",
        "line 4, field 'messages': every assistant message has weight 0",
        "line 5: not valid JSON",
    ]:
        assert expected in msg


def test_csv_cells_that_are_not_json_are_named(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('messages,tools\n"[{""role"": ""user"", ""content"": ""hi""}, {""role"": ""assistant"", ""content"": ""yo""}]",[oops\n')
    with pytest.raises(DatasetError, match="data row 1, field 'tools': a string here must be JSON text"):
        load_transcripts(path)


def test_a_chat_without_an_assistant_turn_or_with_content_parts_is_rejected():
    with pytest.raises(DatasetError) as e:
        load_transcripts([{"messages": [{"role": "user", "content": "hi"}]},
                          {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                        {"role": "assistant", "content": "yo"}]}])
    assert "index 0, field 'messages': has no assistant message" in str(e.value)
    assert "index 1, field 'messages[0].content': must be a string" in str(e.value)
