"""Workers on a Ray cluster: one Ray actor per worker, each in a placement group of its own.

``Pool(..., launcher="ray", ray_address=...)`` (or a Ray already initialised in this process)
keeps everything but the placement in the caller's process: the dispatcher, the scheduler,
recovery. Each worker slot gets, per incarnation, a placement group of one bundle
(``{"GPU": tensor_parallel_size, "CPU": 1}`` for GPU engines, so a tensor-parallel group's
GPUs are on one node; ``{"CPU": 1}`` for CPU engines; ``MPDP_RAY_RESOURCES`` replaces it,
e.g. ``'{"CPU": 1, "accel": 1}'`` to place by a custom resource), and a small actor in it.

Why the actor does not run the worker loop itself: the actor *starts the same worker process
a local launcher starts* (``python -c`` bootstrap, its own process group) and watches it.
A worker kills its whole process group when it gives up (dispatcher silent) or is killed,
which inside a Ray worker process would reach Ray's own processes; engine subprocesses (vLLM's
tensor-parallel workers) are reliably ended only through a group of their own; and the
worker's environment (CUDA_VISIBLE_DEVICES, thread counts) must be set before anything
initialises CUDA, which a long-lived Ray worker process cannot promise. The child watches its
actor (``parent_pid`` = the actor's pid, on that node), so when Ray kills the actor (ray.kill,
the job's driver died, OOM killer) the worker and its group go within a quarter second.

Death is seen through Ray: a watcher thread per worker waits on the actor's ``wait()``
ObjectRef; it returns the exit code when the process exits, and raises ``RayActorError`` when
the actor dies (process crash, OOM kill, node lost). Either way the watcher releases the actor
and its placement group first, then writes to a pipe whose read end is the handle's
``sentinel``, so a restart finds the resources free. No orphans: a worker whose dispatcher
goes silent (driver SIGKILLed, network partition) exits after ``dispatcher_timeout``, and Ray
itself kills a dead driver's actors (they are not detached) and removes its placement groups.

Placement never blocks the dispatcher thread: ``launch()`` only submits the placement group
and the actor. A slot waits in STARTING until Ray finds room, bounded by the pool's
``ready_timeout`` (then it is killed, and restarted with backoff). Only a slot's first start
fails at once, with ``PlacementError`` (an ``OSError``), when no node of the cluster could ever
hold its bundle; later restarts wait, since a node may join (or come back) meanwhile.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

from mpdp.errors import MpdpError
from mpdp.launch.base import Launcher, WorkerHandle
from mpdp.launch.local import _BOOTSTRAP, killpg
from mpdp.worker.spec import WorkerSpec

RESOURCES_ENV = "MPDP_RAY_RESOURCES"     # JSON: the resources of one worker's bundle
CONNECT_TIMEOUT_S = 10.0   # a given ray_address must accept a TCP connection within this (see _connect)
KILL_GRACE_S = 3.0      # after kill(): how long the actor may take to end its worker before ray.kill
START_ATTEMPTS = 2      # an actor lost before it started its worker is placed once more (see _start)
WATCH_POLL_S = 0.5      # how often a watcher looks for a kill request (a death wakes it at once)
_LOG_TAIL_BYTES = 16384

log = logging.getLogger("mpdp")


class PlacementError(OSError):
    """No node of the Ray cluster can hold a worker's bundle (the supervisor treats an OSError
    from ``launch`` as a failed start: before the pool ran, the pool fails with it)."""


def _ray():
    try:
        import ray
    except ImportError as exc:         # pragma: no cover - depends on the installation
        raise ImportError("launcher='ray' needs Ray: pip install 'mpdp[ray]'") from exc
    return ray


# Ray is initialised once per process; a pool that initialised it shuts it down when the last
# such pool closes. A Ray the caller initialised is left alone.
_init_lock = threading.Lock()
_our_users = 0


def _acquire(address: str | None) -> bool:
    global _our_users
    ray = _ray()
    with _init_lock:
        if ray.is_initialized():
            if _our_users:
                _our_users += 1
                return True
            return False
        _connect(ray, address)
        _our_users = 1
        return True


class RayConnectError(MpdpError, ConnectionError):
    """The Ray cluster at the address given could not be reached or refused this driver."""


def _connect(ray, address: str | None) -> None:
    """``ray.init`` on ``address``, which fails within a bound when the address was given.

    Ray itself retries an address that does not answer for over ten minutes (each attempt waits
    in C++, where even SIGINT waits for it), so a given ``HOST:PORT`` (or ``RAY_ADDRESS``) must
    first accept a TCP connection within ``CONNECT_TIMEOUT_S``. A cluster that answers but
    refuses this driver (token authentication) fails after Ray's own ~20 s of retries; both
    end in one ``RayConnectError`` line that says what to change."""
    target = address or os.environ.get("RAY_ADDRESS") or None
    host_port = _host_port(target)
    if host_port is not None:
        _probe(target, *host_port)
        _token_auth_as_ray_start_does()
    try:
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    except Exception as exc:
        if host_port is None:
            raise
        raise RayConnectError(f"could not connect to the Ray cluster at {target}: "
                              f"{_first_lines(exc, 1)} ({_auth_state()})") from exc


def _host_port(address: str | None) -> tuple[str, int] | None:
    """(host, port) of a plain ``HOST:PORT`` address; None for auto, local, ray://... (Ray's own)."""
    if not address or "://" in address or address in ("auto", "local"):
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _probe(address: str, host: str, port: int) -> None:
    import socket

    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        why = (f"no answer within {CONNECT_TIMEOUT_S:g}s" if isinstance(exc, socket.timeout)
               else (exc.strerror or str(exc)).lower())
        raise RayConnectError(
            f"no Ray cluster answers at {address} ({why}): start one there "
            f"(`ray start --head --port={port}`) or give the head node's HOST:PORT") from None


