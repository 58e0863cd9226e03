"""rlft serve's top_logprobs: the official openai client against a real server on the tiny model,
checked against a direct forward pass of that model (the values are its real log-softmax)."""

import math

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from rlft.renderer import Renderer  # noqa: E402
from rlft.serve import BackgroundServer, create_app  # noqa: E402
from rlft.testing import ScriptedPolicy  # noqa: E402
from rlft.testing.tokenizer import build_tiny_tokenizer  # noqa: E402

HI = [{"role": "user", "content": "what is the capital of france"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    scripted = ScriptedPolicy(Renderer(build_tiny_tokenizer()), ["plain"] * 10)
    app = create_app(tiny_model_dir, engines={"scripted": scripted}, dtype="float32", device="cpu", max_batch_size=8)
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def direct(tiny_model_dir):
    """``direct(ids, T)``: the tiny model's own next-token logprobs after ``ids`` (fp32), and the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def logprobs(ids, temperature=1.0):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        return torch.log_softmax(logits / temperature, -1)

    return logprobs, tok


def text(tok, i):
    return tok.decode([i], skip_special_tokens=False)


def test_chat_top_logprobs_are_the_models_log_softmax_at_every_step(client, direct, tiny_model_dir):
    logprobs, tok = direct
    resp = client.chat.completions.create(model=tiny_model_dir, messages=HI, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=5, extra_body={"return_token_ids": True})
    choice, prompt = resp.choices[0], resp.prompt_token_ids
    assert len(choice.logprobs.content) == len(choice.token_ids) >= 1
    for k, entry in enumerate(choice.logprobs.content):
        tops = entry.top_logprobs
        assert len(tops) == 5
        assert [t.logprob for t in tops] == sorted((t.logprob for t in tops), reverse=True)
        assert sum(math.exp(t.logprob) for t in tops) <= 1 + 1e-6
        want = logprobs(prompt + choice.token_ids[:k])
        vals, ids = want.topk(5)
        assert [t.token for t in tops] == [text(tok, i) for i in ids.tolist()]
        assert [t.logprob for t in tops] == pytest.approx(vals.tolist(), abs=1e-4)
        assert all(t.bytes == list(t.token.encode()) for t in tops)
        # greedy: the sampled token is the most likely one, with the same logprob
        assert entry.token == tops[0].token and entry.logprob == pytest.approx(tops[0].logprob, abs=1e-6)


def test_top_logprobs_follow_the_sampling_temperature_and_include_the_sampled_token_when_likely(client, direct,
                                                                                               tiny_model_dir):
    logprobs, _ = direct
    resp = client.chat.completions.create(model=tiny_model_dir, messages=HI, max_tokens=3, temperature=0.3, seed=5,
                                          logprobs=True, top_logprobs=20, extra_body={"return_token_ids": True})
    choice, prompt = resp.choices[0], resp.prompt_token_ids
    for k, entry in enumerate(choice.logprobs.content):
        want = logprobs(prompt + choice.token_ids[:k], temperature=0.3)
        vals, _ = want.topk(20)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(vals.tolist(), abs=1e-4)
        assert entry.logprob == pytest.approx(float(want[choice.token_ids[k]]), abs=1e-4)
        if entry.logprob >= entry.top_logprobs[-1].logprob:
            assert entry.token in [t.token for t in entry.top_logprobs]


def test_streamed_top_logprobs_equal_the_non_streamed_ones(client, tiny_model_dir):
    kw = {"model": tiny_model_dir, "messages": HI, "max_tokens": 12, "temperature": 1.0, "seed": 11,
          "logprobs": True, "top_logprobs": 3}
    whole = client.chat.completions.create(**kw).choices[0].logprobs.content
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in whole]
    assert [[(t.token, round(t.logprob, 4)) for t in e.top_logprobs] for e in streamed] == \
           [[(t.token, round(t.logprob, 4)) for t in e.top_logprobs] for e in whole]
    assert all(len(e.top_logprobs) == 3 for e in streamed)


def test_completions_logprobs_k_is_the_legacy_shape_with_the_k_most_likely_tokens(client, direct, tiny_model_dir):
    logprobs, tok = direct
    prompt = [5, 6, 7, 8]
    resp = client.completions.create(model=tiny_model_dir, prompt=prompt, max_tokens=3, temperature=0, logprobs=4,
                                     extra_body={"return_token_ids": True})
    c = resp.choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(c.token_ids)
    for k, top in enumerate(lp.top_logprobs):
        vals, ids = logprobs(prompt + c.token_ids[:k]).topk(4)
        want = {}
        for i, v in zip(ids.tolist(), vals.tolist()):
            want.setdefault(text(tok, i), v)
        assert set(want) <= set(top) and lp.tokens[k] in top
        assert all(top[s] == pytest.approx(v, abs=1e-4) for s, v in want.items())


def test_n_choices_each_get_their_own_top_logprobs(client, tiny_model_dir):
    resp = client.chat.completions.create(model=tiny_model_dir, messages=HI, max_tokens=3, n=2, temperature=1.0,
                                          seed=1, logprobs=True, top_logprobs=2)
    assert all(len(e.top_logprobs) == 2 for c in resp.choices for e in c.logprobs.content)


@pytest.mark.parametrize("body", [{"top_logprobs": 3}, {"top_logprobs": 21, "logprobs": True}])
def test_top_logprobs_without_logprobs_or_over_20_is_a_400(client, tiny_model_dir, body):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=tiny_model_dir, messages=HI, max_tokens=2, **body)
    assert e.value.body["param"] == "top_logprobs"


def test_an_engine_without_top_logprobs_says_so_with_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="scripted", messages=HI, max_tokens=2, logprobs=True, top_logprobs=2)
    assert "top logprobs" in e.value.body["message"]
