"""Serve the deployments of a prefect.yaml from this process (`sds serve`), without a work pool.

The same file feeds `prefect deploy --all` (work pools, one worker per GPU machine); here its
deployments' names, entrypoints, parameters and cron schedules become `flow.to_deployment(...)`
objects served by `prefect.serve`. Stopping the process pauses their schedules.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from sds.errors import ConfigError

DEFAULT_FILE = Path(__file__).resolve().parents[1] / "deployments" / "prefect.yaml"


def read_deployments(path: str | Path = DEFAULT_FILE, names: list[str] | None = None
                     ) -> list[dict]:
    """The `deployments:` entries of a prefect.yaml (all, or those named)."""
    path = Path(path).expanduser()
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"deployment file {path} does not exist; pass --file "
                          "path/to/prefect.yaml") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    entries = document.get("deployments") or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) and e.get("name")
                                                and e.get("entrypoint") for e in entries):
        raise ConfigError(f"{path}: 'deployments' must be a list of entries with a name and "
                          "an entrypoint (e.g. flows/pipeline.py:pipeline)")
    if names:
        known = {e["name"] for e in entries}
        missing = sorted(set(names) - known)
        if missing:
            raise ConfigError(f"{path} has no deployment named {', '.join(missing)}; it has "
                              f"{', '.join(sorted(known))}")
        entries = [e for e in entries if e["name"] in names]
    if not entries:
        raise ConfigError(f"{path} defines no deployments")
    return entries


def load_flow(entrypoint: str):
    """'flows/pipeline.py:pipeline' (or 'flows.pipeline:pipeline') -> the flow object."""
    module_path, _, attribute = entrypoint.partition(":")
    module = module_path.removesuffix(".py").replace("/", ".").replace("\\", ".")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load the flow {entrypoint!r}: {exc}") from exc


def to_deployments(entries: list[dict]) -> list:
    from prefect.schedules import Cron

    out = []
    for entry in entries:
        schedules = [Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
                     for s in entry.get("schedules") or [] if s.get("cron")]
        flow = load_flow(entry["entrypoint"])
        out.append(flow.to_deployment(
            name=entry["name"], parameters=entry.get("parameters") or {},
            schedules=schedules or None, tags=entry.get("tags"),
            description=entry.get("description")))
    return out


def serve(path: str | Path = DEFAULT_FILE, names: list[str] | None = None,
          limit: int | None = None) -> None:
    """Serve the deployments until interrupted (needs PREFECT_API_URL: a running server)."""
    import prefect

    prefect.serve(*to_deployments(read_deployments(path, names)), limit=limit)
