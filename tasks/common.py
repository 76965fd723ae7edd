"""What every stage task shares: retries, the GPU slot, progress, and the one rule of a stage:
return at once when its artifact is committed in the store, else compute it and commit it.

A stage is described by a `tasks.plan.StageSpec` and answers with a *reference*, the small dict
the flow passes on (never tensors):

    {"stage", "label", "key", "uri", "sha256", "created", "metrics", "seconds", "computed"}

plus, for an evaluation, "stderr": {metric: standard error} of its zero-shot accuracies, and
for a stage that walks the blocks, "blocks": {"total": N, "computed": blocks computed by this
run} (0 when the artifact was in the store; fewer than N when a killed run had committed some).

The store is the one cache. Prefect keeps no cache records of its own (the tasks use NO_CACHE):
a stage's first act is to read its artifact's commit record, so a new run, a retried run, a run
on another machine or the next scheduled run all skip a finished stage, and a stage whose
artifact was deleted is computed again. A stage that reads an artifact hashes it while reading
(`load_upstream`); a damaged one is discarded and computed again. `committed_references` makes
the same decision for a whole plan; this module imports Prefect only inside the functions that
talk to it, so the command line can answer a fully cached run without importing Prefect.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator

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

from .plan import Plan, StageSpec
from .store import ArtifactStore, pid_namespace

log = logging.getLogger("sds.tasks")

GPU_LEASE_SECONDS = 60  # a crashed holder's slot comes back after about this long


def reference(store: ArtifactStore, spec: StageSpec, meta: dict, computed: bool) -> dict:
    """The small, JSON-serialisable answer of a stage; `computed`: by this call."""
    ref = {
        "stage": spec.stage,
        "label": spec.label,
        "key": spec.key,
        "uri": store.ref(spec.stage, spec.key).uri,
        "sha256": meta.get("sha256"),
        "created": meta.get("created"),
        "metrics": meta.get("metrics", {}),
        "seconds": meta.get("seconds", {}),
        "computed": computed,
    }
    if isinstance(meta.get("stderr"), dict):  # an evaluation: its accuracies' noise
        ref["stderr"] = meta["stderr"]
    blocks = meta.get("blocks")
    if isinstance(blocks, dict):
        ref["blocks"] = dict(blocks) if computed else {"total": blocks.get("total"),
                                                       "computed": 0}
    return ref


def cached_reference(store: ArtifactStore, spec: StageSpec) -> dict | None:
    """The reference of the stage's artifact when it is committed in the store, else None: what
    a stage task answers without computing. Reads the commit record only, never the tensors."""
    meta = store.committed_meta(spec.stage, spec.key)
    return None if meta is None else reference(store, spec, meta, computed=False)


def committed_references(plan: Plan) -> dict[str, dict] | None:
    """Every stage's reference by label, as its task would answer it from the store, when the
    whole plan is committed; None at the first stage that is not. This module imports no
    Prefect, so a caller can decide that a run has nothing to compute before importing it."""
    store = ArtifactStore(plan.store)
    store.check_root()  # a file where the store should be: said as such
    refs = {}
    for label, spec in plan.specs.items():
        if (ref := cached_reference(store, spec)) is None:
            return None
        refs[label] = ref
    return refs


def load_base(spec: StageSpec):
    """The base model and tokenizer a stage (or the export) starts from."""
    from sds.models import load_model

    m = spec.model
    return load_model(m.path, m.dtype, m.revision, m.trust_remote_code)


# -- retries ------------------------------------------------------------------------------------
DETERMINISTIC = (ConfigError, DataError, ModelError, NumericalError)


# faults that another try seconds later meets again: no space, no permission, a file where a
# folder is (or the reverse)
PERMANENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS,
                    errno.ENOTDIR, errno.EISDIR)


def is_transient(exc: BaseException) -> bool:
    """Storage and network faults are worth another try; bad input and bad math are not, and
    neither is a store fault whose cause is permanent (`PERMANENT_ERRNOS`)."""
    if isinstance(exc, (*DETERMINISTIC, UpstreamLostError, StoreFullError)):
        return False  # a lost upstream artifact or free space is not back seconds later
    for cause in (exc, exc.__cause__, exc.__context__):
        if isinstance(cause, PermissionError | NotADirectoryError | IsADirectoryError) or (
                isinstance(cause, OSError) and cause.errno in PERMANENT_ERRNOS):
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
GPU_LOCK_DIR = tempfile.gettempdir()  # where the per-GPU lock files of this machine are


@contextlib.contextmanager
def host_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock shared by every process (and thread) of this machine: `flock` on
    `path`, a file (created if absent) or a folder. Released when the block ends or the
    process dies. Where flock is missing (Windows) or the file cannot be opened, no lock, with
    a warning."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        fd = os.open(path, os.O_RDONLY | (0 if os.path.isdir(path) else os.O_CREAT), 0o666)
    except OSError as exc:
        log.warning("cannot open the lock %s (%s); going on without it", path, exc)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # e.g. NFS, which locks only files open for writing
            log.warning("cannot lock %s (%s); going on without the lock", path, exc)
        yield
    finally:
        os.close(fd)  # releases the lock


def _gpu_lock_path(device: str | None) -> str | None:
    """The lock file of the CUDA device a stage computes on (None: not a GPU)."""
    import torch

    from sds.models import default_device

    dev = torch.device(device) if device else default_device()
    if dev.type != "cuda":
        return None
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    try:  # the physical GPU: processes with other CUDA_VISIBLE_DEVICES see other indices
        name = f"sds-gpu-{torch.cuda.get_device_properties(index).uuid}.lock"
    except Exception:  # noqa: BLE001 - no CUDA here or no uuid: the index
        name = f"sds-gpu{index}.lock"
    return os.path.join(GPU_LOCK_DIR, name)


@contextlib.contextmanager
def gpu_slot(spec: StageSpec) -> Iterator[None]:
    """Hold the compute device: a process-wide lock; on a GPU, a lock of that GPU shared by the
    machine's processes (two flow runs a worker started at once, which a global limit sized to
    the whole pool would both let in); then a slot of the Prefect global concurrency limit
    `spec.run.gpu_limit` (skipped when None; non-strict, so a missing limit only warns)."""
    name = spec.run.gpu_limit
    gpu = _gpu_lock_path(spec.run.device)
    with _local_slot, host_lock(gpu) if gpu else contextlib.nullcontext():
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
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
        from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

        with get_client(sync_client=True) as client:
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                import torch

                slots = max(1, torch.cuda.device_count())
                with contextlib.suppress(ObjectAlreadyExists):
                    client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=name, limit=slots))
                log.info("created the global concurrency limit %r with %d slot(s)", name, slots)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not create the concurrency limit %r (%s); stages run without it",
                    name, exc)


# -- progress -----------------------------------------------------------------------------------
def progress(logger, spec: StageSpec, message: str, *args, **event) -> None:
    """Log a stage's progress; the record carries `event` (a dict with "event" and its numbers)
    as `record.sds`, for a log handler that draws progress (the command line's)."""
    logger.info("%s: " + message, spec.title, *args,
                extra={"sds": {"title": spec.title, "key": spec.key, **event}})


# -- finished blocks ----------------------------------------------------------------------------
def compute_setup(device) -> dict:
    """What, besides a stage's inputs, decides the last bits of its tensors: the device kind
    (and GPU model), the torch build, its CPU threads and the CPU kernels it dispatches to
    (AVX2, AVX-512, ...: the same torch on another CPU rounds differently)."""
    import torch

    from sds.models import default_device

    dev = torch.device(device) if device else default_device()
    setup = {"device": dev.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
             "cpu": torch.backends.cpu.get_cpu_capability()}
    if dev.type == "cuda":
        setup["gpu"] = torch.cuda.get_device_name(dev)
    return setup


class BlockCommits:
    """The finished blocks of a pruning stage (a walk over the blocks), committed to the store
    one by one, so that a rerun of a killed stage starts at its first unfinished block.

    `resume()` reads what an earlier run committed (each block's weights of the walked layers,
    W: [out, in], and its records) into the `Resume` of the walk; the instance is the walk's
    `on_block`: it commits each block as it ends, then logs `<title>: block k/N` and advances
    the stage's Prefect progress artifact. The stage's artifact is committed as before, from the
    whole model; `run_stage` then drops the blocks.
    """

    def __init__(self, spec: StageSpec, store: ArtifactStore, logger, model, names):
        from sds.models import find_blocks

        prefix, blocks = find_blocks(model)
        modules = dict(model.named_modules())
        self.spec, self.store, self.logger, self.total = spec, store, logger, len(blocks)
        self.layers: dict[int, dict] = {b: {} for b in range(self.total)}  # block -> layers
        for name in names:
            self.layers[int(name[len(prefix) + 1:].split(".")[0])][name] = modules[name]
        self.state = None  # the walk's Resume
        self.setup = compute_setup(spec.run.device)
        self.artifact_id = _progress_artifact(spec, logger)

    def resume(self):
        """The walk's `Resume`: the committed blocks from block 0 on, with their records. Only
        blocks computed on this setup (`compute_setup`) count: the same key computed on
        another device or torch build differs in its last bits, and a resumed stage must end
        as an uninterrupted one would."""
        from sds.layerwise import LayerRecord, Resume, WalkReport

        weights, report = {}, WalkReport()
        for tensors, record in self.store.parts(self.spec.stage, self.spec.key):
            b = record["block"]
            if record.get("setup") != self.setup:
                progress(self.logger, self.spec, "the committed blocks from block %d on were "
                         "computed on another setup (%s); computing them again", b + 1,
                         record.get("setup"), event="resume-elsewhere")
                break
            if record.get("blocks") != self.total or b >= self.total or \
                    sorted(tensors) != sorted(self.layers[b]):
                break
            weights.update(tensors)
            report.layers += [LayerRecord(**{**r, "shape": tuple(r["shape"])})
                              for r in record["layers"]]
            report.blocks.append({"block": b, "seconds": record["seconds"]})
        self.state = Resume(len(report.blocks), weights, report)
        if self.state.start:
            progress(self.logger, self.spec, "resuming at block %d/%d",
                     self.state.start + 1, self.total, event="resume",
                     block=self.state.start, blocks=self.total)
            # the committed blocks are done: the progress is not 0% until the next one ends
            self._advance(self.state.start)
        return self.state

    def _advance(self, done: int) -> None:
        """The stage's progress artifact at `done` of its blocks."""
        if self.artifact_id is not None:
            from prefect.artifacts import update_progress_artifact

            with contextlib.suppress(Exception):
                update_progress_artifact(self.artifact_id, progress=100.0 * done / self.total)

    @property
    def counts(self) -> dict:
        """{"total": blocks, "computed": blocks computed by this run}."""
        return {"total": self.total, "computed": self.total - self.state.start}

    def __call__(self, block: int, blocks: int, seconds: float) -> None:
        from dataclasses import asdict

        from sds.models import weight_matrix

        tensors = {n: weight_matrix(m).detach().to("cpu", copy=True).contiguous()
                   for n, m in self.layers[block].items()}
        records = [asdict(r) for r in self.state.report.layers if r.block == block]
        self.store.save_part(self.spec.stage, self.spec.key, block, tensors,
                             {"blocks": blocks, "seconds": seconds, "layers": records,
                              "setup": self.setup})
        done = block + 1
        progress(self.logger, self.spec, "block %d/%d done in %.1f s", done, blocks, seconds,
                 event="block", block=done, blocks=blocks)
        self._advance(done)


# the progress artifact of each recent stage task run (task run id -> artifact id): a retry
# runs in the same task run and process, and advances its first attempt's artifact again
_PROGRESS_ARTIFACTS: OrderedDict = OrderedDict()
_PROGRESS_ARTIFACTS_KEPT = 1024  # task runs remembered (a worker serves runs for days)
_PROGRESS_LOCK = threading.Lock()  # a sweep's stages start in threads of one process


def _progress_artifact(spec: StageSpec, logger):
    """The id of the stage's Prefect progress artifact, at 0%: made by the first attempt of its
    task run, and the same one again for each retry, so that the run shows one bar per stage
    rather than one per attempt, the earlier ones stopped where their attempt failed. None
    outside a flow or task run (Prefect refuses artifacts there) or when Prefect fails: the
    display must never fail a stage."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    try:
        context = TaskRunContext.get()
        run_id = context.task_run.id if context is not None else None
        with _PROGRESS_LOCK:
            artifact_id = _PROGRESS_ARTIFACTS.get(run_id) if run_id is not None else None
        if artifact_id is not None:  # a retry
            update_progress_artifact(artifact_id, progress=0.0)
            return artifact_id
        if context is None and FlowRunContext.get() is None:
            return None
        artifact_id = create_progress_artifact(0.0, description=f"{spec.title}: blocks done")
        if run_id is not None:
            with _PROGRESS_LOCK:
                _PROGRESS_ARTIFACTS[run_id] = artifact_id
                while len(_PROGRESS_ARTIFACTS) > _PROGRESS_ARTIFACTS_KEPT:
                    _PROGRESS_ARTIFACTS.popitem(last=False)
        return artifact_id
    except Exception as exc:  # noqa: BLE001 - progress display must never fail a stage
        logger.debug("no progress artifact: %s", exc)
        return None


# -- leases -------------------------------------------------------------------------------------
LEASE_SECONDS = 60.0  # a lease lasts this long unless renewed (every third of it)
WAIT_POLL_SECONDS = 1.0  # how often a run waiting for another's artifact looks again


def _owner() -> dict:
    """Who holds a lease or a pin: a fresh id, and the host and process (see `expired`)."""
    return {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
            "pidns": pid_namespace()}


class _Renewal:
    """A background thread that calls `renew(store)` every third of `seconds` until `stop()`;
    `renew` returns False to end it. A StoreError is logged and retried at the next turn."""

    def __init__(self, root: str, seconds: float, renew, logger, what: str):
        self._root, self._renew, self._logger, self._what = root, renew, logger, what
        self._seconds = seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=what)
        self._thread.start()

    def _run(self) -> None:
        store = ArtifactStore(self._root)  # a client of its own for this thread
        while not self._stop.wait(self._seconds / 3):
            try:
                if not self._renew(store):
                    return
            except StoreError as exc:
                self._logger.warning("%s: renewing failed (%s)", self._what, exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Lease:
    """This run's lease on an artifact in the store, renewed by a background thread until
    `release()`. When it was taken over meanwhile (this run stalled past the expiry), `lost`
    is set and a warning logged: the computation goes on (its result is the same artifact)."""

    def __init__(self, store: ArtifactStore, spec: StageSpec, generation: int, owner: dict,
                 logger, seconds: float):
        self.store, self.spec, self.generation, self.owner = store, spec, generation, owner
        self.logger, self.seconds, self.lost = logger, seconds, False
        self._renewal = _Renewal(store.root, seconds, self._renew, logger,
                                 f"{spec.title}: the lease on {spec.key}")

    def _renew(self, store: ArtifactStore) -> bool:
        if store.renew_lease(self.spec.stage, self.spec.key, self.generation, self.owner,
                             self.seconds):
            return True
        self.lost = True
        self.logger.warning("%s: the lease on %s was taken over by another run",
                            self.spec.title, self.spec.key)
        return False

    def release(self) -> None:
        """Stop renewing and give the lease up (if that fails, it expires by itself)."""
        self._renewal.stop()
        if not self.lost:
            try:
                self.store.release_lease(self.spec.stage, self.spec.key, self.generation)
            except StoreError as exc:  # must not hide the stage's own outcome
                self.logger.warning("%s: releasing the lease failed (%s); it expires in %.0f s",
                                    self.spec.title, exc, self.seconds)


def claim(store: ArtifactStore, spec: StageSpec, logger, seconds: float = LEASE_SECONDS
          ) -> Lease | None:
    """Take the lease on the stage's artifact, waiting while another run holds it. None when
    the artifact got committed meanwhile (by the holder): reuse it then."""
    # the upstream keys too: `remove` keeps what a stage computing now will read
    owner = {**_owner(), "upstream": sorted(spec.upstream.values())}
    waiting = False
    while True:
        generation, holder = store.take_lease(spec.stage, spec.key, owner, seconds)
        # committed by a holder that released its lease just before: nothing to compute
        if store.exists(spec.stage, spec.key):
            if generation is not None:
                store.release_lease(spec.stage, spec.key, generation)
            return None
        if generation is not None:
            if waiting:
                progress(logger, spec, "took over the lease on %s", spec.key, event="lease")
            return Lease(store, spec, generation, owner, logger, seconds)
        if not waiting:
            waiting = True
            progress(logger, spec, "waiting for the run computing %s (host %s, pid %s)",
                     spec.key, holder.get("host"), holder.get("pid"), event="wait")
        time.sleep(WAIT_POLL_SECONDS)


@contextlib.contextmanager
def pinned(plans: list[Plan], logger=log, seconds: float = LEASE_SECONDS) -> Iterator[None]:
    """Pin every key of `plans` in their stores while the block runs (`ArtifactStore.pin`), so
    that `sds store gc` or `rm` meanwhile leaves this run what it will read. A run that dies
    leaves its pin to expire after `seconds` (at once on its own host)."""
    by_store: dict[str, set[str]] = {}
    for plan in plans:
        for spec in plan.specs.values():
            by_store.setdefault(spec.store, set()).add(spec.key)
    owner = _owner()
    held = []  # (store, pin name, renewal)
    try:
        for root, keys in by_store.items():
            store = ArtifactStore(root)
            before = time.time()
            name = store.pin(keys, owner, seconds)
            _check_clock(store, name, before, time.time(), seconds, logger)
            renewal = _Renewal(root, seconds,
                               lambda s, keys=keys: bool(s.pin(keys, owner, seconds)),
                               logger, f"the pin of this run's artifacts in {root}")
            held.append((store, name, renewal))
        yield
    finally:
        for store, name, renewal in held:
            renewal.stop()
            try:
                store.unpin(name)
            except StoreError as exc:  # must not hide the run's own outcome
                logger.warning("removing the pin %s failed (%s); it expires in %.0f s", name,
                               exc, seconds)


def _check_clock(store: ArtifactStore, name: str, before: float, after: float, seconds: float,
                 logger) -> None:
    """Warn when this machine's clock is more than a third of a lease off the store's. A lease
    holds its expiry by its holder's clock and is renewed every third of `seconds`, so the
    machines that share a store must agree within two thirds of it: one far behind reads a
    live lease as expired, takes it over, and computes the stage a second time."""
    try:
        offset = store.clock_offset(name, before, after)
    except StoreError as exc:  # the check must not fail the run
        logger.debug("could not compare this machine's clock with the store's: %s", exc)
        return
    if offset is not None and abs(offset) > seconds / 3:
        logger.warning(
            "this machine's clock is %.0f s %s the clock of the store %s; the machines that "
            "share a store must agree within %.0f s, or one may take over another's live "
            "lease and compute a stage twice: synchronise the clocks (NTP)", abs(offset),
            "behind" if offset > 0 else "ahead of", store.root, 2 * seconds / 3,
            extra={"sds_warning": True})  # the command line shows it (flows.cli)


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


def run_stage(spec: StageSpec, compute: Compute, upstream: dict[str, dict] | None = None):
    """Return the stage's reference, computing and committing its artifact only when needed.

    When the artifact's commit record is in the store the reference comes back at once, in a
    state named `Cached` (nothing is downloaded). Otherwise the stage takes the artifact's
    lease first; while another run holds it, this one waits and then reuses what that run
    committed (or takes the lease over once it expires). Nothing is committed until `compute`
    has returned: a stage that fails (or a process that is killed) leaves no committed
    artifact, only its finished blocks.
    """
    from prefect.logging import get_run_logger
    from prefect.states import Completed

    logger = get_run_logger()
    for name, ref in (upstream or {}).items():
        if ref is None or ref.get("key") != spec.upstream.get(name):
            raise ConfigError(f"{spec.title}: upstream {name!r} is {ref and ref.get('key')}, "
                              f"the plan expects {spec.upstream.get(name)}; plan again")
    store = ArtifactStore(spec.store)
    # the commit record only (readers hash the tensors); else the lease, or wait for its holder
    cached = cached_reference(store, spec)
    lease = None if cached is not None else claim(store, spec, logger)
    if lease is None:
        progress(logger, spec, "artifact %s is in the store; nothing to compute", spec.key,
                 event="cached")
        if cached is None:  # committed by the run that held the lease
            cached = reference(store, spec, store.load_meta(spec.stage, spec.key), False)
        return Completed(name="Cached", message="artifact in the store", data=cached)
    try:
        return _compute(spec, compute, store, logger, lease)
    except Exception as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        progress(logger, spec, "failed: %s", text[:300], event="failed")
        raise
    finally:
        lease.release()


def _compute(spec: StageSpec, compute: Compute, store: ArtifactStore, logger,
             lease: Lease) -> dict:
    """Compute the stage and commit its artifact (holding its lease); its reference. When
    another run committed the artifact meanwhile (it took this run's lease over, or this run
    took over the expired lease of a run that was still alive), its artifact stays: rewriting
    it would pull the commit record from under its readers."""
    progress(logger, spec, "computing artifact %s", spec.key, event="start")
    clock = Clock()
    t0 = time.perf_counter()
    tensors, extra = compute(spec, store, clock, logger)
    # work = what the stage itself took; elapsed also counts waiting for the GPU slot
    clock.seconds["work"] = clock.seconds.get("load", 0.0) + clock.seconds.get("compute", 0.0)
    clock.seconds["elapsed"] = time.perf_counter() - t0
    meta = {
        "label": spec.label,
        "title": spec.title,
        "config": spec.config,
        "upstream": list(spec.upstream.values()),
        "upstream_stages": spec.upstream,
        "base_model": spec.model.identity,
        "model": spec.model.path,
        "seconds": clock.seconds,
        "device": spec.run.device,
        **extra,
    }
    # committed meanwhile: by the run that took this run's lease over, or by the run whose
    # expired lease this run took (it was alive after all)
    if store.exists(spec.stage, spec.key):
        progress(logger, spec, "artifact %s was committed meanwhile by another run; keeping it",
                 spec.key, event="cached")
        store.drop_parts(spec.stage, spec.key)  # the blocks this run finished are not needed
        return reference(store, spec, store.load_meta(spec.stage, spec.key), computed=False)
    store.save(spec.stage, spec.key, tensors, meta)
    store.drop_parts(spec.stage, spec.key)  # the finished blocks are in the artifact now
    meta = store.load_meta(spec.stage, spec.key)
    progress(logger, spec, "saved %s (%.1f s of work)", store.ref(spec.stage, spec.key).uri,
             clock.seconds["work"], event="done", seconds=clock.seconds["work"])
    return reference(store, spec, meta, computed=True)


def load_upstream(store: ArtifactStore, spec: StageSpec, stage: str) -> dict:
    """The tensors of the upstream artifact of `stage`, hashed while read (unless the run
    trusts sizes: `verify` off).

    A damaged or vanished upstream artifact is discarded and the stage fails with
    UpstreamLostError (a store fault, not retried): the flow then recomputes it once, and a
    later run would too.
    """
    return load_or_discard(store, stage, spec.upstream[stage], spec.run.verify)


def load_or_discard(store: ArtifactStore, stage: str, key: str, verify: bool) -> dict:
    """The tensors of a committed artifact that a stage or the export reads; a damaged or
    vanished one is discarded, with UpstreamLostError (see `load_upstream`)."""
    try:
        tensors, _meta = store.load(stage, key, verify=verify)
    except CorruptArtifactError as exc:
        store.discard(stage, key)
        raise UpstreamLostError(f"{exc.damage}; it was discarded: run again to recompute it",
                                exc.damage) from exc
    return tensors
