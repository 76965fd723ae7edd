"""The `sds` command.

    sds run                      prune the offline demo model (SDS), evaluate, write ./sds-out
    sds run --model facebook/opt-125m --calib c4 --eval wikitext2      the paper's setting
    sds sweep --methods sparsegpt,wanda --patterns 2:4,50%             a grid, shared stages once
    sds store ls | rm | gc       find and clean artifacts
    sds serve                    serve the deployments of deployments/local.yaml

Exit codes: 0 done, 1 a stage failed, 2 bad input (options, data, model), 3 the store cannot be
used, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM); no child process is left behind.
Errors print one line (cause and fix); --traceback shows the rest.

Prefect's settings are read when it is imported, so this module sets them (quiet console, the
embedded API when no PREFECT_API_URL is set) before importing anything that imports Prefect.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

HUB_DATA = {"c4", "wikitext2", "ptb"}
EXIT_FAILED, EXIT_INPUT, EXIT_STORE, EXIT_INTERRUPTED = 1, 2, 3, 130


# -- arguments ----------------------------------------------------------------------------------
def finite(text: str) -> float:
    """argparse type of the real-valued options: a finite number (argparse names the option)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; give e.g. 0.1")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    """Options shared by `run` and `sweep`."""
    g = parser.add_argument_group("data and evaluation")
    g.add_argument("--calib", help="calibration data: c4, wikitext2, demo, or a .txt/.jsonl file "
                   "(default: demo without --model, c4 with one)")
    g.add_argument("--eval", help="comma-separated perplexity corpora: wikitext2, c4, ptb, wiki, "
                   "news, files, or 'none' (default: wiki,news for the demo, wikitext2 otherwise)")
    g.add_argument("--tasks", help="comma-separated zero-shot tasks or presets (demo, sds, "
                   "wanda), or 'none' (default: demo for the demo, none otherwise)")
    g.add_argument("--limit", type=int, help="examples per zero-shot task (default: 100 for the "
                   "demo, all otherwise)")
    g.add_argument("--nsamples", type=int, help="calibration windows (default: 32 for the demo, "
                   "128 otherwise)")
    g.add_argument("--seqlen", type=int, help="tokens per calibration and evaluation window "
                   "(default: 128 for the demo, min(2048, context) otherwise)")
    g.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    g.add_argument("--batch-size", type=int, default=8, help="zero-shot batch size")

    g = parser.add_argument_group("pruning")
    g.add_argument("--no-sds", dest="sds", action="store_false",
                   help="one-shot pruning only (no re-dense / second pruning)")
    g.add_argument("--blocksize", type=int, default=128, help="SparseGPT block size")
    g.add_argument("--percdamp", type=finite, default=0.01, help="SparseGPT dampening")
    g.add_argument("--epochs", type=int, help="SDS step-2 (re-dense) iterations (default 200)")
    g.add_argument("--lr", type=finite, help="SDS step-2 step size (default 0.1)")
    g.add_argument("--lambda1", "--l1", dest="l1", type=finite, help="SDS λ1, L1 weight (0.1)")
    g.add_argument("--lambda2", "--l2", dest="l2", type=finite, help="SDS λ2, L2 weight (0.1)")
    g.add_argument("--adjust-epochs", type=int, help="SDS step-3 iterations (default 200)")
    g.add_argument("--adjust-lr", type=finite, help="SDS step-3 step size (default 0.1)")
    g.add_argument("--sds-data", choices=("sd", "dense", "distill"),
                   help="data of the re-dense step (default sd)")
    g.add_argument("--optimizer", choices=("prox", "adam"), help="re-dense optimiser (prox)")
    g.add_argument("--normalize", choices=("target", "tokens"),
                   help="loss normalisation of the SDS steps (target: ‖W_dense X‖²)")
    g.add_argument("--reg-scale", choices=("mean", "dense", "sum"),
                   help="scale of the λ1/λ2 terms (mean: averaged over a layer's weights)")

    g = parser.add_argument_group("model, device and storage")
    g.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    g.add_argument("--device", help="compute device, e.g. cuda, cuda:1, cpu (default: cuda "
                   "when available)")
    g.add_argument("--store", default="./sds-store",
                   help="artifact store: a folder or s3://bucket/prefix (default ./sds-store)")
    g.add_argument("--no-verify", dest="verify", action="store_false",
                   help="trust stored artifacts by size, without re-hashing them")
    g.add_argument("--gpu-limit", help="Prefect global concurrency limit the compute stages "
                   "hold, or 'none' (default: sds-gpu with a Prefect server, none with the "
                   "embedded API)")
    g.add_argument("--no-export", dest="export", action="store_false",
                   help="do not write the final model folder")
    g.add_argument("--online", action="store_true",
                   help="allow the Hugging Face hub for the demo (it runs offline otherwise)")


def _output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Prefect's and the libraries' logs")
    parser.add_argument("--traceback", action="store_true", help="show tracebacks of errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sds", description="Sparse-Dense-Sparse pruning of language models, as a cached "
        "Prefect workflow.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="prune one model (default: the offline demo)",
                         description="Prune one model with one method and pattern, SDS on top, "
                         "and evaluate the dense, one-shot and SDS models.")
    run.add_argument("--model", help="hub id or local folder (default: the offline demo model; "
                     "the paper's defaults apply with a model: 128 x 2048 tokens of c4, "
                     "WikiText-2 perplexity)")
    run.add_argument("--revision", help="hub revision (branch, tag or commit)")
    run.add_argument("--trust-remote-code", action="store_true")
    run.add_argument("--method", default="sparsegpt", help="sparsegpt, wanda, magnitude or admm")
    run.add_argument("--pattern", default="2:4", help="N:M (2:4, 4:8) or a ratio (50%%, 0.5)")
    run.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                     help="leave matching layers dense (repeatable)")
    run.add_argument("--override", action="append", default=[], metavar="REGEX=PATTERN",
                     help="another pattern for matching layers (repeatable)")
    run.add_argument("--out", default="./sds-out",
                     help="results.json and the model folder go here (default ./sds-out)")
    _common(run)
    _output(run)
    run.set_defaults(handler=cmd_run)

    sweep = sub.add_parser("sweep", help="a grid of models x methods x patterns",
                           description="Run every combination; stages shared by several "
                           "points (calibration, dense evaluation) run once.")
    sweep.add_argument("--grid", help="YAML file with models, methods, patterns and any other "
                       "option (command-line options win)")
    sweep.add_argument("--models", help="comma-separated hub ids or folders ('demo': the demo)")
    sweep.add_argument("--methods", help="comma-separated methods (default sparsegpt)")
    sweep.add_argument("--patterns", help="comma-separated patterns (default 2:4)")
    sweep.add_argument("--both", action="store_true", help="each point with and without SDS")
    sweep.add_argument("--out", default="./sds-sweep", help="results go here (./sds-sweep)")
    _common(sweep)
    _output(sweep)
    sweep.set_defaults(handler=cmd_sweep)

    store = sub.add_parser("store", help="list and clean the artifact store")
    store_sub = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    ls = store_sub.add_parser("ls", help="list artifacts")
    ls.add_argument("--stage", help="one stage only")
    ls.add_argument("--json", action="store_true", help="print JSON lines")
    rm = store_sub.add_parser("rm", help="remove artifacts")
    rm.add_argument("artifacts", nargs="*", metavar="STAGE/KEY",
                    help="artifacts to remove (as printed by `sds store ls`)")
    rm.add_argument("--stage", help="every artifact of this stage")
    rm.add_argument("--older-than", help="only those older than this (e.g. 12h, 7d)")
    rm.add_argument("--incomplete", action="store_true",
                    help="only half-written artifacts (interrupted saves) and stray temporary "
                    "files; committed artifacts stay")
    gc = store_sub.add_parser("gc", help="remove what no results.json needs")
    gc.add_argument("--keep", action="append", default=[], metavar="RESULTS",
                    help="results.json (or a folder searched for them) whose artifacts and "
                    "their upstream stay (repeatable; default ./sds-out and ./sds-sweep)")
    gc.add_argument("--older-than", default="1h",
                    help="only artifacts older than this (default 1h: runs in progress are "
                    "safe)")
    for p in (ls, rm, gc):
        p.add_argument("--store", default="./sds-store", help="folder or s3://bucket/prefix")
        _output(p)
    for p in (rm, gc):
        p.add_argument("--dry-run", action="store_true", help="only say what would go")
    store.set_defaults(handler=cmd_store)

    serve = sub.add_parser("serve", help="serve the deployments locally (needs a Prefect "
                           "server: PREFECT_API_URL)")
    serve.add_argument("--file", help="deployments file (default deployments/local.yaml)")
    serve.add_argument("--name", action="append", default=[], help="serve only this one")
    serve.add_argument("--limit", type=int, help="flow runs at the same time")
    _output(serve)
    serve.set_defaults(handler=cmd_serve)
    return parser


# -- environment --------------------------------------------------------------------------------
LOCAL_TASKS = {"demo", "demo_next_sentence", "demo_last_word"}


def _uses_hub(args) -> bool:
    """Whether the command may need the Hugging Face hub (the demo never does)."""
    if getattr(args, "online", False):
        return True
    models = _csv(getattr(args, "models", None)) or [getattr(args, "model", None)]
    if any(m not in (None, "", "demo") for m in models):
        return True
    data = (_csv(getattr(args, "calib", None)) or []) + (_csv(getattr(args, "eval", None)) or [])
    if any(d in HUB_DATA for d in data):
        return True
    tasks = _csv(getattr(args, "tasks", None)) or []
    return any(t not in LOCAL_TASKS and t != "none" for t in tasks)


def configure_environment(args) -> None:
    """Prefect and library settings, before anything imports them. Values already in the
    environment win."""
    env = os.environ
    verbose = getattr(args, "verbose", False)
    if not env.get("PREFECT_API_URL"):
        env.setdefault("PREFECT_SERVER_EPHEMERAL_ENABLED", "true")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "INFO" if verbose else "CRITICAL")
    env.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "sds")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Torch's OpenMP threads spin while they wait by default: next to Prefect's own threads (and
    # anything else on a small machine) that can slow a forward pass tens of times.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not verbose:
        env.setdefault("TRANSFORMERS_VERBOSITY", "error")
        env.setdefault("TQDM_DISABLE", "1")
    if args.command in ("run", "sweep") and not _uses_hub(args):
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("HF_DATASETS_OFFLINE", "1")


def _quiet_libraries(verbose: bool) -> None:
    import logging

    if verbose:
        return
    for name in ("lm_eval", "lm-eval", "datasets", "transformers", "accelerate", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _warm_up_api() -> threading.Thread | None:
    """Start Prefect's embedded API server in the background (it takes seconds), while the
    command imports torch and checks its inputs."""
    if os.environ.get("PREFECT_API_URL"):
        return None

    def start():
        try:
            from prefect.server.api.server import SubprocessASGIServer

            SubprocessASGIServer().start()
        except Exception:  # noqa: BLE001 - the flow call starts it (and reports) if this fails
            pass

    thread = threading.Thread(target=start, name="prefect-api-warm-up", daemon=True)
    thread.start()
    return thread


# -- errors -------------------------------------------------------------------------------------
def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    from sds.errors import SDSError

    if isinstance(exc, SDSError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _no_space(exc: BaseException) -> bool:
    """A full disk (or quota) anywhere in the chain of causes."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def exit_code(exc: BaseException) -> int:
    """The one mapping of errors to exit codes (see the module docstring)."""
    from sds.errors import ConfigError, DataError, ModelError, StoreError

    if isinstance(exc, StoreError) or _no_space(exc):
        return EXIT_STORE
    if isinstance(exc, ConfigError | DataError | ModelError):
        return EXIT_INPUT
    try:
        from prefect.exceptions import ParameterTypeError, SignatureMismatchError

        if isinstance(exc, ParameterTypeError | SignatureMismatchError):
            return EXIT_INPUT
    except ImportError:
        pass
    return EXIT_FAILED


