"""rlft.tools: signature + docstring → schema, and tool calls whose every failure is a message.

The future import is deliberate: annotations arrive as strings, as in most user code.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import json
import sys
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, Field
from typing_extensions import TypedDict  # pydantic needs this one, not typing's, on Python < 3.12

from rlft.tools import (
    FatalToolError,
    Tool,
    ToolResult,
    execute_tool_call,
    parse_docstring,
    tool,
    tool_schemas,
)
from rlft.types import Rollout, ToolCall


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Filter(BaseModel):
    title: str  # a property called "title" must survive the removal of pydantic's titles
    year: int | None = None


class TreeNode(BaseModel):
    value: int
    children: list[TreeNode] = []


class Movie(TypedDict):
    name: str
    year: int


def run(tools: Tool | list[Tool], name: str, arguments: Any = None, **kw: Any) -> ToolResult:
    tools = tools if isinstance(tools, list) else [tools]
    call = ToolCall(name=name, arguments={} if arguments is None else arguments)
    return asyncio.run(execute_tool_call({t.name: t for t in tools}, call, **kw))


def props(t: Tool) -> dict[str, Any]:
    return t.parameters["properties"]


# -- building tools ------------------------------------------------------------------------------

def test_bare_decorator_returns_tool_named_after_function_with_object_schema():
    @tool
    def add(a: int, b: int = 2) -> int:
        """Add two numbers."""
        return a + b

    assert isinstance(add, Tool)
    assert add.name == "add" and add.description == "Add two numbers."
    assert add.parameters == {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer", "default": 2}},
        "required": ["a"],
        "additionalProperties": False,
    }
    assert add.schema() == {"type": "function", "function": {
        "name": "add", "description": "Add two numbers.", "parameters": add.parameters}}


def test_decorator_arguments_override_name_description_and_timeout():
    @tool(name="plus", description="Sum.", timeout=3.0)
    async def add(a: int) -> int:
        """Ignored."""
        return a

    assert (add.name, add.description, add.timeout) == ("plus", "Sum.", 3.0)


def test_from_function_builds_the_same_tool_as_the_decorator():
    def echo(text: str) -> str:
        """Echo."""
        return text

    assert Tool.from_function(echo) == tool(echo)


class Counter:
    """Count calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, step: int = 1) -> int:
        self.calls += step
        return self.calls


def test_callable_object_becomes_a_tool_with_its_call_signature():
    t = tool(Counter(), name="count")
    assert t.description == "Count calls." and list(props(t)) == ["step"]
    assert run(t, "count", {"step": 2}).content == "2"


def test_partial_needs_a_name_and_documents_itself_from_the_wrapped_function():
    def power(base: int, exp: int) -> int:
        """Raise base to exp."""
        return base**exp

    with pytest.raises(TypeError, match="pass name="):
        tool(functools.partial(power, exp=2))
    square = tool(functools.partial(power, exp=2), name="square")
    assert square.description == "Raise base to exp." and square.parameters["required"] == ["base"]
    assert run(square, "square", {"base": 3}).content == "9"


def test_decorated_tool_stays_directly_callable():
    @tool
    def double(x: int) -> int:
        return 2 * x

    assert double(4) == 8


def test_schema_has_no_pydantic_titles_but_keeps_a_property_named_title():
    @tool
    def find(filter: Filter, title: str) -> str:
        return ""

    text = json.dumps(find.parameters)
    assert '"title": {"type": "string"}' in text  # Filter.title and the parameter itself
    assert props(find)["title"] == {"type": "string"}
    assert "Filter" not in text and "Title" not in text  # no model title, no "Title" labels


def test_default_makes_parameter_optional_and_missing_annotation_means_any():
    @tool
    def f(a, b: str = "x", c=None):
        return [a, b, c]

    assert f.parameters["required"] == ["a"]
    assert props(f)["a"] == {} and props(f)["c"] == {"default": None}
    assert run(f, "f", {"a": {"any": [1]}}).content == '[{"any": [1]}, "x", null]'


def test_docstring_google_style_param_descriptions_reach_schema():
    @tool
    def search(query: str, limit: int = 5) -> str:
        """Search the corpus.

        Args:
            query (str): Words to look for;
                wrapped onto a second line.
            limit: Most hits to return.

        Returns:
            The hits, one a line.
        """
        return ""

    assert search.description == "Search the corpus."
    assert props(search)["query"]["description"] == "Words to look for; wrapped onto a second line."
    assert props(search)["limit"]["description"] == "Most hits to return."


