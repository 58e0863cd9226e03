"""Trace import: logs built with the OpenAI and Anthropic SDKs' own types become transcripts that
load and render; filters, dedupe and the seeded split; the adapter registry; the CLI end to end."""

import json

import pytest
from anthropic.types import (
    AssistantMessageParam,
    Message,
    TextBlock,
    TextBlockParam,
    ThinkingBlock,
    ToolParam,
    ToolResultBlockParam,
    ToolUseBlock,
    ToolUseBlockParam,
    Usage,
    UserMessageParam,
)
from anthropic.types.message_create_params import MessageCreateParamsNonStreaming
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionAssistantMessageParam,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessage,
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageFunctionToolCallParam,
    ChatCompletionSystemMessageParam,
    ChatCompletionToolMessageParam,
    ChatCompletionUserMessageParam,
)
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_message_function_tool_call import Function
from openai.types.chat.completion_create_params import (
    CompletionCreateParamsNonStreaming,
)
from openai.types.responses import (
    EasyInputMessageParam,
    FunctionTool,
    FunctionToolParam,
    Response,
    ResponseFunctionToolCallParam,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseReasoningItem,
)
from openai.types.responses.response_create_params import (
    ResponseCreateParamsNonStreaming,
)
from openai.types.responses.response_input_item_param import FunctionCallOutput
from openai.types.shared_params import FunctionDefinition

from rlft.cli.main import main
from rlft.renderer import Renderer
from rlft.sft import Transcript, load_transcripts, render_transcripts, traces
from rlft.sft.traces import import_traces, register_adapter
from rlft.testing import build_tiny_tokenizer

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "weather", "description": "Weather of a city.", "parameters": SCHEMA}}
ANSWER = "It is sunny in Paris."


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# -- records, built with the SDK types --------------------------------------------------------


def chat_request(*extra, tools=True):
    params = CompletionCreateParamsNonStreaming(
        model="gpt-4o-mini",
        messages=[ChatCompletionSystemMessageParam(role="system", content="Answer with the tools."),
                  ChatCompletionUserMessageParam(role="user", content="Weather in Paris?"), *extra])
    if tools:
        params["tools"] = [ChatCompletionFunctionToolParam(type="function", function=FunctionDefinition(
            name="weather", description="Weather of a city.", parameters=SCHEMA))]
    return params


def completion(message: ChatCompletionMessage) -> dict:
    return ChatCompletion(id="chatcmpl-1", object="chat.completion", created=1, model="gpt-4o-mini",
                          choices=[Choice(index=0, finish_reason="stop", message=message)]).model_dump()


CALL = ChatCompletionMessageFunctionToolCall(id="call_1", type="function",
                                             function=Function(name="weather", arguments='{"city": "Paris"}'))
STEP_1 = {"request": chat_request(), "response": completion(ChatCompletionMessage(role="assistant", tool_calls=[CALL]))}
HISTORY = [ChatCompletionAssistantMessageParam(role="assistant", content=None, tool_calls=[
               ChatCompletionMessageFunctionToolCallParam(id="call_1", type="function",
                                                          function={"name": "weather", "arguments": '{"city": "Paris"}'})]),
           ChatCompletionToolMessageParam(role="tool", tool_call_id="call_1", content="sunny, 21C")]
STEP_2 = {"request": chat_request(*HISTORY), "response": completion(ChatCompletionMessage(role="assistant", content=ANSWER)),
          "score": 1.0}
