"""Launchers: where worker processes come from (``base.py`` is the interface)."""

from __future__ import annotations

from mpdp.launch.base import Launcher, WorkerHandle


def make_launcher(config) -> Launcher:
    """The launcher a ``PoolConfig`` names ("local", or "ray" with the ray extra installed)."""
    if config.launcher == "local":
        from mpdp.launch.local import LocalLauncher
        return LocalLauncher(config)
    if config.launcher == "ray":
        from mpdp.launch.ray import RayLauncher
        return RayLauncher(config)
    raise ValueError(f"unknown launcher {config.launcher!r}; choose 'local' or 'ray'")


__all__ = ["Launcher", "WorkerHandle", "make_launcher"]
