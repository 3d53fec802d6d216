"""Routing: the pure scheduler (credits, micro-batches, crash retries) and the policies it asks."""

from mpdp.routing.cache_aware import CacheAware
from mpdp.routing.policies import LeastLoaded, PrefixAffinity, RoutingPolicy
from mpdp.routing.scheduler import Scheduler
from mpdp.routing.tickets import Ticket, WorkerLoad

# Policies by the name Pool(routing=...) takes. A module that adds a policy registers it here.
POLICIES: dict[str, type[RoutingPolicy]] = {"least_loaded": LeastLoaded, "prefix_affinity": PrefixAffinity,
                                            "cache_aware": CacheAware}



def make_policy(name: str, options: dict | None = None) -> RoutingPolicy:
    """The policy ``Pool(routing=name, routing_options=options)`` routes by (a fresh one: a policy
    keeps per-pool state). ValueError for an unknown name, TypeError for an option the policy
    does not take, both naming the setting."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"routing must be one of {', '.join(POLICIES)}, not {name!r}")
    try:
        return cls(**(options or {}))
    except TypeError as exc:
        raise TypeError(f"routing_options: {name} does not take {sorted(options or {})}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"routing_options: {exc}") from None


__all__ = ["POLICIES", "make_policy", "RoutingPolicy", "CacheAware", "LeastLoaded", "PrefixAffinity", "Scheduler", "Ticket",
           "WorkerLoad"]
