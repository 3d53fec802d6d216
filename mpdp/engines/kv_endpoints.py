"""Where an engine publishes its KV-cache events: a local engine's private ipc folder.

Made by the engine (``engines/vllm.py``) in the worker, removed by it on a clean exit and by the
pool's listener (``core/kv_events.py``) when the worker is gone, since a killed one cannot.
"""

from __future__ import annotations

import os
import shutil
import tempfile

IPC_PREFIX = "mpdp-kv-"


def local_endpoints() -> tuple[str, str]:
    """ipc endpoints in a new private (0700) folder, for a local engine's publisher and replay socket."""
    folder = tempfile.mkdtemp(prefix=IPC_PREFIX)
    return f"ipc://{os.path.join(folder, 'events')}", f"ipc://{os.path.join(folder, 'replay')}"


def remove_ipc_folder(endpoint: str) -> None:
    """Remove the private folder of a local engine's endpoints (only one made by ``local_endpoints``)."""
    if not endpoint.startswith("ipc://"):
        return
    folder = os.path.dirname(endpoint[len("ipc://"):])
    if os.path.basename(folder).startswith(IPC_PREFIX) and os.path.dirname(folder) == tempfile.gettempdir():
        shutil.rmtree(folder, ignore_errors=True)
