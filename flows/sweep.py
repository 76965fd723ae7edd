"""The sweep flow: models x methods x patterns, fanned out as tasks of one flow run.

Stages that several grid points share have the same artifact key and are submitted once: the
calibration of a model and its dense evaluation run once for the whole grid, and a one-shot
pruning is shared by the SDS and plain variants of the same point.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_table_artifact

from sds.errors import SDSError
from tasks import stages
from tasks.common import ensure_gpu_limit
from tasks.config import SweepConfig
from tasks.plan import plan_pipeline
from tasks.store import ArtifactStore

from . import report
from .pipeline import current_run, run_plans


@flow(name="sweep", description="A grid of models x methods x patterns; shared stages once.")
def sweep(config: SweepConfig = SweepConfig()) -> dict:  # noqa: B008 - a frozen model
    """Every combination of models, methods, patterns (and SDS on/off), with the shared options
    of `config` (see tasks.config.SweepConfig).

    Writes `<out>/<run name>/results.json` per point (and the model with `export`) and
    `<out>/sweep.json`; a point that fails does not stop the others, but fails the sweep.
    """
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    out, export = config.out, config.export
    plans = [plan_pipeline(point) for point in config.points()]
    ArtifactStore(plans[0].store).check()
    ensure_gpu_limit(config.gpu_limit)

    outcomes, submitted = run_plans(plans)
    points, failures = [], []
    for plan, refs in zip(plans, outcomes):
        name = report.run_name(plan.settings)
        try:
            if isinstance(refs, Exception):
                raise refs
            model_dir = None
            if out and export:
                model_dir = stages.export_model(plan.specs[plan.final], refs[plan.final],
                                                str(Path(out) / name / "model"))
            results = report.build_results(plan, refs, started, time.perf_counter() - t0,
                                           model_dir, current_run())
            if out:
                report.write_json(results, Path(out) / name / "results.json")
            points.append({"name": name, "results": results})
        except Exception as exc:  # noqa: BLE001 - one failed point must not hide the others
            message = " ".join(str(exc).split()) or type(exc).__name__
            failures.append({"name": name, "error": message,
                             "type": type(exc).__name__})

    summary = {
        "runs": [{"name": p["name"], "metrics": p["results"]["metrics"],
                  "improvement": p["results"]["improvement"], "keys": p["results"]["keys"]}
                 for p in points],
        "failures": failures,
        "stage_submissions": submitted,  # how many times each stage label ran (shared: 1)
        "wall": time.perf_counter() - t0,
        "flow_run": current_run(),
    }
    rows = []
    for p in points:
        for row in report.table_rows(p["results"]):
            rows.append({"run": p["name"], **{k: (round(v, 6) if isinstance(v, float) else v)
                                              for k, v in row.items()}})
    for f in failures:
        rows.append({"run": f["name"], "metric": "failed", "error": f["error"]})
    if rows:
        create_table_artifact(table=rows, key="sds-sweep", description="Sweep: metric per run")
    if out:
        report.write_json(summary, Path(out) / "sweep.json")
    if failures:
        raise SweepError(f"{len(failures)} of {len(plans)} runs failed; first: "
                         f"{failures[0]['name']}: {failures[0]['error']}")
    return summary


class SweepError(SDSError):
    """Some points of a sweep failed (the others' results are written)."""
