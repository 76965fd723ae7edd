"""Calibration and evaluation corpora, as token ids.

Calibration follows the SparseGPT / Wanda protocol: `nsamples` windows of `seqlen` tokens, drawn
with a private `random.Random(seed)` so the same seed gives the same windows as the reference
code (which seeds the global `random` module the same way).

- document protocol (C4, and local corpora whose long documents hold enough text): draw a random
  document until one tokenizes to more than `seqlen` tokens, then take a random window of it;
- stream protocol (WikiText-2, and short local corpora): join the documents (WikiText-2's
  training lines with " ", as the reference code does; a local corpus's documents with
  "\\n\\n"), tokenize once, take random windows of the token stream.

Evaluation text is tokenized once and returned as `[1, N]`; `sds.evaluate.perplexity` cuts it into
`N // seqlen` non-overlapping windows.

Sources: the hub datasets of the papers (`c4`, `wikitext2`, `ptb`), the offline demo corpus, or a
local file: `.txt` (documents separated by blank lines) or `.jsonl` / `.json` (one JSON object
with a "text" field per line; `.gz` compressed files are read too). Every choice made lands in
the returned record, so that a calibration set or an evaluation can be described and hashed.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import json
import math
import operator
import random
import re
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, DataError, HubUnreachableError
from .hub import HUB_PROBE_SECONDS, check_hub, hub_offline  # noqa: F401 (re-exported)

DEFAULT_SEQLEN = 2048

C4_DATASET = "allenai/c4"
C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
C4_EVAL_DOCUMENTS = 1100
WIKITEXT_DATASET, WIKITEXT_CONFIG = "Salesforce/wikitext", "wikitext-2-raw-v1"
PTB_DATASET, PTB_CONFIG = "ptb-text-only/ptb_text_only", "penn_treebank"

DEMO_CORPORA = ("wiki", "news")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json")

CALIBRATION_SOURCES = (
    "'c4' (allenai/c4, the papers' setting), 'wikitext2', 'demo' (the offline demo corpus), "
    "or a local file: .txt (documents separated by blank lines), .jsonl/.json (a \"text\" field "
    "per line), optionally .gz"
)
EVAL_SOURCES = (
    "'wikitext2', 'c4', 'ptb', 'wiki' or 'news' (held-out demo text, offline), or a local file: "
    ".txt (documents separated by blank lines), .jsonl/.json (a \"text\" field per line), "
    "optionally .gz"
)
_CALIB_HINT = (
    "calibrate on a local file instead (--calib path/to/text.txt, or a .jsonl with a \"text\" "
    "field per line) or on the offline demo corpus (--calib demo)"
)
_EVAL_HINT = (
    "evaluate on a local file instead (--eval path/to/text.txt, or a .jsonl with a \"text\" "
    "field per line) or on the held-out demo text (--eval wiki)"
)

# What each hub source reads, by role: `datasets.load_dataset` arguments
HUB_DATA = {
    ("calibration", "c4"): {"path": C4_DATASET, "data_files": {"train": C4_TRAIN_FILE},
                            "split": "train"},
    ("calibration", "wikitext2"): {"path": WIKITEXT_DATASET, "name": WIKITEXT_CONFIG,
                                   "split": "train"},
    ("evaluation", "wikitext2"): {"path": WIKITEXT_DATASET, "name": WIKITEXT_CONFIG,
                                  "split": "test"},
    ("evaluation", "c4"): {"path": C4_DATASET, "data_files": {"validation": C4_VALIDATION_FILE},
                           "split": "validation"},
    ("evaluation", "ptb"): {"path": PTB_DATASET, "name": PTB_CONFIG, "split": "test"},
}

# Attributes under which model configs store their number of positions, most specific first.
_POSITION_ATTRS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "max_sequence_length",
    "seq_length",
    "n_ctx",
)


@dataclass(frozen=True, eq=False)
class Calibration:
    """Calibration token windows and the record of how they were chosen."""

    input_ids: torch.Tensor  # [nsamples, seqlen] int64
    record: dict = field(default_factory=dict)

    def __post_init__(self):
        ids = self.input_ids
        if not isinstance(ids, torch.Tensor):
            raise DataError(f"calibration input_ids must be a tensor, got {type(ids).__name__}")
        if ids.dim() != 2 or ids.numel() == 0:
            raise DataError(
                f"calibration is empty or malformed: input_ids has shape {tuple(ids.shape)}, "
                "expected [nsamples, seqlen] with nsamples, seqlen >= 1; check the corpus and "
                "the nsamples / seqlen options"
            )
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise DataError(f"calibration input_ids must hold integer token ids, got {ids.dtype}")
        if ids.dtype != torch.int64:
            object.__setattr__(self, "input_ids", ids.to(torch.int64))

    @property
    def nsamples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seqlen(self) -> int:
        return self.input_ids.shape[1]


# -- sequence length ----------------------------------------------------------------------------
def max_positions(model_config: Any) -> int | None:
    """The number of positions a model can attend over, or None when its config does not say."""
    configs = [model_config]
    get_text_config = getattr(model_config, "get_text_config", None)
    if callable(get_text_config):
        try:
            configs.insert(0, get_text_config())
        except Exception:  # a config without a text part keeps its own attributes
            pass
    for config in configs:
        for attr in _POSITION_ATTRS:
            value = getattr(config, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def resolve_seqlen(model_config: Any, requested: int | None) -> int:
    """The calibration / evaluation window length for a model.

    Default: `min(2048, positions)`: the papers' 2048 for OPT and LLaMA, never the 131072 of
    Llama-3's `max_position_embeddings`. A requested length beyond the model's positions raises.
    """
    positions = max_positions(model_config)
    if requested is None:
        return DEFAULT_SEQLEN if positions is None else min(DEFAULT_SEQLEN, positions)
    seqlen = as_int("seqlen", requested, minimum=2)
    if positions is not None and seqlen > positions:
        raise ConfigError(
            f"seqlen {seqlen} exceeds the model's {positions} positions "
            f"(max_position_embeddings); use a seqlen of at most {positions}"
        )
    return seqlen


def as_int(name: str, value: Any, minimum: int | None = None) -> int:
    """`value` as an int (bools and floats refused), at least `minimum`, else ConfigError."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {number}")
    return number