def test_docstring_numpy_style_param_descriptions_reach_schema():
    @tool
    def move(x: int, y: int, speed: float = 1.0) -> str:
        """Move the cursor.

        Parameters
        ----------
        x, y : int
            Target position
            in pixels.
        speed : float, optional
            Pixels per tick.

        Returns
        -------
        str
        """
        return ""

    assert move.description == "Move the cursor."
    assert props(move)["x"]["description"] == props(move)["y"]["description"] == "Target position in pixels."
    assert props(move)["speed"]["description"] == "Pixels per tick."


def test_docstring_rest_style_param_descriptions_reach_schema():
    @tool
    def fetch(url: str, retries: int = 0) -> str:
        """Fetch a page.

        :param url: The address: absolute,
            with scheme.
        :param int retries: Attempts after the first.
        :returns: The body.
        """
        return ""

    assert fetch.description == "Fetch a page."
    assert props(fetch)["url"]["description"] == "The address: absolute, with scheme."
    assert props(fetch)["retries"]["description"] == "Attempts after the first."


def test_docstring_prose_before_the_first_section_is_the_description():
    doc = "Summary.\n\nMore detail.\n\nArgs:\n    x: y\n"
    assert parse_docstring(doc) == ("Summary.\n\nMore detail.", {"x": "y"})


def test_missing_docstring_falls_back_to_the_tool_name():
    @tool
    def ping():
        return "pong"

    assert ping.description == "ping" and ping.parameters["properties"] == {}


def test_literal_enum_and_optional_parameters_have_precise_schemas():
    @tool
    def paint(mode: Literal["fast", "slow"], color: Color = Color.RED, note: str | None = None) -> str:
        return f"{mode} {color.value} {note}"

    assert props(paint)["mode"] == {"enum": ["fast", "slow"], "type": "string"}
    assert props(paint)["color"] == {"enum": ["red", "blue"], "type": "string", "default": "red"}
    assert props(paint)["note"] == {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None}
    assert run(paint, "paint", {"mode": "slow", "color": "blue"}).content == "slow blue None"


def test_list_and_dict_parameters_have_item_schemas():
    @tool
    def tally(xs: list[int], weights: dict[str, float]) -> float:
        return sum(xs) * sum(weights.values())

    assert props(tally)["xs"] == {"items": {"type": "integer"}, "type": "array"}
    assert props(tally)["weights"] == {"additionalProperties": {"type": "number"}, "type": "object"}
    assert run(tally, "tally", {"xs": [1, 2], "weights": {"a": 0.5}}).content == "1.5"


def test_pydantic_model_argument_is_inlined_in_schema_and_passed_as_instance():
    seen = []

    @tool
    def find(filter: Filter) -> str:
        seen.append(filter)
        return filter.title

    assert props(find)["filter"]["properties"]["year"] == {"anyOf": [{"type": "integer"}, {"type": "null"}],
                                                           "default": None}
    assert "$defs" not in find.parameters
    assert run(find, "find", {"filter": {"title": "Up", "year": 2009}}).content == "Up"
    assert seen == [Filter(title="Up", year=2009)]


class Circle(BaseModel):
    kind: Literal["circle"]
    r: float


class Square(BaseModel):
    kind: Literal["square"]
    side: float


def test_discriminated_union_is_inlined_without_dangling_refs():
    @tool
    def area(shape: Annotated[Circle | Square, Field(discriminator="kind")]) -> float:
        return shape.side**2 if isinstance(shape, Square) else 3 * shape.r**2

    assert "$ref" not in json.dumps(area.parameters) and "$defs" not in area.parameters
    assert len(props(area)["shape"]["oneOf"]) == 2
    assert run(area, "area", {"shape": {"kind": "square", "side": 2}}).content == "4.0"


def test_recursive_model_keeps_only_its_definition_under_defs():
    @tool
    def walk(tree: TreeNode) -> int:
        return tree.value + sum(c.value for c in tree.children)

    assert set(walk.parameters["$defs"]) == {"TreeNode"}
    assert props(walk)["tree"]["properties"]["children"]["items"] == {"$ref": "#/$defs/TreeNode"}
    assert run(walk, "walk", {"tree": {"value": 1, "children": [{"value": 2}]}}).content == "3"


def test_typeddict_argument_has_schema_and_is_validated():
    @tool
    def rate(movie: Movie) -> str:
        return movie["name"]

    assert props(rate)["movie"]["required"] == ["name", "year"]
    assert run(rate, "rate", {"movie": {"name": "Up", "year": 2009}}).content == "Up"
    assert "movie.year" in run(rate, "rate", {"movie": {"name": "Up"}}).content


