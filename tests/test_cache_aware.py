"""routing="cache_aware" alone: pure code, no processes (one small echo pool at the end)."""

import random

import pytest

from mpdp.engines.base import EngineRequest
from mpdp.requests import estimate_cost
from mpdp.routing import POLICIES, CacheAware, Scheduler, Ticket, WorkerLoad
from mpdp.routing.cache_aware import PrefixKey

WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud".split()


def doc(seed: int, tokens: int = 3000) -> str:
    """~``tokens`` tokens of text (4 characters a token, as estimate_cost counts)."""
    rng = random.Random(seed)
    out, n = [], 0
    while n < tokens * 4:
        w = rng.choice(WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)


DOCS = {name: doc(i) for i, name in enumerate("ABCDEFGH")}


def ticket(policy, i=0, prompt=None, messages=None, ids=None, max_tokens=8):
    req = EngineRequest(i, prompt, messages, ids, {"max_tokens": max_tokens})
    return Ticket(i, estimate_cost(req), policy.route_key(req))


def qa(policy, name, q, i=0):
    return ticket(policy, i, prompt=f"{DOCS[name]}\n\nQuestion {q}: what does it say?")


def setup(loads, cached=(), kv=None):
    """A policy, and one WorkerLoad per entry of ``loads`` (outstanding tokens; a worker with some
    holds one request of that cost, one with 0 holds nothing: it is idle); ``cached`` lists
    (worker, document) pairs already sent there."""
    p = CacheAware()
    workers = []
    for i, out in enumerate(loads):
        p.worker_added(i, {"kv_cache_tokens": kv} if kv else {})
        held = {-1 - i: Ticket(-1 - i, out)} if out else {}
        workers.append(WorkerLoad(i, capacity=1000, in_flight=held, outstanding=out))
    for n, (w, name) in enumerate(cached):
        p.assigned(qa(p, name, f"seed{n}", 1000 + n), w)
    return p, workers


# A document's request costs ~3,020 tokens (estimate), ~75 once cached: saved ~2,940, so the
# allowance is min(4 x the least score, 16 x 2,940 = ~47,000) while every worker holds a request.
# (case, outstanding tokens per worker (0: idle), (worker, document) already cached, document asked, expected worker)
TABLE = [
    ("match, equal loads", [0, 0], [(1, "A")], "A", 1),
    ("match, cached worker busier within the band", [20_000, 14_000], [(0, "A")], "A", 0),
    ("match, cached worker 4x behind: still kept", [40_000, 10_000], [(0, "A")], "A", 0),
    ("match, cached worker beyond the band", [30_000, 2_000], [(0, "A")], "A", 1),
    ("match, cached worker beyond what the match is worth", [80_000, 20_000], [(0, "A")], "A", 1),
    ("match, the other one idle: it takes the prefill", [5_000, 0], [(0, "A")], "A", 1),
    ("match, the other idle but the cached one ends sooner", [2_000, 0], [(0, "A")], "A", 0),
    ("miss: least loaded, not the emptiest tree", [6_000, 5_000], [(1, "B"), (1, "C")], "A", 1),
    ("miss, equal loads: lower index", [0, 0], [(1, "B")], "A", 0),
    ("miss, cached worker idle: still least loaded", [7_000, 6_000], [(0, "B")], "A", 1),
    ("longest match among several", [0, 0, 0], [(0, "B"), (2, "A")], "A", 2),
    ("match on both: the less loaded", [9_000, 8_000], [(0, "A"), (1, "A")], "A", 1),
    ("three workers: affinity kept near the lowest load", [30_000, 25_000, 24_000], [(0, "A")], "A", 0),
    ("three workers, one idle: the idle one takes it", [30_000, 25_000, 0], [(0, "A")], "A", 2),
]


@pytest.mark.parametrize("case,loads,cached,asked,expected", TABLE, ids=[row[0] for row in TABLE])
def test_routing_table(case, loads, cached, asked, expected):
    p, workers = setup(loads, cached)
    assert p.choose(qa(p, asked, "new"), workers).index == expected


