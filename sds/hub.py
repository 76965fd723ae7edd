"""Whether the Hugging Face hub can be used: its offline mode, and a quick probe of the
network. Plain Python (huggingface_hub's constants only, no torch): the planner and the
command line use it before they import anything heavy."""

from __future__ import annotations

import os
import socket
import urllib.request
from urllib.parse import urlsplit

from .errors import HubUnreachableError

HUB_PROBE_SECONDS = 3.0


def check_hub(what: str, hint: str) -> None:
    """Raise HubUnreachableError at once when a TCP connection to the hub (or to the HTTPS
    proxy) fails within HUB_PROBE_SECONDS. Without this, `datasets` retries for 25-50 s before
    it gives up. (In offline mode nothing is contacted: see `check_hub_data`.)"""
    import huggingface_hub.constants as hub

    target = urlsplit(urllib.request.getproxies().get("https") or hub.ENDPOINT)
    host, port = target.hostname or "", target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError as exc:
        raise HubUnreachableError(
            f"cannot load {what}: the Hugging Face hub is unreachable ({host}:{port}: "
            f"{exc}); {hint}; or, if it is in the local Hugging Face cache, set "
            "HF_HUB_OFFLINE=1 to read it from there") from exc


def hub_offline() -> bool:
    """Whether the Hugging Face offline mode is on (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set,
    now or when huggingface_hub was imported): hub models and datasets then come from the
    local Hugging Face cache only."""
    on = ("1", "on", "yes", "true")
    if any(os.environ.get(v, "").strip().lower() in on
           for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return True
    import huggingface_hub.constants as hub

    return bool(hub.HF_HUB_OFFLINE)
