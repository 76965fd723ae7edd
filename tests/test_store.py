"""The artifact store against real storage: a local folder, a moto S3 server on 127.0.0.1, and
fsspec's in-memory filesystem (any other backend goes through the same calls)."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import pickle
import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import fsspec
import pytest
import torch

from sds.errors import ConfigError, CorruptArtifactError, StoreError
from tasks.store import ArtifactStore, artifact_key, canonical_json

PREFIX = "runs"
MODEL = {"id": "facebook/opt-125m", "revision": "27dcfa74d334bc871f3234de431e71c6eda5b6d1"}


def key_for(stage: str = "oneshot", **config) -> str:
    return artifact_key(stage, 1, MODEL, config, [])


@pytest.fixture
def local_store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store")


@pytest.fixture
def s3_store(s3_bucket: str) -> ArtifactStore:
    return ArtifactStore(f"s3://{s3_bucket}/{PREFIX}")


@pytest.fixture
def memory_store() -> Iterator[ArtifactStore]:
    root = f"memory://sds-test-{uuid.uuid4().hex[:8]}/{PREFIX}"
    yield ArtifactStore(root)
    fsspec.filesystem("memory").rm(root, recursive=True) if fsspec.filesystem(
        "memory").exists(root) else None


@pytest.fixture(params=["local", "s3", "memory"])
def store(request) -> ArtifactStore:
    return request.getfixturevalue(f"{request.param}_store")


class Behind:
    """Direct access to a store's files through its filesystem, behind the store's back (to
    inspect or damage them)."""

    def __init__(self, store: ArtifactStore):
        self.store, self.fs = store, store.fs

    def _where(self, stage: str, key: str, name: str) -> str:
        return f"{self.store._base}/{stage}/{key}/{name}"

    def read(self, stage: str, key: str, name: str) -> bytes:
        return self.fs.cat_file(self._where(stage, key, name))

    def write(self, stage: str, key: str, name: str, data: bytes) -> None:
        self.fs.pipe_file(self._where(stage, key, name), data)

    def delete(self, stage: str, key: str, name: str) -> None:
        self.fs.rm_file(self._where(stage, key, name))

    def names(self) -> list[str]:
        """Every file under the root, relative to it."""
        base = self.store._base
        if not self.fs.exists(base):
            return []
        return sorted(p[len(base) + 1 :] for p in self.fs.find(base))


def some_tensors() -> dict[str, torch.Tensor]:
    return {"layers.0.fc1.weight": torch.randn(8, 4), "layers.0.fc2.weight": torch.randn(4, 8)}


# -- round trips --------------------------------------------------------------------------------
def test_round_trip_preserves_values_dtypes_and_shapes(store):
    base = torch.randn(6, 4)
    tensors = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(3, 5).half(),
        "bf16": torch.randn(3, 5).bfloat16(),
        "f64": torch.randn(2, 2, dtype=torch.float64),
        "f8": torch.randn(4).to(torch.float8_e4m3fn),
        "i8": torch.randint(-128, 127, (7,), dtype=torch.int8),
        "u8": torch.randint(0, 255, (7,), dtype=torch.uint8),
        "i32": torch.randint(-1000, 1000, (3, 2), dtype=torch.int32),
        "i64": torch.arange(5),
        "mask": torch.rand(4, 4) > 0.5,
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "transposed": torch.randn(3, 5).t(),  # not contiguous
        "needs_grad": torch.randn(2, 3, requires_grad=True),
        "tied_a": base[:3],  # two views of one storage
        "tied_b": base[3:],
    }
    key = key_for()
    store.save("oneshot", key, tensors, {"note": "dtypes"})
    loaded, meta = store.load("oneshot", key)

    assert sorted(loaded) == sorted(tensors) == meta["tensor_names"]
    for name, t in tensors.items():
        got = loaded[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert got.device.type == "cpu" and got.is_contiguous(), name
        assert torch.equal(got, t.detach()), name


def test_stage_with_no_tensors_round_trips(store):
    key = key_for("evaluate", task="wikitext2")
    store.save("evaluate", key, {}, {"metrics": {"ppl": 27.65, "diverged": float("inf")}})
    assert store.exists("evaluate", key)
    tensors, meta = store.load("evaluate", key)
    assert tensors == {}
    assert meta["tensor_names"] == [] and meta["metrics"]["ppl"] == 27.65
    assert meta["metrics"]["diverged"] == float("inf")


def test_meta_records_hash_size_names_time_and_versions(store):
    key = key_for()
    caller = {"config": {"pattern": "2:4", "nested": {"b": [1, None]}}, "upstream": []}
    before = datetime.now(UTC)
    store.save("oneshot", key, some_tensors(), caller)

    raw = Behind(store).read("oneshot", key, "tensors.safetensors")
    meta = store.load_meta("oneshot", key)
    assert meta["sha256"] == hashlib.sha256(raw).hexdigest()
    assert meta["bytes"] == len(raw)
    assert meta["tensor_names"] == sorted(some_tensors())
    assert (meta["stage"], meta["key"], meta["format"]) == ("oneshot", key, 1)
    created = datetime.fromisoformat(meta["created"])
    assert created.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= created <= datetime.now(UTC)
    assert meta["versions"]["torch"] == torch.__version__
    assert {"python", "safetensors"} <= set(meta["versions"])
    assert meta["config"] == caller["config"] and meta["upstream"] == []


def test_saving_again_replaces_the_artifact(store):
    key = key_for()
    store.save("oneshot", key, {"w": torch.zeros(3)}, {"attempt": 1})
    store.save("oneshot", key, {"w": torch.ones(5)}, {"attempt": 2})
    tensors, meta = store.load("oneshot", key)
    assert torch.equal(tensors["w"], torch.ones(5)) and meta["attempt"] == 2


def test_layout_is_one_folder_per_stage_and_key_holding_two_files(store):
    key = key_for()
    # free text such as a model id goes into meta.json, never into a path
    store.save("oneshot", key, some_tensors(), {"model": "../../evil/model?x=1"})
    assert Behind(store).names() == [
        f"oneshot/{key}/meta.json",
        f"oneshot/{key}/tensors.safetensors",
    ]
    ref = store.ref("oneshot", key)
    assert ref.uri == f"{store.root}/oneshot/{key}"


def test_local_save_leaves_nothing_outside_its_root(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    store.save("oneshot", key_for(), some_tensors(), {"model": "../../../outside"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["umask 022", "umask 002"])
def test_local_files_get_the_mode_a_plain_open_gives_under_the_umask(tmp_path, umask):
    """Artifacts, pins and created records on a shared folder are readable by whoever a plain
    open() would let read them, not private to the writer (mkstemp's 0600)."""
    store = ArtifactStore(tmp_path / "store")
    previous = os.umask(umask)
    try:
        with open(tmp_path / "plain", "w"):
            pass
        key = key_for()
        store.save("oneshot", key, some_tensors(), {})
        store.pin([key], {"owner": uuid.uuid4().hex}, 60)
        assert store.create("records/first.json", b"{}")
    finally:
        os.umask(previous)
    plain = (tmp_path / "plain").stat().st_mode & 0o777
    files = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert len(files) == 4
    assert {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in files} == {
        str(p.relative_to(tmp_path)): plain for p in files}


# -- keys ---------------------------------------------------------------------------------------
def test_same_inputs_give_the_same_key_and_any_change_a_different_one():
    up = [key_for("calibration")]
    args = dict(stage="oneshot", version=1, base_model=MODEL, config={"sparsity": 0.5}, upstream=up)
    key = artifact_key(**args)
    assert len(key) == 32 and all(c in "0123456789abcdef" for c in key)
    assert artifact_key(**args) == key

    changes = [
        {"stage": "redense"},
        {"version": 2},
        {"version": "1"},
        {"base_model": {**MODEL, "revision": "main"}},
        {"base_model": {"id": "facebook/opt-350m", "revision": MODEL["revision"]}},
        {"config": {"sparsity": 0.6}},
        {"config": {"sparsity": 0.5, "method": "wanda"}},
        {"config": {"sparsity": 0.5000000001}},
        {"upstream": []},
        {"upstream": up + [key_for("calibration", nsamples=64)]},
    ]
    keys = {artifact_key(**{**args, **change}) for change in changes}
    assert key not in keys and len(keys) == len(changes)


def test_key_ignores_dict_order_and_how_an_integral_float_is_spelled():
    a = {"outer": {"x": 1, "y": [1.0, {"q": None, "p": "s"}]}, "b": True, "a": 2.0}
    b = {"a": 2, "b": True, "outer": {"y": (1, {"p": "s", "q": None}), "x": 1.0}}
    assert artifact_key("oneshot", 1, MODEL, a, []) == artifact_key("oneshot", 1, MODEL, b, [])
    assert canonical_json(a) == '{"a":2,"b":true,"outer":{"x":1,"y":[1,{"p":"s","q":null}]}}'
    # a bool is not a number, and upstream order is meaningful
    assert key_for(flag=True) != key_for(flag=1)
    k1, k2 = key_for("calibration"), key_for("calibration", nsamples=64)
    assert artifact_key("evaluate", 1, MODEL, {}, [k1, k2]) != artifact_key(
        "evaluate", 1, MODEL, {}, [k2, k1]
    )


def test_key_accepts_config_dataclasses_like_their_dicts():
    @dataclasses.dataclass(frozen=True)
    class Config:
        sparsity: float = 0.5
        method: str = "sparsegpt"

    as_dict = {"method": "sparsegpt", "sparsity": 0.5}
    assert artifact_key("oneshot", 1, MODEL, Config(), []) == artifact_key(
        "oneshot", 1, MODEL, as_dict, []
    )


def test_key_is_the_same_on_every_machine():
    # pinned: if this changes, every stored artifact is orphaned (bump a stage version instead)
    config = {"sparsity": 0.5, "pattern": "2:4", "lr": 1e-4, "damp": 0.01, "names": ["é", None]}
    assert canonical_json(config) == (
        '{"damp":0.01,"lr":0.0001,"names":["\\u00e9",null],"pattern":"2:4","sparsity":0.5}'
    )
    key = artifact_key("oneshot", 3, MODEL, config, ["0123456789abcdef0123456789abcdef"])
    payload = (
        '{"base_model":{"id":"facebook/opt-125m","revision":"27dcfa74d334bc871f3234de431e71c6eda5b6d1"},'
        '"config":' + canonical_json(config) + ',"stage":"oneshot",'
        '"upstream":["0123456789abcdef0123456789abcdef"],"version":3}'
    )
    assert key == hashlib.sha256(payload.encode()).hexdigest()[:32]
    assert key == "253ff02adb4c0d71194ff17971268870"


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), {1, 2}, b"bytes", {1: "int key"}, torch.ones(2), object()],
    ids=["nan", "inf", "set", "bytes", "int-key", "tensor", "object"],
)
def test_values_without_one_json_spelling_are_refused(value):
    with pytest.raises(ConfigError):
        artifact_key("oneshot", 1, MODEL, {"x": value}, [])


