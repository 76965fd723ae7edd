"""Deployments: the YAML files are valid, and a served deployment runs when triggered through a
real Prefect server's API, with its results readable through the same API."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.test_pipeline_fixtures import REPO, server_env, tiny_params

# fixtures: prefect_api, tiny_model, corpus
pytest_plugins = ["tests.test_pipeline_fixtures"]


@pytest.mark.parametrize("name", ["prefect.yaml", "local.yaml"])
def test_deployment_files_name_real_flows_and_valid_parameters(name):
    from flows.serve import load_flow, read_deployments, to_deployments

    path = REPO / "deployments" / name
    entries = read_deployments(path)
    assert {e["name"] for e in entries} == {"on-demand", "nightly"}
    for entry in entries:
        flow = load_flow(entry["entrypoint"])
        flow.validate_parameters(entry.get("parameters") or {})  # raises on a wrong name/type
    deployments = {d.name: d for d in to_deployments(entries)}
    assert deployments["nightly"].schedules and not deployments["on-demand"].schedules
    if name == "prefect.yaml":
        document = yaml.safe_load(path.read_text())
        assert all(e["work_pool"]["name"] == "sds-gpu" for e in document["deployments"])
        assert document["pull"][0]["prefect.deployments.steps.set_working_directory"]


def _wait_for(what, probe, timeout: float, process=None, log=None):
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"`sds serve` exited: {log.read_text() if log else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: "
                                 f"{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.5)


@pytest.mark.slow
def test_served_deployment_runs_when_triggered_through_the_api(prefect_api, tiny_model, corpus,
                                                               tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.exceptions import ObjectNotFound

    params = tiny_params(tiny_model, corpus, tmp_path / "store", tmp_path / "out")
    params.pop("gpu_limit")  # served runs hold the global GPU slot
    spec = {"deployments": [{"name": "on-demand", "entrypoint": "flows/pipeline.py:pipeline",
                             "parameters": params}]}
    file = tmp_path / "deployments.yaml"
    file.write_text(yaml.safe_dump(spec))
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--file", str(file)],
                                 env=server_env(tmp_path), cwd=REPO, stdout=out,
                                 stderr=subprocess.STDOUT)
    try:
        with get_client(sync_client=True) as client:
            def deployment():
                try:
                    return client.read_deployment_by_name("pipeline/on-demand")
                except ObjectNotFound:
                    return None

            found = _wait_for("the deployment", deployment, 90, serve, log)
            # the parameters of this run: the file's, with one changed at trigger time
            run = client.create_flow_run_from_deployment(found.id, parameters={"pattern": "4:8"})
            final = _wait_for("the flow run", lambda: (
                r if (r := client.read_flow_run(run.id)).state.is_final() else None),
                180, serve, log)
            assert final.state.is_completed(), log.read_text()[-3000:]
            assert final.parameters["pattern"] == "4:8"

            flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
            tasks = {t.name.split()[0]: t.state.name for t in client.read_task_runs(
                flow_run_filter=flow_runs)}
            assert {"calibration", "oneshot", "redense", "second", "evaluate-sds"} <= set(tasks)
            assert set(tasks.values()) <= {"Completed", "Cached"}
            artifacts = client.read_artifacts(flow_run_filter=flow_runs)
            tables = [a for a in artifacts if a.type == "table"]
            reports = [a for a in artifacts if a.type == "markdown"]
            assert tables and reports and any(a.type == "progress" for a in artifacts)
            rows = tables[0].data if isinstance(tables[0].data, list) else json.loads(
                tables[0].data)
            assert {row["metric"] for row in rows} == {"ppl/heldout"}
            assert {"dense", "oneshot", "sds", "gap recovered"} <= set(rows[0])
            assert "gap to dense recovered" in reports[0].data
            limit = client.read_global_concurrency_limit_by_name("sds-gpu")
            assert limit.limit >= 1 and limit.active_slots == 0
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(timeout=20)
        except subprocess.TimeoutExpired:
            serve.kill()
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["pattern"] == "4:8"
    assert set(results["metrics"]) == {"dense", "oneshot", "sds"}
