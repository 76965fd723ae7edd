"""The artifact store: each stage's output tensors and its commit record, under one fsspec root.

Layout under the root (a local folder, `s3://bucket/prefix`, `memory://...`, any fsspec URL):

    <root>/<stage>/<key>/tensors.safetensors   the tensors the stage produced (possibly none)
    <root>/<stage>/<key>/meta.json             written last: its presence is the commit
    <root>/<stage>/<key>/block-00007.*         a stage's finished blocks while it computes
                                               (`save_part`); removed once it commits
    <root>/.leases/<stage>/<key>/<n>.json      who computes `stage`/`key` now, until when
                                               (generation n; `take_lease`)
    <root>/.pins/<id>.json                     the keys a run in progress will read or
                                               write, until when (`pin`): `remove` keeps them

The key hashes everything that determines a stage's output (`artifact_key`), so the same inputs
find the same artifact on any machine. Only validated stage names and hex keys ever become path
segments; model ids and other free text live inside meta.json.

The store is the pipeline's one cache. Whether a stage is done is decided from meta.json alone
(`exists`: it parses, and records the size and sha256 of a tensors file of that size); the
tensors are hashed by the stage that reads them (`load`), so a damaged artifact is found and
recomputed, never trusted. Writes are atomic (`atomic_file`), and `create` writes an object only
if it is absent.

Failures of the storage itself raise `StoreError` (transient: the caller may retry); a missing,
half-written or damaged artifact raises `CorruptArtifactError` (recompute it); bad arguments
raise `ConfigError`. Remote credentials and endpoints come from each backend's standard
environment (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL or
AWS_ENDPOINT_URL_S3, AWS_PROFILE, ~/.aws files); the store never records them, and scrubs them
from its messages. Torch is imported only to save or load tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import logging
import math
import numbers
import os
import platform
import re
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import metadata
from typing import Any
from urllib.parse import urlsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

from sds.errors import ConfigError, CorruptArtifactError, SDSError, StoreError, StoreFullError

log = logging.getLogger(__name__)

DEFAULT_ROOT = "./sds-store"
STORE_VARIABLE = "SDS_STORE"  # the machine's default store, e.g. a work pool's shared bucket


def default_store() -> str:
    """The store a run uses when none is given: $SDS_STORE, else DEFAULT_ROOT. Read when a
    configuration is made, on the machine that runs it: a worker whose environment names the
    shared store runs a triggered configuration that leaves `store` out against that store."""
    return os.environ.get(STORE_VARIABLE, "").strip() or DEFAULT_ROOT
TENSORS = "tensors.safetensors"
META = "meta.json"
FORMAT = 1  # layout of meta.json; bump when its meaning changes
KEY_LENGTH = 32  # hex characters kept of the sha256: 128 bits

_STAGE_RE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_KEY_RE = re.compile(rf"[0-9a-f]{{{KEY_LENGTH}}}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_LEASE_RE = re.compile(r"([0-9]{1,9})\.json")
_PIN_RE = re.compile(r"[0-9a-f]{32}\.json")
# what a write killed half-way leaves beside the pins and leases (`atomic_file`,
# `_create_local`) or at the root (`check`'s probe)
_LEFTOVER_RE = re.compile(r"\.sds-(.*\.tmp|check-[0-9a-f]{32})")
# such a file, and a stray one in an artifact's folder (`remove_strays`), is collected only once
# it is this old, whatever `older_than` says: a live writer's temporary exists while it writes
# (milliseconds for a lease, minutes for a large tensors file), and removing it would fail that
# write
LEFTOVER_MIN_AGE = timedelta(minutes=10)
_PART_RE = re.compile(r"block-[0-9]{5}\.(safetensors|json)")
_RESERVED = frozenset(
    {"format", "stage", "key", "sha256", "bytes", "tensor_names", "created", "versions"}
)
_CREDENTIALS_FIX = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for an S3 service "
    "other than AWS), or AWS_PROFILE naming a profile in ~/.aws/credentials"
)


# -- keys ---------------------------------------------------------------------------------------
def canonical_json(value: Any) -> str:
    """The one JSON spelling of `value`, the text that is hashed into artifact keys.

    Dict keys are sorted, there is no whitespace, and the output is ASCII. Tuples are written as
    lists and dataclasses as dicts of their fields. A float with an integral value is written as
    that integer (`1.0` -> `1`), so a value spelled either way gives the same key; bools stay
    `true`/`false`. Other floats use Python's shortest round-trip form, which is the same on
    every IEEE-754 machine. NaN, infinities, non-string dict keys and types without an obvious
    JSON form (sets, bytes, tensors, ...) raise ConfigError rather than being guessed at.
    """
    return json.dumps(
        _plain(value, "value"),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
    )


def _plain(value: Any, where: str) -> Any:
    """`value` as None/bool/int/float/str/list/dict only, ready for `json.dumps`."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        x = float(value)
        if not math.isfinite(x):
            raise ConfigError(f"{where} is {x}: keys need finite numbers; use None for 'unset'")
        return int(x) if x.is_integer() and abs(x) < 2**53 else x
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{where} has the non-string key {k!r}; use string keys")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name), f"{where}.{f.name}")
            for f in dataclasses.fields(value)
        }
    raise ConfigError(
        f"{where} is a {type(value).__name__}, which has no canonical JSON form; "
        "use None, bool, int, float, str, list or dict (a sorted list for a set)"
    )


def artifact_key(
    stage: str,
    version: int | str,
    base_model: Mapping[str, Any],
    config: Mapping[str, Any],
    upstream: list[str],
) -> str:
    """The key of a stage's artifact: a hash of everything that determines its output.

    `base_model` identifies the model (hub id + resolved revision, or a content hash of a local
    folder); `config` is the stage's own options (a dict or a dataclass); `upstream` lists the
    keys of the artifacts the stage reads, in the order the stage takes them. Bump `version`
    when the stage's code changes what it produces.
    """
    check_stage(stage)
    if isinstance(version, bool) or not isinstance(version, int | str) or version == "":
        raise ConfigError(f"stage version {version!r} must be an int or a non-empty string")
    for name, value in (("base_model", base_model), ("config", config)):
        if not isinstance(value, Mapping) and not (
            dataclasses.is_dataclass(value) and not isinstance(value, type)
        ):
            raise ConfigError(f"{name} must be a dict (or a dataclass), not {type(value).__name__}")
    if not isinstance(upstream, list | tuple):
        raise ConfigError(
            f"upstream must be a list of artifact keys, not {type(upstream).__name__}"
        )
    for k in upstream:
        _check_key(k)
    payload = {
        "stage": stage,
        "version": version,
        "base_model": base_model,
        "config": config,
        "upstream": list(upstream),
    }
    return hashlib.sha256(canonical_json(payload).encode("ascii")).hexdigest()[:KEY_LENGTH]