def test_key_arguments_are_validated():
    for bad in [
        dict(stage="../x"),
        dict(version=True),
        dict(version=""),
        dict(version=1.5),
        dict(base_model="facebook/opt-125m"),
        dict(config=["not", "a", "dict"]),
        dict(upstream="0123456789abcdef0123456789abcdef"),
        dict(upstream=["../../etc"]),
    ]:
        args = dict(stage="oneshot", version=1, base_model=MODEL, config={}, upstream=[])
        with pytest.raises(ConfigError):
            artifact_key(**{**args, **bad})


# -- damaged and partial artifacts --------------------------------------------------------------
def test_a_flipped_byte_passes_exists_but_fails_load(store):
    key = key_for()
    store.save("oneshot", key, some_tensors(), {})
    behind = Behind(store)
    data = bytearray(behind.read("oneshot", key, "tensors.safetensors"))
    data[-1] ^= 0x01  # last byte: tensor data, so the file still parses
    behind.write("oneshot", key, "tensors.safetensors", bytes(data))

    assert store.exists("oneshot", key)  # cheap check: sizes still agree
    with pytest.raises(CorruptArtifactError, match="sha256"):
        store.load("oneshot", key)
    tensors, _ = store.load("oneshot", key, verify=False)  # the caller's choice
    assert sorted(tensors) == sorted(some_tensors())


