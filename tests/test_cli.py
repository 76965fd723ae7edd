"""The `sds` command end to end: runs, a killed run resumed, bad input, the store commands."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tasks.store import ArtifactStore
from tests.test_pipeline_fixtures import (
    REPO,
    TOKENIZER,
    cli_args,
    hub_answering,
    kill_cli_when,
    server_env,
    tiny_params,
)

# fixtures: prefect_api, tiny_model, corpus (and the S3 ones from conftest)
pytest_plugins = ["tests.test_pipeline_fixtures"]


def sds_command(args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture
def clean_environ():
    """`main()` sets Prefect's and the libraries' variables in os.environ: put them back."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.slow
def test_sds_run_end_to_end(prefect_api, tiny_model, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    store, out = tmp_path / "store", tmp_path / "out"
    done = sds_command(cli_args(tiny_model, corpus, store, out), server_env(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "metric" in done.stdout and "ppl/heldout" in done.stdout
    assert "Traceback" not in done.stderr

    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == {"dense", "oneshot", "sds"}
    for state in ("dense", "oneshot", "sds"):
        assert results["metrics"][state]["ppl/heldout"] > 1
    gain = results["improvement"]["ppl/heldout"]
    assert set(gain) == {"absolute", "recovered", "noise"} and gain["noise"] is None
    assert set(results["keys"]) >= {"calibration", "oneshot", "redense", "second"}
    assert results["config"]["gpu_limit"] == "sds-gpu"  # with a server: the global slot
    assert results["timings"]["wall"] >= results["timings"]["stage_seconds"] > 0

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    for block in model.model.decoder.layers:
        for layer in (block.self_attn.q_proj, block.fc1, block.fc2):
            groups = layer.weight.detach().reshape(-1, 4)  # 2:4 along the input dimension
            assert ((groups != 0).sum(dim=1) <= 2).all()
    # the embeddings and the head are never pruned
    assert (model.model.decoder.embed_tokens.weight != 0).float().mean() > 0.99


def test_store_commands_list_remove_and_collect(prefect_api, tiny_model, corpus, tmp_path,
                                                capfd, clean_environ):
    from flows.cli import main
    from flows.pipeline import pipeline

    store_root = tmp_path / "store"
    kept = pipeline(tiny_params(tiny_model, corpus, store_root, tmp_path / "kept"))
    other = pipeline(tiny_params(tiny_model, corpus, store_root, method="magnitude",
                                   sds=False))
    store = ArtifactStore(store_root)
    assert len(store.list()) == 7 + 2  # magnitude adds its one-shot and its evaluation

    capfd.readouterr()
    assert main(["store", "ls", "--store", str(store_root), "--json"]) == 0
    listed = [json.loads(line) for line in capfd.readouterr().out.splitlines()]
    assert {f"{x['stage']}/{x['key']}" for x in listed} == {
        f"{m['stage']}/{m['key']}" for m in store.list()}

    # gc keeps what results.json names (and its upstream), removes the rest
    assert main(["store", "gc", "--store", str(store_root), "--keep", str(tmp_path / "kept"),
                 "--older-than", "0s", "--dry-run"]) == 0
    assert len(store.list()) == 9
    assert main(["store", "gc", "--store", str(store_root), "--keep", str(tmp_path / "kept"),
                 "--older-than", "0s"]) == 0
    left = {m["key"] for m in store.list()}
    assert left == set(kept["keys"].values())
    assert other["keys"]["oneshot"] not in left

    key = kept["keys"]["second"]
    assert main(["store", "rm", "--store", str(store_root), f"second/{key}"]) == 0
    assert not store.exists("second", key)


@pytest.mark.slow
def test_killed_run_resumes_and_ends_with_the_same_final_artifact(prefect_api, tiny_model,
                                                                  corpus, tmp_path):
    from flows.pipeline import pipeline

    # a re-dense step of a few seconds, to be killed in the middle of it; no global GPU slot:
    # a killed process would hold it until its lease expires (a minute), which is not the
    # subject here
    slow = ["--epochs", "1000", "--gpu-limit", "none"]
    store, out = tmp_path / "store", tmp_path / "out"
    args = cli_args(tiny_model, corpus, store, out) + slow
    env = server_env(tmp_path)
    kill_cli_when(args, env, lambda: bool(list((store / "oneshot").glob("*/meta.json"))),
                  "the one-shot stage finishing", 120)
    assert not list((store / "second").glob("*/meta.json"))  # killed before the end
    assert not (out / "results.json").exists()

    resumed = sds_command(args, env)
    assert resumed.returncode == 0, resumed.stderr
    results = json.loads((out / "results.json").read_text())
    computed = set(results["timings"]["computed"])
    assert not computed & {"calibration", "oneshot"}  # finished before the kill: reused
    assert {"second", "evaluate-sds"} <= computed

    torch.set_num_threads(1)  # as the CLI processes ran (OMP_NUM_THREADS=1)
    reference = pipeline(tiny_params(tiny_model, corpus, tmp_path / "reference",
                                       sds_options={"epochs": 1000, "adjust_epochs": 5}))
    assert reference["keys"] == results["keys"]
    assert reference["final"]["sha256"] == results["final"]["sha256"]


def test_sds_sweep_from_a_grid_file(prefect_api, tiny_model, corpus, tmp_path, capfd,
                                    monkeypatch, clean_environ):
    from flows.cli import main

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "models": [str(tiny_model)], "methods": ["sparsegpt", "wanda"], "patterns": ["2:4"],
        "calib": str(corpus["calib"]), "eval": [str(corpus["heldout"])], "tasks": [],
        "nsamples": 4, "seqlen": 32, "sds_options": {"epochs": 5, "adjust_epochs": 5}}))
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    code = main(["sweep", "--grid", str(grid), "--patterns", "2:4,50%", "--gpu-limit", "none",
                 "--store", str(tmp_path / "store"), "--out", str(tmp_path / "sweep")])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert len(summary["runs"]) == 4  # the command line's patterns replace the file's
    assert summary["flow_run"]["name"] == "sweep-1-model-4-points"
    assert summary["stage_submissions"]["calibration"] == 1
    assert ("stages   calibration 1, oneshot 4, redense 4, second 4, evaluate-dense 1,"
            in captured.out)
    assert f"results  {tmp_path / 'sweep' / 'sweep.json'}" in captured.out


# the command in a fresh process, then which of these it imported (the last line of stdout)
MAIN_THEN_IMPORTS = (
    "import sys; from flows.cli import main; code = main(sys.argv[1:]); "
    "print('imported', sorted({m.split('.')[0] for m in sys.modules} & "
    "{'prefect', 'torch', 'transformers'})); sys.exit(code)")
RUN_RECORD = ("timings", "flow_run", "answered_from_store", "started")  # what differs per run


