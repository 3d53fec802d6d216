"""The whole request path with the echo engine: processes, sockets, scheduler, futures."""

import asyncio
import threading
from concurrent.futures import Future

import pytest

import mpdp

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pool():
    with mpdp.Pool(engine="echo", num_workers=2, max_tokens=1000) as p:
        yield p


def test_submit_returns_a_future_of_a_completion(pool):
    fut = pool.submit("What is 2+2?", max_tokens=32, temperature=0.0)
    assert isinstance(fut, Future)
    c = fut.result(timeout=30)
    assert isinstance(c, mpdp.Completion)
    assert (c.text, c.finish_reason, c.choices) == ("What is 2+2?", "stop", ["What is 2+2?"])
    assert c.prompt_tokens == 12 and c.completion_tokens == 12 and c.worker in (0, 1)


def test_max_tokens_cuts_and_reports_length(pool):
    c = pool.submit("abcdefgh", max_tokens=3).result(timeout=30)
    assert (c.text, c.finish_reason) == ("abc", "length")


def test_chat_messages_n_and_stop(pool):
    c = pool.submit(messages=[{"role": "system", "content": "be brief"},
                              {"role": "user", "content": "hi there. more"}], n=3, stop=".").result(timeout=30)
    assert c.choices == ["hi there"] * 3 and c.finish_reasons == ["stop"] * 3


def test_80_threads_each_get_their_own_results(pool):
    n_threads, per_thread = 80, 2000
    results, errors = {}, []
    barrier = threading.Barrier(n_threads)

    def client(t):
        try:
            barrier.wait(timeout=30)
            futures = [pool.submit(f"t{t}-r{i}") for i in range(per_thread)]
            results[t] = [f.result(timeout=60).text for f in futures]
        except Exception as exc:   # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=100)
    assert not errors
    for t in range(n_threads):
        assert results[t] == [f"t{t}-r{i}" for i in range(per_thread)]
    stats = pool.stats()
    assert stats["pending"] == 0
    assert all(w["requests"] > 0 for w in stats["workers"])   # both workers were used


def test_generate_keeps_input_order_and_loses_nothing(pool):
    prompts = [f"p{i}" * (1 + i % 7) for i in range(20000)]
    before = sum(w["requests"] for w in pool.stats()["workers"])
    out = pool.generate(prompts)
    assert [c.text for c in out] == prompts
    assert sum(w["requests"] for w in pool.stats()["workers"]) - before == len(prompts)  # no duplicates


def test_generate_mixed_items_and_per_item_overrides(pool):
    out = pool.generate(["abc", [{"role": "user", "content": "xyz"}],
                         {"prompt": "long prompt", "max_tokens": 4}, {"prompt_token_ids": [1, 2]}])
    assert [c.text for c in out] == ["abc", "xyz", "long", "1 2"]


def test_agenerate(pool):
    async def main():
        return await pool.agenerate([f"a{i}" for i in range(500)])
    assert [c.text for c in asyncio.run(main())] == [f"a{i}" for i in range(500)]


def test_imap_streams_in_order(pool):
    gen = (f"s{i}" for i in range(5000))
    assert [c.text for c in pool.imap(gen, window=64)] == [f"s{i}" for i in range(5000)]


def test_bad_request_raises_at_submit_and_pool_keeps_serving(pool):
    with pytest.raises(ValueError, match="prompt is empty"):
        pool.submit("")
    with pytest.raises(TypeError, match="unknown sampling keyword 'max_token'"):
        pool.submit("x", max_token=3)
    assert pool.submit("still here").result(timeout=30).text == "still here"


def test_stats_shape(pool):
    s = pool.stats()
    assert s["state"] == "running" and len(s["workers"]) == 2
    for w in s["workers"]:
        assert {"index", "pid", "alive", "in_flight", "requests", "tokens", "restarts"} <= set(w)
        assert w["alive"] and w["pid"] > 0


def test_close_with_requests_in_flight_drains_then_refuses():
    p = mpdp.Pool(engine="echo", num_workers=2, engine_options={"delay_s": 0.3})
    futures = [p.submit(f"x{i}") for i in range(50)]
    p.close()                                   # wait=True: every pending request finishes
    assert [f.result(timeout=0).text for f in futures] == [f"x{i}" for i in range(50)]
    with pytest.raises(mpdp.PoolClosed):
        p.submit("late")
    assert p.closed


def test_close_without_waiting_fails_pending_with_a_named_error():
    p = mpdp.Pool(engine="echo", num_workers=1, engine_options={"delay_s": 30})
    futures = [p.submit(f"x{i}") for i in range(10)]
    p.close(wait=False)
    for f in futures:
        with pytest.raises(mpdp.PoolClosed):
            f.result(timeout=10)


def test_many_posting_threads_under_backpressure_never_lose_a_wake_up():
    # Regression: a lost wake-up left commands unseen in the dispatcher's queue forever. Many
    # threads posting while the pool is full is where it showed.
    with mpdp.Pool(engine="echo", num_workers=2, max_pending=200) as p:
        out, errors = {}, []

        def client(t):
            try:
                futures = [p.submit(f"{t}:{i}") for i in range(500)]
                out[t] = [f.result(timeout=60).text for f in futures]
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(t,)) for t in range(40)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=90)
        assert not errors and not any(th.is_alive() for th in threads)
        assert all(out[t] == [f"{t}:{i}" for i in range(500)] for t in range(40))