def test_a_tensors_file_of_the_wrong_size_is_not_an_artifact(store):
    key = key_for()
    store.save("oneshot", key, some_tensors(), {})
    behind = Behind(store)
    behind.write("oneshot", key, "tensors.safetensors", behind.read(
        "oneshot", key, "tensors.safetensors")[:-8])
    assert not store.exists("oneshot", key)
    with pytest.raises(CorruptArtifactError, match="bytes"):
        store.load("oneshot", key, verify=False)
    assert store.list() == [] and store.incomplete() == [store.ref("oneshot", key)]


def test_a_half_written_artifact_does_not_exist(store):
    key = key_for()
    store.save("oneshot", key, some_tensors(), {})
    Behind(store).delete("oneshot", key, "meta.json")  # as if the save stopped before its commit

    assert not store.exists("oneshot", key)
    with pytest.raises(CorruptArtifactError, match="no meta.json"):
        store.load("oneshot", key)
    with pytest.raises(CorruptArtifactError):
        store.load_meta("oneshot", key)
    assert store.list() == []
    assert store.incomplete() == [store.ref("oneshot", key)]


def test_a_save_interrupted_before_its_commit_leaves_no_artifact(store, monkeypatch):
    key = key_for()
    store.save("oneshot", key, {"w": torch.zeros(3)}, {"attempt": 1})

    def crash(folder, data):
        raise StoreError("the machine went away before meta.json was written")

    with monkeypatch.context() as patch:
        patch.setattr(store, "_write_meta", crash)
        with pytest.raises(StoreError):
            store.save("oneshot", key, {"w": torch.ones(5)}, {"attempt": 2})
    # the old meta.json was withdrawn first, so old meta + new tensors never pass for an artifact
    assert not store.exists("oneshot", key)
    with pytest.raises(CorruptArtifactError):
        store.load("oneshot", key)
    assert store.incomplete() == [store.ref("oneshot", key)]

    store.save("oneshot", key, {"w": torch.ones(5)}, {"attempt": 3})  # the retry
    assert store.load("oneshot", key)[1]["attempt"] == 3
    assert not [n for n in Behind(store).names() if "tmp" in n]