# -- calibration --------------------------------------------------------------------------------
def _check_tokenizer(tokenizer) -> None:
    if isinstance(tokenizer, str | Path) or not callable(tokenizer):
        raise ConfigError(f"tokenizer must be a tokenizer object, got {tokenizer!r}; load one "
                          "with transformers.AutoTokenizer.from_pretrained(name)")


def load_calibration(
    tokenizer,
    source: str = "c4",
    nsamples: int = 128,
    seqlen: int = DEFAULT_SEQLEN,
    seed: int = 0,
) -> Calibration:
    """`nsamples` random windows of `seqlen` tokens from `source` (see the module docstring)."""
    _check_tokenizer(tokenizer)
    nsamples = as_int("nsamples", nsamples, minimum=1)
    seqlen = as_int("seqlen", seqlen, minimum=2)
    seed = as_int("seed", seed)
    if not isinstance(source, str | Path) or not str(source).strip():
        raise ConfigError(
            f"calibration source {source!r} is empty; accepted: {CALIBRATION_SOURCES}"
        )
    rng = random.Random(seed)
    record: dict[str, Any] = {
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
        **_tokenizer_record(tokenizer),
    }
    name = str(source).strip()

    if name == "c4":
        data = _hub_dataset(**HUB_DATA["calibration", "c4"], hint=_CALIB_HINT)
        record.update(source="c4", dataset=C4_DATASET, data_files=C4_TRAIN_FILE, split="train",
                      protocol="documents", documents_total=len(data))
        cache: dict[int, list[int]] = {}  # only long documents keep their tokens

        def document_ids(i: int) -> list[int]:
            if i not in cache:
                ids = _encode(tokenizer, data[i]["text"])
                cache[i] = ids if len(ids) > seqlen else []
            return cache[i]

        windows, stats = _document_windows(len(data), document_ids, nsamples, seqlen, rng,
                                           what=f"{C4_DATASET} {C4_TRAIN_FILE}")
        record.update(stats, documents_read=len(cache))
        return Calibration(windows, record)

    if name == "wikitext2":
        data = _hub_dataset(**HUB_DATA["calibration", "wikitext2"], hint=_CALIB_HINT)
        texts = list(data["text"])  # the reference joins the training lines with " "
        ids = torch.tensor(_encode(tokenizer, " ".join(texts)), dtype=torch.int64)
        record.update(source="wikitext2", dataset=WIKITEXT_DATASET, config=WIKITEXT_CONFIG,
                      split="train", protocol="stream", joiner=" ",
                      documents_read=len(texts), tokens_total=ids.numel())
        windows, stats = _stream_windows(ids, nsamples, seqlen, rng,
                                         what=f"{WIKITEXT_DATASET} {WIKITEXT_CONFIG} train")
        record.update(stats)
        return Calibration(windows, record)

    if name == "demo":
        path = _demo_corpus_path("wiki", "calib")
        record.update(source="demo", corpus="wiki", corpus_split="calib")
        return _local_calibration(tokenizer, path, nsamples, seqlen, rng, record)

    path = _local_path(name, accepted=CALIBRATION_SOURCES, kind="calibration source")
    record.update(source="file")
    return _local_calibration(tokenizer, path, nsamples, seqlen, rng, record)


