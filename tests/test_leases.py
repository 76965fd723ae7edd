"""Leases: an artifact is computed by one run at a time; the others wait and reuse it, and a
dead holder's lease is taken over (by one taker only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tasks.store import ArtifactStore, artifact_key, expired, pid_namespace
from tests.test_pipeline_fixtures import REPO, cli_args, server_env, tiny_params

pytest_plugins = ["tests.test_pipeline_fixtures"]

KEY = artifact_key("oneshot", 1, {"id": "m"}, {}, [])


def _owner(name: str) -> dict:
    return {"owner": name, "host": "elsewhere", "pid": 1}


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return f"s3://{request.getfixturevalue('s3_bucket')}/runs"


def test_a_live_lease_is_held_and_renewed_a_released_one_is_free(root):
    store = ArtifactStore(root)
    generation, holder = store.take_lease("oneshot", KEY, _owner("a"), 60)
    assert (generation, holder) == (0, None)
    taken, holder = store.take_lease("oneshot", KEY, _owner("b"), 60)
    assert taken is None and holder["owner"] == "a" and not expired(holder)

    before = store.lease("oneshot", KEY)["expires"]
    assert store.renew_lease("oneshot", KEY, 0, _owner("a"), 120)
    assert store.lease("oneshot", KEY)["expires"] > before + 30
    assert not store.renew_lease("oneshot", KEY, 0, _owner("b"), 120)  # not b's

    store.release_lease("oneshot", KEY, 0)  # given up without a commit: the holder failed
    released = store.lease("oneshot", KEY)
    assert released["owner"] == "a" and released["released"] and expired(released)
    # generation numbers only grow: a taker that read generation 0 before the release can
    # only make generation 1, as the next taker does, so two takers never both win
    assert store.take_lease("oneshot", KEY, _owner("b"), 60) == (1, None)
    store.release_lease("oneshot", KEY, 1)
    assert store.take_lease("oneshot", KEY, _owner("c"), 60) == (2, None)
    store.save("oneshot", KEY, {}, {})  # committed: its leases go
    store.release_lease("oneshot", KEY, 2)
    assert store.lease("oneshot", KEY) is None


def test_an_expired_lease_is_taken_over_by_exactly_one_of_several_takers(root):
    store = ArtifactStore(root)
    assert store.take_lease("oneshot", KEY, _owner("dead"), -1)[0] == 0  # expired at once
    assert expired(store.lease("oneshot", KEY))

    start, results = threading.Barrier(6), {}

    def take(name):
        mine = ArtifactStore(root)
        start.wait()
        results[name] = mine.take_lease("oneshot", KEY, _owner(name), 60)

    threads = [threading.Thread(target=take, args=(f"t{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [name for name, (generation, _) in results.items() if generation is not None]
    assert len(winners) == 1 and results[winners[0]][0] == 1
    assert store.lease("oneshot", KEY)["owner"] == winners[0]
    for name, (generation, holder) in results.items():
        if name != winners[0]:
            assert generation is None and holder["owner"] == winners[0]
    # the one that lost its lease can no longer renew it
    assert not store.renew_lease("oneshot", KEY, 0, _owner("dead"), 60)


def test_what_runs_in_progress_pinned_or_lease_is_never_removed(root):
    """A run pins its plan's keys; a stage computing holds a lease that names its upstream.
    Neither those artifacts nor their upstream go in a collection (nor the finished blocks of
    the stage under the lease), until the pin is gone or the lease expired."""
    import uuid

    import torch

    store = ArtifactStore(root)
    calib, shot, redense, old = (artifact_key(s, 1, {"id": "m"}, {}, [])
                                 for s in ("calibration", "oneshot", "redense", "second"))
    store.save("calibration", calib, {"ids": torch.arange(4)}, {})
    store.save("oneshot", shot, {"w": torch.ones(2)}, {"upstream": [calib]})
    store.save("second", old, {"w": torch.ones(2)}, {})  # nobody's: collected
    pin = store.pin([shot], {"owner": uuid.uuid4().hex, "host": "elsewhere", "pid": 1}, 60)

    busy = []
    assert store.remove(keep=[], dry_run=True, busy=busy) == [store.ref("second", old)]
    assert set(busy) == {store.ref("calibration", calib), store.ref("oneshot", shot)}
    assert store.needed() == {calib, shot}  # the pinned key and its upstream
    store.unpin(pin)
    assert store.needed() == set()

    # a stage computing: its lease names its upstream; its finished blocks look incomplete
    generation, _ = store.take_lease("redense", redense, {**_owner("a"), "upstream": [shot]},
                                     60)
    store.save_part("redense", redense, 0, {"w": torch.ones(2)}, {"blocks": 2})
    assert store.incomplete() == [store.ref("redense", redense)]
    busy = []
    assert store.remove(committed=False, incomplete=True, busy=busy) == []
    assert store.remove(stage="calibration", busy=busy) == []
    assert set(busy) == {store.ref("redense", redense), store.ref("calibration", calib)}
    assert list(store.parts("redense", redense))  # the finished block is still there

    # an expired pin or lease protects nothing
    store.pin([shot], {"owner": uuid.uuid4().hex, "host": "elsewhere", "pid": 1}, -1)
    store.release_lease("redense", redense, generation)
    assert store.needed() == set()
    assert set(store.remove(incomplete=True)) == {
        store.ref(s, k) for s, k in (("calibration", calib), ("oneshot", shot),
                                     ("redense", redense), ("second", old))}


def test_pins_and_leases_of_ended_runs_are_collected_and_live_ones_stay(root):
    import uuid
    from datetime import timedelta

    store = ArtifactStore(root)
    other = artifact_key("redense", 1, {"id": "m"}, {}, [])
    live_pin = {"owner": uuid.uuid4().hex, "host": "elsewhere", "pid": 1}
    store.pin([KEY], live_pin, 60)
    store.pin([KEY], {"owner": uuid.uuid4().hex, "host": "elsewhere", "pid": 1}, -1)  # ended
    assert store.take_lease("oneshot", KEY, _owner("a"), 60)[0] == 0  # a stage computing
    generation, _ = store.take_lease("redense", other, _owner("b"), 60)
    store.release_lease("redense", other, generation)  # failed: an expired marker stays

    # the released lease ended long ago; the pin a second ago, so an hour's margin keeps it
    assert store.remove_stale(older_than=timedelta(hours=1), dry_run=True) == [
        f"{store.root}/.leases/redense/{other}/0.json"]
    assert len(store.remove_stale()) == 2
    assert store.remove_stale() == []
    assert [p["owner"] for p in store.pins()] == [live_pin["owner"]]
    assert not expired(store.lease("oneshot", KEY)) and store.lease("redense", other) is None
    assert store.take_lease("redense", other, _owner("c"), 60)[0] == 0


def test_temporary_files_of_killed_writes_are_collected_once_old(tmp_path):
    import os
    import uuid
    from datetime import timedelta

    from tasks.store import LEFTOVER_MIN_AGE

    store = ArtifactStore(str(tmp_path / "store"))
    store.pin([KEY], {"owner": uuid.uuid4().hex, "host": "elsewhere", "pid": 1}, 60)  # live
    store.take_lease("oneshot", KEY, _owner("a"), 60)
    root = tmp_path / "store"
    lease_folder = root / ".leases" / "oneshot" / KEY
    old = [root / ".pins" / ".sds-abc123.tmp", lease_folder / ".sds-def456.tmp",
           root / f".sds-check-{uuid.uuid4().hex}"]
    young = root / ".pins" / ".sds-young.tmp"
    unrelated = root / ".pins" / "notes.txt"  # not ours: never removed
    long_ago = time.time() - LEFTOVER_MIN_AGE.total_seconds() - 60
    for path in [*old, young, unrelated]:
        path.write_bytes(b"partial")
        if path is not young:
            os.utime(path, (long_ago, long_ago))

    # older_than=0 still spares a temporary younger than LEFTOVER_MIN_AGE (a live write's)
    assert sorted(store.remove_stale(older_than=timedelta(0), dry_run=True)) == sorted(
        str(p) for p in old)
    assert all(p.exists() for p in old)  # a dry run removes nothing
    assert sorted(store.remove_stale(older_than=timedelta(0))) == sorted(str(p) for p in old)
    assert not any(p.exists() for p in old)
    assert young.exists() and unrelated.exists()
    # the live pin and lease are untouched
    assert len(store.pins()) == 1 and not expired(store.lease("oneshot", KEY))
    # an hour's margin spares what is younger than an hour
    path = root / ".pins" / ".sds-later.tmp"
    path.write_bytes(b"partial")
    os.utime(path, (long_ago, long_ago))
    assert store.remove_stale(older_than=timedelta(hours=1)) == []


def test_a_pin_that_cannot_be_read_stops_a_collection_instead_of_counting_as_none(
        tmp_path, monkeypatch):
    import uuid

    import torch

    from sds.errors import StoreError

    store = ArtifactStore(str(tmp_path / "store"))
    store.save("oneshot", KEY, {"w": torch.ones(2)}, {})
    store.pin([KEY], {"owner": uuid.uuid4().hex, "host": "elsewhere", "pid": 1}, 60)
    _refuse_pin_reads(store, monkeypatch)
    with pytest.raises(StoreError, match="reading the pin"):
        store.remove(keep=[])
    assert store.exists("oneshot", KEY)


def test_a_pin_is_written_again_when_it_went_missing(tiny_model, corpus, tmp_path):
    from tasks.common import pinned
    from tasks.plan import plan_pipeline

    plan = plan_pipeline(tiny_params(tiny_model, corpus, tmp_path / "store"))
    store = ArtifactStore(plan.store)
    with pinned([plan], seconds=0.3):
        (tmp_path / "store" / ".pins").joinpath(
            store.fs.ls(f"{tmp_path}/store/.pins", detail=False)[0].rsplit("/", 1)[-1]).unlink()
        assert store.pins() == []
        time.sleep(0.4)  # renewed every third of its time
        assert len(store.pins()) == 1


def test_a_run_pins_its_keys_while_it_runs_and_unpins_them_after(tiny_model, corpus, tmp_path):
    from tasks.common import pinned
    from tasks.plan import plan_pipeline

    plan = plan_pipeline(tiny_params(tiny_model, corpus, tmp_path / "store"))
    store = ArtifactStore(plan.store)
    with pinned([plan, plan], seconds=0.3):
        (pin,) = store.pins()
        assert set(pin["keys"]) == {spec.key for spec in plan.specs.values()}
        first = pin["expires"]
        time.sleep(0.5)  # renewed every third of its time: still live
        (pin,) = store.pins()
        assert pin["expires"] > first
    assert store.pins() == [] and store.in_use() == set()
    with pytest.raises(RuntimeError), pinned([plan]):
        raise RuntimeError("the run failed")
    assert store.pins() == []


def test_a_lease_of_a_process_of_this_host_that_is_gone_has_expired():
    import os
    import socket

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    gone = int(done.stdout)
    lease = {"owner": "x", "host": socket.gethostname(), "pidns": pid_namespace(),
             "expires": 2e9 * 10}
    assert expired({**lease, "pid": gone})
    assert not expired({**lease, "pid": os.getpid()})
    assert not expired({**lease, "host": "elsewhere", "pid": gone})
    # same host name, other pid namespace (a container sharing the name): waited out
    assert not expired({**lease, "pidns": "another boot or container", "pid": gone})
    assert not expired({key: v for key, v in lease.items() if key != "pidns"} | {"pid": gone})


def test_a_stale_lease_is_taken_over_by_a_run(prefect_api, tiny_model, corpus, tmp_path):
    from flows.pipeline import pipeline
    from tasks.plan import plan_pipeline

    config = tiny_params(tiny_model, corpus, tmp_path / "store", sds=False)
    plan = plan_pipeline(config)
    store = ArtifactStore(plan.store)
    stale = {}
    for label in ("calibration", "oneshot"):
        spec = plan.specs[label]
        assert store.take_lease(spec.stage, spec.key, _owner(f"dead-{label}"), -5)[0] == 0
        stale[label] = spec
    results = pipeline(config)
    for label, spec in stale.items():
        assert results["stages"][label]["computed"] is True
        assert store.exists(spec.stage, spec.key)
        assert store.lease(spec.stage, spec.key) is None  # released after the commit


def _two_runs(model, corpus, store: str, tmp_path: Path, env: dict) -> list[dict]:
    """Two identical `sds run`s on one store, started together; their results."""
    outs = [tmp_path / f"out{i}" for i in range(2)]
    processes = [subprocess.Popen([sys.executable, "-m", "flows.cli",
                                   *cli_args(model, corpus, store, out), "--gpu-limit", "none"],
                                  env=env, cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for out in outs]
    for p in processes:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    return [json.loads((out / "results.json").read_text()) for out in outs]


def _check_computed_once(results: list[dict]) -> None:
    a, b = results
    assert a["keys"] == b["keys"]
    assert a["final"]["sha256"] == b["final"]["sha256"]  # identical models
    for label in a["stages"]:
        computed = [r["stages"][label]["computed"] for r in results]
        assert computed.count(True) == 1, f"{label} computed by {computed.count(True)} runs"
    for r in results:  # a stage reused from the other run computed no block
        for stage in r["stages"].values():
            if "blocks" in stage and not stage["computed"]:
                assert stage["blocks"]["computed"] == 0


@pytest.mark.slow
def test_two_identical_runs_on_one_local_store_compute_each_stage_once(
        prefect_api, tiny_model, corpus, tmp_path):
    results = _two_runs(tiny_model, corpus, str(tmp_path / "store"), tmp_path,
                        server_env(tmp_path))
    _check_computed_once(results)
    assert not list((tmp_path / "store" / ".leases").rglob("*.json"))


@pytest.mark.slow
def test_two_identical_runs_on_one_s3_store_compute_each_stage_once(
        prefect_api, tiny_model, corpus, tmp_path, s3_bucket):
    root = f"s3://{s3_bucket}/runs"
    results = _two_runs(tiny_model, corpus, root, tmp_path, server_env(tmp_path))
    _check_computed_once(results)
    leases = ArtifactStore(root).fs.find(f"{s3_bucket}/runs/.leases")
    assert not leases


@pytest.mark.parametrize("lost", [True, False])
def test_a_run_keeps_the_artifact_another_run_committed_while_it_computed(
        tiny_model, corpus, tmp_path, lost):
    import logging
    import types

    import torch

    from tasks.common import _compute
    from tasks.plan import plan_pipeline

    plan = plan_pipeline(tiny_params(tiny_model, corpus, tmp_path / "store", sds=False))
    spec = plan.specs["calibration"]
    store = ArtifactStore(plan.store)
    store.save(spec.stage, spec.key, {"x": torch.zeros(2)}, {"by": "the run that took over"})
    before = store.load_meta(spec.stage, spec.key)

    def compute(*_args):  # finishing blocks as it goes, after the other run's commit
        store.save_part(spec.stage, spec.key, 0, {"x": torch.ones(2)}, {"setup": {}})
        return {"x": torch.ones(2)}, {"by": "the stalled run"}

    # its lease was taken over while it computed (lost), or it took over the expired lease of
    # a run that was alive after all and committed first
    ref = _compute(spec, compute, store, logging.getLogger("test"),
                   types.SimpleNamespace(lost=lost))
    assert ref["computed"] is False and ref["sha256"] == before["sha256"]
    assert store.load_meta(spec.stage, spec.key) == before
    tensors, meta = store.load(spec.stage, spec.key)
    assert torch.equal(tensors["x"], torch.zeros(2)) and meta["by"] == "the run that took over"
    assert list(store.parts(spec.stage, spec.key)) == []  # its finished blocks left no strays


@pytest.mark.parametrize("where", ["lease", "artifact"])
def test_a_file_where_a_store_folder_should_be_is_a_permanent_fault_said_as_such(tmp_path, where):
    """A file in the place of a lease folder or an artifact folder fails every try alike:
    the error says so, and the stage is not retried."""
    from sds.errors import StoreError
    from tasks.common import is_transient

    store = ArtifactStore(tmp_path / "store")
    key = "b" * 32
    path = tmp_path / "store" / (".leases/oneshot" if where == "lease" else "oneshot") / key
    path.parent.mkdir(parents=True)
    path.write_text("not a folder")
    with pytest.raises(StoreError) as caught:
        if where == "lease":
            store.take_lease("oneshot", key, _owner("taker"), 60)
        else:
            store.save("oneshot", key, {}, {})
    assert "is a file where a folder should be" in str(caught.value)
    assert not is_transient(caught.value)
    assert path.read_text() == "not a folder"


def test_a_lease_that_cannot_be_read_stops_a_collection_instead_of_counting_as_none(tmp_path):
    """A stage computing under a live lease keeps its finished blocks: when reading that
    lease fails, `remove` fails too rather than take the blocks as an interrupted save's."""
    from sds.errors import StoreError

    store = ArtifactStore(tmp_path / "store")
    key = "f" * 32
    store.save_part("oneshot", key, 0, {"w": torch.ones(2)}, {"blocks": 2})
    store.take_lease("oneshot", key, _owner("holder"), 600)
    assert store.in_use() == {key}
    real = store.fs.cat

    def failing(paths, on_error="raise", **kwargs):  # the lease's read fails, once per call
        out = real(paths, on_error=on_error, **kwargs)
        return {p: OSError(5, "I/O error") if "/.leases/" in p else v for p, v in out.items()}

    store.fs.cat = failing
    with pytest.raises(StoreError, match="reading the lease"):
        store.remove(None, incomplete=True)
    store.fs.cat = real
    assert [record["block"] for _, record in store.parts("oneshot", key)] == [0]