# -- run and sweep ------------------------------------------------------------------------------
def _sds_options(args) -> dict:
    names = {"epochs": "epochs", "lr": "lr", "l1": "l1", "l2": "l2",
             "adjust_epochs": "adjust_epochs", "adjust_lr": "adjust_lr", "sds_data": "data",
             "optimizer": "optimizer", "normalize": "normalize", "reg_scale": "reg_scale"}
    return {field: getattr(args, attr) for attr, field in names.items()
            if getattr(args, attr, None) is not None}


def _gpu_limit(args) -> str | None:
    if args.gpu_limit is not None:
        return None if args.gpu_limit.lower() in ("", "none", "off") else args.gpu_limit
    if not os.environ.get("PREFECT_API_URL"):
        return None  # the embedded API lives and dies with this process: its lock is enough
    from tasks.common import GPU_LIMIT

    return GPU_LIMIT


def _overrides(items: list[str]) -> dict[str, str]:
    from sds.errors import ConfigError

    out = {}
    for item in items:
        regex, sep, pattern = item.rpartition("=")
        if not sep or not regex:
            raise ConfigError(f"--override {item!r} is not REGEX=PATTERN (e.g. "
                              "'fc2$=4:8')")
        out[regex] = pattern
    return out


def _csv(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def pipeline_parameters(args) -> dict:
    """The `pipeline` flow's parameters from the command line."""
    params = {
        "model": args.model, "method": args.method, "pattern": args.pattern, "sds": args.sds,
        "calib": args.calib, "eval": _csv(args.eval), "nsamples": args.nsamples,
        "seqlen": args.seqlen, "tasks": _csv(args.tasks), "store": args.store, "out": args.out,
        "sds_options": _sds_options(args) or None, "overrides": _overrides(args.override) or None,
        "exclude": args.exclude or None, "blocksize": args.blocksize,
        "percdamp": args.percdamp, "seed": args.seed, "dtype": args.dtype,
        "revision": args.revision, "trust_remote_code": args.trust_remote_code,
        "limit": args.limit, "batch_size": args.batch_size, "device": args.device,
        "verify": args.verify, "gpu_limit": _gpu_limit(args), "export": args.export,
    }
    return params


class TerminalProgress:
    """Stage events (tasks.common.notify) drawn as rich progress bars on stderr."""

    def __init__(self, console):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description:<30}"),
                                 BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=console, transient=True)
        self.bars: dict[str, int] = {}
        self.lock = threading.Lock()

    def __enter__(self):
        from tasks.common import subscribe

        self.progress.start()
        subscribe(self)
        return self

    def __exit__(self, *exc):
        from tasks.common import unsubscribe

        unsubscribe(self)
        self.progress.stop()
        return False

    def __call__(self, event: dict) -> None:
        label, kind = event.get("title") or event.get("label", "?"), event.get("event")
        with self.lock:
            if kind in ("cached", "found"):
                if label not in self.bars:
                    self.progress.console.print(f"[green]✓[/] {label:<30} [dim]from the "
                                                "store[/]")
                    self.bars[label] = -1
            elif kind == "start":
                self.bars[label] = self.progress.add_task(label, total=None)
            elif kind == "block" and self.bars.get(label, -1) >= 0:
                self.progress.update(self.bars[label], total=event["blocks"],
                                     completed=event["block"])
            elif kind == "done" and self.bars.get(label, -1) >= 0:
                self.progress.remove_task(self.bars[label])
                self.bars[label] = -1
                self.progress.console.print(f"[green]✓[/] {label:<30} computed in "
                                            f"{event.get('seconds', 0):.1f} s")


