"""What every stage task shares: the artifact-key cache policy, retries, the GPU slot, progress,
and the one rule of a stage: return at once when its artifact is in the store, else compute it
and commit it.

A stage is described by a *spec*, a plain JSON dict made by `tasks.plan`:

    {"stage": "oneshot", "label": "oneshot", "title": "oneshot sparsegpt 2:4",
     "key": "<artifact key>", "store": "<root>",
     "model": {"path", "revision", "dtype", "trust_remote_code", "identity"},
     "config": {... the stage's own options, hashed into the key ...},
     "upstream": {"calibration": "<key>", ...},
     "run": {"device", "verify", "gpu_limit"}}          # how to run it: not part of the key

and answers with a *reference*, the small dict Prefect caches (never tensors):

    {"stage", "label", "key", "uri", "sha256", "created", "metrics", "seconds"}
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prefect.states import Completed

from sds.errors import (
    ConfigError,
    CorruptArtifactError,
    DataError,
    ModelError,
    NumericalError,
    StoreError,
    StoreFullError,
    UpstreamLostError,
)

from .store import ArtifactStore, artifact_key

log = logging.getLogger("sds.tasks")

# Bump a stage's version when its code changes what it produces: every key changes with it.
STAGE_VERSIONS = {"calibration": 1, "oneshot": 1, "redense": 2, "second": 2, "evaluate": 1}

GPU_LIMIT = "sds-gpu"  # name of the Prefect global concurrency limit compute stages hold
GPU_LEASE_SECONDS = 60  # a crashed holder's slot comes back after about this long


# -- caching ------------------------------------------------------------------------------------
def stage_key(spec: dict) -> str:
    """The artifact key of a spec: (stage, stage version, base-model identity, the stage's own
    config, upstream keys) hashed by `tasks.store.artifact_key`."""
    stage = spec["stage"]
    return artifact_key(stage, STAGE_VERSIONS[stage], spec["model"]["identity"], spec["config"],
                        list(spec["upstream"].values()))


def open_store(spec: dict) -> ArtifactStore:
    return ArtifactStore(spec["store"])


def reference(store: ArtifactStore, spec: dict, meta: dict) -> dict:
    """The small, JSON-serialisable answer of a stage."""
    return {
        "stage": spec["stage"],
        "label": spec["label"],
        "key": spec["key"],
        "uri": store.ref(spec["stage"], spec["key"]).uri,
        "sha256": meta.get("sha256"),
        "created": meta.get("created"),
        "metrics": meta.get("metrics", {}),
        "seconds": meta.get("seconds", {}),
    }


# -- retries ------------------------------------------------------------------------------------
DETERMINISTIC = (ConfigError, DataError, ModelError, NumericalError)


def is_transient(exc: BaseException) -> bool:
    """Storage and network faults are worth another try; bad input and bad math are not."""
    if isinstance(exc, (*DETERMINISTIC, UpstreamLostError, StoreFullError)):
        return False  # a lost upstream artifact or free space is not back seconds later
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return False
    return isinstance(exc, StoreError | OSError | ConnectionError | TimeoutError)


def retry_transient(task, task_run, state) -> bool:
    """`retry_condition_fn` of the stage tasks."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as error:  # noqa: BLE001 - a state without a readable result
        exc = error
    return isinstance(exc, BaseException) and is_transient(exc)


# -- the GPU slot -------------------------------------------------------------------------------
_local_slot = threading.Lock()  # one compute stage at a time in this process


@contextlib.contextmanager
def gpu_slot(spec: dict) -> Iterator[None]:
    """Hold the compute device: a process-wide lock, plus a slot of the Prefect global
    concurrency limit named in `spec["run"]["gpu_limit"]` (skipped when None; non-strict, so a
    missing limit only warns)."""
    name = spec["run"].get("gpu_limit")
    with _local_slot:
        if not name:
            yield
            return
        from prefect.concurrency.sync import concurrency

        with concurrency(name, occupy=1, lease_duration=GPU_LEASE_SECONDS, strict=False):
            yield


def ensure_gpu_limit(name: str | None) -> None:
    """Create the global concurrency limit `name` (one slot per local GPU, at least one) when it
    does not exist yet. Any failure only warns: the limit is an optimisation, not a requirement."""
    if not name:
        return
    try:
        import torch
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
        from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

        with get_client(sync_client=True) as client:
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                slots = max(1, torch.cuda.device_count())
                with contextlib.suppress(ObjectAlreadyExists):
                    client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=name, limit=slots))
                log.info("created the global concurrency limit %r with %d slot(s)", name, slots)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not create the concurrency limit %r (%s); stages run without it",
                    name, exc)


# -- progress -----------------------------------------------------------------------------------
_listeners: list[Callable[[dict], None]] = []


def subscribe(listener: Callable[[dict], None]) -> None:
    """Receive stage events in this process (the CLI draws its progress bars from them):
    {"event": "cached" | "found" | "start" | "block" | "done", "label", "title", ...}."""
    _listeners.append(listener)