def test_parameter_named_like_a_basemodel_attribute_works():
    @tool
    def f(json: str, copy: int = 1, model_config: bool = False) -> str:
        return f"{json}{copy}{model_config}"

    assert list(props(f)) == ["json", "copy", "model_config"]
    assert run(f, "f", {"json": "j"}).content == "j1False"


def test_rollout_parameter_is_injected_and_hidden_from_schema():
    @tool
    def grade(answer: str, rollout) -> str:
        return f"{answer}={rollout.ground_truth}"

    assert grade.needs_rollout and list(props(grade)) == ["answer"]
    assert run(grade, "grade", {"answer": "4"}, rollout=Rollout(example={"ground_truth": "4"})).content == "4=4"
    # The model cannot smuggle in a value of its own.
    assert run(grade, "grade", {"answer": "4", "rollout": 1}).error == "invalid arguments: rollout"


def test_parameter_annotated_rollout_is_injected_under_its_own_name():
    @tool
    async def peek(key: str, r: Rollout) -> str:
        return r.example[key]

    assert peek.needs_rollout and peek.rollout_param == "r" and list(props(peek)) == ["key"]
    assert run(peek, "peek", {"key": "k"}, rollout=Rollout(example={"k": "v"})).content == "v"


class Unsupported:  # neither a pydantic type nor a pydantic model
    pass


def test_star_args_and_unsupported_annotations_fail_at_definition_naming_the_tool():
    with pytest.raises(TypeError, match=r"'spread'.*'rest'"):
        tool(lambda *rest: None, name="spread")

    def use(x: Unsupported) -> None:
        pass

    with pytest.raises(TypeError, match="'use': cannot build a JSON schema"):
        tool(use)


def test_unresolvable_string_annotation_fails_at_definition_naming_the_parameter():
    class Local(BaseModel):  # a string annotation cannot see function locals
        a: int

    def use(x: Local) -> None:
        pass

    with pytest.raises(TypeError, match="annotation 'Local' of 'x'"):
        tool(use)


# -- executing calls -----------------------------------------------------------------------------

@tool
def divide(a: float, b: float) -> float:
    """Divide a by b."""
    return a / b


def test_unknown_tool_name_becomes_a_tool_message_listing_available_tools():
    other = tool(lambda: 1, name="other")
    r = run([divide, other], "multiply", {"a": 1})
    assert "unknown tool 'multiply'" in r.content and "Available tools: divide, other" in r.content
    assert r.error == "unknown tool: multiply" and not r.fatal


def test_undecodable_arguments_become_a_message_with_the_parser_error():
    call = ToolCall(name="divide", arguments={}, error="Expecting ',' delimiter: line 1 column 9")
    r = asyncio.run(execute_tool_call({"divide": divide}, call))
    assert "could not be decoded: Expecting ',' delimiter" in r.content and r.error


def test_non_object_arguments_become_a_message():
    r = run(divide, "divide", [1, 2])
    assert "must be a JSON object" in r.content and r.error


def test_validation_errors_name_each_bad_field_and_what_was_expected():
    r = run(divide, "divide", {"a": "ten", "c": 1})
    assert "- a: Input should be a valid number" in r.content and "(got 'ten')" in r.content
    assert '- b: missing required argument, expected {"type": "number"}' in r.content
    assert "- c: unexpected argument (this tool takes: a, b)" in r.content
    assert r.error == "invalid arguments: a, b, c"


def test_lax_json_values_are_coerced_to_the_annotated_type():
    assert run(divide, "divide", {"a": "1", "b": 4}).content == "0.25"


def test_tool_exception_becomes_error_message_with_traceback():
    r = run(divide, "divide", {"a": 1, "b": 0})
    assert r.content == "Error: ZeroDivisionError: float division by zero"
    assert r.error == "ZeroDivisionError: float division by zero"
    assert "Traceback" in r.traceback and "return a / b" in r.traceback and not r.fatal


def test_fatal_tool_error_marks_result_fatal():
    @tool
    async def query() -> str:
        raise FatalToolError("server died")

    r = run(query, "query")
    assert r.fatal and r.content == "Error: FatalToolError: server died"


def test_sys_exit_in_a_sync_or_async_tool_becomes_an_error_not_the_end_of_the_run():
    async def aquit():
        sys.exit(4)

    assert run(tool(lambda: sys.exit(3), name="quit"), "quit").content == "Error: SystemExit: 3"
    r = run(tool(aquit), "aquit")
    assert r.content == "Error: SystemExit: 4" and "sys.exit(4)" in r.traceback


