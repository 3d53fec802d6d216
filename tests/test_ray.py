"""The Ray launcher on a real 3-node Ray cluster (``ray.cluster_utils.Cluster``) on loopback.

Every node is started on 127.0.0.1 (and checked to be), the dispatcher binds its TCP endpoint
there, and a custom resource ``sim_gpu`` (one per node) stands in for GPUs so that each
worker's placement group needs a node of its own: placement, node loss and room coming back
are exercised for real. The cluster is module-scoped (starting it is most of the time) and
always shut down.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import signal
import subprocess
import sys
import time

import pytest

# Read once, when Ray is first imported: with it Ray reports 127.0.0.1 for every node of a
# Cluster (and its GCS address); without it the head advertises the machine's network address.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.state import list_actors, list_placement_groups  # noqa: E402

import mpdp  # noqa: E402
from mpdp.wire import protocol  # noqa: E402
from mpdp.wire.protocol import Tag  # noqa: E402

from conftest import FAST, full_size, wait_until  # noqa: E402

pytestmark = pytest.mark.timeout(240)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOPBACK = "127.0.0.1"
NODE = dict(node_ip_address=LOOPBACK, num_cpus=1, resources={"sim_gpu": 1})
# Node death seen in about a second (Ray's defaults take ~15 s): health checks every 200 ms.
FAST_HEALTH = {"health_check_period_ms": 200, "health_check_failure_threshold": 5,
               "health_check_initial_delay_ms": 0}
BUNDLE = json.dumps({"CPU": 1, "sim_gpu": 1})     # one worker per node


@pytest.fixture(scope="module")
def cluster():
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:      # Ray was imported before this module set the variable
        pytest.fail("run with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray would leave loopback")
    saved = {"MPDP_RAY_RESOURCES": os.environ.get("MPDP_RAY_RESOURCES")}
    os.environ["MPDP_RAY_RESOURCES"] = BUNDLE        # the driver subprocesses inherit it too
    # The dashboard serves ray.util.state (list_actors, list_placement_groups); it binds loopback.
    # Ray's session folders go into one private folder, removed afterwards: nothing left in /tmp.
    # (RAY_TMPDIR also moves the address file Ray writes; the driver subprocesses inherit it.)
    temp_dir = tempfile.mkdtemp(prefix="mpdp-ray-")
    saved["RAY_TMPDIR"] = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp_dir
    # Ray's own processes (and the workers under them) make their temporary files there too: one
    # of them leaves a multiprocessing "pymp-" folder behind when the cluster is shut down.
    saved["TMPDIR"] = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = temp_dir
    node = NODE
    c = Cluster(initialize_head=True, head_node_args=dict(
        node, include_dashboard=True, dashboard_host=LOOPBACK, _system_config=FAST_HEALTH))
    try:
        c.extra = [c.add_node(**node) for _ in range(2)]
        assert c.address.startswith(f"{LOOPBACK}:"), c.address
        ray.init(address=c.address, log_to_driver=False)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert len(nodes) == 3 and {n["NodeManagerAddress"] for n in nodes} == {LOOPBACK}
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ray_pool(**kwargs):
    kwargs = {"engine": "echo", "num_workers": 3, "launcher": "ray", **FAST, **kwargs}
    return mpdp.Pool(**kwargs)


def ours(pool_token: str, items):
    return [x for x in items if (x.name or "").startswith(f"mpdp-{pool_token}-")]


def alive_actors(token: str):
    return [a for a in ours(token, list_actors(limit=1000)) if a.state != "DEAD"]


def live_groups(token: str):
    return [g for g in ours(token, list_placement_groups(limit=1000)) if g.state != "REMOVED"]


def assert_nothing_left(token: str, timeout: float = 15.0):
    wait_until(lambda: not alive_actors(token) and not live_groups(token), timeout, interval=0.2,
               what="no actor and no placement group of the pool left")


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"mpdp" not in f.read()        # a reused pid is someone else's
    except OSError:
        return True


def alive_nodes():
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def test_echo_in_order_on_every_node_and_close_leaves_nothing(cluster):
    pool = ray_pool()
    token = pool._dispatcher.supervisor.token
    try:
        assert pool._dispatcher.transport.endpoint.startswith(f"tcp://{LOOPBACK}:")
        assert pool._dispatcher.transport.curve is not None
        prompts = [f"prompt {i}" for i in range(300)]
        out = pool.generate(prompts, max_tokens=64)
        assert [c.text for c in out] == prompts
        assert {c.worker for c in out} == {0, 1, 2}
        actors = alive_actors(token)
        assert {a.node_id for a in actors} == alive_nodes()          # one worker on every node
        assert all(w["node"] and w["pid"] for w in pool.stats()["workers"])
    finally:
        pool.close()
    assert_nothing_left(token)


def test_curve_keeps_strangers_out(cluster):
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    pool = ray_pool(engine_options={"delay_s": 0.3})
    try:
        d = pool._dispatcher
        endpoint, keys = d.transport.endpoint, d.transport.curve
        victim = d.slots[0].identity                   # pretend to be a live worker
        futures = [pool.submit(f"q{i}", max_tokens=8) for i in range(30)]
        ctx = zmq.Context()
        try:
            def attempt(curve: tuple | None):
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.IDENTITY, victim)
                if curve:
                    s.curve_serverkey, s.curve_publickey, s.curve_secretkey = curve
                mon = s.get_monitor_socket()
                s.connect(endpoint)
                fake = protocol.encode(Tag.RESULTS, [])
                for _ in range(20):              # whatever gets queued would be a forged frame
                    try:
                        s.send_multipart(fake, zmq.NOBLOCK)
                    except zmq.Again:            # no connection was ever admitted
                        pass
                events, deadline = set(), time.monotonic() + 2.0
                while time.monotonic() < deadline:
                    if mon.poll(100):
                        events.add(recv_monitor_message(mon)["event"])
                    if events & {zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_HANDSHAKE_FAILED_AUTH,
                                 zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL}:
                        break
                got = s.poll(300)
                s.disable_monitor()
                mon.close()
                s.close()
                return events, got

            stranger = zmq.curve_keypair()
            for curve in (None, (keys.server_public, *stranger)):    # no keys; keys of its own
                events, got = attempt(curve)
                assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in events, events
                assert not got                                          # nothing from the pool
            assert d.dropped_frames == 0                                # no frame ever arrived
            assert [f.result(30).text for f in futures] == [f"q{i}" for i in range(30)]
            # The check would see a frame that arrives: the pool's own client key gets in.
            events, _ = attempt((keys.server_public, keys.client_public, keys.client_secret))
            assert zmq.EVENT_HANDSHAKE_SUCCEEDED in events
        finally:
            ctx.destroy(linger=0)
    finally:
        pool.close()


def test_worker_crash_and_actor_kill_are_retried(cluster):
    pool = ray_pool(engine_options={"delay_s": 1.0})     # the requests are in flight at the kills
    token = pool._dispatcher.supervisor.token
    try:
        prompts = [f"c{i}" for i in range(60)]
        futures = [pool.submit(p, max_tokens=8) for p in prompts]
        time.sleep(0.3)
        os.kill(pool.stats()["workers"][0]["pid"], signal.SIGKILL)     # the worker process crashes
        actor = next(a for a in alive_actors(token) if a.name.endswith("-w1.0"))
        os.kill(actor.pid, signal.SIGKILL)                              # the actor dies (as by OOM)
        assert [f.result(60).text for f in futures] == prompts
        wait_until(lambda: full_size(pool) and all(w["restarts"] for w in pool.stats()["workers"][:2]),
                   30, what="both slots restarted")
        workers = pool.stats()["workers"]
        assert sum(w["requests"] for w in workers) == len(prompts)     # none ran twice to the end
        assert [c.text for c in pool.generate(["after"] * 6, max_tokens=8)] == ["after"] * 6
    finally:
        pool.close()
    assert_nothing_left(token)


def test_node_lost_mid_run(cluster):
    pool = ray_pool(engine_options={"delay_s": 0.1})
    token = pool._dispatcher.supervisor.token
    try:
        by_node = {a.node_id: a for a in alive_actors(token)}
        victim = cluster.extra[0]
        lost = by_node[victim.node_id]
        index = int(lost.name.rsplit("-w", 1)[1].split(".")[0])
        prompts = [f"n{i}" for i in range(300)]
        futures = [pool.submit(p, max_tokens=8) for p in prompts]
        time.sleep(0.3)
        cluster.remove_node(victim)
        cluster.extra.remove(victim)
        assert [f.result(60).text for f in futures] == prompts         # nothing lost
        workers = pool.stats()["workers"]
        assert sum(w["requests"] for w in workers) == len(prompts)     # nothing delivered twice
        # No room for the third worker: the pool serves with two, the slot waits for a node.
        wait_until(lambda: pool.stats()["workers"][index]["state"] != "ready", 10, what="the death seen")
        out = pool.generate([f"few {i}" for i in range(40)], max_tokens=8)
        assert [c.text for c in out] == [f"few {i}" for i in range(40)]
        assert index not in {c.worker for c in out}
        assert pool.stats()["workers"][index]["state"] in ("starting", "dead")
        # Room again: a new node joins and the slot is placed there.
        cluster.extra.append(cluster.add_node(**NODE))
        wait_until(lambda: full_size(pool), 60, interval=0.2, what="the pool back to full size")
        assert {a.node_id for a in alive_actors(token)} == alive_nodes()
        assert [c.text for c in pool.generate(["x", "y", "z"], max_tokens=8)] == ["x", "y", "z"]
    finally:
        pool.close()
    assert_nothing_left(token)


def test_first_start_fails_at_once_when_no_node_fits(cluster, monkeypatch):
    monkeypatch.setenv("MPDP_RAY_RESOURCES", json.dumps({"CPU": 1, "no_such_accelerator": 1}))
    t0 = time.monotonic()
    with pytest.raises(mpdp.errors.WorkerStartError, match="no_such_accelerator"):
        ray_pool(num_workers=1)
    assert time.monotonic() - t0 < 10


def _losing_actor_class(marker: str, losses: int):
    """Workers' actors whose first ``losses`` starts (counted as files in ``marker``) end the actor's
    process before it starts a worker, as a busy node's raylet killing a fresh worker would."""
    from mpdp.launch.ray import _WorkerActor

    class Losing(_WorkerActor):
        def start(self, spec_json):
            if len(os.listdir(marker)) < losses:
                open(os.path.join(marker, f"lost-{os.getpid()}"), "w").close()
                os._exit(1)
            return super().start(spec_json)

    return ray.remote(max_concurrency=4, max_restarts=0, max_task_retries=0)(Losing)


