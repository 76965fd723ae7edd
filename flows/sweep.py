"""The sweep flow: models x methods x patterns, in this flow run or fanned out over a work pool.

In this flow run (no `pool`), the points' stages are tasks of one flow run: stages that several
grid points share have the same artifact key and are submitted once (the calibration of a model
and its dense evaluation run once for the whole grid, and a one-shot pruning is shared by the SDS
and plain variants of the same point).

With `pool`, each point is its own `pipeline` flow run on that Prefect work pool (a child of the
sweep's flow run in the UI), taken by whichever worker is free; the store's leases make the
shared stages computed once across workers. The sweep creates or updates the deployment
`pipeline/sweep-<pool>` from this checkout (its flow code is this folder, no image), waits for
every point, reads each point's artifacts from the store, and writes the same results as in one
flow run.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from sds.errors import ConfigError, SDSError
from tasks import stages
from tasks.common import ensure_gpu_limit, pinned, reference
from tasks.config import SweepConfig
from tasks.plan import Plan, local_paths, plan_pipeline
from tasks.store import ArtifactStore

from . import report
from .pipeline import POINT_TAG, StageTaskRunner, current_run, finish, run_plans

REPO = Path(__file__).resolve().parents[1]  # the checkout whose flow code the workers run
ENTRYPOINT = "flows/pipeline.py:pipeline"
POLL_SECONDS = 2.0
PROGRESS_SECONDS = 60.0  # how often the wait for the points on a pool is logged
CANCEL_GRACE_SECONDS = 120.0  # how long cancelled points may take to confirm
READ_CHUNK = 200  # flow runs per read: the server refuses a larger limit (its default limit)


def _run_name() -> str:
    """The sweep's flow run name: its grid's size, e.g. `sweep-2-models-4-points`."""
    from prefect.runtime import flow_run

    try:
        config = SweepConfig.model_validate(flow_run.get_parameters().get("config") or {})
    except Exception:  # noqa: BLE001 - the flow refuses the configuration, with the reason
        return "sweep"
    points = len(config.points())
    models = len(config.models)
    return f"sweep-{models}-model{'s' * (models != 1)}-{points}-point{'s' * (points != 1)}"


@flow(name="sweep", flow_run_name=_run_name, task_runner=StageTaskRunner(),
      description="A grid of models x methods x patterns; shared stages once.")
def sweep(config: SweepConfig = SweepConfig()) -> dict:  # noqa: B008 - a frozen model
    """Every combination of models, methods, patterns (and SDS on/off), with the shared options
    of `config` (see tasks.config.SweepConfig); with `config.pool`, each point is a `pipeline`
    flow run on that work pool.

    Writes `<out>/<run name>/results.json` per point (and the model with `export`; names are
    unique, `report.run_names`) and `<out>/sweep.json`; a point that fails does not stop the
    others, but fails the sweep.
    """
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    points = config.points()
    plans = [plan_pipeline(point) for point in points]
    ArtifactStore(plans[0].store).check()
    with pinned(plans, get_run_logger()):  # `sds store gc` meanwhile leaves them be
        if config.pool:
            outcomes, runs = run_on_pool(config.pool, points, plans, config.wait_minutes)
        else:
            ensure_gpu_limit(config.gpu_limit)
            outcomes = run_plans(plans)
            runs = [current_run()] * len(plans)
        return write_results(config, plans, outcomes, runs, started, t0)


def write_results(config: SweepConfig, plans: list[Plan], outcomes: list[dict | Exception],
                  runs: list[dict], started: datetime, t0: float) -> dict:
    """Each point's results.json (and model folder), `<out>/sweep.json` and the table artifact,
    from each point's stage references (or the error that stopped it) and its flow run. Raises
    SweepError when a point failed, after writing the others."""
    out, export = config.out, config.export
    points, failures = [], []
    names = report.run_names([plan.settings for plan in plans])
    for plan, refs, run, name in zip(plans, outcomes, runs, names):
        try:
            if isinstance(refs, Exception):
                raise refs
            results = finish(plan, refs, Path(out) / name if out else None,
                             stages.export_model if export else None, started, t0, run,
                             repair=not config.pool)
            points.append({"name": name, "results": results})
            if not config.pool:  # a point on a pool is a flow run of its own, which publishes
                report.publish(results, name)
        except Exception as exc:  # noqa: BLE001 - one failed point must not hide the others
            message = " ".join(str(exc).split()) or type(exc).__name__
            failures.append({"name": name, "error": message,
                             "type": type(exc).__name__})

    summary = {
        "runs": [{"name": p["name"], "metrics": p["results"]["metrics"],
                  "improvement": p["results"]["improvement"], "keys": p["results"]["keys"]}
                 for p in points],
        "failures": failures,
        "stage_submissions": distinct_stages(plans),  # runs of each stage label (shared: 1)
        "wall": time.perf_counter() - t0,
        "flow_run": current_run(),
    }
    rows = [{"run": p["name"], **row}
            for p in points for row in report.artifact_rows(p["results"])]
    for f in failures:
        rows.append({"run": f["name"], "metric": "failed", "error": f["error"]})
    if rows:
        create_table_artifact(table=rows, key="sds-sweep", description="Sweep: metric per run")
    if out:
        report.write_json(summary, Path(out) / "sweep.json")
    if failures:
        raise SweepError(f"{len(failures)} of {len(plans)} runs failed; first: "
                         f"{failures[0]['name']}: {failures[0]['error']}", summary)
    return summary


# -- fan-out over a work pool -------------------------------------------------------------------
def deploy_points(pool: str) -> str:
    """Create or update the deployment `pipeline/sweep-<pool>` on the work pool `pool`, its flow
    code this checkout (a process worker runs it in this folder); its name."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from .pipeline import pipeline

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            raise ConfigError(f"there is no work pool {pool!r}; create it with `prefect "
                              f"work-pool create {pool} --type process` and start workers "
                              f"(`prefect worker start --pool {pool}`)") from None
    name = f"sweep-{pool}"
    deployment = pipeline.from_source(str(REPO), ENTRYPOINT).to_deployment(
        name=name, work_pool_name=pool, tags=["sds", "sweep"],
        description="One point of a sweep (created by the sweep flow from its checkout).")
    deployment.apply()
    return f"pipeline/{name}"


