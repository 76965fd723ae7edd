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
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture, wait
from prefect.runtime import flow_run

from sds.errors import UpstreamLostError
from tasks import stages
from tasks.common import GPU_LIMIT, ensure_gpu_limit
from tasks.plan import Plan, plan_pipeline
from tasks.store import DEFAULT_ROOT, ArtifactStore

from . import report


class StageRunner:
    """Submits stage tasks, one future per artifact: stages that several runs share (the same
    key) are submitted once per flow run."""

    def __init__(self):
        self.futures: dict[tuple[str, str, str], PrefectFuture] = {}
        self.submitted: dict[str, int] = {}

    def __call__(self, task, spec: dict, **upstream: PrefectFuture) -> PrefectFuture:
        ident = (spec["store"], spec["stage"], spec["key"])
        if ident not in self.futures:
            self.futures[ident] = task.with_options(task_run_name=spec["title"]).submit(
                spec, **upstream)
            self.submitted[spec["label"]] = self.submitted.get(spec["label"], 0) + 1
        return self.futures[ident]


def submit_stages(run: StageRunner, plan: Plan) -> dict[str, PrefectFuture]:
    """The diagram above, as task submissions. Returns the futures by stage label."""
    specs, f = plan.specs, {}
    f["calibration"] = calib = run(stages.calibration, specs["calibration"])
    if "evaluate-dense" in specs:
        f["evaluate-dense"] = run(stages.evaluate, specs["evaluate-dense"])
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


def run_plans(plans: list[Plan]) -> tuple[list[dict | Exception], dict[str, int]]:
    """Run the stages of every plan (shared stages once); per plan its references or the error
    that stopped it, and how many times each stage label was submitted.

    A stage that finds an upstream artifact damaged discards it and fails (UpstreamLostError):
    the plans then run once more, which recomputes what was discarded and reuses the rest.
    """
    for attempt in (1, 2):
        runner = StageRunner()
        submitted = [submit_stages(runner, plan) for plan in plans]
        wait(list(runner.futures.values()))
        outcomes: list[dict | Exception] = []
        for futures in submitted:
            try:
                outcomes.append(resolve(futures))
            except Exception as exc:  # noqa: BLE001 - one failed point must not hide the others
                outcomes.append(exc)
        if attempt == 2 or not any(isinstance(o, UpstreamLostError) for o in outcomes):
            return outcomes, runner.submitted
        get_run_logger().warning("an upstream artifact was damaged and discarded; running the "
                                 "stages again to recompute it")
    raise AssertionError("not reached")


def current_run() -> dict:
    return {"id": str(flow_run.get_id() or ""), "name": flow_run.get_name() or ""}


def _run_name() -> str:
    p = flow_run.get_parameters()
    model = Path(str(p.get("model") or "demo").rstrip("/")).name
    return report.slug(model, p.get("method", ""), str(p.get("pattern", "")).replace("%", "pct"),
                       "sds" if p.get("sds", True) else "oneshot")


@flow(name="pipeline", flow_run_name=_run_name,
      description="Prune one model (one-shot, then SDS), evaluate dense / one-shot / SDS.")
def pipeline(
    model: str | None = None,
    method: str = "sparsegpt",
    pattern: str = "2:4",
    sds: bool = True,
    calib: str | None = None,
    eval: str | list[str] | None = None,
    nsamples: int | None = None,
    seqlen: int | None = None,
    tasks: str | list[str] | None = None,
    store: str = DEFAULT_ROOT,
    out: str | None = "./sds-out",
    sds_options: dict | None = None,
    overrides: dict[str, str] | None = None,
    exclude: list[str] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    seed: int = 0,
    dtype: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    limit: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    verify: bool = True,
    gpu_limit: str | None = GPU_LIMIT,
    export: bool = True,
) -> dict:
    """One model, one method, one pattern.

    Without `model` (or with "demo") the offline demo runs with small defaults; with a hub id
    or a folder the papers' defaults apply (see tasks.plan). `sds_options` are
    `sds.reconstruct.SDSConfig` fields (epochs, lr, l1, l2, ...). Writes `<out>/results.json`
    and, with `export`, the final model to `<out>/model`. Returns the results dict.
    """
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    plan = plan_pipeline(
        model, method, pattern, sds, calib, eval, nsamples, seqlen, tasks, store,
        sds_options=sds_options, overrides=overrides, exclude=exclude, blocksize=blocksize,
        percdamp=percdamp, seed=seed, dtype=dtype, revision=revision,
        trust_remote_code=trust_remote_code, limit=limit, batch_size=batch_size, device=device,
        verify=verify, gpu_limit=gpu_limit)
    ArtifactStore(plan.store).check()
    ensure_gpu_limit(gpu_limit)

    (refs,), _submitted = run_plans([plan])
    if isinstance(refs, Exception):
        raise refs

    model_dir = None
    if out and export:
        final = plan.specs[plan.final]
        model_dir = stages.export_model(final, refs[plan.final], str(Path(out) / "model"))
    results = report.build_results(plan, refs, started, time.perf_counter() - t0, model_dir,
                                   current_run())
    report.publish(results)
    if out:
        report.write_json(results, Path(out) / "results.json")
    return results
