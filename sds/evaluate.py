"""Evaluation: perplexity, output fidelity to a reference model, zero-shot accuracy.

- `perplexity`: the SparseGPT / Wanda protocol. The token stream is cut into `N // seqlen`
  non-overlapping windows; every token but the first of a window is predicted;
  ppl = exp(total nll / predicted tokens), with the log-softmax taken in fp32.
- `final_hidden_states` / `output_fidelity`: how far the last hidden state of a pruned model is
  from the dense one on the same inputs (cosine per token, relative L2 over everything). Works
  for causal LMs and encoders alike.
- `zero_shot`: lm-evaluation-harness 0.4.x on the in-memory model. Built-in tasks download their
  data from the hub; `write_local_tasks` turns multiple-choice JSONL files into offline tasks, and
  the "demo" preset runs the demo tasks shipped with the package.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib
import json
import logging
import math
import os
import random
import re
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .data import as_int, hub_unreachable, jsonl_records, max_positions
from .errors import ConfigError, DataError, HubUnreachableError, ModelError, NumericalError
from .models import check_device, check_token_ids, eval_mode
from .options import TASK_PRESETS, expand_tasks  # noqa: F401 (re-exported)

log = logging.getLogger("sds")

DEMO_TASKS = tuple(TASK_PRESETS["demo"])
_TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_LOCAL_TASK_HINT = (
    "run the offline demo tasks (--tasks demo) or a local multiple-choice task "
    "(sds.evaluate.write_local_tasks)"
)


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _device_of(model: torch.nn.Module, device) -> torch.device:
    """Where the batches go: `device` (checked, and the model must be there), or the model's."""
    check_device(device)
    held = _model_device(model)
    if device is None:
        return held
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" is the current CUDA device
        device = torch.device("cuda", torch.cuda.current_device())
    if (held.type, held.index or 0) != (device.type, device.index or 0):
        raise ConfigError(f"the model is on {held}, not on device {device}: move it there "
                          "first (model.to(device)), or leave device out")
    return device


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    with eval_mode(model), torch.no_grad():
        yield


# -- perplexity ---------------------------------------------------------------------------------
_MAX_LOG_PPL = math.log(sys.float_info.max)  # ~709.78 nats: exp() beyond is no float


