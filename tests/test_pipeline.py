"""The pipeline and sweep flows against a real Prefect server, a local store and S3 (moto)."""

from __future__ import annotations

import errno
import json

import pytest

from sds.errors import (
    ConfigError,
    CorruptArtifactError,
    DataError,
    ModelError,
    StoreError,
    StoreFullError,
    UpstreamLostError,
)
from tasks.config import SweepConfig
from tasks.store import TENSORS, ArtifactStore
from tests.test_pipeline_fixtures import task_runs, tiny_options, tiny_params

# fixtures: prefect_api, tiny_model, corpus (and the S3 ones from conftest)
pytest_plugins = ["tests.test_pipeline_fixtures"]

STAGES = ["calibration", "evaluate-dense", "oneshot", "evaluate-oneshot", "redense", "second",
          "evaluate-sds"]


def states(results: dict) -> dict[str, str]:
    runs = task_runs(results["flow_run"]["id"])
    return {name: runs[name][0].state.name for name in STAGES}


def created(store: ArtifactStore) -> dict[str, str]:
    return {f"{m['stage']}/{m['key']}": m["created"] for m in store.list()}


# -- plan: keys and validation, no Prefect run ---------------------------------------------------
def test_plan_keys_follow_the_inputs_and_not_the_run(tiny_model, corpus, tmp_path):
    from tasks.plan import plan_pipeline

    def keys(store=tmp_path / "store", **kw):
        return plan_pipeline(tiny_params(tiny_model, corpus, store, **kw)).keys()

    base = keys()
    assert base == keys()  # same inputs, same keys
    assert set(base) == set(STAGES)
    wanda = keys(method="wanda")
    # calibration and the dense evaluation do not depend on the method: shared by a sweep
    for label in ("calibration", "evaluate-dense"):
        assert wanda[label] == base[label]
    for label in ("oneshot", "redense", "second", "evaluate-oneshot", "evaluate-sds"):
        assert wanda[label] != base[label]
    assert keys(pattern="50%")["oneshot"] == keys(pattern="0.5")["oneshot"]
    more = keys(sds_options={"epochs": 6, "adjust_epochs": 5})
    assert more["oneshot"] == base["oneshot"] and more["redense"] != base["redense"]
    # the store root is not part of a key: artifacts can move between stores
    assert keys(store=tmp_path / "elsewhere") == base


def test_each_pruning_step_keys_on_the_options_its_result_depends_on(tiny_model, corpus,
                                                                      tmp_path):
    """admm dampens H with percdamp, wanda reads neither percdamp nor blocksize; the second
    pruning's solver dampens H whatever the method, so its key always holds percdamp."""
    from sds.options import METHOD_OPTIONS
    from sds.pruners import METHODS
    from tasks.plan import plan_pipeline

    assert set(METHODS) == set(METHOD_OPTIONS)  # the planner knows every method's options

    def keys(method, **kw):
        return plan_pipeline(tiny_params(tiny_model, corpus, tmp_path / "store", method=method,
                                         **kw)).keys()

    for method in METHODS:
        base, damped = keys(method), keys(method, percdamp=0.05)
        bigger = keys(method, blocksize=64)
        sequential = keys(method, oneshot_sequential=True)
        mixed = keys(method, oneshot_target_mix=0.5)
        options = METHODS[method].options
        assert (damped["oneshot"] != base["oneshot"]) is ("percdamp" in options)
        assert (bigger["oneshot"] != base["oneshot"]) is ("blocksize" in options)
        assert (sequential["oneshot"] != base["oneshot"]) is ("sequential" in options)
        assert (mixed["oneshot"] != base["oneshot"]) is ("target_mix" in options)
        assert damped["second"] != base["second"], method
    assert keys("admm", percdamp=0.05)["oneshot"] != keys("admm")["oneshot"]
    assert keys("wanda", percdamp=0.05)["oneshot"] == keys("wanda")["oneshot"]
    assert keys("admm", oneshot_target_mix=0.5)["oneshot"] != keys("admm")["oneshot"]
    assert keys("sparsegpt", oneshot_target_mix=0.5) == keys("sparsegpt")
    for method in ("wanda", "sparsegpt", "admm"):
        assert keys(method, oneshot_sequential=True)["oneshot"] != keys(method)["oneshot"]
    assert keys("magnitude", oneshot_sequential=True) == keys("magnitude")