def test_a_short_shared_prefix_buys_little_imbalance():
    header = "You are a careful assistant. " * 20            # one whole 512-character block, then more
    for loads, expected in (([12_000, 9_000], 1), ([10_000, 9_000], 0)):
        p, workers = setup(loads)
        p.assigned(ticket(p, 1, prompt=header + DOCS["A"]), 0)
        t = ticket(p, 2, prompt=header + DOCS["B"])
        assert p.matches(t.route, workers) == {0: 1, 1: 0}
        # 128 tokens saved buy 16 x 128 = 2,048 tokens of queue: not 3,000 behind, 1,000 yes
        assert p.choose(t, workers).index == expected, loads
    p2, workers2 = setup([9_000, 9_000])
    p2.assigned(ticket(p2, 1, prompt=header + DOCS["A"]), 0)
    assert p2.choose(ticket(p2, 2, prompt=header + DOCS["B"]), workers2).index == 0   # a tie: the match wins


def test_a_burst_of_new_documents_keeps_each_on_one_worker():
    """Many callers at once, every document new: its follow-ups stay with it while the loads
    swing by a few documents' prefills (a 0.5 band spilled them, duplicating documents)."""
    p = CacheAware()
    s = Scheduler(policy=p)
    for i in range(2):
        s.add_worker(i, 1000)
    order = [name for name in "ABCDEFGH" for _ in range(6)]
    random.Random(3).shuffle(order)
    homes: dict[str, set] = {}
    for i, name in enumerate(order):
        s.enqueue(qa(p, name, i, i=i))
        s.schedule()
        homes.setdefault(name, set()).add(s.where(i))
    assert sum(len(ws) > 1 for ws in homes.values()) <= 1   # at most one met an empty worker
    assert set().union(*homes.values()) == {0, 1}            # and the documents are shared out


def test_ties_break_on_requests_in_flight_then_index():
    p, workers = setup([0, 0, 0])
    workers[0].in_flight = {1: Ticket(1), 2: Ticket(2)}
    workers[1].in_flight = {3: Ticket(3)}
    workers[2].in_flight = {4: Ticket(4)}
    assert p.choose(qa(p, "A", 1), workers).index == 1


def test_the_cost_charged_is_the_uncached_part_and_outstanding_returns_to_zero():
    p = CacheAware()
    s = Scheduler(policy=p)
    s.add_worker(0, 100)
    s.add_worker(1, 100)
    s.enqueue(qa(p, "B", 0, i=100))                         # the other worker is busy, not idle
    s.schedule()
    first = qa(p, "A", 0, i=0)
    full = first.cost
    s.enqueue(first)
    s.schedule()
    home = s.where(0)
    assert home != s.where(100)
    assert s.workers[home].outstanding == full              # a miss pays the whole prompt
    second = qa(p, "A", 1, i=1)
    s.enqueue(second)
    s.schedule()
    assert s.where(1) == home
    assert second.cost < 100 and second.route.cost == full  # ~3,000 tokens cached: ~20 left to do
    assert s.workers[home].outstanding == full + second.cost
    s.finished(home, 0)
    s.finished(home, 1)
    assert s.workers[home].outstanding == 0


def test_a_retry_after_a_crash_is_charged_in_full_on_a_cold_worker():
    p = CacheAware()
    s = Scheduler(policy=p)
    for i in range(2):
        s.add_worker(i, 100)
    other = qa(p, "B", 0, i=100)                           # keeps the other worker from idling
    s.enqueue(other)
    s.schedule()
    first, second = qa(p, "A", 0, i=0), qa(p, "A", 1, i=1)
    s.enqueue(first)
    s.schedule()
    home = s.where(0)
    s.enqueue(second)
    s.schedule()
    assert s.where(1) == home and second.cost < 100
    retried, failed = s.worker_died(home)
    assert {x.id for x in retried} == {0, 1} and not failed
    assert p.cached_tokens(home) == 0
    s.add_worker(home, 100)                                 # restarted: cold
    s.schedule()
    assert first.cost == first.route.cost                   # nothing cached anywhere: the full prefill
    assert s.where(1) == s.where(0) and second.cost < 100   # and its follow-up goes with it
    assert sum(w.outstanding for w in s.workers.values()) == first.cost + second.cost + other.cost


