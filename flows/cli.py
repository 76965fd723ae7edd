"""The `sds` command.

    sds run                      prune the offline demo model (SDS), evaluate, write ./sds-out
    sds run --model facebook/opt-125m --calib c4 --eval wikitext2      the paper's setting
    sds sweep --methods sparsegpt,wanda --patterns 2:4,50%             a grid, shared stages once
    sds store ls | rm | gc       find and clean artifacts
    sds serve                    serve the demo deployments (flows/serve.py)

Exit codes: 0 done, 1 a stage failed, 2 bad input (options, data, model), 3 the store cannot be
used, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM); no child process is left behind.
Errors print one line (cause and fix); --traceback shows the rest.

Prefect's settings are read when it is imported, so this module sets them (quiet console, the
embedded API when no PREFECT_API_URL is set) before importing anything that imports Prefect.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

EXIT_FAILED, EXIT_INPUT, EXIT_STORE, EXIT_INTERRUPTED = 1, 2, 3, 130


# -- arguments ----------------------------------------------------------------------------------
# flags whose name is not the field's; every other option is --<field name with dashes>
FLAGS = {"exclude": ["--exclude"], "overrides": ["--override"], "sds_options.l1": ["--lambda1",
         "--l1"], "sds_options.l2": ["--lambda2", "--l2"], "sds_options.data": ["--sds-data"]}
REPEATED = {"exclude": "REGEX", "overrides": "REGEX=PATTERN"}


def _add_options(parser: argparse.ArgumentParser, kind) -> None:
    """One option per field of the run configuration `kind` (tasks.config), and one per SDS
    option (sds.options.SDSConfig); the field's description is the help. Options left out
    keep the configuration's default (or, for a sweep, the grid file's value); the values are
    validated by the configuration, not here."""
    import dataclasses

    from sds.options import SDS_OPTION_HELP, SDSConfig

    group = parser.add_argument_group(f"options ({kind.__name__} in tasks/config.py)")
    for name, field in kind.model_fields.items():
        if name == "sds_options" or field.annotation == list[bool]:
            continue
        help_text = (field.description or "").replace("%", "%%")
        if name in REPEATED:
            group.add_argument(*FLAGS[name], dest=name, action="append", metavar=REPEATED[name],
                               default=argparse.SUPPRESS, help=f"{help_text} (repeatable)")
            continue
        shown = ",".join(field.default) if isinstance(field.default, list) else field.default
        if not isinstance(shown, bool | None) and "default" not in help_text:
            help_text += f" (default: {shown})"
        if field.default is True:  # the flag is --no-NAME: say what turning it off does
            help_text = _when_off(name, help_text)
        _add_option(group, name, field.default, help_text)
    group = parser.add_argument_group("SDS options (SDSConfig in sds/options.py; a grid file "
                                      "holds them under sds_options:)")
    for f in dataclasses.fields(SDSConfig):
        text = SDS_OPTION_HELP[f.name].replace("%", "%%")
        _add_option(group, f"sds_options.{f.name}", f.default,
                    f"turn off (on by default: {text})" if f.default is True
                    else f"{text} (default {f.default})")


def _when_off(name: str, description: str) -> str:
    """What a field that is on by default does when off: its description's "(off: WHAT)"."""
    off = re.search(r"\(off: (.*)\)$", description)
    return off.group(1) if off else f"turn off {name}"


def _add_option(group, dest: str, default, help_text: str) -> None:
    """`--name VALUE`, or for a bool `--name` (off by default) or `--no-name` (on by default);
    the flag is named after the field unless FLAGS names it."""
    name = dest.rpartition(".")[2]
    flags = _flags(dest)
    if isinstance(default, bool):
        group.add_argument(*[f"--no-{f[2:]}" for f in flags] if default else flags, dest=dest,
                           action="store_false" if default else "store_true",
                           default=argparse.SUPPRESS, help=help_text)
    else:
        group.add_argument(*flags, dest=dest, metavar=name.upper(), default=argparse.SUPPRESS,
                           help=help_text)


def _output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Prefect's and the libraries' logs")
    parser.add_argument("--traceback", action="store_true", help="show tracebacks of errors")


def _outs() -> list[str]:
    """The default output folders of a run and a sweep."""
    from tasks.config import RunConfig, SweepConfig

    return [kind.model_fields["out"].default for kind in (RunConfig, SweepConfig)]


def build_parser() -> argparse.ArgumentParser:
    from tasks.config import RunConfig, SweepConfig
    from tasks.store import DEFAULT_ROOT, default_store

    parser = argparse.ArgumentParser(
        prog="sds", description="Sparse-Dense-Sparse pruning of language models, as a cached "
        "Prefect workflow.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="prune one model (default: the offline demo)",
                         description="Prune one model with one method and pattern, SDS on top, "
                         "and evaluate the dense, one-shot and SDS models.")
    _add_options(run, RunConfig)
    run.add_argument("--flow-run", action="store_true",
                     help="run (and record) the Prefect flow even when every stage is in the "
                     "store; without it such a run is answered from the store, without starting "
                     "Prefect, and does not appear in the Prefect UI")
    run.set_defaults(handler=cmd_run)

    sweep = sub.add_parser("sweep", help="a grid of models x methods x patterns",
                           description="Run every combination; stages shared by several "
                           "points (calibration, dense evaluation) run once.")
    sweep.add_argument("--grid", help="YAML (or .json) file of SweepConfig fields (models, "
                       "methods, patterns, any other option); options given here win")
    sds_choice = sweep.add_mutually_exclusive_group()  # one dest: the last would win silently
    sds_choice.add_argument("--both", dest="sds", action="store_const", const=[True, False],
                            default=argparse.SUPPRESS, help="each point with and without SDS")
    sds_choice.add_argument("--no-sds", dest="sds", action="store_const", const=[False],
                            default=argparse.SUPPRESS, help="one-shot pruning only")
    _add_options(sweep, SweepConfig)
    sweep.set_defaults(handler=cmd_sweep)
    for p in (run, sweep):
        p.add_argument("--online", action="store_true",
                       help="allow the Hugging Face hub for the demo (it runs offline otherwise)")
        _output(p)

    store = sub.add_parser("store", help="list and clean the artifact store")
    store_sub = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    ls = store_sub.add_parser("ls", help="list artifacts")
    ls.add_argument("--stage", help="one stage only")
    ls.add_argument("--json", action="store_true", help="print JSON lines")
    rm = store_sub.add_parser("rm", help="remove artifacts (never what runs in progress need)")
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
                    f"their upstream stay (repeatable; default {' and '.join(_outs())})")
    gc.add_argument("--older-than", default="1h",
                    help="only artifacts older than this (default 1h). What runs in progress "
                    "need is always kept, at any age")
    for p in (ls, rm, gc):
        p.add_argument("--store", default=default_store(), help="folder or s3://bucket/prefix "
                       f"(default: $SDS_STORE if set, else {DEFAULT_ROOT})")
        _output(p)
    for p in (rm, gc):
        p.add_argument("--dry-run", action="store_true", help="only say what would go")
    store.set_defaults(handler=cmd_store)

    serve = sub.add_parser("serve", help="serve the demo deployments locally until Ctrl-C "
                           "(on the server PREFECT_API_URL names; without it, a temporary one)")
    serve.add_argument("--name", action="append", default=[], help="serve only this one")
    serve.add_argument("--limit", type=_at_least_one, help="flow runs at the same time "
                       "(default: no limit)")
    _output(serve)
    serve.set_defaults(handler=cmd_serve)
    return parser