def test_lease_folders_go_once_their_leases_do(tmp_path, monkeypatch):
    """A committed stage's release leaves no empty folder under .leases, a collection sweeps
    those an earlier version left, and a taker whose folder a release removes at that moment
    still takes its lease."""
    import tempfile as tempfile_module

    import tasks.store as store_module

    store = ArtifactStore(tmp_path / "store")
    leases = tmp_path / "store" / ".leases"
    for key in ("a" * 32, "c" * 32):
        generation, _ = store.take_lease("oneshot", key, _owner("taker"), 60)
        store.save("oneshot", key, {}, {})
        store.release_lease("oneshot", key, generation)
    assert [p for p in leases.rglob("*")] == []

    left = leases / "redense" / ("d" * 32)  # what releases of earlier versions left
    left.mkdir(parents=True)
    assert store.remove_stale() == []
    assert [p for p in leases.rglob("*")] == []

    real = tempfile_module.mkstemp
    calls = []

    def racing(*args, dir=None, **kwargs):  # a release empties and removes the folder first
        calls.append(dir)
        if len(calls) == 1:
            os.rmdir(dir)
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(store_module.tempfile, "mkstemp", racing)
    generation, holder = store.take_lease("oneshot", "e" * 32, _owner("taker"), 60)
    assert (generation, holder) == (0, None) and len(calls) == 2
    assert store.lease("oneshot", "e" * 32)["generation"] == 0