def test_eviction_follows_the_reported_kv_cache():
    p, workers = setup([0, 0], kv=3_000)                     # 4,500 tokens at 1.5: 1.5 documents
    for n, name in enumerate("ABC"):
        p.assigned(qa(p, name, n, i=n), 0)
    assert p.cached_tokens(0) <= 4_500
    whole = len(DOCS["C"]) // 512                          # its whole blocks; the question differs
    assert p.matches(qa(p, "A", 9).route, workers)[0] == 0          # the oldest document went first,
    assert 0 < p.matches(qa(p, "B", 9).route, workers)[0] < whole   # the next lost its tail (as vLLM's),
    assert p.matches(qa(p, "C", 9).route, workers)[0] == whole      # the newest is whole
    assert p.choose(qa(p, "A", 9), [WorkerLoad(0, 10, outstanding=100), WorkerLoad(1, 10)]).index == 1


def test_a_used_prefix_is_refreshed_and_outlives_newer_ones():
    p, workers = setup([0, 0], kv=4_800)                     # 7,200 tokens: two documents and a half
    p.assigned(qa(p, "A", 0), 0)
    p.assigned(qa(p, "B", 0), 0)
    p.assigned(qa(p, "A", 1), 0)                             # A used again: B is now the oldest
    p.assigned(qa(p, "C", 0), 0)
    assert p.matches(qa(p, "A", 2).route, workers)[0] >= 20
    assert p.matches(qa(p, "B", 2).route, workers)[0] < 20


def test_the_default_budget_when_a_worker_reports_no_kv_cache():
    p = CacheAware(default_cache_tokens=10_000)
    p.worker_added(0, {"kv_cache_tokens": None, "max_model_len": 4096})
    p.worker_added(1, {"kv_cache_tokens": 1_000_000})
    for n, name in enumerate("ABCDEFGH"):
        p.assigned(qa(p, name, n), 0)
        p.assigned(qa(p, name, n), 1)
    assert p.cached_tokens(0) <= 15_000 < p.cached_tokens(1)


def test_worker_death_drops_its_entries_and_a_restart_starts_empty():
    p, workers = setup([0, 0], [(0, "A"), (1, "B"), (0, "C"), (1, "C")])
    before = p.entries()
    p.worker_removed(0)
    assert p.cached_tokens(0) == 0
    assert p.entries() < before
    assert p.matches(qa(p, "C", 1).route, workers[1:])[1] >= 20  # worker 1's copy is intact
    p.worker_added(0, {})
    assert p.matches(qa(p, "A", 1).route, workers) == {0: 0, 1: 0}
    assert p.choose(qa(p, "A", 1), [WorkerLoad(0, 10, outstanding=50), WorkerLoad(1, 10)]).index == 1
    p.worker_removed(1)
    assert p.entries() == 0
    p.worker_added(1, {})
    p.assigned(qa(p, "A", 1), 1)                             # READY again without a removal: cold too
    p.worker_added(1, {})
    assert p.entries() == 0