# -- environment --------------------------------------------------------------------------------
def uses_hub(config, online: bool = False) -> bool:
    """Whether a run or sweep may need the Hugging Face hub (the demo never does)."""
    from sds.options import TASK_PRESETS
    from tasks.plan import HUB_SOURCES

    models = config.models if hasattr(config, "models") else [config.model]
    local_tasks = {"demo", *TASK_PRESETS["demo"]}
    return (online or any(m not in (None, "", "demo") for m in models)
            or any(s in HUB_SOURCES for s in [config.calib, *(config.eval or [])])
            or any(t not in local_tasks for t in config.tasks or []))


def configure_environment(verbose: bool) -> None:
    """Prefect and library settings, before anything imports them. Values already in the
    environment win."""
    env = os.environ
    if not env.get("PREFECT_API_URL"):
        env.setdefault("PREFECT_SERVER_EPHEMERAL_ENABLED", "true")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("DO_NOT_TRACK", "1")  # the client's side of it (and its notice on a terminal)
    env.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "INFO" if verbose else "CRITICAL")
    env.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "sds")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Torch's OpenMP threads spin while they wait by default: next to Prefect's own threads (and
    # anything else on a small machine) that can slow a forward pass tens of times.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not verbose:
        env.setdefault("TRANSFORMERS_VERBOSITY", "error")
        env.setdefault("TQDM_DISABLE", "1")  # every library's progress bars
        for name in ("lm_eval", "lm-eval", "datasets", "transformers", "accelerate", "httpx",
                     "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.ERROR)


# Linux: starts `python ARGS...` (argv[2:]) bound to the process argv[1], so that the kernel
# sends it SIGTERM when that process dies, also by SIGKILL (the OOM killer), when no atexit
# runs; if it died before the binding took, the server does not start. The binding follows the
# starting thread, so it is used from the main thread only (`_bound`).
_BOUND_TO_PARENT = """
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def _bound(command: list[str]) -> list[str]:
    """`command` (a python command line) bound to this process where Linux allows it."""
    if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread():
        return [sys.executable, "-c", _BOUND_TO_PARENT, str(os.getpid()), *command[1:]]
    return command


class EmbeddedAPI:
    """Prefect's API for the length of this command, when no PREFECT_API_URL is set: the server
    Prefect's ephemeral mode would start (uvicorn serving prefect.server's app in a subprocess,
    on the runs database in PREFECT_HOME), started first thing and without importing the server
    in this process, so that it boots on another core while this one imports the library and
    plans the run. It stops when the command exits, however it exits."""

    started: list[EmbeddedAPI] = []

    def __init__(self):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/api"
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1"}  # as Prefect starts its ephemeral server
        self.process = subprocess.Popen(
            _bound([sys.executable, "-m", "uvicorn", "--factory",
                    "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port",
                    str(port), "--log-level", "error", "--lifespan", "on"]),
            # a session of its own: a terminal's Ctrl-C reaches the command, which then still
            # talks to its server (Prefect records the crash, `sds serve` pauses its
            # schedules) and stops it on the way out
            env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        atexit.register(self.stop)
        EmbeddedAPI.started.append(self)
        os.environ["PREFECT_API_URL"] = self.url  # for Prefect, imported after this

    def wait(self, timeout: float = 120.0) -> None:
        """Until the server answers its health check."""
        import urllib.request

        from sds.errors import SDSError

        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:
                    if answer.read().strip() == b"true":
                        return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SDSError(f"Prefect's embedded API did not start (exit code "
                               f"{self.process.poll()}); run with --verbose to see why, or "
                               "start a server and set PREFECT_API_URL")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def check_server() -> None:
    """The Prefect server that PREFECT_API_URL names answers its health check; otherwise a
    ConfigError names the URL and the way out (Prefect's own errors, `RuntimeError: Failed to
    reach API` and for `sds serve` a bare `ConnectError`, give neither)."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from sds.errors import ConfigError

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        failure = client.api_healthcheck()
    if failure is not None:
        raise ConfigError(f"no Prefect server answers at PREFECT_API_URL={url} "
                          f"({one_line(failure)}); start it (`prefect server start`), correct "
                          "the URL, or unset PREFECT_API_URL to use Prefect's embedded API")


def embedded_api() -> EmbeddedAPI | None:
    """Prefect's embedded API, started now, when no server is set (PREFECT_API_URL)."""
    return None if os.environ.get("PREFECT_API_URL") else EmbeddedAPI()


# -- errors -------------------------------------------------------------------------------------
def plain(text) -> str:
    """`text` for a rich console line, its brackets shown as typed: rich reads `[...]` as
    markup, which dropped `[ab]` from a regex in a message and made `[/]` raise MarkupError
    (a traceback in place of the one-line error)."""
    from rich.markup import escape

    return escape(str(text))


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    from sds.errors import SDSError

    if isinstance(exc, SDSError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def exit_code(exc: BaseException) -> int:
    """The one mapping of errors to exit codes (see the module docstring)."""
    from sds.errors import ConfigError, DataError, ModelError, StoreError
    from tasks.store import no_space

    if isinstance(exc, StoreError) or no_space(exc):
        return EXIT_STORE
    if isinstance(exc, ConfigError | DataError | ModelError):
        return EXIT_INPUT
    return EXIT_FAILED


# -- run and sweep ------------------------------------------------------------------------------
def _given(args) -> dict:
    """The configuration fields given on the command line (options left out are absent)."""
    given = {k: v for k, v in vars(args).items() if "." not in k}
    sds = {k.partition(".")[2]: v for k, v in vars(args).items() if k.startswith("sds_options.")}
    if sds:
        given["sds_options"] = sds
    if "overrides" in given:
        given["overrides"] = _overrides(given["overrides"])
    return given


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


def _config(kind, args, base: dict | None = None, where: str = "command line"):
    """`kind` (RunConfig or SweepConfig) from `base` (a grid file's fields) and the command line:
    an option given on the command line wins over the grid file's, SDS options one by one.
    Without a Prefect server the default GPU limit is none: the embedded API lives and dies with
    this process, whose own lock is enough."""
    from tasks.config import build

    values = dict(base or {})
    given = {k: v for k, v in _given(args).items() if k in kind.model_fields}
    if isinstance(values.get("sds_options"), dict) and "sds_options" in given:
        given["sds_options"] = {**values["sds_options"], **given["sds_options"]}
    values.update(given)
    if getattr(args, "api", None) is not None or not os.environ.get("PREFECT_API_URL"):
        values.setdefault("gpu_limit", None)
    config = build(kind, values, where)
    sds = config.sds if isinstance(config.sds, list) else [config.sds]
    if isinstance(values.get("sds_options"), dict) and values["sds_options"] and not any(sds):
        from sds.errors import ConfigError

        names = ", ".join(sorted(_flag(f"sds_options.{n}") for n in values["sds_options"]))
        raise ConfigError(f"{names}: SDS options, but SDS is off (--no-sds, or sds: false in "
                          "the grid file), so they would be ignored; drop them, or turn SDS on")
    return config


def absolute_paths(config):
    """`config` with its local paths absolute: the store (`$SDS_STORE` or ./sds-store when
    none is given), `out`, model folders, calibration and evaluation files. The flow run
    records its configuration as its parameters, and `prefect flow-run retry` runs it again
    from whatever folder it is typed in: relative paths would then name another store (every
    stage computed again) and another output folder. Names and URLs stay as they are."""
    from tasks.plan import local_paths

    update = local_paths(config)
    store = config.store_root()  # `$SDS_STORE` recorded too, a URL as it is
    update["store"] = store if "://" in store else os.path.abspath(os.path.expanduser(store))
    if config.out:
        update["out"] = os.path.abspath(config.out)
    return config.model_copy(update=update)


def _flags(dest: str) -> list[str]:
    """The command-line flags of a configuration field (`sds_options.l1`: --lambda1, --l1)."""
    return FLAGS.get(dest, ["--" + dest.rpartition(".")[2].replace("_", "-")])


def _flag(dest: str) -> str:
    return _flags(dest)[0]


class TerminalProgress(logging.Handler):
    """Stage progress drawn as rich progress bars on stderr, from the stages' own log records
    (tasks.common.progress): nothing but Prefect's logging in between. With `to_log`, each
    record is also one line on file descriptor 2 (the run's sds.log: `<title>: block k/N ...`).
    A stage is known by its artifact key: the points of a sweep over several models have stages
    of one title (`calibration`, `oneshot sparsegpt 2:4`) for each model; `models` (artifact key
    -> the model's short name) names the model beside the title."""

    def __init__(self, console, to_log: bool = False, warnings: bool = True,
                 said: frozenset[str] = frozenset(), models: dict[str, str] | None = None):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        super().__init__(logging.INFO)
        # with a log, what libraries write to sys.stderr goes there, as what they write to
        # file descriptor 2 does (rich would otherwise print it above the bars)
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description:<30}"),
                                 BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=console, transient=True, redirect_stderr=not to_log)
        self.bars: dict[str, int] = {}
        self.logger = logging.getLogger("prefect.task_runs")
        self.to_log = to_log
        # the library's warnings (weights left dense, a layer never called, a failed Cholesky
        # factorization): Prefect's console handler shows them only with --verbose
        self.library = logging.getLogger("sds") if warnings else None
        # the flows' warnings marked for the terminal (`extra={"sds_warning": True}`: a clock
        # far off the store's), which Prefect's console handler also shows only with --verbose
        self.flows = logging.getLogger("prefect.flow_runs") if warnings else None
        self.said: set[str] = set(said)  # warnings printed already (`_warn`): not again
        self.logged: set[str] = set()  # warnings written to the log (`_warn` printed none there)
        self.models = models or {}

    def __enter__(self):
        self.progress.start()
        self.logger.addHandler(self)
        for logger in (self.library, self.flows):
            if logger is not None:
                logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        for logger in (self.library, self.flows):
            if logger is not None:
                logger.removeHandler(self)
        self.progress.stop()
        return False

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "sds", None)
        if not isinstance(event, dict):
            if record.levelno >= logging.WARNING and (
                    record.name.startswith("sds") or getattr(record, "sds_warning", False)):
                self._warning(record)
            return
        kind, stage = event.get("event"), event.get("key") or event["title"]
        label = event["title"]
        if stage in self.models:
            label = f"{label} ({self.models[stage]})"
        with contextlib.suppress(Exception):
            if self.to_log:
                os.write(2, f"{record.getMessage()}\n".encode())
            if kind == "cached" and stage not in self.bars:
                self.progress.console.print(f"[green]✓[/] {label:<30} [dim]from the store[/]",
                                            highlight=False)
                self.bars[stage] = -1
            elif kind == "start":
                self.bars[stage] = self.progress.add_task(label, total=None)
            elif kind == "block" and self.bars.get(stage, -1) >= 0:
                self.progress.update(self.bars[stage], total=event["blocks"],
                                     completed=event["block"])
            elif kind == "done" and self.bars.get(stage, -1) >= 0:
                self.progress.remove_task(self.bars[stage])
                self.bars[stage] = -1
                self.progress.console.print(f"[green]✓[/] {label:<30} computed in "
                                            f"{event.get('seconds', 0):.1f} s", highlight=False)
            elif kind == "failed":  # said here too: a bar that only vanished would not say
                if self.bars.get(stage, -1) >= 0:
                    self.progress.remove_task(self.bars[stage])
                self.bars[stage] = -1
                self.progress.console.print(f"[red]✗[/] {label:<30} failed",
                                            highlight=False)

    def _warning(self, record: logging.LogRecord) -> None:
        """A library warning, once per run: on the console above the bars, and in the log."""
        with contextlib.suppress(Exception):
            message = record.getMessage()
            if self.to_log and message not in self.logged:  # the log gets it even when said
                self.logged.add(message)
                os.write(2, f"warning: {message}\n".encode())
            if message in self.said:
                return
            self.said.add(message)
            self.progress.console.print(f"[yellow]warning:[/] {plain(message)}", highlight=False,
                                        soft_wrap=True)


def _stdout_console():
    """Tables on stdout; when it is not a terminal (a pipe, a file) nothing is cut short."""
    from rich.console import Console

    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160)


def _metrics_table(title: str, runs: list[dict], named: bool = False):
    """One row per metric of each run (`report.table_rows`): the value on each model state, what
    SDS gained and the share of the one-shot gap it recovered; `named`: a column of run names."""
    from rich.table import Table

    from flows import report

    states = [s for s in ("dense", "oneshot", "sds") if any(s in r["metrics"] for r in runs)]
    table = Table(title=title)
    for column in (["run"] if named else []) + ["metric"]:
        table.add_column(column, no_wrap=True)
    for column in states + (["SDS gain", "gap recovered"] if "sds" in states else []):
        table.add_column(column, justify="right")
    for run in runs:
        for row in report.table_rows(run):
            places = report.decimals(*(row.get(s) for s in states))
            cells = ([run["name"]] if named else []) + [row["metric"]]
            cells += [report._fmt(row.get(s), places) for s in states]
            if "sds" in states:
                cells += [report.signed(row.get("sds gain"), places),
                          report.percent(row.get("gap recovered"))]
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


def check_out(out: str | os.PathLike, files: tuple[str, ...] = ("results.json", "sds.log")
              ) -> None:
    """The output folder can be created and written, and none of the `files` the run writes
    there is a folder, before any stage runs."""
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
    for name in files:  # written at the end of the run, or by the flow
        if (path / name).is_dir():
            raise ConfigError(f"{path / name} is a folder, where the run writes its {name}; "
                              "move it away or choose another --out")


def _run_flow(flow_fn, config, console, api: EmbeddedAPI | None, log: Path | None,
              verbose: bool = False, said: frozenset[str] = frozenset(),
              models: dict[str, str] | None = None):
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    if api is not None:
        with console.status("starting Prefect's embedded API"):
            api.wait()
    else:
        check_server()
    # the heartbeat only matters to a server watching for crashed runs; without it the flow
    # call returns a second earlier
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        with _stderr_to(log), TerminalProgress(console, to_log=log is not None,
                                               warnings=not verbose,  # verbose: Prefect's
                                               said=said, models=models):
            return flow_fn(config)


def _offline(config, args) -> None:
    """No hub unless the run may need it: offline failures are instant, online ones retry."""
    if not uses_hub(config, args.online):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _check_destinations(config, settings: list[dict]) -> None:
    """The store can be written and read, and the output folder written, apart from every
    local model folder of the run or sweep; the model folders the export would replace
    (`<out>/model`, a sweep's `<out>/<run>/model`) are absent or sds's own (`settings`: the
    points' plan settings, for the sweep's run names)."""
    from flows.report import run_names
    from sds.errors import ConfigError
    from tasks.export import check_replaceable
    from tasks.store import ArtifactStore

    ArtifactStore(config.store_root()).check()
    if config.out:
        sweep = hasattr(config, "models")
        for model in config.models if sweep else [config.model]:
            check_out_apart(config.out, model, sweep)
        check_out(config.out, ("sweep.json", "sds.log") if sweep else ("results.json",
                                                                        "sds.log"))
        for name in run_names(settings) if sweep else []:  # `<out>/<run>/results.json`
            point = Path(config.out) / name
            if point.exists() and not point.is_dir():
                raise ConfigError(f"{point} is a file, where the sweep writes the folder of "
                                  f"its point {name}; move it away or choose another --out")
            check_out(point, ("results.json",))
        if config.export:
            out = Path(config.out)
            for folder in [out / name for name in run_names(settings)] if sweep else [out]:
                check_replaceable(folder / "model")


def check_out_apart(out: str, model: str | None, sweep: bool = False) -> None:
    """`out` and the local model folder `model` (the demo's too) do not overlap. A run writes
    files into `out` and replaces `<out>/model`; a sweep writes `<out>/<run>/...`: a model
    folder that holds `out`, or lies inside what is replaced, would be changed."""
    from sds.demo import demo_model_path
    from sds.errors import ConfigError

    folder = demo_model_path("opt") if model in (None, "", "demo") else Path(model).expanduser()
    if not folder.is_dir():
        return  # a hub id
    folder, target = folder.resolve(), Path(out).expanduser().resolve()
    replaced = target if sweep else (target / "model").resolve()  # a link: where it leads
    if target.is_relative_to(folder) or folder.is_relative_to(replaced):
        raise ConfigError(f"--out {out} overlaps the model folder {folder}: the run would "
                          f"write into it or replace it; choose an --out outside it"
                          + ("" if sweep else " whose model/ is not this folder"))


def _check(config, points: list, console, warn: bool = True) -> frozenset[str]:
    """What comes before the flow: the plan of every point (bad input fails here, before any
    stage), the store and the output folder; then the warnings (unless said already), which
    it returns."""
    with console.status("checking the inputs"):
        settings = [_planned(point, len(points) > 1).settings for point in points]
        _check_destinations(config, settings)
    return _warn(settings, console) if warn else frozenset()


def _planned(point, name_it: bool):
    """The point's plan; with `name_it` (a sweep of several points) an error that does not
    name the point's model says which point it is: the same pattern can fit one model's
    layers and not another's."""
    from sds.errors import SDSError
    from tasks.plan import plan_pipeline

    try:
        return plan_pipeline(point)
    except SDSError as exc:
        model = point.model or "demo"
        if not name_it or model in str(exc):
            raise
        raise type(exc)(f"{model} ({point.method} {point.pattern}): {one_line(exc)}") from None


def _warn(settings: list[dict], console) -> frozenset[str]:
    """Warnings about the points' settings (SDS on too few calibration tokens), once each;
    also for a run answered from the store, whose numbers they explain. Returns them: the
    stage that logs the same warning is not shown it twice."""
    from sds.options import few_tokens_warning

    warnings = {few_tokens_warning(s["nsamples"] * s["seqlen"]) for s in settings if s["sds"]}
    warnings.discard(None)
    warnings.update(w for s in settings for w in _unread_options(s))
    for warning in sorted(warnings):
        console.print(f"[yellow]warning:[/] {plain(warning)}", highlight=False, soft_wrap=True)
    return frozenset(warnings)


def _unread_options(settings: dict) -> list[str]:
    """Warnings for the one-shot options a point sets that its method does not read (and no
    SDS step: `sds.options.unread_options`)."""
    from sds.options import unread_options
    from tasks.config import RunConfig

    fields = {"blocksize": "blocksize", "percdamp": "percdamp",
              "sequential": "oneshot_sequential", "target_mix": "oneshot_target_mix"}
    given = [option for option, field in fields.items()
             if settings[field] != RunConfig.model_fields[field].default]
    return [f"method {settings['method']} does not read {_flag(fields[option])}; it is ignored"
            for option in unread_options(settings["method"], given, sds=settings["sds"])]


def _log_file(config, args) -> Path | None:
    """Where the flow's stderr goes (None with --verbose: the terminal)."""
    return None if args.verbose or not config.out else Path(config.out) / "sds.log"


def _answer_from_store(config, plan, refs: dict, console, log: Path | None) -> dict:
    """The run's results without Prefect: what the flow would write on this fully cached run
    (results.json, the model folder unless it already holds this artifact), through the same
    functions. Says so, and how to get a recorded flow run instead."""
    from datetime import UTC, datetime

    from flows import report
    from tasks.export import write_model

    started, t0 = datetime.now(UTC), time.perf_counter()
    message = (f"all {len(refs)} stages were found in the store: answered from it, no flow run "
               "was started (add --flow-run to run one that Prefect records)")
    with _stderr_to(log):
        if log is not None:  # the log file's copy; the console line follows
            print(message, file=sys.stderr, flush=True)
        results = report.finish(plan, refs, config.out, write_model if config.export else None,
                                started, t0, None)
    console.print(f"[green]✓[/] {plain(message)}", highlight=False, soft_wrap=True)
    return results


def cmd_run(args, console) -> int:
    """Parse, one RunConfig, then the flow, or the answer from the store when it holds every
    stage (unless --flow-run). Prefect is imported, and its embedded API started, only for the
    flow. The plan (and with it every check that needs the model or the data) is made here,
    before Prefect starts, and the flow finds it made."""
    from sds.errors import UpstreamLostError
    from tasks.common import committed_references
    from tasks.config import RunConfig
    from tasks.plan import plan_pipeline

    t0 = time.perf_counter()
    config = absolute_paths(_config(RunConfig, args))
    _offline(config, args)
    log = _log_file(config, args)
    # the keys only (no torch): with every stage committed, none of the checks that need the
    # model is needed; the store and the output folder are checked all the same
    with console.status("looking for the run's stages in the store"):
        plan = plan_pipeline(config, check=False)
        refs = None if args.flow_run else committed_references(plan)
        if refs is not None:
            _check_destinations(config, [plan.settings])
    said = _warn([plan.settings], console) if refs is not None else frozenset()
    results = None
    if refs is not None:
        from tasks.common import pinned

        with pinned([plan]):  # `sds store gc` meanwhile leaves them be
            refs = committed_references(plan)  # still all there, now that they are pinned
            if refs is not None:
                try:
                    results = _answer_from_store(config, plan, refs, console, log)
                except UpstreamLostError as exc:  # the final weights were damaged: discarded
                    damage = " ".join(exc.damage.split())  # a str: one_line would say "str: "
                    console.print(f"[yellow]{plain(damage)}[/]; it was discarded, and the flow "
                                  "computes it again", highlight=False, soft_wrap=True)
    if results is None:
        args.api = embedded_api()  # boots while the inputs are checked
        said |= _check(config, [config], console, warn=refs is None)  # else said above
        from flows.pipeline import pipeline

        # interrupted, the command exits from `Interruption.stop`, which says this too
        started = time.time()
        args.interruption.after = lambda: _earlier_results_note(config, started)
        try:
            results = _run_flow(pipeline, config, console, args.api, log, args.verbose,
                                said)
        except Exception:
            args.interruption.after = None
            _note_earlier_results(config, console, started)
            raise
        # not in a `finally`: a Ctrl-C raises KeyboardInterrupt here, and `main` calls
        # `Interruption.stop` only once the unwinding is done; the note must still be set then
        args.interruption.after = None
    out = sys.stdout
    model = "demo" if results["config"].get("demo") else Path(results["model"]).name
    title = (f"{results['method']} {results['pattern']}{' + SDS' if results['sds'] else ''} "
             f"on {model}")
    from flows.report import table_rows

    if table_rows(results):
        _stdout_console().print(_metrics_table(title, [results]))
    else:
        print(f"{title}: nothing was evaluated (--eval none --tasks none)", file=sys.stdout)
    t = results["timings"]
    lines = [f"results  {Path(config.out) / 'results.json'}"] if config.out else []
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


def _note_earlier_results(config, console, started: float) -> None:
    """After a failed run: say that a results.json in --out is an earlier run's (this one
    wrote none), beside this run's log."""
    note = _earlier_results_note(config, started)
    if note:
        console.print(f"[yellow]note:[/] {plain(note)}", highlight=False, soft_wrap=True)


def _earlier_results_note(config, started: float) -> str:
    """'<out>/results.json is an earlier run's; ...' where the results.json in --out was
    written before this run `started` (POSIX seconds), or ''."""
    path = Path(config.out) / "results.json" if config.out else None
    with contextlib.suppress(OSError):
        if path is not None and path.is_file() and path.stat().st_mtime < started:
            return f"{path} is an earlier run's; this run wrote no results"
    return ""


def _grid_loader():
    """A safe YAML loader that reads scalars as YAML 1.2 does: `2:4` stays the string it looks
    like (YAML 1.1 reads it as the base-60 number 124), and yes/no/on/off stay words (pydantic
    still reads them as booleans where a field is one; `gpu_limit: off` is a none word). A key
    given twice in one mapping is an error, as YAML says, not the last one silently winning."""
    import yaml

    class GridLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _value in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: keys that
                    continue  # the mapping's own may override, as YAML's merge says
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, str) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key!r} is given twice (lines {seen[key]} and {line}); "
                        "give it once, with every value in one list", key_node.start_mark)
                if isinstance(key, str):
                    seen[key] = line
            return super().construct_mapping(node, deep=deep)

    tags = {f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float")}
    GridLoader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in tags]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    for tag, pattern, first in (
            ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
            ("int", r"^[-+]?(?:0|[1-9][0-9_]*)$|^0x[0-9a-fA-F_]+$", "-+0123456789"),
            ("float", r"^[-+]?(?:[0-9][0-9_]*)?\.[0-9_]*(?:[eE][-+]?[0-9]+)?$"
                      r"|^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$|^[-+]?\.(?:inf|Inf|INF)$"
                      r"|^\.(?:nan|NaN|NAN)$", "-+0123456789.")):
        GridLoader.add_implicit_resolver(f"tag:yaml.org,2002:{tag}", re.compile(pattern),
                                         list(first))
    return GridLoader


def _grid(path: str | None) -> dict:
    import yaml

    from sds.errors import ConfigError

    if not path:
        return {}
    try:
        text = Path(path).read_text()
        if Path(path).suffix.lower() == ".json":  # JSON may indent with tabs, which YAML refuses
            grid = json.loads(text, object_pairs_hook=_once_each) or {}
        else:
            grid = yaml.load(text, Loader=_grid_loader()) or {}  # noqa: S506
    except FileNotFoundError:
        raise ConfigError(f"grid file {path} does not exist") from None
    except _GivenTwice as exc:  # valid JSON, but a grid's keys are given once (as in YAML)
        raise ConfigError(f"grid file {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"grid file {path} is not valid JSON: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"grid file {path} is not valid YAML: "
                          f"{' '.join(str(exc).split())}") from None
    if not isinstance(grid, dict):
        raise ConfigError(f"grid file {path} must hold a mapping (models, methods, "
                          "patterns, ...)")
    return grid


def _once_each(pairs: list[tuple]) -> dict:
    """A JSON object whose keys are given once each, as a YAML grid's must be (`json.loads`
    would keep the last of two `patterns` silently)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _GivenTwice(f"{key!r} is given twice; give it once, with every value in one "
                              "list")
        out[key] = value
    return out


class _GivenTwice(ValueError):
    """A key given twice in one JSON object of a grid file."""


def sweep_config(args):
    """The grid file's SweepConfig fields, overridden by the options given on the command line."""
    from tasks.config import SweepConfig

    where = f"grid file {args.grid} with the command line" if args.grid else "command line"
    return _config(SweepConfig, args, _grid(args.grid), where)


def _stage_models(config) -> dict[str, str] | None:
    """For a sweep over several models: each stage's artifact key -> its model's short name
    (`demo`, or the folder's or hub id's last name, with the short hash its run names get
    where two models share that name: `report.run_names`), which the progress lines show beside
    the stage's title (the same for every model); None for one model."""
    from flows.report import run_name as report_name
    from flows.report import run_names
    from tasks.plan import plan_pipeline

    if len(config.models) < 2:
        return None
    # planned already (`_check`): the same plans, no new work
    plans = [plan_pipeline(point, check=False) for point in config.points()]
    names = {}
    for plan, run in zip(plans, run_names([plan.settings for plan in plans])):
        model = "demo" if plan.settings["demo"] else Path(plan.settings["model"]).name
        suffix = run.rpartition("-")[2] if run != report_name(plan.settings) else ""
        names.update({spec.key: f"{model}-{suffix}" if suffix else model
                      for spec in plan.specs.values()})
    return names


def cmd_sweep(args, console) -> int:
    t0 = time.perf_counter()
    config = absolute_paths(sweep_config(args))
    if config.pool and args.api is not None:
        from sds.errors import ConfigError

        raise ConfigError(f"--pool {config.pool} needs the Prefect server its workers use; set "
                          "PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
    _offline(config, args)
    said = _check(config, config.points(), console)
    from flows.sweep import SweepError, sweep

    try:
        summary = _run_flow(sweep, config, console, args.api, _log_file(config, args),
                            args.verbose, said, _stage_models(config))
    except SweepError as exc:  # the finished points are written: show them, and each failure
        _sweep_failed(config, exc, console)
        raise
    _stdout_console().print(_metrics_table("sweep", summary["runs"], named=True))
    artifacts = ", ".join(f"{label} {n}" for label, n in summary["stage_submissions"].items())
    lines = [f"stages   {artifacts} (one artifact each; shared ones once, stored ones reused)",
             f"results  {Path(config.out) / 'sweep.json'}" if config.out else
             "results  none written (--out none)",
             f"time     {time.perf_counter() - t0:.1f} s in all; sweep {summary['wall']:.1f} s"]
    print("\n".join(lines))
    return 0


def _sweep_failed(config, exc, console) -> None:
    """After a sweep with failed points: the table of the points that finished, a line per
    failed point, and for a failed point whose folder holds a results.json, that it is an
    earlier sweep's (this one wrote none there)."""
    runs, failures = exc.summary.get("runs", []), exc.summary.get("failures", [])
    if runs:
        _stdout_console().print(_metrics_table("sweep", runs, named=True))
    for failure in failures:
        console.print(f"[red]failed:[/] {plain(failure['name'])}: {plain(failure['error'])}",
                      highlight=False, soft_wrap=True)
        earlier = Path(config.out) / failure["name"] / "results.json" if config.out else None
        if earlier is not None and earlier.is_file():
            console.print(f"[yellow]note:[/] {plain(earlier)} is an earlier sweep's; this "
                          "sweep wrote no results for that point", highlight=False,
                          soft_wrap=True)
    if config.out and runs:
        print(f"results  {Path(config.out) / 'sweep.json'} ({len(runs)} finished, "
              f"{len(failures)} failed)")


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
        files = (sorted(f for f in path.rglob("results.json") if f.is_file()) if path.is_dir()
                 else [path])
        for f in files:
            try:
                data = json.loads(f.read_text())
            except FileNotFoundError:
                raise ConfigError(f"{f} does not exist") from None
            except (ValueError, OSError):
                raise ConfigError(f"{f} is not a readable results.json") from None
            named = data.get("keys") if isinstance(data, dict) else None
            if not (isinstance(named, dict)
                    and all(isinstance(k, str) for k in named.values())):
                raise ConfigError(f"{f} is not a results.json of sds (it has no \"keys\" "
                                  "naming its artifacts); pass the results of `sds run` or "
                                  "`sds sweep`")
            keys.update(named.values())
    return keys


def _check_pipeline_stage(name: str) -> None:
    """`--stage NAME` names one of the pipeline's stages (a typo would select nothing)."""
    from sds.errors import ConfigError
    from tasks.plan import STAGE_VERSIONS

    if name not in STAGE_VERSIONS:
        runs = (f" ({name} is a run of the evaluate stage: the stage is `evaluate`)"
                if name.startswith("evaluate-") else "")
        raise ConfigError(f"there is no stage {name!r}{runs}; the stages are "
                          f"{', '.join(STAGE_VERSIONS)}")


def cmd_store(args, console) -> int:
    from rich.table import Table

    from sds.errors import ConfigError
    from tasks.store import ArtifactStore

    store = ArtifactStore(args.store)
    if store.local and not Path(store.root).exists():
        raise ConfigError(f"there is no store at {store.root}: nothing was stored there (check "
                          "--store, or $SDS_STORE, which `sds run` uses when --store is not "
                          "given)")
    if getattr(args, "stage", None) is not None:
        _check_pipeline_stage(args.stage)
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
                          str(m.get("created") or "")[:16].replace("T", " "),
                          _size(m.get("bytes", 0)))
        for ref in broken:
            table.add_row(f"{ref.stage}/{ref.key}", "[red]incomplete[/]", "", "", "")
        for path in strays:
            table.add_row(path.removeprefix(store.root + "/"), "[red]stray file[/]", "", "", "")
        _stdout_console().print(table)
        print(f"{len(metas)} artifacts, {_size(sum(m.get('bytes', 0) for m in metas))}"
              + (f"; {len(broken)} incomplete" if broken else "")
              + (f"; {len(strays)} stray temporary files" if strays else "")
              + (" (sds store rm --incomplete)" if broken or strays else ""), file=out)
        return 0

    if args.store_command == "rm":
        if not args.artifacts and not args.stage and not args.incomplete:
            raise ConfigError("say what to remove: STAGE/KEY arguments, --stage, or "
                              "--incomplete")
        if args.artifacts and (args.incomplete or args.older_than):
            # named artifacts go as named: a filter beside them would be silently ignored
            flags = " and ".join(f for f, on in (("--incomplete", args.incomplete),
                                                 ("--older-than", args.older_than)) if on)
            raise ConfigError(f"STAGE/KEY arguments name exactly what goes, so {flags} "
                              "would be ignored beside them; give the STAGE/KEY arguments "
                              "alone, or --stage or --incomplete with --older-than; nothing "
                              "was removed")
        age = parse_age(args.older_than)  # every argument is checked before anything goes
        refs = []
        if args.artifacts:
            store.check_root()  # a file where the store should be: said as such, once
        for item in args.artifacts:
            stage, sep, key = item.partition("/")
            if not sep:
                raise ConfigError(f"{item!r} is not STAGE/KEY (see `sds store ls`)")
            ref = store.ref(stage, key)
            if not (store.exists(stage, key) or ref in store.incomplete(stage)):
                raise ConfigError(f"there is no artifact {item} in {store.root} (see `sds "
                                  "store ls`); nothing was removed")
            refs.append(ref)
        removed, busy = [], []
        needed = store.needed() if refs else set()
        for ref in refs:
            if ref.key in needed:
                busy.append(ref)
            elif args.dry_run:  # what discard would find: a committed or incomplete artifact
                if store.exists(ref.stage, ref.key) or ref in store.incomplete(ref.stage):
                    removed.append(f"{ref.stage}/{ref.key}")
            elif store.discard(ref.stage, ref.key):
                removed.append(f"{ref.stage}/{ref.key}")
        if args.stage or args.incomplete:
            # --incomplete narrows the choice to interrupted saves: committed artifacts stay
            chosen = store.remove(args.stage, older_than=age, committed=not args.incomplete,
                                  incomplete=args.incomplete, dry_run=args.dry_run, busy=busy)
            removed += [f"{r.stage}/{r.key}" for r in chosen]
        strays = (store.remove_strays(args.stage, older_than=age, dry_run=args.dry_run)
                  if args.incomplete else [])
        _print_removed(args.dry_run, removed, strays, _busy_note(busy))
        return 0

    # gc: keep what results.json files name (and, transitively, their upstream)
    keep_paths = args.keep or [p for p in _outs() if Path(p).exists()]
    keep = _keys_of_results(keep_paths)
    if not keep:
        raise ConfigError("gc found no results.json to keep (it would remove everything); "
                          "pass --keep path/to/results.json, or use `sds store rm --stage`")
    age = parse_age(args.older_than)
    present = keep & {m["key"] for m in store.list()}
    if not present:
        raise ConfigError(f"none of the {len(keep)} artifacts that the results name is in "
                          f"{store.root} (were they made with another --store?); gc would "
                          "remove everything, so it removed nothing")
    busy: list = []
    refs = store.remove(None, older_than=age, keep=sorted(keep), incomplete=True,
                        dry_run=args.dry_run, busy=busy)
    strays = store.remove_strays(None, older_than=age, dry_run=args.dry_run)
    ended = store.remove_stale(older_than=age, dry_run=args.dry_run)
    _print_removed(args.dry_run, [f"{r.stage}/{r.key}" for r in refs], strays,
                   f"; kept {len(present)} named by results and their upstream"
                   + _busy_note(busy)
                   + (f"; {len(ended)} pin and lease file(s) of ended runs"
                      f"{' would go' if args.dry_run else ' removed'}" if ended else ""))
    return 0


def _busy_note(busy: list) -> str:
    return (f"; kept {len(busy)} that runs in progress need (pinned or leased; "
            "remove them once those runs end)" if busy else "")


def _print_removed(dry_run: bool, artifacts: list[str], strays: list[str], tail: str) -> None:
    verb = "would remove" if dry_run else "removed"
    files = f" and {len(strays)} stray temporary file(s)" if strays else ""
    print(f"{verb} {len(artifacts)} artifact(s){files}{tail}")
    for item in artifacts + strays:
        print(f"  {item}")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# -- serve --------------------------------------------------------------------------------------
def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1; leave "
                                         "--limit out for no limit")
    return value


