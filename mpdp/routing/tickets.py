"""What the scheduler knows of a request and of a worker: small slotted records, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Ticket:
    """A request as the scheduler sees it.

    ``cost`` is the estimated tokens the worker must still process (prompt plus what it may
    generate); ``route`` is the routing policy's key for it (see ``RoutingPolicy.route_key``);
    ``crashes`` counts the workers that died while holding it; ``group`` is set while it is a
    crash suspect (see ``Scheduler.worker_died``).
    """

    id: int
    cost: int = 1
    route: Any = None
    crashes: int = 0
    group: int | None = None


@dataclass(slots=True)
class WorkerLoad:
    index: int
    capacity: int
    in_flight: dict[int, Ticket] = field(default_factory=dict)
    outstanding: int = 0          # sum of the in-flight tickets' cost
    suspects: int | None = None   # the one suspect group it holds, if any

    @property
    def free(self) -> int:
        return self.capacity - len(self.in_flight)