def _stdout_console():
    """Tables on stdout; when it is not a terminal (a pipe, a file) nothing is cut short."""
    from rich.console import Console

    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160)


def _results_table(results: dict):
    from rich.table import Table

    from flows import report

    table = Table(title=f"{results['method']} {results['pattern']}"
                  f"{' + SDS' if results['sds'] else ''} on {Path(results['model']).name}")
    states = [s for s in ("dense", "oneshot", "sds") if s in results["metrics"]]
    table.add_column("metric", no_wrap=True)
    for state in states:
        table.add_column(state, justify="right")
    if "sds" in states:
        table.add_column("SDS gain", justify="right")
        table.add_column("gap recovered", justify="right")
    for row in report.table_rows(results):
        cells = [row["metric"]] + [report._fmt(row.get(s)) for s in states]
        if "sds" in states:
            cells += [report.signed(row.get("sds gain")), report.percent(row.get("gap recovered"))]
        table.add_row(*cells)
    return table


@contextlib.contextmanager
def _stderr_to(log: Path | None):
    """Send everything written to file descriptor 2 (library warnings and progress bars,
    subprocesses such as git) to `log` while the flow runs; None leaves it alone."""
    if log is None:
        yield
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(log, "wb") as f:
            os.dup2(f.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def check_out(out: str | os.PathLike) -> None:
    """The output folder can be created and written, before any stage runs."""
    from sds.errors import ConfigError

    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file, not a folder; choose a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(path / f".sds-write-check-{os.getpid()}", "wb") as probe:
            probe.write(b"ok")
        os.remove(probe.name)
    except OSError as exc:
        raise ConfigError(f"--out {str(out)!r} cannot be written ({exc.strerror or exc}); "
                          "choose a folder you can write to") from None


def _run_flow(flow_fn, params: dict, console, warm_up: threading.Thread | None,
              log: Path | None):
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    if warm_up is not None:
        with console.status("starting Prefect's embedded API"):
            warm_up.join()
    # the heartbeat only matters to a server watching for crashed runs; without it the flow
    # call returns a second earlier
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        with _stderr_to(log), TerminalProgress(console):
            return flow_fn(**params)


def _quick_checks(params: dict) -> None:
    """The checks that need no store or Prefect: a typo fails in a few seconds."""
    from sds.models import load_config
    from sds.patterns import LayerRules
    from sds.pruners import get_method
    from sds.reconstruct import SDSConfig
    from tasks.store import ArtifactStore

    get_method(params["method"])
    LayerRules.build(params["pattern"], params["overrides"], params["exclude"] or ())
    SDSConfig(**(params["sds_options"] or {}))
    ArtifactStore(params["store"])  # the URI's form only
    if params["model"] not in (None, "", "demo"):
        load_config(params["model"], params["revision"], params["trust_remote_code"])


def cmd_run(args, console) -> int:
    t0 = time.perf_counter()
    params = pipeline_parameters(args)
    _quick_checks(params)
    warm_up = _warm_up_api()
    with console.status("checking the inputs"):
        from flows.pipeline import pipeline
        from tasks.plan import plan_pipeline
        from tasks.store import ArtifactStore

        _quiet_libraries(args.verbose)
        plan_args = {k: v for k, v in params.items() if k not in ("out", "export")}
        plan = plan_pipeline(**plan_args)  # fails fast, before any server or stage
        ArtifactStore(plan.store).check()
        check_out(args.out)
    log = None if args.verbose else Path(args.out) / "sds.log"
    results = _run_flow(pipeline, params, console, warm_up, log)
    out = sys.stdout
    _stdout_console().print(_results_table(results))
    t = results["timings"]
    lines = [f"results  {Path(args.out) / 'results.json'}"]
    if results.get("model_dir"):
        lines.append(f"model    {results['model_dir']}")
    lines.append(f"store    {plan.store}")
    if log is not None:
        lines.append(f"log      {log}")
    lines.append(f"time     {time.perf_counter() - t0:.1f} s in all; pipeline {t['wall']:.1f} s, "
                 f"stages computed now {t['stage_seconds']:.1f} s "
                 f"({len(t['computed'])} of {len(results['stages'])})")
    print("\n".join(lines), file=out)
    return 0


def _grid(args) -> dict:
    import yaml

    from sds.errors import ConfigError

    grid: dict = {}
    if args.grid:
        try:
            grid = yaml.safe_load(Path(args.grid).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"grid file {args.grid} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"grid file {args.grid} is not valid YAML: "
                              f"{' '.join(str(exc).split())}") from None
        if not isinstance(grid, dict):
            raise ConfigError(f"grid file {args.grid} must hold a mapping (models, methods, "
                              "patterns, ...)")
    return grid


def sweep_parameters(args) -> dict:
    """The grid file's options, overridden by the options given on the command line."""
    import inspect

    from flows.sweep import sweep
    from sds.errors import ConfigError

    params = _grid(args)
    known = set(inspect.signature(sweep.fn).parameters)
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"grid file {args.grid}: unknown option(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    cli = {
        "models": _csv(args.models), "methods": _csv(args.methods),
        "patterns": _csv(args.patterns), "sds": [True, False] if args.both else args.sds,
        "calib": args.calib, "eval": _csv(args.eval), "nsamples": args.nsamples,
        "seqlen": args.seqlen, "tasks": _csv(args.tasks), "limit": args.limit,
        "sds_options": _sds_options(args) or None, "device": args.device, "seed": args.seed,
        "batch_size": args.batch_size, "blocksize": args.blocksize, "percdamp": args.percdamp,
        "dtype": args.dtype, "store": args.store, "out": args.out, "verify": args.verify,
        "gpu_limit": args.gpu_limit,
    }
    defaults = vars(build_parser().parse_args(["sweep"]))
    for name, value in cli.items():
        default = defaults.get(name, None)
        if name in ("models", "methods", "patterns", "eval", "tasks"):
            default = None
        if value is not None and (value != default or name not in params):
            params[name] = value
    if args.gpu_limit is not None or "gpu_limit" not in params:
        params["gpu_limit"] = _gpu_limit(args)
    return params


