"""Results of a run: results.json, the table and markdown artifacts, the improvement of SDS.

results.json:

    {"config": {...}, "metrics": {"dense": {"ppl/wiki": ...}, "oneshot": {...}, "sds": {...}},
     "improvement": {"ppl/wiki": {"absolute": ..., "recovered": ..., "noise": ...}},
     "keys": {label: key}, "artifacts": {label: uri},
     "stages": {label: {"computed": bool, "seconds": {...}, "blocks": {"total", "computed"}}},
     "timings": {"wall", "stage_seconds", "compute_seconds", "overhead", "computed"},
     "model_dir": ..., "flow_run": {"id", "name"}, "answered_from_store": bool, "started": ...}

`answered_from_store` is true when the command line found every stage in the store and answered
without a flow run (see `flows/cli.py`); `flow_run`'s id and name are empty then.

Improvement of SDS over its one-shot base, per metric: the absolute change in the good
direction, and the fraction of the dense-to-one-shot gap it recovers,
`(ppl_oneshot - ppl_sds) / (ppl_oneshot - ppl_dense)` (accuracies the other way round).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
from datetime import datetime
from pathlib import Path

# which evaluation stage measures which model state
EVALUATIONS = {"dense": "evaluate-dense", "oneshot": "evaluate-oneshot", "sds": "evaluate-sds"}


def lower_is_better(metric: str) -> bool:
    return metric.startswith("ppl/")


# a one-shot gap below this fraction of the dense value is too small to share out: SDS moving
# the metric by the noise of the measurement would read as thousands of percent of it
NEGLIGIBLE_GAP = 0.005


def improvement(metrics: dict[str, dict], stderr: dict[str, dict] | None = None
                ) -> dict[str, dict]:
    """Per metric measured on all three states: {"absolute", "recovered", "noise"}.

    "noise" is twice the standard error of the one-shot gap, sqrt(se_dense² + se_oneshot²),
    where `stderr` ({state: {metric: standard error}}) has both (the zero-shot accuracies),
    else None. "recovered" is None when one-shot pruning is not worse than dense by more than
    `NEGLIGIBLE_GAP` of the dense value, or by more than that noise: no gap to share out (100
    examples put a 4-example gap within the noise, and SDS regaining 2 of them would read as
    half the gap recovered)."""
    dense, base, final = (metrics.get(s, {}) for s in ("dense", "oneshot", "sds"))
    se_dense, se_base = ((stderr or {}).get(s, {}) for s in ("dense", "oneshot"))
    out = {}
    for name in final:
        d, b, f = dense.get(name), base.get(name), final.get(name)
        if None in (d, b, f):
            continue
        sign = 1.0 if lower_is_better(name) else -1.0
        absolute = sign * (b - f)
        gap = sign * (b - d)
        noise = (2 * math.hypot(se_dense[name], se_base[name])
                 if name in se_dense and name in se_base else None)
        real = gap > 0 and gap > NEGLIGIBLE_GAP * abs(d) and (noise is None or gap > noise)
        out[name] = {"absolute": absolute, "recovered": absolute / gap if real else None,
                     "noise": noise}
    return out


def build_results(plan, refs: dict[str, dict], started: datetime, wall: float,
                  model_dir: str | None = None, flow_run: dict | None = None) -> dict:
    """The record of one pipeline run (see the module docstring). `flow_run` None: the run was
    answered from the store without a flow run (`finish`)."""
    metrics = {state: dict(refs[label]["metrics"]) for state, label in EVALUATIONS.items()
               if label in refs}
    stages = {}
    for label, ref in refs.items():
        stages[label] = {"key": ref["key"], "uri": ref["uri"], "sha256": ref.get("sha256"),
                         "computed": ref["computed"], "seconds": ref.get("seconds", {})}
        if "blocks" in ref:  # {"total", "computed" by this run}
            stages[label]["blocks"] = ref["blocks"]
    computed = [s for s in stages.values() if s["computed"]]
    stage_seconds = sum(s["seconds"].get("work", 0.0) for s in computed)
    compute_seconds = sum(s["seconds"].get("compute", 0.0) for s in computed)
    config = dict(plan.settings)
    return {
        "model": config["model"], "method": config["method"],
        "pattern": config["pattern"], "sds": config["sds"],
        "config": config,
        "metrics": metrics,
        "improvement": improvement(metrics, {state: refs[label].get("stderr", {})
                                             for state, label in EVALUATIONS.items()
                                             if label in refs}),
        "keys": plan.keys(),
        "artifacts": {label: s["uri"] for label, s in stages.items()},
        "final": {"stage": plan.final, "key": plan.specs[plan.final].key,
                  "uri": stages[plan.final]["uri"], "sha256": stages[plan.final]["sha256"]},
        "stages": stages,
        "timings": {"wall": wall, "stage_seconds": stage_seconds,
                    "compute_seconds": compute_seconds,
                    "overhead": wall - stage_seconds,
                    "computed": sorted(label for label, s in stages.items() if s["computed"])},
        "model_dir": model_dir,
        "flow_run": flow_run or {"id": "", "name": ""},
        "answered_from_store": flow_run is None,
        "started": started.isoformat(timespec="milliseconds"),
    }


def finish(plan, refs: dict[str, dict], out: str | os.PathLike | None, export,
           started: datetime, t0: float, flow_run: dict | None) -> dict:
    """The end of one pipeline run, whoever ran its stages (a flow, or the command line that
    found them all in the store): the final model written to `<out>/model` by `export(spec,
    ref, folder)` (None: no model folder, and a model folder an earlier run exported there is
    removed, so that none stands beside results saying `model_dir: null`), the results record,
    `<out>/results.json`."""
    from tasks.common import host_lock
    from tasks.export import check_replaceable, remove_model

    if not out:
        return build_results(plan, refs, started, time.perf_counter() - t0, None, flow_run)
    Path(out).mkdir(parents=True, exist_ok=True)
    # runs that finish into one folder at once (two triggers of one deployment) take turns, so
    # the folder ends with one run's model and that run's results
    with host_lock(out):
        if export is not None:  # a folder the export may not replace stops it here, as is
            check_replaceable(Path(out) / "model")
        # an earlier run's results go first: killed while the model folder changes, this run
        # leaves no results.json beside a model that is not the one it names
        with contextlib.suppress(FileNotFoundError):
            os.remove(Path(out) / "results.json")
        model_dir = None
        if export is not None:
            model_dir = export(plan.specs[plan.final], refs[plan.final],
                               str(Path(out) / "model"))
        else:
            remove_model(Path(out) / "model")
        results = build_results(plan, refs, started, time.perf_counter() - t0, model_dir,
                                flow_run)
        write_json(results, Path(out) / "results.json")
    return results


def slug(*parts: str) -> str:
    """An artifact key / folder name: lowercase letters, digits and dashes."""
    text = "-".join(p for p in parts if p)
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", text.lower())).strip("-")[:100]


def run_name(results_or_config: dict) -> str:
    s = results_or_config.get("config", results_or_config)
    name = "demo" if s.get("demo") else Path(str(s["model"]).rstrip("/")).name
    return slug(name, s["method"], s["pattern"].replace("%", "pct"),
                "sds" if s["sds"] else "oneshot")


def run_names(settings: list[dict]) -> list[str]:
    """`run_name` of each point of a sweep, unique per model: where points of different models
    share a name (two folders both named `opt`, or two hub ids ending in the same name), each of
    them gets a short hash of its model (resolved folder or hub id, and revision) appended, the
    same on every rerun. The other names stay as they are."""
    names = [run_name(s) for s in settings]
    models: dict[str, set[str]] = {}
    for name, s in zip(names, settings):
        models.setdefault(name, set()).add(_model_of(s))
    return [f"{name[:93]}-{hashlib.sha256(_model_of(s).encode()).hexdigest()[:6]}"
            if len(models[name]) > 1 else name for name, s in zip(names, settings)]


def _model_of(settings: dict) -> str:
    return f"{settings['model']}@{settings.get('revision') or ''}"


def decimals(*values) -> int:
    """Decimals for a row of numbers (one metric on each model state): one for perplexities in
    the hundreds, two above 1, three up to 1 (accuracies, a perfect 1.0 included), after the
    largest of them, so that a row reads 177.0 / 169.7 and 0.300 / 0.295 (1.000 / 0.994)."""
    sizes = [abs(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    size = max(sizes, default=0.0)
    return 1 if size >= 100 else 2 if size > 1 else 3


def _fmt(value, places: int | None = None) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        places = decimals(value) if places is None else places
        return f"{round(value, places) + 0.0:.{places}f}"  # + 0.0: no "-0.000"
    return str(value)


def signed(value, places: int | None = None) -> str:
    if value is None:
        return "–"
    places = decimals(value) if places is None else places
    return f"{round(value, places) + 0.0:+.{places}f}"


def percent(value) -> str:
    return "–" if value is None else f"{100 * value + 0.0:+.1f}%"


def table_rows(results: dict) -> list[dict]:
    """One row per metric: the value on each model state, and what SDS gained."""
    metrics = results["metrics"]
    names = []
    for state in ("dense", "oneshot", "sds"):
        names += [n for n in metrics.get(state, {}) if n not in names]
    rows = []
    for name in names:
        row = {"metric": name}
        for state in ("dense", "oneshot", "sds"):
            if state in metrics:
                row[state] = metrics[state].get(name)
        gain = results["improvement"].get(name)
        if gain:
            row["sds gain"] = gain["absolute"]
            row["gap recovered"] = gain["recovered"]
        rows.append(row)
    return rows


def artifact_rows(results: dict) -> list[dict]:
    """`table_rows` with numbers rounded, for a Prefect table artifact."""
    return [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
            for row in table_rows(results)]


def markdown(results: dict) -> str:
    s = results["config"]
    rows = table_rows(results)
    lines = [f"# {'SDS' if s['sds'] else 'One-shot'} pruning of `{s['model']}`", "",
             f"{s['method']}, pattern {s['pattern']}; calibration {s['nsamples']} x "
             f"{s['seqlen']} tokens of {s['calib']}; store `{s['store']}`.", ""]
    if rows:
        columns = list(rows[0])
        for row in rows:
            columns += [c for c in row if c not in columns]
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in rows:
            places = decimals(*(row.get(c) for c in ("dense", "oneshot", "sds")))
            cells = [percent(row.get(c)) if c == "gap recovered" else
                     signed(row.get(c), places) if c == "sds gain" else
                     _fmt(row.get(c), places) for c in columns]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    gains = results["improvement"]
    if gains:
        lines += ["## Improvement of SDS over one-shot pruning", ""]
        metrics = results["metrics"]
        for name, gain in gains.items():
            rec, change = gain["recovered"], gain["absolute"]
            noise = gain.get("noise")
            share = (f"{percent(rec)} of the gap to dense recovered" if rec is not None
                     else f"one-shot pruning left no gap to dense above "
                     f"{NEGLIGIBLE_GAP:.1%}" + ("" if noise is None else
                                                f" and above the noise, {noise:.3f}"))
            verdict = "better" if change > 0 else "worse" if change < 0 else "unchanged"
            places = decimals(metrics["oneshot"][name], metrics["sds"][name])
            lines.append(f"- **{name}**: one-shot {_fmt(metrics['oneshot'][name], places)} → "
                         f"SDS {_fmt(metrics['sds'][name], places)}, {signed(change, places)} "
                         f"({verdict}; {share})")
        lines.append("")
    t = results["timings"]
    lines += ["## Stages", "", "| stage | key | computed | seconds |", "|---|---|---|---|"]
    for label, st in results["stages"].items():
        lines.append(f"| {label} | `{st['key']}` | {'yes' if st['computed'] else 'cached'} | "
                     f"{_fmt(st['seconds'].get('work'))} |")
    lines += ["", f"Wall time {t['wall']:.1f} s; stages computed in this run "
              f"{t['stage_seconds']:.1f} s; orchestration overhead {t['overhead']:.1f} s.", ""]
    if results.get("model_dir"):
        lines.append(f"Model folder: `{results['model_dir']}`")
    return "\n".join(lines)


def publish(results: dict, name: str | None = None) -> None:
    """The results table and the markdown report, as Prefect artifacts of the flow run, keyed
    `sds-results-<name>` and `sds-report-<name>`; `name`: the run's name (a sweep's point: the
    unique name the sweep gave it, `run_names`), else `run_name(results)`."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    name = name or run_name(results)
    rows = artifact_rows(results)
    if rows:
        create_table_artifact(table=rows, key=slug("sds-results", name),
                              description=f"Metrics per model state: {name}")
    create_markdown_artifact(markdown=markdown(results), key=slug("sds-report", name),
                             description=f"SDS report: {name}")


def write_json(data: dict, path: str | os.PathLike) -> Path:
    """Write JSON atomically (a reader sees the old file or the new one)."""
    from fsspec.implementations.local import LocalFileSystem

    from tasks.store import atomic_file

    path = Path(path).expanduser().resolve()
    with atomic_file(LocalFileSystem(), str(path)) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    return path
