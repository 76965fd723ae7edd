"""The export of the final model (`tasks.export`): what the output folder holds after an
export that failed or was killed midway, and what its errors say."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

from tasks.store import ArtifactStore
from tests.test_pipeline_fixtures import REPO, tiny_params

pytest_plugins = ["tests.test_pipeline_fixtures"]

# write_model in a child process that dies (SIGKILL-like, os._exit) while the tokenizer is
# saved into the staging folder, after the weights: what a killed export leaves behind
KILLED_EXPORT = """
import json, os, sys
import transformers
from tasks.export import write_model
from tasks.plan import plan_pipeline
from tasks.config import RunConfig, build
transformers.PreTrainedTokenizerBase.save_pretrained = lambda *a, **k: os._exit(137)
plan = plan_pipeline(build(RunConfig, json.loads(sys.argv[1])), check=False)
write_model(plan.specs[plan.final], json.loads(sys.argv[2]), sys.argv[3])
"""


def committed_final(tiny_model, corpus, store, out, pattern: str, fill: float):
    """The plan of a tiny run with `pattern`, and a committed final artifact for it whose one
    tensor (block 0's fc1, [ffn, hidden]) is `fill` everywhere: (plan, refs)."""
    from tasks.plan import plan_pipeline

    plan = plan_pipeline(tiny_params(tiny_model, corpus, store, out, pattern=pattern),
                         check=False)
    spec = plan.specs[plan.final]
    ArtifactStore(store).save(spec.stage, spec.key,
                              {"model.decoder.layers.0.fc1.weight": torch.full((128, 64), fill)})
    _, meta = ArtifactStore(store).load(spec.stage, spec.key)
    return plan, {plan.final: {"key": spec.key, "sha256": meta["sha256"]}}


def test_a_failed_export_leaves_no_model_of_an_earlier_run(tiny_model, corpus, tmp_path,
                                                            monkeypatch):
    """Run A exports its model; run B into the same --out fails while writing its model (a
    full disk): the folder then holds neither results.json nor A's model, which B's results
    would not describe (README: "one that fails while writing model/ leaves none")."""
    import transformers
    from safetensors.torch import load_file

    from flows import report
    from tasks.export import MARKER, write_model

    store, out = tmp_path / "store", tmp_path / "out"
    plan_a, refs_a = committed_final(tiny_model, corpus, store, out, "2:4", 0.25)
    out.mkdir()
    (out / "results.json").write_text('{"run": "A"}\n')
    write_model(plan_a.specs[plan_a.final], refs_a[plan_a.final], str(out / "model"))
    weights = load_file(out / "model" / "model.safetensors")
    assert torch.equal(weights["model.decoder.layers.0.fc1.weight"], torch.full((128, 64), 0.25))
    assert json.loads((out / "model" / MARKER).read_text())["key"] == refs_a[plan_a.final]["key"]

    plan_b, refs_b = committed_final(tiny_model, corpus, store, out, "4:8", 0.5)
    assert refs_b[plan_b.final]["key"] != refs_a[plan_a.final]["key"]

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", full_disk)
    with pytest.raises(OSError, match="No space left"):
        report.finish(plan_b, refs_b, out, write_model, datetime.now(UTC), 0.0, None)
    assert sorted(p.name for p in Path(out).iterdir()) == []  # no results, no model, no staging

@pytest.mark.parametrize("next_run", ["the same run (its model is there)", "--no-export"])
def test_a_killed_exports_folders_go_with_the_next_run_into_that_out(
        next_run, tiny_model, corpus, tmp_path):
    """README: "the next export into the same --out removes the folders a killed export left
    there". Run A exports; run B is killed while writing its model, leaving its staging folder
    (a whole weights file); the next run into that --out, one that finds A's model already
    there and writes nothing, or one with --no-export, removes it."""
    from safetensors.torch import load_file

    from flows import report
    from tasks.export import write_model
    from tests.test_pipeline_fixtures import tiny_options

    store, out = tmp_path / "store", tmp_path / "out"
    out.mkdir()
    plan_a, refs_a = committed_final(tiny_model, corpus, store, out, "2:4", 0.25)
    write_model(plan_a.specs[plan_a.final], refs_a[plan_a.final], str(out / "model"))
    weights_a = (out / "model" / "model.safetensors").read_bytes()

    _, refs_b = committed_final(tiny_model, corpus, store, out, "4:8", 0.5)
    options = tiny_options(tiny_model, corpus, store, out, pattern="4:8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_EXPORT, json.dumps(options),
         json.dumps(next(iter(refs_b.values()))), str(out / "model")],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 137, killed.stderr
    (staging,) = [p for p in out.iterdir() if p.name.startswith(".model-")]
    assert torch.equal(load_file(staging / "model.safetensors")[
        "model.decoder.layers.0.fc1.weight"], torch.full((128, 64), 0.5))  # B's, left behind

    if next_run == "--no-export":
        report.finish(plan_a, _refs_of(plan_a, refs_a), out, None, datetime.now(UTC), 0.0, None)
        assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    else:
        write_model(plan_a.specs[plan_a.final], refs_a[plan_a.final], str(out / "model"))
        assert (out / "model" / "model.safetensors").read_bytes() == weights_a  # kept
        assert sorted(p.name for p in out.iterdir()) == ["model"]


def _refs_of(plan, final_refs: dict) -> dict:
    """References of every stage of `plan` enough for `report.build_results` (the final one
    committed; the others need only their key)."""
    refs = {label: {"key": spec.key, "uri": "", "computed": False, "metrics": {}}
            for label, spec in plan.specs.items()}
    refs[plan.final].update(final_refs[plan.final], uri="")
    return refs

def test_a_full_disk_while_exporting_says_which_folder_and_what_to_do(
        tiny_model, corpus, tmp_path, monkeypatch):
    """The output folder's disk fills while the model is written: one line that names the
    model folder and the fix (the bare "[Errno 28] No space left on device" reads as the
    store's), still a full disk for the exit code (3) and the retry rule (none)."""
    import transformers

    from flows.cli import exit_code, one_line
    from tasks.common import is_transient
    from tasks.export import write_model

    store, out = tmp_path / "store", tmp_path / "out"
    plan, refs = committed_final(tiny_model, corpus, store, out, "2:4", 0.25)

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", full_disk)
    with pytest.raises(OSError) as caught:
        write_model(plan.specs[plan.final], refs[plan.final], str(out / "model"))
    line = one_line(caught.value)
    assert f"writing the model folder {out / 'model'} failed (No space left on device)" in line
    assert "choose another --out" in line and "--no-export" in line
    assert exit_code(caught.value) == 3 and not is_transient(caught.value)
    assert list(out.iterdir()) == []  # the staging folder went too