def test_a_missing_tensors_file_is_corrupt(store):
    key = key_for()
    store.save("oneshot", key, some_tensors(), {})
    Behind(store).delete("oneshot", key, "tensors.safetensors")
    assert not store.exists("oneshot", key)
    with pytest.raises(CorruptArtifactError, match="missing"):
        store.load("oneshot", key)


@pytest.mark.parametrize("meta", [b"{not json", b"[1, 2]", b"\xff\xfe", b"{}"])
def test_an_unreadable_or_incomplete_meta_is_not_an_artifact(store, meta):
    key = key_for()
    store.save("oneshot", key, some_tensors(), {})
    Behind(store).write("oneshot", key, "meta.json", meta)
    assert not store.exists("oneshot", key)
    with pytest.raises(CorruptArtifactError):
        store.load("oneshot", key)


def test_a_meta_copied_from_another_key_is_not_trusted(store):
    one, two = key_for(), key_for(sparsity=0.7)
    store.save("oneshot", one, some_tensors(), {})
    store.save("oneshot", two, some_tensors(), {})
    behind = Behind(store)
    behind.write("oneshot", two, "meta.json", behind.read("oneshot", one, "meta.json"))
    assert not store.exists("oneshot", two)
    with pytest.raises(CorruptArtifactError, match="another stage or key"):
        store.load_meta("oneshot", two)