def _local_calibration(tokenizer, path: Path, nsamples: int, seqlen: int,
                       rng: random.Random, record: dict) -> Calibration:
    """Document protocol when the long documents hold at least nsamples·seqlen tokens, else
    random windows of the concatenated token stream."""
    documents = read_documents(path)
    record.update(path=str(path), sha256=sha256_file(path), documents_total=len(documents),
                  documents_read=len(documents))
    encoded = _encode_many(tokenizer, documents)
    long_tokens = sum(len(ids) for ids in encoded if len(ids) > seqlen)
    long_documents = sum(len(ids) > seqlen for ids in encoded)
    needed = nsamples * seqlen
    if long_tokens >= needed:
        record.update(protocol="documents", long_document_tokens=long_tokens)
        # every document is tokenized already, so rejection sampling can afford the draws that
        # rare long documents need (20 times the expected number)
        expected_draws = nsamples * len(encoded) / long_documents
        windows, stats = _document_windows(len(encoded), encoded.__getitem__, nsamples, seqlen,
                                           rng, what=str(path),
                                           max_draws=int(20 * expected_draws))
    else:
        ids = torch.tensor(_encode(tokenizer, "\n\n".join(documents)), dtype=torch.int64)
        record.update(protocol="stream", joiner="\n\n", tokens_total=ids.numel(),
                      long_document_tokens=long_tokens)
        windows, stats = _stream_windows(ids, nsamples, seqlen, rng, what=str(path))
    record.update(stats)
    return Calibration(windows, record)


# how far past its check `_document_windows` may go, as a multiple of the draws checked
DRAWS_BEYOND = 10


def _document_windows(
    n_documents: int,
    document_ids: Callable[[int], Sequence[int]],
    nsamples: int,
    seqlen: int,
    rng: random.Random,
    what: str,
    max_draws: int = 0,
) -> tuple[torch.Tensor, dict]:
    """SparseGPT's C4 sampler: per sample, draw documents until one has more than seqlen tokens,
    then a random window of it. Returns (windows [nsamples, seqlen], statistics).

    The reference draws for as long as it takes. This one checks after `max_draws` draws (at
    least 10,000 and 100 per sample): it gives up when no long document came up, or when the
    rate at which they came up would need more than `DRAWS_BEYOND` times that many draws in
    all; otherwise it goes on (long documents rare but not hopeless: C4 at seqlen 4096)."""
    if n_documents == 0:
        raise DataError(f"{what} holds no documents; {_CALIB_HINT}")
    max_draws = max(10_000, 100 * nsamples, max_draws)
    draws, windows, starts = 0, [], []
    for _ in range(nsamples):
        while True:
            draws += 1
            if draws > max_draws:
                needed = draws * nsamples / len(windows) if windows else math.inf
                if needed > DRAWS_BEYOND * max_draws:
                    rate = (f" (at this rate about {needed:,.0f} draws would be needed)"
                            if windows else "")
                    raise DataError(
                        f"{what}: after {draws - 1} random documents only {len(windows)} of "
                        f"{nsamples} were longer than seqlen={seqlen} tokens{rate}; lower "
                        "seqlen or nsamples, or use a corpus with longer documents"
                    )
            i = rng.randint(0, n_documents - 1)
            ids = document_ids(i)
            if len(ids) > seqlen:
                break
        j = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(torch.as_tensor(list(ids[j:j + seqlen]), dtype=torch.int64))
        starts.append([i, j])
    return torch.stack(windows), {"draws": draws, "window_starts": starts}