def perplexity(
    model,
    input_ids: torch.Tensor,
    seqlen: int,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    max_windows: int | None = None,
    progress: bool = False,
    on_window=None,
) -> dict:
    """Perplexity of a causal LM on `input_ids: [1, N]` in `N // seqlen` non-overlapping windows.

    Returns {"ppl", "nll" (total, nats), "nll_per_token", "tokens" (predicted: seqlen - 1 per
    window), "windows", "seqlen"}. `max_windows` evaluates the first windows only.
    `on_window(done, windows)`, when given, is called after each batch of windows.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ConfigError(
            f"input_ids must be one token stream [1, N], got {tuple(input_ids.shape)}"
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or (
            input_ids.dtype == torch.bool):
        raise DataError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    input_ids = input_ids.to(torch.int64)  # cross_entropy takes int64 targets only
    seqlen = as_int("seqlen", seqlen, minimum=2)
    batch_size = as_int("batch_size", batch_size, minimum=1)
    positions = max_positions(model.config)
    if positions is not None and seqlen > positions:
        raise ConfigError(
            f"seqlen {seqlen} exceeds the model's {positions} positions "
            f"(max_position_embeddings); evaluate with a seqlen of at most {positions}"
        )
    n_windows = input_ids.numel() // seqlen
    if n_windows == 0:
        raise DataError(
            f"the evaluation text has {input_ids.numel()} tokens, fewer than one window of "
            f"seqlen={seqlen}; use a smaller seqlen or a longer text"
        )
    if max_windows is not None:
        n_windows = min(n_windows, as_int("max_windows", max_windows, minimum=1))
    windows = input_ids[0, : n_windows * seqlen].reshape(n_windows, seqlen)  # [n, seqlen]
    check_token_ids(model, windows, "evaluation text")
    device = _device_of(model, device)

    from tqdm.auto import tqdm

    total_nll = 0.0  # python float: fp64 accumulation over windows
    with _eval_mode(model):
        starts = range(0, n_windows, batch_size)
        for start in tqdm(starts, desc="perplexity", unit="batch", disable=not progress):
            batch = windows[start:start + batch_size].to(device)  # [b, seqlen]
            logits = model(input_ids=batch, use_cache=False).logits  # [b, seqlen, vocab]
            shift = logits[:, :-1, :].float()
            nll = F.cross_entropy(shift.reshape(-1, shift.shape[-1]),
                                  batch[:, 1:].reshape(-1), reduction="sum")
            if not torch.isfinite(nll):
                raise NumericalError(
                    f"the model's logits hold NaN/Inf on windows {start}..{start + len(batch) - 1}"
                    "; check the weights (fp16 overflow is a common cause: evaluate in fp32 "
                    "or bf16)"
                )
            total_nll += nll.item()
            del logits, shift
            if on_window is not None:
                on_window(start + len(batch), n_windows)
    tokens = n_windows * (seqlen - 1)
    nll_per_token = total_nll / tokens
    if nll_per_token > _MAX_LOG_PPL:  # math.exp would raise a bare OverflowError
        raise NumericalError(
            f"the perplexity overflows a float: {nll_per_token:.1f} nats per predicted token "
            f"(above {_MAX_LOG_PPL:.0f}) means the model's predictions are broken; check the "
            "weights (a pruning that destroyed the model, or fp16 overflow: evaluate in fp32)"
        )
    return {
        "ppl": math.exp(nll_per_token),
        "nll": total_nll,
        "nll_per_token": nll_per_token,
        "tokens": tokens,
        "windows": n_windows,
        "seqlen": seqlen,
    }


# -- output fidelity ----------------------------------------------------------------------------
def final_hidden_states(
    model,
    input_ids: torch.Tensor,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Last hidden state of the base model (no LM head), `input_ids: [n, seqlen]` ->
    `[n, seqlen, hidden]` fp32 on the CPU. Works for causal LMs and encoders (BERT...)."""
    if input_ids.dim() != 2:
        raise ConfigError(f"input_ids must be [n, seqlen], got {tuple(input_ids.shape)}")
    batch_size = as_int("batch_size", batch_size, minimum=1)
    device = _device_of(model, device)
    base = getattr(model, "base_model", None)
    if base is None:
        base = model
    kwargs: dict[str, Any] = {"output_hidden_states": True}
    if getattr(getattr(base, "config", None), "use_cache", None) is not None:
        kwargs["use_cache"] = False
    outputs = []
    with _eval_mode(model):
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start:start + batch_size].to(device)
            out = base(input_ids=batch, **kwargs)
            hidden = getattr(out, "hidden_states", None)
            last = hidden[-1] if hidden else getattr(out, "last_hidden_state", None)
            if last is None:
                raise ModelError(f"{type(base).__name__} returns no hidden states; "
                                 "output fidelity needs a transformers model")
            outputs.append(last.float().cpu())
    return torch.cat(outputs)


