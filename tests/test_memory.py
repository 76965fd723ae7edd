"""Host memory of the stages at the points where their copies of the weights coexist.

Each case runs one stage (or the export) in a child process (`tests/memory_probe.py`) on a
small LLaMA and measures its anonymous memory (RssAnon, which no file backs) after the stage
has loaded the base model. P is the bytes of the weights the stage prunes; a 7B model's P is
13 GB in bf16, so every P here is 13 GB a user's machine must hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file()
                                or "RssAnon" not in Path("/proc/self/status").read_text(),
                                reason="measures RssAnon in /proc (Linux)")


def probe(tmp_path: Path, which: str) -> tuple[dict, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PREFECT_HOME": str(tmp_path / "prefect-home"),
           # freed tensors go back to the system at once (as a 7B model's, above glibc's
           # 32 MB ceiling, always do), so the growth counts the live copies only
           "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "memory_probe.py"),
                           str(tmp_path), which], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return {k: v / out["P"] for k, v in out["growth"].items()}, out


def checkpoint(tmp_path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(tmp_path / "model" / "model.safetensors")


def test_oneshot_holds_one_copy_of_the_pruned_weights(tmp_path):
    """The stage's result is the model's own pruned weights, not a copy beside the model."""
    from sds import magnitude

    growth, _ = probe(tmp_path, "oneshot")
    assert growth["layer_state"] < 1.5, growth  # the pruned weights once (twice before: 2.0)
    result, base = torch.load(tmp_path / "result.pt"), checkpoint(tmp_path)
    assert len(result) == 56
    for key, W in result.items():  # magnitude 2:4 of the checkpoint's weights, bit for bit
        assert torch.equal(W, magnitude(base[key], None, "2:4")), key


def test_sds_step_copies_neither_the_dense_nor_the_upstream_weights(tmp_path):
    """Step 2 and 3 hold the dense snapshot and the model with the upstream weights; neither
    needs a copy (3 P before: the snapshot, the upstream weights copied into the model, and
    the result copied out of it), and the snapshot must stay the dense weights."""
    growth, _ = probe(tmp_path, "redense")
    assert growth["load_layer_state"] < 0.5, growth
    assert growth["step"] < 1.5 and growth["layer_state"] < 1.5, growth  # what the step wrote
    result, upstream = torch.load(tmp_path / "result.pt"), torch.load(tmp_path / "upstream.pt")
    base = checkpoint(tmp_path)
    assert sorted(result) == sorted(upstream) and len(result) == 56
    for key, W in result.items():  # the probe's step: W = 0.5 W_upstream + 0.25 W_dense
        assert torch.equal(W, 0.5 * upstream[key] + 0.25 * base[key]), key


@pytest.mark.parametrize("which", ["evaluate", "export"])
def test_evaluation_and_export_take_the_stored_weights_without_a_copy(tmp_path, which):
    growth, _ = probe(tmp_path, which)
    assert growth["load_layer_state"] < 0.5, growth  # 1.0 before: a copy into the base model
    if which == "export":
        from safetensors.torch import load_file

        exported, upstream = load_file(tmp_path / "out" / "model.safetensors"), \
            torch.load(tmp_path / "upstream.pt")
        for key, W in upstream.items():
            assert torch.equal(exported[key], W), key