def test_an_actor_lost_before_its_worker_started_is_placed_again(cluster, monkeypatch, tmp_path, caplog):
    import mpdp.launch.ray as launch_ray

    monkeypatch.setattr(launch_ray, "_actor_class", _losing_actor_class(str(tmp_path), 1))
    pool = ray_pool(num_workers=1)
    token = pool._dispatcher.supervisor.token
    try:
        assert len(os.listdir(tmp_path)) == 1                      # the first actor was lost
        assert "lost before it started the worker" in caplog.text
        assert [c.text for c in pool.generate(["a", "b", "c"], max_tokens=8)] == ["a", "b", "c"]
        assert pool.stats()["workers"][0]["restarts"] == 0         # a placement, not a crash
    finally:
        pool.close()
    assert_nothing_left(token)


def test_an_actor_lost_twice_before_starting_fails_the_first_start(cluster, monkeypatch, tmp_path):
    import mpdp.launch.ray as launch_ray

    monkeypatch.setattr(launch_ray, "_actor_class", _losing_actor_class(str(tmp_path), 2))
    with pytest.raises(mpdp.errors.WorkerStartError, match="Ray actor died"):
        ray_pool(num_workers=1)
    assert len(os.listdir(tmp_path)) == 2                          # placed twice, no more
    wait_until(lambda: not [a for a in list_actors(limit=1000) if (a.name or "").startswith("mpdp-")
                            and a.state != "DEAD"]
               and not [g for g in list_placement_groups(limit=1000) if (g.name or "").startswith("mpdp-")
                        and g.state != "REMOVED"], 15, interval=0.2, what="no actor and no group left")