def _token_auth_as_ray_start_does() -> None:
    """Ray >= 2.52 can authenticate with a token, and ``ray start --head`` turns it on when a token
    is on its machine (``~/.ray/auth_token``, which any local ``ray.init()`` of Ray >= 2.59 leaves
    behind). ``ray.init`` with an explicit address does not, so the README's route (``ray start
    --head`` here, then ``--ray-address``) was refused with "InvalidAuthToken". This driver takes
    the same rule as ``ray start``: a token found by Ray's documented lookup (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) means token authentication, unless RAY_AUTH_MODE is
    set. A cluster without authentication accepts a driver that sends a token."""
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
    except ImportError:                 # Ray < 2.52: no token authentication
        return
    # Ray's function is the rule itself (and refreshes Ray's cached config); its log line is
    # written for a head node ("enabled for this Ray cluster"), misleading in a driver.
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        logger.setLevel(level)


def _auth_state() -> str:
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode == "token":
        return ("this driver sent a Ray authentication token: if the cluster uses another, give the "
                "head's (its ~/.ray/auth_token) as RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH")
    if mode is None:
        return ("no Ray authentication token was found here (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, "
                "~/.ray/auth_token): a cluster with token authentication needs the head's, its ~/.ray/auth_token")
    return f"RAY_AUTH_MODE={mode} here: a cluster with token authentication refuses this driver"


def _release() -> None:
    global _our_users
    with _init_lock:
        _our_users -= 1
        if _our_users == 0:
            _ray().shutdown()


def bundle_override() -> dict[str, float] | None:
    """``MPDP_RAY_RESOURCES``, checked (ValueError naming it), or None where it is not set."""
    text = os.environ.get(RESOURCES_ENV)
    if text:
        try:
            bundle = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{RESOURCES_ENV} must be a JSON object of resources: {exc}") from None
        if not isinstance(bundle, dict) or not bundle or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                for k, v in bundle.items()):
            raise ValueError(f"{RESOURCES_ENV} must map resource names to positive numbers, not {text!r}")
        return {k: float(v) for k, v in bundle.items()}
    return None


