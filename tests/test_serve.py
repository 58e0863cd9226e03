"""rlft serve: the official openai client against a real uvicorn server on a tiny offline model."""

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from rlft.renderer import Renderer  # noqa: E402
from rlft.serve import BackgroundServer, create_app  # noqa: E402
from rlft.testing import ScriptedPolicy  # noqa: E402
from rlft.testing.tokenizer import build_tiny_tokenizer  # noqa: E402

HI = [{"role": "user", "content": "what is the capital of france"}]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from rlft.store import RunStore

    path = tmp_path_factory.mktemp("runs")
    store = RunStore(path)
    yield path, store
    store.close()


@pytest.fixture(scope="module")
def write_checkpoint(tiny_model_dir, workspace):
    """``write_checkpoint(run_id, step)``: a LoRA checkpoint with random (step-seeded) adapter weights,
    written the way the trainer writes them."""
    import torch

    from rlft.policy import LoraSpec, load_policy
    from rlft.training.checkpoint import save_checkpoint

    policy = load_policy(tiny_model_dir, dtype="float32", lora=LoraSpec(rank=4))
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    _, store = workspace

    def write(run_id, step):
        gen = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for name, p in policy.model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        path = save_checkpoint(store.run_dir(run_id), step, policy, opt, sched)
        store.add_checkpoint(run_id, step, str(path))
        return path

    return write


@pytest.fixture(scope="module")
def demo_run(tiny_model_dir, workspace, write_checkpoint):
    _, store = workspace
    run_id = store.create_run(name="demo", model=tiny_model_dir)
    write_checkpoint(run_id, 1)
    write_checkpoint(run_id, 2)
    return run_id


class Recording:
    """A scripted engine that records the prompts it was given."""

    def __init__(self, script):
        self.renderer = Renderer(build_tiny_tokenizer())
        self.inner = ScriptedPolicy(self.renderer, script)
        self.prompts = []

    async def generate(self, prompt_ids, params):
        self.prompts.append(self.renderer.tokenizer.decode(prompt_ids, skip_special_tokens=False))
        return await self.inner.generate(prompt_ids, params)


@pytest.fixture(scope="module")
def scripted():
    return Recording([CALL, "It is sunny in Paris."])


@pytest.fixture(scope="module")
def server(tiny_model_dir, workspace, demo_run, scripted):
    app = create_app(tiny_model_dir, runs_dir=workspace[0], engines={"scripted": scripted}, dtype="float32", device="cpu",
                     max_loaded=3, max_batch_size=8)
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ft(tiny_model_dir, run, step):
    return f"ft:{tiny_model_dir}:{run}:{step}"


def ids_of(resp):
    return [c.token_ids for c in resp.choices]


# -- plain chat -------------------------------------------------------------------------------------