def test_re_dense_keys_on_its_own_options_and_second_pruning_on_all(tiny_model, corpus,
                                                                     tmp_path):
    """A step-3 option (the solver's tolerance) leaves step 2's key alone, so a sweep over it
    reuses the finished re-dense artifact; a step-2 option (λ1) changes both."""
    from sds.options import REDENSE_OPTIONS, SDSConfig
    from tasks.plan import plan_pipeline

    def keys(**sds_options):
        return plan_pipeline(tiny_params(tiny_model, corpus, tmp_path / "store",
                                         sds_options=sds_options)).keys()

    base, step3, step2 = keys(), keys(adjust_tol=0.01), keys(l1=0.2)
    assert step3["redense"] == base["redense"] and step3["second"] != base["second"]
    assert step2["redense"] != base["redense"] and step2["second"] != base["second"]
    assert all(set(names) < set(SDSConfig().to_dict()) for names in REDENSE_OPTIONS.values())
    assert keys(lr=0.5)["redense"] == base["redense"]  # the default solver is "admm"
    assert keys(solver="pgd", lr=0.5)["redense"] != keys(solver="pgd")["redense"]


def test_planning_a_fully_cached_run_imports_neither_torch_nor_transformers(tiny_model, corpus,
                                                                            tmp_path):
    """A committed artifact proves the model checks passed for its key: once every stage of a
    plan is in the store, planning it again (a fresh process, as `sds run`) reads the
    configuration, hashes the inputs and reads commit records, nothing more."""
    import subprocess
    import sys
    from pathlib import Path

    from tasks.plan import plan_pipeline

    config = tiny_params(tiny_model, corpus, tmp_path / "store")
    plan = plan_pipeline(config)
    store = ArtifactStore(plan.store)
    code = ("import sys; from tasks.config import RunConfig; from tasks.plan import plan_pipeline;"
            f"plan = plan_pipeline(RunConfig.model_validate_json({config.model_dump_json()!r}));"
            "print(sorted(plan.keys().values()));"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'}))")

    def plan_in_a_new_process() -> list[str]:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).parents[1])
        return out.stdout.splitlines()

    keys = str(sorted(plan.keys().values()))
    assert plan_in_a_new_process() == [keys, "['torch', 'transformers']"]  # nothing committed
    for spec in plan.specs.values():
        store.save(spec.stage, spec.key, {})
    assert plan_in_a_new_process() == [keys, "[]"]


@pytest.mark.parametrize("change, error", [
    ({"pattern": "3:2"}, ConfigError),
    ({"method": "obs"}, ConfigError),
    ({"sds_options": {"epochs": 5, "lambda": 1}}, ConfigError),
    ({"nsamples": 0}, ConfigError),
    ({"seqlen": 4096}, ConfigError),  # the tiny model has 128 positions
    ({"model": "/no/such/model"}, ModelError),
    ({"store": "nosuch://host/x"}, ConfigError),
])
def test_plan_rejects_bad_input_before_running(tiny_model, corpus, tmp_path, change, error):
    from tasks.plan import plan_pipeline

    with pytest.raises(error):
        plan_pipeline(tiny_params(tiny_model, corpus, tmp_path / "store", **change))


def test_only_transient_errors_are_retried():
    from tasks.common import is_transient

    assert is_transient(StoreError("s3 unreachable"))
    assert is_transient(ConnectionResetError())
    assert is_transient(CorruptArtifactError("bad hash"))
    full = OSError(errno.ENOSPC, "No space left on device")
    for exc in (ConfigError("bad"), DataError("bad"), ModelError("bad"), ValueError("bad"),
                UpstreamLostError("gone"), StoreFullError("no space left"), full):
        assert not is_transient(exc)

    # a store fault with a permanent cause (permissions, a file where a folder should be)
    # meets the same fault seconds later: not retried; a dropped connection is
    def store_error(cause):
        try:
            try:
                raise cause
            except OSError as e:
                raise StoreError("storage operation failed") from e
        except StoreError as e:
            return e

    for cause in (PermissionError(errno.EACCES, "Permission denied"),
                  OSError(errno.EROFS, "Read-only file system"),
                  NotADirectoryError(errno.ENOTDIR, "Not a directory"),
                  IsADirectoryError(errno.EISDIR, "Is a directory")):
        assert not is_transient(store_error(cause)) and not is_transient(cause)
    assert is_transient(store_error(ConnectionResetError(errno.ECONNRESET, "reset")))


