"""Chat rendering and tool-call parsing: parsers per model family, fallback for templates
without tool support, and the appended-token bookkeeping."""

import json

import pytest

from rlft.renderer import Renderer, detect_parser, parse_hermes, parse_json, parse_llama3, parse_mistral
from rlft.testing.tokenizer import build_tiny_tokenizer

SMOLLM_LIKE_TEMPLATE = (  # ChatML that ignores tools= and tool_calls, like SmolLM2's
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]


def test_hermes_parser_extracts_calls_and_keeps_surrounding_text():
    text = 'Let me add.\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n<tool_call>\n{"name": "echo", "arguments": {}}\n</tool_call>'
    content, calls = parse_hermes(text)
    assert content == "Let me add."
    assert [(c.name, c.arguments, c.error) for c in calls] == [("add", {"a": 1, "b": 2}, None), ("echo", {}, None)]
    assert calls[0].id and calls[0].id != calls[1].id


def test_hermes_parser_reports_invalid_json_without_raising():
    _, calls = parse_hermes('<tool_call>{"name": "add", "arguments": {"a": 1,}}</tool_call>')
    assert len(calls) == 1 and calls[0].name == "add" and "invalid JSON" in calls[0].error


def test_hermes_parser_accepts_unclosed_call_and_string_arguments():
    _, calls = parse_hermes('<tool_call>{"name": "add", "arguments": "{\\"a\\": 3, \\"b\\": 4}"}')
    assert calls[0].arguments == {"a": 3, "b": 4} and calls[0].error is None


def test_plain_answer_has_no_tool_calls_in_every_parser():
    for parse in (parse_hermes, parse_llama3, parse_mistral, parse_json):
        content, calls = parse("The answer is 42.")
        assert calls == [] and content == "The answer is 42."


def test_llama3_parser_reads_json_calls_with_parameters_key():
    content, calls = parse_llama3('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "echo", "parameters": {"x": "y"}}')
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("add", {"a": 1, "b": 2}), ("echo", {"x": "y"})]


def test_llama3_parser_leaves_json_answers_alone():
    content, calls = parse_llama3('{"city": "Paris"}')
    assert calls == [] and content == '{"city": "Paris"}'


def test_mistral_parser_reads_both_call_formats():
    _, calls = parse_mistral('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": 2}}]')
    assert [(c.name, c.arguments) for c in calls] == [("add", {"a": 1, "b": 2})]
    _, calls = parse_mistral('[TOOL_CALLS]add[ARGS]{"a": 5, "b": 6}')
    assert [(c.name, c.arguments) for c in calls] == [("add", {"a": 5, "b": 6})]


def test_strict_json_parser_reads_fenced_calls_and_tool_calls_objects():
    _, calls = parse_json('```json\n{"name": "add", "arguments": {"a": 1, "b": 1}}\n```')
    assert calls[0].name == "add"
    _, calls = parse_json(json.dumps({"tool_calls": [{"function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}]}))
    assert calls[0].arguments == {"a": 2, "b": 2}


def test_parser_is_detected_from_the_chat_template():
    assert detect_parser("... [TOOL_CALLS] ...") == "mistral"
    assert detect_parser("... <|python_tag|> ...") == "llama3"
    assert detect_parser("... <tool_call> ...") == "hermes"
    assert detect_parser(None) == "hermes"


def test_tokenizer_without_chat_template_fails_with_advice(tiny_tokenizer):
    bare = build_tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        Renderer(bare)


def test_template_with_tool_support_gets_schemas_through_tools_argument(tiny_tokenizer):
    r = Renderer(tiny_tokenizer)
    assert r.tool_format == "template" and r.parser_name == "hermes"
    text = r.render_text([{"role": "user", "content": "hi"}], TOOLS, add_generation_prompt=True)
    assert '"name": "add"' in text and text.endswith("<|im_start|>assistant\n")


def test_template_without_tool_support_gets_schemas_in_system_prompt(tiny_tokenizer):
    t = build_tiny_tokenizer()
    t.chat_template = SMOLLM_LIKE_TEMPLATE
    r = Renderer(t)
    assert r.tool_format == "system"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
            {"role": "tool", "content": "3", "tool_call_id": "c1"}]
    text = r.render_text(msgs, TOOLS, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert '"name": "add"' in text.split("<|im_end|>")[0]
    # the assistant's call is rendered back in the format the system prompt taught
    assert '<|im_start|>assistant\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call><|im_end|>' in text
    assert "<|im_start|>tool\n3<|im_end|>" in text


def test_turn_end_is_split_into_end_of_turn_token_and_glue(tiny_tokenizer):
    r = Renderer(tiny_tokenizer)
    assert (r.eot_text, r.glue) == ("<|im_end|>", "\n")
    assert r.eos_token_ids == [tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_continuation_tokens_complete_the_template_rendering(tiny_tokenizer):
    r = Renderer(tiny_tokenizer)
    history = [{"role": "user", "content": "2+3?"}]
    prompt = r.render_prompt(history, TOOLS)
    sampled = r.encode('<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>') + r.eos_token_ids
    msg, calls = r.assistant_message(r.decode(sampled))
    history = history + [msg]
    new = [{"role": "tool", "content": "5", "tool_call_id": calls[0].id}]
    cont = r.continuation_ids(history, new, TOOLS, ended_with_eot=True)
    full = tiny_tokenizer.decode(prompt + sampled + cont, skip_special_tokens=False)
    assert full == r.render_text(history + new, TOOLS, add_generation_prompt=True)


def test_continuation_after_a_stop_string_adds_the_missing_end_of_turn_token(tiny_tokenizer):
    r = Renderer(tiny_tokenizer)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    cont = r.continuation_ids(history, [{"role": "user", "content": "again"}], None, ended_with_eot=False)
    assert tiny_tokenizer.decode(cont, skip_special_tokens=False) == "<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n"


def test_tool_results_render_as_user_turns_when_the_template_rejects_a_tool_role():
    t = build_tiny_tokenizer()
    t.chat_template = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant', 'system'] %}"
        "{{ raise_exception('roles must be user/assistant') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    r = Renderer(t)
    assert r.tool_role == "user"
    text = r.render_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                          {"role": "tool", "content": "RESULT"}])
    assert "<|im_start|>user\n<tool_response>\nRESULT\n</tool_response><|im_end|>" in text