def worker_bundle(engine: str, engine_options: dict, override: dict[str, float] | None) -> dict[str, float]:
    """The resources of one worker: the override if any, else by the engine's kind."""
    if override:
        return dict(override)
    from mpdp.engines import engine_class

    if engine_class(engine).uses_gpu:
        return {"CPU": 1.0, "GPU": float(engine_options.get("tensor_parallel_size", 1))}
    return {"CPU": 1.0}


class RayLauncher(Launcher):
    name = "ray"

    def __init__(self, config):
        ray = _ray()
        self._bundle = bundle_override()    # a mistake in it fails the Pool call, before anything starts
        self._owns_ray = _acquire(config.ray_address)
        self.cleanup_paths = []            # nothing on this machine for a remote worker to remove
        # The workers connect to this machine as Ray's other nodes do: Ray's own address for it,
        # unless the caller named one (a machine with several interfaces).
        self.bind_host = (config.transport_host if config.transport_host != "127.0.0.1"
                          else ray.util.get_node_ip_address())
        self._handles: set[RayWorker] = set()
        self._lock = threading.Lock()
        self._closed = False

    def launch(self, spec: WorkerSpec, log_name: str) -> "RayWorker":
        if self._closed:
            raise OSError("the Ray launcher is closed")
        if not _ray().is_initialized():     # any Ray call now would start a new, empty Ray
            raise OSError("Ray is no longer initialised in this process (ray.shutdown() under the pool?)")
        bundle = worker_bundle(spec.engine, spec.engine_options, self._bundle)
        if spec.incarnation == 0:
            self._check_feasible(bundle)
        spec = dataclasses.replace(
            spec, parent_pid=None,          # the driver's pid means nothing on another node
            cleanup_paths=[], num_threads=max(1, int(bundle.get("CPU", 1))))
        handle = RayWorker(spec, bundle, self._forget)
        with self._lock:
            self._handles.add(handle)
        return handle

    def _check_feasible(self, bundle: dict[str, float]) -> None:
        try:
            nodes = [n for n in _ray().nodes() if n.get("Alive")]
        except Exception as exc:            # the cluster is unreachable
            raise PlacementError(f"cannot read the Ray cluster's nodes: {exc!r}") from exc
        if not any(all(n.get("Resources", {}).get(k, 0.0) >= v for k, v in bundle.items()) for n in nodes):
            have = "; ".join(f"{n.get('NodeManagerAddress')}: {n.get('Resources')}" for n in nodes) or "no nodes"
            raise PlacementError(f"no node of the Ray cluster has {bundle} for one worker ({have}); "
                                 f"set {RESOURCES_ENV} or add nodes")

    def _forget(self, handle: "RayWorker") -> None:
        with self._lock:
            self._handles.discard(handle)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            handles = list(self._handles)
        for h in handles:                   # normally none: stop_all killed and reaped them all
            h.kill()
        deadline = time.monotonic() + KILL_GRACE_S + 2.0      # one wait for all, not one each
        for h in handles:
            h.join(max(0.0, deadline - time.monotonic()))
            h.release()                     # if its watcher is stuck, release from here
        if self._owns_ray:
            self._owns_ray = False
            _release()