def test_chat_usage_counts_the_rendered_prompt_and_every_sampled_token(client, tiny_model_dir):
    resp = client.chat.completions.create(model=tiny_model_dir, messages=HI, max_tokens=12, temperature=0,
                                          extra_body={"return_token_ids": True})
    renderer = Renderer(build_tiny_tokenizer())
    choice = resp.choices[0]
    assert resp.model == tiny_model_dir and resp.object == "chat.completion"
    assert resp.prompt_token_ids == renderer.render_prompt(HI)
    assert 1 <= len(choice.token_ids) <= 12
    assert resp.usage.prompt_tokens == len(resp.prompt_token_ids)
    assert resp.usage.completion_tokens == len(choice.token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert choice.message.content == renderer.decode(choice.token_ids)
    assert choice.finish_reason == ("length" if len(choice.token_ids) == 12 else "stop")


def test_logprobs_are_one_per_sampled_token(client, tiny_model_dir):
    resp = client.chat.completions.create(model=tiny_model_dir, messages=HI, max_tokens=6, seed=3, logprobs=True,
                                          extra_body={"return_token_ids": True})
    lps = resp.choices[0].logprobs.content
    assert len(lps) == len(resp.choices[0].token_ids)
    assert all(lp.logprob <= 0 for lp in lps)


def test_stream_chunks_concatenate_to_the_non_stream_content_and_end_with_done(client, server, tiny_model_dir):
    kw = {"model": tiny_model_dir, "messages": HI, "max_tokens": 16, "temperature": 1.0, "seed": 7}
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert all(c.object == "chat.completion.chunk" and c.model == tiny_model_dir for c in chunks)
    raw = httpx.post(server.url + "/v1/chat/completions", json={**kw, "stream": True}, timeout=60)
    events = [line for line in raw.text.split("\n\n") if line]
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_n_gives_n_indexed_choices_and_usage_sums_them(client, tiny_model_dir):
    resp = client.chat.completions.create(model=tiny_model_dir, messages=HI, n=3, max_tokens=8, temperature=1.0,
                                          extra_body={"return_token_ids": True})
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert resp.usage.completion_tokens == sum(len(t) for t in ids_of(resp))


def test_stop_strings_are_cut_from_the_content(client):
    resp = client.chat.completions.create(model="scripted", messages=HI, stop=["sunny"],
                                          tools=[WEATHER], tool_choice="none")
    assert resp.choices[0].message.content == CALL  # turn 0 of the script, no "sunny" in it
    follow = [*HI, {"role": "assistant", "content": "x"}, {"role": "user", "content": "and?"}]
    resp = client.chat.completions.create(model="scripted", messages=follow, stop="sunny")
    assert resp.choices[0].message.content == "It is " and resp.choices[0].finish_reason == "stop"


# -- tools ------------------------------------------------------------------------------------------

def test_tool_call_round_trip_in_openai_format(client, scripted):
    first = client.chat.completions.create(model="scripted", messages=HI, tools=[WEATHER])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    history = [*HI, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24C"}]
    final = client.chat.completions.create(model="scripted", messages=history, tools=[WEATHER])
    assert final.choices[0].message.content == "It is sunny in Paris."
    assert final.choices[0].finish_reason == "stop" and not final.choices[0].message.tool_calls
    prompt = scripted.prompts[-1]
    assert "get_weather" in prompt and '"city": "Paris"' in prompt and "sunny, 24C" in prompt


def test_tool_choice_none_hides_the_tools_and_returns_text(client, scripted):
    resp = client.chat.completions.create(model="scripted", messages=HI, tools=[WEATHER], tool_choice="none")
    assert resp.choices[0].message.content == CALL and not resp.choices[0].message.tool_calls
    assert "get_weather" not in scripted.prompts[-1]


def test_tool_choice_required_adds_the_instruction_to_the_system_prompt(client, scripted):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    resp = client.chat.completions.create(model="scripted", messages=HI, tools=[WEATHER], tool_choice=choice)
    assert resp.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert "You must call the function `get_weather`" in scripted.prompts[-1]


def test_streamed_tool_call_arrives_as_a_tool_calls_delta(client):
    chunks = list(client.chat.completions.create(model="scripted", messages=HI, tools=[WEATHER], stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# -- checkpoints ------------------------------------------------------------------------------------

def test_models_lists_the_base_every_checkpoint_and_latest(client, tiny_model_dir, demo_run):
    names = {m.id for m in client.models.list()}
    assert {tiny_model_dir, "scripted", ft(tiny_model_dir, demo_run, 1), ft(tiny_model_dir, demo_run, 2),
            ft(tiny_model_dir, demo_run, "latest")} <= names


def test_retrieving_latest_names_the_concrete_step(client, tiny_model_dir, demo_run):
    assert client.models.retrieve(ft(tiny_model_dir, demo_run, "latest")).id == ft(tiny_model_dir, demo_run, 2)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(ft(tiny_model_dir, demo_run, 99))


def test_run_filter_serves_only_that_runs_checkpoints(tiny_model_dir, workspace, demo_run):
    from rlft.serve.models import ModelRegistry

    workspace[1].create_run(name="other", model=tiny_model_dir)
    names = [e.name for e in ModelRegistry(runs_dir=workspace[0], run="demo").entries()]
    assert names == [ft(tiny_model_dir, demo_run, 1), ft(tiny_model_dir, demo_run, 2), ft(tiny_model_dir, demo_run, "latest")]


def test_run_dirs_without_a_store_are_served_under_their_recorded_base(tmp_path):
    from rlft.serve.models import ModelRegistry

    ckpt = tmp_path / "r1" / "checkpoints" / "step-000004"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.pt").write_bytes(b"")
    (ckpt / "rlft_policy.json").write_text(json.dumps({"base_model": "smollm2"}))
    registry = ModelRegistry(runs_dir=tmp_path)
    assert [e.name for e in registry.entries()] == ["ft:smollm2:r1:4", "ft:smollm2:r1:latest"]
    assert registry.resolve("ft:smollm2:r1:latest").path == str(ckpt)


def test_latest_and_run_name_resolve_to_the_newest_checkpoints_weights(client, tiny_model_dir, demo_run):
    def greedy(model):
        return client.chat.completions.create(model=model, messages=HI, max_tokens=8, temperature=0,
                                              extra_body={"return_token_ids": True})

    step1, step2 = greedy(ft(tiny_model_dir, demo_run, 1)), greedy(ft(tiny_model_dir, demo_run, 2))
    latest = greedy(ft(tiny_model_dir, "demo", "latest"))  # the run's name works as well as its id
    assert latest.model == ft(tiny_model_dir, demo_run, 2)
    assert ids_of(latest) == ids_of(step2) != ids_of(step1)


def test_a_new_checkpoint_is_served_without_restart(client, tiny_model_dir, workspace, write_checkpoint):
    run_id = workspace[1].create_run(name="fresh", model=tiny_model_dir)
    write_checkpoint(run_id, 1)
    assert ft(tiny_model_dir, run_id, 1) in {m.id for m in client.models.list()}
    assert client.chat.completions.create(model=ft(tiny_model_dir, run_id, "latest"), messages=HI,
                                          max_tokens=2).model == ft(tiny_model_dir, run_id, 1)
    write_checkpoint(run_id, 3)
    resp = client.chat.completions.create(model=ft(tiny_model_dir, run_id, "latest"), messages=HI, max_tokens=2)
    assert resp.model == ft(tiny_model_dir, run_id, 3)
    assert ft(tiny_model_dir, run_id, 3) in {m.id for m in client.models.list()}


def test_lora_adapter_loads_under_its_name_and_unloads(client, server, tiny_model_dir, demo_run, workspace):
    path = str(workspace[1].run_dir(demo_run) / "checkpoints" / "step-000002")
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "mine", "lora_path": path})
    assert r.status_code == 200, r.text
    assert "mine" in {m.id for m in client.models.list()}
    kw = {"messages": HI, "max_tokens": 8, "temperature": 0, "extra_body": {"return_token_ids": True}}
    assert ids_of(client.chat.completions.create(model="mine", **kw)) == \
        ids_of(client.chat.completions.create(model=ft(tiny_model_dir, demo_run, 2), **kw))
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "mine", "lora_path": path})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
    assert httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "mine"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="mine", **kw)
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(workspace[0])})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"


# -- errors -----------------------------------------------------------------------------------------

def test_unknown_model_is_404_naming_the_available_models(client, tiny_model_dir):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=HI)
    assert e.value.body["code"] == "model_not_found" and tiny_model_dir in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=f"ft:{tiny_model_dir}:no-such-run:latest", messages=HI)


@pytest.mark.parametrize("body, param", [
    ({"temperature": "hot"}, "temperature"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"n": 99}, "n"),
    ({"max_tokens": 100_000}, "max_tokens"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"top_logprobs": 3}, "top_logprobs"),
])
def test_invalid_bodies_are_400_naming_the_field(client, tiny_model_dir, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{"model": tiny_model_dir, "messages": HI, "max_tokens": 4, **body})
    err = e.value.body
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_missing_model_field_and_bad_json_are_400(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": HI})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_api_key_is_required_when_set():
    app = create_app(engines={"scripted": Recording(["ok"])}, api_key="s3cret")
    with BackgroundServer(app) as srv:
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="scripted", messages=HI).choices[0].message.content == "ok"
        assert httpx.get(srv.url + "/health").status_code == 200