# -- runs ---------------------------------------------------------------------------------------
def test_pipeline_on_s3_then_a_second_run_skips_every_stage(prefect_api, tiny_model, corpus,
                                                            s3_bucket, s3_requests, tmp_path):
    from flows.pipeline import pipeline

    root = f"s3://{s3_bucket}/runs"
    params = tiny_params(tiny_model, corpus, root, tmp_path / "out")
    first = pipeline(params)
    store = ArtifactStore(root)
    stored = created(store)
    assert sorted(k.split("/")[0] for k in stored) == sorted(
        ["calibration", "oneshot", "redense", "second"] + ["evaluate"] * 3)
    assert set(first["timings"]["computed"]) == set(STAGES)
    assert all(uri.startswith(root) for uri in first["artifacts"].values())
    assert set(first["metrics"]) == {"dense", "oneshot", "sds"}

    tensor_gets = [r for r in s3_requests if '"GET ' in r and TENSORS in r]
    assert tensor_gets  # the first run's stages read their inputs from S3
    s3_requests.clear()
    second = pipeline(params)
    assert states(second) == {name: "Cached" for name in STAGES}
    # deciding that every stage is done reads commit records only: no tensor is downloaded
    assert [r for r in s3_requests if '"GET ' in r and TENSORS in r] == []
    assert [r for r in s3_requests if '"GET ' in r and "meta.json" in r]
    assert second["timings"]["computed"] == []
    assert created(store) == stored  # nothing was written again
    assert second["metrics"] == first["metrics"]
    assert second["final"]["sha256"] == first["final"]["sha256"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["keys"] == first["keys"]


def test_a_transient_store_error_is_retried_and_the_run_completes(prefect_api, tiny_model,
                                                                  corpus, tmp_path,
                                                                  monkeypatch):
    from flows.pipeline import pipeline
    from tasks import stages

    real_save = ArtifactStore.save
    failures = []

    def flaky_save(self, stage, key, tensors, meta=None):
        if stage == "oneshot" and not failures:
            failures.append(key)
            raise StoreError("writing oneshot: cannot reach the store (injected); retry")
        return real_save(self, stage, key, tensors, meta)

    monkeypatch.setattr(ArtifactStore, "save", flaky_save)
    monkeypatch.setattr(stages.oneshot, "retry_delay_seconds", [0.1])
    results = pipeline(tiny_params(tiny_model, corpus, tmp_path / "store"))
    assert failures
    runs = task_runs(results["flow_run"]["id"])
    assert runs["oneshot"][0].run_count == 2
    assert runs["oneshot"][0].state.name == "Completed"
    assert ArtifactStore(tmp_path / "store").exists("oneshot", results["keys"]["oneshot"])


def test_calibration_data_too_short_stops_the_run_before_the_dense_evaluation(
        prefect_api, tiny_model, corpus, tmp_path):
    """The dense evaluation waits for the calibration: on a real model it takes as long as
    the pruning, and a corpus too short for the windows asked is found in a second."""
    import logging

    from flows.pipeline import pipeline

    failed = []

    class Events(logging.Handler):  # what the terminal's progress display reads
        def emit(self, record):
            event = getattr(record, "sds", None)
            if isinstance(event, dict) and event.get("event") == "failed":
                failed.append((event["title"], record.getMessage()))

    handler, logger = Events(), logging.getLogger("prefect.task_runs")
    logger.addHandler(handler)
    try:
        params = tiny_params(tiny_model, corpus, tmp_path / "store", nsamples=4000)
        state = pipeline(params, return_state=True)
    finally:
        logger.removeHandler(handler)
    assert state.is_failed()
    with pytest.raises(DataError, match="too few for nsamples=4000"):
        state.result()
    assert [title for title, _ in failed] == ["calibration"]  # said as it happens
    assert "too few for nsamples=4000" in failed[0][1]
    assert ArtifactStore(tmp_path / "store").list() == []  # the evaluation never ran


def test_evaluations_report_their_progress_by_part(prefect_api, tiny_model, corpus, tmp_path):
    """An evaluation's bar moves per corpus (and per zero-shot run), not "0/?" until done, and
    inside a corpus by its windows, a line per tenth of them at most."""
    import logging

    from flows.pipeline import pipeline

    events = []

    class Events(logging.Handler):
        def emit(self, record):
            event = getattr(record, "sds", None)
            if isinstance(event, dict) and event.get("event") == "block":
                events.append((event["title"], event["block"], event["blocks"]))

    handler = Events()
    logger = logging.getLogger("prefect.task_runs")
    logger.addHandler(handler)
    try:
        pipeline(tiny_params(tiny_model, corpus, tmp_path / "store", sds=False,
                             eval=[str(corpus["heldout"]), str(corpus["calib"])]))
    finally:
        logger.removeHandler(handler)
    evaluations = [e for e in events if e[0].startswith("evaluate")]
    titles = {title for title, _, _ in evaluations}
    assert len(titles) == 2  # dense and one-shot
    for title in titles:
        blocks = [block for t, block, _ in evaluations if t == title]
        assert {n for t, _, n in evaluations if t == title} == {2}  # two corpora
        assert blocks == sorted(set(blocks)) and blocks[-1] == 2  # forward only, to the end
        parts = [b for b in blocks if b == int(b)]
        assert parts == [1, 2]
        within = [[b for b in blocks if k < b < k + 1] for k in (0, 1)]
        assert all(1 <= len(w) <= 9 for w in within), within  # windows, a tenth at most


def test_a_deterministic_error_fails_at_once_and_commits_nothing(prefect_api, tiny_model,
                                                                  corpus, tmp_path):
    from flows.pipeline import pipeline

    # 2:4 needs input dims that are multiples of 4; this blocksize is not a multiple of M=4
    params = tiny_params(tiny_model, corpus, tmp_path / "store", blocksize=6)
    state = pipeline(params, return_state=True)
    assert state.is_failed()
    with pytest.raises(ConfigError, match="blocksize"):
        state.result()
    runs = task_runs(str(state.state_details.flow_run_id))
    assert runs["oneshot"][0].run_count == 1  # not retried
    assert runs["calibration"][0].state.name in ("Completed", "Cached")
    store = ArtifactStore(tmp_path / "store")
    assert not [m for m in store.list() if m["stage"] == "oneshot"]
    assert not store.incomplete()


def test_corrupt_or_half_written_artifacts_are_recomputed(prefect_api, tiny_model, corpus,
                                                          tmp_path):
    from flows.pipeline import pipeline

    params = tiny_params(tiny_model, corpus, tmp_path / "store")
    first = pipeline(params)
    root = tmp_path / "store"
    keys = first["keys"]
    # flip one byte of the one-shot weights (same size: only the hash can tell)
    tensors = root / "oneshot" / keys["oneshot"] / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0xFF
    tensors.write_bytes(bytes(data))
    # a save interrupted before its commit: tensors without meta.json
    (root / "redense" / keys["redense"] / "meta.json").unlink()

    second = pipeline(params)
    # re-dense computes, finds its one-shot input damaged while reading it and discards it;
    # the run then recomputes the one-shot weights and re-dense, and reuses everything else
    runs = task_runs(second["flow_run"]["id"])
    assert {r.state.name for r in runs["oneshot"]} == {"Cached", "Completed"}
    assert "Completed" in {r.state.name for r in runs["redense"]}
    assert {r.state.name for s in ("calibration", "evaluate-dense", "second")
            for r in runs[s]} == {"Cached"}
    assert set(second["timings"]["computed"]) == {"oneshot", "redense"}
    # recomputed bit for bit: the math is deterministic on the CPU
    assert second["stages"]["oneshot"]["sha256"] == first["stages"]["oneshot"]["sha256"]
    assert second["stages"]["redense"]["sha256"] == first["stages"]["redense"]["sha256"]
    ArtifactStore(root).load("oneshot", keys["oneshot"])  # verifies the hash


def test_sweep_computes_calibration_and_dense_evaluation_once(prefect_api, tiny_model, corpus,
                                                              tmp_path):
    from flows.sweep import sweep

    options = tiny_options(tiny_model, corpus, tmp_path / "store", tmp_path / "sweep")
    for name in ("model", "method", "pattern"):
        options.pop(name)
    summary = sweep(SweepConfig(models=[str(tiny_model)], methods=["sparsegpt", "magnitude"],
                                patterns=["2:4", "50%"], **options))
    assert len(summary["runs"]) == 4 and not summary["failures"]
    runs = task_runs(summary["flow_run"]["id"])
    assert len(runs["calibration"]) == 1
    assert len(runs["evaluate-dense"]) == 1
    assert len(runs["oneshot"]) == 4 and len(runs["evaluate-sds"]) == 4
    assert summary["stage_submissions"]["calibration"] == 1
    dense = {json.dumps(r["metrics"]["dense"], sort_keys=True) for r in summary["runs"]}
    assert len(dense) == 1  # every point reads the one dense evaluation
    store = ArtifactStore(tmp_path / "store")
    assert len([m for m in store.list() if m["stage"] == "calibration"]) == 1
    for run in summary["runs"]:
        assert (tmp_path / "sweep" / run["name"] / "results.json").is_file()
    assert (tmp_path / "sweep" / "sweep.json").is_file()


def _artifacts_by_key(flow_run_id: str) -> dict:
    """The keyed artifacts of a flow run, read through the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {a.key: a for a in found if a.key}


def _table(artifact) -> list[dict]:
    return artifact.data if isinstance(artifact.data, list) else json.loads(artifact.data)


def test_a_sweep_shows_each_points_results_table_and_report(prefect_api, tiny_model, corpus,
                                                            tmp_path):
    """A sweep in one flow run publishes, per point, the results table and the markdown report
    a pipeline run publishes, under the point's unique name (two models both named `opt`
    get their hashes), with the numbers of the point's results.json."""
    import shutil

    from flows.sweep import sweep

    models = []
    for parent in ("a", "b"):
        shutil.copytree(tiny_model, tmp_path / parent / "opt")
        models.append(str(tmp_path / parent / "opt"))
    options = tiny_options(tiny_model, corpus, tmp_path / "store", tmp_path / "sweep")
    for name in ("model", "method", "pattern"):
        options.pop(name)
    summary = sweep(SweepConfig(models=models, **options))
    names = [run["name"] for run in summary["runs"]]
    assert len(set(names)) == 2 and all(n.startswith("opt-sparsegpt-2-4-sds-") for n in names)
    artifacts = _artifacts_by_key(summary["flow_run"]["id"])
    for name in names:
        results = json.loads((tmp_path / "sweep" / name / "results.json").read_text())
        rows = _table(artifacts[f"sds-results-{name}"])
        assert {row["metric"]: [row[s] for s in ("dense", "oneshot", "sds")] for row in rows} \
            == {m: [round(results["metrics"][s][m], 6) for s in ("dense", "oneshot", "sds")]
                for m in results["metrics"]["sds"]}
        report = artifacts[f"sds-report-{name}"].data
        assert f"{results['metrics']['sds']['ppl/heldout']:.1f}" in report \
            or f"{results['metrics']['sds']['ppl/heldout']:.2f}" in report