def check_stage(stage: Any) -> str:
    if not isinstance(stage, str) or not _STAGE_RE.fullmatch(stage):
        raise ConfigError(
            f"stage name {_short(stage)} is not valid: use 1-64 lowercase letters, digits, "
            "'_' or '-', starting with a letter (e.g. 'oneshot')"
        )
    return stage


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ConfigError(
            f"artifact key {_short(key)} is not valid: keys are {KEY_LENGTH} lowercase hex "
            "characters, as made by artifact_key()"
        )
    return key


# -- references ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArtifactRef:
    """Where one artifact lives (made by `ArtifactStore.ref`, which validates stage and key)."""

    root: str
    stage: str
    key: str
    uri: str  # the artifact's folder: <root>/<stage>/<key>


@dataclass
class _Entry:
    """One `<stage>/<key>` folder found by a listing."""

    ref: ArtifactRef
    meta: dict | None  # None when not committed or not usable
    modified: float | None  # newest file time (POSIX seconds), if the listing knows it
    strays: dict[str, float | None]  # other files (temporaries of a killed save): path -> mtime


# -- atomic writes ------------------------------------------------------------------------------
def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only
    be read by setting it, which would race with other threads creating files)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(path: str | os.PathLike, folder: bool = False) -> None:
    """Give `path` (made by mkstemp/mkdtemp, which make it private to its owner) the mode a
    plain open() or mkdir() would have: on a shared folder, other users' workers read it."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_file(fs, path: str) -> Iterator[str]:
    """A local file to write; when the block ends without an error it becomes `path` on `fs`
    in one step, so that a reader sees the old content or the new, never a part.

    On a local filesystem the file is made beside `path` and renamed over it (fsync'ed); on an
    object store it is uploaded with one PUT, which is atomic there. A failure or a kill
    leaves `path` as it was (locally, at worst a `.sds-*.tmp` file beside it, which
    `ArtifactStore.strays` finds).
    """
    local = isinstance(fs, LocalFileSystem)
    folder = os.path.dirname(path) if local else None
    if local:
        _makedirs(folder)
    fd, tmp = tempfile.mkstemp(prefix=".sds-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        if local:
            plain_mode(tmp)
            _fsync(tmp)
            os.replace(tmp, path)
            _fsync_dir(folder)
        else:
            fs.put_file(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


# -- the store ----------------------------------------------------------------------------------
class ArtifactStore:
    """Artifacts under one root URL, opened with fsspec's `url_to_fs`.

    Nothing is contacted until the first operation; `check()` verifies that the root can be
    reached and written, and says what to fix when it cannot. Safe to pickle (the filesystem
    client is rebuilt on the other side).
    """

    def __init__(self, root: str | os.PathLike = DEFAULT_ROOT, *, connect_timeout: float = 5.0):
        if isinstance(root, os.PathLike):
            root = os.fspath(root)
        if not isinstance(root, str) or not root.strip():
            raise ConfigError(
                f"store root {_short(root)} is empty; use a local folder or a URL such as "
                "s3://bucket/prefix"
            )
        if isinstance(connect_timeout, bool) or not (
            isinstance(connect_timeout, int | float) and connect_timeout > 0
        ):
            raise ConfigError(f"connect_timeout {connect_timeout!r} must be a positive number")
        self.connect_timeout = float(connect_timeout)
        root = os.path.expanduser(root.strip())
        protocol = fsspec.core.split_protocol(root)[0] or "file"
        try:
            self._fs_class = fsspec.get_filesystem_class(protocol)
        except ImportError as exc:  # a known backend whose package is not installed
            raise ConfigError(f"store root {_short(root)}: {exc}") from None
        except ValueError:
            raise ConfigError(
                f"store root {_short(root)} has the unknown scheme {protocol!r}: use a local "
                "folder or a URL of an installed fsspec backend (e.g. s3://bucket/prefix)"
            ) from None
        parts = urlsplit(root)
        if parts.username or parts.password:
            raise ConfigError(
                f"store root {_short(_redact_userinfo(root))} holds credentials; give them in "
                "the environment (e.g. AWS_ACCESS_KEY_ID) instead"
            )
        self._url, self.protocol = root, protocol
        self._base = self._fs_class._strip_protocol(root).rstrip("/")  # path on the filesystem
        if not self._base.strip("/") or any(p in (".", "..") for p in self._base.split("/")):
            raise ConfigError(
                f"store root {_short(root)} names no place or has '.'/'..' segments; use e.g. "
                "./sds-store or s3://bucket/prefix"
            )
        self.local = issubclass(self._fs_class, LocalFileSystem)
        self.root = self._base if self.local else f"{protocol}://{self._base.lstrip('/')}"
        self._fs = None

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root!r})"

    def __getstate__(self) -> dict:
        return {"root": self.root, "connect_timeout": self.connect_timeout}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"], connect_timeout=state["connect_timeout"])

    @property
    def fs(self):
        """The fsspec filesystem of the root (made on first use)."""
        if self._fs is None:
            # s3fs gets our own settings (`_s3_options`); other backends take their defaults
            options = (_s3_options(self.connect_timeout) if self.protocol in ("s3", "s3a")
                       else {})
            with self._guard(f"opening {self.root}"):
                self._fs, _ = fsspec.core.url_to_fs(self._url, **options)
        return self._fs

    def ref(self, stage: str, key: str) -> ArtifactRef:
        """The reference of `stage`/`key` in this store (whether or not it exists)."""
        check_stage(stage)
        _check_key(key)
        return ArtifactRef(self.root, stage, key, f"{self.root}/{stage}/{key}")

    # -- reachability ---------------------------------------------------------------------------
    def check(self) -> None:
        """Write, read back and delete a small probe object; raise StoreError saying what to fix."""
        self._not_a_file()
        probe = f"{self._base}/.sds-check-{uuid.uuid4().hex}"
        self._put(probe, b"ok", f"writing a test object under {self.root}")
        with self._guard(f"reading a test object under {self.root}"):
            self.fs.cat_file(probe)
        with self._guard(f"deleting a test object under {self.root}"):
            self.fs.rm_file(probe)

    # -- writing --------------------------------------------------------------------------------
    def save(self, stage: str, key: str, tensors: Mapping, meta: Mapping | None = None
             ) -> ArtifactRef:
        """Store `tensors` (may be empty) and `meta` as `stage`/`key`, replacing any old copy.

        The tensors file goes in first (atomically), then meta.json, which is the commit: it
        holds the caller's `meta` plus format, stage, key, sha256, bytes, tensor_names, created
        (UTC) and library versions. `meta['upstream']`, when present, should list the upstream
        keys: `remove(keep=...)` follows it. Until meta.json lands, `exists` reports False.
        """
        import safetensors.torch

        ref = self.ref(stage, key)
        tensors = _prepare_tensors(tensors)
        meta = _prepare_meta(meta)
        folder = self._dir(stage, key)
        with self._guard(f"writing the tensors of {ref.uri}"):
            with atomic_file(self.fs, f"{folder}/{TENSORS}") as tmp:
                safetensors.torch.save_file(tensors, tmp)
                size = os.path.getsize(tmp)
                digest = file_sha256(tmp)
                self._uncommit(folder)  # old meta + new tensors must never pass for an artifact
        record = {
            **meta,
            "format": FORMAT,
            "stage": stage,
            "key": key,
            "sha256": digest,
            "bytes": size,
            "tensor_names": sorted(tensors),
            "created": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "versions": _versions(),
        }
        record["meta_sha256"] = _meta_digest(record)
        self._write_meta(folder, record)
        log.debug("saved %s (%d tensors, %d bytes)", ref.uri, len(tensors), size)
        return ref

    # -- finished blocks of a stage that computes ----------------------------------------------
    def save_part(self, stage: str, key: str, block: int, tensors: Mapping, record: Mapping
                  ) -> None:
        """Commit one finished block of `stage`/`key` before the artifact itself: its tensors,
        then a small record (the commit of the block) holding `record` plus their size and
        sha256. `parts` reads them back; `drop_parts` removes them."""
        import safetensors.torch

        ref = self.ref(stage, key)
        if isinstance(block, bool) or not isinstance(block, int) or block < 0:
            raise ConfigError(f"block {block!r} must be a non-negative int")
        tensors = _prepare_tensors(tensors)
        record = _prepare_meta(record)
        path = f"{self._dir(stage, key)}/{_part(block)}"
        action = f"writing block {block} of {ref.uri}"
        with self._guard(action), atomic_file(self.fs, f"{path}.safetensors") as tmp:
            safetensors.torch.save_file(tensors, tmp)
            size, digest = os.path.getsize(tmp), file_sha256(tmp)
        data = {**record, "block": block, "sha256": digest, "bytes": size,
                "tensor_names": sorted(tensors)}
        self._put(f"{path}.json", json.dumps(data, sort_keys=True).encode(), action)

    def parts(self, stage: str, key: str) -> Iterator[tuple[dict, dict]]:
        """The committed blocks of `stage`/`key` in order from block 0, as (tensors, record),
        each hashed while read; it stops at the first block that is missing or damaged (that
        block and the later ones are computed again)."""
        import safetensors.torch

        self.ref(stage, key)
        block = 0
        while True:
            path = f"{self._dir(stage, key)}/{_part(block)}"
            raw = self._if_present(f"reading {self._uri(path)}.json",
                                   functools.partial(self.fs.cat_file, f"{path}.json"))
            if raw is None:
                return
            record = _json_or_none(raw)
            if not (isinstance(record, dict) and record.get("block") == block
                    and isinstance(record.get("sha256"), str)):
                log.warning("block %d of %s/%s has a damaged record; computing from it",
                            block, stage, key)
                return
            with self._local_copy(f"{path}.safetensors") as local:
                if local is None or file_sha256(local) != record["sha256"]:
                    log.warning("block %d of %s/%s is missing or damaged; computing from it",
                                block, stage, key)
                    return
                tensors = safetensors.torch.load_file(local)
            yield tensors, record
            block += 1

    def drop_parts(self, stage: str, key: str) -> None:
        """Remove the finished blocks of `stage`/`key` (once its artifact is committed)."""
        folder = self._dir(stage, key)
        action = f"removing the blocks of {self._uri(folder)}"
        for path in self._if_present(action, lambda: self.fs.ls(folder, detail=False), []):
            if _PART_RE.fullmatch(path.rsplit("/", 1)[-1]):
                with self._guard(action), contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(path)

    # -- leases: who computes an artifact now -------------------------------------------------
    # A lease is generation n of `.leases/<stage>/<key>/`, made by `create` (only one writer
    # makes a given generation). The highest generation is the lease; its holder rewrites it to
    # extend it. An expired one is taken over by making the next generation, never by deleting:
    # two runs taking over the same dead lease race for one create, and one wins.
    def take_lease(self, stage: str, key: str, owner: dict, seconds: float
                   ) -> tuple[int | None, dict | None]:
        """Try to take the lease of `stage`/`key` for `seconds`: (its generation, None) when
        taken, (None, the holder's lease) when someone holds a live one. `owner` is what the
        lease records of its holder ({"owner": id, ...}); `expired(lease)` says whether a
        holder's lease may be taken over."""
        self.ref(stage, key)
        generation, current = self._lease(stage, key)
        if current is not None and not expired(current):
            return None, current
        generation = 0 if generation is None else generation + 1
        lease = {**owner, "stage": stage, "key": key, "generation": generation,
                 **_expiry(seconds)}
        if self.create(_lease_name(stage, key, generation), json.dumps(lease).encode()):
            return generation, None
        return None, self._lease(stage, key)[1] or {}

    def renew_lease(self, stage: str, key: str, generation: int, owner: dict, seconds: float
                    ) -> bool:
        """Extend a lease this holder took: False (and nothing written) when it is no longer
        the holder's (another run took it over after it expired)."""
        latest, current = self._lease(stage, key)
        if latest != generation or (current or {}).get("owner") != owner["owner"]:
            return False
        lease = {**current, **_expiry(seconds)}
        path = f"{self._base}/{_lease_name(stage, key, generation)}"
        self._put(path, json.dumps(lease).encode(), f"renewing the lease {self._uri(path)}")
        return True

    def release_lease(self, stage: str, key: str, generation: int) -> None:
        """Give a lease up. Once the artifact is committed its leases go: a taker finds the
        commit and computes nothing. Before that (the holder failed), generation numbers must
        only grow, or a taker that read an older generation could make the same number as the
        next one: while this generation is the highest it stays, rewritten as expired, and only
        the generations below it go."""
        folder = f"{self._base}/{_lease_dir(stage, key)}"
        committed = self.exists(stage, key)
        action = f"releasing the lease of {stage}/{key}"
        generations = self._lease_generations(folder)
        latest = max(generations, default=None)
        keep = generation if latest == generation and not committed else None
        for n in generations:
            if n <= generation and n != keep:
                with self._guard(action), contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(f"{folder}/{n}.json")
        if keep is not None:
            current = self._lease(stage, key)[1] or {}
            self._put(f"{folder}/{generation}.json",
                      json.dumps({**current, "expires": 0, "released": True}).encode(), action)
        elif self.local:  # the folder, and its stage's, once empty (a taker makes it again)
            _remove_empty(folder, f"{self._base}/.leases")

    def lease(self, stage: str, key: str) -> dict | None:
        """The current lease of `stage`/`key` (live or expired), None when there is none."""
        self.ref(stage, key)
        return self._lease(stage, key)[1]

    def _lease(self, stage: str, key: str) -> tuple[int | None, dict | None]:
        """(highest generation, its lease; {"expires": 0} when unreadable) or (None, None)."""
        folder = f"{self._base}/{_lease_dir(stage, key)}"
        generations = self._lease_generations(folder)
        if not generations:
            return None, None
        n = max(generations)
        raw = self._if_present(f"reading the lease {self._uri(folder)}/{n}.json",
                               lambda: self.fs.cat_file(f"{folder}/{n}.json"))
        if raw is None:  # released meanwhile
            return self._lease(stage, key)
        lease = _json_or_none(raw)
        return n, lease if isinstance(lease, dict) else {"expires": 0}

    def _lease_generations(self, folder: str) -> list[int]:
        names = self._if_present(f"listing {self._uri(folder)}",
                                 lambda: self.fs.ls(folder, detail=False), [])
        found = (_LEASE_RE.fullmatch(n.rsplit("/", 1)[-1]) for n in names)
        return [int(m.group(1)) for m in found if m]

    # -- pins: what the runs in progress need -----------------------------------------------
    # A run pins every key of its plan while it runs (`.pins/<id>.json`, renewed by its holder
    # like a lease): `remove` never takes a pinned key, nor anything upstream of one, so a
    # garbage collection during a long sweep leaves it the calibration it will read next.
    def pin(self, keys: Iterable[str], owner: dict, seconds: float) -> str:
        """Pin `keys` for `seconds` on behalf of `owner` ({"owner": 32 hex characters, ...}, as
        for a lease); returns the pin's name for `unpin`. Pinning the same keys for the same
        owner again extends the pin (and writes it again if it went missing)."""
        name = f".pins/{owner['owner']}.json"
        if not _PIN_RE.fullmatch(name.rsplit("/", 1)[-1]):
            raise ConfigError(f"a pin's owner must be 32 hex characters, got {owner['owner']!r}")
        record = {**owner, "keys": sorted({_check_key(k) for k in keys}), **_expiry(seconds)}
        path = f"{self._base}/{name}"
        self._put(path, json.dumps(record).encode(), f"writing the pin {self._uri(path)}")
        return name

    def clock_offset(self, name: str, before: float, after: float) -> float | None:
        """Seconds by which the store's clock runs ahead of this machine's (negative: behind),
        from the time the store gave `name`, a file this machine wrote between its POSIX
        seconds `before` and `after`: 0 when the store's time falls in that window (give or
        take the whole seconds S3 keeps). None where the store keeps no times."""
        path = f"{self._base}/{name}"
        info = self._if_present(f"reading the time of {self._uri(path)}",
                                lambda: self.fs.info(path))
        modified = _mtime(info) if isinstance(info, Mapping) else None
        if modified is None:
            return None
        if before - 1 <= modified <= after + 1:
            return 0.0
        return modified - (after if modified > after else before)

    def unpin(self, name: str) -> None:
        path = f"{self._base}/{name}"
        with self._guard(f"removing the pin {self._uri(path)}"), \
                contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

    def pins(self) -> list[dict]:
        """The live pins (expired or unreadable ones are left out)."""
        folder = f"{self._base}/.pins"
        names = self._if_present(f"listing {self._uri(folder)}",
                                 lambda: self.fs.ls(folder, detail=False), [])
        paths = [n for n in names if _PIN_RE.fullmatch(n.rsplit("/", 1)[-1])]
        raw = self._cat(paths, f"reading the pins under {self._uri(folder)}", "pin")
        records = (_json_or_none_of(b) for b in raw.values())
        return [r for r in records if isinstance(r, dict) and isinstance(r.get("keys"), list)
                and not expired(r)]

    def in_use(self) -> set[str]:
        """Keys that runs in progress need: those of live pins, and of live leases with the
        upstream keys they record."""
        self._not_a_file()
        keys = {k for pin in self.pins() for k in pin["keys"] if isinstance(k, str)}
        for folder, (_files, latest) in self._leases().items():
            if isinstance(latest, dict) and not expired(latest):
                keys.add(folder.rsplit("/", 1)[-1])
                upstream = latest.get("upstream")
                if isinstance(upstream, list):
                    keys.update(k for k in upstream if isinstance(k, str))
        return keys

    def remove_stale(self, *, older_than: timedelta | None = None,
                     dry_run: bool = False) -> list[str]:
        """Delete the pins and lease files that ended more than `older_than` ago (any that
        ended, if None): those of runs that ended without removing them (a crash) and released
        leases of stages that were never computed again. Ones that do not parse go by their
        age (one that cannot be read stops the collection, as it may be live). A run that takes
        a lease meanwhile makes a file this call did not list, which stays. Returns the URIs."""
        self._not_a_file()
        cutoff = _cutoff(older_than)
        now = datetime.now(UTC).timestamp()
        limit = now if cutoff is None else min(cutoff, now)

        def ended(record, info) -> bool:
            if isinstance(record, dict) and isinstance(record.get("expires"), int | float):
                return expired(record) and record["expires"] <= limit
            modified = _mtime(info)  # unreadable: its age
            return modified is not None and modified <= limit

        folder = f"{self._base}/.pins"
        pins = {p: i for p, i in self._if_present(
            f"listing {self._uri(folder)}", lambda: self.fs.find(folder, detail=True),
            {}).items() if _PIN_RE.fullmatch(p.rsplit("/", 1)[-1])}
        raw = self._cat(list(pins), f"reading the pins under {self._uri(folder)}", "pin")
        stale = [p for p, info in pins.items() if ended(_json_or_none_of(raw.get(p)), info)]
        for files, latest in self._leases().values():
            newest = max(files, key=_generation)
            if ended(latest, files[newest]):
                stale += list(files)
        stale += self._leftovers(min(limit, (datetime.now(UTC) - LEFTOVER_MIN_AGE).timestamp()))
        if not dry_run:
            for path in stale:
                with self._guard(f"removing {self._uri(path)}"), \
                        contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(path)
            if self.local:  # lease folders, and their stages', once empty (any run's)
                top = f"{self._base}/.leases"
                for lease_folder, _, _ in sorted(os.walk(top), reverse=True):
                    if lease_folder != top:
                        _remove_empty(lease_folder, top)
        return sorted(self._uri(p) for p in stale)

    def _leftovers(self, limit: float) -> list[str]:
        """Temporary files of killed writes (`_LEFTOVER_RE`) under `.pins`, `.leases` and at
        the root, last modified at or before `limit` (POSIX seconds)."""
        found = {}
        for folder in (f"{self._base}/.pins", f"{self._base}/.leases"):
            found.update(self._if_present(f"listing {self._uri(folder)}",
                                          lambda f=folder: self.fs.find(f, detail=True), {}))
        top = self._if_present(f"listing {self.root}",
                               lambda: self.fs.ls(self._base, detail=True), [])
        found.update({info["name"]: info for info in top})
        old = []
        for path, info in found.items():
            modified = _mtime(info)
            if (_LEFTOVER_RE.fullmatch(path.rsplit("/", 1)[-1]) and modified is not None
                    and modified <= limit and info.get("type", "file") == "file"):
                old.append(path)
        return old

    def _leases(self) -> dict[str, tuple[dict, Any]]:
        """Every lease folder `.leases/<stage>/<key>`: ({generation file: listing info}, the
        parsed highest generation, the lease, or None when unreadable), in one listing and one
        batched read."""
        folder = f"{self._base}/.leases"
        found = self._if_present(f"listing {self._uri(folder)}",
                                 lambda: self.fs.find(folder, detail=True), {})
        folders: dict[str, dict] = {}
        for path, info in found.items():
            parts = path.rsplit("/", 3)[-3:]
            if (len(parts) == 3 and _LEASE_RE.fullmatch(parts[2])
                    and _STAGE_RE.fullmatch(parts[0]) and _KEY_RE.fullmatch(parts[1])):
                folders.setdefault(path.rsplit("/", 1)[0], {})[path] = info
        newest = {f: max(files, key=_generation) for f, files in folders.items()}
        raw = self._cat(list(newest.values()), f"reading the leases under {self._uri(folder)}",
                        "lease")
        return {f: (files, _json_or_none_of(raw.get(newest[f]))) for f, files in folders.items()}

    def _cat(self, paths: list[str], action: str, what: str) -> dict:
        """{path: bytes, or FileNotFoundError where it went meanwhile} of many `what` files
        (pins, leases) in one call. Any other failure to read one raises StoreError: a pin or
        lease that cannot be read may be live, and must not count as none."""
        if not paths:
            return {}
        with self._guard(action):
            raw = self.fs.cat(paths, on_error="return")
        for path, blob in raw.items():
            if isinstance(blob, Exception) and not isinstance(blob, FileNotFoundError):
                raise self._error(f"reading the {what} {self._uri(path)}", blob)
        return raw

    def needed(self) -> set[str]:
        """`in_use`, with everything upstream of those keys: what `remove` never takes."""
        keys = self.in_use()
        if not keys:
            return set()
        return _with_upstream(keys, {e.ref.key: e.meta for e in self._scan() if e.meta})

    def create(self, name: str, data: bytes) -> bool:
        """Write `data` to `<root>/<name>` only if nothing is there yet: True when this call
        created it, False when it existed (an exclusive create locally, a conditional PUT on
        S3: two writers racing for one name never both win)."""
        path = f"{self._base}/{name}"
        with self._guard(f"creating {self._uri(path)}"):
            if self.local:  # written beside it, then linked: a reader never sees a part
                return _create_local(path, data)
            try:
                self.fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                return False
        return True

    def discard(self, stage: str, key: str) -> bool:
        """Remove an artifact (meta.json first, so it never looks committed while half-deleted).

        Returns False when there was nothing to remove.
        """
        ref = self.ref(stage, key)
        folder = self._dir(stage, key)
        self._not_a_file()
        if not self._if_present(f"removing {ref.uri}", lambda: self.fs.find(folder)):
            return False
        self._uncommit(folder)
        with self._guard(f"removing {ref.uri}"):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(folder, recursive=True)
            with contextlib.suppress(OSError):  # the stage folder, once it is empty
                if self.local:
                    os.rmdir(os.path.dirname(folder))
        log.debug("discarded %s", ref.uri)
        return True

    def remove(
        self,
        stage: str | None = None,
        *,
        older_than: timedelta | None = None,
        keep: Iterable[str] = (),
        committed: bool = True,
        incomplete: bool = False,
        dry_run: bool = False,
        busy: list[ArtifactRef] | None = None,
    ) -> list[ArtifactRef]:
        """Remove many artifacts at once; returns what was removed (or would be, if `dry_run`).

        Candidates are the artifacts of `stage` (all stages if None), created more than
        `older_than` ago (any age if None), except the keys in `keep` and, transitively, the
        keys their meta lists under 'upstream'. `committed` and `incomplete` say which kinds
        are candidates: committed artifacts, and folders without a usable meta.json (their age
        is their newest file's). `remove(keep=[final keys], incomplete=True)` is a garbage
        collection; `remove(committed=False, incomplete=True)` clears interrupted saves only.
        What runs in progress need (`in_use`: the keys they pinned, and transitively their
        upstream, and artifacts under a live lease, such as a stage's finished blocks) is never
        taken; `busy`, when given, receives those candidates.
        """
        if stage is not None:
            check_stage(stage)
        cutoff = _cutoff(older_than)
        if isinstance(keep, str):
            raise ConfigError("keep must be a list of artifact keys, not one string")
        keep = {_check_key(k) for k in keep}
        needed = self.in_use()

        entries = self._scan(None if keep or needed else stage)
        metas = {e.ref.key: e.meta for e in entries if e.meta}
        protected = _with_upstream(keep, metas)
        needed = _with_upstream(needed, metas)
        chosen = []
        for e in entries:
            if (stage is not None and e.ref.stage != stage) or e.ref.key in protected:
                continue
            if not (incomplete if e.meta is None else committed):
                continue
            if cutoff is not None:
                when = _created(e.meta) if e.meta is not None else e.modified
                if when is None or when > cutoff:
                    continue
            if e.ref.key in needed:
                if busy is not None:
                    busy.append(e.ref)
                continue
            chosen.append(e.ref)
        if not dry_run and chosen:
            # a run may have pinned its keys while the store was scanned: look once more
            again = _with_upstream(self.in_use(), metas)
            for ref in [r for r in chosen if r.key in again]:
                chosen.remove(ref)
                if busy is not None:
                    busy.append(ref)
            for ref in chosen:
                self.discard(ref.stage, ref.key)
        return chosen

    # -- reading --------------------------------------------------------------------------------
    def exists(self, stage: str, key: str) -> bool:
        """True when meta.json parses and the tensors file has the recorded size: the commit
        record only, never the tensors (`load` hashes them)."""
        return self.committed_meta(stage, key) is not None

    def committed_meta(self, stage: str, key: str) -> dict | None:
        """The meta.json of `stage`/`key` when the artifact is committed (`exists`), else None:
        one read of the commit record and the tensors file's size, never the tensors."""
        self.ref(stage, key)
        meta = self._read_meta(stage, key)
        if isinstance(meta, str):
            return None
        path = f"{self._dir(stage, key)}/{TENSORS}"
        size = self._if_present(f"reading {self._uri(path)}", lambda: self.fs.size(path))
        return meta if size == meta["bytes"] else None

    def load_meta(self, stage: str, key: str) -> dict:
        """The committed meta.json of `stage`/`key`; CorruptArtifactError if there is none."""
        ref = self.ref(stage, key)
        meta = self._read_meta(stage, key)
        if isinstance(meta, str):
            damage = f"artifact {ref.uri} cannot be used: {meta}"
            raise CorruptArtifactError(
                f"{damage}; recompute it (discard({stage!r}, {key!r}) clears what is left)",
                damage)
        return meta

    def load(self, stage: str, key: str, verify: bool = True) -> tuple[dict, dict]:
        """The tensors (on CPU) and meta of `stage`/`key`.

        Raises CorruptArtifactError when meta.json is missing or unreadable, the tensors file is
        missing or has the wrong size, or (with `verify`) its sha256 differs from the record.
        """
        import safetensors.torch

        ref = self.ref(stage, key)
        meta = self.load_meta(stage, key)

        def corrupt(why: str) -> CorruptArtifactError:
            damage = f"artifact {ref.uri} is corrupt: {why}"
            return CorruptArtifactError(
                f"{damage}; recompute it (discard({stage!r}, {key!r}) removes the damaged copy)",
                damage)

        def read(fn, path):
            try:
                return fn(path)
            except FileNotFoundError:
                raise corrupt("its tensors file is missing") from None
            except OSError as exc:
                raise self._error(f"reading {ref.uri}", exc) from exc

        with self._local_copy(f"{self._dir(stage, key)}/{TENSORS}") as path:
            if path is None:
                raise corrupt("its tensors file is missing")
            size = read(os.path.getsize, path)
            if size != meta["bytes"]:
                raise corrupt(f"its tensors file has {size} bytes; meta.json says {meta['bytes']}")
            if verify and read(file_sha256, path) != meta["sha256"]:
                raise corrupt("the sha256 of its tensors file differs from meta.json")
            try:
                tensors = safetensors.torch.load_file(path)
            except Exception as exc:  # the safetensors reader raises its own error types
                raise corrupt(f"its tensors file cannot be read ({type(exc).__name__})") from exc
        if sorted(tensors) != sorted(meta["tensor_names"]):
            raise corrupt("its tensor names differ from meta.json")
        return tensors, meta

    def list(self, stage: str | None = None) -> list[dict]:
        """The metas of the committed artifacts (of one stage, or all), by stage and age."""
        metas = [e.meta for e in self._scan(stage) if e.meta is not None]
        return sorted(metas, key=lambda m: (m["stage"], str(m.get("created", "")), m["key"]))

    def incomplete(self, stage: str | None = None) -> list[ArtifactRef]:
        """Folders that hold files but no usable commit: interrupted saves, damaged metas."""
        return [e.ref for e in self._scan(stage) if e.meta is None]

    def strays(
        self, stage: str | None = None, *, older_than: timedelta | None = None
    ) -> list[str]:
        """Files inside committed artifacts that are not part of them (the temporary file of a
        save that was killed), older than `older_than` if given, and never younger than
        `LEFTOVER_MIN_AGE` (a live save's temporary, whatever `older_than` says): what
        `remove_strays` deletes."""
        return self.remove_strays(stage, older_than=older_than, dry_run=True)

    def remove_strays(
        self, stage: str | None = None, *, older_than: timedelta | None = None,
        dry_run: bool = False
    ) -> list[str]:
        """Delete `strays(stage, older_than=...)`; returns their URIs. The artifacts stay."""
        cutoff = _cutoff(older_than)
        limit = (datetime.now(UTC) - LEFTOVER_MIN_AGE).timestamp()
        limit = limit if cutoff is None else min(cutoff, limit)
        paths = sorted(path for e in self._scan(stage) if e.meta is not None
                       for path, mtime in e.strays.items()
                       if mtime is not None and mtime <= limit)
        if not dry_run:
            for path in paths:
                with self._guard(f"removing {self._uri(path)}"):
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm_file(path)
        return [self._uri(p) for p in paths]

    # -- internals ------------------------------------------------------------------------------
    def check_root(self) -> None:
        """Raise StoreError when the store root is a file, not a folder (reads only)."""
        self._not_a_file()

    def _not_a_file(self) -> None:
        with self._guard(f"reading {self.root}"):
            if self.fs.isfile(self._base):
                raise StoreError(
                    f"store root {self.root} is a file, not a folder; choose another store root"
                )

    def _dir(self, stage: str, key: str) -> str:
        return f"{self._base}/{stage}/{key}"

    def _uri(self, path: str) -> str:
        return path if self.local else f"{self.protocol}://{path.lstrip('/')}"

    def _read_meta(self, stage: str, key: str) -> dict | str:
        """The parsed, consistent meta.json, or the reason there is none."""
        path = f"{self._dir(stage, key)}/{META}"
        raw = self._if_present(f"reading {self._uri(path)}", lambda: self.fs.cat_file(path))
        if raw is None:
            return "it has no meta.json (never saved, or the save was interrupted)"
        return _parse_meta(raw, stage, key)

    def _uncommit(self, folder: str) -> None:
        path = f"{folder}/{META}"
        with self._guard(f"removing {self._uri(path)}"):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)

    def _write_meta(self, folder: str, record: dict) -> None:
        """meta.json, written last: the commit of the artifact in `folder`."""
        data = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
        self._put(f"{folder}/{META}", data, f"writing {self._uri(folder)}/{META}")

    def _put(self, path: str, data: bytes, action: str) -> None:
        """`data` as the file `path`, in one step (`atomic_file`)."""
        with self._guard(action), atomic_file(self.fs, path) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)

    @contextlib.contextmanager
    def _local_copy(self, path: str) -> Iterator[str | None]:
        """A local file with the contents of `path` (None if there is no such file)."""
        if self.local:
            yield path if os.path.isfile(path) else None
            return
        fd, tmp = tempfile.mkstemp(prefix="sds-", suffix=".safetensors")
        os.close(fd)

        def download() -> str:
            self.fs.get_file(path, tmp)
            return tmp

        try:
            yield self._if_present(f"downloading {self._uri(path)}", download)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    def _scan(self, stage: str | None = None) -> list[_Entry]:
        """Every `<stage>/<key>` folder under the root (or one stage), committed or not."""
        if stage is not None:
            check_stage(stage)
        self._not_a_file()
        top = self._base if stage is None else f"{self._base}/{stage}"
        found = self._if_present(f"listing {self._uri(top)}",
                                 lambda: self.fs.find(top, detail=True), {})
        prefix = self._base.rstrip("/") + "/"
        folders: dict[tuple[str, str], dict[str, dict]] = {}
        for path, info in found.items():
            parts = path[len(prefix) :].split("/") if path.startswith(prefix) else []
            if len(parts) == 3 and _STAGE_RE.fullmatch(parts[0]) and _KEY_RE.fullmatch(parts[1]):
                folders.setdefault((parts[0], parts[1]), {})[parts[2]] = info

        meta_paths = [
            f"{self._dir(s, k)}/{META}" for (s, k), files in folders.items() if META in files
        ]
        raw: dict = {}
        if meta_paths:
            with self._guard(f"reading the meta.json files under {self._uri(top)}"):
                raw = self.fs.cat(meta_paths, on_error="return")

        entries = []
        for (s, k), files in sorted(folders.items()):
            blob = raw.get(f"{self._dir(s, k)}/{META}")
            if isinstance(blob, Exception) and not isinstance(blob, FileNotFoundError):
                # a transient read failure must not make a good artifact look removable
                raise self._error(f"reading {self._uri(self._dir(s, k))}", blob)
            meta = _parse_meta(blob, s, k) if isinstance(blob, bytes) else None
            if not isinstance(meta, dict) or files.get(TENSORS, {}).get("size") != meta["bytes"]:
                meta = None
            times = [t for t in (_mtime(i) for i in files.values()) if t is not None]
            strays = {
                f"{self._dir(s, k)}/{name}": _mtime(info)
                for name, info in files.items()
                if name not in (TENSORS, META)
            }
            entries.append(_Entry(self.ref(s, k), meta, max(times) if times else None, strays))
        return entries

    # -- errors ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        """Turn storage failures into StoreError with a cause and a fix."""
        try:
            yield
        except SDSError:
            raise
        except Exception as exc:
            raise self._error(action, exc) from exc

    def _if_present(self, action: str, read: Callable[[], Any], missing: Any = None) -> Any:
        """`read()` under `_guard(action)`, or `missing` when the file or folder it reads is
        absent (the caller decides what that means); a missing bucket is still a StoreError."""
        with self._guard(action):
            try:
                return read()
            except FileNotFoundError as exc:
                if _is_missing_bucket(exc):
                    raise
                return missing

    def _error(self, action: str, exc: BaseException) -> StoreError:
        """The StoreError for `exc` (StoreFullError when the storage is full)."""
        return (StoreFullError if no_space(exc) else StoreError)(self._explain(action, exc))

    def _explain(self, action: str, exc: BaseException) -> str:
        """One line: what failed, why, and what to do about it."""
        if _is_missing_credentials(exc):
            cause, fix = "no AWS credentials were found", _CREDENTIALS_FIX
        elif isinstance(exc, PermissionError):
            cause = f"access to {self.root} was denied (permission denied)"
            fix = ("check that the credentials or file permissions allow listing, reading, "
                   "writing and deleting under it, or choose another store root")
        elif _is_missing_bucket(exc):
            bucket = self._base.lstrip("/").split("/")[0]
            cause = f"bucket {bucket!r} does not exist at {self._endpoint()}"
            fix = f"create it (e.g. `aws s3 mb s3://{bucket}`) or correct the store root"
        elif _is_connection_problem(exc):
            cause = f"cannot reach {self._endpoint()}"
            fix = "check the endpoint (for S3: AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3) and " \
                  "the network, then retry"
        elif no_space(exc):
            cause, fix = "no space left on the device", "free some space, or use another root"
        elif isinstance(exc, OSError) and exc.errno in (errno.ENOTDIR, errno.EISDIR):
            cause = f"a part of {self.root} is a file where a folder should be, or the reverse"
            fix = "choose another store root"
        elif isinstance(exc, OSError) and exc.errno == errno.EROFS:
            cause, fix = "the file system is read-only", "choose another store root"
        else:
            cause = "the storage operation failed"
            fix = (f"retry; if it keeps failing, check that {self.root} can be listed, read "
                   "and written (`sds store ls --store ROOT` lists it)")
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        return _redact(f"{action}: {cause} ({detail}); {fix}")

    def _endpoint(self) -> str:
        """The service behind the root, for messages: its endpoint URL without credentials."""
        client = getattr(self._fs, "_s3", None)
        url = getattr(getattr(client, "meta", None), "endpoint_url", None)
        if url is None and self.protocol in ("s3", "s3a"):
            url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            url = url or "the default AWS S3 endpoint"
        if not url:
            return self.root
        try:
            parts = urlsplit(url)
            host = parts.hostname or ""
            port = f":{parts.port}" if parts.port else ""
            return f"{parts.scheme}://{host}{port}{parts.path}" if parts.scheme else url
        except ValueError:
            return "the configured endpoint"