def test_token_prompts_match_on_their_shared_prefix():
    p, workers = setup([0, 0])
    rng = random.Random(1)
    prefix = [rng.randrange(50_000) for _ in range(3000)]
    p.assigned(ticket(p, 1, ids=prefix + [1, 2, 3]), 1)
    t = ticket(p, 2, ids=prefix + [7, 8, 9, 10])
    assert p.matches(t.route, workers) == {0: 0, 1: 3000 // 128}
    assert p.choose(t, workers).index == 1
    other = ticket(p, 3, ids=[5] + prefix)                   # the same ids shifted: no prefix shared
    assert p.choose(other, workers).index == 0


def test_chat_prompts_sharing_a_system_prompt_match_whatever_the_question():
    p, workers = setup([0, 0])
    system = {"role": "system", "content": DOCS["A"]}
    demos = [{"role": "user", "content": "Question: 2+2?"}, {"role": "assistant", "content": "Answer: 4"}]

    def chat(i, sys_msg, q):
        return ticket(p, i, messages=[sys_msg, *demos, {"role": "user", "content": f"Question: {q}?"}])

    p.assigned(chat(1, system, "what is the capital of France"), 1)
    same = chat(2, system, "how many legs has a spider")
    assert p.matches(same.route, workers)[1] >= 3000 * 4 // 512 - 1
    assert p.choose(same, workers).index == 1
    other_program = chat(3, {"role": "system", "content": DOCS["B"]}, "how many legs has a spider")
    assert p.choose(other_program, workers).index == 0
    # the same characters as a plain prompt are another input to the engine: no match
    plain = ticket(p, 4, prompt=DOCS["A"] * 2)
    assert p.matches(plain.route, workers) == {0: 0, 1: 0}


def test_route_key_touches_no_state_and_short_prompts_have_no_key():
    p = CacheAware()
    p.worker_added(0, {})
    key = p.route_key(EngineRequest(0, DOCS["A"], None, None, {}))
    assert isinstance(key, PrefixKey) and len(key.blocks) == len(DOCS["A"]) // 512
    assert p.entries() == 0
    assert p.route_key(EngineRequest(0, "short", None, None, {})) is None
    t = ticket(p, 1, prompt="short")
    assert p.choose(t, [WorkerLoad(0, 4, outstanding=9), WorkerLoad(1, 4, outstanding=3)]).index == 1


def test_registered_by_name():
    assert POLICIES["cache_aware"] is CacheAware


def simulate(policy, hot_share, rounds=400, threads=32, rate=6000, seed=0):
    """A closed loop over the real Scheduler: ``threads`` clients keep one request each in flight;
    each worker does ``rate`` tokens of its requests' (charged) cost per tick, in order. Returns
    per-worker busy ticks, and the ticks on which a worker was idle while another held more
    than a tick's work."""
    rng = random.Random(seed)
    s = Scheduler(policy=policy)
    for i in range(2):
        s.add_worker(i, 1000, {"kv_cache_tokens": 400_000})
    hot = doc(999)
    left: dict[int, int] = {}
    next_id = 0

    def submit():
        nonlocal next_id
        text = hot if rng.random() < hot_share else doc(rng.randrange(10**9), tokens=3000)
        req = EngineRequest(next_id, f"{text}\nQ{next_id}?", None, None, {"max_tokens": 8})
        s.enqueue(Ticket(next_id, estimate_cost(req), policy.route_key(req)))
        next_id += 1

    for _ in range(threads):
        submit()
    busy, starved = [0, 0], 0
    for _ in range(rounds):
        for batch in s.schedule().values():
            for t in batch:
                left[t.id] = t.cost
        outstanding = [s.workers[i].outstanding for i in range(2)]
        if min(outstanding) == 0 and max(outstanding) > rate:
            starved += 1
        for i in range(2):
            budget = rate
            busy[i] += bool(s.workers[i].in_flight)
            for rid in list(s.workers[i].in_flight):
                if budget <= 0:
                    break
                step = min(budget, left[rid])
                left[rid] -= step
                budget -= step
                if left[rid] == 0:
                    s.finished(i, rid)
                    del left[rid]
                    submit()
    return busy, starved


def test_skew_one_hot_prefix_taking_half_leaves_no_worker_idle():
    busy, starved = simulate(CacheAware(), hot_share=0.5)
    assert starved == 0
    assert min(busy) >= 0.97 * max(busy)
    # the whole load on one prefix: it spills to the second worker instead of queueing on one
    busy, starved = simulate(CacheAware(), hot_share=1.0)
    assert starved <= 1 and min(busy) >= 0.95 * max(busy)


def test_echo_pool_serves_with_cache_aware_routing():
    import mpdp

    with mpdp.Pool(engine="echo", num_workers=2, routing="cache_aware", max_tokens=16) as pool:
        prompts = [f"{DOCS[n][:2000]} question {q}" for n in "AB" for q in range(4)]
        out = pool.generate(prompts)
        assert [c.text for c in out] == [p[:16] for p in prompts]
        by_doc = {n: {c.worker for c, p in zip(out, prompts) if p.startswith(DOCS[n][:2000])} for n in "AB"}
        assert all(len(ws) >= 1 for ws in by_doc.values())