def _stream_windows(ids: torch.Tensor, nsamples: int, seqlen: int, rng: random.Random,
                    what: str) -> tuple[torch.Tensor, dict]:
    """Wanda's WikiText-2 sampler: random windows of one token stream `ids: [N]`.
    The stream must hold at least nsamples·seqlen tokens, so windows are not mostly repeats."""
    n = ids.numel()
    needed = max(nsamples * seqlen, seqlen + 1)
    if n < needed:
        raise DataError(
            f"{what} tokenizes to {n} tokens, too few for nsamples={nsamples} windows of "
            f"seqlen={seqlen} ({needed} tokens needed); lower nsamples or seqlen, or use a "
            "larger corpus"
        )
    starts = [rng.randint(0, n - seqlen - 1) for _ in range(nsamples)]
    windows = torch.stack([ids[s:s + seqlen] for s in starts])
    return windows, {"window_starts": starts}


# -- evaluation ---------------------------------------------------------------------------------
def load_eval_tokens(tokenizer, source: str, max_tokens: int | None = None
                     ) -> tuple[torch.Tensor, dict]:
    """The evaluation text of `source`, tokenized once: `(input_ids [1, N] int64, record)`.

    `max_tokens` keeps the first tokens only. The C4 protocol keeps 256·seqlen: pass
    `max_tokens=256 * seqlen` for `c4` (`sds.suite.evaluate_model` does), or every token of its
    1100 documents is returned and scored.
    """
    _check_tokenizer(tokenizer)
    if max_tokens is not None:
        max_tokens = as_int("max_tokens", max_tokens, minimum=1)
    if not isinstance(source, str | Path) or not str(source).strip():
        raise ConfigError(f"evaluation source {source!r} is empty; accepted: {EVAL_SOURCES}")
    name = str(source).strip()
    record: dict[str, Any] = {**_tokenizer_record(tokenizer)}

    if name == "wikitext2":
        data = _hub_dataset(**HUB_DATA["evaluation", "wikitext2"], hint=_EVAL_HINT)
        texts, joiner = list(data["text"]), "\n\n"
        record.update(source="wikitext2", dataset=WIKITEXT_DATASET, config=WIKITEXT_CONFIG,
                      split="test")
    elif name == "c4":
        data = _hub_dataset(**HUB_DATA["evaluation", "c4"], hint=_EVAL_HINT)
        texts, joiner = list(data[:C4_EVAL_DOCUMENTS]["text"]), " "
        record.update(source="c4", dataset=C4_DATASET, data_files=C4_VALIDATION_FILE,
                      split="validation", first_documents=C4_EVAL_DOCUMENTS)
    elif name == "ptb":
        data = _hub_dataset(**HUB_DATA["evaluation", "ptb"], hint=_EVAL_HINT)
        texts, joiner = list(data["sentence"]), " "
        record.update(source="ptb", dataset=PTB_DATASET, config=PTB_CONFIG, split="test")
    elif name in DEMO_CORPORA:
        path = _demo_corpus_path(name, "heldout")
        texts, joiner = read_documents(path), "\n\n"
        record.update(source=name, corpus=name, corpus_split="heldout", path=str(path),
                      sha256=sha256_file(path))
    else:
        path = _local_path(name, accepted=EVAL_SOURCES, kind="evaluation source")
        texts, joiner = read_documents(path), "\n\n"
        record.update(source="file", path=str(path), sha256=sha256_file(path))

    text = joiner.join(texts)
    if not text.strip():
        raise DataError(f"evaluation source {name!r} holds no text; accepted: {EVAL_SOURCES}")
    ids = torch.tensor(_encode(tokenizer, text), dtype=torch.int64).unsqueeze(0)
    record.update(documents=len(texts), joiner=joiner, tokens_total=ids.shape[1],
                  max_tokens=max_tokens)
    if max_tokens is not None:
        ids = ids[:, :max_tokens]
    record["tokens"] = ids.shape[1]
    if ids.numel() == 0:
        raise DataError(f"evaluation source {name!r} tokenizes to no tokens")
    return ids, record