def test_a_sweep_point_publishes_under_the_name_the_sweep_gave_it(prefect_api, tiny_model,
                                                                 corpus, tmp_path):
    """A point on a pool is a pipeline flow run tagged as a point: its artifacts take the
    name the sweep gave it (unique per model), not its configuration's, which points of two
    models named alike share."""
    from prefect import tags

    from flows.pipeline import POINT_TAG, pipeline

    name = "opt-sparsegpt-2-4-sds-1a2b3c"
    with tags(POINT_TAG):
        results = pipeline.with_options(flow_run_name=name)(
            tiny_params(tiny_model, corpus, tmp_path / "store", tmp_path / "out"))
    assert results["flow_run"]["name"] == name
    keys = set(_artifacts_by_key(results["flow_run"]["id"]))
    assert {f"sds-results-{name}", f"sds-report-{name}"} <= keys


def test_every_task_run_of_a_pipeline_run_is_named_for_people(prefect_api, tiny_model, corpus,
                                                               tmp_path):
    """The UI lists a run's task runs by name: the stages by their titles and the export as
    `export`, not Prefect's generated `export-1a2`."""
    from flows.pipeline import pipeline

    results = pipeline(tiny_params(tiny_model, corpus, tmp_path / "store", tmp_path / "out"))
    names = sorted(name for name, runs in task_runs(results["flow_run"]["id"]).items()
                   for _ in runs)
    assert names == sorted([*STAGES, "export"])


