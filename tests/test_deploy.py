"""Deployments: prefect.yaml and the served deployments are valid, and a served deployment runs
when triggered through a real Prefect server's API, with its results readable through it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.test_pipeline_fixtures import REPO, server_env, tiny_options

# fixtures: prefect_api, tiny_model, corpus
pytest_plugins = ["tests.test_pipeline_fixtures"]


def test_deployment_file_names_real_flows_and_valid_configs():
    import importlib

    document = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    entries = {e["name"]: e for e in document["deployments"]}
    assert set(entries) == {"on-demand", "nightly"}
    for entry in entries.values():
        path, _, name = entry["entrypoint"].partition(":")  # flows/pipeline.py:pipeline
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        flow.validate_parameters(entry["parameters"])  # raises on a wrong name, type or value
        assert entry["work_pool"]["name"] == "sds-gpu"
    assert entries["nightly"]["schedules"] and "schedules" not in entries["on-demand"]
    # the nightly sweep runs each point as a flow run of its own on the same pool
    assert entries["nightly"]["parameters"]["config"]["pool"] == "sds-gpu"
    assert document["pull"][1]["prefect.deployments.steps.set_working_directory"]


@pytest.mark.parametrize("repo", [None, "/nonexistent/sds", "REPO"])
def test_a_worker_without_the_checkout_path_fails_its_runs_saying_so(repo, monkeypatch):
    """The pull step before `set_working_directory` checks SDS_REPO, so a worker started
    without it fails each run with one line instead of "No such file or directory: ''"."""
    import asyncio

    from prefect.deployments.steps.utility import run_shell_script

    document = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    step = document["pull"][0]["prefect.deployments.steps.run_shell_script"]
    if repo is None:
        monkeypatch.delenv("SDS_REPO", raising=False)
    else:
        monkeypatch.setenv("SDS_REPO", str(REPO) if repo == "REPO" else repo)
    if repo == "REPO":
        asyncio.run(run_shell_script(**step))
        return
    with pytest.raises(RuntimeError, match="SDS_REPO must name the sds checkout on this "
                                           "machine"):
        asyncio.run(run_shell_script(**step))


def test_served_deployments_take_the_flows_configs():
    from flows.serve import deployments
    from tasks.config import RunConfig, SweepConfig

    served = {d.name: d for d in deployments()}
    assert set(served) == {"demo-on-demand", "demo-nightly"}
    # apart from the team's: serving the demo on their server must not take theirs over (a
    # deployment is known by flow and name) nor pause their schedules when it stops
    team = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"]
    assert not set(served) & {entry["name"] for entry in team}
    assert served["demo-nightly"].schedules and not served["demo-on-demand"].schedules
    nightly = SweepConfig.model_validate(served["demo-nightly"].parameters["config"])
    assert len(nightly.points()) == 4
    # the UI's parameter form is rendered from this schema: every RunConfig field is in it
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import pipeline

    form = parameter_schema(pipeline).model_dump()
    assert list(form["properties"]) == ["config"]
    assert set(RunConfig.model_fields) <= set(_properties(form, "RunConfig"))
    assert {"epochs", "l1", "l2"} <= set(_properties(form, "SDSConfig"))


def _properties(schema: dict, name: str) -> dict:
    definitions = schema.get("definitions") or schema.get("$defs") or {}
    return definitions[name]["properties"]


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

    params = tiny_options(tiny_model, corpus, tmp_path / "store", tmp_path / "out")
    params.pop("gpu_limit")  # served runs hold the global GPU slot
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--name",
                                  "demo-on-demand"],
                                 env=server_env(tmp_path), cwd=REPO, stdout=out,
                                 stderr=subprocess.STDOUT)
    try:
        with get_client(sync_client=True) as client:
            def deployment():
                try:
                    return client.read_deployment_by_name("pipeline/demo-on-demand")
                except ObjectNotFound:
                    return None

            found = _wait_for("the deployment", deployment, 90, serve, log)
            # the configuration of this run, given when it is triggered
            run = client.create_flow_run_from_deployment(
                found.id, parameters={"config": {**params, "pattern": "4:8"}})
            final = _wait_for("the flow run", lambda: (
                r if (r := client.read_flow_run(run.id)).state.is_final() else None),
                180, serve, log)
            assert final.state.is_completed(), log.read_text()[-3000:]
            assert final.parameters["config"]["pattern"] == "4:8"

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
            # the report's sentence agrees with the table: a share of the gap, or none where
            # one-shot pruning did not make the tiny random model worse than dense
            recovered = rows[0]["gap recovered"]
            assert ("gap to dense recovered" if recovered is not None
                    else "one-shot pruning left no gap to dense above") in reports[0].data
            limit = client.read_global_concurrency_limit_by_name("sds-gpu")
            assert limit.limit >= 1 and limit.active_slots == 0
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(timeout=20)
        except subprocess.TimeoutExpired:
            serve.kill()
    # stopped by Ctrl-C: exit 130, as every interrupted command, and say what stopping did
    assert serve.returncode == 130, log.read_text()[-3000:]
    assert "schedules are paused" in log.read_text()
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["pattern"] == "4:8"
    assert set(results["metrics"]) == {"dense", "oneshot", "sds"}


@pytest.mark.parametrize("flow_name,config", [
    ("pipeline", {"tasks": "none", "eval": "wiki,news"}),
    ("pipeline", {"tasks": ["demo"], "exclude": []}),
    ("sweep", {"patterns": [0.5, "2:4"], "methods": "sparsegpt,wanda"}),
])
def test_a_deployment_accepts_the_name_lists_the_command_line_does(flow_name, config):
    """Prefect checks a triggered run's parameters against the flow's schema before the run:
    `"tasks": "none"` and the like must pass there as they do in a grid file."""
    import importlib

    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate

    flow = getattr(importlib.import_module(f"flows.{flow_name}"), flow_name)
    schema = parameter_schema(flow).model_dump_for_openapi()
    validate({"config": config}, schema, raise_on_error=True)
    flow.validate_parameters({"config": config})  # and the configuration takes them
