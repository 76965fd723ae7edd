"""The final model as an ordinary Hugging Face folder (`from_pretrained` loads it).

One plain function, without Prefect: the flows call it through their `export` task
(`tasks.stages.export_model`), and the command line calls it directly when it answers a fully
cached run from the store.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from .common import load_base, load_or_discard
from .plan import StageSpec
from .store import ArtifactStore, no_space, plain_mode

MARKER = "sds_artifact.json"


def write_model(spec: StageSpec, final: dict, folder: str) -> str:
    """Write the base model with the final stage's weights to `folder`; its resolved path.

    Skipped when the folder already holds this artifact (its marker names the same store, key
    and sha256, and every file the marker lists is there with its recorded size; nothing heavy
    is imported then); replaced atomically otherwise.
    """
    target = Path(folder).expanduser().resolve()
    marker = {"store": spec.store, "stage": spec.stage, "key": spec.key,
              "sha256": final.get("sha256")}
    if _holds(target, marker):
        _remove_leftovers(target)  # a killed export's, though this one writes nothing
        return str(target)
    check_replaceable(target)
    # an earlier run's model goes before any work: an export that fails or is killed from
    # here on leaves no model/ (the caller has removed results.json), never one that another
    # configuration wrote
    _set_aside(target)
    from sds.models import load_layer_state

    # hashed while read unless the run trusts sizes; a damaged artifact is discarded
    # (UpstreamLostError), and the flow computes it again
    tensors = load_or_discard(ArtifactStore(spec.store), spec.stage, spec.key, spec.run.verify)
    model, tokenizer = load_base(spec)
    load_layer_state(model, tensors, assign=True)  # the tensors themselves: no copy
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        files = {str(p.relative_to(staging)): p.stat().st_size
                 for p in sorted(staging.rglob("*")) if p.is_file()}
        (staging / MARKER).write_text(json.dumps({**marker, "files": files}, indent=2) + "\n")
        # the folder (mkdtemp) and some files (transformers writes weights through a
        # temporary file) are private to this user: give them a plain mkdir's and open's mode
        for path in [staging, *staging.rglob("*")]:
            plain_mode(path, folder=path.is_dir())
        _set_aside(target)
        os.replace(staging, target)
    except Exception as exc:
        if not (isinstance(exc, OSError) or no_space(exc)):
            raise
        # the bare OSError names neither the folder nor what to do: the store's are explained
        raise OSError(errno.ENOSPC if no_space(exc) else exc.errno,
                      f"writing the model folder {target} failed "
                      f"({getattr(exc, 'strerror', None) or exc}); free space there, choose "
                      "another --out, or pass --no-export") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def check_replaceable(folder: str | os.PathLike) -> None:
    """Refuse (ConfigError) to replace `folder` unless it is absent or a model folder that sds
    wrote (it holds the marker): a folder of the user's that happens to be `<out>/model`
    stays as it is."""
    from sds.errors import ConfigError

    target = Path(folder).expanduser()
    if (target.exists() or target.is_symlink()) and not (target / MARKER).is_file():
        raise ConfigError(
            f"{target} exists and sds did not write it (it has no {MARKER}); the run would "
            "replace it with the pruned model, so nothing was changed: choose another --out, "
            "or move that folder away")


def _remove_leftovers(target: Path) -> None:
    """Remove the staging and set-aside folders (`.<name>-*`) that an export killed midway
    left beside `target` (a 7B model's are gigabytes). Exports into one folder take turns
    (`report.finish` holds its lock), so none of them is another export's work in progress."""
    # the names `write_model` gives them: mkdtemp's 8 characters, or `_set_aside`'s old-<hex>
    ours = re.compile(rf"\.{re.escape(target.name)}-(old-[0-9a-f]{{8}}|[a-z0-9_]{{8}})")
    for path in target.parent.glob(f".{target.name}-*"):
        if ours.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def _holds(target: Path, marker: dict) -> bool:
    """Whether `target` is this artifact's model folder, whole: a marker with the same fields
    and every file it lists present with its recorded size (a deleted or cut weights file
    means the folder is written again)."""
    try:
        found = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(found, dict) or {k: found.get(k) for k in marker} != marker:
        return False
    files = found.get("files")
    if not isinstance(files, dict) or not files:  # a marker of an older sds lists none
        return False
    try:
        return all((target / name).stat().st_size == size for name, size in files.items())
    except (OSError, TypeError, ValueError):
        return False


def remove_model(folder: str | os.PathLike) -> bool:
    """Remove `folder` if it is a model folder that sds wrote (it holds the marker): a run that
    exports nothing leaves no earlier run's model beside its results. A folder without the
    marker is not ours and stays. Whether it removed one."""
    target = Path(folder).expanduser()
    _remove_leftovers(target)  # a killed export's, though no model follows
    if not (target / MARKER).is_file():
        return False
    _set_aside(target)
    return True


def _set_aside(target: Path) -> None:
    """Rename `target` (if any) out of the way in one step, then delete it."""
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}-old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        if old.is_symlink():  # the link goes; what it leads to is not ours to delete
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)