def cmd_serve(args, console) -> int:
    from flows.serve import serve

    api = embedded_api()
    if api is not None:
        console.print("[yellow]PREFECT_API_URL is not set: the deployments are served by a "
                      "temporary server that stops with this command. Start one with `prefect "
                      "server start` and export PREFECT_API_URL to see them in the UI.[/]")
        # ours, not Prefect's own temporary server: that one shares this command's process
        # group, so a terminal's Ctrl-C would stop it before the schedules are paused
        with console.status("starting Prefect's embedded API"):
            api.wait()
    else:
        check_server()
    args.interruption.note = ("stopped: the served deployments' schedules are paused; "
                              "`sds serve` resumes them")
    # Prefect's runner pauses the schedules once interrupted: give it the time to, unless a
    # second Ctrl-C comes first
    args.interruption.grace = SERVE_GRACE_SECONDS
    serve(args.name or None, args.limit or None)
    # Prefect's serve returns once a signal stopped it: exit as any interrupted command does
    raise KeyboardInterrupt


# -- interruption -------------------------------------------------------------------------------
GRACE_SECONDS = 3.0  # after Ctrl-C / SIGTERM, how long Prefect gets to record the crash
SERVE_GRACE_SECONDS = 30.0  # ... and for `sds serve`, to pause the deployments' schedules


