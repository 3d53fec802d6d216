"""The one place where mpdp makes ZeroMQ sockets: endpoints, bind/connect, identity, limits, security.

Default transport is ``ipc://`` inside a private folder created 0700 by ``tempfile.mkdtemp``,
so only this user can connect. ``tcp://`` (for workers on other machines) is always
authenticated and encrypted with CurveZMQ: keys are generated per pool when none are given,
the workers receive them in their spec, and the ROUTER admits only the pool's client key. A
loopback port is reachable by every local user, so even on 127.0.0.1 TCP never runs without it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field

import zmq

from mpdp.wire import protocol


@dataclass(slots=True)
class CurveKeys:
    """CurveZMQ keys (z85 bytes). The server's pair for the ROUTER; one client pair the workers use."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def generate(cls) -> "CurveKeys":
        sp, ss = zmq.curve_keypair()
        cp, cs = zmq.curve_keypair()
        return cls(sp, ss, cp, cs)


@dataclass(slots=True)
class Transport:
    """Where the dispatcher binds and what a worker needs to connect (all plain data: it is sent to workers)."""

    kind: str = "ipc"                       # "ipc" or "tcp"
    host: str = "127.0.0.1"                 # tcp only
    port: int = 0                           # tcp only; 0 = any free port
    curve: CurveKeys | None = None
    folder: str | None = field(default=None)  # ipc only: the private 0700 folder
    endpoint: str | None = None             # set by bind()

    def __post_init__(self):
        if self.kind not in ("ipc", "tcp"):
            raise ValueError(f"transport must be 'ipc' or 'tcp', not {self.kind!r}")
        if self.kind == "tcp":
            if not isinstance(self.host, str) or not self.host or ":" in self.host:
                raise ValueError(f"transport host must be an IPv4 address or host name, not {self.host!r}")
            if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port < 65536:
                raise ValueError(f"transport port must be an int in 0..65535, not {self.port!r}")
            if self.curve is None:
                self.curve = CurveKeys.generate()

    def bind_router(self, ctx: zmq.Context) -> zmq.Socket:
        sock = ctx.socket(zmq.ROUTER)
        _common_options(sock)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)   # sending to a vanished worker raises, not drops
        if self.curve is not None:
            sock.curve_server = True
            sock.curve_secretkey = self.curve.server_secret
            sock.curve_publickey = self.curve.server_public
        try:
            if self.kind == "ipc":
                self.folder = self.folder or tempfile.mkdtemp(prefix="mpdp-")   # mode 0700
                self.endpoint = f"ipc://{os.path.join(self.folder, 'router')}"
                sock.bind(self.endpoint)
            else:
                if self.port:
                    sock.bind(f"tcp://{self.host}:{self.port}")
                else:
                    self.port = sock.bind_to_random_port(f"tcp://{self.host}")
                self.endpoint = f"tcp://{self.host}:{self.port}"
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            self.cleanup()
            raise OSError(f"cannot bind the pool's {self.kind} endpoint: {exc}") from exc
        return sock

    def cleanup(self) -> None:
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)


def connect_dealer(ctx: zmq.Context, endpoint: str, identity: bytes, curve: CurveKeys | None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    _common_options(sock)
    sock.setsockopt(zmq.IDENTITY, identity)
    if curve is not None:
        sock.curve_serverkey = curve.server_public
        sock.curve_publickey = curve.client_public
        sock.curve_secretkey = curve.client_secret
    sock.connect(endpoint)
    return sock


def start_curve_authenticator(ctx: zmq.Context, curve: CurveKeys):
    """ZAP handler that admits only the pool's client key (without it any key would be accepted)."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx)
    auth.start()
    allowed = {curve.client_public}
    auth.configure_curve_callback(domain="*", credentials_provider=_KeySet(allowed))
    return auth


class _KeySet:
    def __init__(self, keys: set[bytes]):
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        # pyzmq's authenticator hands over the key already z85-encoded (40 bytes), like the set;
        # encoding it again refused every worker, so a curve pool never started. Accept raw too.
        if len(key) == 32:
            key = zmq.utils.z85.encode(key)
        return key in self.keys


def _common_options(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 0)              # close() never blocks on unsent frames
    sock.setsockopt(zmq.SNDHWM, 0)              # credits bound what is in flight, not HWM drops
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME_BYTES + 4096)


# -- an engine's KV-cache event stream (vLLM's ZmqEventPublisher: PUB for batches, ROUTER for replays)
def connect_event_subscriber(ctx: zmq.Context) -> zmq.Socket:
    """One SUB socket for every engine's events (it connects to each publisher as it appears).
    No receive high-water mark: a dropped batch would cost a resync; the publishers bound it."""
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME_BYTES + 4096)
    sock.setsockopt(zmq.SUBSCRIBE, b"")        # topics are filtered on arrival (one per incarnation)
    return sock


def connect_event_replay(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    """A DEALER for one replay request to a publisher's ROUTER (one request, many replies)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME_BYTES + 4096)
    sock.connect(endpoint)
    return sock