def test_a_taker_whose_stage_folder_a_release_removes_still_takes_its_lease(tmp_path,
                                                                           monkeypatch):
    """os.makedirs makes `.leases/<stage>` and then `.leases/<stage>/<key>` in it: a release of
    another key of the stage that removes the emptied stage folder in between makes the second
    mkdir fail with FileNotFoundError, which the taker must retry as it does for mkstemp's."""
    import tasks.store as store_module

    store = ArtifactStore(tmp_path / "store")
    stage_folder = tmp_path / "store" / ".leases" / "oneshot"
    real = os.mkdir
    calls = []

    def racing(path, *args, **kwargs):  # the stage folder goes right after it is made
        real(path, *args, **kwargs)
        if Path(path) == stage_folder and not calls:
            calls.append(str(path))
            os.rmdir(path)

    monkeypatch.setattr(store_module.os, "mkdir", racing)
    generation, holder = store.take_lease("oneshot", "f" * 32, _owner("taker"), 60)
    assert (generation, holder) == (0, None) and calls == [str(stage_folder)]
    assert store.lease("oneshot", "f" * 32)["generation"] == 0


def test_a_pin_that_cannot_be_read_stops_a_stale_collection(tmp_path, monkeypatch):
    """`remove_stale` says an unreadable file stops it (it may be live): a live pin the storage
    refuses to read is not deleted by its age."""
    import uuid

    from sds.errors import StoreError

    store = ArtifactStore(str(tmp_path / "store"))
    store.pin([KEY], {"owner": uuid.uuid4().hex, "host": "elsewhere", "pid": 1}, 600)
    cat = _refuse_pin_reads(store, monkeypatch)
    with pytest.raises(StoreError, match="reading the pin"):
        store.remove_stale()
    monkeypatch.setattr(store.fs, "cat", cat)
    (pin,) = store.pins()  # still there, and live
    assert pin["keys"] == [KEY]


