"""Who may reach the server: the one rule that ``mpdp serve`` and ``mpdp.serve()`` both apply
before binding. A loopback address is open to this machine only; any other address needs an API
key or an explicit opt-out, so that a pool is never served to a network by accident.

Imports nothing heavy: the command line checks the rule before it starts any worker.
"""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False                           # a name: it may resolve to anything


def check_bind(host: str, api_key: str | None, allow_unauthenticated: bool = False) -> str | None:
    """Raise ValueError if serving ``host`` this way is refused; else the notice to print (or None)."""
    if is_loopback(host):
        return "every /v1 request needs the API key" if api_key else None
    if api_key:
        return f"binding {host}: every /v1 request needs the API key"
    if not allow_unauthenticated:
        raise ValueError(f"host {host!r} is not a loopback address: give an API key (--api-key, $MPDP_API_KEY "
                         "or api_key=), or allow unauthenticated access (--allow-unauthenticated or "
                         "allow_unauthenticated=True) to serve anyone who can reach it")
    return f"WARNING: binding {host} WITHOUT an API key: anyone who can reach it can use the pool"
