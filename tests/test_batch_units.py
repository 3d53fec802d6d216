"""The batch job's parts without a pool: line formats, the id set, resume scans and torn lines,
and the writer/progress pair (the bar never counts a line that is not in the file)."""

from __future__ import annotations

import io
import json
import re
from concurrent.futures import Future

import pytest

from mpdp.batch import formats, output
from mpdp.batch.ids import IdSet
from mpdp.batch.progress import Progress, worker_table
from mpdp.batch.window import OrderedWindow
from mpdp.requests import Completion


def completion(text="hi", n=1, reason="stop"):
    return Completion(text, reason, 3, len(text) * n, 0, [text] * n, [reason] * n)


def chat_line(cid, **body):
    return {"custom_id": cid, "method": "POST", "url": formats.CHAT_URL,
            "body": {"messages": [{"role": "user", "content": "q"}], **body}}


# -- formats -----------------------------------------------------------------------------------------
def test_format_is_detected_from_the_line():
    assert formats.detect(chat_line("a")) == formats.OPENAI
    assert formats.detect({"id": 1, "prompt": "x"}) == formats.SIMPLE


def test_a_first_simple_line_may_carry_a_url_method_or_body():
    # Those are carried fields on any later line: the first one is no different.
    for key in ("url", "method", "body"):
        line = {"id": "a", "prompt": "summarize the page", key: "https://example.com"}
        assert formats.detect(line) == formats.SIMPLE
        assert parse(line, 1, formats.SIMPLE).carry == {key: "https://example.com"}


RULES = formats.Rules(("m",), "echo", None)


def parse(obj, lineno=1, fmt=formats.OPENAI):
    return formats.parse(obj, lineno, fmt, RULES)


def test_simple_lines_split_request_fields_from_carried_ones():
    item = parse({"id": "q1", "prompt": "x", "max_tokens": 4, "answer": "42", "metadata": {"a": 1}},
                 3, formats.SIMPLE)
    assert item.calls == [{"prompt": "x", "max_tokens": 4}]
    assert item.carry == {"answer": "42", "metadata": {"a": 1}} and item.id == "q1"
    assert parse({"prompt": "x"}, 9, formats.SIMPLE).id == 9           # no id: the line number


@pytest.mark.parametrize("obj, fmt, words", [
    ({"id": True, "prompt": "x"}, formats.SIMPLE, "id must be"),
    (chat_line("a"), formats.SIMPLE, "one file holds one format"),
    ({"id": "a", "prompt": "x"}, formats.OPENAI, "has no custom_id"),
    ({**chat_line("a"), "custom_id": 7}, formats.OPENAI, "custom_id must be a non-empty string"),
])
def test_lines_that_are_not_lines_of_the_format_are_format_errors(obj, fmt, words):
    with pytest.raises(formats.FormatError, match=words):
        parse(obj, 5, fmt)


def test_a_first_line_without_custom_id_is_refused_for_that():
    line = chat_line("a")
    del line["custom_id"]
    assert formats.detect(line) == formats.OPENAI
    with pytest.raises(formats.FormatError, match="line 1 has no custom_id"):
        parse(line)


@pytest.mark.parametrize("obj, fmt, param, words", [
    ({"id": "a"}, formats.SIMPLE, "prompt", "none of prompt"),
    ({"id": "a", "prompt": "x", "temperature": -1}, formats.SIMPLE, "temperature", "temperature must be >= 0"),
    ({"id": "a", "prompt": "x", "max_tokens": "ten"}, formats.SIMPLE, "max_tokens", "max_tokens must be an int"),
    ({"id": "a", "prompt": "x", "timeout": -1}, formats.SIMPLE, "timeout", "timeout must be a positive number"),
    ({**chat_line("a"), "method": "GET"}, formats.OPENAI, "method", "method must be POST"),
    ({**chat_line("a"), "url": "/bad_url"}, formats.OPENAI, "url", "url '/bad_url' is not served"),
    ({"custom_id": "a", "method": "POST", "url": formats.CHAT_URL, "body": {"prompt": "x"}}, formats.OPENAI,
     "messages", "messages is required"),
    ({"custom_id": "a", "url": formats.COMPLETIONS_URL, "body": "x"}, formats.OPENAI, None, "must be a JSON object"),
    (chat_line("a", temperature=-1), formats.OPENAI, "temperature", "temperature must be >= 0"),
    (chat_line("a", max_completion_tokens="ten"), formats.OPENAI, "max_completion_tokens", "must be an int"),
    (chat_line("a", tempreature=0), formats.OPENAI, "tempreature", "unknown field 'tempreature'"),
    (chat_line("a", model="other"), formats.OPENAI, "model", "The model `other` does not exist"),
    (chat_line("a", stream=True), formats.OPENAI, "stream", "a batch file cannot stream"),
    (chat_line("a", tools=[{"type": "function"}]), formats.OPENAI, "tools", "not supported"),
    (chat_line("a", messages=[{"content": "no role"}]), formats.OPENAI, "messages", "has no 'role'"),
])
def test_a_line_the_server_would_refuse_fails_alone_naming_the_field(obj, fmt, param, words):
    item = parse(obj, 1, fmt)
    assert item.calls is None and words in str(item.error)
    row = formats.error_row(item, item.error)
    if fmt == formats.SIMPLE:
        assert row["error"] == str(item.error) and row.get("param") == param
        return
    status = 404 if param == "model" else 400
    assert row["response"] == {"status_code": status, "request_id": row["response"]["request_id"], "body": None}
    assert row["error"]["param"] == param and words in row["error"]["message"]
    assert not row["error"]["message"].startswith(("ValueError", "TypeError", "InvalidRequest"))