def cmd_sweep(args, console) -> int:
    warm_up = _warm_up_api()
    with console.status("checking the inputs"):
        from flows.sweep import sweep
        from tasks.store import ArtifactStore

        _quiet_libraries(args.verbose)
        params = sweep_parameters(args)
        ArtifactStore(params.get("store", "./sds-store")).check()
        check_out(params.get("out", "./sds-sweep"))
    log = None if args.verbose else Path(params.get("out", "./sds-sweep")) / "sds.log"
    summary = _run_flow(sweep, params, console, warm_up, log)
    from rich.table import Table

    table = Table(title="sweep")
    table.add_column("run")
    table.add_column("metric")
    for column in ("dense", "oneshot", "sds", "gap recovered"):
        table.add_column(column, justify="right")
    for run in summary["runs"]:
        for name, values in _by_metric(run).items():
            table.add_row(run["name"], name, *values)
    _stdout_console().print(table)
    print(f"stage runs: {json.dumps(summary['stage_submissions'])}")
    print(f"results in {params.get('out', './sds-sweep')}/sweep.json "
          f"({summary['wall']:.1f} s)")
    return 0


def _by_metric(run: dict) -> dict[str, list[str]]:
    from flows.report import _fmt, percent

    metrics = run["metrics"]
    names = []
    for state in ("dense", "oneshot", "sds"):
        names += [n for n in metrics.get(state, {}) if n not in names]
    out = {}
    for name in names:
        rec = (run["improvement"].get(name) or {}).get("recovered")
        out[name] = [_fmt(metrics.get(s, {}).get(name)) for s in ("dense", "oneshot", "sds")]
        out[name].append(percent(rec))
    return out