def test_timeout_error_raised_by_the_tool_is_reported_as_its_exception_not_our_timeout():
    @tool
    def connect() -> None:
        raise TimeoutError("upstream slow")

    r = run(connect, "connect")
    assert r.content == "Error: TimeoutError: upstream slow" and r.error != "timeout"


def test_async_tool_result_is_awaited():
    @tool
    async def later(x: int) -> dict:
        await asyncio.sleep(0)
        return {"x": x}

    assert run(later, "later", {"x": 1}) == ToolResult(content='{"x": 1}')


def test_async_tool_timeout_returns_on_time_and_says_so():
    @tool
    async def hang() -> None:
        await asyncio.sleep(10)

    start = time.monotonic()
    r = run(hang, "hang", timeout=0.1)
    assert time.monotonic() - start < 1.0
    assert r.error == "timeout" and r.content == "Error: tool 'hang' timed out after 0.1 s."


def test_sync_tool_timeout_returns_on_time():
    release = threading.Event()

    @tool
    def block() -> str:
        release.wait(10)  # a sync tool cannot be interrupted; the test releases it afterwards
        return "late"

    start = time.monotonic()
    r = run(block, "block", timeout=0.1)  # asyncio.run must not wait for the stuck thread either
    elapsed = time.monotonic() - start
    release.set()
    assert elapsed < 1.0 and r.error == "timeout"


def test_tool_timeout_overrides_the_call_timeout():
    @tool(timeout=0.05)
    async def slow() -> str:
        await asyncio.sleep(0.2)
        return "done"

    assert run(slow, "slow", timeout=30.0).error == "timeout"
    assert run(tool(slow.fn, name="slow", timeout=5.0), "slow", timeout=0.01).content == "done"


def test_sync_tool_runs_off_the_event_loop():
    @tool
    def nap() -> str:
        time.sleep(0.3)
        return "rested"

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.ensure_future(ticker())
        r = await execute_tool_call({"nap": nap}, ToolCall("nap", {}))
        t.cancel()
        return r, ticks

    r, ticks = asyncio.run(main())
    assert r.content == "rested" and ticks >= 5  # ~30 when the loop is free; 0 if blocked


def test_many_concurrent_calls_of_a_sleeping_async_tool_overlap():
    @tool
    async def wait(i: int) -> int:
        await asyncio.sleep(0.2)
        return i

    async def main():
        calls = [ToolCall("wait", {"i": i}) for i in range(50)]
        return await asyncio.gather(*(execute_tool_call({"wait": wait}, c) for c in calls))

    start = time.monotonic()
    results = asyncio.run(main())
    assert time.monotonic() - start < 1.0
    assert [r.content for r in results] == [str(i) for i in range(50)]


def test_cancelling_the_caller_cancels_a_running_async_tool():
    state = {}

    @tool
    async def long() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            state["cancelled"] = True
            raise

    async def main():
        task = asyncio.ensure_future(execute_tool_call({"long": long}, ToolCall("long", {})))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)

    asyncio.run(main())
    assert state == {"cancelled": True}


@dataclass
class Point:
    x: int


class Opaque:
    def __str__(self) -> str:
        return "<opaque>"


@pytest.mark.parametrize(("value", "text"), [
    ("plain *text*", "plain *text*"),
    (None, ""),
    (Filter(title="Up"), '{"title":"Up","year":null}'),
    ({"a": [1, 2.5, True, None]}, '{"a": [1, 2.5, true, null]}'),
    ([Point(1), Color.RED], '[{"x": 1}, "red"]'),
    (7, "7"),
    ("é", "é"),
    (b"bytes", "bytes"),
    (Opaque(), "<opaque>"),
])
def test_return_values_become_text(value, text):
    assert run(tool(lambda: value, name="give"), "give").content == text


def test_long_output_is_truncated_with_visible_marker():
    r = run(tool(lambda: "x" * 5000, name="dump"), "dump", max_output_chars=1000)
    assert r.content == "x" * 1000 + "\n...[truncated 4000 chars]" and r.error is None


def test_hand_built_tool_without_arguments_model_gets_the_raw_arguments():
    async def remote(**arguments: Any) -> str:  # e.g. an MCP tool that validates server-side
        return json.dumps(arguments)

    t = Tool(name="remote", description="", parameters={"type": "object"}, fn=remote)
    assert run(t, "remote", {"q": 1}).content == '{"q": 1}'


def test_tool_schemas_lists_openai_function_entries():
    entries = tool_schemas({"divide": divide})
    assert entries == tool_schemas([divide]) == [divide.schema()]
    assert entries[0]["function"]["name"] == "divide"