class Interruption:
    """Ctrl-C (SIGINT) and SIGTERM stop the command within seconds, exit 130 and 143.

    The signal raises KeyboardInterrupt in the main thread, so that Prefect records the crash.
    But stage threads keep computing, and a server the signal reached too (one the user
    started in the same terminal) makes every call to it retry for a minute: so the command
    does not wait for them. It stops its child processes (the embedded API) and exits at
    once, when the KeyboardInterrupt reaches `main`, GRACE_SECONDS after the signal, or at a
    second signal, whichever is first. Python runs signal handlers only when the main thread
    wakes up, which can be minutes later when it waits on a stage; the signal's wake-up byte
    (set_wakeup_fd) starts the countdown at once. Finished stages are committed; a save cut
    short leaves no commit (`sds store gc` clears its files)."""

    def __init__(self, console):
        self.console, self.code = console, None
        self.note = "finished stages are in the store; run the same command again to resume"
        self.after: Callable[[], str] | None = None  # a second note, made when it is said
        self.grace = GRACE_SECONDS  # seconds from the first signal to the exit
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
        threading.Timer(self.grace, self.stop).start()

    def handle(self, signum, frame) -> None:
        if not hasattr(self, "previous_fd"):  # no watcher counts the signals
            self.signalled(signum)
        raise KeyboardInterrupt

    def stop(self) -> None:
        """Say so, end the child processes, and exit now (no waiting for stage threads)."""
        with contextlib.suppress(Exception):
            self.console.print(f"[red]interrupted[/]: {plain(self.note)}", highlight=False)
            after = self.after() if self.after is not None else ""
            if after:
                self.console.print(f"[yellow]note:[/] {plain(after)}", highlight=False,
                                   soft_wrap=True)
        _end_children()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(self.code or EXIT_INTERRUPTED)


