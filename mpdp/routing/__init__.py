"""Routing: the pure scheduler (credits, micro-batches, crash retries) and the policies it asks."""

from mpdp.routing.cache_aware import CacheAware
from mpdp.routing.policies import LeastLoaded, PrefixAffinity, RoutingPolicy
from mpdp.routing.scheduler import Scheduler
from mpdp.routing.tickets import Ticket, WorkerLoad

# Policies by the name Pool(routing=...) takes. A module that adds a policy registers it here.
POLICIES: dict[str, type[RoutingPolicy]] = {"least_loaded": LeastLoaded, "prefix_affinity": PrefixAffinity,
                                            "cache_aware": CacheAware}

__all__ = ["POLICIES", "RoutingPolicy", "CacheAware", "LeastLoaded", "PrefixAffinity", "Scheduler", "Ticket",
           "WorkerLoad"]