def _fresh_process(args: list[str], env: dict) -> tuple[subprocess.CompletedProcess, str]:
    """`sds ARGS` in a new process: (the process, what it imported of Prefect, torch and
    transformers)."""
    done = subprocess.run([sys.executable, "-c", MAIN_THEN_IMPORTS, *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    *_, imported = done.stdout.splitlines() or [""]
    return done, imported


def _sha256(path: Path) -> str:
    from tasks.store import file_sha256

    return file_sha256(path)


def test_a_fully_cached_rerun_is_answered_from_the_store_without_prefect(
        prefect_api, tiny_model, corpus, s3_bucket, s3_requests, tmp_path, monkeypatch, capfd,
        clean_environ):
    """With every stage committed (S3 here), `sds run` writes what the flow writes on the same
    fully cached run, prints the same table, and imports neither Prefect nor torch: it reads
    the commit records and downloads no tensor. --flow-run gets the recorded flow run."""
    from flows.cli import main
    from flows.pipeline import pipeline
    from tasks.store import TENSORS

    root, out = f"s3://{s3_bucket}/runs", tmp_path / "out"
    pipeline(tiny_params(tiny_model, corpus, root, out))  # computes every stage
    args = cli_args(tiny_model, corpus, root, out) + ["--gpu-limit", "none"]  # as tiny_params
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    capfd.readouterr()
    assert main(args + ["--flow-run"]) == 0
    by_flow = capfd.readouterr()
    flow = json.loads((out / "results.json").read_text())
    assert flow["flow_run"]["id"] and flow["answered_from_store"] is False
    assert flow["timings"]["computed"] == [] and "found in the store" not in by_flow.err
    assert "ppl/heldout" in by_flow.out
    model = out / "model" / "model.safetensors"
    exported = (_sha256(model), model.stat().st_mtime_ns)

    # a Prefect API that would refuse every call: none is made
    env = server_env(tmp_path, PREFECT_API_URL="http://127.0.0.1:9/api")
    s3_requests.clear()
    done, imported = _fresh_process(args, env)
    assert done.returncode == 0, done.stderr
    assert imported == "imported []"
    assert "all 7 stages were found in the store" in done.stderr
    assert "no flow run was started" in done.stderr and "--flow-run" in done.stderr
    # the warning that explains SDS on 4 x 32 tokens comes with the answer too, once
    assert " ".join(done.stderr.split()).count("warning: SDS with 128 calibration tokens") == 1
    assert [r for r in s3_requests if '"GET ' in r and TENSORS in r] == []
    # it pinned its artifacts while it answered (a gc meanwhile leaves them), and unpinned
    assert [r for r in s3_requests if '"PUT ' in r and "/.pins/" in r]
    assert ArtifactStore(root).pins() == []
    assert [r for r in s3_requests if '"GET ' in r and "meta.json" in r]
    fast = json.loads((out / "results.json").read_text())
    assert fast["answered_from_store"] is True and fast["flow_run"] == {"id": "", "name": ""}
    assert fast["timings"]["computed"] == []
    assert ({k: v for k, v in fast.items() if k not in RUN_RECORD}
            == {k: v for k, v in flow.items() if k not in RUN_RECORD})
    # the same table and summary on stdout; only the time line differs
    assert done.stdout.splitlines()[:-2] == by_flow.out.splitlines()[:-1]
    assert (_sha256(model), model.stat().st_mtime_ns) == exported  # already there: kept

    # without the model folder, the answer from the store writes it again, the same bytes:
    # the final stage's tensors are the one download
    shutil.rmtree(out / "model")
    s3_requests.clear()
    done, imported = _fresh_process(args, env)
    assert done.returncode == 0, done.stderr
    assert "prefect" not in imported
    assert _sha256(model) == exported[0]
    final = flow["keys"]["second"]
    assert [r for r in s3_requests if '"GET ' in r and TENSORS in r] == [
        r for r in s3_requests if '"GET ' in r and f"{final}/{TENSORS}" in r] != []


def test_a_rerun_with_one_stage_missing_or_damaged_runs_the_flow_for_that_stage_only(
        prefect_api, tiny_model, corpus, tmp_path, monkeypatch, capfd, clean_environ):
    """A stage whose commit record is gone, or whose meta.json is not valid JSON, is not in the
    store: the command runs the flow, which recomputes that stage (the same bytes) and reuses
    the others."""
    from flows.cli import main
    from flows.pipeline import pipeline

    store, out = tmp_path / "store", tmp_path / "out"
    first = pipeline(tiny_params(tiny_model, corpus, store, out))
    args = cli_args(tiny_model, corpus, store, out) + ["--gpu-limit", "none"]
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    for label, damage in (("redense", "deleted"), ("evaluate-sds", "not JSON")):
        meta = Path(first["artifacts"][label]) / "meta.json"
        if damage == "deleted":
            meta.unlink()
        else:
            meta.write_text("{not json")
        capfd.readouterr()
        assert main(args) == 0
        err = capfd.readouterr().err
        again = json.loads((out / "results.json").read_text())
        assert "found in the store" not in err
        assert again["answered_from_store"] is False and again["flow_run"]["id"]
        assert again["timings"]["computed"] == [label], damage
        assert again["stages"][label]["sha256"] == first["stages"][label]["sha256"]
        assert again["metrics"] == first["metrics"]
    capfd.readouterr()
    assert main(args) == 0  # everything committed again: answered from the store
    assert "all 7 stages were found in the store" in capfd.readouterr().err


@pytest.mark.parametrize("how", ["answered from the store", "--flow-run"])
def test_damaged_final_weights_are_discarded_and_computed_again(
        how, prefect_api, tiny_model, corpus, tmp_path, monkeypatch, capfd, clean_environ):
    """Only the export reads the final stage's tensors on a fully cached run: when their hash
    is wrong (a flipped byte, same size), the export discards them and the run computes them
    again (the same bytes) and exports, instead of failing every rerun."""
    from flows.cli import main
    from flows.pipeline import pipeline
    from tasks.store import TENSORS

    store, out = tmp_path / "store", tmp_path / "out"
    first = pipeline(tiny_params(tiny_model, corpus, store, out))
    shutil.rmtree(out / "model")  # so that the rerun exports, reading the final tensors
    # what an export killed midway leaves: its staging folder and a set-aside old model
    for leftover in (".model-k1ll3d_x", ".model-old-0a1b2c3d"):
        (out / leftover).mkdir()
        (out / leftover / "model.safetensors").write_bytes(b"partial")
    (out / ".model-notes.txt").write_text("a file of the user's: stays")
    (out / ".model-backup").mkdir()  # a folder of the user's, not named as sds names them
    tensors = Path(first["artifacts"]["second"]) / TENSORS
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0xFF
    tensors.write_bytes(bytes(data))
    args = cli_args(tiny_model, corpus, store, out) + ["--gpu-limit", "none"]
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    capfd.readouterr()
    assert main(args + ([how] if how.startswith("--") else [])) == 0
    err = capfd.readouterr().err
    again = json.loads((out / "results.json").read_text())
    assert again["timings"]["computed"] == ["second"], err
    if not how.startswith("--"):  # the command says what happened, without advice it follows
        said = " ".join(err.split())  # itself (with --flow-run, Prefect's flow logs say it)
        assert re.search(r"artifact \S+/second/\w+ is corrupt: [^;]*; it was discarded, and "
                         r"the flow computes it again", said), said
        assert "run again" not in said and "discard(" not in said
        assert "str: artifact" not in said, said  # the damage as said, not a str's repr
    # the run computes SDS on 4 x 32 tokens: the command says that this is too few, once
    # (the second stage logs the same warning)
    assert " ".join(err.split()).count("warning: SDS with 128 calibration tokens") == 1
    assert again["stages"]["second"]["sha256"] == first["stages"]["second"]["sha256"]
    assert again["metrics"] == first["metrics"]
    ArtifactStore(store).load("second", first["keys"]["second"])  # whole again
    assert again["model_dir"] and (out / "model" / "model.safetensors").is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [
        ".model-backup", ".model-notes.txt"]  # the killed export's folders are gone


def test_the_export_trusts_sizes_when_the_run_does(tiny_model, corpus, tmp_path, monkeypatch):
    """--no-verify: the export reads the final tensors without hashing them, as stages do."""
    from tasks.export import write_model
    from tasks.plan import plan_pipeline

    seen = []

    def load(self, stage, key, verify=True):
        seen.append(verify)
        raise SystemExit  # the read is all this test needs

    monkeypatch.setattr(ArtifactStore, "load", load)
    for verify in (True, False):
        plan = plan_pipeline(tiny_params(tiny_model, corpus, tmp_path / "store", None,
                                         verify=verify), check=False)
        with pytest.raises(SystemExit):
            write_model(plan.specs[plan.final], {"sha256": "x"}, str(tmp_path / "model"))
    assert seen == [True, False]


def _one_line_error(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert lines[0].startswith("error: ") and "Traceback" not in text
    return lines[0]


def test_bad_pattern_in_a_subprocess_exits_2_with_one_line(tiny_model, corpus, tmp_path):
    args = cli_args(tiny_model, corpus, tmp_path / "store", tmp_path / "out")
    done = sds_command(args + ["--pattern", "5:4"], server_env(tmp_path))
    assert done.returncode == 2
    line = _one_line_error(done.stderr)
    assert "5:4" in line and "N:M" in line
    assert not (tmp_path / "store").exists() and not (tmp_path / "out").exists()


def encoder_model(folder: Path) -> Path:
    """A BERT encoder checkpoint (no LM head) with the demo tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def damaged_copy(model: Path, folder: Path, keep_bytes: int | None) -> Path:
    """A copy of `model` whose model.safetensors is cut to `keep_bytes` (None: half)."""
    shutil.copytree(model, folder)
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2 if keep_bytes is None else keep_bytes)
    return folder


@pytest.mark.parametrize("case", [
    "unknown model", "bad pattern", "unknown method", "bad sds option", "unreachable store",
    "no credentials", "encoder model", "truncated weights", "empty weights", "exclude all",
    "override matching nothing", "unknown device", "cuda without a gpu", "infinite sds option",
    "one-shot target mix above 1", "unknown dtype", "missing eval file", "unknown calib",
    "unknown task"])
def test_bad_input_exits_nonzero_with_one_line_and_commits_nothing(
        case, tiny_model, corpus, tmp_path, s3_server, monkeypatch, capfd, clean_environ):
    from flows.cli import main

    args = cli_args(tiny_model, corpus, tmp_path / "store", tmp_path / "out")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never reached
    expected_code, expected_text = 2, None
    model = args.index("--model") + 1
    if case == "unknown model":
        args[model] = str(tmp_path / "no-such-model")
        expected_text = "does not exist"
    elif case == "encoder model":
        args[model] = str(encoder_model(tmp_path / "bert"))
        expected_text = "not a causal language model (its checkpoint is a BertModel)"
    elif case in ("truncated weights", "empty weights"):
        keep = None if case == "truncated weights" else 0
        args[model] = str(damaged_copy(tiny_model, tmp_path / "damaged", keep))
        expected_text = "model.safetensors' cannot be read"
    elif case == "exclude all":
        args += ["--exclude", ".*"]
        expected_text = "no layer is left to prune"
    elif case == "override matching nothing":
        args += ["--override", "fc1$=4:8", "--override", "mlp\\.down_proj=50%"]
        expected_text = "override 'mlp\\\\.down_proj'=50% matches no pruned layer"
    elif case == "unknown device":
        args += ["--device", "foo"]
        expected_text = "device: 'foo' is not a device name"
    elif case == "cuda without a gpu":
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        args += ["--device", "cuda"]
        expected_text = "no CUDA device"
    elif case == "infinite sds option":
        args += ["--lr", "inf"]
        expected_text = "lr must be > 0 and a finite number"
    elif case == "one-shot target mix above 1":
        args += ["--method", "admm", "--oneshot-target-mix", "1.5"]
        expected_text = "oneshot_target_mix: Input should be less than or equal to 1"
    elif case == "unknown dtype":
        args += ["--dtype", "bogus"]
        expected_text = "dtype: 'bogus' is not a dtype; choose one of auto, float32"
    elif case == "missing eval file":
        args[args.index("--eval") + 1] = str(tmp_path / "missing.txt")
        expected_text = "evaluation source file"
    elif case == "unknown calib":
        args[args.index("--calib") + 1] = "c5"
        expected_text = "unknown calibration source 'c5'"
    elif case == "unknown task":
        args[args.index("--tasks") + 1] = "demo,hellaswagg"
        expected_text = "unknown zero-shot task 'hellaswagg'"
    elif case == "bad pattern":
        args += ["--pattern", "60"]
        expected_text = "outside (0, 1)"
    elif case == "unknown method":
        args += ["--method", "obs"]
        expected_text = "unknown pruning method"
    elif case == "bad sds option":
        args += ["--lr", "-1"]
        expected_text = "> 0"
    else:
        args[args.index("--store") + 1] = "s3://sds-missing/runs"
        nowhere = str(tmp_path / "absent")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", nowhere)
        monkeypatch.setenv("AWS_CONFIG_FILE", nowhere)
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        expected_code = 3
        if case == "unreachable store":
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKE")
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake")
            monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
            expected_text = "cannot reach"
        else:
            monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
            monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
            monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
            expected_text = "no AWS credentials"
    capfd.readouterr()
    code = main(args)
    captured = capfd.readouterr()
    assert code == expected_code, captured.err
    line = _one_line_error(captured.err)
    assert expected_text in line
    assert not (tmp_path / "store").exists()
    assert not (tmp_path / "out").exists()


def _store_of_six_and_one_broken(root) -> tuple[ArtifactStore, str]:
    """Six committed artifacts and one interrupted save (no meta.json)."""
    from tests.test_store import key_for, some_tensors

    store = ArtifactStore(root)
    for i in range(6):
        store.save("oneshot", key_for(sparsity=i / 10), some_tensors(), {})
    broken = key_for(sparsity=0.9)
    store.save("oneshot", broken, some_tensors(), {})
    os.remove(root / "oneshot" / broken / "meta.json")
    return store, broken


def test_a_run_that_evaluates_nothing_says_so_instead_of_an_empty_table(
        prefect_api, tmp_path, monkeypatch, capfd, clean_environ):
    """The demo, named as such, with no evaluation: one line, not an empty table."""
    from flows.cli import main

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    args = ["run", "--method", "magnitude", "--no-sds", "--eval", "none", "--tasks", "none",
            "--nsamples", "4", "--seqlen", "32", "--store", str(tmp_path / "store"),
            "--out", str(tmp_path / "out"), "--gpu-limit", "none"]
    capfd.readouterr()
    assert main(args) == 0
    out = capfd.readouterr().out
    assert "magnitude 2:4 on demo: nothing was evaluated (--eval none --tasks none)" in out
    assert "metric" not in out


def test_a_failed_run_says_the_results_in_its_out_folder_are_an_earlier_runs(
        prefect_api, tiny_model, corpus, tmp_path, monkeypatch, capfd, clean_environ):
    from flows.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"metrics": {}}')  # an earlier run's
    args = cli_args(tiny_model, corpus, tmp_path / "store", out) + [
        "--gpu-limit", "none", "--nsamples", "4000"]  # more windows than the corpus holds
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    capfd.readouterr()
    assert main(args) == 2
    err = " ".join(capfd.readouterr().err.split())
    assert f"note: {out / 'results.json'} is an earlier run's; this run wrote no results" in err
    assert (out / "results.json").read_text() == '{"metrics": {}}'


def test_finishing_removes_the_earlier_results_before_the_model_folder_changes(tmp_path):
    """Killed while the export replaces the model folder, a run leaves no results.json that
    would name the earlier model beside the new one."""
    from datetime import UTC, datetime

    from flows import report

    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"metrics": {}}')

    def killed(spec, ref, folder):
        assert not (out / "results.json").exists()  # gone before the folder changes
        raise KeyboardInterrupt

    class Plan:
        final, specs = "second", {"second": None}

    with pytest.raises(KeyboardInterrupt):
        report.finish(Plan(), {"second": {}}, out, killed, datetime.now(UTC), 0.0, None)
    assert not (out / "results.json").exists()


def test_finishing_into_a_model_folder_of_the_users_changes_nothing(tmp_path):
    """A run that skipped the command's checks (a deployment's) stops before it removes the
    earlier results, as the refusal says: nothing was changed."""
    from datetime import UTC, datetime

    from flows import report
    from sds.errors import ConfigError

    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "model" / "notes.md").write_text("mine")
    (out / "results.json").write_text('{"metrics": {}}')

    def export(spec, ref, folder):
        raise AssertionError("the export was called")

    class Plan:
        final, specs = "second", {"second": None}

    with pytest.raises(ConfigError, match="sds did not write it"):
        report.finish(Plan(), {"second": {}}, out, export, datetime.now(UTC), 0.0, None)
    assert (out / "results.json").read_text() == '{"metrics": {}}'
    assert (out / "model" / "notes.md").read_text() == "mine"


def test_store_rm_incomplete_removes_only_the_interrupted_save(tmp_path, capfd, clean_environ):
    from flows.cli import main

    store, broken = _store_of_six_and_one_broken(tmp_path / "store")
    good = {m["key"] for m in store.list()}
    assert main(["store", "ls", "--store", str(store.root)]) == 0
    assert "sds store rm --incomplete" in capfd.readouterr().out

    assert main(["store", "rm", "--store", str(store.root), "--incomplete", "--dry-run"]) == 0
    assert capfd.readouterr().out.splitlines() == [
        "would remove 1 artifact(s)", f"  oneshot/{broken}"]
    assert main(["store", "rm", "--store", str(store.root), f"oneshot/{broken}",
                 "--dry-run"]) == 0  # named, the broken one is found too
    assert capfd.readouterr().out.splitlines()[0] == "would remove 1 artifact(s)"
    assert main(["store", "rm", "--store", str(store.root), "--incomplete"]) == 0
    assert {m["key"] for m in store.list()} == good
    assert store.incomplete() == []


def test_store_rm_checks_every_argument_before_it_removes_anything(tmp_path, capfd,
                                                                  clean_environ):
    from flows.cli import main

    store, _broken = _store_of_six_and_one_broken(tmp_path / "store")
    before = store.list()
    first = f"oneshot/{before[0]['key']}"
    absent = "0123456789abcdef0123456789abcdef"
    for bad in (["--stage", "oneshot", "--older-than", "7days"], ["oneshot/not-a-key"],
                ["--stage", "Not A Stage"], [f"oneshot/{absent}"], [f"nostage/{absent}"]):
        assert main(["store", "rm", "--store", str(store.root), first, *bad]) == 2
        line = _one_line_error(capfd.readouterr().err)
        if absent in bad[0]:  # well formed, but not in the store: a typo, named
            assert f"there is no artifact {bad[0]} in" in line and "nothing was removed" in line
    assert store.list() == before
    (tmp_path / "file").write_text("not a store")
    assert main(["store", "rm", "--store", str(tmp_path / "file"), first]) == 3
    assert "not a folder" in _one_line_error(capfd.readouterr().err)


@pytest.mark.parametrize("command", [["rm", "--stage", "onshot"],
                                     ["rm", "--stage", "evaluate-dense", "--older-than", "7d"],
                                     ["ls", "--stage", "secnd"]])
def test_store_commands_refuse_a_stage_that_is_not_one(command, tmp_path, capfd,
                                                       clean_environ):
    """A well-formed typo would select nothing and exit 0 ("removed 0"); `ls` shows the
    evaluate stage's runs as evaluate-dense and the like, which are not stages."""
    from flows.cli import main

    store, _broken = _store_of_six_and_one_broken(tmp_path / "store")
    before = store.list()
    assert main(["store", command[0], "--store", str(store.root), *command[1:]]) == 2
    line = _one_line_error(capfd.readouterr().err)
    assert f"there is no stage {command[2]!r}" in line
    assert "calibration, oneshot, redense, second, evaluate" in line
    if command[2] == "evaluate-dense":
        assert "the stage is `evaluate`" in line
    assert store.list() == before


def test_store_commands_on_a_store_that_does_not_exist_say_so(tmp_path, capfd, clean_environ):
    from flows.cli import main

    for command in (["ls"], ["rm", "--incomplete"], ["gc", "--keep", str(tmp_path)]):
        assert main(["store", *command, "--store", str(tmp_path / "typo")]) == 2
        assert f"there is no store at {tmp_path / 'typo'}" in _one_line_error(
            capfd.readouterr().err)
    assert not (tmp_path / "typo").exists()


def test_store_rm_and_gc_leave_what_a_run_in_progress_pinned(tmp_path, capfd, clean_environ):
    import uuid

    from flows.cli import main

    store, _broken = _store_of_six_and_one_broken(tmp_path / "store")
    keys = [m["key"] for m in store.list()]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"keys": {"oneshot": keys[0]}}))
    pin = store.pin(keys[1:3], {"owner": uuid.uuid4().hex, "host": "elsewhere", "pid": 1}, 60)
    assert main(["store", "rm", "--store", str(store.root), f"oneshot/{keys[1]}"]) == 0
    assert "kept 1 that runs in progress need" in capfd.readouterr().out
    assert main(["store", "gc", "--store", str(store.root), "--keep", str(results),
                 "--older-than", "0s"]) == 0
    out = capfd.readouterr().out
    assert "removed 4 artifact(s)" in out and "kept 2 that runs in progress need" in out
    assert {m["key"] for m in store.list()} == set(keys[:3])
    store.unpin(pin)
    assert main(["store", "rm", "--store", str(store.root), f"oneshot/{keys[1]}"]) == 0
    assert {m["key"] for m in store.list()} == {keys[0], keys[2]}
    # a crashed run's pin protects nothing, and gc takes it away
    store.pin(keys, {"owner": uuid.uuid4().hex, "host": "elsewhere", "pid": 1}, -1)
    capfd.readouterr()
    assert main(["store", "gc", "--store", str(store.root), "--keep", str(results),
                 "--older-than", "0s"]) == 0
    out = capfd.readouterr().out
    assert "removed 1 artifact(s)" in out and "1 pin and lease file(s) of ended runs" in out
    assert not list((tmp_path / "store" / ".pins").iterdir())


