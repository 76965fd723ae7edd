"""Fan-out: `sds sweep --pool` runs each grid point as its own flow run on a process work pool,
exactly as deployments/README.md tells a team to: a real Prefect server, `prefect work-pool
create`, two `prefect worker start` processes (standing in for two machines, each in a checkout)
and a moto S3 store that all of them share."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.store import ArtifactStore
from tests.test_deploy import _wait_for
from tests.test_pipeline_fixtures import REPO, hub_answering, server_env

pytest_plugins = ["tests.test_pipeline_fixtures"]

POOL = "sds-test-fanout"
WORKERS = ("worker-a", "worker-b")


def _sweep_args(model: Path, corpus: dict[str, Path], store: str, out: Path) -> list[str]:
    """A 2 x 2 grid (two methods x two patterns) of the tiny model: seconds per point."""
    return ["sweep", "--models", str(model), "--methods", "sparsegpt,wanda", "--patterns",
            "2:4,0.5", "--calib", str(corpus["calib"]), "--eval", str(corpus["heldout"]),
            "--tasks", "none", "--nsamples", "4", "--seqlen", "32", "--epochs", "5",
            "--adjust-epochs", "5", "--gpu-limit", "none", "--store", store, "--out", str(out)]


def _run(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"`{' '.join(args[:4])} ...` did not finish in {timeout:.0f} s: "
                             f"{(exc.stderr or b'')[-3000:]!r}") from None


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _results(out: Path) -> dict[str, dict]:
    summary = json.loads((out / "sweep.json").read_text())
    assert not summary["failures"], summary["failures"]
    return {run["name"]: json.loads((out / run["name"] / "results.json").read_text())
            for run in summary["runs"]}


def _wait_for_workers(client, logs: dict[str, Path], workers: list) -> None:
    """Until the pool lists every worker (they poll it once started)."""
    def joined() -> bool:
        for name, process in zip(WORKERS, workers):
            if process.poll() is not None:
                raise AssertionError(f"{name} exited: {logs[name].read_text()[-3000:]}")
        return set(WORKERS) <= {w.name for w in client.read_workers_for_work_pool(POOL)}

    _wait_for("the workers to reach the pool", joined, 90, log=logs[WORKERS[0]])


@pytest.mark.slow
def test_a_sweep_fans_out_over_two_workers_and_computes_each_artifact_once(
        prefect_api, tiny_model, corpus, s3_bucket, tmp_path):
    from prefect.client.orchestration import get_client

    env = server_env(tmp_path, PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_LOGGING_LEVEL="INFO")
    store = f"s3://{s3_bucket}/fanout"
    created = _run(["-m", "prefect", "work-pool", "create", POOL, "--type", "process"],
                   env, 60)
    assert created.returncode == 0, created.stdout + created.stderr

    logs = {name: tmp_path / f"{name}.log" for name in WORKERS}
    workers = []
    try:
        for name in WORKERS:  # each with its own Prefect home, as on its own machine
            with open(logs[name], "wb") as log:
                workers.append(subprocess.Popen(
                    [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL,
                     "--name", name, "--limit", "2"],
                    # unbuffered: a worker that a loaded machine makes kill (after 15 s of
                    # SIGINT) keeps what it relayed of its flow runs' output in its log
                    env={**env, "PREFECT_HOME": str(tmp_path / name),
                         "PYTHONUNBUFFERED": "1"}, cwd=REPO, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True))
        with get_client(sync_client=True) as client:
            _wait_for_workers(client, logs, workers)
        fanned = _run(["-m", "flows.cli", *_sweep_args(tiny_model, corpus, store,
                                                       tmp_path / "fanned"), "--pool", POOL],
                      env, 300)
        assert fanned.returncode == 0, fanned.stderr[-3000:] + "".join(
            f"\n--- {name}:\n{logs[name].read_text()[-3000:]}" for name in WORKERS)
    finally:
        for process in workers:
            _stop(process)

    fanned = _results(tmp_path / "fanned")
    assert len(fanned) == 4

    # each point was its own flow run, and both workers ran points
    run_ids = {r["flow_run"]["id"] for r in fanned.values()}
    assert len(run_ids) == 4 and "" not in run_ids
    # under the name the sweep gave it, its folder's (`0.5` is 50pct, in its one spelling)
    assert all(r["flow_run"]["name"] == name for name, r in fanned.items()), list(fanned)
    assert sorted(n.split("-sparsegpt-")[-1] for n in fanned if "-sparsegpt-" in n) == [
        "2-4-sds", "50pct-sds"], list(fanned)
    # a flow run's own log lines go to its worker's output: "View at .../flow-run/<id>"
    ran = {name: set(re.findall(r"/flow-run/([0-9a-f-]{36})", logs[name].read_text()))
           for name in WORKERS}
    assert all(ran.values()), f"points per worker: {ran}"
    assert ran["worker-a"].isdisjoint(ran["worker-b"])
    assert ran["worker-a"] | ran["worker-b"] == run_ids, ran

    # at least two points ran at the same time
    with get_client(sync_client=True) as client:
        spans = sorted((run.start_time, run.end_time) for run in
                       (client.read_flow_run(i) for i in run_ids))
    assert all(start and end for start, end in spans), spans
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans

    # every artifact, shared ones included, was computed by exactly one point's flow run
    computed: dict[tuple[str, str], int] = {}
    for results in fanned.values():
        for label, stage in results["stages"].items():
            computed[label, stage["key"]] = computed.get((label, stage["key"]), 0) + (
                1 if stage["computed"] else 0)
    assert computed and all(n == 1 for n in computed.values()), computed
    shared = {label for label, _ in computed}
    assert {"calibration", "evaluate-dense"} <= shared
    assert sum(1 for label, _ in computed if label == "calibration") == 1
    # ... and the store holds exactly those artifacts
    assert {a["key"] for a in ArtifactStore(store).list()} == {key for _, key in computed}

    # the same results as the whole sweep in one process, on a store of its own
    alone = _run(["-m", "flows.cli", *_sweep_args(tiny_model, corpus, f"s3://{s3_bucket}/alone",
                                                  tmp_path / "alone")], env, 300)
    assert alone.returncode == 0, alone.stderr[-3000:]
    alone = _results(tmp_path / "alone")
    assert set(alone) == set(fanned)
    for name, results in alone.items():
        assert fanned[name]["keys"] == results["keys"], name
        assert fanned[name]["final"]["sha256"] == results["final"]["sha256"], name
        assert fanned[name]["metrics"] == results["metrics"], name  # the same models
    summaries = [json.loads((tmp_path / out / "sweep.json").read_text())
                 for out in ("fanned", "alone")]
    assert summaries[0]["stage_submissions"] == summaries[1]["stage_submissions"]
    assert [r["keys"] for r in summaries[0]["runs"]] == [r["keys"] for r in summaries[1]["runs"]]



@pytest.mark.slow
def test_a_sweep_on_a_pool_needs_the_server_and_an_existing_pool(prefect_api, tiny_model,
                                                                   corpus, tmp_path):
    args = ["-m", "flows.cli", *_sweep_args(tiny_model, corpus, str(tmp_path / "store"),
                                             tmp_path / "out")]
    # no PREFECT_API_URL: the workers could not reach this command's embedded API
    alone = _run([*args, "--pool", POOL], {**server_env(tmp_path), "PREFECT_API_URL": ""}, 120)
    assert alone.returncode == 2 and "set PREFECT_API_URL" in alone.stderr, alone.stderr
    absent = _run([*args, "--pool", "no-such-pool"], server_env(tmp_path), 120)
    assert absent.returncode == 2, absent.stderr
    assert "prefect work-pool create no-such-pool" in absent.stderr, absent.stderr
    assert not (tmp_path / "out" / "sweep.json").exists()


@pytest.mark.slow
def test_a_sweep_stops_waiting_for_a_pool_no_worker_serves(prefect_api, tiny_model, corpus,
                                                          tmp_path):
    """No worker takes the points (as when the sweep holds the pool's only slot): with
    --wait-minutes the sweep cancels them, fails naming the limit, and writes sweep.json."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    env = server_env(tmp_path)
    pool = "sds-test-no-worker"
    created = _run(["-m", "prefect", "work-pool", "create", pool, "--type", "process"], env, 60)
    assert created.returncode == 0, created.stdout + created.stderr
    out = tmp_path / "out"
    swept = _run(["-m", "flows.cli", *_sweep_args(tiny_model, corpus, str(tmp_path / "store"),
                                                  out), "--pool", pool, "--wait-minutes",
                  "0.05"], env, 240)
    assert swept.returncode == 1, swept.stderr[-3000:]
    assert "4 of 4 runs failed" in swept.stderr, swept.stderr[-3000:]
    summary = json.loads((out / "sweep.json").read_text())
    assert not summary["runs"] and len(summary["failures"]) == 4
    assert all("Cancelled" in f["error"] and "wait_minutes" in f["error"]
               for f in summary["failures"]), summary["failures"]
    ids = [re.search(r"\(([0-9a-f-]{36})\) ended", f["error"]).group(1)
           for f in summary["failures"]]  # each error names its flow run
    with get_client(sync_client=True) as client:  # and nothing is left queued on the pool
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    assert len(runs) == 4 and all(r.state.is_cancelled() for r in runs)


def test_wait_minutes_needs_a_pool():
    from sds.errors import ConfigError
    from tasks.config import SweepConfig, build

    with pytest.raises(ConfigError, match="wait_minutes limits the wait for points on a work "
                                          "pool; give pool too"):
        build(SweepConfig, {"wait_minutes": 5})
    with pytest.raises(ConfigError, match="wait_minutes: Input should be greater than 0"):
        build(SweepConfig, {"pool": "p", "wait_minutes": 0})
    assert build(SweepConfig, {"pool": "p", "wait_minutes": 5}).wait_minutes == 5


def test_a_point_sent_to_a_worker_names_every_local_path_absolutely(tmp_path, monkeypatch):
    """A worker runs in its own checkout: a relative store, model folder or data file would be
    another one there (or none). What it is sent plans to the sweep's keys from anywhere."""
    import shutil

    from flows.sweep import _for_workers
    from sds.demo import demo_model_path
    from tasks.config import RunConfig, SweepConfig
    from tasks.plan import plan_pipeline

    monkeypatch.chdir(tmp_path)
    shutil.copytree(demo_model_path("opt"), tmp_path / "models" / "tiny")
    (tmp_path / "calib.txt").write_text("some calibration text. " * 50)
    (tmp_path / "heldout.txt").write_text("some held-out text. " * 50)
    (tmp_path / "wiki").write_text("a file named like a demo corpus")
    point = SweepConfig(store="./runs", methods=["wanda"], models=["models/tiny"],
                        calib="calib.txt", eval=["heldout.txt", "wiki"], seqlen=32,
                        tasks="none").points()[0]
    plan = plan_pipeline(point, check=False)
    sent = _for_workers(point, plan)
    assert sent["store"] == str(tmp_path / "runs")
    assert sent["model"] == str(tmp_path / "models" / "tiny")
    assert sent["calib"] == str(tmp_path / "calib.txt")
    assert sent["eval"] == [str(tmp_path / "heldout.txt"), "wiki"]  # a corpus name stays
    changed = {"store", "model", "calib", "eval"}
    assert {k: v for k, v in sent.items() if k not in changed} == {
        k: v for k, v in point.model_dump(mode="json").items() if k not in changed}

    monkeypatch.chdir(tmp_path / "models")  # the worker's own folder
    assert plan_pipeline(RunConfig(**sent), check=False).keys() == plan.keys()

    # the demo model is sent as it is
    demo = SweepConfig(store="./runs", methods=["wanda"]).points()[0]
    assert _for_workers(demo, plan)["model"] == demo.model


def test_the_wait_for_points_reads_any_number_of_runs_and_fails_a_deleted_one(prefect_api):
    """The server reads at most 200 flow runs per request: a sweep of 203 points reads them in
    chunks. A point whose flow run was deleted (from the UI) fails instead of being awaited
    forever."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed

    from flows.sweep import wait_for_flow_runs

    @flow(name="sds-test-point")
    def point():
        return None

    with get_client(sync_client=True) as client:
        ids = [client.create_flow_run(point, state=Completed()).id for _ in range(203)]
        client.delete_flow_run(ids[7])

    runs = flow(name="sds-test-wait")(lambda: wait_for_flow_runs(ids))()
    assert len(runs) == 203 and runs[7] is None
    assert [r.id for r in runs if r is not None] == ids[:7] + ids[8:]
    assert all(r.state.is_completed() for r in runs if r is not None)


def test_a_pipeline_run_keeps_the_name_a_sweep_gave_it(monkeypatch):
    """The engine names every pipeline flow run with `_run_name`: a sweep's point (tagged)
    keeps the sweep's name; any other run is named after its configuration, the pattern in
    its one spelling."""
    from types import SimpleNamespace

    from flows import pipeline

    def runtime(tags, name, config):
        return SimpleNamespace(get_tags=lambda: tags, get_name=lambda: name,
                               get_parameters=lambda: {"config": config})

    monkeypatch.setattr(pipeline, "flow_run", runtime(
        [pipeline.POINT_TAG], "opt-sparsegpt-50pct-sds-1a2b3c", {"pattern": "0.5"}))
    assert pipeline._run_name() == "opt-sparsegpt-50pct-sds-1a2b3c"
    monkeypatch.setattr(pipeline, "flow_run", runtime([], "brave-otter", {"pattern": "0.5"}))
    assert pipeline._run_name() == "demo-sparsegpt-50pct-sds"
    monkeypatch.setattr(pipeline, "flow_run", runtime([], "brave-otter", {"pattern": "2:4"}))
    assert pipeline._run_name() == "demo-sparsegpt-2-4-sds"


def test_a_point_sent_to_a_worker_pins_the_hub_commit_the_sweep_planned(corpus, tmp_path,
                                                                      monkeypatch):
    """A branch that moves between the sweep's planning and a worker's would give the worker
    other weights and other keys (and the sweep could not find the point's artifacts): the
    worker is sent the commit, and plans the sweep's keys."""
    import types

    import tasks.plan
    from flows.sweep import _for_workers
    from tasks.config import RunConfig
    from tasks.plan import model_identity, plan_pipeline
    from tests.test_pipeline_fixtures import tiny_options

    heads = {"main": "a" * 40}

    class Hub:
        def model_info(self, model, revision=None):
            return types.SimpleNamespace(sha=heads.get(revision, revision))

    hub_answering(monkeypatch, Hub)
    def fresh_process():  # a worker plans in a process of its own: nothing planned before
        monkeypatch.setattr(tasks.plan, "_plans", {})
        model_identity.cache_clear()

    fresh_process()
    point = RunConfig(**tiny_options("org/model", corpus, tmp_path / "store", revision="main"))
    planned = plan_pipeline(point, check=False)
    heads["main"] = "b" * 40  # the branch moves before a worker plans
    sent = _for_workers(point, planned)
    assert sent["revision"] == "a" * 40 and sent["model"] == "org/model"
    fresh_process()
    assert plan_pipeline(RunConfig(**sent), check=False).keys() == planned.keys()
    fresh_process()
    moved = plan_pipeline(point, check=False).keys()  # what the branch would have given
    assert all(moved[label] != key for label, key in planned.keys().items())
    fresh_process()