def output_fidelity(
    model,
    reference_hidden: torch.Tensor,
    input_ids: torch.Tensor,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> dict:
    """Compare the model's last hidden states on `input_ids: [n, seqlen]` with
    `reference_hidden: [n, seqlen, hidden]` (from `final_hidden_states` of the reference model).

    Returns {"cosine": mean per-token cosine similarity, "rel_l2": ‖h − h_ref‖ / ‖h_ref‖ over all
    entries, "tokens"}.
    """
    if input_ids.dim() != 2 or reference_hidden.dim() != 3 or (
            tuple(reference_hidden.shape[:2]) != tuple(input_ids.shape)):
        raise DataError(
            f"reference hidden states {tuple(reference_hidden.shape)} do not match the inputs "
            f"{tuple(input_ids.shape)}: expected [n, seqlen, hidden] for input_ids [n, seqlen]; "
            "compute them with final_hidden_states on the same input_ids"
        )
    cos_sum = diff_sq = ref_sq = 0.0
    for start in range(0, input_ids.shape[0], batch_size):
        h = final_hidden_states(model, input_ids[start:start + batch_size], batch_size, device)
        ref = reference_hidden[start:start + batch_size].float()
        if h.shape != ref.shape:
            raise DataError(f"hidden size {h.shape[-1]} of the model differs from the reference's "
                            f"{ref.shape[-1]}")
        cos_sum += F.cosine_similarity(h, ref, dim=-1).double().sum().item()
        diff_sq += (h - ref).double().pow(2).sum().item()
        ref_sq += ref.double().pow(2).sum().item()
    tokens = input_ids.numel()
    return {
        "cosine": cos_sum / tokens,
        "rel_l2": math.sqrt(diff_sq) / math.sqrt(ref_sq) if ref_sq > 0 else math.inf,
        "tokens": tokens,
    }


# -- zero-shot ----------------------------------------------------------------------------------
def write_local_tasks(dest_dir: str | Path, jsonl_files: dict[str, str | Path]) -> Path:
    """Write one lm-eval task YAML per multiple-choice JSONL file into `dest_dir`; return the
    folder, to pass as `include_path`.

    Each JSONL line: {"context": str, "choices": [str, ...], "label": int}. The task scores
    " " + choice after the context, or the choice as it is where the examples already hold
    the space (every context ends with whitespace, or every choice starts with it; lm-eval
    moves a context's trailing space into the choice, so adding one would score two), with
    acc and acc_norm like the built-in multiple-choice tasks. A file that holds the space in
    some examples and not in others is refused.
    Data paths are written absolute: lm-eval resolves relative ones against the working directory.
    """
    import yaml

    if not jsonl_files:
        raise ConfigError("write_local_tasks needs at least one {task name: JSONL file}")
    dest = Path(dest_dir).expanduser().resolve()
    dest.mkdir(parents=True, exist_ok=True)
    for name, data_path in jsonl_files.items():
        if not isinstance(name, str) or not _TASK_NAME.fullmatch(name):
            raise ConfigError(f"task name {name!r} must be letters, digits, '_', '.', '-'")
        path = Path(data_path).expanduser().resolve()
        spaced = _check_task_file(path)
        if spaced:  # acc_norm divides by the choice's length, without the space before it
            path = _spaces_into_context(path, name)
        config = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"validation": str(path)}},
            "output_type": "multiple_choice",
            "validation_split": "validation",
            "doc_to_text": "context",
            "doc_to_choice": "choices",
            "doc_to_target": "label",
            "target_delimiter": "" if spaced else " ",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
            "metadata": {"version": 1.0},
        }
        (dest / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False),
                                           encoding="utf-8")
    return dest


def _spaces_into_context(path: Path, name: str) -> Path:
    """The examples of `path` with the whitespace that starts every choice of an example moved
    to the end of its context: a file `<name>-<hash of its content>.jsonl` in the `datasets`
    cache (`path` itself when no example has such whitespace).
    lm-eval scores the same text either way (it moves a context's trailing whitespace into the
    continuation), but its acc_norm divides by the length of the choice as written: a leading
    space would count as a character of the choice, which the built-in tasks (target_delimiter
    " ") and a context ending with the space do not count."""
    docs, moved = [], False
    with open(path, encoding="utf-8") as f:
        for _, doc in jsonl_records(f, path):
            choices = doc["choices"]
            lead = os.path.commonprefix([c[:len(c) - len(c.lstrip())] for c in choices])
            if lead and all(len(c) > len(lead) for c in choices):
                doc = {**doc, "context": doc["context"] + lead,
                       "choices": [c[len(lead):] for c in choices]}
                moved = True
            docs.append(doc)
    if not moved:
        return path
    # named by its content, in one folder of the user's `datasets` cache for every call:
    # `datasets` caches a data file per path (and mtime), so a fresh path per call (the demo
    # tasks' temporary folder) would add a cache entry at each evaluation
    from datasets import config as datasets_config

    payload = "".join(json.dumps(doc) + "\n" for doc in docs).encode("utf-8")
    digest = hashlib.sha256(payload).hexdigest()[:20]
    copy = Path(datasets_config.HF_DATASETS_CACHE) / "sds-task-data" / f"{name}-{digest}.jsonl"
    if not copy.is_file():
        copy.parent.mkdir(parents=True, exist_ok=True)
        part = copy.with_name(f"{copy.name}.{os.getpid()}-{threading.get_ident()}.part")
        part.write_bytes(payload)
        os.replace(part, copy)  # whole or absent, for a reader in another thread or process
    return copy