@pytest.mark.parametrize("content", ["[1, 2]", '{"keys": ["a"]}', '{"keys": {"x": null}}',
                                     b"\xff\xfe", "folder"])
def test_store_gc_refuses_what_is_not_a_results_file(tmp_path, capfd, clean_environ, content):
    from flows.cli import main

    store, _broken = _store_of_six_and_one_broken(tmp_path / "store")
    before = store.list()
    keep = tmp_path / "keep.json"
    if content == "folder":  # a folder named results.json under the --keep folder
        keep = tmp_path / "kept"
        (keep / "results.json").mkdir(parents=True)
    elif isinstance(content, bytes):
        keep.write_bytes(content)
    else:
        keep.write_text(content)
    assert main(["store", "gc", "--store", str(store.root), "--keep", str(keep),
                 "--older-than", "0s"]) == 2
    assert _one_line_error(capfd.readouterr().err)
    assert store.list() == before


def test_store_gc_refuses_results_whose_artifacts_are_in_another_store(tmp_path, capfd,
                                                                       clean_environ):
    from flows.cli import main
    from tests.test_store import key_for

    store, _broken = _store_of_six_and_one_broken(tmp_path / "store")
    before = store.list()
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"keys": {"oneshot": key_for(sparsity=0.42)}}))
    assert main(["store", "gc", "--store", str(store.root), "--keep", str(results),
                 "--older-than", "0s"]) == 2
    assert "another --store" in _one_line_error(capfd.readouterr().err)
    assert store.list() == before


def test_a_stray_temporary_file_is_listed_and_collected(tmp_path, capfd, clean_environ):
    from flows.cli import main

    store, _broken = _store_of_six_and_one_broken(tmp_path / "store")
    key = store.list()[0]["key"]
    stray = tmp_path / "store" / "oneshot" / key / ".tensors-0123.tmp"  # a save killed midway
    stray.write_bytes(b"\0" * 1000)
    an_hour_ago = time.time() - 3600  # a live save's temporary is younger than 10 minutes
    os.utime(stray, (an_hour_ago, an_hour_ago))
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"keys": {"oneshot": key}}))
    assert main(["store", "ls", "--store", str(store.root), "--json"]) == 0
    assert {"stray": str(stray)} in map(json.loads, capfd.readouterr().out.splitlines())
    assert main(["store", "ls", "--store", str(store.root)]) == 0
    table = capfd.readouterr().out
    assert "stray file" in table and stray.name in table and "1 stray temporary file" in table

    assert main(["store", "gc", "--store", str(store.root), "--keep", str(results),
                 "--older-than", "0s"]) == 0
    assert "1 stray temporary file" in capfd.readouterr().out
    assert not stray.exists()
    assert [m["key"] for m in store.list()] == [key] and store.exists("oneshot", key)


def test_store_ls_on_a_regular_file_is_a_store_error(tmp_path, capfd, clean_environ):
    from flows.cli import main

    (tmp_path / "store").write_text("not a store")
    assert main(["store", "ls", "--store", str(tmp_path / "store")]) == 3
    assert "not a folder" in _one_line_error(capfd.readouterr().err)
    # `sds run` says the same before it looks for the run's stages in the store
    assert main(["run", "--store", str(tmp_path / "store"), "--out", "none"]) == 3
    assert "store root" in (line := _one_line_error(capfd.readouterr().err))
    assert "is a file, not a folder" in line


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "ten"])
def test_a_real_option_that_is_not_a_finite_number_is_refused_naming_it(value, capfd,
                                                                        clean_environ):
    from flows.cli import main

    assert main(["run", f"--lr={value}"]) == 2
    line = _one_line_error(capfd.readouterr().err)
    assert "sds_options" in line and " lr" in line.replace(".", " ") and "keys" not in line
    assert "finite" in line or "valid number" in line


def test_a_grid_file_reads_patterns_and_switches_as_written(tmp_path, clean_environ):
    """Unquoted, `2:4` is the number 124 to YAML 1.1 (base 60) and `off` is false: the grid
    file is read with YAML 1.2's scalars, so they mean what they say."""
    from flows.cli import build_parser, sweep_config

    grid = tmp_path / "grid.yaml"
    grid.write_text("patterns: [2:4, 4:8, 50%, 0.25]\nsds: [yes, false]\ngpu_limit: off\n"
                    "seed: 3\nsds_options: {lr: 1e-2, epochs: 7}\n")
    config = sweep_config(build_parser().parse_args(["sweep", "--grid", str(grid)]))
    assert config.patterns == ["2:4", "4:8", "50%", "0.25"]
    assert config.sds == [True, False] and config.gpu_limit is None and config.seed == 3
    assert config.sds_options.lr == 0.01 and config.sds_options.epochs == 7


def test_both_runs_each_point_with_and_without_sds_over_the_grid_file(tmp_path, clean_environ):
    """`--both` (README: "adds each point without SDS") wins over the grid file's `sds`, as
    every command-line option does; `--no-sds` leaves the one-shot points only."""
    from flows.cli import build_parser, sweep_config

    grid = tmp_path / "grid.yaml"
    grid.write_text("methods: [sparsegpt, wanda]\nsds: [true]\n")

    def points(*extra):
        config = sweep_config(build_parser().parse_args(["sweep", "--grid", str(grid), *extra]))
        return sorted((p.method, p.sds) for p in config.points())

    assert points() == [("sparsegpt", True), ("wanda", True)]
    assert points("--both") == [("sparsegpt", False), ("sparsegpt", True), ("wanda", False),
                                ("wanda", True)]
    assert points("--no-sds") == [("sparsegpt", False), ("wanda", False)]


@pytest.mark.parametrize("device", ["cdua", "gpu", "cuda:x", "cuda:-1", "cpu:0:1", "mps:"])
def test_a_misspelt_device_is_refused_by_the_configuration(device, clean_environ):
    """The form is checked with the options, without torch, so a run answered from the store
    (which never imports torch) refuses a typo too, as a computing run does."""
    from sds.errors import ConfigError
    from tasks.config import RunConfig, SweepConfig, build

    for kind in (RunConfig, SweepConfig):
        with pytest.raises(ConfigError, match=f"device: '{re.escape(device)}' is not a device"):
            build(kind, {"device": device})
    assert [RunConfig(device=d).device for d in ("cpu", " cuda:1", "mps", "cpu:0", "none",
                                                 None)] == ["cpu", "cuda:1", "mps", "cpu:0",
                                                            None, None]


def test_a_pattern_spelled_twice_is_one_point_of_the_grid(clean_environ):
    """`0.5` and `50%` are one pattern: a grid listing both runs it once, under the first
    spelling (before, twice under one run name). A spelling that does not parse is kept for the
    planner's error."""
    from tasks.config import SweepConfig

    config = SweepConfig(patterns=["0.5", "2:4", "50%", "4:8", "2:4", "0.50", "3:x"])
    assert config.patterns == ["0.5", "2:4", "4:8", "3:x"]
    assert [p.pattern for p in SweepConfig(patterns=["50%", "0.5"]).points()] == ["50%"]


def test_a_model_folder_spelled_twice_is_one_point_of_the_grid(tmp_path, monkeypatch,
                                                                clean_environ):
    """`tiny`, `./tiny/`, its absolute path and a link to it are one model folder: one point
    per method and pattern, under the first spelling (before, each spelling was a point of its
    own, all under one run name: duplicate rows in the table and sweep.json, one folder). Two
    folders of one name stay two models."""
    from tasks.config import SweepConfig

    monkeypatch.chdir(tmp_path)
    for folder in ("tiny", "other/tiny"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "tiny")
    config = SweepConfig(models=["tiny", "./tiny/", str(tmp_path / "tiny"), "link",
                                 "other/tiny", "demo", "org/tiny"], patterns=["2:4", "50%"])
    assert sorted({p.model for p in config.points()}) == ["demo", "org/tiny", "other/tiny",
                                                          "tiny"]
    assert len(config.points()) == 4 * 2


@pytest.mark.parametrize("word", ["none", "off", ""])
def test_out_none_means_no_output_files_not_a_folder_named_none(word, clean_environ):
    from flows.cli import _config, build_parser, sweep_config
    from tasks.config import RunConfig

    assert _config(RunConfig, build_parser().parse_args(["run", "--out", word])).out is None
    assert sweep_config(build_parser().parse_args(["sweep", "--out", word])).out is None


@pytest.mark.parametrize("limit", ["-1", "0", "two"])
def test_serve_refuses_a_limit_below_one(limit, capfd, clean_environ):
    from flows.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["serve", "--limit", limit])
    assert exited.value.code == 2
    assert "at least 1" in capfd.readouterr().err


def test_command_line_options_override_the_grid_file(tmp_path, clean_environ):
    from flows.cli import build_parser, sweep_config

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"seed": 3, "methods": ["wanda"], "nsamples": 16,
                                    "sds_options": {"epochs": 7, "lr": 0.5}}))

    def config(*extra):
        return sweep_config(build_parser().parse_args(["sweep", "--grid", str(grid), *extra]))

    from_file = config()
    assert (from_file.seed, from_file.methods, from_file.nsamples) == (3, ["wanda"], 16)
    assert (from_file.sds_options.epochs, from_file.sds_options.lr) == (7, 0.5)
    given = config("--seed", "0", "--methods", "sparsegpt,magnitude", "--epochs", "9")
    assert (given.seed, given.methods, given.nsamples) == (0, ["sparsegpt", "magnitude"], 16)
    # SDS options override one by one: the file's lr stays
    assert (given.sds_options.epochs, given.sds_options.lr) == (9, 0.5)
    assert [p.seed for p in given.points()] == [0, 0]