# -- store --------------------------------------------------------------------------------------
def parse_age(text: str | None) -> timedelta | None:
    from sds.errors import ConfigError

    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise ConfigError(f"age {text!r} is not understood; use e.g. 30m, 12h, 7d, 2w")
    unit = {"s": 1, "": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    return timedelta(seconds=float(m.group(1)) * unit)


def _keys_of_results(paths: list[str]) -> set[str]:
    from sds.errors import ConfigError

    keys: set[str] = set()
    for p in paths:
        path = Path(p)
        files = sorted(path.rglob("results.json")) if path.is_dir() else [path]
        for f in files:
            try:
                data = json.loads(f.read_text())
            except FileNotFoundError:
                raise ConfigError(f"{f} does not exist") from None
            except ValueError:
                raise ConfigError(f"{f} is not a results.json") from None
            keys.update(data.get("keys", {}).values())
    return keys


def cmd_store(args, console) -> int:
    from rich.table import Table

    from sds.errors import ConfigError
    from tasks.store import ArtifactStore

    store = ArtifactStore(args.store)
    out = sys.stdout
    if args.store_command == "ls":
        metas = store.list(args.stage)
        broken = store.incomplete(args.stage)
        strays = store.strays(args.stage)
        if args.json:
            for m in metas:
                print(json.dumps({k: m.get(k) for k in ("stage", "key", "label", "title", "model",
                                                         "created", "bytes", "metrics")}),
                      file=out)
            for ref in broken:
                print(json.dumps({"stage": ref.stage, "key": ref.key, "incomplete": True}),
                      file=out)
            for path in strays:
                print(json.dumps({"stray": path}), file=out)
            return 0
        table = Table(title=store.root)
        table.add_column("artifact", no_wrap=True)
        for column in ("stage", "model", "created", "size"):
            table.add_column(column)
        for m in metas:
            table.add_row(f"{m['stage']}/{m['key']}", m.get("title") or m.get("label", ""),
                          Path(str(m.get("model", ""))).name,
                          m.get("created", "")[:16].replace("T", " "), _size(m.get("bytes", 0)))
        for ref in broken:
            table.add_row(f"{ref.stage}/{ref.key}", "[red]incomplete[/]", "", "", "")
        _stdout_console().print(table)
        for path in strays:
            table.add_row(path.removeprefix(store.root + "/"), "[red]stray file[/]", "", "", "")
        print(f"{len(metas)} artifacts, {_size(sum(m.get('bytes', 0) for m in metas))}"
              + (f"; {len(broken)} incomplete" if broken else "")
              + (f"; {len(strays)} stray temporary files" if strays else "")
              + (" (sds store rm --incomplete)" if broken or strays else ""), file=out)
        return 0

    if args.store_command == "rm":
        if not args.artifacts and not args.stage and not args.incomplete:
            raise ConfigError("say what to remove: STAGE/KEY arguments, --stage, or "
                              "--incomplete")
        removed = []
        for item in args.artifacts:
            stage, sep, key = item.partition("/")
            if not sep:
                raise ConfigError(f"{item!r} is not STAGE/KEY (see `sds store ls`)")
            if args.dry_run:  # what discard would find: a committed or an incomplete artifact
                found = store.exists(stage, key) or store.ref(stage, key) in store.incomplete(
                    stage)
            else:
                found = store.discard(stage, key)
            if found:
                removed.append(item)
        age = parse_age(args.older_than)
        if args.stage or args.incomplete:
            # --incomplete narrows the choice to interrupted saves: committed artifacts stay
            refs = store.remove(args.stage, older_than=age, committed=not args.incomplete,
                                incomplete=args.incomplete, dry_run=args.dry_run)
            removed += [f"{r.stage}/{r.key}" for r in refs]
        strays = (store.remove_strays(args.stage, older_than=age, dry_run=args.dry_run)
                  if args.incomplete else [])
        _print_removed(args.dry_run, removed, strays, "")
        return 0

    # gc: keep what results.json files name (and, transitively, their upstream)
    keep_paths = args.keep or [p for p in ("./sds-out", "./sds-sweep") if Path(p).exists()]
    keep = _keys_of_results(keep_paths)
    if not keep:
        raise ConfigError("gc found no results.json to keep (it would remove everything); "
                          "pass --keep path/to/results.json, or use `sds store rm --stage`")
    age = parse_age(args.older_than)
    refs = store.remove(None, older_than=age, keep=sorted(keep), incomplete=True,
                        dry_run=args.dry_run)
    strays = store.remove_strays(None, older_than=age, dry_run=args.dry_run)
    _print_removed(args.dry_run, [f"{r.stage}/{r.key}" for r in refs], strays,
                   f"; kept {len(keep)} named by results")
    return 0


def _print_removed(dry_run: bool, artifacts: list[str], strays: list[str], tail: str) -> None:
    verb = "would remove" if dry_run else "removed"
    files = f" and {len(strays)} stray temporary file(s)" if strays else ""
    print(f"{verb} {len(artifacts)} artifact(s){files}{tail}")
    for item in artifacts + strays:
        print(f"  {item}")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# -- serve --------------------------------------------------------------------------------------
def cmd_serve(args, console) -> int:
    from flows.serve import serve

    if not os.environ.get("PREFECT_API_URL"):
        console.print("[yellow]PREFECT_API_URL is not set: the deployments are served by a "
                      "temporary server that stops with this command. Start one with `prefect "
                      "server start` and export PREFECT_API_URL to see them in the UI.[/]")
    path = args.file or Path(__file__).resolve().parents[1] / "deployments" / "local.yaml"
    serve(path, args.name or None, args.limit)
    return 0


# -- interruption -------------------------------------------------------------------------------
GRACE_SECONDS = 3.0  # after Ctrl-C / SIGTERM, how long Prefect gets to record the crash


class Interruption:
    """Ctrl-C (SIGINT) and SIGTERM stop the command within seconds, exit 130 and 143.

    The signal raises KeyboardInterrupt in the main thread, so that Prefect records the crash.
    But stage threads keep computing, and a terminal's Ctrl-C also reaches the embedded API
    server, after which every call to it retries for a minute: so the command does not wait
    for them. It stops its child processes (the embedded API) and exits at once, when the
    KeyboardInterrupt reaches `main`, GRACE_SECONDS after the signal, or at a second signal,
    whichever is first. Python runs signal handlers only when the main thread wakes up, which
    can be minutes later when it waits on a stage; the signal's wake-up byte (set_wakeup_fd)
    starts the countdown at once. Finished stages are committed; a save cut short leaves no
    commit (`sds store gc` clears its files)."""

    def __init__(self, console):
        self.console, self.code = console, None
        self.previous: dict = {}
        self.lock = threading.Lock()
        try:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.handle)
            self.wakeup, writer = socket.socketpair()
            writer.setblocking(False)
            self.writer = writer
            self.previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
            threading.Thread(target=self.watch, name="sds-signals", daemon=True).start()
        except ValueError:  # not the main thread: leave signals alone
            pass

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if hasattr(self, "previous_fd"):
            signal.set_wakeup_fd(self.previous_fd)
            self.writer.close()
            self.wakeup.close()  # ends the watcher

    def watch(self) -> None:
        with contextlib.suppress(OSError):
            while data := self.wakeup.recv(16):
                for signum in data:
                    if signum in (signal.SIGINT, signal.SIGTERM):
                        self.signalled(signum)

    def signalled(self, signum: int) -> None:
        """The first signal starts the countdown to `stop`, the second stops at once."""
        with self.lock:
            first, self.code = self.code is None, self.code or 128 + signum
        if not first:
            self.stop()
        threading.Timer(GRACE_SECONDS, self.stop).start()

    def handle(self, signum, frame) -> None:
        if not hasattr(self, "previous_fd"):  # no watcher counts the signals
            self.signalled(signum)
        raise KeyboardInterrupt

    def stop(self) -> None:
        """Say so, end the child processes, and exit now (no waiting for stage threads)."""
        with contextlib.suppress(Exception):
            self.console.print("[red]interrupted[/]: finished stages are in the store; run the "
                               "same command again to resume")
        _end_children()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(self.code or EXIT_INTERRUPTED)


