"""Wall time of `sds run` on the demo defaults, cold and fully cached, and the orchestration
overhead (pipeline wall time minus the sum of the stage work done in the run).

    python benchmarks/pipeline.py --write

Each run is a fresh `sds run` process; all share one store, output folder and PREFECT_HOME
(a fresh one, so the cold run includes creating Prefect's embedded database). The fully cached
run is measured as a user gets it (answered from the store, no Prefect) and with `--flow-run`
(the recorded flow run, Prefect's embedded API included); each cached figure is the median of
REPEATS runs. Torch runs one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REPEATS = 3


def run_once(workdir: Path, extra: list[str]) -> dict:
    env = dict(os.environ, PREFECT_HOME=str(workdir / "prefect"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "flows.cli", "run", "--store", str(workdir / "store"),
           "--out", str(workdir / "out"), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"sds run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    results = json.loads((workdir / "out" / "results.json").read_text())
    return {"process": wall, **results["timings"], "metrics": results["metrics"],
            "from_store": results["answered_from_store"]}


def median_run(workdir: Path, extra: list[str]) -> dict:
    """The run of median process time among REPEATS."""
    runs = sorted((run_once(workdir, extra) for _ in range(REPEATS)), key=lambda r: r["process"])
    return runs[len(runs) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    p.add_argument("extra", nargs="*", help="more `sds run` options (after --)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cold = run_once(Path(tmp), a.extra)
        cached = median_run(Path(tmp), a.extra)
        recorded = median_run(Path(tmp), [*a.extra, "--flow-run"])
    assert cached["from_store"] and not recorded["from_store"]
    rows = [("cold", cold), ("fully cached", cached),
            ("fully cached, `--flow-run`", recorded)]
    from benchmarks.report import command_line

    command = command_line(__file__, argv)
    lines = ["## Pipeline", "", f"Command: `{command.strip()}`", "",
             "`sds run` with no options (demo OPT model, SparseGPT 2:4 + SDS, demo calibration, "
             "wiki/news perplexity and the demo zero-shot tasks, local store, Prefect's embedded "
             "API). *process* is the whole command (imports and Prefect start-up included); "
             "*pipeline* is the flow's wall time (for the run answered from the store: the time "
             "to answer); *stage work* sums the stages computed in the run (stages can overlap, "
             "e.g. the dense evaluation runs beside the pruning); overhead = pipeline − stage "
             f"work. Cached rows: the median of {REPEATS} runs.", "",
             "| run | process s | pipeline s | stage work s | overhead s | stages computed |",
             "|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['process']:.1f} | {r['wall']:.1f} | "
                     f"{r['stage_seconds']:.1f} | {r['overhead']:.1f} | "
                     f"{', '.join(r['computed']) or 'none'} |")
    share = cached["process"] / cold["process"]
    flow_share = recorded["process"] / cold["process"]
    lines += ["", f"The fully cached run takes {share:.1%} of the cold run's time "
              f"({cached['process']:.2f} s against {cold['process']:.1f} s): every stage is "
              "committed, so `sds run` answers from the store, reading each stage's meta.json "
              "(no tensors) and importing neither Prefect nor torch nor transformers; what is "
              "left is Python's start, the command's imports (pydantic, fsspec, rich) and "
              "hashing the demo model's files for the keys. The same run as a recorded flow run "
              f"(`--flow-run`) takes {flow_share:.0%}: Prefect's import and its embedded API "
              "server's start, which overlap, and the flow's task runs. Torch runs one thread "
              f"(OMP_NUM_THREADS=1), on a machine of {os.cpu_count()} CPU cores shared with "
              f"other work; load average {os.getloadavg()[0]:.1f} at the end."]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.write:
        from benchmarks.report import replace_section

        replace_section(ROOT / "BENCHMARKS.md", "Pipeline", text)


if __name__ == "__main__":
    main()