def test_a_grid_file_with_an_unknown_option_is_refused(tmp_path, clean_environ):
    from flows.cli import build_parser, sweep_config
    from sds.errors import ConfigError

    grid = tmp_path / "grid.yaml"
    for fields, hint in (({"methods": ["wanda"], "epochs": 5},
                          "epochs: unknown option (an SDS option: put it under sds_options:"),
                         ({"method": "wanda"}, "method: unknown option (did you mean methods?)"),
                         ({"sds_options": {"epoch": 5}},
                          "sds_options.epoch: unknown option (did you mean epochs?)"),
                         ({"zzz": 1}, "zzz: unknown option$")):
        grid.write_text(yaml.safe_dump(fields))
        with pytest.raises(ConfigError, match=re.escape(hint).replace(r"\$", "$")):
            sweep_config(build_parser().parse_args(["sweep", "--grid", str(grid)]))


@pytest.mark.parametrize("case", ["a file", "unwritable"])
def test_an_out_that_cannot_be_written_exits_2_before_any_stage(
        case, tiny_model, corpus, tmp_path, monkeypatch, capfd, clean_environ):
    from flows.cli import main

    if case == "a file":
        out = tmp_path / "results.txt"
        out.write_text("not a folder")
        expected = "is a file, not a folder"
    else:  # inside a file: no folder can be made there, whoever runs it
        (tmp_path / "blocker").write_text("a file")
        out = tmp_path / "blocker" / "out"
        expected = "cannot be written (Not a directory)"
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never reached
    code = main(cli_args(tiny_model, corpus, tmp_path / "store", out))
    assert code == 2
    assert expected in _one_line_error(capfd.readouterr().err)
    assert not list((tmp_path / "store").rglob("meta.json"))


@pytest.mark.parametrize("fault", ["disk full while saving", "store loses its objects"])
def test_a_store_fault_in_the_middle_of_a_run_exits_3_without_retries(
        fault, prefect_api, tiny_model, corpus, tmp_path, monkeypatch, capfd, clean_environ):
    import safetensors.torch

    import tasks.stages
    from flows.cli import main

    store, calls = tmp_path / "store", []
    if fault == "disk full while saving":
        def save_file(tensors, path, *a, **kw):
            calls.append(os.path.dirname(path))
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
        expected = "no space left on the device"
    else:
        load_upstream = tasks.stages.load_upstream

        def losing(store_, spec, stage):  # the calibration vanishes before one-shot reads it
            calls.append(spec.label)
            shutil.rmtree(store / "calibration", ignore_errors=True)
            return load_upstream(store_, spec, stage)

        monkeypatch.setattr(tasks.stages, "load_upstream", losing)
        expected = "run again to recompute it"
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    code = main(cli_args(tiny_model, corpus, store, tmp_path / "out") + ["--gpu-limit", "none"])
    err = capfd.readouterr().err
    assert code == 3, err
    assert expected in err.splitlines()[-1]
    # no stage retried by Prefect: it would not heal. A lost upstream is recomputed once
    # (the run's one repair round), then the run gives up.
    assert calls and max(calls.count(c) for c in calls) == (1 if fault.startswith("disk") else 2)


def _processes_of(home: Path) -> list[int]:
    """Pids of the live processes whose environment holds PREFECT_HOME=home (the command and
    every process it started, in whatever process group)."""
    needle = f"PREFECT_HOME={home}".encode() + b"\0"
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in (entry / "environ").read_bytes() + b"\0":
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    pids.append(int(entry.name))
        except OSError:
            pass
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
@pytest.mark.parametrize("how", ["SIGINT to the process group", "SIGTERM to the command"])
def test_an_interrupted_run_stops_at_once_and_leaves_no_process(how, tmp_path):
    store, home = tmp_path / "store", tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)  # the demo as a user runs it: Prefect's embedded API
    # the demo defaults, with a re-dense step long enough to be interrupted in
    args = ["run", "--nsamples", "4", "--seqlen", "32", "--tasks", "none", "--epochs", "5000",
            "--store", str(store), "--out", str(tmp_path / "out")]
    earlier = tmp_path / "out" / "results.json"  # an earlier run's, which this one keeps
    earlier.parent.mkdir()
    earlier.write_text('{"metrics": {}}')
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)  # its own group, as in a terminal
    try:
        deadline = time.monotonic() + 180
        while not list(store.glob("oneshot/*/meta.json")):  # mid-run: re-dense is computing
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the one-shot stage never finished"
            time.sleep(0.1)
        assert len(_processes_of(home)) >= 2  # the command and Prefect's embedded API
        if how.startswith("SIGINT"):
            os.killpg(process.pid, signal.SIGINT)
            expected = 130
        else:
            process.send_signal(signal.SIGTERM)
            expected = 143
        _out, err = process.communicate(timeout=30)  # seconds, not minutes
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == expected, err
    assert "interrupted" in err and "Traceback" not in err
    assert f"note: {earlier} is an earlier run's; this run wrote no results" in " ".join(
        err.split())
    assert earlier.read_text() == '{"metrics": {}}'
    assert _processes_of(home) == []
    assert not list(store.glob("second/*/meta.json"))


def test_progress_bars_leave_library_output_to_the_log_in_a_terminal(tmp_path):
    """In a terminal rich's bars would take sys.stderr over and print what libraries write
    there (lm-eval's bars) on the terminal; with a log, sys.stderr stays the log's."""
    import io

    from rich.console import Console

    from flows.cli import TerminalProgress

    terminal = Console(file=io.StringIO(), force_terminal=True)
    before = sys.stderr
    with TerminalProgress(terminal, to_log=True):
        assert sys.stderr is before
    with TerminalProgress(terminal, to_log=False):  # --verbose: shown above the bars
        assert sys.stderr is not before
    assert sys.stderr is before


def test_a_stage_that_fails_is_shown_failed_not_just_gone():
    import io
    import logging

    from rich.console import Console

    from flows.cli import TerminalProgress

    out = io.StringIO()
    with TerminalProgress(Console(file=out, width=100)) as display:
        for event in ("start", "failed"):  # the records a stage logs (tasks.common.progress)
            display.handle(logging.makeLogRecord(
                {"msg": "x", "levelno": logging.INFO,
                 "sds": {"title": "second sparsegpt 4:8", "event": event}}))
    assert "✗ second sparsegpt 4:8" in out.getvalue() and "failed" in out.getvalue()


def test_stages_of_one_title_for_several_models_each_get_their_line():
    """A sweep over several models computes a `calibration` (and an `oneshot sparsegpt 2:4`,
    ...) per model at once: each stage is its own bar and line, by its artifact key, with its
    model named; keyed by the title alone, the later starts took the first one's bar and only
    one line of the three was printed."""
    import io
    import logging

    from rich.console import Console

    from flows.cli import TerminalProgress

    models = {"k1": "opt", "k2": "llama", "k3": "tiny"}
    out = io.StringIO()
    with TerminalProgress(Console(file=out, width=200), models=models) as display:
        for event in ("start", "done"):  # all three start before any is done
            for key in models:
                display.handle(logging.makeLogRecord(
                    {"msg": "x", "levelno": logging.INFO,
                     "sds": {"title": "calibration", "key": key, "event": event,
                             "seconds": 0.5}}))
    lines = [line for line in out.getvalue().splitlines() if "computed in" in line]
    assert len(lines) == 3, out.getvalue()
    assert {name for name in models.values() if any(f"({name})" in ln for ln in lines)} \
        == set(models.values())


def test_the_progress_lines_tell_two_model_folders_of_one_name_apart(tmp_path, corpus,
                                                                      clean_environ):
    """`--models a/opt,b/opt` (two models): their run names get a short hash each; the progress
    lines name each stage's model the same way, not `(opt)` for both."""
    from flows.cli import _stage_models
    from flows.report import run_names
    from tasks.config import SweepConfig, build
    from tasks.plan import plan_pipeline
    from tests.test_pipeline_fixtures import save_opt

    folders = [save_opt(tmp_path / "a" / "opt", layers=1), save_opt(tmp_path / "b" / "opt")]
    config = build(SweepConfig, {"models": [str(f) for f in folders],
                                 "calib": str(corpus["calib"]), "eval": [str(corpus["heldout"])],
                                 "tasks": [], "nsamples": 4, "seqlen": 32,
                                 "store": str(tmp_path / "store")})
    plans = [plan_pipeline(p, check=False) for p in config.points()]
    models = _stage_models(config)
    labels = [models[plan.specs["calibration"].key] for plan in plans]
    runs = run_names([plan.settings for plan in plans])
    assert len(set(labels)) == 2, labels
    assert all(label.startswith("opt-") and run.endswith(label.removeprefix("opt"))
               for label, run in zip(labels, runs)), (labels, runs)


def test_library_warnings_reach_the_terminal_without_verbose():
    """Prefect's console handler shows the library's warnings only with --verbose; the
    progress display says them (once each), or the experts of a mixture of experts left dense
    would go unsaid. With --verbose Prefect's handler says them and the display does not."""
    import io
    import logging

    from rich.console import Console

    from flows.cli import TerminalProgress

    message = "89% of the blocks' weights are not in linear layers and stay dense"
    out = io.StringIO()
    with TerminalProgress(Console(file=out, width=200)):
        for _ in range(2):  # every walk of the run says it again
            logging.getLogger("sds").warning(message)
        logging.getLogger("sds").info("not a warning")
    assert out.getvalue().count(message) == 1 and "not a warning" not in out.getvalue()
    out = io.StringIO()
    with TerminalProgress(Console(file=out, width=200), warnings=False):
        logging.getLogger("sds").warning(message)
    assert message not in out.getvalue()


def test_a_warning_said_before_the_flow_still_reaches_the_log(tmp_path):
    """`_warn` prints the few-tokens warning on the terminal before the flow (not in sds.log,
    which the flow's stderr goes to): when the stage logs it, the terminal does not show it a
    second time, but sds.log gets it, once (README: the warnings are written to sds.log)."""
    import io
    import logging

    from rich.console import Console

    from flows.cli import TerminalProgress, _stderr_to

    message = "SDS with 128 calibration tokens: too few"
    out, log = io.StringIO(), tmp_path / "sds.log"
    with _stderr_to(log), TerminalProgress(Console(file=out, width=200), to_log=True,
                                           said=frozenset({message})):
        for _ in range(2):  # the second stage logs it; so would a second walk
            logging.getLogger("sds").warning(message)
    assert message not in out.getvalue()
    assert log.read_text().count(f"warning: {message}") == 1


@pytest.mark.filterwarnings("ignore:Logger 'prefect.flow_runs' attempted")  # no flow run
def test_a_clock_far_off_the_stores_is_said_on_the_terminal_without_verbose():
    """The flow logs the clock warning on its run logger, which Prefect's console handler shows
    only with --verbose (and, its level CRITICAL, not in sds.log either): the progress display
    says it, once; the flows' other warnings stay Prefect's."""
    import io
    import logging
    import types

    from rich.console import Console

    from flows.cli import TerminalProgress
    from tasks.common import _check_clock

    store = types.SimpleNamespace(root="s3://bucket/runs",
                                  clock_offset=lambda name, before, after: 100.0)
    flows = logging.getLogger("prefect.flow_runs")
    out = io.StringIO()
    with TerminalProgress(Console(file=out, width=300)):
        for _ in range(2):
            _check_clock(store, ".pins/x.json", 0.0, 1.0, 60.0, flows)
        flows.warning("some other warning of a flow run")
    said = " ".join(out.getvalue().split())
    assert said.count("warning: this machine's clock is 100 s behind the clock of the store "
                      "s3://bucket/runs") == 1, said
    assert "some other warning" not in said
    out = io.StringIO()
    with TerminalProgress(Console(file=out, width=300), warnings=False):  # --verbose
        _check_clock(store, ".pins/x.json", 0.0, 1.0, 60.0, flows)
    assert "clock" not in out.getvalue()