def test_a_bad_bundle_fails_the_pool_call(monkeypatch):
    monkeypatch.setenv("MPDP_RAY_RESOURCES", "[1]")
    with pytest.raises(ValueError, match="MPDP_RAY_RESOURCES"):
        ray_pool(num_workers=1)


BAD_HOST_DRIVER = r"""
import sys, ray, mpdp
try:
    mpdp.Pool(engine="echo", num_workers=1, launcher="ray", ray_address=sys.argv[1], transport_host="::1")
except ValueError as exc:
    print("refused:", exc, flush=True)
print("ray still initialised:", ray.is_initialized(), flush=True)
"""


def test_a_pool_refused_after_connecting_to_ray_lets_go_of_it(cluster):
    """The pool connected to Ray (it owns that connection), then refused a setting: it must not
    keep Ray initialised in the caller's process (a local Ray's processes stayed until exit)."""
    r = subprocess.run([sys.executable, "-c", BAD_HOST_DRIVER, cluster.address], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert "refused: transport host must be" in r.stdout, r.stderr[-2000:]
    assert "ray still initialised: False" in r.stdout, r.stdout


DRIVER = r"""
import json, sys, time, ray, mpdp
ray.init(address=sys.argv[1], log_to_driver=False)
pool = mpdp.Pool(engine="echo", num_workers=3, launcher="ray", engine_options={"delay_s": 30},
                 heartbeat_interval=0.2, dispatcher_timeout=3.0)
futures = [pool.submit(f"held {i}") for i in range(9)]        # in flight when the driver dies
print(json.dumps({"token": pool._dispatcher.supervisor.token,
                  "pids": [w["pid"] for w in pool.stats()["workers"]]}), flush=True)
time.sleep(600)
"""


def test_driver_sigkilled_leaves_no_actor_and_no_worker(cluster):
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, cluster.address], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line, "the driver did not start its pool"
        info = json.loads(line)
        assert len(alive_actors(info["token"])) == 3 and all(info["pids"])
        t0 = time.monotonic()
        proc.kill()
        proc.wait()
        # Bounded: Ray ends a dead driver's actors (their workers follow them), and every worker
        # gives up by itself after dispatcher_timeout (3 s here) of silence.
        wait_until(lambda: all(gone(p) for p in info["pids"]), 20, interval=0.2,
                   what="the dead driver's worker processes gone")
        assert_nothing_left(info["token"], timeout=20)
        assert time.monotonic() - t0 < 25
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_worker_exits_when_its_dispatcher_goes_silent(cluster):
    """A partition, as the workers see it: the driver is alive for Ray (SIGSTOP keeps its
    connections open, so Ray kills nothing) but its dispatcher says nothing. Each worker
    exits by itself after dispatcher_timeout (3 s), which is what frees a GPU on a node cut off."""
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, cluster.address], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        t0 = time.monotonic()
        proc.send_signal(signal.SIGSTOP)
        wait_until(lambda: all(gone(p) for p in info["pids"]), 15, interval=0.2,
                   what="the silenced dispatcher's workers gone")
        assert time.monotonic() - t0 >= 2.5          # by their own timeout, not by Ray
    finally:
        proc.kill()
        proc.wait()
    assert_nothing_left(info["token"], timeout=20)