# -- helpers ------------------------------------------------------------------------------------
def _lease_dir(stage: str, key: str) -> str:
    return f".leases/{stage}/{key}"


def _lease_name(stage: str, key: str, generation: int) -> str:
    return f"{_lease_dir(stage, key)}/{generation}.json"


def _expiry(seconds: float) -> dict:
    """The expiry fields of a lease `seconds` from now (POSIX seconds, and for people)."""
    until = datetime.now(UTC) + timedelta(seconds=seconds)
    return {"expires": until.timestamp(), "until": until.isoformat(timespec="seconds")}


@functools.cache
def pid_namespace() -> str | None:
    """Which process ids this process sees: the boot and the pid namespace (containers that
    share a host name need not share process ids). None where /proc does not say."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def expired(lease: Mapping) -> bool:
    """Whether a lease (or a pin) may be taken over: past its expiry, or held by a process of
    this host and pid namespace that is gone (a killed run's lease need not be waited out on
    its own machine). A holder that recorded no namespace is waited out."""
    expires = lease.get("expires")
    if not isinstance(expires, int | float) or expires <= datetime.now(UTC).timestamp():
        return True
    pid = lease.get("pid")
    here = lease.get("host") == socket.gethostname() and lease.get("pidns") == pid_namespace()
    if here and pid_namespace() is not None and isinstance(pid, int) and pid > 0:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # alive, someone else's
            return False
    return False


def _part(block: int) -> str:
    """The file name (without its suffix) of a stage's finished block."""
    return f"block-{block:05d}"


