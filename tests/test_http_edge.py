"""The server's edge: what reaches it before (or around) the routes. An upload cut off at the
size limit while it is read, the bind rule of ``mpdp.serve()``, a request's prompts admitted all
at once, requests cancelled at the end of the shutdown grace answered in OpenAI's shape, and pool
configs from JSON that fail naming their field. Servers are real ``mpdp serve`` processes on
127.0.0.1 (echo engine: this is plumbing); every wait is bounded; nothing asserts on timings."""

from __future__ import annotations

import asyncio
import json
import select
import signal
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import openai
import psutil
import pytest

import mpdp
from conftest import wait_until
from mpdp.config import PoolConfig
from mpdp.openai_api.response import APIError
from mpdp.server.admission import Admission
from mpdp.server.app import MAX_BODY_BYTES
from mpdp.server.bind import check_bind
from test_server_support import ServerProcess, sum_samples

pytestmark = pytest.mark.timeout(300)


# -- PoolConfig.from_json ---------------------------------------------------------------------------
@pytest.mark.parametrize("text, error, field", [
    ('{"engine_options": {"a": ' + "[" * 100_000 + "]" * 100_000 + "}}", ValueError, "'engine_options'"),
    ('{"model": "m", "gpus": ' + "[" * 100_000, ValueError, "'gpus'"),
    ("[" * 100_000, ValueError, "the pool config"),
    ('{"sampling": null}', TypeError, "sampling"),
    ('{"sampling": [1, 2]}', TypeError, "sampling"),
    ('{"sampling": "greedy"}', TypeError, "sampling"),
    ('["model"]', TypeError, "pool config"),
], ids=["deep-engine-options", "deep-gpus", "deep-top-level", "sampling-null", "sampling-list", "sampling-str",
        "not-an-object"])
def test_a_bad_pool_config_json_is_an_error_naming_its_field(text, error, field):
    with pytest.raises(error) as info:
        PoolConfig.from_json(text)
    assert field in str(info.value)


def test_a_good_pool_config_still_round_trips_through_json():
    config = PoolConfig(engine="echo", engine_options={"a": [[1]]}, sampling={"max_tokens": 3})
    assert PoolConfig.from_json(config.to_json()) == config


# -- the bind rule ----------------------------------------------------------------------------------
class _Untouchable:
    """A stand-in pool: serve() must refuse before it uses the pool (or binds anything)."""

    def __getattr__(self, name):
        raise AssertionError(f"serve() used pool.{name} before refusing the bind")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com"])
def test_serve_refuses_a_non_loopback_host_without_a_key_before_binding(host):
    with pytest.raises(ValueError, match="not a loopback address.*api_key.*allow_unauthenticated"):
        mpdp.serve(_Untouchable(), host=host, port=0)


def test_the_bind_rule_is_the_command_lines():
    assert check_bind("127.0.0.1", None) is None and check_bind("::1", None) is None
    assert check_bind("localhost", "k") == "every /v1 request needs the API key"
    assert "needs the API key" in check_bind("0.0.0.0", "k")
    assert "WITHOUT an API key" in check_bind("0.0.0.0", None, allow_unauthenticated=True)
    with pytest.raises(ValueError, match="--api-key.*--allow-unauthenticated"):
        check_bind("0.0.0.0", None)


# -- a request's prompts admitted at once -----------------------------------------------------------
def test_multi_prompt_requests_take_their_places_at_once(tmp_path):
    # max_pending 4. Four one-prompt requests fill the pool and finish one by one (echo delay_s,
    # arrivals apart); two 3-prompt requests wait meanwhile. Places taken one at a time went
    # 1-1-1-1 to the two waiters, each then waiting for a place only the other held, until
    # queue_timeout; taken all at once, one request runs, then the other.
    s = ServerProcess("--engine", "echo", "--num-workers", "1", "--served-model-name", "m", "--max-pending", "4",
                      "--queue-timeout", "60", "--engine-option", "delay_s=2", tmp_path=tmp_path)
    client = openai.OpenAI(base_url=s.base, api_key="unused", max_retries=0, timeout=120)
    results: dict = {}

    def complete(name, prompt):
        try:
            results[name] = client.completions.create(model="m", prompt=prompt, max_tokens=50)
        except Exception as exc:            # noqa: BLE001 - reported by the assertion below
            results[name] = exc

    def running() -> float:
        return sum_samples(s.metrics(), "mpdp:num_requests_running")

    threads = []
    try:
        for i in range(4):
            threads.append(threading.Thread(target=complete, args=(f"one{i}", f"blocker {i}")))
            threads[-1].start()
            wait_until(lambda: running() >= i + 1, 60, what=f"blocker {i} to run")
        for name in ("a", "b"):
            threads.append(threading.Thread(target=complete, args=(name, [f"{name}{j}" for j in range(3)])))
            threads[-1].start()
        for t in threads:
            t.join(150)
        for name in ("a", "b"):
            r = results[name]
            assert not isinstance(r, Exception), f"request {name}: {r!r}"
            assert sorted(c.text for c in r.choices) == [f"{name}{j}" for j in range(3)]
        assert all(results[f"one{i}"].choices[0].text == f"blocker {i}" for i in range(4))
    finally:
        assert s.stop() == 0


