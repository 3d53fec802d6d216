"""The crash policy alone (pure scheduler, no processes): what happens to a dead worker's requests."""

import pytest

from mpdp.routing import Scheduler, Ticket


def make(workers=2, capacity=100, max_crashes=2):
    s = Scheduler(max_crashes=max_crashes)
    for i in range(workers):
        s.add_worker(i, capacity)
    return s


def load(s, n, start=0):
    for i in range(start, start + n):
        s.enqueue(Ticket(i))
    return s.schedule()


def test_a_first_crash_retries_everything_in_parallel_at_full_credit():
    s = make()
    batches = load(s, 100)
    held = {t.id for t in batches[0]}
    retried, failed = s.worker_died(0)
    assert {t.id for t in retried} == held and not failed
    s.add_worker(0, 100)                          # restarted
    again = s.schedule()
    # All of them go out at once, not one per worker: no isolation on a first crash.
    assert sum(len(b) for b in again.values()) == len(held)
    assert not s.groups


def test_requests_on_a_second_crash_become_a_suspect_group_split_in_halves():
    s = make()
    load(s, 10)
    for t in list(s.workers[0].in_flight.values()) + list(s.workers[1].in_flight.values()):
        t.crashes = 1                                      # all of them survived one crash already
    s.worker_died(0)
    assert len(s.groups) == 1 and len(s.groups[0]) == 5   # a group, not failed
    s.add_worker(0, 100)
    batches = s.schedule()
    assert len(batches[0]) == 5 and s.workers[0].suspects is not None
    _, failed = s.worker_died(0)                           # the group's worker dies too
    assert not failed
    assert sorted(len(g) for g in s.groups) == [2, 3]      # split in halves
    s.add_worker(0, 100)
    batches = s.schedule()
    # The halves go to different workers: one suspect group per worker.
    assert s.workers[0].suspects != s.workers[1].suspects
    assert s.workers[0].suspects is not None and s.workers[1].suspects is not None


def test_a_poison_is_cornered_in_about_log2_crashes_and_only_it_fails():
    s = make(workers=2, capacity=64)
    poison = 17
    load(s, 64)
    crashes = 0
    failed_ids: list[int] = []
    while True:
        holder = s.where(poison)
        if holder is None:
            break
        crashes += 1
        # Everything else on a healthy worker finishes.
        for w in s.workers.values():
            if w.index != holder:
                for rid in list(w.in_flight):
                    s.finished(w.index, rid)
        _, failed = s.worker_died(holder)
        failed_ids += [t.id for t in failed]
        s.add_worker(holder, 64)
        s.schedule()
        assert crashes < 20
    assert failed_ids == [poison]
    assert crashes <= 2 + 7                                # 64 = 2**6: two crashes, then halvings


def test_max_crashes_1_fails_everything_on_the_dead_worker():
    s = make(max_crashes=1)
    batches = load(s, 10)
    _, failed = s.worker_died(0)
    assert {t.id for t in failed} == {t.id for t in batches[0]}


def test_a_cancelled_suspect_leaves_its_group():
    s = make()
    load(s, 4)
    for w in s.workers.values():
        for t in w.in_flight.values():
            t.crashes = 1
    s.worker_died(0)
    gid_members = [t.id for t in s.groups[0]]
    assert s.drop(gid_members[0]) is None
    assert gid_members[0] not in [t.id for t in s.groups[0]]


@pytest.mark.parametrize("hooks", ["assigned", "finished", "worker_removed", "worker_added"])
def test_the_policy_hears_every_change(hooks):
    from mpdp.routing import RoutingPolicy

    class Ear(RoutingPolicy):
        def __init__(self):
            self.heard = []

        def assigned(self, ticket, index):
            self.heard.append(("assigned", ticket.id, index))

        def finished(self, ticket, index):
            self.heard.append(("finished", ticket.id, index))

        def worker_added(self, index, info):
            self.heard.append(("worker_added", index))

        def worker_removed(self, index):
            self.heard.append(("worker_removed", index))

    ear = Ear()
    s = Scheduler(ear)
    s.add_worker(0, 4, {"kv_cache_tokens": 100})
    s.enqueue(Ticket(1))
    s.enqueue(Ticket(2))
    s.schedule()
    s.finished(0, 1)
    s.drop(2)
    s.worker_died(0)
    kinds = [h[0] for h in ear.heard]
    assert hooks in kinds
    assert kinds.count("finished") == 2                   # a drop is heard as finished too