CHAT_MESSAGES = [
    {"role": "system", "content": "Answer with the tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
                                          "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
    {"role": "assistant", "content": ANSWER},
]


def responses_record() -> dict:
    request = ResponseCreateParamsNonStreaming(
        model="gpt-4.1-mini", instructions="Answer with the tools.",
        input=[EasyInputMessageParam(role="user", content="Weather in Paris?"),
               ResponseFunctionToolCallParam(type="function_call", call_id="fc_1", name="weather",
                                             arguments='{"city": "Paris"}'),
               FunctionCallOutput(type="function_call_output", call_id="fc_1", output="sunny, 21C")],
        tools=[FunctionToolParam(type="function", name="weather", description="Weather of a city.", parameters=SCHEMA,
                                 strict=True)])
    response = Response(
        id="resp_1", object="response", created_at=1, model="gpt-4.1-mini", parallel_tool_calls=True, tool_choice="auto",
        instructions="Answer with the tools.",
        tools=[FunctionTool(type="function", name="weather", description="Weather of a city.", parameters=SCHEMA,
                            strict=True)],
        output=[ResponseReasoningItem(id="rs_1", type="reasoning", summary=[]),
                ResponseOutputMessage(id="msg_1", type="message", role="assistant", status="completed",
                                      content=[ResponseOutputText(type="output_text", text=ANSWER, annotations=[])])])
    return {"request": request, "response": response.model_dump(mode="json")}


def anthropic_record() -> dict:
    request = MessageCreateParamsNonStreaming(
        model="claude-sonnet-4-5", max_tokens=512, system="Answer with the tools.",
        tools=[ToolParam(name="weather", description="Weather of a city.", input_schema=SCHEMA)],
        messages=[UserMessageParam(role="user", content="Weather in Paris?"),
                  AssistantMessageParam(role="assistant", content=[
                      ToolUseBlockParam(type="tool_use", id="toolu_1", name="weather", input={"city": "Paris"})]),
                  UserMessageParam(role="user", content=[
                      ToolResultBlockParam(type="tool_result", tool_use_id="toolu_1",
                                           content=[TextBlockParam(type="text", text="sunny, 21C")])])])
    response = Message(id="msg_1", type="message", role="assistant", model="claude-sonnet-4-5",
                       content=[ThinkingBlock(type="thinking", thinking="easy", signature="sig"),
                                TextBlock(type="text", text=ANSWER)],
                       stop_reason="end_turn", stop_sequence=None, usage=Usage(input_tokens=10, output_tokens=5))
    return {"request": request, "response": response.model_dump(mode="json"), "metadata": {"reward": 0.75}}


def anthropic_tool_step() -> dict:
    """The agent's first call: the reply is text and a tool_use block."""
    request = MessageCreateParamsNonStreaming(
        model="claude-sonnet-4-5", max_tokens=512, system=[TextBlockParam(type="text", text="Answer with the tools.")],
        tools=[ToolParam(name="weather", description="Weather of a city.", input_schema=SCHEMA)],
        messages=[UserMessageParam(role="user", content=[TextBlockParam(type="text", text="Weather in Paris?")])])
    response = Message(id="msg_0", type="message", role="assistant", model="claude-sonnet-4-5",
                       content=[TextBlock(type="text", text="Let me check."),
                                ToolUseBlock(type="tool_use", id="toolu_1", name="weather", input={"city": "Paris"})],
                       stop_reason="tool_use", stop_sequence=None, usage=Usage(input_tokens=10, output_tokens=5))
    return {"request": request, "response": response.model_dump(mode="json")}


def ids_free(messages):
    """Messages with call ids replaced by their position (each API names calls its own way)."""
    out = json.loads(json.dumps(messages))
    for m in out:
        for tc in m.get("tool_calls", []):
            tc["id"] = "ID"
        if "tool_call_id" in m:
            m["tool_call_id"] = "ID"
    return out


# -- the formats ------------------------------------------------------------------------------


@pytest.mark.parametrize("record,fmt", [(STEP_2, "openai-chat"), (responses_record(), "openai-responses"),
                                        (anthropic_record(), "anthropic")])
def test_each_sdk_format_becomes_the_same_openai_transcript_that_loads_and_renders(tmp_path, record, fmt):
    path = write_jsonl(tmp_path / "log.jsonl", [record])
    for chosen in ("auto", fmt):
        result = import_traces(path, format=chosen)
        assert result.problems == [] and result.formats == {fmt: 1}
        [t] = result.train
        assert ids_free(t.messages) == ids_free(CHAT_MESSAGES)
        assert t.tools == [WEATHER]
        assert t.meta["format"] == fmt and t.meta["source"] == "log.jsonl:line 1"
    assert t.meta.get("score") == {"openai-chat": 1.0, "anthropic": 0.75}.get(fmt)
    loaded = load_transcripts([t])  # what the import writes loads, and renders into training examples
    examples, problems = render_transcripts(Renderer(build_tiny_tokenizer()), loaded)
    assert problems == [] and len(examples) == 1 and sum(examples[0].mask) > 0


def test_anthropic_tool_use_blocks_become_tool_calls_with_json_arguments():
    [t] = import_traces([anthropic_tool_step()]).train
    assert t.messages == [
        {"role": "system", "content": "Answer with the tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]}]


def test_flat_chat_records_are_accepted_in_both_common_shapes():
    request_with_reply = {**chat_request(*HISTORY), "choices": completion(
        ChatCompletionMessage(role="assistant", content=ANSWER))["choices"]}
    messages_only = {"messages": CHAT_MESSAGES, "tools": [WEATHER]}
    result = import_traces([request_with_reply, messages_only], dedupe=False)
    assert result.problems == []
    assert [ids_free(t.messages) for t in result.train] == [ids_free(CHAT_MESSAGES)] * 2


def test_unsupported_content_and_invalid_calls_are_problems_with_line_and_field(tmp_path):
    image = {"request": {**chat_request(), "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:"}}]}]}, "response": STEP_2["response"]}
    bad_args = json.loads(json.dumps(STEP_1))
    bad_args["response"]["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] = '{"city": '
    path = write_jsonl(tmp_path / "log.jsonl", [STEP_2, image, bad_args, "not json", {"hello": 1}])
    result = import_traces(path)
    assert len(result.train) == 1 and result.counts["problems"] == 4
    joined = "\n".join(result.problems)
    assert "line 2 (openai-chat): messages[0].content[0]: 'image_url' content cannot be trained on" in joined
    assert "line 3 (openai-chat), field 'messages[2].tool_calls[0].function.arguments': not valid JSON" in joined
    assert "line 4: not valid JSON" in joined
    assert "line 5: no trace adapter recognises this record" in joined


# -- filters and split ------------------------------------------------------------------------


def plain(i, score=None):
    rec = {"request": chat_request(tools=False), "response": completion(
        ChatCompletionMessage(role="assistant", content=f"answer {i}"))}
    if score is not None:
        rec["request"]["metadata"] = {"score": str(score)}  # OpenAI request metadata holds strings
    return rec


def test_filters_count_what_each_drops():
    records = [STEP_1, STEP_2, plain(1, 0.9), plain(1, 0.9), plain(2, 0.1), plain(3)]
    r = import_traces(records, min_score=0.5)
    # STEP_1 has no score; plain(2) is below; the second plain(1) is a duplicate
    assert [t.messages[-1].get("content") for t in r.train] == [ANSWER, "answer 1"]
    assert {k: v for k, v in r.counts.items() if v} == {
        "read": 6, "converted": 6, "dropped_no_score": 2, "dropped_score": 1, "dropped_duplicate": 1, "kept": 2}
    r = import_traces(records, tools_only=True)
    assert r.counts["dropped_no_tools"] == 4
    # an agent logs every step; its first step is a prefix of its second, so only the second stays
    assert [len(t.messages) for t in r.train] == [5]
    assert len(import_traces(records, tools_only=True, dedupe=False).train) == 2


def test_split_is_seeded_by_content_and_disjoint():
    records = [plain(i) for i in range(20)]
    a = import_traces(records, eval_fraction=0.25, seed=3)
    b = import_traces(list(reversed(records)), eval_fraction=0.25, seed=3)
    c = import_traces(records, eval_fraction=0.25, seed=4)
    def content(ts):
        return sorted(t.messages[-1]["content"] for t in ts)

    assert len(a.eval) == 5 and len(a.train) == 15
    assert not set(content(a.eval)) & set(content(a.train))
    assert content(a.eval) == content(b.eval)  # the same transcripts, wherever they sit in the file
    assert content(a.eval) != content(c.eval)


# -- adapters ---------------------------------------------------------------------------------


class QALogAdapter:
    """A user's own log format: {"q": ..., "a": ...}."""

    name = "qa-log"

    def matches(self, record):
        return set(record) == {"q", "a"}

    def to_transcripts(self, record):
        return [Transcript([{"role": "user", "content": record["q"]}, {"role": "assistant", "content": record["a"]}])]


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(traces, "_USER", [])


def test_a_registered_adapter_is_detected_before_the_built_ins(clean_registry):
    assert import_traces([{"q": "hi", "a": "yo"}]).counts["problems"] == 1
    register_adapter(QALogAdapter())
    r = import_traces([{"q": "hi", "a": "yo"}, STEP_2])
    assert r.formats == {"qa-log": 1, "openai-chat": 1} and r.problems == []
    with pytest.raises(ValueError, match="already registered"):
        register_adapter(QALogAdapter())
    with pytest.raises(TypeError, match="to_transcripts"):
        register_adapter(object())


# -- CLI --------------------------------------------------------------------------------------


def test_cli_import_writes_train_and_eval_files_and_prints_the_counts(tmp_path, capsys):
    records = [STEP_1, STEP_2, responses_record(), anthropic_tool_step(), anthropic_record(), plain(1), plain(2)]
    log = write_jsonl(tmp_path / "log.jsonl", records)
    out = tmp_path / "demos.jsonl"
    rc = main(["traces", "import", str(log), "--out", str(out), "--tools-only", "--no-dedupe",
               "--eval-fraction", "0.3", "--seed", "1"])
    printed = capsys.readouterr().out
    assert rc == 0
    train, held = load_transcripts(out), load_transcripts(tmp_path / "demos.eval.jsonl")
    assert (len(train), len(held)) == (3, 2)
    assert "read 7 records" in printed and "2 without a tool call" in printed
    assert f"kept 5: 3 -> {out}, 2 -> {tmp_path / 'demos.eval.jsonl'}" in printed


def test_cli_loads_a_users_adapter_from_a_file(tmp_path, capsys, clean_registry):
    (tmp_path / "qa_adapter.py").write_text(
        "from rlft.sft import Transcript\n\n"
        "class QA:\n    name = 'qa-log'\n\n    def matches(self, record):\n        return 'q' in record\n\n"
        "    def to_transcripts(self, record):\n"
        "        return [Transcript([{'role': 'user', 'content': record['q']}, {'role': 'assistant', 'content': record['a']}])]\n")
    log = write_jsonl(tmp_path / "qa.jsonl", [{"q": "hi", "a": "yo"}])
    out = tmp_path / "qa.out.jsonl"
    rc = main(["traces", "import", str(log), "--adapter", f"{tmp_path / 'qa_adapter.py'}:QA", "--format", "qa-log",
               "--out", str(out), "--eval-fraction", "0"])
    assert rc == 0 and load_transcripts(out)[0].messages[1]["content"] == "yo"


@pytest.mark.parametrize("args,message", [
    (["missing.jsonl"], "no such file"),
    (["LOG", "--format", "gemini"], "unknown trace format 'gemini'"),
    (["LOG", "--min-score", "2"], "no transcript kept"),
    (["LOG", "--adapter", "no_such_module_xyz:A"], "cannot import 'no_such_module_xyz'"),
])
def test_cli_user_errors_print_one_line_and_exit_2(tmp_path, capsys, args, message):
    log = write_jsonl(tmp_path / "log.jsonl", [STEP_2])
    rc = main(["traces", "import", *[str(log) if a == "LOG" else a for a in args], "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_the_docs_examples_are_true(clean_registry):
    import doctest
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "sft.md"
    result = doctest.testfile(str(doc), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 30 and result.failed == 0