def _session(pid: int) -> int:
    """The session id of a process (/proc/<pid>/stat, the sixth field)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_ctrl_c_stops_sds_serve_without_waiting_out_its_grace(tmp_path):
    """A terminal's Ctrl-C reaches the whole foreground group. The API server that `sds serve`
    starts runs in a session of its own (not Prefect's own temporary server, in the command's
    group), so it is still there while Prefect pauses the schedules: the command ends in
    seconds, not after SERVE_GRACE_SECONDS of calls to a dead server."""
    from flows.cli import SERVE_GRACE_SECONDS

    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "PYTHONPATH": str(REPO)}
    for name in ("PREFECT_API_URL", "PYTEST_CURRENT_TEST", "PYTEST_VERSION"):
        env.pop(name, None)  # Prefect stops differently under a test runner
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve"], env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # its own group, as in a terminal
    try:
        for line in process.stdout:  # until Prefect says it serves
            if "being served" in line:
                break
        time.sleep(5)  # the runner starts polling (a Ctrl-C before that stops less)
        assert process.poll() is None, process.communicate()
        servers = [pid for pid in _processes_of(home) if pid != process.pid]
        assert servers and all(_session(pid) != _session(process.pid) for pid in servers)
        os.killpg(process.pid, signal.SIGINT)
        _out, err = process.communicate(timeout=SERVE_GRACE_SECONDS - 10)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, err
    assert "schedules are paused" in err
    assert _processes_of(home) == []


def test_the_command_turns_prefect_analytics_off_on_both_sides_unless_told_otherwise(
        monkeypatch, clean_environ):
    from flows.cli import configure_environment

    for name in ("PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK"):
        monkeypatch.delenv(name, raising=False)
    configure_environment(verbose=False)
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert os.environ["DO_NOT_TRACK"] == "1"
    monkeypatch.setenv("DO_NOT_TRACK", "0")  # a user's own choice wins
    configure_environment(verbose=False)
    assert os.environ["DO_NOT_TRACK"] == "0"


def test_a_run_is_offline_unless_its_configuration_may_need_the_hub():
    """The hub decision reads the one configuration, so a grid file's models count too."""
    from flows.cli import uses_hub
    from tasks.config import RunConfig, SweepConfig

    assert not uses_hub(RunConfig())
    assert not uses_hub(RunConfig(eval="wiki,news", tasks="demo_last_word", calib="demo"))
    assert not uses_hub(SweepConfig(models=["demo"], methods=["wanda", "admm"]))
    for needs in (RunConfig(model="facebook/opt-125m"), RunConfig(calib="c4"),
                  RunConfig(eval="wiki,wikitext2"), RunConfig(tasks="sds"),
                  SweepConfig(models=["demo", "facebook/opt-125m"])):
        assert uses_hub(needs), needs
    assert uses_hub(RunConfig(), online=True)


def test_the_configuration_accepts_exactly_the_dtypes_the_model_loader_accepts():
    from sds.models import _DTYPES
    from tasks.config import RunConfig

    # one spelling per dtype, so that fp32 and float32 give the same keys
    for d, torch_dtype in _DTYPES.items():
        canonical = RunConfig(dtype=d).dtype
        assert _DTYPES[canonical] == torch_dtype and canonical in ("auto", "float32",
                                                                  "bfloat16", "float16")


def test_keys_hash_what_changes_a_result_and_nothing_else(tiny_model, corpus, tmp_path):
    """dtype spellings, SDS options that step 3 does not read, and the zero-shot options
    without tasks leave the keys; trust_remote_code changes every key."""
    from tasks.plan import plan_pipeline

    def keys(**changes):
        return plan_pipeline(tiny_params(tiny_model, corpus, tmp_path / "store", **changes),
                             check=False).keys()

    first = keys()
    assert keys(dtype="fp32") == keys(dtype="float32")
    assert keys(sds_options={"epochs": 5, "adjust_epochs": 5, "lr": 0.5}) == keys(
        sds_options={"epochs": 5, "adjust_epochs": 5})  # lr: the pgd solver's
    assert keys(limit=7, batch_size=2) == first  # no zero-shot tasks here
    remote = keys(trust_remote_code=True)
    assert all(remote[label] != first[label] for label in first)


def test_data_files_key_on_their_content_not_on_where_they_are(tiny_model, corpus, tmp_path):
    """The same calibration and evaluation files in another folder (a moved project, another
    machine of a pool sharing the store) give the same keys, and each plan's stages read the
    files at its own paths; another content gives other keys."""
    from tasks.plan import plan_pipeline

    def plan_from(folder):
        folder.mkdir()
        files = {name: folder / corpus[name].name for name in ("calib", "heldout")}
        for name, path in files.items():
            shutil.copy(corpus[name], path)
        return plan_pipeline(tiny_params(tiny_model, {**corpus, **files}, tmp_path / "store"),
                             check=False), files

    here, here_files = plan_from(tmp_path / "here")
    there, there_files = plan_from(tmp_path / "there")
    assert here.keys() == there.keys()
    assert there.specs["calibration"].paths == {"calib": str(there_files["calib"])}
    assert there.specs["evaluate-dense"].paths == {"eval": [str(there_files["heldout"])]}
    assert str(there_files["calib"]) not in json.dumps(there.specs["calibration"].config)
    with open(there_files["calib"], "a") as f:
        f.write("\n\nOne more document.\n")
    edited = plan_pipeline(tiny_params(tiny_model, {**corpus, **there_files},
                                       tmp_path / "store"), check=False)
    assert edited.keys()["calibration"] != here.keys()["calibration"]
    assert edited.keys()["evaluate-dense"] == here.keys()["evaluate-dense"]


def test_a_plan_is_made_again_when_its_local_inputs_change(tiny_model, corpus, tmp_path):
    """Plans are kept per process and configuration, but not past an edit of the model folder
    or a data file: a notebook that edits them between runs gets new keys."""
    from tasks.plan import plan_pipeline
    from tests.test_pipeline_fixtures import tiny_params

    model, calib = tmp_path / "model", tmp_path / "calib.txt"
    shutil.copytree(tiny_model, model)
    shutil.copy(corpus["calib"], calib)
    config = tiny_params(model, {**corpus, "calib": calib}, tmp_path / "store")
    first = plan_pipeline(config, check=False)
    assert plan_pipeline(config, check=False) is first  # nothing changed: the same plan
    with open(calib, "a") as f:
        f.write("\n\nOne more document.\n")
    second = plan_pipeline(config, check=False).keys()
    assert second["calibration"] != first.keys()["calibration"]
    settings = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**settings, "note": "edited"}))
    third = plan_pipeline(config, check=False).keys()
    assert all(third[label] != second[label] for label in third)


def test_a_hub_model_is_loaded_at_the_commit_its_keys_hash(corpus, tmp_path, monkeypatch):
    """The keys hash the commit a branch resolves to at planning; the stages load that commit,
    so a branch that moves during a long run cannot put new weights under the old key."""
    import types

    from tasks.plan import plan_pipeline
    from tests.test_pipeline_fixtures import tiny_params

    commit = "0123456789abcdef0123456789abcdef01234567"

    class Hub:
        def model_info(self, model, revision=None):
            assert model == "org/moving-branch" and revision == "main"
            return types.SimpleNamespace(sha=commit)

    hub_answering(monkeypatch, Hub)
    plan = plan_pipeline(tiny_params("org/moving-branch", corpus, tmp_path / "store",
                                     revision="main"), check=False)
    for spec in plan.specs.values():
        assert spec.model.identity["revision"] == commit and spec.model.revision == commit