def _for_workers(point, plan: Plan) -> dict:
    """A point's configuration as a worker must read it. A worker runs in its own checkout, so
    every local path is sent as the absolute path this sweep planned with (`local_paths`): the
    store (which no key hashes), a model folder, calibration and evaluation files. A hub model
    is sent at the commit its revision resolved to when the sweep planned, so a branch that
    moves before a worker plans changes neither the weights nor the keys. The worker's plan
    then has the sweep's keys. Names (the demo, corpus names, hub ids) are sent as they are."""
    update = {"store": plan.store, **local_paths(point)}
    identity = plan.settings["identity"]
    if identity["kind"] == "hub":
        update["revision"] = identity["revision"]
    return point.model_copy(update=update).model_dump(mode="json")


def run_on_pool(pool: str, points: list, plans: list[Plan], wait_minutes: float | None = None
                ) -> tuple[list[dict | Exception], list[dict]]:
    """One `pipeline` flow run per point on `pool`, all submitted at once and awaited (at most
    `wait_minutes`, then the unfinished ones are cancelled); per point its stage references
    (read from the store, `computed` where that flow run computed the stage) or a PointError
    naming its flow run, and the flow run ({"id", "name"})."""
    from prefect import get_run_logger
    from prefect.deployments import run_deployment

    name = deploy_points(pool)
    names = report.run_names([plan.settings for plan in plans])
    children = [run_deployment(name, parameters={"config": _for_workers(point, plan)},
                               flow_run_name=run_name, tags=[POINT_TAG], timeout=0,
                               as_subflow=True)
                for point, plan, run_name in zip(points, plans, names)]
    get_run_logger().info("%d points submitted to the work pool %s (%s)", len(children), pool,
                          name)
    finished = wait_for_flow_runs([c.id for c in children], pool, wait_minutes)
    outcomes: list[dict | Exception] = []
    for plan, run, child in zip(plans, finished, children):
        if run is None:
            outcomes.append(PointError(f"flow run {child.name!r} ({child.id}) was deleted "
                                       "before it finished"))
            continue
        if run.state is None or not run.state.is_completed():
            state = run.state.name if run.state else "unknown"
            message = " ".join(str(run.state.message or "").split()) if run.state else ""
            outcomes.append(PointError(f"flow run {run.name!r} ({run.id}) ended {state}"
                                       + (f": {message}" if message else "")))
            continue
        try:
            outcomes.append(stored_refs(plan, computed_by(run.id)))
        except Exception as exc:  # noqa: BLE001 - reported as this point's failure
            outcomes.append(exc)
    return outcomes, [{"id": str(child.id), "name": child.name} for child in children]