def _check_task_file(path: Path) -> bool:
    """Fail early, with the line number, on what lm-eval would reject obscurely. Returns
    whether the examples hold the space between context and choices (each context ends with
    whitespace, or each of its choices starts with it)."""
    if not path.is_file():
        raise DataError(f"task data file {path} does not exist")
    lines, first = 0, {}  # first line with the space held (True) and without (False)
    with open(path, encoding="utf-8") as f:
        for n, doc in jsonl_records(f, path):
            ok = (isinstance(doc, dict) and isinstance(doc.get("context"), str)
                  and isinstance(doc.get("choices"), list) and len(doc["choices"]) >= 2
                  and all(isinstance(c, str) for c in doc["choices"])
                  and isinstance(doc.get("label"), int) and not isinstance(doc["label"], bool)
                  and 0 <= doc["label"] < len(doc["choices"]))
            if not ok:
                raise DataError(
                    f"{path} line {n} does not match the multiple-choice schema "
                    '{"context": str, "choices": [str, str, ...], "label": index of the answer}'
                )
            lines += 1
            held = doc["context"][-1:].isspace() or all(c[:1].isspace() for c in doc["choices"])
            first.setdefault(held, n)
    if lines == 0:
        raise DataError(f"task data file {path} holds no examples")
    if len(first) == 2:
        raise DataError(
            f"{path} line {first[True]} holds the space between context and choices (a context "
            f"ending with a space, or choices starting with one) and line {first[False]} does "
            "not; write every example one way (e.g. choices \" yes\", \" no\" after a context "
            "without a trailing space)")
    return next(iter(first))


def check_tasks(names: Sequence[str]) -> None:
    """Refuse, before any work, zero-shot task names that are neither demo tasks nor lm-eval's
    built-in tasks, groups or tags (indexing those takes seconds, once per process), and
    built-in tasks whose datasets cannot be had: in offline mode (HF_HUB_OFFLINE /
    HF_DATASETS_OFFLINE) by loading them from the local Hugging Face cache, else by probing
    the hub, as the hub corpora are checked (`sds.data.check_hub_data`)."""
    from .hub import check_hub, hub_offline

    others = [n for n in names if n not in DEMO_TASKS]
    if not others:
        return
    with _preserved_rng():
        known = set(_builtin_task_manager().all_tasks)
    for name in others:
        if name not in known:
            raise ConfigError(f"unknown zero-shot task {name!r}: not an lm-eval task or a demo "
                              f"task; presets: {', '.join(sorted(TASK_PRESETS))}")
    if not hub_offline(datasets=True):
        check_hub(f"the datasets of zero-shot tasks {', '.join(others)}", _LOCAL_TASK_HINT)
        return
    with _preserved_rng():
        for name in others:  # from the cache, or HubUnreachableError naming the task
            _load_task(_builtin_task_manager(), name, local=False)