def test_an_unreachable_hub_fails_the_plan_of_a_hub_model_in_seconds(
        corpus, tmp_path, monkeypatch):
    """Without the offline mode the hub client retries for about 25 s, printing a line per
    try: the plan probes the hub first and says in one line what to do."""
    import socket

    import huggingface_hub
    import huggingface_hub.constants

    import tasks.plan
    from sds.errors import HubUnreachableError
    from tasks.plan import plan_pipeline

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def unreachable(address, timeout=None, *args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    def asked(*args, **kwargs):
        raise AssertionError("the hub client was asked")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    import sds.models  # noqa: F401 - imports transformers, which reads HfApi as it loads
    monkeypatch.setattr(huggingface_hub, "HfApi", asked)
    monkeypatch.setattr(tasks.plan, "_plans", {})
    for check in (False, True):
        tasks.plan.model_identity.cache_clear()
        with pytest.raises(HubUnreachableError,
                           match="model 'org/model'.*unreachable.*--model path/to/model.*"
                                 "HF_HUB_OFFLINE=1"):
            plan_pipeline(tiny_params("org/model", corpus, tmp_path / "store"), check=check)
    # a local path with a typo is not a hub id: it is said to be missing, not unreachable
    from sds.errors import ModelError


    with pytest.raises(ModelError, match="typo-model' does not exist"):
        plan_pipeline(tiny_params(str(tmp_path / "typo-model"), corpus, tmp_path / "store"))


def _hub_cache(tmp_path, model_folder, repo_id: str, commit: str) -> Path:
    """A Hugging Face hub cache holding `model_folder` as `repo_id` at `commit`, on branch
    main, laid out as the hub client leaves it."""
    cache = tmp_path / "hub-cache"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache


def test_offline_a_hub_model_is_planned_at_the_commit_of_the_local_cache(
        corpus, tmp_path, monkeypatch, tiny_model):
    import huggingface_hub
    import huggingface_hub.constants

    import tasks.plan
    from sds.errors import HubUnreachableError
    from tasks.plan import plan_pipeline

    commit = "89abcdef" * 5
    cache = _hub_cache(tmp_path, tiny_model, "org/cached", commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    monkeypatch.setattr(tasks.plan, "_check_model", lambda *args: (None, 32))
    for revision in (None, "main", commit):
        tasks.plan.model_identity.cache_clear()
        plan = plan_pipeline(tiny_params("org/cached", corpus, tmp_path / "store",
                                         revision=revision), check=False)
        assert {spec.model.revision for spec in plan.specs.values()} == {commit}
    tasks.plan.model_identity.cache_clear()
    for missing in (("org/cached", "other-branch"), ("org/absent", None)):
        with pytest.raises(HubUnreachableError, match="offline mode is on .*local Hugging Face "
                                                      "cache"):
            plan_pipeline(tiny_params(missing[0], corpus, tmp_path / "store",
                                      revision=missing[1]), check=False)


@pytest.mark.slow
def test_offline_a_hub_model_in_the_local_cache_runs_as_its_folder_does(
        prefect_api, tiny_model, corpus, tmp_path):
    """HF_HUB_OFFLINE=1 and the model in the Hugging Face cache (as a download leaves it): the
    run needs no hub and gives the numbers of the same model as a local folder."""
    commit = "0123abcd" * 5
    cache = _hub_cache(tmp_path, tiny_model, "org/cached", commit)
    env = server_env(tmp_path, HF_HUB_CACHE=str(cache))
    results = {}
    for name, model in (("hub", "org/cached"), ("folder", str(tiny_model))):
        out = tmp_path / f"out-{name}"
        args = cli_args(tiny_model, corpus, tmp_path / "store", out)
        args[args.index("--model") + 1] = model
        done = sds_command(args, env)
        assert done.returncode == 0, done.stderr
        results[name] = json.loads((out / "results.json").read_text())
    identity = results["hub"]["config"]["identity"]
    assert identity["kind"] == "hub" and identity["revision"] == commit
    assert results["hub"]["metrics"] == results["folder"]["metrics"]


def test_a_model_folder_keys_on_the_files_loading_reads(corpus, tmp_path, tiny_model,
                                                       monkeypatch):
    """A copy under another name shares the keys; download bookkeeping (`.cache/`), other
    hidden files and subfolders (Trainer checkpoints) change nothing; a changed byte of a model
    file changes every key, also within one process when the edit keeps the file's size and
    modification time (its change time moves)."""
    import tasks.plan
    from tasks.plan import plan_pipeline

    monkeypatch.setattr(tasks.plan, "_plans", {})

    def keys(model):
        return plan_pipeline(tiny_params(model, corpus, tmp_path / "store"), check=False).keys()

    base = keys(tiny_model)
    copy = tmp_path / "another-name"
    shutil.copytree(tiny_model, copy)
    assert keys(copy) == base
    (copy / ".cache" / "huggingface" / "download").mkdir(parents=True)
    (copy / ".cache" / "huggingface" / "download" / "model.safetensors.metadata").write_text(
        f"{'a' * 40}\n{'e' * 64}\n{time.time()}\n")
    (copy / ".DS_Store").write_bytes(b"x")
    (copy / "checkpoint-1").mkdir()
    (copy / "checkpoint-1" / "model.safetensors").write_bytes(b"not read")
    assert keys(copy) == base

    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    stat = weights.stat()
    data[-1] ^= 1  # the last byte of the last tensor: same size
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p` would leave it
    assert weights.stat().st_mtime_ns == stat.st_mtime_ns
    changed = keys(copy)
    assert all(changed[label] != key for label, key in base.items())


def test_an_evaluation_file_too_short_for_one_window_is_refused_at_planning(
        corpus, tmp_path, tiny_model, monkeypatch):
    """Found at its evaluation it would fail the run after the pruning stages (hours on a
    large model); the plan says it at once, with the numbers the evaluation would give, and a
    file long enough passes."""
    import tasks.plan
    from sds.data import load_eval_tokens
    from sds.errors import DataError
    from sds.models import load_tokenizer
    from tasks.plan import plan_pipeline

    monkeypatch.setattr(tasks.plan, "_plans", {})
    short = tmp_path / "short.txt"
    short.write_text("A few words only.\n")
    tokens = load_eval_tokens(load_tokenizer(str(tiny_model)), str(short))[0].shape[1]
    assert tokens < 32
    with pytest.raises(DataError, match=rf"'{short}' has {tokens} tokens, fewer than one "
                                        r"window of seqlen=32"):
        plan_pipeline(tiny_params(tiny_model, {**corpus, "heldout": short}, tmp_path / "store"))
    assert not (tmp_path / "store").exists()  # nothing ran
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="holds no text"):
        plan_pipeline(tiny_params(tiny_model, {**corpus, "heldout": empty}, tmp_path / "store"))
    plan_pipeline(tiny_params(tiny_model, corpus, tmp_path / "store"))  # long enough


def test_a_model_folder_saved_without_its_tokenizer_is_refused_at_planning(
        corpus, tmp_path, tiny_model, monkeypatch):
    """transformers makes an empty tokenizer for such a folder, and the calibration would then
    say the corpus is too short: the plan names the missing tokenizer instead."""
    import tasks.plan
    from sds.errors import ModelError
    from tasks.plan import plan_pipeline

    monkeypatch.setattr(tasks.plan, "_plans", {})
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for f in tiny_model.iterdir():
        if f.is_file() and not f.name.startswith(("tokenizer", "special_tokens", "vocab",
                                                  "merges")):
            shutil.copy(f, folder / f.name)
    with pytest.raises(ModelError, match="has no usable tokenizer.*save_pretrained"):
        plan_pipeline(tiny_params(folder, corpus, tmp_path / "store"))


def test_a_model_folder_without_its_weights_or_a_shard_exits_2_before_any_stage(
        corpus, tmp_path, tiny_model, monkeypatch, capfd, clean_environ):
    """A folder holding only config and tokenizer, or a sharded model one shard short, used to
    pass planning and fail when the first pruning stage loaded the model, after the calibration
    (and, with tasks, the dense evaluation) ran. The plan names the missing file; the complete
    sharded copy of the same model plans."""
    from transformers import AutoModelForCausalLM

    import tasks.plan
    from flows.cli import main

    monkeypatch.setattr(tasks.plan, "_plans", {})
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never reached
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for f in tiny_model.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, no_weights / f.name)
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_model).save_pretrained(sharded,
                                                                     max_shard_size="100KB")
    for f in tiny_model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, sharded / f.name)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) >= 2
    one_short = tmp_path / "one-short"
    shutil.copytree(sharded, one_short)
    (one_short / shards[1].name).unlink()

    for folder, expected in ((no_weights, "holds no weights file"),
                             (one_short, f"lacks the weights shard '{shards[1].name}'")):
        capfd.readouterr()
        code = main(cli_args(folder, corpus, tmp_path / "store", tmp_path / "out"))
        assert code == 2
        assert expected in _one_line_error(capfd.readouterr().err)
        assert not (tmp_path / "store").exists() and not (tmp_path / "out").exists()
    tasks.plan.plan_pipeline(tiny_params(sharded, corpus, tmp_path / "store"))  # complete


def test_a_llama_folder_saved_without_its_tokenizer_names_the_missing_tokenizer(
        corpus, tmp_path, monkeypatch, capfd, clean_environ):
    """For a LLaMA folder without tokenizer files transformers does not make an empty
    tokenizer but raises, advising to install sentencepiece or tiktoken, which does not help:
    the command says the tokenizer is missing and how to save it (exit 2, nothing written)."""
    import tasks.plan
    from flows.cli import main
    from sds import demo

    monkeypatch.setattr(tasks.plan, "_plans", {})
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never reached
    llama = Path(demo.demo_model_path("llama"))
    folder = tmp_path / "llama-no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(llama / name, folder / name)
    capfd.readouterr()
    code = main(cli_args(folder, corpus, tmp_path / "store", tmp_path / "out"))
    line = _one_line_error(capfd.readouterr().err)
    assert code == 2
    assert "holds no tokenizer files" in line and "tokenizer.save_pretrained" in line
    assert "sentencepiece" not in line


@pytest.mark.parametrize("regex", ["layers\\.[ab]", "mlp[/]"])
def test_an_error_naming_brackets_prints_them_as_typed(regex, corpus, tmp_path, tiny_model,
                                                       monkeypatch, capfd, clean_environ):
    """The console reads `[...]` as rich markup: an --override regex with a character class
    lost it in the error line (`'layers\\.'` for `'layers\\.[ab]'`), and `[/]` made the
    printer itself raise, a traceback and exit 1 instead of the one line and exit 2."""
    import tasks.plan
    from flows.cli import main

    monkeypatch.setattr(tasks.plan, "_plans", {})
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never reached
    args = cli_args(tiny_model, corpus, tmp_path / "store", tmp_path / "out")
    capfd.readouterr()
    code = main([*args, "--override", f"{regex}=4:8"])
    line = _one_line_error(capfd.readouterr().err)
    assert code == 2
    assert f"override {regex!r}=4:8 matches no pruned layer" in line
    assert not (tmp_path / "store").exists() and not (tmp_path / "out").exists()


def test_relative_data_paths_are_planned_from_the_working_directory(tmp_path, tiny_model,
                                                                   monkeypatch):
    """The same configuration naming `calib.txt` from two folders plans each folder's file."""
    import tasks.plan
    from tasks.config import RunConfig
    from tasks.plan import plan_pipeline
    from tests.test_pipeline_fixtures import tiny_options

    monkeypatch.setattr(tasks.plan, "_plans", {})
    planned = {}
    for name, text in (("a", "one text of the first folder.\n" * 40),
                       ("b", "another text of the second folder.\n" * 40)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "calib.txt").write_text(text)
        monkeypatch.chdir(tmp_path / name)
        options = tiny_options(str(tiny_model), {"calib": "calib.txt", "heldout": "calib.txt"},
                               tmp_path / "store")
        plan = plan_pipeline(RunConfig(**options), check=False)
        planned[name] = (plan.specs["calibration"].paths["calib"], plan.keys())
    assert planned["a"][0] == str(tmp_path / "a" / "calib.txt")
    assert planned["b"][0] == str(tmp_path / "b" / "calib.txt")
    assert planned["a"][1]["calibration"] != planned["b"][1]["calibration"]


def test_the_help_of_a_no_flag_says_what_the_flag_does():
    """`--no-export` and the like turn a field off: their help is the description's "(off:
    ...)" part, not the description of the field turned on."""
    import argparse

    from flows.cli import build_parser
    from tasks.config import RunConfig, SweepConfig

    commands = next(a for a in build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction)).choices
    checked = set()
    for command, kind in (("run", RunConfig), ("sweep", SweepConfig)):
        for action in commands[command]._actions:
            field = kind.model_fields.get(action.dest)
            if field is None or field.default is not True:
                continue
            assert action.option_strings == [f"--no-{action.dest.replace('_', '-')}"]
            _on, off, when_off = field.description.partition(" (off: ")
            assert off, f"{action.dest}: the description does not say what off means"
            assert action.help == when_off.removesuffix(")")
            checked.add(action.dest)
    assert checked == {"verify", "sds", "export"}


def test_sds_options_with_no_sds_are_refused_not_ignored(tiny_model, corpus, tmp_path, capfd,
                                                        clean_environ):
    from flows.cli import main

    args = cli_args(tiny_model, corpus, tmp_path / "store", tmp_path / "out")  # --epochs ...
    assert main(args + ["--no-sds", "--l1", "0"]) == 2
    line = _one_line_error(capfd.readouterr().err)
    assert "--adjust-epochs, --epochs, --lambda1: SDS options, but SDS is off (--no-sds" in line
    assert not (tmp_path / "store").exists()


def test_a_sweep_whose_grid_gives_sds_options_without_sds_is_refused(tmp_path, clean_environ):
    from flows.cli import build_parser, sweep_config
    from sds.errors import ConfigError

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"methods": ["wanda"], "sds_options": {"epochs": 400}}))
    with pytest.raises(ConfigError, match="--epochs: SDS options, but SDS is off"):
        sweep_config(build_parser().parse_args(["sweep", "--grid", str(grid), "--no-sds"]))
    grid.write_text(yaml.safe_dump({"sds": [False], "sds_options": {"epochs": 400}}))
    with pytest.raises(ConfigError, match="sds: false in the grid file"):
        sweep_config(build_parser().parse_args(["sweep", "--grid", str(grid)]))
    grid.write_text(yaml.safe_dump({"sds": [False, True], "sds_options": {"epochs": 400}}))
    assert sweep_config(build_parser().parse_args(["sweep", "--grid", str(grid)])).sds == [
        False, True]  # the options serve the SDS points


def test_every_sds_option_says_what_it_does_in_the_help():
    """The SDS options' help is their one-line description and default, not the default
    alone; a new SDSConfig field without a description fails here."""
    import argparse
    import dataclasses

    from flows.cli import build_parser
    from sds.options import SDS_OPTION_HELP, SDSConfig

    run = next(a for a in build_parser()._actions
               if isinstance(a, argparse._SubParsersAction)).choices["run"]
    helps = {a.dest.removeprefix("sds_options."): a.help for a in run._actions
             if a.dest.startswith("sds_options.")}
    fields = {f.name: f.default for f in dataclasses.fields(SDSConfig)}
    assert set(helps) == set(fields) == set(SDS_OPTION_HELP)
    for name, default in fields.items():
        text = SDS_OPTION_HELP[name].replace("%", "%%")
        assert helps[name] == (f"turn off (on by default: {text})" if default is True
                               else f"{text} (default {default})")
    assert "`--epochs`" not in run.format_help() and "0 skips step 2" in run.format_help()


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): _sha256(p) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", ["out holds the model as out/model", "out is the model folder",
                                  "out lies inside the model folder",
                                  "a sweep's out holds one of its models"])
def test_an_out_overlapping_a_model_folder_exits_2_and_leaves_the_model_alone(
        case, tiny_model, corpus, tmp_path, monkeypatch, capfd, clean_environ):
    from flows.cli import main

    model = tmp_path / "x" / "model"
    shutil.copytree(tiny_model, model)
    before = _files(model)
    out = {"out holds the model as out/model": model.parent, "out is the model folder": model,
           "out lies inside the model folder": model / "results",
           "a sweep's out holds one of its models": tmp_path}[case]
    args = cli_args(model, corpus, tmp_path / "store", out)
    if case.startswith("a sweep"):
        args[0] = "sweep"
        at = args.index("--model")
        args[at : at + 2] = ["--models", f"{tiny_model},{model}"]
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never reached
    capfd.readouterr()
    assert main(args) == 2
    assert f"overlaps the model folder {model.resolve()}" in _one_line_error(capfd.readouterr().err)
    assert _files(model) == before
    assert not list((tmp_path / "store").rglob("meta.json"))


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_a_folder_of_the_users_where_the_export_goes_stops_the_run_untouched(
        command, tiny_model, corpus, tmp_path, monkeypatch, capfd, clean_environ):
    """`sds run --out .` in a project with its own `model/` folder: the export would replace
    it, so the run stops before any stage (exit 2) and the folder keeps its files. A sweep
    checks each point's `<out>/<run>/model`."""
    from flows.cli import _config, build_parser, main
    from flows.report import run_names
    from tasks.config import SweepConfig
    from tasks.plan import plan_pipeline

    out = tmp_path / "project"
    args = cli_args(tiny_model, corpus, tmp_path / "store", out)
    folder = out / "model"
    if command == "sweep":
        args[0] = "sweep"
        at = args.index("--model")
        args[at] = "--models"
        args.append("--export")  # a sweep writes model folders only when asked
        sweep = _config(SweepConfig, build_parser().parse_args(args))
        points = [plan_pipeline(p, check=False).settings for p in sweep.points()]
        folder = out / run_names(points)[0] / "model"
    folder.mkdir(parents=True)
    (folder / "train.py").write_text("print('my code')\n")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never reached
    capfd.readouterr()
    assert main(args) == 2
    error = _one_line_error(capfd.readouterr().err)
    assert f"{folder} exists and sds did not write it" in error and "--out" in error
    assert [p.name for p in folder.iterdir()] == ["train.py"]
    assert not list((tmp_path / "store").rglob("meta.json"))


def test_the_export_itself_replaces_only_folders_sds_wrote(tmp_path):
    """The guard of `write_model` (a sweep point's folder made after the checks, or a caller
    that skipped them): a folder or a link without the marker stays; one with it goes, and a
    link goes without what it leads to."""
    from sds.errors import ConfigError
    from tasks.export import MARKER, _set_aside, check_replaceable

    check_replaceable(tmp_path / "absent")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("keep")
    with pytest.raises(ConfigError, match="sds did not write it"):
        check_replaceable(mine)
    link = tmp_path / "link"
    link.symlink_to(mine)
    with pytest.raises(ConfigError, match="sds did not write it"):
        check_replaceable(link)
    (mine / MARKER).write_text("{}")  # an earlier export's folder, reached through the link
    check_replaceable(link)
    _set_aside(link)
    assert not link.exists() and not link.is_symlink() and (mine / "notes.md").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_out_whose_model_is_a_link_to_the_model_folder_is_refused(tiny_model, tmp_path):
    from flows.cli import check_out_apart
    from sds.errors import ConfigError

    model = tmp_path / "models" / "opt"
    shutil.copytree(tiny_model, model)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model").symlink_to(model)  # exporting would replace what it leads to
    with pytest.raises(ConfigError, match="overlaps the model folder"):
        check_out_apart(str(tmp_path / "out"), str(model))


def test_an_out_that_holds_a_model_folder_elsewhere_is_accepted_for_a_run(tiny_model, tmp_path):
    """A run writes only `results.json`, `sds.log` and `model/` into --out: a model folder at
    `<out>/models/opt` is left alone, so `sds run --model models/opt --out .` is fine."""
    from flows.cli import check_out_apart
    from sds.errors import ConfigError

    model = tmp_path / "models" / "opt"
    shutil.copytree(tiny_model, model)
    check_out_apart(str(tmp_path), str(model))
    with pytest.raises(ConfigError, match="overlaps the model folder"):
        check_out_apart(str(tmp_path), str(model), sweep=True)


@pytest.mark.parametrize("empty", ["--models none", "--methods none", "--patterns none",
                                   "sds: [] in the grid file"])
def test_a_sweep_with_an_empty_grid_dimension_exits_2_before_anything_runs(
        empty, tmp_path, monkeypatch, capfd, clean_environ):
    from flows.cli import main

    args = ["sweep", "--nsamples", "4", "--seqlen", "32", "--tasks", "none", "--eval", "wiki",
            "--store", str(tmp_path / "store"), "--out", str(tmp_path / "out")]
    if empty.startswith("sds"):
        grid = tmp_path / "grid.yaml"
        grid.write_text(yaml.safe_dump({"sds": []}))
        args += ["--grid", str(grid)]
        field = "sds"
    else:
        args += empty.split()
        field = empty.split()[0].removeprefix("--")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never reached
    capfd.readouterr()
    assert main(args) == 2
    assert f"{field}: is empty" in _one_line_error(capfd.readouterr().err)
    assert not (tmp_path / "store").exists() and not (tmp_path / "out").exists()


def test_a_sweep_with_a_failed_point_shows_the_finished_ones_and_every_failure(
        tmp_path, monkeypatch, capfd, clean_environ):
    """The finished points' results are written (sweep.json, their results.json): the table
    shows them, every failed point gets its line, and a failed point's folder that holds an
    earlier sweep's results.json is said to be stale. Before, only the first failure was named
    and the earlier results.json stood beside the failure unremarked."""
    from flows import cli
    from flows.sweep import SweepError

    out = tmp_path / "out"
    finished = {"name": "demo-wanda-2-4-oneshot", "keys": {}, "improvement": {},
                "metrics": {"dense": {"ppl/wiki": 178.8}, "oneshot": {"ppl/wiki": 215.2}}}
    failures = [{"name": f"bad{i}-wanda-2-4-oneshot", "error": f"reason {i}",
                 "type": "NumericalError"} for i in (1, 2)]
    earlier = out / failures[1]["name"] / "results.json"  # an earlier sweep's, of that point
    earlier.parent.mkdir(parents=True)
    earlier.write_text("{}")

    def failing(*_args, **_kwargs):
        raise SweepError("2 of 3 runs failed; first: bad1-wanda-2-4-oneshot: reason 1",
                         {"runs": [finished], "failures": failures})

    monkeypatch.setattr(cli, "_check", lambda *a, **k: None)
    monkeypatch.setattr(cli, "_run_flow", failing)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never reached
    capfd.readouterr()
    assert cli.main(["sweep", "--methods", "wanda", "--no-sds", "--out", str(out),
                     "--store", str(tmp_path / "store")]) == 1
    captured = capfd.readouterr()
    assert "demo-wanda-2-4-oneshot" in captured.out and "215.2" in captured.out
    for failure in failures:
        assert f"failed: {failure['name']}: {failure['error']}" in captured.err
    assert f"note: {earlier} is an earlier sweep's" in " ".join(captured.err.split())
    assert captured.err.count("is an earlier sweep's") == 1  # the first has no folder
    assert "error: 2 of 3 runs failed" in captured.err


@pytest.mark.parametrize("text", ["patterns: [2:4]\nmethods: [wanda]\npatterns: [50%]\n",
                                  "sds_options: {epochs: 3, epochs: 5}\n"])
def test_a_grid_file_giving_a_key_twice_exits_2_before_anything_runs(
        text, tmp_path, monkeypatch, capfd, clean_environ):
    """PyYAML keeps the last of two equal keys: `patterns:` written twice swept the second list
    alone, without a word. It is refused, naming the key and its lines."""
    from flows.cli import main

    grid = tmp_path / "grid.yaml"
    grid.write_text(text)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never reached
    capfd.readouterr()
    assert main(["sweep", "--grid", str(grid), "--store", str(tmp_path / "store"),
                 "--out", str(tmp_path / "out")]) == 2
    error = _one_line_error(capfd.readouterr().err)
    key = text.split(":")[0] if text.startswith("patterns") else "epochs"
    assert f"'{key}' is given twice" in error, error
    assert not (tmp_path / "store").exists() and not (tmp_path / "out").exists()


def test_a_grid_file_may_merge_a_mapping_and_override_its_keys(tmp_path, clean_environ):
    """YAML's merge key (`<<: *defaults`) stays usable beside the refusal of a key given twice:
    the mapping's own key overrides the merged one, as the YAML merge spec says."""
    from flows.cli import _grid

    grid = tmp_path / "grid.yaml"
    grid.write_text("sds_options:\n  <<: {epochs: 3, l1: 0.1}\n  epochs: 5\n")
    assert _grid(str(grid)) == {"sds_options": {"epochs": 5, "l1": 0.1}}


def test_a_json_grid_file_indented_with_tabs_is_read_as_json(tmp_path, clean_environ):
    """JSON allows tabs between tokens (`json.dump(..., indent="\\t")`, `jq --tab`); YAML, which
    read every grid file, refuses them: such a .json grid failed as "not valid YAML"."""
    from flows.cli import _grid
    from sds.errors import ConfigError

    values = {"models": ["demo"], "patterns": ["2:4", "50%"], "nsamples": 4,
              "sds_options": {"epochs": 3}}
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps(values, indent="\t"))
    assert _grid(str(grid)) == values
    grid.write_text('{"patterns": ["2:4",]}')
    with pytest.raises(ConfigError, match="is not valid JSON"):
        _grid(str(grid))


@pytest.mark.parametrize("text", ['{"patterns": ["2:4"], "methods": ["wanda"], '
                                  '"patterns": ["50%"]}',
                                  '{"sds_options": {"epochs": 3, "epochs": 5}}'])
def test_a_json_grid_file_giving_a_key_twice_is_refused_as_a_yaml_one_is(text, tmp_path,
                                                                        clean_environ):
    """`json.loads` keeps the last of two equal keys: a .json grid naming `patterns` twice
    swept the second list alone, where the same file named .yaml is refused."""
    from flows.cli import _grid
    from sds.errors import ConfigError

    key = "patterns" if "patterns" in text else "epochs"
    for suffix in (".yaml", ".json"):
        grid = tmp_path / f"grid{suffix}"
        grid.write_text(text)
        with pytest.raises(ConfigError, match=f"'{key}' is given twice") as refused:
            _grid(str(grid))
        if suffix == ".json":  # valid JSON (YAML forbids the repeat, JSON does not): the
            json.loads(text)  # message must not call the file invalid
            assert "not valid" not in str(refused.value), refused.value


def test_a_sweep_point_refused_at_planning_is_named_by_its_model(tmp_path, monkeypatch, capfd,
                                                                  clean_environ):
    """4:8 fits the demo model's layers but not a model whose MLP is 100 wide: the error names
    that model, not only a layer name that both LLaMA-style models of a grid could have."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from flows.cli import main
    from sds.demo import demo_model_path

    folder = tmp_path / "mlp100"
    LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=100,
                                 num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(demo_model_path("opt")).save_pretrained(folder)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never reached
    capfd.readouterr()
    assert main(["sweep", "--models", f"demo,{folder}", "--patterns", "2:4,4:8",
                 "--calib", "demo", "--eval", "wiki", "--tasks", "none", "--nsamples", "4",
                 "--seqlen", "32", "--store", str(tmp_path / "store"),
                 "--out", str(tmp_path / "out")]) == 2
    error = _one_line_error(capfd.readouterr().err)
    assert error.startswith(f"error: {folder} (sparsegpt 4:8): 4:8 needs the input "
                            "dimension"), error
    assert not (tmp_path / "store").exists() and not (tmp_path / "out").exists()


def test_a_sweep_over_two_model_folders_of_one_name_keeps_the_results_of_each(
        prefect_api, tiny_model, corpus, tmp_path, monkeypatch, capfd, clean_environ):
    from flows import report
    from flows.cli import main

    a, b = tmp_path / "a" / "opt", tmp_path / "b" / "opt"
    for folder in (a, b):
        shutil.copytree(tiny_model, folder)
    out = tmp_path / "sweep"
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    code = main(["sweep", "--models", f"{a},{b}", "--methods", "magnitude", "--no-sds",
                 "--calib", str(corpus["calib"]), "--eval", str(corpus["heldout"]), "--tasks",
                 "none", "--nsamples", "4", "--seqlen", "32", "--gpu-limit", "none",
                 "--store", str(tmp_path / "store"), "--out", str(out)])
    assert code == 0, capfd.readouterr().err
    names = [run["name"] for run in json.loads((out / "sweep.json").read_text())["runs"]]
    assert len(set(names)) == 2
    results = [json.loads((out / name / "results.json").read_text()) for name in names]
    assert {Path(r["model"]) for r in results} == {a.resolve(), b.resolve()}
    # a name that no other point of the sweep has stays as it is
    assert report.run_names([results[0]["config"]]) == [report.run_name(results[0])]


@pytest.fixture(scope="module")
def stored_run(prefect_api, tiny_model, corpus, tmp_path_factory) -> Path:
    """A store holding every stage of the tiny SDS run (`cli_args`, `--gpu-limit none`), so
    that `sds run` answers it from the store in a moment, whatever its --out."""
    from flows.pipeline import pipeline

    store = tmp_path_factory.mktemp("stored-run") / "store"
    pipeline(tiny_params(tiny_model, corpus, store))
    return store


@pytest.mark.parametrize("damage", ["weights deleted", "weights cut short"])
def test_a_damaged_model_folder_in_out_is_written_again(
        damage, stored_run, tiny_model, corpus, tmp_path, capfd, clean_environ):
    from flows.cli import main

    out = tmp_path / "out"
    args = cli_args(tiny_model, corpus, stored_run, out) + ["--gpu-limit", "none"]
    assert main(args) == 0
    weights = out / "model" / "model.safetensors"
    exported = _sha256(weights)
    if damage == "weights deleted":
        weights.unlink()
    else:
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size // 2)
    assert main(args) == 0
    assert "found in the store" in capfd.readouterr().err
    assert _sha256(weights) == exported


def test_outputs_get_the_modes_a_plain_mkdir_and_open_give(
        stored_run, tiny_model, corpus, tmp_path, capfd, clean_environ):
    """Not private to their writer (mkdtemp's 0700, mkstemp's 0600): on a shared folder the
    others read them as they would any file this user made."""
    from flows.cli import main

    out = tmp_path / "out"
    previous = os.umask(0o002)
    try:
        (tmp_path / "plain").mkdir()
        (tmp_path / "plain" / "file").write_text("")
        code = main(cli_args(tiny_model, corpus, stored_run, out) + ["--gpu-limit", "none"])
    finally:
        os.umask(previous)
    assert code == 0, capfd.readouterr().err

    def mode(path: Path) -> int:
        return path.stat().st_mode & 0o777

    assert mode(out / "model") == mode(tmp_path / "plain")
    files = [out / "results.json", *(out / "model").iterdir()]
    assert {f.name: mode(f) for f in files} == {f.name: mode(tmp_path / "plain" / "file")
                                                for f in files}


def test_a_run_without_export_removes_the_model_folder_an_earlier_run_exported(
        stored_run, tiny_model, corpus, tmp_path, capfd, clean_environ):
    from flows.cli import main

    out = tmp_path / "out"
    args = cli_args(tiny_model, corpus, stored_run, out) + ["--gpu-limit", "none"]
    assert main(args) == 0 and (out / "model").is_dir()
    no_sds = cli_args(tiny_model, corpus, stored_run, out, sds=False) + ["--gpu-limit", "none"]
    assert main(no_sds + ["--no-export"]) == 0
    assert json.loads((out / "results.json").read_text())["model_dir"] is None
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "sds.log"]
    # a folder that sds did not write there is not its to remove
    (out / "model").mkdir()
    (out / "model" / "notes.txt").write_text("mine")
    assert main(args + ["--no-export"]) == 0
    assert (out / "model" / "notes.txt").read_text() == "mine"


def test_a_tilde_in_out_puts_every_output_in_the_home_folder(
        stored_run, tiny_model, corpus, tmp_path, monkeypatch, capfd, clean_environ):
    from flows.cli import main

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    args = cli_args(tiny_model, corpus, stored_run, "~/out") + ["--gpu-limit", "none",
                                                                "--no-export"]
    assert main(args) == 0, capfd.readouterr().err
    assert sorted(p.name for p in (home / "out").iterdir()) == ["results.json", "sds.log"]
    assert list(cwd.iterdir()) == []
    assert f"results  {home / 'out' / 'results.json'}" in capfd.readouterr().out


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_the_embedded_api_ends_with_a_command_killed_by_sigkill(tmp_path):
    """SIGKILL (the OOM killer) runs no exit handler: the embedded API server is bound to the
    command by the kernel, so it ends with it instead of running on, orphaned."""
    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    code = ("import time; from flows.cli import EmbeddedAPI; api = EmbeddedAPI(); api.wait(); "
            "print(api.process.pid, flush=True); time.sleep(300)")
    command = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO,
                               stdout=subprocess.PIPE, text=True)
    try:
        server = int(command.stdout.readline())
        assert server in _processes_of(home)
        command.kill()
        command.wait()
        deadline = time.monotonic() + 30
        while server in _processes_of(home) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _processes_of(home) == []
    finally:
        if command.poll() is None:
            command.kill()
        for pid in _processes_of(home):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the binding is Linux's")
def test_the_server_is_bound_to_the_command_only_from_its_main_thread():
    """PR_SET_PDEATHSIG follows the thread that started the child: from another thread, which
    may end before the command does, the server starts unbound."""
    import threading

    from flows.cli import _bound

    command = [sys.executable, "-m", "uvicorn", "--version"]
    bound = _bound(command)
    assert bound[:2] == [sys.executable, "-c"] and bound[-3:] == command[1:]
    found = []
    other = threading.Thread(target=lambda: found.append(_bound(command)))
    other.start()
    other.join()
    assert found == [command]


@pytest.mark.parametrize("name", ["results.json", "sds.log"])
def test_an_out_holding_a_folder_where_the_run_writes_a_file_exits_2_before_any_stage(
        name, tiny_model, corpus, tmp_path, monkeypatch, capfd, clean_environ):
    """A folder named results.json would fail the run after every stage (exit 1), a folder
    named sds.log as the flow starts: both are refused with the other --out checks."""
    from flows.cli import main

    out = tmp_path / "out"
    (out / name).mkdir(parents=True)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never reached
    code = main(cli_args(tiny_model, corpus, tmp_path / "store", out))
    assert code == 2
    assert f"{out / name} is a folder" in _one_line_error(capfd.readouterr().err)
    assert not list((tmp_path / "store").rglob("meta.json"))


def test_a_runs_recorded_configuration_names_its_files_absolutely(
        prefect_api, tiny_model, corpus, tmp_path, monkeypatch, clean_environ):
    """The flow run records the configuration as its parameters, and `prefect flow-run retry`
    runs the flow again with them from whatever folder it is typed in. Given relative paths
    (store, out, the evaluation file), the run records them absolute: a rerun of the recorded
    configuration from another folder finds every stage in the same store and writes the same
    results.json."""
    import shutil

    from prefect.client.orchestration import get_client

    from flows.cli import main
    from flows.pipeline import pipeline
    from tasks.config import RunConfig

    cwd, elsewhere = tmp_path / "cwd", tmp_path / "elsewhere"
    cwd.mkdir()
    elsewhere.mkdir()
    shutil.copy(corpus["heldout"], cwd / "heldout.txt")
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    monkeypatch.chdir(cwd)
    args = cli_args(tiny_model, corpus, "store", "out") + ["--gpu-limit", "none",
                                                          "--no-export"]
    args[args.index("--eval") + 1] = "heldout.txt"
    assert main(args) == 0
    first = json.loads((cwd / "out" / "results.json").read_text())
    with get_client(sync_client=True) as client:
        recorded = client.read_flow_run(first["flow_run"]["id"]).parameters["config"]
    assert recorded["store"] == str(cwd / "store")
    assert recorded["out"] == str(cwd / "out")
    assert recorded["eval"] == [str(cwd / "heldout.txt")]

    monkeypatch.chdir(elsewhere)  # the retry, typed in another folder
    again = pipeline(RunConfig(**recorded))
    assert again["timings"]["computed"] == []  # every stage from the run's own store
    assert again["keys"] == first["keys"]
    assert json.loads((cwd / "out" / "results.json").read_text())["flow_run"] == \
        again["flow_run"]
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("kind", ["run", "sweep"])
@pytest.mark.parametrize("variable", ["s3://bucket/runs", "rel-store"])
def test_the_recorded_configuration_names_the_store_sds_store_gave(
        kind, variable, tmp_path, monkeypatch, clean_environ):
    """A command that names no --store runs against `$SDS_STORE`: the configuration it records
    names that store (a URL as it is, a folder absolutely), so a retry typed where
    `$SDS_STORE` is unset, or names another store, reads the same one."""
    from flows.cli import absolute_paths
    from tasks.config import RunConfig, SweepConfig

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDS_STORE", variable)
    kind_ = RunConfig if kind == "run" else SweepConfig
    recorded = absolute_paths(kind_()).model_dump()
    expected = variable if "://" in variable else str(tmp_path / variable)
    monkeypatch.delenv("SDS_STORE")  # the retry's shell
    monkeypatch.chdir("/")
    assert kind_(**recorded).store_root() == expected


@pytest.mark.parametrize("blocker", ["sweep.json/", "POINT/results.json/", "POINT"])
def test_a_sweep_out_holding_something_where_the_sweep_writes_exits_2_before_any_stage(
        blocker, tiny_model, corpus, tmp_path, monkeypatch, capfd, clean_environ):
    """A sweep writes `<out>/sweep.json` and `<out>/<point>/results.json` once every point is
    computed: a folder where one of those files goes, or a file where a point's folder goes,
    would fail it at the end (exit 1). They are refused with the other --out checks."""
    from flows.cli import main

    out = tmp_path / "out"
    point = f"{tiny_model.name}-sparsegpt-2-4-oneshot"
    path = out / blocker.rstrip("/").replace("POINT", point)
    if blocker.endswith("/"):
        path.mkdir(parents=True)
    else:
        out.mkdir()
        path.write_text("not a folder")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never reached
    code = main(["sweep", "--models", str(tiny_model), "--methods", "sparsegpt", "--patterns",
                 "2:4", "--no-sds", "--calib", str(corpus["calib"]), "--eval",
                 str(corpus["heldout"]), "--tasks", "none", "--nsamples", "4", "--seqlen", "32",
                 "--store", str(tmp_path / "store"), "--out", str(out)])
    assert code == 2
    line = _one_line_error(capfd.readouterr().err)
    assert f"{path} is a {'folder' if blocker.endswith('/') else 'file'}" in line, line
    assert not list((tmp_path / "store").rglob("meta.json"))


@pytest.mark.parametrize("flags", [["--incomplete"], ["--older-than", "7d"],
                                   ["--incomplete", "--older-than", "7d"]])
def test_store_rm_refuses_a_filter_beside_named_artifacts(flags, tmp_path, capfd):
    """A committed artifact made a moment ago is neither incomplete nor 7 days old: named
    beside --incomplete or --older-than 7d, it used to be removed all the same."""
    from flows.cli import main
    from tests.test_store import key_for, some_tensors

    store = ArtifactStore(tmp_path / "store")
    key = key_for(sparsity=0.1)
    store.save("oneshot", key, some_tensors(), {})
    assert main(["store", "rm", "--store", str(store.root), f"oneshot/{key}", *flags]) == 2
    err = capfd.readouterr().err
    assert "would be ignored" in err and "nothing was removed" in err
    assert store.exists("oneshot", key)


@pytest.mark.parametrize("flags", [["--both", "--no-sds"], ["--no-sds", "--both"]])
def test_both_and_no_sds_together_are_refused(flags, capsys):
    from flows.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["sweep", *flags])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("flags, sds", [(["--both"], [True, False]), (["--no-sds"], [False]),
                                        ([], [True])])
def test_either_alone_still_sets_the_grid(flags, sds):
    from flows.cli import build_parser, sweep_config

    assert sweep_config(build_parser().parse_args(["sweep", *flags])).sds == sds


@pytest.mark.parametrize("calib, eval_", [(None, None), ("demo", None)])
def test_a_missing_model_folder_is_named_before_the_default_hub_data(tmp_path, monkeypatch,
                                                                     calib, eval_):
    """With a model given, the defaults are c4 and WikiText-2; offline they cannot load. A
    model folder that does not exist used to fail on them ("cannot load allenai/c4 ...:
    calibrate on a local file"), sending the user after the data instead of the typo."""
    import tasks.plan
    from sds.errors import ModelError
    from tasks.config import RunConfig
    from tasks.plan import plan_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(tasks.plan, "_plans", {})
    config = RunConfig(model=str(tmp_path / "typo-model"), calib=calib, eval=eval_,
                       store=str(tmp_path / "store"), out=None)
    with pytest.raises(ModelError, match="typo-model' does not exist"):
        plan_pipeline(config)
    assert not (tmp_path / "store").exists()


def test_one_shot_options_the_method_does_not_read_are_warned_about():
    """`--oneshot-target-mix` with sparsegpt, `--oneshot-sequential` with magnitude... change
    nothing: said, not silently recorded as if they had applied."""
    import io

    from rich.console import Console

    from flows.cli import _warn

    plain = {"method": "sparsegpt", "sds": False, "nsamples": 128, "seqlen": 2048,
             "blocksize": 128, "percdamp": 0.01, "oneshot_sequential": False,
             "oneshot_target_mix": 0.0}
    cases = [({}, []),
             ({"oneshot_target_mix": 0.5}, ["sparsegpt does not read --oneshot-target-mix"]),
             ({"method": "admm", "oneshot_target_mix": 0.5, "oneshot_sequential": True}, []),
             ({"method": "magnitude", "oneshot_sequential": True, "blocksize": 64},
              ["magnitude does not read --blocksize", "magnitude does not read "
               "--oneshot-sequential"]),
             ({"method": "wanda", "percdamp": 0.1}, ["wanda does not read --percdamp"]),
             ({"method": "wanda", "percdamp": 0.1, "sds": True}, [])]  # step 3 reads it
    for change, expected in cases:
        console = Console(file=io.StringIO(), width=200)
        said = _warn([{**plain, **change}], console)
        assert sorted(said) == [f"method {w}; it is ignored" for w in expected], change
        assert console.file.getvalue().count("warning:") == len(expected)


def test_an_interrupt_that_unwinds_at_once_still_names_the_earlier_results(tmp_path, capfd,
                                                                             monkeypatch):
    """Ctrl-C raises KeyboardInterrupt in the main thread (`Interruption.handle`); where it
    unwinds before the grace timer fires (the embedded API still booting, a flow between its
    stages), `main` calls `Interruption.stop`, which must still name the earlier results.json."""
    import flows.cli as cli

    out = tmp_path / "out"
    out.mkdir()
    earlier = out / "results.json"
    earlier.write_text('{"metrics": {}}')
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # no embedded API

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def exit_(code):
        raise SystemExit(code)

    monkeypatch.setattr(cli, "_run_flow", interrupted)
    monkeypatch.setattr(cli, "_end_children", lambda *a, **k: None)
    monkeypatch.setattr(cli.os, "_exit", exit_)
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--nsamples", "4", "--seqlen", "32", "--tasks", "none", "--eval",
                  "none", "--store", str(tmp_path / "store"), "--out", str(out)])
    assert exc.value.code == 130
    err = " ".join(capfd.readouterr().err.split())
    assert "interrupted" in err
    assert f"note: {earlier} is an earlier run's; this run wrote no results" in err, err


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed again once the probe is


@pytest.mark.parametrize("args", [["serve"]])
def test_an_unreachable_server_is_named_with_the_way_out(args, tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/api"
    env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(tmp_path / "home"),
           "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    err = " ".join(done.stderr.split())
    assert done.returncode == 2, done.stderr
    assert f"no Prefect server answers at PREFECT_API_URL={url}" in err
    assert "prefect server start" in err and "Traceback" not in err