def test_generate_cli_with_the_ray_launcher(cluster, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"line {i}"}) + "\n" for i in range(20)))
    r = subprocess.run([sys.executable, "-m", "mpdp.cli", "generate", "--input", str(src), "--output", str(out),
                        "--engine", "echo", "--num-workers", "2", "--launcher", "ray",
                        "--ray-address", cluster.address, "--no-progress"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["id"], x["text"]) for x in lines] == [(f"r{i}", f"line {i}") for i in range(20)]


def test_dspy_lm_with_the_ray_launcher(cluster):
    pytest.importorskip("dspy")
    import mpdp.dspy as mdspy

    lm = mdspy.LM("echo-model", engine="echo", num_workers=2, launcher="ray", max_tokens=4000, cache=False)
    try:
        assert not lm.pool_started                     # nothing starts before the first call
        out = lm("hello over ray")
        assert "hello over ray" in out[0]
        pool = lm.pool
        assert pool.config.launcher == "ray" and pool._dispatcher.transport.endpoint.startswith("tcp://")
        token = pool._dispatcher.supervisor.token
        assert len(alive_actors(token)) == 2
    finally:
        lm.close()
    assert_nothing_left(token)


@pytest.mark.slow
def test_smollm2_on_two_nodes(cluster):
    pytest.importorskip("transformers")
    questions = [[{"role": "user", "content": q}] for q in
                 ("What is the capital of France?", "Name a colour.", "What is 2+2?", "Say hello.")]
    with mpdp.Pool(model="smollm2-135m-instruct", engine="hf", num_workers=1) as local:
        expected = [c.text for c in local.generate(questions, max_tokens=6, temperature=0.0)]
    with mpdp.Pool(model="smollm2-135m-instruct", engine="hf", num_workers=2, launcher="ray") as pool:
        token = pool._dispatcher.supervisor.token
        out = pool.generate(questions, max_tokens=6, temperature=0.0)
        assert len({a.node_id for a in alive_actors(token)}) == 2     # two nodes, one worker each
    assert [c.text for c in out] == expected and all(expected)
    assert_nothing_left(token)
