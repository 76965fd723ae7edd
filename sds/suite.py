"""The evaluation suite: every number measured on one model state, under flat metric names.

    ppl/<source>        perplexity on an evaluation corpus (sds.data.load_eval_tokens; a
                        local file goes by its name without suffixes, and a short hash of its
                        content where another source, or a built-in corpus, goes by that name:
                        `source_labels`)
    acc/<task>          zero-shot accuracy (sds.evaluate.zero_shot)
    acc_norm/<task>     length-normalised zero-shot accuracy, where the task reports it

The same suite runs on the dense model, the one-shot pruned model and the SDS model, so their
metrics line up name by name.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .data import DEMO_CORPORA, load_eval_tokens
from .errors import ConfigError
from .evaluate import expand_tasks, perplexity, zero_shot

# The C4 protocol of SparseGPT / Wanda scores the first 256 windows of the validation text.
C4_EVAL_WINDOWS = 256
# The names of the built-in corpora: a file never goes by one of them alone, since it is read
# as a local file (blank-line documents, no C4 cut), not by that corpus's protocol.
BUILTIN_SOURCES = ("wikitext2", "c4", "ptb", *DEMO_CORPORA)


def as_list(value: str | Sequence[str] | None) -> list[str]:
    """'wiki,news' or ['wiki', 'news'] or None -> ['wiki', 'news'] (order kept, no repeats)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if part and part.lower() != "none" and part not in out:
                out.append(part)
    return out


def source_label(source: str) -> str:
    """The name a corpus goes by in metric names: 'wiki', 'wikitext2', or a file's stem."""
    if not _is_file(source):
        return source
    name = Path(source).name
    for suffix in (".gz", ".txt", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name or source


def source_labels(sources: Sequence[str]) -> list[str]:
    """`source_label` of each source, unique: files whose label another source also has (`wiki`
    and `data/wiki.txt`, or `a/test.txt` and `b/test.txt`), or the name of a built-in corpus
    (`data/wikitext2.txt`: not WikiText-2 by its protocol), get a short hash of their content
    appended (of their path where they cannot be read), so that no perplexity overwrites
    another under one metric name, or reads as a built-in corpus's. Not of the path: the
    pipeline keys a file on its name and content, so an evaluation stored from one folder is
    reused from another, and its metric names must be the ones the other folder would give.
    Files alike in name and content too also get their position."""
    labels = [source_label(s) for s in sources]
    out = [f"{label}-{_short_hash(source)}" if _is_file(source) and (
        labels.count(label) > 1 or label in BUILTIN_SOURCES) else label
        for source, label in zip(sources, labels)]
    return [f"{label}-{i + 1}" if out.count(label) > 1 and _is_file(source) else label
            for i, (source, label) in enumerate(zip(sources, out))]


def _short_hash(source: str) -> str:
    """The first 6 hex digits of the sha256 of a file's content, or of its path when it cannot
    be read (the evaluation then says what is wrong with it)."""
    digest = hashlib.sha256()
    try:
        with open(Path(source).expanduser(), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        digest = hashlib.sha256(source.encode())
    return digest.hexdigest()[:6]


def _is_file(source: str) -> bool:
    return ("/" in source or "\\" in source
            or source.endswith((".txt", ".json", ".jsonl", ".gz")))


def evaluate_model(
    model,
    tokenizer,
    *,
    sources: str | Sequence[str] = ("wiki",),
    seqlen: int,
    tasks: str | Sequence[str] | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    on_part=None,
    on_window=None,
) -> dict:
    """Run the suite on `model` (moved to `device` when given).

    Returns {"metrics": {"ppl/<source>": float, "acc/<task>": float, "acc_norm/<task>": float},
    "details": {name: full record}, "seconds": float}. `limit` caps the examples per zero-shot
    task (None: all). `on_part(done, parts, name)`, when given, is called after each part:
    each corpus's perplexity, then the zero-shot tasks (one part). `on_window(done, windows,
    name)`, when given, is called after each batch of windows inside a corpus's perplexity.
    """
    sources = as_list(sources)
    task_names = expand_tasks(as_list(tasks))
    if not sources and not task_names:
        raise ConfigError("nothing to evaluate: give at least one evaluation corpus "
                          "(e.g. --eval wiki) or zero-shot task (e.g. --tasks demo)")
    if device is not None:
        model.to(device)
    t0 = time.perf_counter()
    metrics: dict[str, float | None] = {}
    details: dict[str, dict] = {}
    parts = len(sources) + bool(task_names)
    for done, (source, label) in enumerate(zip(sources, source_labels(sources)), 1):
        max_tokens = C4_EVAL_WINDOWS * seqlen if source == "c4" else None
        ids, record = load_eval_tokens(tokenizer, source, max_tokens=max_tokens)  # [1, N]
        name = f"ppl/{label}"
        windows_done = None if on_window is None else (
            lambda done, windows, name=name: on_window(done, windows, name))
        result = perplexity(model, ids, seqlen, device=device, on_window=windows_done)
        metrics[name] = result["ppl"]
        details[name] = {**result, "data": record}
        if on_part is not None:
            on_part(done, parts, name)
    if task_names:
        results = zero_shot(model, tokenizer, task_names, batch_size=batch_size, limit=limit)
        for task, entry in results.items():
            metrics[f"acc/{task}"] = entry.get("acc")
            if entry.get("acc_norm") is not None:
                metrics[f"acc_norm/{task}"] = entry["acc_norm"]
            details[f"zero_shot/{task}"] = entry
        if on_part is not None:
            on_part(parts, parts, "zero-shot tasks")
    return {"metrics": metrics, "details": details, "seconds": time.perf_counter() - t0}


def standard_errors(details: dict) -> dict[str, float]:
    """{metric: its standard error} for the zero-shot accuracies in an `evaluate_model` result's
    `details`: lm-eval's own where it is a number, else the binomial sqrt(p (1 − p) / n) of
    the n examples scored. Perplexities have none here (their windows are not independent)."""
    out = {}
    for name, entry in details.items():
        if not (name.startswith("zero_shot/") and isinstance(entry, dict)):
            continue
        task, n = name.removeprefix("zero_shot/"), entry.get("samples")
        for metric in ("acc", "acc_norm"):
            p, se = entry.get(metric), entry.get(f"{metric}_stderr")
            if not _number(p):
                continue
            if not _number(se) and isinstance(n, int) and n > 0 and 0 <= p <= 1:
                se = math.sqrt(p * (1 - p) / n)
            if _number(se):
                out[f"{metric}/{task}"] = float(se)
    return out


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
