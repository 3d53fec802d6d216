"""``mpdp serve --engine hf`` with the embedded SmolLM2-135M-Instruct on one CPU worker: the
official openai client, sync and async, streamed and not, with a few tokens. At temperature 0 the
model is greedy, so the streamed chunks join to exactly the non-streamed text. The hf engine
does not stream step by step yet: its stream is then one final delta, which the server sends
as one chunk (the shape is the same)."""

from __future__ import annotations

import asyncio

import openai
import pytest

from test_server_support import ServerProcess, sum_samples

pytestmark = pytest.mark.timeout(300)
MODEL = "smollm2"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--engine", "hf", "--num-workers", "1", "--served-model-name", MODEL, ready=False,
                      timeout=240)
    s.first_health = s.health()
    s.wait_health(200, 240)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base, api_key="unused", max_retries=0, timeout=120)


def test_health_said_starting_while_the_model_loaded(server):
    code, body = server.first_health
    assert code == 503 and body["status"] == "starting"


def test_chat_streamed_joins_to_non_streamed_at_temperature_0(client):
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0)
    text = whole.choices[0].message.content
    assert text and whole.usage.completion_tokens <= 8 and whole.usage.prompt_tokens > 5
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_n_and_stop(client):
    r = client.completions.create(model=MODEL, prompt=["The sky is", "One, two,"], max_tokens=6, temperature=0)
    assert len(r.choices) == 2 and all(c.text for c in r.choices)
    assert r.usage.completion_tokens <= 12
    r = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3, 4,", max_tokens=6, n=2, temperature=0.8,
                                  seed=1)
    assert [c.index for c in r.choices] == [0, 1]
    greedy = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3, 4,", max_tokens=6, temperature=0)
    first = greedy.choices[0].text.strip()[:1]
    if first:                                   # stop on the first character the model writes
        cut = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3, 4,", max_tokens=6, temperature=0,
                                        stop=[first])
        assert first not in cut.choices[0].text and cut.choices[0].finish_reason == "stop"


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob <= 0 for t in content)


def test_async_client(server, client):
    async def main():
        c = openai.AsyncOpenAI(base_url=server.base, api_key="unused", max_retries=0, timeout=120)
        whole = await c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5, temperature=0)
        pieces = []
        async for chunk in await c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5,
                                                          temperature=0, stream=True):
            pieces.extend(ch.delta.content or "" for ch in chunk.choices)
        await c.close()
        return whole.choices[0].message.content, "".join(pieces)

    whole, joined = asyncio.run(main())
    assert whole == joined
    assert sum_samples(server.metrics(), "mpdp:generation_tokens_total") > 0
