"""One request, three doors, one verdict: the same OpenAI request bodies go through ``mpdp serve``'s
HTTP API (the official ``openai`` client over loopback), an OpenAI batch file (``mpdp generate``)
and the Python API (``Pool.submit`` with the same fields as keywords), and must get the same
verdict (served, or refused with the same status and the same ``param``) and, when served, the
same choices and finish reasons.

The hf engine with the embedded SmolLM2-135M-Instruct at temperature 0 (greedy: the same text
whichever door), a few tokens each. One pool serves both the HTTP server (in this process) and
the Python API; the batch file runs once, as its own command, with every body in it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

import mpdp
from mpdp import errors
from mpdp.openai_api.response import STATUS

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("no_child_left")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "smollm2-135m-instruct"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
Q = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
GREEDY = {"temperature": 0, "max_tokens": 4}

# (case, url, body, the same request through the Python API (None: the API has no such thing),
#  expected status, expected param)
CASES = [
    ("chat", CHAT, {"messages": Q, **GREEDY}, dict(messages=Q, **GREEDY), 200, None),
    ("max_completion_tokens wins", CHAT, {"messages": Q, "temperature": 0, "max_tokens": 6,
                                          "max_completion_tokens": 2},
     dict(messages=Q, temperature=0, max_tokens=2), 200, None),
    ("chat logprobs", CHAT, {"messages": Q, **GREEDY, "logprobs": True, "top_logprobs": 2},
     dict(messages=Q, **GREEDY, logprobs=2), 200, None),
    ("a list of prompts", COMPLETIONS, {"prompt": ["The sky is", "One, two,"], **GREEDY},
     [dict(prompt="The sky is", **GREEDY), dict(prompt="One, two,", **GREEDY)], 200, None),
    ("token ids, logprobs 0", COMPLETIONS, {"prompt": [504, 3658, 314], **GREEDY, "logprobs": 0},
     dict(prompt_token_ids=[504, 3658, 314], **GREEDY, logprobs=0), 200, None),
    ("a negative temperature", CHAT, {"messages": Q, "temperature": -1}, dict(messages=Q, temperature=-1),
     400, "temperature"),
    ("max_tokens ten", COMPLETIONS, {"prompt": "x", "max_tokens": "ten"}, dict(prompt="x", max_tokens="ten"),
     400, "max_tokens"),
    ("a misspelt field, falsy", CHAT, {"messages": Q, "tempreature": 0}, dict(messages=Q, tempreature=0),
     400, "tempreature"),
    ("tools", CHAT, {"messages": Q, "tools": [{"type": "function", "function": {"name": "f"}}]},
     dict(messages=Q, tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    ("a message without a role", CHAT, {"messages": [{"content": "hi"}]}, dict(messages=[{"content": "hi"}]),
     400, "messages"),
    ("a model not served", CHAT, {"model": "gpt-9", "messages": Q}, None, 404, "model"),
]
IDS = [c[0] for c in CASES]


@pytest.fixture(scope="module")
def pool():
    with mpdp.Pool(MODEL, engine="hf", num_workers=1) as pool:
        yield pool


@pytest.fixture(scope="module")
def http(pool):
    """The server's app over ``pool``, served by uvicorn on a loopback port in this process."""
    import uvicorn

    from mpdp.server import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(pool), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    server.should_exit = True
    thread.join(30)
    sock.close()


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Every body as one line of one OpenAI batch file, run once: custom_id -> output line."""
    folder = tmp_path_factory.mktemp("batch")
    src, out = folder / "in.jsonl", folder / "out.jsonl"
    src.write_text("".join(json.dumps({"custom_id": case, "method": "POST", "url": url, "body": body}) + "\n"
                           for case, url, body, *_ in CASES))
    proc = subprocess.run([sys.executable, "-m", "mpdp.cli", "generate", "--input", str(src), "--output", str(out),
                           "--engine", "hf", "--num-workers", "1", "--model", MODEL, "--no-progress"],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=500)
    assert proc.returncode == 1, proc.stderr         # the mistakes failed, each alone
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["custom_id"] for r in rows] == IDS
    return {r["custom_id"]: r for r in rows}


def through_http(base: str, url: str, body: dict) -> tuple[int, dict]:
    r = httpx.post(base + url.removeprefix("/v1"), json={"model": MODEL, **body}, timeout=300)
    return r.status_code, r.json()


def through_python(pool, call) -> tuple[int, object]:
    calls = call if isinstance(call, list) else [call]
    try:
        return 200, [pool.submit(**c).result(timeout=300) for c in calls]
    except (ValueError, TypeError) as exc:
        return STATUS[errors.classify(exc).kind][0], errors.classify(exc)


def answers(body: dict) -> list[tuple[str, str]]:
    return [(c["message"]["content"] if "message" in c else c["text"], c["finish_reason"]) for c in body["choices"]]


@pytest.mark.parametrize("case, url, body, call, status, param", CASES, ids=IDS)
def test_one_verdict_whichever_door(case, url, body, call, status, param, http, pool, batch):
    got_status, got = through_http(http, url, body)
    row = batch[case]
    assert got_status == status and row["response"]["status_code"] == status, (got, row)
    if status != 200:
        assert got["error"]["param"] == param and row["error"]["param"] == param, (got, row)
        assert row["error"]["type"] == got["error"]["type"] and row["error"]["code"] == got["error"]["code"]
        assert row["response"]["body"] is None
        if call is not None:
            py_status, failure = through_python(pool, call)
            assert (py_status, failure.param) == (status, param)
        return
    served = answers(got)
    assert served and answers(row["response"]["body"]) == served
    assert row["error"] is None and row["response"]["body"]["usage"] == got["usage"]
    py_status, completions = through_python(pool, call)
    assert py_status == 200
    assert [(t, r) for c in completions for t, r in zip(c.choices, c.finish_reasons)] == served
    if body.get("logprobs") is not None:
        records = [[r["token"] for r in c.logprobs[0]] for c in completions]
        lp = [c["logprobs"] for c in got["choices"]]
        tokens = [[t["token"] for t in x["content"]] if "content" in x else x["tokens"] for x in lp]
        assert tokens == records == [[t["token"] for t in x["content"]] if "content" in x else x["tokens"]
                                     for x in (c["logprobs"] for c in row["response"]["body"]["choices"])]


def test_the_official_client_reads_the_same_answers(http, batch):
    client = openai.OpenAI(base_url=http, api_key="unused", max_retries=0, timeout=300)
    r = client.chat.completions.create(model=MODEL, messages=Q, **GREEDY)
    assert [(c.message.content, c.finish_reason) for c in r.choices] == answers(batch["chat"]["response"]["body"])
    r = client.completions.create(model=MODEL, prompt=[504, 3658, 314], logprobs=0, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.top_logprobs) == len(lp.tokens) and all(len(d) == 1 for d in lp.top_logprobs)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=Q)
