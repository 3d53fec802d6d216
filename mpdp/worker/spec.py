"""What a worker needs to start, as plain data: it crosses a process (or machine) boundary as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from mpdp.wire.transport import CurveKeys


@dataclass(slots=True)
class WorkerSpec:
    index: int
    incarnation: int
    endpoint: str
    engine: str
    model: str
    engine_options: dict[str, Any]
    gpus: list | None                 # physical GPU ids; None = leave CUDA_VISIBLE_DEVICES alone
    num_threads: int
    heartbeat_interval: float
    dispatcher_timeout: float         # exit when nothing was heard from the dispatcher for this long
    parent_pid: int | None            # a local worker also exits when this process is gone
    curve: CurveKeys | None = None
    env: dict[str, str] = field(default_factory=dict)
    token: str = ""                   # per pool, unguessable: identities of other pools never collide
    cleanup_paths: list[str] = field(default_factory=list)   # removed by a local worker whose parent died

    @property
    def identity(self) -> bytes:
        # A new identity per incarnation: late frames from a dead incarnation are recognisably stale.
        return f"w{self.index}.{self.incarnation}.{self.token}".encode()

    def to_json(self) -> str:
        d = {f: getattr(self, f) for f in self.__slots__}
        d["curve"] = {k: v.decode() for k, v in asdict(self.curve).items()} if self.curve else None
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> "WorkerSpec":
        d = json.loads(text)
        d["curve"] = CurveKeys(**{k: v.encode() for k, v in d["curve"].items()}) if d["curve"] else None
        return cls(**d)
