"""The scheduler alone: pure code, no processes."""

import pytest

from mpdp.routing import LeastLoaded, PrefixAffinity, Scheduler, Ticket


def make(capacities, **kw):
    s = Scheduler(**kw)
    for i, c in enumerate(capacities):
        s.add_worker(i, c)
    return s


def test_batches_respect_each_workers_credit():
    s = make([3, 5])
    for i in range(20):
        s.enqueue(Ticket(i))
    batches = s.schedule()
    assert len(batches[0]) == 3 and len(batches[1]) == 5
    assert s.num_waiting == 12
    assert s.schedule() == {}                      # no credit left, nothing more is bound


def test_finished_request_frees_credit_and_late_binding_feeds_the_free_worker():
    s = make([2, 2])
    for i in range(6):
        s.enqueue(Ticket(i))
    first = s.schedule()
    held_by_1 = [t.id for t in first[1]]
    assert s.finished(1, held_by_1[0])
    again = s.schedule()
    assert list(again) == [1] and len(again[1]) == 1   # only the worker that freed a slot gets work


def test_least_loaded_balances_by_outstanding_tokens():
    s = make([100, 100])
    s.enqueue(Ticket(0, cost=1000))
    for i in range(1, 11):
        s.enqueue(Ticket(i, cost=100))
    batches = s.schedule()
    # the big request lands alone on one worker; the ten small ones fill the other first
    big = 0 if any(t.id == 0 for t in batches[0]) else 1
    assert sum(t.cost for t in batches[1 - big]) >= 900


def test_micro_batch_size_is_capped():
    s = make([1000], max_batch=64)
    for i in range(200):
        s.enqueue(Ticket(i))
    assert len(s.schedule()[0]) == 64


def test_remove_worker_returns_exactly_its_in_flight_tickets():
    s = make([4, 4])
    for i in range(8):
        s.enqueue(Ticket(i))
    batches = s.schedule()
    s.finished(0, batches[0][0].id)
    lost = s.remove_worker(0)
    assert sorted(t.id for t in lost) == sorted(t.id for t in batches[0][1:])
    s.enqueue_front(lost)
    assert [t.id for t in s.waiting] == [t.id for t in lost]   # they go first, in order


def test_drop_waiting_and_in_flight():
    s = make([1])
    s.enqueue(Ticket(1))
    s.enqueue(Ticket(2))
    s.schedule()
    assert s.drop(1) == 0 and s.drop(2) is None
    s.finished(0, 1)                                # a late result of a dropped request is ignored
    assert s.schedule() == {}                       # 2 was dropped while waiting: never sent
    assert s.num_waiting == 0


def test_unknown_result_is_ignored():
    s = make([1])
    assert not s.finished(0, 42)
    assert not s.finished(7, 1)


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity"):
        Scheduler().add_worker(0, 0)


def test_prefix_affinity_prefers_the_worker_that_saw_the_prefix_within_slack():
    policy = PrefixAffinity(slack=500)
    s = make([100, 100], policy=policy)
    s.enqueue(Ticket(0, cost=100, route=7))
    first = s.schedule()
    owner = next(iter(first))
    s.enqueue(Ticket(1, cost=100, route=7))
    assert list(s.schedule()) == [owner]           # busier by 100 < slack: stays with its cache
    s.enqueue(Ticket(2, cost=1000, route=7))
    s.enqueue(Ticket(3, cost=100, route=7))
    s.schedule()
    assert s.where(3) != owner or s.workers[owner].outstanding <= s.workers[1 - owner].outstanding + 500


def test_least_loaded_policy_alone():
    from mpdp.routing import WorkerLoad
    a, b = WorkerLoad(0, 10, outstanding=50), WorkerLoad(1, 10, outstanding=10)
    assert LeastLoaded().choose(Ticket(0), [a, b]) is b



def test_a_swapped_policy_is_heard_from_then_on():
    # The scheduler binds the hooks a policy overrides when the policy is set (and skips the
    # base class's no-ops), so a policy put in later must be heard too.
    heard = []
    s = make([1, 1])
    s.enqueue(Ticket(0))
    s.schedule()
    late = LeastLoaded()
    late.finished = lambda ticket, index: heard.append(ticket.id)   # an instance hook is not a no-op
    late.assigned = lambda ticket, index: heard.append(-ticket.id)
    s.policy = late
    s.finished(0, 0) or s.finished(1, 0)
    s.enqueue(Ticket(3))
    s.schedule()
    assert s.policy is late and heard == [0, -3]