def test_a_meta_whose_numbers_changed_is_not_trusted(store):
    """An evaluation's result is its meta.json alone (no tensors): a changed number in it, the
    JSON still valid, fails the record's own checksum. A record written before the checksum
    (none in it) still reads."""
    key = key_for()
    store.save("evaluate", key, {}, {"metrics": {"ppl/wiki": 183.47}})
    behind = Behind(store)
    good = behind.read("evaluate", key, "meta.json")
    behind.write("evaluate", key, "meta.json", good.replace(b"183.47", b"103.47"))
    assert not store.exists("evaluate", key)
    with pytest.raises(CorruptArtifactError, match="checksum"):
        store.load_meta("evaluate", key)
    legacy = json.loads(good)
    del legacy["meta_sha256"]
    behind.write("evaluate", key, "meta.json", json.dumps(legacy).encode())
    assert store.load_meta("evaluate", key)["metrics"] == {"ppl/wiki": 183.47}


def test_a_meta_reads_back_as_written_whatever_it_holds(store):
    """The checksum is taken over the record as it reads back: int keys (JSON strings them),
    a path with an undecodable byte (a lone surrogate), NaN and non-ASCII text all commit."""
    record = {"by_block": {2: "a", 10: "b"}, "model": "/data/mod\udcffel", "loss": float("nan"),
              "note": "données", "nested": {"x": [1, 2.5, None]}}
    for i, (name, value) in enumerate(record.items()):
        key = key_for(sparsity=i / 10)
        store.save("evaluate", key, {}, {name: value})
        assert store.exists("evaluate", key), name
        # and reads back as JSON writes it (int keys as strings; NaN compared by its spelling)
        read = store.load_meta("evaluate", key)[name]
        assert json.dumps(read) == json.dumps(json.loads(json.dumps(value))), name


def test_a_never_saved_artifact_does_not_exist(store):
    assert not store.exists("oneshot", key_for())
    with pytest.raises(CorruptArtifactError):
        store.load("oneshot", key_for())
    assert issubclass(CorruptArtifactError, StoreError)


# -- names and arguments ------------------------------------------------------------------------
BAD_STAGES = ["../x", "..", "a/b", "", "Oneshot", "x" * 65, "oneshot\n", "1st", None, 3]
BAD_KEYS = ["../../etc", "A" * 32, "0" * 31, "0" * 33, "0" * 30 + "/.", "g" * 32, None]


def test_names_that_could_escape_the_root_are_refused(local_store, tmp_path):
    good_key = key_for()
    calls = []
    for stage in BAD_STAGES:
        calls += [(stage, good_key)]
    for key in BAD_KEYS:
        calls += [("oneshot", key)]
    for stage, key in calls:
        for op, extra in [
            (local_store.save, (some_tensors(), {})),
            (local_store.exists, ()),
            (local_store.load, ()),
            (local_store.load_meta, ()),
            (local_store.discard, ()),
            (local_store.ref, ()),
        ]:
            with pytest.raises(ConfigError):
                op(stage, key, *extra)
    for stage in BAD_STAGES[:-2]:  # list(None) lists every stage
        with pytest.raises(ConfigError):
            local_store.list(stage)
    assert list(tmp_path.iterdir()) == []  # nothing was written anywhere


@pytest.mark.parametrize(
    "root",
    ["", "   ", "nosuch://bucket/x", "s3://", "s3://bucket/../x", "./a/../../x",
     "s3://key:secret@bucket/x"],
)
def test_malformed_roots_are_config_errors(root):
    with pytest.raises(ConfigError) as caught:
        ArtifactStore(root)
    assert "secret" not in str(caught.value)


def test_a_backend_whose_package_is_missing_says_what_to_install(monkeypatch):
    def missing(protocol):
        raise ImportError(f"Install gcsfs to access {protocol}://")

    monkeypatch.setattr(fsspec, "get_filesystem_class", missing)
    with pytest.raises(ConfigError, match="Install gcsfs"):
        ArtifactStore("gs://bucket/x")