# -- reading text -------------------------------------------------------------------------------
def read_documents(path: str | Path) -> list[str]:
    """Documents of a local file: `.txt` split at blank lines, `.jsonl`/`.json` one "text" per
    line (a `.json` holding one list of objects or strings works too); `.gz` is decompressed."""
    path = Path(path)
    suffixes = [s.lower() for s in path.suffixes]
    compressed = bool(suffixes) and suffixes[-1] == ".gz"
    kind = suffixes[-2] if compressed and len(suffixes) >= 2 else (suffixes[-1] if suffixes else "")
    if kind not in LOCAL_SUFFIXES:
        raise ConfigError(f"cannot read {path}: expected a .txt, .jsonl or .json file "
                          "(optionally .gz)")
    try:
        if compressed:
            with gzip.open(path, "rt", encoding="utf-8-sig") as f:  # a byte-order mark goes
                text = f.read()
        else:
            text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"corpus file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read corpus file {path}: {exc}") from exc

    if kind == ".txt":
        documents = [d.strip() for d in re.split(r"\n[ \t\r\f\v]*\n", text)]
    elif kind == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON: {exc}") from exc
        documents = [_text_field(item, path, f"entry {n + 1}") for n, item in enumerate(items)]
    else:
        documents = [_text_field(item, path, f"line {n}")
                     for n, item in jsonl_records(text.split("\n"), path)]  # not U+2028
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise DataError(f"corpus file {path} holds no text")
    return documents


def jsonl_records(lines, path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for each non-blank line; DataError naming a bad line."""
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {n} is not valid JSON: {exc}") from exc


def _text_field(item: Any, path: Path, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return item["text"]
    raise DataError(f"{path} {where} has no string \"text\" field: expected "
                    "{\"text\": \"...\"} per line")


def check_eval_length(tokenizer, source: str, seqlen: int) -> None:
    """Refuse a local evaluation file too short for one window of `seqlen` tokens, or without
    text, as its evaluation would, but in a moment: only the text's start is tokenized (enough
    characters for a window at 16 per token), so a long file costs its reading only. Names
    and hub sources are left to their evaluation."""
    name = str(source).strip()
    if name in ("wikitext2", "c4", "ptb", *DEMO_CORPORA):
        return
    path = _local_path(name, accepted=EVAL_SOURCES, kind="evaluation source")
    text = "\n\n".join(read_documents(path))
    if not text.strip():
        raise DataError(f"evaluation source {name!r} holds no text; accepted: {EVAL_SOURCES}")
    start = text[:16 * seqlen]
    tokens = len(_encode(tokenizer, start))
    if tokens < seqlen and len(start) == len(text):
        raise DataError(f"the evaluation text {name!r} has {tokens} tokens, fewer than one "
                        f"window of seqlen={seqlen}; use a smaller seqlen or a longer text")


def check_source(source: str, role: str) -> None:
    """Refuse, without reading it, a `role` ("calibration" or "evaluation") source that
    `load_calibration` or `load_eval_tokens` would refuse by its name: an unknown name, a file
    that does not exist or is of an unsupported kind. (Empty text is found when it is read.)"""
    name = str(source).strip()
    if role == "calibration":
        known, accepted = ("c4", "wikitext2", "demo"), CALIBRATION_SOURCES
    else:
        known, accepted = ("wikitext2", "c4", "ptb", *DEMO_CORPORA), EVAL_SOURCES
    if name not in known:
        _local_path(name, accepted=accepted, kind=f"{role} source")


def _local_path(name: str, accepted: str, kind: str) -> Path:
    path = Path(name).expanduser()
    suffixes = [s.lower() for s in path.suffixes]
    looks_local = bool(suffixes) and (suffixes[-1] in LOCAL_SUFFIXES or (
        suffixes[-1] == ".gz" and len(suffixes) >= 2 and suffixes[-2] in LOCAL_SUFFIXES))
    if path.is_file():
        if not looks_local:
            raise ConfigError(f"{kind} {name!r} is a file of an unsupported kind; "
                              f"accepted: {accepted}")
        return path.resolve()
    if looks_local or path.is_dir() or "/" in name or "\\" in name:
        raise DataError(f"{kind} file {name!r} does not exist (or is not a file); "
                        f"accepted: {accepted}")
    raise ConfigError(f"unknown {kind} {name!r}; accepted: {accepted}")


def _demo_corpus_path(corpus: str, split: str) -> Path:
    demo = importlib.import_module("sds.demo")
    path = Path(demo.corpus_path(corpus, split))
    if not path.is_file():
        raise DataError(f"the demo corpus file {path} ({corpus}, {split}) is missing; "
                        "reinstall the package or regenerate the demo data")
    return path


def sha256_file(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# -- tokenization -------------------------------------------------------------------------------
def _encode(tokenizer, text: str) -> list[int]:
    """Token ids with the tokenizer's default special tokens, as the reference code does."""
    return list(tokenizer(text, verbose=False)["input_ids"])


