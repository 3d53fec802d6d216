"""``mpdp serve`` with the echo engine, as clients use it: the official openai client (sync and
async, streamed and not), DSPy through LiteLLM, raw HTTP for bad requests and 500 concurrent
streams, and the Prometheus text. One real server process on loopback for the module.

The echo engine answers the last message (or prompt) cut to ``max_tokens`` characters, one
character a token, and streams it in pieces of ``stream_piece`` characters, one piece a step:
every expected text and count below follows from that. ``delay_s`` holds each request 50 ms,
so a stream comes in many pieces.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from test_server_support import ServerProcess, sum_samples

pytestmark = pytest.mark.timeout(180)
MODEL = "echo-served"
CONTEXT = 20_000          # the echo engine's max_model_len, in characters


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--engine", "echo", "--num-workers", "2", "--served-model-name", MODEL,
                      "--engine-option", f"max_model_len={CONTEXT}", "--engine-option", "stream_piece=3", "--engine-option", "delay_s=0.05")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base, api_key="unused", max_retries=0, timeout=60)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_chat_text_usage_n_and_stop(client):
    r = client.chat.completions.create(model=MODEL, messages=user("hello there, server"), max_tokens=100)
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.content == "hello there, server"
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (19, 19, 38)

    r = client.chat.completions.create(model=MODEL, messages=user("abcdefghij"), max_completion_tokens=4, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content == "abcd" and c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 12

    r = client.chat.completions.create(model=MODEL, messages=user("one, two; three"), stop=[";", "zz"], max_tokens=50)
    assert r.choices[0].message.content == "one, two" and r.choices[0].finish_reason == "stop"


def test_streamed_chat_joins_to_the_non_streamed_text(client):
    text = "The quick brown fox jumps over the lazy dog " * 3
    whole = client.chat.completions.create(model=MODEL, messages=user(text), max_tokens=100, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=user(text), max_tokens=100, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content == text[:100]
    # The engine's pieces (3 characters each), joined when they wait for a busy server, never a cut-up
    # answer: every chunk boundary is an engine piece's. How many chunks depends on the machine's load.
    ends = [sum(map(len, pieces[:i + 1])) for i in range(len(pieces))]
    assert all(e % 3 == 0 or e == len(text[:100]) for e in ends), ends
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 100
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_streamed_chat_with_several_choices(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=user("abcdefghijk"), n=2, stream=True,
                                                 max_tokens=20))
    texts = {0: "", 1: ""}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {0: "abcdefghijk", 1: "abcdefghijk"}


def test_completions_string_list_and_token_ids(client):
    r = client.completions.create(model=MODEL, prompt="complete me", max_tokens=8)
    assert r.object == "text_completion" and r.choices[0].text == "complete" and r.choices[0].finish_reason == "length"
    r = client.completions.create(model=MODEL, prompt=["first", "second one"], max_tokens=50, n=2)
    assert [(c.index, c.text) for c in r.choices] == [(0, "first"), (1, "first"), (2, "second one"),
                                                      (3, "second one")]
    assert r.usage.prompt_tokens == 5 + 10 and r.usage.completion_tokens == 2 * (5 + 10)
    r = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=50)
    assert r.choices[0].text == "5 6 7"
    r = client.completions.create(model=MODEL, prompt=[[1, 2], [3]], max_tokens=50)
    assert [c.text for c in r.choices] == ["1 2", "3"]
    streamed = client.completions.create(model=MODEL, prompt=["stream this text", "and this"], max_tokens=50,
                                         stream=True)
    texts = {0: "", 1: ""}
    for c in streamed:
        for choice in c.choices:
            texts[choice.index] += choice.text
    assert texts == {0: "stream this text", 1: "and this"}


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_its_engine_refuses_is_the_same_400_streamed_or_not(server, client, stream):
    # The engine finds the prompt too long for its context when it takes the request: a streamed
    # request's answer waits for that verdict, as vLLM's does, not a 200 with an error event.
    too_long = "x" * (CONTEXT + 1)
    with pytest.raises(openai.BadRequestError) as info:
        r = client.chat.completions.create(model=MODEL, messages=user(too_long), stream=stream)
        list(r) if stream else None
    assert (info.value.code, info.value.param) == ("context_length_exceeded", "messages")
    # A list of prompts: the one that fits is aborted with the request, nothing is left in the engines.
    with pytest.raises(openai.BadRequestError) as info:
        r = client.completions.create(model=MODEL, prompt=["fits" * 1000, too_long], max_tokens=4000, stream=stream)
        list(r) if stream else None
    assert (info.value.code, info.value.param) == ("context_length_exceeded", "prompt")
    deadline = time.monotonic() + 60
    while sum_samples(server.metrics(), "mpdp:num_requests_running") != 0:
        assert time.monotonic() < deadline, "a request was left in an engine"
        time.sleep(0.05)


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_async_client_streamed_and_not(server):
    async def main():
        client = openai.AsyncOpenAI(base_url=server.base, api_key="unused", max_retries=0, timeout=60)
        prompts = [f"async request number {i} " * 2 for i in range(20)]
        whole = await asyncio.gather(*(client.chat.completions.create(model=MODEL, messages=user(p), max_tokens=200)
                                       for p in prompts))

        async def streamed(p):
            out = []
            async for c in await client.chat.completions.create(model=MODEL, messages=user(p), max_tokens=200,
                                                               stream=True):
                out.extend(ch.delta.content or "" for ch in c.choices)
            return "".join(out)

        joined = await asyncio.gather(*(streamed(p) for p in prompts))
        await client.close()
        return [r.choices[0].message.content for r in whole], joined

    whole, joined = asyncio.run(main())
    assert whole == joined == [f"async request number {i} " * 2 for i in range(20)]


def test_dspy_predict_through_the_server(server):
    import dspy

    lm = dspy.LM(f"openai/{MODEL}", api_base=server.base, api_key="unused", max_tokens=8000, cache=False,
                 num_retries=0)
    question = "What is the capital of France?\n\n[[ ## answer ## ]]\nParis\n\n[[ ## completed ## ]]"
    with dspy.context(lm=lm):
        out = dspy.Predict("question -> answer")(question=question)
    assert out.answer == "Paris"


# (what is wrong, path, body (a str is sent as raw bytes), status, param, code)
BAD = [
    ("invalid JSON", "/chat/completions", "{not json", 400, None, None),
    ("a body that is not an object", "/chat/completions", [1, 2], 400, None, None),
    ("no messages", "/chat/completions", {"model": MODEL}, 400, "messages", None),
    ("messages is a string", "/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages", None),
    ("a message without a role", "/chat/completions", {"model": MODEL, "messages": [{"content": "x"}]}, 400,
     "messages", None),
    ("an unknown role", "/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages", None),
    ("a negative temperature", "/chat/completions", {"model": MODEL, "messages": user("x"), "temperature": -1}, 400,
     "temperature", None),
    ("a temperature that is a string", "/chat/completions",
     {"model": MODEL, "messages": user("x"), "temperature": "hot"}, 400, "temperature", None),
    ("max_tokens 0", "/chat/completions", {"model": MODEL, "messages": user("x"), "max_tokens": 0}, 400,
     "max_tokens", None),
    ("a negative max_completion_tokens", "/chat/completions",
     {"model": MODEL, "messages": user("x"), "max_completion_tokens": -5}, 400, "max_completion_tokens", None),
    ("n 0", "/chat/completions", {"model": MODEL, "messages": user("x"), "n": 0}, 400, "n", None),
    ("top_p 2", "/chat/completions", {"model": MODEL, "messages": user("x"), "top_p": 2}, 400, "top_p", None),
    ("an empty stop string", "/chat/completions", {"model": MODEL, "messages": user("x"), "stop": [""]}, 400,
     "stop", None),
    ("presence_penalty 5", "/chat/completions", {"model": MODEL, "messages": user("x"), "presence_penalty": 5}, 400,
     "presence_penalty", None),
    ("a seed that is a string", "/chat/completions", {"model": MODEL, "messages": user("x"), "seed": "x"}, 400,
     "seed", None),
    ("an unknown model", "/chat/completions", {"model": "gpt-9", "messages": user("x")}, 404, "model",
     "model_not_found"),
    ("an unknown field", "/chat/completions", {"model": MODEL, "messages": user("x"), "temprature": 0.5}, 400,
     "temprature", None),
    ("tools", "/chat/completions", {"model": MODEL, "messages": user("x"),
                                   "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", None),
    ("logit_bias", "/chat/completions", {"model": MODEL, "messages": user("x"), "logit_bias": {"1": 5}}, 400,
     "logit_bias", None),
    ("stream is a string", "/chat/completions", {"model": MODEL, "messages": user("x"), "stream": "yes"}, 400,
     "stream", None),
    ("stream_options without stream", "/chat/completions",
     {"model": MODEL, "messages": user("x"), "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    ("top_logprobs without logprobs", "/chat/completions",
     {"model": MODEL, "messages": user("x"), "top_logprobs": 3}, 400, "top_logprobs", None),
    ("a bad response_format", "/chat/completions",
     {"model": MODEL, "messages": user("x"), "response_format": {"type": "xml"}}, 400, "response_format", None),
    ("a prompt too long for the context", "/chat/completions",
     {"model": MODEL, "messages": user("x" * (CONTEXT + 1))}, 400, "messages", "context_length_exceeded"),
    ("no prompt", "/completions", {"model": MODEL}, 400, "prompt", None),
    ("an empty prompt", "/completions", {"model": MODEL, "prompt": ""}, 400, "prompt", None),
    ("negative token ids (the client's field is prompt)", "/completions", {"model": MODEL, "prompt": [[5], [-1]]},
     400, "prompt", None),
    ("a prompt mixing strings and ids", "/completions", {"model": MODEL, "prompt": [1, "a"]}, 400, "prompt", None),
    ("completions logprobs 50", "/completions", {"model": MODEL, "prompt": "x", "logprobs": 50}, 400, "logprobs",
     None),
    ("echo", "/completions", {"model": MODEL, "prompt": "x", "echo": True}, 400, "echo", None),
    ("a streamed request with a bad field", "/completions", {"model": MODEL, "prompt": "x", "stream": True,
                                                             "top_k": "many"}, 400, "top_k", None),
    ("an unknown path", "/chat/complete", {"model": MODEL}, 404, None, None),
    ("a misspelt field with a falsy value", "/chat/completions",
     {"model": MODEL, "messages": user("x"), "tempreature": 0}, 400, "tempreature", None),
    ("a priority (no priority scheduling)", "/chat/completions",
     {"model": MODEL, "messages": user("x"), "priority": 5}, 400, "priority", None),
    ("continuous_usage_stats not a boolean", "/chat/completions",
     {"model": MODEL, "messages": user("x"), "stream": True,
      "stream_options": {"include_usage": True, "continuous_usage_stats": "yes"}}, 400, "stream_options", None),
    ("JSON nested too deeply", "/chat/completions", '{"model": "x", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}",
     400, None, None),
    ("a lone surrogate in model", "/chat/completions",
     '{"model": "\\ud800", "messages": [{"role": "user", "content": "x"}]}', 404, "model", "model_not_found"),
    ("a lone surrogate in a field name", "/chat/completions",
     '{"messages": [{"role": "user", "content": "x"}], "\\udc80x": 1}', 400, "\\udc80x", None),
]


@pytest.mark.parametrize("why, path, body, status, param, code", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors_and_the_next_request_is_served(server, why, path, body, status, param, code):
    content = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    r = httpx.post(server.base + path, content=content, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and error["code"] == code, error
    good = httpx.post(server.base + "/chat/completions", json={"model": MODEL, "messages": user("still here")},
                      timeout=30)
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] == "still here"


def test_a_get_on_a_post_route_is_405_in_openai_shape(server):
    r = httpx.get(server.base + "/chat/completions", timeout=30)
    assert r.status_code == 405 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_500_concurrent_streaming_clients_all_complete(server):
    count = 500

    async def one(client, i):
        text = f"stream {i:03d} " + "abcdefghij" * (1 + i % 4)
        body = {"model": MODEL, "messages": user(text), "max_tokens": 1000, "stream": True}
        pieces, done = [], False
        async with client.stream("POST", "/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    continue
                for ch in json.loads(data)["choices"]:
                    pieces.append(ch["delta"].get("content") or "")
        return done, "".join(pieces) == text

    async def main():
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
        async with httpx.AsyncClient(base_url=server.base, limits=limits, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(count)))

    results = asyncio.run(main())
    assert all(done for done, _ in results) and all(ok for _, ok in results)


def test_metrics_count_the_requests_sent(server, client):
    before = server.metrics()
    prompts = [f"count me {i}" * (i + 1) for i in range(7)]
    usage_prompt = usage_done = 0
    for p in prompts:
        r = client.chat.completions.create(model=MODEL, messages=user(p), max_tokens=40)
        usage_prompt += r.usage.prompt_tokens
        usage_done += r.usage.completion_tokens
    for chunk in client.chat.completions.create(model=MODEL, messages=user("streamed one"), stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.usage:
            usage_prompt += chunk.usage.prompt_tokens
            usage_done += chunk.usage.completion_tokens
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=user("x"), temperature=-3)
    after = server.metrics()

    def diff(name, **labels):
        return sum_samples(after, name, **labels) - sum_samples(before, name, **labels)

    assert diff("mpdp:request_success_total") == 8
    assert diff("mpdp:request_success_total", finished_reason="length") == sum(len(p) > 40 for p in prompts)
    assert diff("mpdp:request_failure_total", reason="bad_request") == 1
    assert diff("mpdp:prompt_tokens_total") == usage_prompt
    assert diff("mpdp:generation_tokens_total") == usage_done
    assert diff("mpdp:e2e_request_latency_seconds_count") == 8
    assert diff("mpdp:time_to_first_token_seconds_count") == 1
    assert diff("mpdp:request_queue_time_seconds_count") == 8
    assert sum_samples(after, "mpdp:worker_up") == 2
    assert sum_samples(after, "mpdp:num_requests_running") == 0
    assert {s for s in ("mpdp:worker_restarts_total", "mpdp:num_requests_waiting") if s in after} == {
        "mpdp:worker_restarts_total", "mpdp:num_requests_waiting"}


def test_continuous_usage_stats_put_usage_on_every_chunk(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=user("abcdefghijkl"), max_tokens=10, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(c.usage is not None for c in chunks)                 # as vLLM's server tests expect
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)
    done = [c.usage.completion_tokens for c in chunks if c.choices]
    assert done == sorted(done) and done[-1] == 10
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    plain = list(client.chat.completions.create(model=MODEL, messages=user("abc"), max_tokens=10, stream=True,
                                                stream_options={"include_usage": True}))
    assert [c.usage is not None for c in plain] == [False] * (len(plain) - 1) + [True]


def test_logprobs_zero_on_completions_gives_a_list_per_token(client):
    r = client.completions.create(model=MODEL, prompt="abc", max_tokens=5, logprobs=0)
    lp = r.choices[0].logprobs
    assert lp.tokens == ["a", "b", "c"] and lp.token_logprobs == [0.0, 0.0, 0.0]
    assert lp.top_logprobs == [{"a": 0.0}, {"b": 0.0}, {"c": 0.0}] and lp.text_offset == [0, 1, 2]
    chat = client.chat.completions.create(model=MODEL, messages=user("hé"), max_tokens=5, logprobs=True,
                                          top_logprobs=1)
    assert [(t.token, t.bytes) for t in chat.choices[0].logprobs.content] == [("h", [104]), ("é", [195, 169])]
