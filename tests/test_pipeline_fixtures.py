"""Shared pieces of the pipeline, CLI and deployment tests (this module holds no tests).

    pytest_plugins = ["tests.test_pipeline_fixtures"]

- `prefect_api`: one real `prefect server start` per test session (a module-level singleton,
  so importing the fixture into several modules still starts one), waited on /api/health; the
  fixture points this process at it. `server_env()` gives the same to subprocesses.
- `tiny_model`: a 2-block OPT with the demo tokenizer, saved to a folder (`save_opt`).
- `corpus`: small calibration and evaluation text files.
- `tiny_params(...)`: a RunConfig that runs in about a second per stage
  (`tiny_options(...)`: its fields as a dict).

Torch runs one thread in these tests: they share two cores with other processes, and there a
second OpenMP thread can stall a forward pass for tens of seconds.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data" / "demo" / "tokenizer"

_server: dict = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.read().strip() == b"true"
    except OSError:
        return False


def start_prefect_server() -> str:
    """The session's Prefect server (started on first use, stopped at exit); its API URL."""
    if _server:
        return _server["url"]
    home = Path(tempfile.mkdtemp(prefix="sds-prefect-server-"))
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_API_URL": ""}
    log = open(home / "server.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
         "--port", str(port), "--no-ui"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop():
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
        shutil.rmtree(home, ignore_errors=True)

    atexit.register(stop)
    deadline = time.monotonic() + 90
    while not _healthy(url):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"prefect server did not start: {(home / 'server.log').read_text()}")
        time.sleep(0.3)
    _server.update(url=url, home=home)
    return url


def server_env(tmp: Path, **extra: str) -> dict:
    """Environment for a subprocess that talks to the session's server."""
    env = {**os.environ}
    env.update(PREFECT_API_URL=start_prefect_server(), PREFECT_HOME=str(tmp / "prefect-home"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(
                   os.pathsep))
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """This process's flows run against the session's server, quietly and without the 1 s
    heartbeat wait; Prefect's own result records go to a temporary folder."""
    import torch
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_LOGGING_TO_API_BATCH_INTERVAL,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )

    url = start_prefect_server()
    results = tmp_path_factory.mktemp("prefect-results")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with temporary_settings({PREFECT_API_URL: url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
                             PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(results),
                             PREFECT_SERVER_ANALYTICS_ENABLED: False,
                             PREFECT_LOGGING_TO_API_BATCH_INTERVAL: 0.3}):
        yield url
    torch.set_num_threads(threads)


def save_opt(folder: Path, layers: int = 2, hidden: int = 64) -> Path:
    """An OPT of `layers` blocks (hidden size `hidden`, feed-forward twice that) with the demo
    tokenizer, saved like a hub model into `folder`."""
    import torch
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=hidden, word_embed_proj_dim=hidden,
                       ffn_dim=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                       max_position_embeddings=128, do_layer_norm_before=True,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    OPTForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-block OPT (hidden 64) with the demo tokenizer, saved like a hub model."""
    return save_opt(tmp_path_factory.mktemp("tiny-opt"))


WORDS = ("the river city north old market bridge stone winter king people small long "
         "village church road year war music house water field light early great new").split()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Two small text files (documents separated by blank lines): calibration and evaluation."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    files = {}
    for name, documents in (("calib", 12), ("heldout", 6)):
        docs = []
        for _ in range(documents):
            sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize()
                         + "." for _ in range(rng.randint(4, 8))]
            docs.append(" ".join(sentences))
        path = folder / f"{name}.txt"
        path.write_text("\n\n".join(docs) + "\n")
        files[name] = path
    return files


def tiny_params(model: Path, corpus: dict[str, Path], store, out=None, /, **overrides):
    """The RunConfig of a tiny-model run: a few seconds per run (a bad value: ConfigError)."""
    from tasks.config import RunConfig, build

    return build(RunConfig, tiny_options(model, corpus, store, out, **overrides))


def tiny_options(model: Path, corpus: dict[str, Path], store, out=None, /, **overrides) -> dict:
    """The fields of `tiny_params`, as a dict (what a grid file or a deployment holds)."""
    params = {
        "model": str(model), "method": "sparsegpt", "pattern": "2:4", "sds": True,
        "calib": str(corpus["calib"]), "eval": [str(corpus["heldout"])], "tasks": [],
        "nsamples": 4, "seqlen": 32, "store": str(store), "out": str(out) if out else None,
        "sds_options": {"epochs": 5, "adjust_epochs": 5}, "gpu_limit": None,
    }
    params.update(overrides)
    return params


def hub_answering(monkeypatch, hub_api) -> None:
    """The Hugging Face hub as reachable and answered by `hub_api` (a stand-in for
    huggingface_hub.HfApi): the offline mode off, the probe passing; and the planner's model
    checks (which would load the model's config) skipped, with a window of 32 tokens."""
    import huggingface_hub
    import huggingface_hub.constants

    import tasks.plan

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", hub_api)
    monkeypatch.setattr("sds.hub.check_hub", lambda what, hint: None)
    monkeypatch.setattr(tasks.plan, "_check_model", lambda *args: (None, 32))


def cli_args(model: Path, corpus: dict[str, Path], store, out, sds: bool = True) -> list[str]:
    """`sds run` arguments equivalent to `tiny_params` (with `sds=False`, `--no-sds` and no
    SDS options)."""
    return ["run", "--model", str(model), "--calib", str(corpus["calib"]),
            "--eval", str(corpus["heldout"]), "--tasks", "none", "--nsamples", "4",
            "--seqlen", "32", *(["--epochs", "5", "--adjust-epochs", "5"] if sds else
                                ["--no-sds"]),
            "--store", str(store), "--out", str(out)]


def kill_cli_when(args: list[str], env: dict, ready, what: str, timeout: float,
                  poll: float = 0.05) -> None:
    """Start `python -m flows.cli ARGS`, SIGKILL it as soon as `ready()` holds, and fail if it
    ends first or `ready()` does not hold within `timeout` seconds (`what`: the awaited
    moment, for the message)."""
    import signal

    process = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, f"{what} never happened"
            time.sleep(poll)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)


def task_runs(flow_run_id: str, settle: float = 30.0) -> dict[str, list]:
    """The task runs of a flow run, by stage label (the first word of a run's name), read
    through the API. The API learns of a task's final state through events a moment after
    the flow returns: read again (for up to `settle` seconds) while one still reads Running."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + settle
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        if not any(run.state is None or run.state.name == "Running" for run in runs) or \
                time.monotonic() > deadline:
            break
        time.sleep(0.2)
    out: dict[str, list] = {}
    for run in runs:
        out.setdefault(run.name.split()[0], []).append(run)
    return out