def _encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, verbose=False)["input_ids"]]


def _tokenizer_record(tokenizer) -> dict:
    return {
        "tokenizer": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
        "tokenizer_class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "add_special_tokens": True,
    }


# -- the hub ------------------------------------------------------------------------------------
def _unreachable_types() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.gaierror]
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

        kinds += [OfflineModeIsEnabled, LocalEntryNotFoundError]
    except ImportError:
        pass
    try:
        import requests

        kinds += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    except ImportError:
        pass
    try:
        import httpx

        kinds += [httpx.TransportError]
    except ImportError:
        pass
    return tuple(kinds)


def hub_unreachable(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from, says the network / hub is unreachable
    (including the offline mode set by HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    kinds = _unreachable_types()
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, kinds):
            return True
        current = current.__cause__ or current.__context__
    return False


def check_hub_data(source: str, role: str) -> None:
    """Fail now, not inside a stage, when the hub `source` ("c4", "wikitext2", "ptb") cannot
    be had in `role` ("calibration" or "evaluation"): in offline mode (HF_HUB_OFFLINE /
    HF_DATASETS_OFFLINE) by loading it from the local Hugging Face cache (memory-mapped: quick
    once cached), else by probing the hub."""
    spec = HUB_DATA[role, source]
    hint = _CALIB_HINT if role == "calibration" else _EVAL_HINT
    if hub_offline(datasets=True):
        _hub_dataset(**spec, hint=hint)
    else:
        check_hub(_hub_what(**spec), hint)


def _hub_what(path: str, name: str | None = None, data_files: dict | None = None,
              **_) -> str:
    return f"{path}" + (f" ({name})" if name else "") + (
        f" [{', '.join(data_files.values())}]" if data_files else "")


def _hub_dataset(path: str, name: str | None = None, *, split: str, hint: str,
                 data_files: dict | None = None):
    """`datasets.load_dataset(...)`, with hub and loading failures turned into DataError. In
    offline mode `datasets` reads its local cache only (and fails at once without it);
    otherwise the hub is probed first."""
    import datasets

    what = _hub_what(path, name, data_files)
    offline = hub_offline(datasets=True)
    if not offline:
        check_hub(what, hint)
    try:
        return datasets.load_dataset(path, name, data_files=data_files, split=split)
    except Exception as exc:
        if offline and (hub_unreachable(exc) or isinstance(exc, ConnectionError)):
            raise HubUnreachableError(
                f"cannot load {what}: offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) "
                f"and it is not in the local Hugging Face cache ({exc}); {hint}; or load it "
                "once with the hub reachable") from exc
        if hub_unreachable(exc):
            raise HubUnreachableError(
                f"cannot load {what}: the Hugging Face hub is unreachable ({exc}); {hint}"
            ) from exc
        if "scripts are no longer supported" in str(exc):
            raise DataError(
                f"cannot load {what}: the hub copy is a loading script, which datasets "
                f"{datasets.__version__} no longer runs; {hint}"
            ) from exc
        raise DataError(f"cannot load {what}: {exc}; {hint}") from exc