def _end_children(wait: float = 2.0) -> None:
    """SIGTERM every descendant of this process (Linux: from /proc), SIGKILL those still
    there after `wait` seconds; elsewhere, stop the embedded API server."""
    if not os.path.isdir("/proc/self"):
        for api in EmbeddedAPI.started:
            with contextlib.suppress(Exception):
                api.stop()
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
    # parsing imports the run configuration, which imports neither Prefect nor torch nor the
    # hub's client: their settings are set afterwards, before they are imported
    args = build_parser().parse_args(argv)
    configure_environment(args.verbose)
    # without a server, Prefect's embedded API: it takes seconds to start, so a sweep starts it
    # now; a run starts it once it knows that it runs a flow (cmd_run)
    args.api = embedded_api() if args.command == "sweep" else None
    from rich.console import Console

    # the terminal's stderr, kept even while the flow's own stderr goes to a log file
    console = Console(file=os.fdopen(os.dup(2), "w", buffering=1, closefd=True),
                      force_terminal=sys.stderr.isatty() or None)
    args.interruption = interruption = Interruption(console)
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
        console.print(f"[red]error:[/] {plain(one_line(exc))}", highlight=False, soft_wrap=True)
        return exit_code(exc)
    finally:
        interruption.restore()


if __name__ == "__main__":
    sys.exit(main())