@functools.lru_cache(maxsize=1)
def _builtin_task_manager():
    """lm-eval's index of its ~14,700 built-in tasks (seconds to build: built once)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


@contextlib.contextmanager
def _without_run_provenance():
    """lm-eval's `simple_evaluate` records the git commit of the working directory (a `git`
    subprocess that prints "fatal: not a git repository" into the caller's stderr outside a
    checkout) and torch's environment report (about 0.4 s of subprocesses). `zero_shot` returns
    neither: skip both while it runs, and give lm-eval its functions back."""
    import lm_eval.evaluator as evaluator

    stand_ins = {"get_git_commit_hash": lambda: None, "add_env_info": lambda storage: None}
    with _PROVENANCE_LOCK:  # evaluations in threads (a pipeline's stages) overlap
        if _PROVENANCE["depth"] == 0:
            _PROVENANCE["saved"] = {name: getattr(evaluator, name) for name in stand_ins
                                    if hasattr(evaluator, name)}
            for name in _PROVENANCE["saved"]:
                setattr(evaluator, name, stand_ins[name])
        _PROVENANCE["depth"] += 1
    try:
        yield
    finally:
        with _PROVENANCE_LOCK:  # the last one out gives lm-eval its own functions back
            _PROVENANCE["depth"] -= 1
            if _PROVENANCE["depth"] == 0:
                for name, fn in _PROVENANCE.pop("saved").items():
                    setattr(evaluator, name, fn)


# how many `zero_shot` calls are inside `_without_run_provenance`, and lm-eval's functions
_PROVENANCE_LOCK = threading.Lock()
_PROVENANCE: dict[str, Any] = {"depth": 0}


@contextlib.contextmanager
def _preserved_rng():
    """lm-eval reseeds python, numpy and torch globally and draws from them: give the caller its
    random streams back."""
    import numpy as np

    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _load_task(manager, name: str, local: bool) -> list:
    """lm-eval Task / Group objects for one name, with hub failures named after the task."""
    try:
        loaded = manager.load([name])
    except KeyError:
        known = ", ".join(sorted(TASK_PRESETS))
        raise ConfigError(
            f"unknown zero-shot task {name!r}: not an lm-eval task or a local task; presets: "
            f"{known}; or {_LOCAL_TASK_HINT}"
        ) from None
    except Exception as exc:
        if not local and hub_unreachable(exc):
            raise HubUnreachableError(
                f"zero-shot task {name!r} needs its dataset from the Hugging Face hub, which "
                f"cannot be reached ({exc}); {_LOCAL_TASK_HINT}"
            ) from exc
        raise DataError(f"cannot load zero-shot task {name!r}: {exc}") from exc
    if name in loaded["groups"]:
        return [loaded["groups"][name]]
    return list(loaded["tasks"].values())


def zero_shot(
    model,
    tokenizer,
    tasks: str | Sequence[str],
    batch_size: int = 8,
    limit: int | float | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    num_fewshot: int = 0,
) -> dict[str, dict]:
    """Accuracy of the in-memory model on lm-eval tasks (names or presets, see TASK_PRESETS).

    Returns {task: {"acc", "acc_norm" (None when the task has none), "acc_stderr",
    "acc_norm_stderr" (None when not numeric), "samples", and "perplexity" where reported}}.
    Local tasks come from `include_path` (see `write_local_tasks`); the demo tasks are written
    from `sds.demo` unless `include_path` defines them.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = expand_tasks(tasks)
    if not names:
        raise ConfigError(f"no zero-shot tasks given; presets: {', '.join(TASK_PRESETS)}")
    as_int("batch_size", batch_size, minimum=1)
    if isinstance(include_path, str | Path):
        include_paths = [Path(include_path)]
    else:
        include_paths = [Path(p) for p in include_path or []]
    for p in include_paths:
        if not p.exists():
            raise DataError(f"task include path {p} does not exist")

    with contextlib.ExitStack() as stack:
        stack.enter_context(_preserved_rng())
        stack.enter_context(_without_run_provenance())
        local_manager = TaskManager(include_path=[str(p) for p in include_paths] or None,
                                    include_defaults=False)
        local = set(local_manager.all_tasks)
        demo_needed = [n for n in names if n in DEMO_TASKS and n not in local]
        if demo_needed:
            demo = importlib.import_module("sds.demo")
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="sds-tasks-"))
            write_local_tasks(folder, {n: demo.task_data_path(n) for n in demo_needed})
            include_paths.append(Path(folder))
            local_manager = TaskManager(include_path=[str(p) for p in include_paths],
                                        include_defaults=False)
            local = set(local_manager.all_tasks)

        objects = []
        for name in names:
            manager = local_manager if name in local else _builtin_task_manager()
            objects += _load_task(manager, name, local=name in local)

        was_training = model.training  # HFLM switches the model to eval mode
        try:
            # a copy: lm-eval gives a tokenizer without one a pad token (the caller's would
            # then differ afterwards, in its length too where it had no end-of-sequence token)
            try:
                lm_tokenizer = copy.deepcopy(tokenizer)
            except Exception:  # noqa: BLE001 - e.g. a Python pre-tokenizer: not picklable
                lm_tokenizer = tokenizer
            lm = HFLM(pretrained=model, tokenizer=lm_tokenizer, batch_size=batch_size)
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=objects,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=local_manager,
                log_samples=False,
            )
        finally:
            model.train(was_training)
    return _tidy_results(out)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _tidy_results(out: dict) -> dict[str, dict]:
    samples = out.get("n-samples", {})
    tidy = {}
    for task, metrics in out["results"].items():
        entry = {
            "acc": _number(metrics.get("acc,none")),
            "acc_norm": _number(metrics.get("acc_norm,none")),
            "acc_stderr": _number(metrics.get("acc_stderr,none")),
            "acc_norm_stderr": _number(metrics.get("acc_norm_stderr,none")),
            "samples": samples.get(task, {}).get("effective"),
        }
        if _number(metrics.get("perplexity,none")) is not None:
            entry["perplexity"] = _number(metrics["perplexity,none"])
        tidy[task] = entry
    return tidy