def _prepare_tensors(tensors: Any) -> dict:
    """Detached, contiguous CPU tensors that share no storage (what safetensors can write)."""
    import torch

    if not isinstance(tensors, Mapping):
        raise ConfigError(
            f"tensors must be a dict of name -> torch.Tensor (it may be empty), "
            f"not {type(tensors).__name__}"
        )
    out: dict = {}
    storages: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ConfigError(f"tensor name {_short(name)} is not valid: use a non-empty string")
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.layout != torch.strided or t.is_meta:
            raise ConfigError(f"tensor {name!r} has no dense data ({t.layout}, {t.device})")
        t = t.detach().to("cpu").contiguous()
        if t.numel():
            if t.untyped_storage().data_ptr() in storages:
                t = t.clone()  # tied or overlapping views: safetensors refuses shared memory
            storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _prepare_meta(meta: Any) -> dict:
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise ConfigError(f"meta must be a dict, not {type(meta).__name__}")
    clash = sorted(_RESERVED.intersection(meta))
    if clash:
        raise ConfigError(f"meta fields {clash} are written by the store; rename them")
    meta = dict(meta)
    try:
        json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"meta cannot be written as JSON ({exc}); use str, numbers, bools, lists and dicts"
        ) from exc
    return meta


def _parse_meta(raw: bytes, stage: str, key: str) -> dict | str:
    """The meta.json of `stage`/`key` if it is complete and consistent, else why not."""
    try:
        meta = json.loads(raw)
    except ValueError:  # includes UnicodeDecodeError
        return "its meta.json is not valid JSON"
    if not isinstance(meta, dict):
        return "its meta.json is not a JSON object"
    if meta.get("stage") != stage or meta.get("key") != key:
        return "its meta.json names another stage or key"
    sha = meta.get("sha256")
    size = meta.get("bytes")
    names = meta.get("tensor_names")
    if not (isinstance(sha, str) and _SHA256_RE.fullmatch(sha)):
        return "its meta.json has no valid sha256"
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return "its meta.json has no valid byte count"
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        return "its meta.json has no valid tensor_names"
    # the record's own checksum: an evaluation's whole result is its meta.json (its tensors
    # file is empty), so a changed number must not pass; records from before it carry none
    if "meta_sha256" in meta and meta["meta_sha256"] != _meta_digest(meta):
        return "its meta.json does not match its checksum (meta_sha256)"
    return meta


