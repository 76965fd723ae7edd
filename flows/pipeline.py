"""The pipeline flow: prune one model with one method and pattern, SDS on top, and evaluate.

    calibration ─┬─> oneshot ──> redense ──> second ──> evaluate(final)
                 │       └──────────────────────────────> evaluate(oneshot)
                 └──────────────────────────────────────> evaluate(dense)

Every stage is a task (tasks.stages) whose cache is the artifact store: a stage whose artifact is
committed there is not computed again, whichever run, machine or retry asks for it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture, wait
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from sds.errors import ConfigError, UpstreamLostError
from sds.patterns import Pattern
from tasks import stages
from tasks.common import ensure_gpu_limit, pinned
from tasks.config import RunConfig
from tasks.plan import Plan, StageSpec, plan_pipeline
from tasks.store import ArtifactStore

from . import report

POINT_TAG = "sds-sweep-point"  # a sweep's point on a work pool: it keeps the name it was given


class StageTaskRunner(ThreadPoolTaskRunner):
    """Prefect's thread pool, except that a flow interrupted (Ctrl-C, SIGTERM: an exception that
    is not an Exception) does not wait for the stages computing in its threads. Prefect records
    the crash only once the task runner has closed; waiting for a stage there outlasted the
    command line's grace (`flows.cli.GRACE_SECONDS`), which then exited with the flow run left
    `Running` for good (no retry: Prefect retries only runs in a final state)."""

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            executor = getattr(self, "_executor", None)  # Prefect's pool (3.x)
            if executor is not None:
                self._executor = None  # so that Prefect's exit does not wait for it
                executor.shutdown(wait=False, cancel_futures=True)
        super().__exit__(exc_type, exc_value, traceback)


class StageRunner:
    """Submits stage tasks, one future per artifact: stages that several runs share (the same
    key) are submitted once per flow run."""

    def __init__(self):
        self.futures: dict[tuple[str, str, str], PrefectFuture] = {}

    def __call__(self, task, spec: StageSpec, wait_for: list[PrefectFuture] | None = None,
                 **upstream: PrefectFuture) -> PrefectFuture:
        ident = (spec.store, spec.stage, spec.key)
        if ident not in self.futures:
            self.futures[ident] = task.with_options(task_run_name=spec.title).submit(
                spec, wait_for=wait_for, **upstream)
        return self.futures[ident]


def submit_stages(run: StageRunner, plan: Plan) -> dict[str, PrefectFuture]:
    """The diagram above, as task submissions. Returns the futures by stage label."""
    specs, f = plan.specs, {}
    f["calibration"] = calib = run(stages.calibration, specs["calibration"])
    if "evaluate-dense" in specs:  # after the calibration: data that is too short (a quick
        # stage's error) stops the run before an evaluation that can take hours
        f["evaluate-dense"] = run(stages.evaluate, specs["evaluate-dense"], wait_for=[calib])
    f["oneshot"] = pruned = run(stages.oneshot, specs["oneshot"], calibration=calib)
    if "evaluate-oneshot" in specs:
        f["evaluate-oneshot"] = run(stages.evaluate, specs["evaluate-oneshot"], weights=pruned)
    if "second" in specs:
        f["redense"] = dense = run(stages.redense, specs["redense"], calibration=calib,
                                   oneshot=pruned)
        f["second"] = final = run(stages.second, specs["second"], calibration=calib,
                                  redense=dense)
        if "evaluate-sds" in specs:
            f["evaluate-sds"] = run(stages.evaluate, specs["evaluate-sds"], weights=final)
    return f


def resolve(futures: dict[str, PrefectFuture]) -> dict[str, dict]:
    """Wait for every stage and return the references by label. When stages failed, raise the
    exception of the first one in pipeline order (its dependents only say they never ran)."""
    wait(list(futures.values()))
    for future in futures.values():
        if future.state.is_failed() or future.state.is_crashed():
            future.result()  # raises the stage's own exception
    return {label: future.result() for label, future in futures.items()}


def run_plans(plans: list[Plan]) -> list[dict | Exception]:
    """Run the stages of every plan (shared stages once); per plan its references or the error
    that stopped it.

    A stage that finds an upstream artifact damaged discards it and fails (UpstreamLostError):
    the plans then run once more, which recomputes what was discarded and reuses the rest.
    """
    outcomes = _run_once(plans)
    if any(isinstance(o, UpstreamLostError) for o in outcomes):
        get_run_logger().warning("an upstream artifact was damaged and discarded; running the "
                                 "stages again to recompute it")
        outcomes = _run_once(plans)
    return outcomes


def _run_once(plans: list[Plan]) -> list[dict | Exception]:
    runner = StageRunner()
    submitted = [submit_stages(runner, plan) for plan in plans]
    outcomes: list[dict | Exception] = []
    for futures in submitted:
        try:
            outcomes.append(resolve(futures))
        except Exception as exc:  # noqa: BLE001 - one failed point must not hide the others
            outcomes.append(exc)
    return outcomes


def finish(plan: Plan, refs: dict, out, export, started, t0: float, run: dict,
           repair: bool = True) -> dict:
    """`report.finish`; where the export finds the final artifact damaged (and discards it),
    the plan's stages run once more, which computes it again, and the export follows. Without
    `repair` (a sweep whose points run on a pool, not on its own machine) the error stands."""
    try:
        return report.finish(plan, refs, out, export, started, t0, run)
    except UpstreamLostError as exc:
        if not repair:
            raise
        get_run_logger().warning("%s; it was discarded, and the flow computes it again",
                                 exc.damage)
    (refs,) = run_plans([plan])
    if isinstance(refs, Exception):
        raise refs
    return report.finish(plan, refs, out, export, started, t0, run)


def current_run() -> dict:
    return {"id": str(flow_run.get_id() or ""), "name": flow_run.get_name() or ""}


def _run_name() -> str:
    """The flow run's name: a sweep's point keeps the name the sweep gave it (unique within the
    sweep, `report.run_names`, and its results folder's); any other run is named after its
    configuration, the pattern in its one spelling."""
    if POINT_TAG in (flow_run.get_tags() or ()) and flow_run.get_name():
        return flow_run.get_name()
    config = RunConfig.model_validate(flow_run.get_parameters().get("config") or {})
    try:
        pattern = str(Pattern.parse(config.pattern))
    except ConfigError:  # the plan refuses it, with the accepted forms
        pattern = config.pattern
    return report.run_name({"model": config.model or "demo", "method": config.method,
                            "pattern": pattern, "sds": config.sds})


@flow(name="pipeline", flow_run_name=_run_name, task_runner=StageTaskRunner(),
      description="Prune one model (one-shot, then SDS), evaluate dense / one-shot / SDS.")
def pipeline(config: RunConfig = RunConfig()) -> dict:  # noqa: B008 - a frozen model
    """One model, one method, one pattern (see tasks.config.RunConfig for every option).

    Writes `<out>/results.json` and, with `export`, the final model to `<out>/model`. Returns
    the results dict.
    """
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    plan = plan_pipeline(config)
    ArtifactStore(plan.store).check()
    ensure_gpu_limit(config.gpu_limit)

    with pinned([plan], get_run_logger()):  # `sds store gc` meanwhile leaves them be
        (refs,) = run_plans([plan])
        if isinstance(refs, Exception):
            raise refs
        results = finish(plan, refs, config.out,
                         stages.export_model if config.export else None, started, t0,
                         current_run())
    # a sweep's point: under the name the sweep gave it (unique per model), not the name of
    # its configuration, which points of two models named alike share
    point = POINT_TAG in (flow_run.get_tags() or ())
    report.publish(results, flow_run.get_name() if point else None)
    return results
