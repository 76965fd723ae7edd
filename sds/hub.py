"""Whether the Hugging Face hub can be used: its offline mode, and a quick probe of the
network. Plain Python (huggingface_hub's constants only, no torch): the planner and the
command line use it before they import anything heavy."""

from __future__ import annotations

import math
import os
import socket
import time
import urllib.request
from urllib.parse import urlsplit

from .errors import HubUnreachableError

HUB_PROBE_SECONDS = 3.0
PROBE_VALID_SECONDS = 60.0  # a probe that reached the hub stands for this long
_reached: dict[tuple[str, int], float] = {}  # (host, port) -> when a probe last reached it


def check_hub(what: str, hint: str) -> None:
    """Raise HubUnreachableError at once when a TCP connection to the hub (or to the HTTPS
    proxy) fails within HUB_PROBE_SECONDS. Without this, `datasets` retries for 25-50 s before
    it gives up. (In offline mode nothing is contacted: see `check_hub_data`.)"""
    import huggingface_hub.constants as hub

    target = urlsplit(urllib.request.getproxies().get("https") or hub.ENDPOINT)
    host, port = target.hostname or "", target.port or (443 if target.scheme == "https" else 80)
    if time.monotonic() - _reached.get((host, port), -math.inf) < PROBE_VALID_SECONDS:
        return  # reached a moment ago (planning probes for the model, then its commit)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS).close()
        _reached[host, port] = time.monotonic()
    except OSError as exc:
        raise HubUnreachableError(
            f"cannot load {what}: the Hugging Face hub is unreachable ({host}:{port}: "
            f"{exc}); {hint}; or, if it is in the local Hugging Face cache, set "
            "HF_HUB_OFFLINE=1 to read it from there") from exc


def hub_offline(datasets: bool = False) -> bool:
    """Whether the Hugging Face offline mode is on, now or when huggingface_hub was imported:
    HF_HUB_OFFLINE (models, and datasets), or for `datasets` also HF_DATASETS_OFFLINE. Hub
    models and datasets then come from the local Hugging Face cache only."""
    on = ("1", "on", "yes", "true")
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if datasets else ("HF_HUB_OFFLINE",)
    if any(os.environ.get(v, "").strip().lower() in on for v in names):
        return True
    import huggingface_hub.constants as hub

    return bool(hub.HF_HUB_OFFLINE)