def _meta_digest(record: dict) -> str:
    """sha256 of a commit record's fields but `meta_sha256`, as canonical JSON of what reading
    the record back gives (keys that JSON turns into strings, e.g. ints, hash as read)."""
    fields = json.loads(json.dumps({k: v for k, v in record.items() if k != "meta_sha256"}))
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))  # ASCII: any string
    return hashlib.sha256(text.encode()).hexdigest()


def _with_upstream(keys: set[str], metas: Mapping[str, dict]) -> set[str]:
    """`keys` and every key reachable from them through meta['upstream']."""
    seen: set[str] = set()
    todo = list(keys)
    while todo:
        k = todo.pop()
        if k in seen:
            continue
        seen.add(k)
        upstream = (metas.get(k) or {}).get("upstream")
        if isinstance(upstream, list):
            todo.extend(u for u in upstream if isinstance(u, str))
    return seen


def _cutoff(older_than: timedelta | None) -> float | None:
    """The POSIX time before which something is older than `older_than` (None: any age)."""
    if older_than is None:
        return None
    if not (isinstance(older_than, timedelta) and older_than >= timedelta(0)):
        raise ConfigError(f"older_than {older_than!r} must be a non-negative timedelta")
    return (datetime.now(UTC) - older_than).timestamp()


def _generation(path: str) -> int:
    """The generation n of a lease file `.../<n>.json`."""
    return int(path.rsplit("/", 1)[-1].removesuffix(".json"))


