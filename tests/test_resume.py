"""A pruning stage commits each finished block: a run killed in the middle of a stage resumes
at its first unfinished block, and ends with the model of a run that was never interrupted."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tasks.store import ArtifactStore
from tests.test_pipeline_fixtures import REPO, cli_args, kill_cli_when, save_opt, server_env

pytest_plugins = ["tests.test_pipeline_fixtures"]

BLOCKS = 16


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory) -> Path:
    """A 16-block OPT (hidden 256) with the demo tokenizer, saved like a hub model."""
    return save_opt(tmp_path_factory.mktemp("deep-opt"), layers=BLOCKS, hidden=256)


def _args(model, corpus, store, out) -> list[str]:
    # one-shot only (the stage under test); 16 windows of 64 tokens make a block take long
    # enough to be killed between blocks; no global GPU slot: a killed holder would keep it
    return cli_args(model, corpus, store, out, sds=False) + [
        "--nsamples", "16", "--seqlen", "64", "--gpu-limit", "none"]


def _block_lines(out: Path) -> list[int]:
    """The finished blocks that `<out>/sds.log` names, in order."""
    lines = (out / "sds.log").read_text().splitlines()
    return [int(m.group(1)) for line in lines
            if (m := re.search(rf"oneshot sparsegpt 2:4: block (\d+)/{BLOCKS}\b", line))]


@pytest.mark.slow
def test_a_run_killed_inside_the_one_shot_stage_resumes_at_its_first_unfinished_block(
        prefect_api, deep_model, corpus, tmp_path):
    store, out = tmp_path / "store", tmp_path / "out"
    args = _args(deep_model, corpus, store, out)
    env = server_env(tmp_path)
    kill_cli_when(args, env, lambda: len(list((store / "oneshot").glob("*/block-*.json"))) >= 3,
                  "the one-shot stage reaching block 3", 240, poll=0.02)
    assert not list((store / "oneshot").glob("*/meta.json")), "killed after the stage ended"
    finished = len(list((store / "oneshot").glob("*/block-*.json")))
    assert 3 <= finished < BLOCKS

    t0 = time.perf_counter()
    resumed = subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=600)
    resumed_seconds = time.perf_counter() - t0
    assert resumed.returncode == 0, resumed.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["stages"]["oneshot"]["blocks"] == {"total": BLOCKS,
                                                      "computed": BLOCKS - finished}
    assert results["stages"]["calibration"]["computed"] is False  # committed before the kill
    assert _block_lines(out) == list(range(finished + 1, BLOCKS + 1))  # only the rest
    key = results["keys"]["oneshot"]
    assert not list((store / "oneshot" / key).glob("block-*")), "blocks left after the commit"

    # a run that was never interrupted, in a store of its own
    t0 = time.perf_counter()
    whole_out = tmp_path / "whole"
    whole = subprocess.run(
        [sys.executable, "-m", "flows.cli", *_args(deep_model, corpus, tmp_path / "whole-store",
                                                   whole_out)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    whole_seconds = time.perf_counter() - t0
    assert whole.returncode == 0, whole.stderr
    reference = json.loads((whole_out / "results.json").read_text())
    assert reference["stages"]["oneshot"]["blocks"] == {"total": BLOCKS, "computed": BLOCKS}
    assert _block_lines(whole_out) == list(range(1, BLOCKS + 1))
    assert reference["keys"] == results["keys"]
    assert reference["final"]["sha256"] == results["final"]["sha256"]  # bit-identical tensors
    a, _ = ArtifactStore(store).load("oneshot", key)
    b, _ = ArtifactStore(tmp_path / "whole-store").load("oneshot", key)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"resumed after {finished}/{BLOCKS} blocks: {resumed_seconds:.1f} s; "
          f"uninterrupted: {whole_seconds:.1f} s")


def test_blocks_committed_on_another_setup_are_computed_again(tiny_model, corpus, tmp_path,
                                                             monkeypatch):
    """A stage resumes from blocks computed on this setup only (device, torch build, threads):
    the same key on another device differs in its last bits, and a resumed stage must end as an
    uninterrupted run here would."""
    import logging

    from sds.models import prunable_layers, weight_matrix
    from tasks.common import BlockCommits, compute_setup, load_base
    from tasks.plan import plan_pipeline
    from tests.test_pipeline_fixtures import tiny_params

    spec = plan_pipeline(tiny_params(tiny_model, corpus, tmp_path / "store"),
                         check=False).specs["oneshot"]
    store = ArtifactStore(spec.store)
    model, _ = load_base(spec)
    layers = prunable_layers(model)
    blocks = BlockCommits(spec, store, logging.getLogger("test"), model, list(layers))
    first = {n: weight_matrix(m) for n, m in layers.items() if ".layers.0." in n}
    assert blocks.setup == compute_setup(None) and blocks.setup["threads"] >= 1

    def commit(setup):
        store.save_part(spec.stage, spec.key, 0, first,
                        {"blocks": blocks.total, "seconds": 0.1, "layers": [], "setup": setup})

    commit(blocks.setup)
    advanced = []
    blocks.artifact_id = "progress"  # as in a flow run: the artifact follows the blocks
    monkeypatch.setattr("prefect.artifacts.update_progress_artifact",
                        lambda artifact_id, progress: advanced.append((artifact_id, progress)))
    assert blocks.resume().start == 1
    assert advanced == [("progress", 100.0 / blocks.total)]  # resumed: not 0% until block 2
    blocks.artifact_id = None
    commit({**blocks.setup, "device": "cuda", "gpu": "another machine's"})
    assert blocks.resume().start == 0


def test_a_retried_stage_advances_one_progress_artifact(prefect_api, tiny_model, corpus,
                                                        tmp_path):
    """A stage's retry runs in its task run again: it advances the progress artifact of the
    first attempt (back at 0%, then at the resumed block) instead of making a second one
    beside it, which would stay where the failed attempt stopped."""
    import logging

    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.context import get_run_context

    from sds.models import prunable_layers
    from tasks.common import BlockCommits, load_base
    from tasks.plan import plan_pipeline
    from tests.test_pipeline_fixtures import tiny_params

    spec = plan_pipeline(tiny_params(tiny_model, corpus, tmp_path / "store"),
                         check=False).specs["oneshot"]
    attempts = []

    @task(retries=1, retry_delay_seconds=0)
    def stage():
        model, _ = load_base(spec)
        blocks = BlockCommits(spec, ArtifactStore(spec.store), logging.getLogger("test"), model,
                              list(prunable_layers(model)))
        attempts.append((blocks.artifact_id, blocks.resume().start))
        for b in range(blocks.state.start, blocks.total):
            blocks(b, blocks.total, 0.1)
            if len(attempts) == 1:
                raise RuntimeError("the first attempt fails after its first block")
        return blocks.total

    @flow
    def pipeline():
        return get_run_context().flow_run.id, stage()

    flow_run_id, total = pipeline()
    assert total >= 2 and len(attempts) == 2
    assert attempts[0][0] is not None and attempts[1] == (attempts[0][0], 1)  # resumed
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    bars = [a for a in artifacts if a.type == "progress"]
    assert len(bars) == 1 and float(bars[0].data) == 100.0


def test_a_damaged_block_is_computed_again_with_the_ones_after_it(tmp_path):
    """`parts` yields the committed blocks from block 0 up to the first damaged one."""
    store = ArtifactStore(tmp_path / "store")
    key = "0" * 32
    for b in range(4):
        store.save_part("oneshot", key, b, {f"w{b}": torch.full((2, 2), float(b))},
                        {"blocks": 4, "seconds": 0.1, "layers": []})
    assert [r["block"] for _, r in store.parts("oneshot", key)] == [0, 1, 2, 3]
    assert [t[f"w{r['block']}"][0, 0].item() for t, r in store.parts("oneshot", key)] == [
        0, 1, 2, 3]
    part = tmp_path / "store" / "oneshot" / key / "block-00002.safetensors"
    part.write_bytes(part.read_bytes()[:-1] + b"\0")
    assert [r["block"] for _, r in store.parts("oneshot", key)] == [0, 1]

    store.save("oneshot", key, {}, {})
    store.drop_parts("oneshot", key)
    assert sorted(p.name for p in (tmp_path / "store" / "oneshot" / key).iterdir()) == [
        "meta.json", "tensors.safetensors"]


def test_blocks_computed_with_other_cpu_kernels_are_computed_again():
    """The same torch with the same threads rounds differently on a CPU with other vector
    kernels (ATEN_CPU_CAPABILITY stands in for another machine's CPU): wherever two such
    processes prune to different bits, their setups differ, so neither resumes from the
    other's blocks."""
    import os

    script = (
        "import hashlib, json, torch\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "from sds import api\n"
        "from tasks.common import compute_setup\n"
        "c = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128,\n"
        "                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)\n"
        "torch.manual_seed(0); m = LlamaForCausalLM(c).eval()\n"
        "ids = torch.randint(3, 100, (4, 32), generator=torch.Generator().manual_seed(1))\n"
        "api.oneshot(m, ids, 'sparsegpt', '2:4', progress=False, device='cpu')\n"
        "h = hashlib.sha256(b''.join(p.detach().numpy().tobytes() for p in m.parameters()))\n"
        "print(json.dumps({'sha': h.hexdigest(), 'setup': compute_setup('cpu')}))\n")
    runs = {}
    for capability in ("default", "avx2", "avx512"):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        runs[capability] = json.loads(done.stdout.strip().splitlines()[-1])
    shas = {r["sha"] for r in runs.values()}
    if len(shas) == 1:
        pytest.skip("this CPU rounds alike with every kernel set torch offers here")
    for a in runs.values():
        for b in runs.values():
            if a["sha"] != b["sha"]:
                assert a["setup"] != b["setup"], (a, b)