def _refuse_pin_reads(store, monkeypatch):
    """Make the store's storage refuse to read pins (permissions, a 503); returns its own
    `cat`, to give it back."""
    cat = store.fs.cat

    def failing(paths, **kw):
        out = cat(paths, **kw)
        return {p: PermissionError(p) if "/.pins/" in p else v for p, v in out.items()}

    monkeypatch.setattr(store.fs, "cat", failing)
    return cat


@pytest.mark.parametrize("skew, warned", [(0.0, False), (-100.0, True), (100.0, True)])
def test_a_machine_whose_clock_is_far_off_the_stores_is_warned(root, tiny_model, corpus,
                                                              tmp_path, monkeypatch, caplog,
                                                              skew, warned):
    """Leases hold their holders' clock times: a run compares its clock with the time the store
    gave its pin, and says so when the two differ by more than a third of a lease."""
    import logging
    import types

    import tasks.common as common
    from tasks.plan import plan_pipeline

    plan = plan_pipeline(tiny_params(tiny_model, corpus, root))
    # this machine's clock `skew` seconds off the store's (whose times come from the real clock)
    monkeypatch.setattr(common, "time", types.SimpleNamespace(
        time=lambda: time.time() + skew, sleep=time.sleep, perf_counter=time.perf_counter))
    logger = logging.getLogger("test-clock")
    with caplog.at_level(logging.WARNING, logger="test-clock"), common.pinned([plan], logger):
        pass
    said = [r.getMessage() for r in caplog.records if "clock" in r.getMessage()]
    if not warned:
        assert said == []
    else:
        (message,) = said
        import re

        seconds, side = re.search(r"clock is (\d+) s (ahead of|behind)", message).groups()
        assert abs(int(seconds) - abs(skew)) <= 2  # S3 keeps whole seconds
        assert side == ("ahead of" if skew > 0 else "behind")
        assert "within 40 s" in message and "NTP" in message
    store = ArtifactStore(root)
    name = f".pins/{'0' * 32}.json"
    before = time.time()
    store.pin([KEY], {"owner": "0" * 32}, 60)
    assert store.clock_offset(name, before, time.time()) == 0.0  # one clock: no offset
    assert store.clock_offset(name, before + 50, before + 60) == pytest.approx(-50, abs=2)