def _json_or_none_of(raw: Any) -> Any:
    """The parsed JSON of what `fs.cat` returned for a file, or None (an error, not JSON)."""
    return _json_or_none(raw) if isinstance(raw, bytes) else None


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:  # includes UnicodeDecodeError
        return None


def _created(meta: dict) -> float | None:
    try:
        return datetime.fromisoformat(meta["created"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return None


def _mtime(info: Mapping[str, Any]) -> float | None:
    """A listing entry's modification time (POSIX seconds), as each backend spells it."""
    for name in ("mtime", "LastModified", "created"):
        value = info.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
    return None


def _create_local(path: str, data: bytes) -> bool:
    """`data` as the local file `path` only if it is absent, complete from its first moment."""
    folder = os.path.dirname(path)
    for attempt in range(3):  # a release may remove the folder once it is empty: make it again
        try:  # (also its parent, the stage's folder, while makedirs makes the folder in it)
            _makedirs(folder)
            fd, tmp = tempfile.mkstemp(prefix=".sds-", suffix=".tmp", dir=folder)
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        plain_mode(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        _fsync_dir(folder)
        return True
    finally:
        os.remove(tmp)


def _remove_empty(folder: str, top: str) -> None:
    """Remove the local folder `folder` and its parents below `top` while they are empty."""
    while folder != top and folder.startswith(top + "/"):
        try:
            os.rmdir(folder)
        except OSError:  # not empty (a run took a lease meanwhile), or gone
            return
        folder = os.path.dirname(folder)


def _makedirs(folder: str) -> None:
    """`os.makedirs(folder, exist_ok=True)`, where a file in the folder's place is said as
    such (NotADirectoryError: a fault that retrying meets again), not as a FileExistsError."""
    try:
        os.makedirs(folder, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(errno.ENOTDIR, "a file is where a folder should be",
                                 folder) from None


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        _fsync(path)


@functools.cache
def _versions() -> dict[str, str]:
    import safetensors
    import torch

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
    }
    with contextlib.suppress(metadata.PackageNotFoundError):
        out["sds"] = metadata.version("sds")
    return out


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a local file, hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _s3_options(connect_timeout: float) -> dict:
    """s3fs settings: our own timeouts, credentials read afresh, no listing cache (other
    machines write here too), and few retries (the orchestration retries a StoreError)."""
    return {
        "session": _aws_session(),
        "skip_instance_cache": True,
        "use_listings_cache": False,
        "config_kwargs": {
            "connect_timeout": connect_timeout,
            "retries": {"max_attempts": 2, "mode": "standard"},
        },
    }


def _aws_session():
    """A fresh AWS session (credentials are looked up anew) sharing one loader of the service
    descriptions, which otherwise costs about half a second per store."""
    from aiobotocore.session import AioSession

    session = AioSession()
    session.register_component("data_loader", _aws_loader())
    return session


@functools.cache
def _aws_loader():
    import botocore.loaders

    return botocore.loaders.create_loader()


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from or while handling (at most 8)."""
    seen = 0
    while exc is not None and seen < 8:
        yield exc
        exc = exc.__cause__ or exc.__context__
        seen += 1


def _is_missing_bucket(exc: BaseException) -> bool:
    for e in _causes(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") == "NoSuchBucket":
            return True
        if isinstance(e, FileNotFoundError) and "bucket does not exist" in str(e):
            return True
    return False


def _is_missing_credentials(exc: BaseException) -> bool:
    try:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError
    except ImportError:
        return False
    return any(isinstance(e, NoCredentialsError | PartialCredentialsError) for e in _causes(exc))


def _is_connection_problem(exc: BaseException) -> bool:
    kinds: tuple[type, ...] = (ConnectionError, TimeoutError, socket.gaierror)
    with contextlib.suppress(ImportError):
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        kinds += (BotoConnectionError, HTTPClientError)
    with contextlib.suppress(ImportError):
        import aiohttp

        kinds += (aiohttp.ClientError,)
    return any(isinstance(e, kinds) for e in _causes(exc))


def no_space(exc: BaseException) -> bool:
    """A full disk (or quota) anywhere in the chain of causes."""
    return any(
        (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
        or "No space left" in str(e)  # safetensors reports I/O errors in its message
        for e in _causes(exc)
    )


def _redact_userinfo(url: str) -> str:
    parts = urlsplit(url)
    return url.replace(f"{parts.netloc}", parts.hostname or "", 1) if parts.netloc else url


def _redact(text: str) -> str:
    """Belt and braces: no secret from the environment ever reaches a message."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