def test_the_one_shot_stage_runs_with_the_one_shot_options(prefect_api, tiny_model, corpus,
                                                           tmp_path, monkeypatch):
    """`oneshot_sequential` and `oneshot_target_mix` reach `sds.api.oneshot` in the stage (the
    keys hash them; here the computation is checked to use them) and the results record."""
    from flows.pipeline import pipeline
    from sds import api

    calls = []
    original = api.oneshot

    def spy(*args, **kwargs):
        calls.append({k: kwargs.get(k) for k in ("sequential", "target_mix")})
        return original(*args, **kwargs)

    monkeypatch.setattr(api, "oneshot", spy)
    params = tiny_params(tiny_model, corpus, tmp_path / "store", tmp_path / "out", method="admm",
                         sds=False, oneshot_sequential=True, oneshot_target_mix=0.5)
    result = pipeline(params)
    assert calls == [{"sequential": True, "target_mix": 0.5}]
    assert result["config"]["oneshot_sequential"] is True
    assert result["config"]["oneshot_target_mix"] == 0.5


# -- what the processes of one machine share ----------------------------------------------------
def _locked_elsewhere(path) -> bool:
    """Whether another holder has the `host_lock` of `path` (a non-blocking try from a new file
    description, as another process would make)."""
    import fcntl
    import os

    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_the_machine_lock_makes_holders_take_turns(tmp_path):
    import threading

    from tasks.common import host_lock

    path, order = tmp_path / "gpu.lock", []
    with host_lock(path):
        assert _locked_elsewhere(path)
        other = threading.Thread(target=lambda: host_lock_once(path, order))
        other.start()
        other.join(0.3)
        assert other.is_alive() and order == []  # waits for this holder
        order.append("first")
    other.join(10)
    assert order == ["first", "second"] and not _locked_elsewhere(path)