def unsubscribe(listener: Callable[[dict], None]) -> None:
    with contextlib.suppress(ValueError):
        _listeners.remove(listener)


def notify(**event: Any) -> None:
    for listener in list(_listeners):
        with contextlib.suppress(Exception):
            listener(event)


class BlockProgress:
    """The `on_block` callback of a walk: a Prefect progress artifact, a log line and a local
    event per finished block."""

    def __init__(self, spec: dict, logger, what: str):
        from prefect.artifacts import create_progress_artifact

        self.spec, self.logger, self.what = spec, logger, what
        self.artifact_id = None
        try:
            self.artifact_id = create_progress_artifact(
                0.0, description=f"{spec['title']}: blocks done")
        except Exception as exc:  # noqa: BLE001 - progress display must never fail a stage
            logger.debug("no progress artifact: %s", exc)

    def __call__(self, block: int, blocks: int, seconds: float) -> None:
        done = block + 1
        self.logger.info("%s: block %d/%d done in %.1f s", self.spec["title"], done, blocks,
                         seconds)
        notify(event="block", label=self.spec["label"], title=self.spec["title"], block=done,
               blocks=blocks)
        if self.artifact_id is not None:
            from prefect.artifacts import update_progress_artifact

            with contextlib.suppress(Exception):
                update_progress_artifact(self.artifact_id, progress=100.0 * done / blocks)


# -- running one stage --------------------------------------------------------------------------
class Clock:
    """Named wall-clock timers: `with clock("compute"): ...` -> clock.seconds["compute"]."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


# compute(spec, store, clock, logger) -> (tensors to save, extra meta)
Compute = Callable[..., tuple[dict, dict]]


def run_stage(spec: dict, compute: Compute, upstream: dict[str, dict] | None = None):
    """Return the stage's reference, computing and committing its artifact only when needed.

    The store is the one cache: when the artifact's commit record is there, the reference comes
    back at once, in a `Cached` state (nothing is downloaded); otherwise the stage computes.

    Nothing is written until `compute` has returned: a stage that fails (or a process that is
    killed) leaves no committed artifact behind.
    """
    from prefect.logging import get_run_logger

    logger = get_run_logger()
    if stage_key(spec) != spec["key"]:
        raise ConfigError(f"{spec['title']}: the spec's key {spec['key']} does not match its "
                          f"inputs ({stage_key(spec)}); plan the run again")
    for name, ref in (upstream or {}).items():
        if ref is None or ref.get("key") != spec["upstream"].get(name):
            raise ConfigError(f"{spec['title']}: upstream {name!r} is {ref and ref.get('key')}, "
                              f"the plan expects {spec['upstream'].get(name)}; plan again")
    store = open_store(spec)
    stage, key = spec["stage"], spec["key"]
    if store.exists(stage, key):  # the commit record only: the reader hashes the tensors
        logger.info("%s: artifact %s is in the store; nothing to compute", spec["title"], key)
        notify(event="found", label=spec["label"], title=spec["title"])
        return Completed(name="Cached", message="artifact in the store",
                         data=reference(store, spec, store.load_meta(stage, key)))

    logger.info("%s: computing artifact %s", spec["title"], key)
    notify(event="start", label=spec["label"], title=spec["title"])
    clock = Clock()
    t0 = time.perf_counter()
    tensors, extra = compute(spec, store, clock, logger)
    # work = what the stage itself took; elapsed also counts waiting for the GPU slot
    clock.seconds["work"] = clock.seconds.get("load", 0.0) + clock.seconds.get("compute", 0.0)
    clock.seconds["elapsed"] = time.perf_counter() - t0
    meta = {
        "label": spec["label"],
        "title": spec["title"],
        "config": spec["config"],
        "upstream": list(spec["upstream"].values()),
        "upstream_stages": spec["upstream"],
        "base_model": spec["model"]["identity"],
        "model": spec["model"]["path"],
        "seconds": clock.seconds,
        "device": spec["run"].get("device"),
        **extra,
    }
    store.save(stage, key, tensors, meta)
    meta = store.load_meta(stage, key)
    logger.info("%s: saved %s (%.1f s of work)", spec["title"], store.ref(stage, key).uri,
                clock.seconds["work"])
    notify(event="done", label=spec["label"], title=spec["title"], seconds=clock.seconds["work"])
    return reference(store, spec, meta)


def load_upstream(store: ArtifactStore, spec: dict, stage: str) -> dict:
    """The tensors of the upstream artifact of `stage` (hash-verified).

    A damaged or vanished upstream artifact is discarded and the stage fails with
    UpstreamLostError (a store fault, not retried): the flow then recomputes it once, and a
    later run would too.
    """
    key = spec["upstream"][stage]
    try:
        tensors, _meta = store.load(stage, key, verify=spec["run"].get("verify", True))
    except CorruptArtifactError as exc:
        store.discard(stage, key)
        raise UpstreamLostError(f"{exc}; it was discarded: run again to recompute it") from exc
    return tensors