def test_decode_names_the_line_of_bad_json():
    with pytest.raises(formats.FormatError, match="line 4 is not JSON"):
        formats.decode(b"{oops\n", 4)
    with pytest.raises(formats.FormatError, match="line 2 is a JSON list"):
        formats.decode("[1]", 2)
    with pytest.raises(formats.FormatError, match="line 3 is JSON nested too deeply"):
        formats.decode("[" * 100_000 + "]" * 100_000, 3)


def test_openai_bodies_map_onto_sampling_keywords():
    item = parse({**chat_line("a", model="m", max_completion_tokens=7, max_tokens=3, temperature=0.5,
                              stream=False, user="u", logprobs=True), "metadata": {"k": 1}})
    assert item.calls == [{"messages": [{"role": "user", "content": "q"}], "max_tokens": 7, "temperature": 0.5,
                           "logprobs": 0}]
    assert (item.kind, item.parsed.model, item.carry, item.error) == ("chat", "m", {"metadata": {"k": 1}}, None)
    ids = parse({"custom_id": "b", "url": formats.COMPLETIONS_URL, "body": {"prompt": [1, 2]}})
    assert ids.calls == [{"prompt_token_ids": [1, 2]}] and ids.kind == "completion"
    many = parse({"custom_id": "c", "url": formats.COMPLETIONS_URL, "body": {"prompt": ["x", "y"]}})
    assert many.calls == [{"prompt": "x"}, {"prompt": "y"}]