def wait_for_flow_runs(ids: list, pool: str = "", wait_minutes: float | None = None) -> list:
    """The flow runs `ids`, once every one of them is in a final state, or None for a run that
    was deleted meanwhile (e.g. from the UI). Every PROGRESS_SECONDS the log says how many
    finished and how many no worker has taken yet. After `wait_minutes` the runs not in a final
    state are cancelled (a running one through its worker), and the wait goes on until they
    are, or CANCEL_GRACE_SECONDS have passed (a dead worker never confirms)."""
    from prefect import get_run_logger
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.states import Cancelled, Cancelling

    log = get_run_logger()
    t0 = last_report = time.monotonic()
    cancelled = 0.0  # when the wait gave up
    with get_client(sync_client=True) as client:
        while True:
            runs = {r.id: r for start in range(0, len(ids), READ_CHUNK)
                    for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(
                        id=FlowRunFilterId(any_=ids[start:start + READ_CHUNK])),
                        limit=READ_CHUNK)}
            waiting = [r for r in runs.values() if not (r.state and r.state.is_final())]
            now = time.monotonic()
            if not waiting or (cancelled and now - cancelled > CANCEL_GRACE_SECONDS):
                return [runs.get(i) for i in ids]  # None: deleted
            if now - last_report >= PROGRESS_SECONDS:
                last_report = now
                queued = sum(1 for r in waiting if r.state and (r.state.is_scheduled()
                                                                 or r.state.is_pending()))
                log.info("%d of %d points finished; %d not yet taken by a worker of the pool "
                         "%s%s", len(ids) - len(waiting), len(ids), queued, pool,
                         " (is a worker running, with a free slot? a sweep that itself runs "
                         "on this pool holds one)" if queued == len(waiting) else "")
            if wait_minutes is not None and not cancelled and now - t0 > 60 * wait_minutes:
                cancelled = now
                message = (f"not finished after the sweep waited {wait_minutes:g} minutes "
                           "(wait_minutes); cancelled")
                log.warning("cancelling %d points: %s", len(waiting), message)
                for r in waiting:
                    state = (Cancelling(message=message) if r.state and r.state.is_running()
                             else Cancelled(message=message))
                    client.set_flow_run_state(r.id, state, force=True)
            time.sleep(POLL_SECONDS)


def computed_by(flow_run_id) -> set[str]:
    """The stage labels whose artifact the flow run computed (its task run `Completed`; a stage
    found in the store, or waited for and reused, ends `Cached`)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.split()[0] for r in runs if r.state and r.state.name == "Completed"}


def stored_refs(plan: Plan, computed: set[str]) -> dict[str, dict]:
    """The plan's stage references, from the commit records in the store."""
    store = ArtifactStore(plan.store)
    return {label: reference(store, spec, store.load_meta(spec.stage, spec.key),
                             computed=label in computed)
            for label, spec in plan.specs.items()}


def distinct_stages(plans: list[Plan]) -> dict[str, int]:
    """Per stage label, how many distinct artifacts the plans need (what one flow run submits)."""
    seen, counts = set(), {}
    for plan in plans:
        for label, spec in plan.specs.items():
            if (spec.store, spec.stage, spec.key) not in seen:
                seen.add((spec.store, spec.stage, spec.key))
                counts[label] = counts.get(label, 0) + 1
    return counts


class SweepError(SDSError):
    """Some points of a sweep failed (the others' results are written); `summary` is what
    `<out>/sweep.json` holds: the finished points' results and the failures."""

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary or {}


class PointError(SDSError):
    """A point's flow run on the work pool did not complete."""