def test_admission_grants_whole_requests_in_arrival_order():
    async def settle():                    # let every task that can run, run
        for _ in range(10):
            await asyncio.sleep(0)

    async def scenario():
        room = Admission(4, timeout=None)
        await room.take(4)
        a = asyncio.ensure_future(room.take(3))
        b = asyncio.ensure_future(room.take(3))
        c = asyncio.ensure_future(room.take(1))
        await settle()
        assert room.waiting == 7
        for _ in range(2):                  # places coming back one at a time go to no one...
            room.give(1)
            await settle()
            assert not (a.done() or b.done() or c.done())
        room.give(1)                        # ...until the first in line has all of its own
        await settle()
        assert a.done() and not b.done() and not c.done()
        room.give(1)
        await settle()
        assert not b.done() and not c.done()    # c would fit, but b came first
        b.cancel()                          # the one ahead leaves: the next ones move up
        await settle()
        assert c.done() and room.free == 0 and room.waiting == 0
        d = asyncio.ensure_future(room.take(2))
        await settle()
        room.close(lambda: APIError(503, "closing"))
        with pytest.raises(APIError):
            await d
        with pytest.raises(APIError):
            await room.take(1)
        with pytest.raises(APIError) as info:
            await Admission(4, None).take(5)
        assert info.value.status == 400
        full = Admission(1, timeout=0.01)   # nothing gives its place back: queue_timeout, then 503
        await full.take(1)
        with pytest.raises(APIError) as info:
            await full.take(1)
        assert info.value.status == 503 and info.value.code == "queue_timeout" and full.waiting == 0

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_request_that_can_never_fit_is_a_400_at_once(tmp_path):
    s = ServerProcess("--engine", "echo", "--num-workers", "1", "--served-model-name", "m", "--max-pending", "4",
                      "--queue-timeout", "60", tmp_path=tmp_path)
    client = openai.OpenAI(base_url=s.base, api_key="unused", max_retries=0, timeout=30)
    try:
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="m", prompt=[f"p{j}" for j in range(5)], max_tokens=5)
        assert info.value.body["param"] == "prompt" and "max_pending=4" in info.value.body["message"]
        r = client.completions.create(model="m", prompt=[f"p{j}" for j in range(4)], max_tokens=5)
        assert [c.text for c in r.choices] == ["p0", "p1", "p2", "p3"]
    finally:
        assert s.stop() == 0


# -- an upload cut off at the size limit ------------------------------------------------------------
def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except ConnectionResetError:          # the server closed with our upload unread: what came is kept
        return b""


def _read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """Status, headers and body of one HTTP/1.1 response (read until its length, or the close)."""
    sock.setblocking(True)
    sock.settimeout(60)
    data = b""
    while b"\r\n\r\n" not in data and (piece := _recv(sock)):
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)) and (piece := _recv(sock)):
        body += piece
    return int(lines[0].split()[1]), headers, body


def _upload_chunked(sock: socket.socket, pieces) -> int:
    """Send ``pieces`` as a chunked body until the server answers (or closes); the bytes sent."""
    sock.setblocking(False)
    sent = 0
    for piece in pieces:
        view = memoryview(b"%x\r\n" % len(piece) + piece + b"\r\n")
        while view:
            readable, writable, _ = select.select([sock], [sock], [], 60)
            if readable:
                return sent                # an answer (or the close) before the body ended
            assert writable, "the server neither read nor answered for 60s"
            try:
                n = sock.send(view)
            except BlockingIOError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                return sent
            view, sent = view[n:], sent + n
    sock.sendall(b"0\r\n\r\n")
    return sent