def test_roots_are_normalised(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ArtifactStore().root == str(tmp_path / "sds-store")
    assert ArtifactStore(f"file://{tmp_path}/x/").root == str(tmp_path / "x")
    assert ArtifactStore("s3://bucket-a/runs/2026/").root == "s3://bucket-a/runs/2026"
    assert ArtifactStore("s3://bucket-a").root == "s3://bucket-a"
    again = ArtifactStore(ArtifactStore("memory://m/runs").root)
    assert again.root == ArtifactStore("memory://m/runs").root


def test_create_writes_only_when_absent(store):
    assert store.create("leases/oneshot", b"first") is True
    assert store.create("leases/oneshot", b"second") is False
    assert store.fs.cat_file(f"{store._base}/leases/oneshot") == b"first"


def test_bad_tensors_and_meta_are_config_errors(local_store):
    key = key_for()
    for tensors, meta in [
        ({"w": [1.0, 2.0]}, {}),
        ({3: torch.ones(1)}, {}),
        ({"__metadata__": torch.ones(1)}, {}),
        ([torch.ones(1)], {}),
        ({"w": torch.ones(2).to_sparse()}, {}),
        ({"w": torch.ones(2)}, {"sha256": "mine"}),
        ({"w": torch.ones(2)}, {"created": "yesterday"}),
        ({"w": torch.ones(2)}, {"when": datetime.now()}),
        ({"w": torch.ones(2)}, "not a dict"),
    ]:
        with pytest.raises(ConfigError):
            local_store.save("oneshot", key, tensors, meta)
    assert not local_store.exists("oneshot", key)


def test_a_reference_names_the_artifact_folder(store):
    ref = store.save("oneshot", key_for(), some_tensors(), {})
    assert ref == store.ref("oneshot", key_for())
    assert (ref.stage, ref.key, ref.uri) == ("oneshot", key_for(),
                                             f"{store.root}/oneshot/{key_for()}")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.key = "0" * 32


# -- listing and removal ------------------------------------------------------------------------
def test_list_and_discard(store):
    calib = key_for("calibration")
    one, two = key_for(sparsity=0.5), key_for(sparsity=0.6)
    store.save("calibration", calib, {"ids": torch.arange(6).reshape(2, 3)}, {})
    store.save("oneshot", one, some_tensors(), {"upstream": [calib]})
    store.save("oneshot", two, some_tensors(), {"upstream": [calib]})

    assert [(m["stage"], m["key"]) for m in store.list()] == [
        ("calibration", calib),
        ("oneshot", one),
        ("oneshot", two),
    ]
    assert {m["key"] for m in store.list("oneshot")} == {one, two}
    assert store.list("redense") == [] and store.incomplete() == []

    assert store.discard("oneshot", one) is True
    assert not store.exists("oneshot", one)
    assert store.discard("oneshot", one) is False
    assert {m["key"] for m in store.list()} == {calib, two}
    assert not any(one in name for name in Behind(store).names())


def test_remove_by_stage_age_and_what_is_kept(store):
    calib = key_for("calibration")
    shot = key_for(sparsity=0.5)
    final = artifact_key("second", 1, MODEL, {}, [shot])
    stray = key_for(sparsity=0.9)
    half = key_for(sparsity=0.1)
    store.save("calibration", calib, {"ids": torch.arange(4)}, {})
    store.save("oneshot", shot, some_tensors(), {"upstream": [calib]})
    store.save("second", final, some_tensors(), {"upstream": [shot]})
    store.save("oneshot", stray, some_tensors(), {"upstream": [calib]})
    store.save("oneshot", half, some_tensors(), {})
    Behind(store).delete("oneshot", half, "meta.json")

    # keep = the final artifact and, through meta['upstream'], everything it was made from
    planned = store.remove(keep=[final], dry_run=True)
    assert planned == [store.ref("oneshot", stray)]
    assert store.exists("oneshot", stray)  # dry run
    assert store.remove(older_than=timedelta(days=1)) == []  # everything is younger

    removed = store.remove(keep=[final], incomplete=True)
    assert set(removed) == {store.ref("oneshot", half), store.ref("oneshot", stray)}
    assert store.remove(stage="oneshot", keep=[final]) == []
    store.save("oneshot", half, some_tensors(), {})
    Behind(store).delete("oneshot", half, "meta.json")
    # interrupted saves only: every committed artifact stays
    assert store.remove(committed=False, incomplete=True) == [store.ref("oneshot", half)]
    assert store.incomplete() == [] and {m["key"] for m in store.list()} == {calib, shot, final}
    assert store.remove(stage="second", older_than=timedelta(0)) == [store.ref("second", final)]
    assert {m["key"] for m in store.list()} == {calib, shot}
    with pytest.raises(ConfigError):
        store.remove(older_than=3600)
    with pytest.raises(ConfigError):
        store.remove(keep=final)


def test_stray_files_in_a_committed_artifact_are_found_and_removed(store, monkeypatch):
    key = key_for()
    store.save("oneshot", key, some_tensors(), {})
    Behind(store).write("oneshot", key, ".tensors-0123.tmp", b"left by a killed save")
    stray = f"{store.root}/oneshot/{key}/.tensors-0123.tmp"

    # younger than LEFTOVER_MIN_AGE it may be a live save's temporary: it stays, at any age
    assert store.strays() == [] and store.remove_strays(older_than=timedelta(0)) == []
    monkeypatch.setattr("tasks.store.LEFTOVER_MIN_AGE", timedelta(0))  # as if it were old
    assert store.strays() == [stray]
    assert store.strays(older_than=timedelta(days=1)) == []  # maybe a save in progress
    assert store.remove_strays(dry_run=True) == [stray]
    assert store.remove_strays() == [stray]
    assert store.strays() == [] and store.exists("oneshot", key)
    assert Behind(store).names() == [f"oneshot/{key}/{name}"
                                     for name in ("meta.json", "tensors.safetensors")]


# -- reaching the storage -----------------------------------------------------------------------
def test_check_passes_on_a_writable_root_and_leaves_nothing_behind(store):
    store.check()
    assert Behind(store).names() == []


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_endpoint_fails_with_a_store_error_naming_it(s3_env, monkeypatch):
    port = closed_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    store = ArtifactStore("s3://any-bucket/runs", connect_timeout=2)

    with pytest.raises(StoreError) as caught:
        store.check()
    message = str(caught.value)
    assert f"cannot reach http://127.0.0.1:{port}" in message and "AWS_ENDPOINT_URL" in message
    assert "\n" not in message and os.environ["AWS_SECRET_ACCESS_KEY"] not in message
    assert not isinstance(caught.value, CorruptArtifactError)  # retry it, don't recompute
    # a network fault is never mistaken for a missing artifact
    with pytest.raises(StoreError, match="cannot reach"):
        store.exists("oneshot", key_for())


def test_missing_credentials_say_which_variables_to_set(s3_bucket, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = ArtifactStore(f"s3://{s3_bucket}/{PREFIX}")
    with pytest.raises(StoreError) as caught:
        store.check()
    message = str(caught.value)
    assert "no AWS credentials" in message
    assert "AWS_ACCESS_KEY_ID" in message and "AWS_SECRET_ACCESS_KEY" in message


def test_a_missing_bucket_is_named(s3_env):
    store = ArtifactStore("s3://no-such-bucket-sds/runs")
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-sds' does not exist"):
        store.check()
    # not "absent artifact" (which would trigger a pointless recompute), and not "corrupt"
    for op in (
        lambda: store.exists("oneshot", key_for()),
        lambda: store.load("oneshot", key_for()),
        lambda: store.save("oneshot", key_for(), some_tensors(), {}),
        lambda: store.list(),
    ):
        with pytest.raises(StoreError, match="does not exist") as caught:
            op()
        assert not isinstance(caught.value, CorruptArtifactError)


def test_denied_access_is_a_store_error(s3_bucket, s3_env, s3_enforce_auth, monkeypatch):
    iam = boto3.client(
        "iam", endpoint_url=s3_env, region_name="us-east-1",
        aws_access_key_id="AKIAADMIN", aws_secret_access_key="admin",
    )
    user = f"reader-{s3_bucket[-6:]}"
    iam.create_user(UserName=user)
    access = iam.create_access_key(UserName=user)["AccessKey"]  # no policy: may do nothing
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", access["SecretAccessKey"])
    store = ArtifactStore(f"s3://{s3_bucket}/{PREFIX}")
    with s3_enforce_auth():
        with pytest.raises(StoreError, match=f"access to s3://{s3_bucket}/{PREFIX} was denied"):
            store.check()
        with pytest.raises(StoreError, match="denied"):
            store.exists("oneshot", key_for())
    assert access["SecretAccessKey"] not in repr(store)


def test_a_local_root_that_is_a_file_is_reported(tmp_path):
    (tmp_path / "store").write_text("not a folder")
    store = ArtifactStore(tmp_path / "store")
    for op in (store.check, store.list, store.incomplete, store.remove):
        with pytest.raises(StoreError, match="not a folder"):
            op()


def test_a_local_root_under_a_file_is_reported_with_its_cause(tmp_path):
    """`--store afile/sub`: no retry would help, and the message says what is wrong."""
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(StoreError, match="is a file where a folder should be.*choose another "
                                         "store root") as info:
        ArtifactStore(tmp_path / "afile" / "sub").check()
    assert "retry" not in str(info.value) and "ArtifactStore" not in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_local_root_is_reported(tmp_path):
    root = tmp_path / "store"
    root.mkdir(mode=0o500)
    with pytest.raises(StoreError, match="permission denied"):
        ArtifactStore(root).check()


# -- secrets and serialisation ------------------------------------------------------------------
def test_secrets_never_reach_meta_refs_or_reprs(s3_store):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    ref = s3_store.save("oneshot", key_for(), some_tensors(), {"model": MODEL})
    s3_store.load("oneshot", key_for())
    meta_bytes = Behind(s3_store).read("oneshot", key_for(), "meta.json")
    for text in (
        meta_bytes,
        repr(s3_store).encode(),
        str(s3_store).encode(),
        repr(ref).encode(),
        pickle.dumps(s3_store),
        json.dumps(s3_store.list()).encode(),
    ):
        assert secret not in text
    assert repr(s3_store) == f"ArtifactStore('{s3_store.root}')"


def test_a_store_pickles_without_its_client(s3_store):
    s3_store.save("oneshot", key_for(), some_tensors(), {})
    clone = pickle.loads(pickle.dumps(s3_store))
    assert clone.root == s3_store.root and clone.connect_timeout == s3_store.connect_timeout
    assert clone.exists("oneshot", key_for())


def test_the_library_imports_neither_prefect_nor_fsspec():
    library = Path(__file__).resolve().parents[1] / "sds"
    imported = set()
    for path in library.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                     for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    forbidden = ("prefect", "fsspec", "s3fs", "tasks", "flows", "pydantic")
    assert not {m for m in imported if m.split(".")[0] in forbidden}


def test_a_corrupt_artifact_error_keeps_what_is_damaged_through_pickling():
    """Prefect pickles a task's exception: the flow still says what was damaged, without the
    advice meant for a library caller."""
    import pickle

    from sds.errors import UpstreamLostError

    lost = pickle.loads(pickle.dumps(UpstreamLostError("a is corrupt: x; run again", "a is "
                                                       "corrupt: x")))
    assert type(lost) is UpstreamLostError and str(lost) == "a is corrupt: x; run again"
    assert lost.damage == "a is corrupt: x"
    assert CorruptArtifactError("plain").damage == "plain"