class _WorkerActor:
    """Runs on a cluster node (made a Ray actor by ``RayWorker``): starts the worker process
    and reports how it ended. Threaded (max_concurrency) so ``stop`` runs while ``wait`` waits."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None

    def start(self, spec_json: str) -> dict:
        import ray

        spec = WorkerSpec.from_json(spec_json)
        self.folder, self.owned = _log_folder()
        self.log_path = os.path.join(self.folder, f"mpdp-worker-{spec.token}-{spec.index}.{spec.incarnation}.log")
        spec.parent_pid = os.getpid()       # the worker ends with this actor (see the module docstring)
        spec.cleanup_paths = [self.folder] if self.owned else []
        gpu_ids = ray.get_gpu_ids()
        if gpu_ids:                         # the GPUs Ray gave this actor; the worker pins itself to them
            spec.gpus = [str(g) for g in gpu_ids]
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", _BOOTSTRAP, package_root],
                                         stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, close_fds=True)
        try:
            self.proc.stdin.write(spec.to_json().encode())
            self.proc.stdin.close()
        except OSError:
            killpg(self.proc.pid)
            raise
        ctx = ray.get_runtime_context()
        return {"pid": self.proc.pid, "node_id": ctx.get_node_id(), "hostname": os.uname().nodename,
                "node_ip": ray.util.get_node_ip_address()}

    def wait(self) -> tuple[int, str]:
        code = self.proc.wait()
        killpg(self.proc.pid)               # what the worker's engine left in its group
        tail = self._tail()
        if self.owned:
            import shutil

            shutil.rmtree(self.folder, ignore_errors=True)
        return code, tail

    def stop(self) -> None:
        if self.proc is not None:
            killpg(self.proc.pid)

    def _tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - _LOG_TAIL_BYTES))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""


def _log_folder() -> tuple[str, bool]:
    """Where a worker's output goes on its node: next to Ray's own worker logs (kept with the
    session, like them, for post-mortems), else a private folder that is removed with the worker
    (the bool). Ray's kill of a dead worker's children can interrupt a removal, so keeping the
    logs where Ray keeps its own also leaves no stray folders behind."""
    try:
        from ray._private.worker import global_worker

        path = global_worker.node.get_logs_dir_path()
        if os.path.isdir(path):
            return path, False
    except Exception:                       # a private API: fall back to a folder of our own
        pass
    return tempfile.mkdtemp(prefix="mpdp-ray-"), True


_actor_class = None


def _remote_actor_class():
    global _actor_class
    if _actor_class is None:
        _actor_class = _ray().remote(max_concurrency=4, max_restarts=0, max_task_retries=0)(_WorkerActor)
    return _actor_class


class RayWorker(WorkerHandle):
    """One worker as a Ray actor in its placement group, watched by a thread of this process."""

    def __init__(self, spec: WorkerSpec, bundle: dict[str, float], on_release):
        self.spec = spec
        self.bundle = bundle
        self.pid = None
        self.node = None
        self.node_id: str | None = None
        self.node_ip: str | None = None
        self._exitcode: int | None = None
        self._tail = ""
        self._on_release = on_release
        self._kill_at: float | None = None
        self._done = threading.Event()
        self._fd_lock = threading.Lock()
        self._released = False
        self._r, self._w = os.pipe()
        try:
            self._place(0)
        except Exception:
            self._close_fds()
            raise
        self._thread = threading.Thread(target=self._watch, name=f"mpdp-ray-watch-{spec.index}", daemon=True)
        self._thread.start()

    def _place(self, attempt: int) -> None:
        """The worker's placement group and actor (a later attempt gets a name of its own)."""
        ray = _ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        spec, bundle = self.spec, self.bundle
        name = f"mpdp-{spec.token}-w{spec.index}.{spec.incarnation}" + (f"-r{attempt}" if attempt else "")
        # One bundle: a tensor-parallel group's GPUs on one node (STRICT_PACK says so outright).
        self.pg = placement_group([bundle], strategy="STRICT_PACK", name=name)
        custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
        try:
            self.actor = _remote_actor_class().options(
                name=name, num_cpus=bundle.get("CPU", 0.0), num_gpus=bundle.get("GPU", 0.0),
                resources=custom or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=0),
            ).remote()
        except Exception as exc:
            ray.util.remove_placement_group(self.pg)
            raise OSError(f"could not create the worker's Ray actor: {exc!r}") from exc

    # -- the watcher thread -----------------------------------------------------------------------
    def _watch(self) -> None:
        ray = _ray()
        try:
            info = self._start()
            if info is not None:
                self.pid, self.node_id = info["pid"], info["node_id"]
                self.node, self.node_ip = info["hostname"], info["node_ip"]
                result = self._await(self.actor.wait.remote(), stop=self.actor.stop)
                if result is not None:
                    self._exitcode, self._tail = result
        except ray.exceptions.RayActorError as exc:   # died: process crash, OOM kill, node lost
            self._exitcode = -signal.SIGKILL
            self._tail = f"its Ray actor died: {_first_lines(exc)}"
        except Exception as exc:                       # the worker process could not be started
            self._exitcode = 1
            self._tail = f"its Ray actor failed: {_first_lines(exc)}"
        finally:
            if self._exitcode is None:                 # killed before (or while) it ran
                self._exitcode = -signal.SIGKILL
            self.release()                             # resources free before the death is reported
            self._done.set()
            with self._fd_lock:
                if self._w >= 0:
                    os.write(self._w, b"x")

    def _start(self) -> dict | None:
        """The worker started by the actor. An actor Ray loses before it has started the worker
        (a busy node's raylet killing a fresh worker process, a node lost during placement) is
        placed once more: nothing ran there, so nothing can run twice. A second loss, or a loss
        after the worker started, is the worker's death as before."""
        ray = _ray()
        for attempt in range(START_ATTEMPTS):
            try:
                return self._await(self.actor.start.remote(self.spec.to_json()), stop=None)
            except ray.exceptions.RayActorError as exc:
                # Only a death (not "unavailable for now", which may come back having started the
                # worker), only while nobody asked it to stop and Ray is still there.
                if (attempt + 1 == START_ATTEMPTS or self._kill_at is not None or self._released
                        or not isinstance(exc, ray.exceptions.ActorDiedError) or not ray.is_initialized()):
                    raise
                log.warning("mpdp: worker %d's Ray actor was lost before it started the worker (%s); "
                            "placing it again", self.spec.index, _first_lines(exc, 1))
                self._drop()
                self._place(attempt + 1)
                if self._released:          # released (the pool closing) while it was placed
                    self._drop()
                    return None
        return None

    def _await(self, ref, stop):
        """The value of ``ref``, or None once a kill was asked for (after ``stop`` and a grace)."""
        ray = _ray()
        stopped = False
        while True:
            if not ray.is_initialized():     # Ray was shut down under the pool: nothing to watch
                raise ray.exceptions.RayActorError(error_msg="Ray was shut down in this process")
            ready, _ = ray.wait([ref], timeout=WATCH_POLL_S)
            if ready:
                return ray.get(ready[0])
            if self._kill_at is None:
                continue
            if stop is None:
                return None
            if not stopped:
                stop.remote()                           # end the worker's group, then wait() returns
                stopped = True
            elif time.monotonic() - self._kill_at > KILL_GRACE_S:
                return None

    def release(self) -> None:
        """Kill the actor and remove the placement group (idempotent; never raises)."""
        if self._released:
            return
        self._released = True
        self._drop()
        self._on_release(self)

    def _drop(self) -> None:
        """Kill the actor and remove its placement group (never raises)."""
        ray = _ray()
        if not ray.is_initialized():         # calling Ray now would start a new one
            return
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:
            pass
        try:
            ray.util.remove_placement_group(self.pg)
        except Exception:
            pass

    # -- WorkerHandle -----------------------------------------------------------------------------
    @property
    def sentinel(self) -> int:
        return self._r

    @property
    def exitcode(self) -> int | None:
        return self._exitcode if self._done.is_set() else None

    def kill(self) -> None:
        if self._kill_at is None:
            self._kill_at = time.monotonic()           # the watcher ends it (never blocks this thread)

    def join(self, timeout: float) -> None:
        self._done.wait(timeout)

    def reap(self, timeout: float) -> None:
        self._done.wait(timeout)
        self._close_fds()

    def _close_fds(self) -> None:
        with self._fd_lock:
            for fd in (self._r, self._w):
                if fd >= 0:
                    os.close(fd)
            self._r = self._w = -1

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self._tail.splitlines()[-lines:])


def _first_lines(exc: BaseException, n: int = 6) -> str:
    return "\n".join(str(exc).strip().splitlines()[:n])