def host_lock_once(path, order: list) -> None:
    from tasks.common import host_lock

    with host_lock(path):
        order.append("second")


@pytest.mark.parametrize("device, lock", [("cuda:1", "sds-gpu1.lock"), ("cpu", None)])
def test_a_compute_stage_holds_the_lock_of_its_gpu(device, lock, tiny_model, corpus, tmp_path,
                                                  monkeypatch):
    """Two flow runs that one worker started at once on a one-GPU machine take turns on it,
    whatever the global limit lets in: the stage holds a lock file of that GPU. (No GPU is
    needed: only the lock is taken.)"""
    from tasks import common
    from tasks.plan import plan_pipeline

    monkeypatch.setattr(common, "GPU_LOCK_DIR", str(tmp_path))
    config = tiny_params(tiny_model, corpus, tmp_path / "store", None)
    spec = plan_pipeline(config.model_copy(update={"device": device, "gpu_limit": None}),
                         check=False).specs["oneshot"]
    with common.gpu_slot(spec):
        held = [p.name for p in tmp_path.glob("*.lock") if _locked_elsewhere(p)]
    assert held == ([lock] if lock else [])
    assert not any(_locked_elsewhere(p) for p in tmp_path.glob("*.lock"))


def test_the_gpu_lock_is_named_after_the_physical_gpu(monkeypatch, tmp_path):
    """Workers with other CUDA_VISIBLE_DEVICES number one GPU differently: the lock file is
    named after the GPU's uuid where CUDA gives one."""
    from types import SimpleNamespace

    import torch

    from tasks import common

    monkeypatch.setattr(common, "GPU_LOCK_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(uuid=f"GPU-uuid-of-{i}"))
    assert common._gpu_lock_path("cuda:1") == str(tmp_path / "sds-gpu-GPU-uuid-of-1.lock")
    assert common._gpu_lock_path("cpu") is None


def test_a_lock_the_file_system_refuses_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    import fcntl

    from tasks.common import host_lock

    def refuse(fd, op):
        raise OSError(9, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", refuse)
    ran = []
    with caplog.at_level("WARNING"), host_lock(tmp_path):
        ran.append(True)
    assert ran and "going on without the lock" in caplog.text


def test_a_pool_sweep_does_not_recompute_on_its_own_machine(monkeypatch):
    """The export found the final weights damaged: a run (or a sweep in one process) computes
    them again; a sweep whose points run on a pool fails that point instead of computing on
    the machine that only coordinates."""
    from flows import pipeline

    def damaged(*_args):
        raise UpstreamLostError("artifact second/... is corrupt; it was discarded")

    from types import SimpleNamespace

    from flows import sweep
    from tasks.config import SweepConfig

    monkeypatch.setattr(pipeline.report, "finish", damaged)
    monkeypatch.setattr(pipeline, "run_plans", lambda plans: pytest.fail("computed locally"))
    monkeypatch.setattr(sweep, "create_table_artifact", lambda **_kw: None)
    with pytest.raises(UpstreamLostError):
        pipeline.finish(None, {}, None, None, None, 0.0, {}, repair=False)
    # through the sweep: its points on a pool fail by name, nothing is computed here
    plan = SimpleNamespace(specs={}, settings={"model": "demo", "demo": True,
                                               "method": "sparsegpt", "pattern": "2:4",
                                               "sds": True})
    with pytest.raises(sweep.SweepError, match="demo-sparsegpt-2-4-sds: artifact second"):
        sweep.write_results(SweepConfig(pool="sds-gpu", out="none"), [plan], [{}], [{}],
                            None, 0.0)


def test_runs_finishing_into_one_folder_take_turns(tmp_path, monkeypatch):
    """`report.finish` writes the model and results.json holding the folder's lock, so two
    runs finishing into one `out` at once leave one run's model beside that run's results."""
    from types import SimpleNamespace

    from flows import report

    monkeypatch.setattr(report, "build_results", lambda *a: {"model_dir": a[4]})
    out, seen = tmp_path / "out", []

    def export(spec, ref, folder):
        seen.append(_locked_elsewhere(out))
        return folder

    plan = SimpleNamespace(specs={"second": None}, final="second")
    results = report.finish(plan, {"second": None}, str(out), export, None, 0.0, None)
    assert seen == [True] and not _locked_elsewhere(out)
    assert json.loads((out / "results.json").read_text()) == results == {
        "model_dir": str(out / "model")}


def test_the_default_store_is_the_machines_sds_store(monkeypatch):
    from tasks.config import RunConfig, SweepConfig

    monkeypatch.delenv("SDS_STORE", raising=False)
    made_here = RunConfig.model_validate({"pattern": "4:8"})  # e.g. a deployment's form
    assert made_here.store_root() == "./sds-store"
    monkeypatch.setenv("SDS_STORE", "s3://shared/store")  # the machine that runs it
    assert made_here.store_root() == SweepConfig().store_root() == "s3://shared/store"
    assert RunConfig(store="elsewhere").store_root() == "elsewhere"
    # nothing of the deploying machine's store is in the flows' parameter schema
    assert RunConfig().model_dump()["store"] is None


@pytest.mark.parametrize("name", ["pipeline", "sweep"])
def test_an_interrupted_flow_is_recorded_crashed_without_waiting_for_its_stage(name,
                                                                              prefect_api):
    """Ctrl-C while a stage computes: Prefect records the crash only once the flow's task
    runner has closed, and the command line exits GRACE_SECONDS after the signal. A runner that
    waited for the stage's thread left the flow run `Running` for good (and not retryable)."""
    import threading
    import time

    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.context import get_run_context

    from flows.cli import GRACE_SECONDS
    from flows.pipeline import pipeline
    from flows.sweep import sweep

    parent = {"pipeline": pipeline, "sweep": sweep}[name]
    started, release, ids = threading.Event(), threading.Event(), []

    @task
    def stage():
        started.set()
        release.wait(3 * GRACE_SECONDS)  # a stage that computes past the grace

    @flow(task_runner=parent.task_runner)
    def interrupted():
        ids.append(get_run_context().flow_run.id)
        stage.submit()
        assert started.wait(30)
        raise KeyboardInterrupt  # as the signal handler raises it in the main thread

    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            interrupted()
        elapsed = time.monotonic() - t0
    finally:
        release.set()
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(ids[0]).state
    assert elapsed < GRACE_SECONDS
    assert state.is_crashed(), state