def test_a_chunked_upload_is_cut_off_at_the_limit_while_it_is_read(tmp_path):
    s = ServerProcess("--engine", "echo", "--num-workers", "1", "--served-model-name", "m", tmp_path=tmp_path)
    server = psutil.Process(s.proc.pid)
    url = urlsplit(s.url)
    upload, piece = 256 << 20, 1 << 20
    assert upload > 4 * MAX_BODY_BYTES
    client = openai.OpenAI(base_url=s.base, api_key="unused", max_retries=0, timeout=30)
    try:
        assert client.completions.create(model="m", prompt="warm", max_tokens=4).choices[0].text == "warm"
        before = server.memory_info().rss
        peak, done = [before], threading.Event()

        def sample() -> None:              # RSS while the upload runs: a body read whole is freed after
            while not done.is_set():
                peak[0] = max(peak[0], server.memory_info().rss)
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        def pieces():                      # a valid JSON body far over the limit, made as it is sent
            yield b'{"model": "m", "max_tokens": 1, "prompt": "'
            for _ in range(upload // piece):
                yield b"a" * piece
            yield b'"}'

        with socket.create_connection((url.hostname, url.port), timeout=60) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            sent = _upload_chunked(sock, pieces())
            status, headers, body = _read_response(sock)
        done.set()
        sampler.join(10)
        assert sent < upload // 2, f"the client sent {sent} of {upload} bytes before the answer"
        grown = peak[0] - before
        assert grown < upload // 4, f"the server grew by {grown >> 20} MiB for a {upload >> 20} MiB upload"
        assert status == 413, (status, body[:200])
        error = json.loads(body)["error"]
        assert error["type"] == "invalid_request_error" and str(MAX_BODY_BYTES) in error["message"]
        assert headers.get("connection") == "close"

        # A body declared too large is refused before it is read, and its connection closed too.
        with socket.create_connection((url.hostname, url.port), timeout=60) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n{" % upload)
            status, headers, body = _read_response(sock)
        assert status == 413 and headers.get("connection") == "close" and "error" in json.loads(body)

        # The server still serves.
        assert client.completions.create(model="m", prompt="after", max_tokens=5).choices[0].text == "after"
    finally:
        assert s.stop() == 0


# -- requests cut off at the end of the shutdown grace ----------------------------------------------
@pytest.mark.parametrize("how", ["grace-ends", "second-signal"])
def test_requests_left_when_the_grace_ends_get_a_503_or_an_error_event_then_done(tmp_path, how):
    # delay_s=120: every request is held until the grace ends (1 s, or a second SIGTERM). Four hold
    # the pool's places (two streamed, two not); a fifth waits for room.
    grace = "1" if how == "grace-ends" else "600"
    s = ServerProcess("--engine", "echo", "--num-workers", "1", "--served-model-name", "m", "--max-pending", "4",
                      "--engine-option", "delay_s=120", "--shutdown-grace", grace, tmp_path=tmp_path)
    results: dict = {}

    def post(name):
        try:
            r = httpx.post(s.base + "/chat/completions", json=_chat(name), timeout=90)
            results[name] = (r.status_code, r.headers.get("content-type", ""), r.text)
        except Exception as exc:           # noqa: BLE001 - reported by the assertions below
            results[name] = exc

    def stream(name):
        try:
            with httpx.stream("POST", s.base + "/chat/completions", json=_chat(name, stream=True), timeout=90) as r:
                results[name] = (r.status_code, [line for line in r.iter_lines() if line.startswith("data: ")])
        except Exception as exc:           # noqa: BLE001
            results[name] = exc

    def metric(name: str) -> float:
        return sum_samples(s.metrics(), name)

    threads = [threading.Thread(target=f, args=(name,)) for f, name in
               ((post, "plain 1"), (post, "plain 2"), (stream, "stream 1"), (stream, "stream 2"))]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: metric("mpdp:num_requests_running") == 4, 60, what="four requests to run")
        threads.append(threading.Thread(target=post, args=("waiting",)))
        threads[-1].start()
        wait_until(lambda: metric("mpdp:num_requests_waiting") == 1, 60, what="a request to wait for room")
        s.proc.send_signal(signal.SIGTERM)
        if how == "second-signal":
            s.wait_line("draining 5 requests in flight", 60)
            s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(90) == 0
        for t in threads:
            t.join(60)
    finally:
        assert s.stop() == 0
    for name in ("plain 1", "plain 2", "waiting"):
        status, kind, text = results[name] if isinstance(results[name], tuple) else (results[name], "", "")
        assert status == 503 and kind.startswith("application/json"), (name, results[name])
        assert json.loads(text)["error"]["code"] == "shutting_down"
    for name in ("stream 1", "stream 2"):
        assert isinstance(results[name], tuple), (name, results[name])
        status, lines = results[name]
        assert status == 200 and lines[-1] == "data: [DONE]", (name, lines[-3:])
        assert json.loads(lines[-2][6:])["error"]["code"] == "shutting_down"
        assert "".join(c["delta"].get("content") or "" for line in lines[:-2]
                       for c in json.loads(line[6:])["choices"]), "the stream sent nothing before the cut"
    said = "grace of 1s passed: cancelling 5" if how == "grace-ends" else "SIGTERM again: cancelling"
    assert any(said in line for line in s.lines), s.lines
    log = "\n".join(s.lines)
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log


def _chat(text: str, **extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 500, **extra}
