"""The final model as an ordinary Hugging Face folder (`from_pretrained` loads it).

One plain function, without Prefect: the flows call it through their `export` task
(`tasks.stages.export_model`), and the command line calls it directly when it answers a fully
cached run from the store.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from .common import load_base
from .plan import StageSpec
from .store import ArtifactStore

MARKER = "sds_artifact.json"


def write_model(spec: StageSpec, final: dict, folder: str) -> str:
    """Write the base model with the final stage's weights to `folder`; its resolved path.

    Skipped when the folder already holds this artifact (its marker names the same store, key
    and sha256; nothing heavy is imported then); replaced atomically otherwise.
    """
    target = Path(folder).expanduser().resolve()
    marker = {"store": spec.store, "stage": spec.stage, "key": spec.key,
              "sha256": final.get("sha256")}
    try:
        if json.loads((target / MARKER).read_text()) == marker:
            return str(target)
    except (OSError, ValueError):
        pass
    from sds.models import load_layer_state

    tensors, _meta = ArtifactStore(spec.store).load(spec.stage, spec.key)
    model, tokenizer = load_base(spec)
    load_layer_state(model, tensors)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if target.exists():
            old = target.with_name(f".{target.name}-old-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)