def test_openai_output_rows_have_the_batch_output_shape():
    chat = parse({**chat_line("a"), "answer": "42"})
    row = formats.result_row(chat, [completion("hey", n=2)])
    assert row["custom_id"] == "a" and row["error"] is None and row["answer"] == "42"
    assert row["id"].startswith("batch_req_") and row["response"]["status_code"] == 200
    body = row["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "m"
    assert [c["message"]["content"] for c in body["choices"]] == ["hey", "hey"]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    text = parse({"custom_id": "b", "url": formats.COMPLETIONS_URL, "body": {"prompt": ["p", "q"], "model": "m"}})
    tbody = formats.result_row(text, [completion("out"), completion("two", reason="length")])["response"]["body"]
    assert tbody["object"] == "text_completion" and tbody["model"] == "m"
    assert [(c["index"], c["text"], c["finish_reason"]) for c in tbody["choices"]] == [
        (0, "out", "stop"), (1, "two", "length")]


def test_openai_error_rows_say_whose_fault_it_was():
    from mpdp import errors

    item = parse(chat_line("a"))
    bad = formats.error_row(item, ValueError("temperature must be >= 0, got -1.0"))
    assert bad["response"]["status_code"] == 400 and bad["response"]["body"] is None
    assert bad["error"] == {"message": "temperature must be >= 0, got -1.0", "type": "invalid_request_error",
                            "param": "temperature", "code": None}
    ours = formats.error_row(item, errors.EngineError("RuntimeError: boom"))
    assert ours["response"]["status_code"] == 500 and ours["error"]["type"] == "server_error"
    assert ours["error"]["message"] == "RuntimeError: boom"


def test_ids_share_a_key_only_by_chance():
    # Python's hash: hash(-1) == hash(-2), and ints equal modulo 2**61 - 1 share a hash.
    pairs = [(-1, -2), (1, 2 ** 61), (2 ** 64, 2 ** 64 + 2 ** 61 - 1), (-(2 ** 63), 2 ** 63 - 1),
             (10 ** 30, str(10 ** 30)), (7, "7")]
    for a, b in pairs:
        assert formats.id_key(a) != formats.id_key(b), (a, b)
    assert all(-(2 ** 63) <= formats.id_key(i) < 2 ** 63 for i in (-(2 ** 63), 2 ** 63 - 1, 2 ** 64, -(2 ** 70), "x"))


def test_id_set_finds_repeats_and_members():
    s = IdSet()
    for item_id in ["a", "b", 3, "a", "3"]:
        s.add(formats.id_key(item_id))
    assert s.freeze() == {formats.id_key("a")}
    assert formats.id_key("b") in s and formats.id_key(3) in s and formats.id_key("c") not in s
    assert formats.id_key("3") != formats.id_key(3) and len(s) == 5


# -- resume scan ---------------------------------------------------------------------------------------
def rows_text(*ids):
    return "".join(json.dumps({"id": i, "text": "t"}) + "\n" for i in ids)


def test_a_torn_last_line_is_cut_off_before_appending(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(rows_text("a", "b") + '{"id": "c", "te')
    found = output.scan(str(path), formats.SIMPLE)
    assert found.lines == 2 and found.torn_bytes == len('{"id": "c", "te')
    assert formats.id_key("a") in found.ids and formats.id_key("c") not in found.ids
    with output.open_for_append(str(path), found) as f:
        f.write(b'{"id": "c", "text": "t"}\n')
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "b", "c"]


def test_a_complete_last_line_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(rows_text("a") + json.dumps({"id": "b", "text": "t"}))
    found = output.scan(str(path), formats.SIMPLE)
    assert found.lines == 2 and found.needs_newline and found.torn_bytes == 0
    output.open_for_append(str(path), found).close()
    assert path.read_text() == rows_text("a", "b")


def test_a_foreign_line_stops_the_resume(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(rows_text("a") + "garbage\n" + rows_text("b"))
    with pytest.raises(output.ResumeError, match="line 2 of"):
        output.scan(str(path), formats.SIMPLE)
    path.write_text(rows_text("a"))                          # simple rows have no custom_id
    with pytest.raises(output.ResumeError, match="not a openai-format"):
        output.scan(str(path), formats.OPENAI)


def test_writer_fsyncs_on_its_clock_and_at_close(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(output.os, "fsync", lambda fd: synced.append(fd))
    writer = output.DurableWriter(open(tmp_path / "o", "wb"), fsync_every=3600)
    writer.write([({"id": 1}, 0, 0)])
    writer.maybe_sync()
    assert synced == []
    writer.close()
    assert len(synced) == 1
    eager = output.DurableWriter(open(tmp_path / "p", "wb"), fsync_every=1e-9)
    eager.write([({"id": 1}, 0, 0)])
    assert len(synced) == 2
    eager.close()


# -- writer + progress ---------------------------------------------------------------------------------
class BarWatcher(io.StringIO):
    """tqdm's stream: at every redraw, compare the count the bar shows with the lines in the file."""

    def __init__(self, path):
        super().__init__()
        self.path, self.frames, self.closed_bar = path, [], False

    def write(self, text):
        m = re.findall(r"(\d+)/(\d+) \[", text)
        if m and not self.closed_bar:
            shown = int(m[-1][0])
            with open(self.path, "rb") as f:
                in_file = f.read().count(b"\n")
            self.frames.append((shown, in_file))
        return super().write(text)


def test_the_bar_counts_exactly_the_lines_in_the_file_through_a_burst(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b"")
    watcher = BarWatcher(path)
    progress = Progress(300, 0, stream=watcher, mininterval=0)     # redraw at every update
    writer = output.DurableWriter(open(path, "ab"), 3600, progress.advance)

    def render(item, outcome):
        return formats.result_row(item, [outcome]), outcome.completion_tokens, outcome.worker

    window = OrderedWindow(8192, render, writer)
    try:
        burst(window, progress)
    finally:
        progress.close()
        writer.close()
        watcher.closed_bar = True
    assert watcher.frames[-1] == (300, 300)
    assert len(watcher.frames) >= 3 and all(shown == in_file for shown, in_file in watcher.frames), watcher.frames
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(300)]


def burst(window, progress):
    futures = []
    for i in range(300):
        future = Future()
        window.push(formats.Item(f"r{i}", "simple", {"prompt": "x"}), future)
        futures.append(future)
    # The first three finish while the window is far from full: written (and shown) at once, where
    # Pool.imap would have held them until 8192 were in flight or the input ended.
    for f in futures[:3]:
        f.set_result(completion())
    assert window.drain() == 3 and progress.written == 3
    # A slow head with a burst behind it: nothing may be shown before it, then all of it at once.
    for f in futures[4:]:
        f.set_result(completion())
    assert window.drain() == 0
    futures[3].set_result(completion())
    assert window.drain() == 297


def test_a_pool_failure_at_the_head_keeps_what_was_rendered_before_it(tmp_path):
    path = tmp_path / "out.jsonl"
    writer = output.DurableWriter(open(path, "wb"), 3600)

    def render(item, outcome):
        if isinstance(outcome, RuntimeError):
            raise outcome
        return {"id": item.id}, 0, 0

    window = OrderedWindow(10, render, writer)
    for i, value in enumerate([completion(), RuntimeError("broken"), completion()]):
        f = Future()
        f.set_exception(value) if isinstance(value, BaseException) else f.set_result(value)
        window.push(formats.Item(i, "simple", {}), f)
    with pytest.raises(RuntimeError, match="broken"):
        window.drain()
    writer.close()
    assert path.read_text() == '{"id": 0}\n'


def test_worker_table_totals():
    progress = Progress(20, 0, enabled=False)
    progress.advance([({}, 10, 0)] * 5 + [({}, 10, 1)] * 7)
    table = worker_table(progress, {"workers": [{"index": 0, "restarts": 1}, {"index": 1, "restarts": 0}]})
    last = table.splitlines()[-1].split()
    assert table.splitlines()[0].split() == ["worker", "results", "tokens", "restarts"]
    assert last == ["total", "12", "120", "1"]
