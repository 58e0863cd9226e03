"""rlft serve at OpenAI parity where apps and judges rely on it (#16 point 6), with the official
``openai`` client against a real uvicorn server: a tool result must answer an earlier call."""

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from rlft.serve import BackgroundServer, create_app  # noqa: E402
from rlft.testing import ScriptedPolicy  # noqa: E402

HI = [{"role": "user", "content": "weather in paris?"}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


@pytest.fixture(scope="module")
def scripted_client(tiny_renderer):
    app = create_app(engines={"scripted": (ScriptedPolicy(tiny_renderer, lambda prompt, turn: "sunny"), tiny_renderer)})
    with BackgroundServer(app) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_a_tool_message_answering_no_earlier_call_is_a_400(scripted_client):
    answered = [*HI, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    assert scripted_client.chat.completions.create(model="scripted", messages=answered).choices[0].message.content
    for bad, param in [([*HI, {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}], "messages[1].tool_call_id"),
                       ([*answered[:2], {"role": "tool", "tool_call_id": "call_9", "content": "x"}],
                        "messages[2].tool_call_id"),
                       ([*answered[:2], {"role": "tool", "content": "x"}], "messages[2].tool_call_id")]:
        with pytest.raises(openai.BadRequestError) as e:
            scripted_client.chat.completions.create(model="scripted", messages=bad)
        assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"