def _end_children(wait: float = 2.0) -> None:
    """SIGTERM every descendant of this process (Linux: from /proc), SIGKILL those still
    there after `wait` seconds; elsewhere, stop Prefect's embedded API server."""
    server = sys.modules.get("prefect.server.api.server")
    if not os.path.isdir("/proc/self"):
        for instance in list(server.SubprocessASGIServer._instances.values()
                             if server else ()):
            with contextlib.suppress(Exception):
                instance.stop()
        return
    pids = _descendants(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)  # reap our own children
            pids = [p for p in pids if _running(p)]
            time.sleep(0.05)


def _stat(pid) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name: [state, ppid, ...]."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _running(pid: int) -> bool:
    try:
        return _stat(pid)[0] != "Z"
    except OSError:
        return False


def _descendants(root: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry)] = int(_stat(entry)[1])
    found, todo = [], [root]
    while todo:
        parent = todo.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += children
        todo += children
    return found


# -- entry point --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_environment(args)
    from rich.console import Console

    # the terminal's stderr, kept even while the flow's own stderr goes to a log file
    console = Console(file=os.fdopen(os.dup(2), "w", buffering=1, closefd=True),
                      force_terminal=sys.stderr.isatty() or None)
    interruption = Interruption(console)
    try:
        return args.handler(args, console)
    except BrokenPipeError:  # the reader left early, e.g. `sds store ls | head`
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        interruption.stop()
        return EXIT_INTERRUPTED  # not reached
    except Exception as exc:
        if args.traceback:
            console.print_exception()
        console.print(f"[red]error:[/] {one_line(exc)}", highlight=False, soft_wrap=True)
        return exit_code(exc)
    finally:
        interruption.restore()


if __name__ == "__main__":
    sys.exit(main())
